//! Frames of topics, rooms and presence subscriptions: parsing into typed
//! commands and rendering what clients receive.

use serde::Serialize;
use serde_json::Value;
use switchboard_mesh::{ErrorCode, pb};

use super::{ClientFrame, FrameError, render};
use crate::commands::{
    ClientCommand, CommandKind, PresenceUsers, Publish, RoomJoin, RoomLeave, RoomMessage,
    Subscribe, Unsubscribe,
};

pub(super) fn kind_from_name(name: &str) -> Option<CommandKind> {
    Some(match name {
        "SUBSCRIBE" => CommandKind::Subscribe,
        "UNSUBSCRIBE" => CommandKind::Unsubscribe,
        "PUBLISH" => CommandKind::Publish,
        "ROOM_JOIN" => CommandKind::RoomJoin,
        "ROOM_MESSAGE" => CommandKind::RoomMessage,
        "ROOM_LEAVE" => CommandKind::RoomLeave,
        "PRESENCE_SUBSCRIBE" => CommandKind::PresenceSubscribe,
        "PRESENCE_UNSUBSCRIBE" => CommandKind::PresenceUnsubscribe,
        "USER_LIST_REQUEST" => CommandKind::UserList,
        _ => return None,
    })
}

pub(super) fn type_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Subscribe => "SUBSCRIBE",
        CommandKind::Unsubscribe => "UNSUBSCRIBE",
        CommandKind::Publish => "PUBLISH",
        CommandKind::RoomJoin => "ROOM_JOIN",
        CommandKind::RoomMessage => "ROOM_MESSAGE",
        CommandKind::RoomLeave => "ROOM_LEAVE",
        CommandKind::PresenceSubscribe => "PRESENCE_SUBSCRIBE",
        CommandKind::PresenceUnsubscribe => "PRESENCE_UNSUBSCRIBE",
        CommandKind::UserList => "USER_LIST_REQUEST",
        // The core types are named in `frames`.
        _ => "unknown",
    }
}

impl ClientFrame {
    /// The command of a topic, room or presence frame.
    pub(super) fn channel_command(
        &mut self,
        kind: CommandKind,
    ) -> Result<ClientCommand, FrameError> {
        Ok(match kind {
            CommandKind::Subscribe => ClientCommand::Subscribe(Subscribe {
                topic: self.take_string("topic")?,
                since: self.take_optional_u64("since")?,
            }),
            CommandKind::Unsubscribe => ClientCommand::Unsubscribe(Unsubscribe {
                topic: self.take_string("topic")?,
            }),
            CommandKind::Publish => ClientCommand::Publish(Publish {
                topic: self.take_string("topic")?,
                content: self.take_string("content")?,
            }),
            CommandKind::RoomJoin => ClientCommand::RoomJoin(RoomJoin {
                room: self.take_string("room")?,
                nick: self.take_optional_string("nick")?,
                app_id: self.take_optional_string("appId")?,
            }),
            CommandKind::RoomMessage => ClientCommand::RoomMessage(RoomMessage {
                room: self.take_string("room")?,
                content: self.take_string("content")?,
            }),
            CommandKind::RoomLeave => ClientCommand::RoomLeave(RoomLeave {
                room: self.take_string("room")?,
            }),
            CommandKind::PresenceSubscribe => ClientCommand::PresenceSubscribe(self.users()?),
            CommandKind::PresenceUnsubscribe => ClientCommand::PresenceUnsubscribe(self.users()?),
            CommandKind::UserList => ClientCommand::UserList,
            other => {
                return Err(self.err(
                    ErrorCode::UnknownType,
                    format!("{other:?} is not a channel frame"),
                ));
            }
        })
    }

    fn users(&mut self) -> Result<PresenceUsers, FrameError> {
        let users = self
            .take_string_list("users")?
            .ok_or_else(|| self.err(ErrorCode::InvalidFrame, "missing field data.users"))?;
        Ok(PresenceUsers { users })
    }

    fn take_optional_u64(&mut self, field: &str) -> Result<Option<u64>, FrameError> {
        match self.data.take(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                self.err(
                    ErrorCode::InvalidFrame,
                    format!("data.{field} must be a non-negative integer"),
                )
            }),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be a non-negative integer"),
            )),
        }
    }
}

#[derive(Serialize)]
struct SubscribedData<'a> {
    topic: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

/// `SUBSCRIBED`; `recovered` only when the client asked with `since`.
pub fn subscribed(
    topic: &str,
    offset: u64,
    recovered: Option<bool>,
    reference: Option<&str>,
) -> String {
    render(
        "SUBSCRIBED",
        SubscribedData {
            topic,
            offset,
            recovered,
        },
        reference,
    )
}

