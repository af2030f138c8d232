//! Properties of client frame parsing, for the fuzz targets (fuzz/) and the
//! property tests: checked with `assert!`, so a violation is a crash the
//! fuzzer reports. Reached through [`crate::fuzzing`].

use serde_json::{Map, Value, json};
use switchboard_mesh::{ErrorCode, pb};

use super::{FrameKind, error, parse, type_name};
use crate::commands::{ClientCommand, check_message_id, check_user_id};

/// A text frame as the server reads it (`parse`, then `command`): never a
/// panic; a refusal is `INVALID_JSON`, `INVALID_FRAME` or `UNKNOWN_TYPE`
/// and renders as an ERROR frame; a command, written back as a frame,
/// parses to the same command (decode -> encode -> decode). Returns
/// whether it was a command.
pub fn check_frame(text: &str) -> bool {
    let Some(first) = decode(text) else {
        return false;
    };
    let again = decode(&encode(&first)).expect("a re-encoded command parses");
    assert_eq!(
        format!("{first:?}"),
        format!("{again:?}"),
        "decode -> encode -> decode differs"
    );
    // The checks the session applies next take any string.
    if let (_, ClientCommand::Message(m), _) = &first {
        let _ = check_user_id("data.to", &m.to, 128);
        if let Some(id) = &m.id {
            let _ = check_message_id(id);
        }
    }
    true
}

type Decoded = (Option<String>, ClientCommand, Option<String>);

/// The command and its reference and traceparent, or `None` when refused
/// (after checking the refusal).
fn decode(text: &str) -> Option<Decoded> {
    let refused = |e: super::FrameError| {
        assert!(
            matches!(
                e.code,
                ErrorCode::InvalidJson | ErrorCode::InvalidFrame | ErrorCode::UnknownType
            ),
            "refused with {:?}: {}",
            e.code,
            e.message
        );
        let rendered: Value = serde_json::from_str(&error(&e)).expect("an ERROR frame is JSON");
        assert_eq!(rendered["type"], "ERROR");
        None
    };
    let mut frame = match parse(text) {
        Ok(frame) => frame,
        Err(e) => return refused(e),
    };
    if let FrameKind::Command(kind) = &frame.kind {
        assert_eq!(
            FrameKind::from_name(type_name(*kind)),
            frame.kind,
            "type names round trip"
        );
    }
    match frame.command() {
        Ok(cmd) => Some((frame.meta.reference, cmd, frame.meta.traceparent)),
        Err(e) => refused(e),
    }
}

fn feature(f: pb::Feature) -> &'static str {
    match f {
        pb::Feature::Fast => "FAST",
        _ => "RELIABLE",
    }
}

/// The frame a client would send for `cmd`.
fn encode((reference, cmd, traceparent): &Decoded) -> String {
    let kind = super::type_name(cmd.kind());
    let mut top = Map::new();
    let data = match cmd {
        ClientCommand::Auth(a) => json!({
            "appId": a.app_id, "userId": a.user_id, "token": a.token,
            "acks": a.acks, "device": a.device,
        }),
        ClientCommand::Message(m) => {
            top.insert("feature".into(), feature(m.feature).into());
            json!({"to": m.to, "content": m.content, "id": m.id})
        }
        ClientCommand::GroupMessage(g) => {
            top.insert("feature".into(), feature(g.feature).into());
            json!({"to": g.to, "group": g.group, "content": g.content, "id": g.id})
        }
        ClientCommand::Fetch(f) => json!({"count": f.count}),
        ClientCommand::Ack(a) => json!({"ids": a.ids}),
        ClientCommand::Group(g) => json!({"group": g.group, "name": g.name, "members": g.members}),
        ClientCommand::Subscribe(s) => json!({"topic": s.topic, "since": s.since}),
        ClientCommand::Unsubscribe(u) => json!({"topic": u.topic}),
        ClientCommand::Publish(p) => json!({"topic": p.topic, "content": p.content}),
        ClientCommand::RoomJoin(r) => json!({"room": r.room, "nick": r.nick, "appId": r.app_id}),
        ClientCommand::RoomMessage(r) => json!({"room": r.room, "content": r.content}),
        ClientCommand::RoomLeave(r) => json!({"room": r.room}),
        ClientCommand::PresenceSubscribe(p) | ClientCommand::PresenceUnsubscribe(p) => {
            json!({"users": p.users})
        }
        ClientCommand::UserList => json!({}),
    };
    top.insert("type".into(), kind.into());
    top.insert("data".into(), data);
    top.insert("reference".into(), reference.clone().into());
    top.insert("traceparent".into(), traceparent.clone().into());
    Value::Object(top).to_string()
}