#[derive(Serialize)]
struct TopicData<'a> {
    topic: &'a str,
}

pub fn unsubscribed(topic: &str, reference: Option<&str>) -> String {
    render("UNSUBSCRIBED", TopicData { topic }, reference)
}

#[derive(Serialize)]
struct PublicationData<'a> {
    topic: &'a str,
    from: &'a str,
    content: &'a str,
    id: &'a str,
    ts: i64,
    offset: u64,
}

pub fn publication(p: &pb::Publication) -> String {
    render(
        "PUBLICATION",
        PublicationData {
            topic: &p.topic,
            from: &p.from,
            content: &p.content,
            id: &p.id,
            ts: p.ts,
            offset: p.offset,
        },
        None,
    )
}

#[derive(Serialize)]
struct PublishedData<'a> {
    topic: &'a str,
    id: &'a str,
    offset: u64,
}

pub fn published(topic: &str, id: &str, offset: u64, reference: Option<&str>) -> String {
    render("PUBLISHED", PublishedData { topic, id, offset }, reference)
}

#[derive(Serialize)]
struct RoomMessageData<'a> {
    room: &'a str,
    from: &'a str,
    nick: &'a str,
    content: &'a str,
    id: &'a str,
    ts: i64,
}

fn room_message_data(m: &pb::RoomMessage) -> RoomMessageData<'_> {
    RoomMessageData {
        room: &m.room,
        from: &m.from,
        nick: &m.nick,
        content: &m.content,
        id: &m.id,
        ts: m.ts,
    }
}

pub fn room_message(m: &pb::RoomMessage) -> String {
    render("ROOM_MESSAGE", room_message_data(m), None)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoomJoinedData<'a> {
    room: &'a str,
    history: Vec<RoomMessageData<'a>>,
    members: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
}

/// `ROOM_JOINED`; `user_id` for an anonymous member (its generated id).
pub fn room_joined(
    room: &str,
    history: &[pb::RoomMessage],
    members: u32,
    user_id: Option<&str>,
    reference: Option<&str>,
) -> String {
    render(
        "ROOM_JOINED",
        RoomJoinedData {
            room,
            history: history.iter().map(room_message_data).collect(),
            members,
            user_id,
        },
        reference,
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RoomEventData<'a> {
    room: &'a str,
    event: &'a str,
    user_id: &'a str,
    nick: &'a str,
    members: u32,
}

pub fn room_event(e: &pb::RoomEvent) -> String {
    let event = match e.kind() {
        pb::RoomEventKind::Joined => "joined",
        pb::RoomEventKind::Left => "left",
        pb::RoomEventKind::Message => "message",
    };
    render(
        "ROOM_EVENT",
        RoomEventData {
            room: &e.room,
            event,
            user_id: &e.user_id,
            nick: &e.nick,
            members: e.members,
        },
        None,
    )
}

#[derive(Serialize)]
struct RoomData<'a> {
    room: &'a str,
}

pub fn room_reset(room: &str) -> String {
    render("ROOM_RESET", RoomData { room }, None)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PresenceData<'a> {
    user_id: &'a str,
    online: bool,
}

pub fn presence(user_id: &str, online: bool) -> String {
    render("PRESENCE", PresenceData { user_id, online }, None)
}

#[derive(Serialize)]
struct UserListData<'a> {
    users: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

pub fn user_list(users: &[String], truncated: bool, reference: Option<&str>) -> String {
    render("USER_LIST", UserListData { users, truncated }, reference)
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    fn command(text: &str) -> Result<ClientCommand, FrameError> {
        parse(text).expect("parses").command()
    }

    #[test]
    fn channel_frames_parse_into_their_commands() {
        match command(r#"{"type":"SUBSCRIBE","data":{"topic":"prices","since":1207}}"#) {
            Ok(ClientCommand::Subscribe(s)) => {
                assert_eq!((s.topic.as_str(), s.since), ("prices", Some(1207)));
            }
            other => panic!("{other:?}"),
        }
        match command(
            r#"{"type":"ROOM_JOIN","data":{"room":"kitchen","nick":"ann","appId":"open"}}"#,
        ) {
            Ok(ClientCommand::RoomJoin(j)) => {
                assert_eq!(j.room, "kitchen");
                assert_eq!(j.nick.as_deref(), Some("ann"));
                assert_eq!(j.app_id.as_deref(), Some("open"));
            }
            other => panic!("{other:?}"),
        }
        match command(r#"{"type":"PRESENCE_UNSUBSCRIBE","data":{"users":["a-1","a-2"]}}"#) {
            Ok(ClientCommand::PresenceUnsubscribe(p)) => assert_eq!(p.users, ["a-1", "a-2"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            command(r#"{"type":"USER_LIST_REQUEST"}"#),
            Ok(ClientCommand::UserList)
        ));
    }

    #[test]
    fn bad_channel_frames_say_which_field() {
        for (text, message) in [
            (
                r#"{"type":"SUBSCRIBE","data":{}}"#,
                "missing field data.topic",
            ),
            (
                r#"{"type":"SUBSCRIBE","data":{"topic":"t","since":"1"}}"#,
                "data.since must be a non-negative integer",
            ),
            (
                r#"{"type":"SUBSCRIBE","data":{"topic":"t","since":1.5}}"#,
                "data.since must be a non-negative integer",
            ),
            (
                r#"{"type":"PUBLISH","data":{"topic":"t"}}"#,
                "missing field data.content",
            ),
            (
                r#"{"type":"ROOM_JOIN","data":{"room":7}}"#,
                "data.room must be a string",
            ),
            (
                r#"{"type":"PRESENCE_SUBSCRIBE","data":{}}"#,
                "missing field data.users",
            ),
            (
                r#"{"type":"PRESENCE_SUBSCRIBE","data":{"users":[1]}}"#,
                "data.users must be a list of strings",
            ),
        ] {
            let e = command(text).expect_err(text);
            assert_eq!(e.code, ErrorCode::InvalidFrame, "{text}");
            assert_eq!(e.message, message, "{text}");
        }
    }

    proptest::proptest! {
        /// Whatever a channel frame's `data` holds, parsing gives a command
        /// or an error with a code, never a panic; a well-typed frame
        /// keeps its fields exactly.
        #[test]
        fn any_channel_frame_data_parses_or_is_refused(
            kind in proptest::sample::select(vec![
                "SUBSCRIBE", "UNSUBSCRIBE", "PUBLISH", "ROOM_JOIN", "ROOM_MESSAGE",
                "ROOM_LEAVE", "PRESENCE_SUBSCRIBE", "PRESENCE_UNSUBSCRIBE", "USER_LIST_REQUEST",
            ]),
            topic in proptest::option::of(".{0,20}"),
            since in proptest::option::of(proptest::num::i64::ANY),
            users in proptest::option::of(proptest::collection::vec(".{0,8}", 0..4)),
        ) {
            let mut data = serde_json::Map::new();
            if let Some(topic) = &topic {
                data.insert("topic".into(), Value::from(topic.clone()));
                data.insert("room".into(), Value::from(topic.clone()));
                data.insert("content".into(), Value::from(topic.clone()));
            }
            if let Some(since) = since {
                data.insert("since".into(), Value::from(since));
            }
            if let Some(users) = &users {
                data.insert("users".into(), Value::from(users.clone()));
            }
            let text = serde_json::json!({"type": kind, "data": data}).to_string();
            match command(&text) {
                Ok(ClientCommand::Subscribe(s)) => {
                    proptest::prop_assert_eq!(Some(&s.topic), topic.as_ref());
                    proptest::prop_assert_eq!(s.since.map(|v| v as i64), since);
                }
                Ok(ClientCommand::PresenceSubscribe(p)) => {
                    proptest::prop_assert_eq!(Some(&p.users), users.as_ref());
                }
                Ok(_) => {}
                Err(e) => proptest::prop_assert_eq!(e.code, ErrorCode::InvalidFrame),
            }
        }
    }

    #[test]
    fn publications_and_room_frames_render_as_the_protocol_says() {
        let p = pb::Publication {
            app_id: "a".into(),
            topic: "prices".into(),
            from: "a-1".into(),
            content: "q\"1".into(),
            id: "m1".into(),
            ts: 5,
            offset: 1208,
        };
        let v: Value = serde_json::from_str(&publication(&p)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"PUBLICATION","data":{"topic":"prices","from":"a-1","content":"q\"1","id":"m1","ts":5,"offset":1208}})
        );
        let v: Value = serde_json::from_str(&subscribed("prices", 1207, Some(false), Some("r")))
            .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"SUBSCRIBED","data":{"topic":"prices","offset":1207,"recovered":false},"reference":"r"})
        );
        let v: Value =
            serde_json::from_str(&user_list(&["a-1".into()], false, None)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"USER_LIST","data":{"users":["a-1"]}})
        );
    }
}
