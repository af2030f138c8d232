//! What a client asks for, typed: one struct per request, whatever carried
//! it. The WebSocket adapter builds these from JSON frames (`frames`); a
//! REST or gRPC adapter builds them from its own requests. Adding a request
//! is a new [`CommandKind`], a struct, a [`ClientCommand`] variant and a
//! [`crate::Session`] method.

mod channels;

pub use channels::{
    PresenceUsers, Publish, RoomJoin, RoomLeave, RoomMessage, Subscribe, Unsubscribe,
};
use switchboard_mesh::{ErrorCode, ServiceError, pb};

/// The kinds of request the server handles (for checks made before a
/// request's fields are read: authentication, rate limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Auth,
    Message,
    GroupMessage,
    Fetch,
    Ack,
    /// A request about a persistent group (GROUP_CREATE, …, GROUPS_LIST).
    Group(pb::GroupOp),
    Subscribe,
    Unsubscribe,
    Publish,
    RoomJoin,
    RoomMessage,
    RoomLeave,
    PresenceSubscribe,
    PresenceUnsubscribe,
    UserList,
}

/// A client request.
#[derive(Debug)]
pub enum ClientCommand {
    Auth(Auth),
    Message(Message),
    GroupMessage(GroupMessage),
    Fetch(Fetch),
    Ack(Ack),
    Group(GroupCommand),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Publish(Publish),
    RoomJoin(RoomJoin),
    RoomMessage(RoomMessage),
    RoomLeave(RoomLeave),
    PresenceSubscribe(PresenceUsers),
    PresenceUnsubscribe(PresenceUsers),
    UserList,
}

impl ClientCommand {
    pub fn kind(&self) -> CommandKind {
        match self {
            ClientCommand::Auth(_) => CommandKind::Auth,
            ClientCommand::Message(_) => CommandKind::Message,
            ClientCommand::GroupMessage(_) => CommandKind::GroupMessage,
            ClientCommand::Fetch(_) => CommandKind::Fetch,
            ClientCommand::Ack(_) => CommandKind::Ack,
            ClientCommand::Group(cmd) => CommandKind::Group(cmd.op),
            ClientCommand::Subscribe(_) => CommandKind::Subscribe,
            ClientCommand::Unsubscribe(_) => CommandKind::Unsubscribe,
            ClientCommand::Publish(_) => CommandKind::Publish,
            ClientCommand::RoomJoin(_) => CommandKind::RoomJoin,
            ClientCommand::RoomMessage(_) => CommandKind::RoomMessage,
            ClientCommand::RoomLeave(_) => CommandKind::RoomLeave,
            ClientCommand::PresenceSubscribe(_) => CommandKind::PresenceSubscribe,
            ClientCommand::PresenceUnsubscribe(_) => CommandKind::PresenceUnsubscribe,
            ClientCommand::UserList => CommandKind::UserList,
        }
    }
}

/// What any request may carry besides its command.
#[derive(Debug, Default, Clone)]
pub struct RequestMeta {
    /// The client's own correlation string, echoed in answers.
    pub reference: Option<String>,
    /// A client's W3C `traceparent`: the request joins that trace.
    pub traceparent: Option<String>,
}

/// Sign in as a user of an app.
#[derive(Debug)]
pub struct Auth {
    pub app_id: String,
    pub user_id: String,
    /// Empty for apps that check none.
    pub token: String,
    /// Acknowledged mode: stored messages count as delivered only once
    /// acknowledged.
    pub acks: bool,
    pub device: Option<String>,
}

/// A direct message to one user.
#[derive(Debug)]
pub struct Message {
    pub to: String,
    pub content: String,
    /// The client's own message id (checked by [`check_message_id`]);
    /// `None`: the server assigns one.
    pub id: Option<String>,
    pub feature: pb::Feature,
}

/// A message to an ad-hoc list of users or to a persistent group.
#[derive(Debug)]
pub struct GroupMessage {
    pub to: Option<Vec<String>>,
    pub group: Option<String>,
    pub content: String,
    pub id: Option<String>,
    pub feature: pb::Feature,
}

/// A page of stored messages, after those already sent to this session.
#[derive(Debug)]
pub struct Fetch {
    /// `None`: the default page size.
    pub count: Option<u32>,
}

/// Stored messages the client has handled (acknowledged mode).
#[derive(Debug)]
pub struct Ack {
    pub ids: Vec<String>,
}

/// A request about a persistent group; which fields it needs depends on
/// `op` (checked by the session).
#[derive(Debug)]
pub struct GroupCommand {
    pub op: pb::GroupOp,
    pub group: Option<String>,
    pub name: Option<String>,
    pub members: Option<Vec<String>>,
}

/// Longest client message id, in characters (all ASCII, so also bytes).
pub const MAX_MESSAGE_ID_CHARS: usize = 64;

/// A client-given message id: 1–64 characters of `A-Z a-z 0-9 _ -`, so
/// that it is safe in keys, logs and URLs.
pub fn check_message_id(id: &str) -> Result<(), ServiceError> {
    let invalid = |why: String| {
        ServiceError::new(
            ErrorCode::InvalidFrame,
            format!(
                "data.id must be 1 to {MAX_MESSAGE_ID_CHARS} characters of A-Z a-z 0-9 _ -: {why}"
            ),
        )
    };
    if id.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(invalid(format!("it contains {c:?}")));
    }
    if id.len() > MAX_MESSAGE_ID_CHARS {
        return Err(invalid(format!("it has {} characters", id.len())));
    }
    Ok(())
}

/// Whether `c` reorders or hides text when displayed: the Unicode
/// bidirectional formatting characters (U+061C, U+200E/F, U+202A–U+202E,
/// U+2066–U+2069) and invisible ones. In a user id they make one id look
/// like another.
fn is_hidden_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        // Invisible format characters and line separators: the same
        // look-alike trick (zero-width spaces and joiners, word joiner,
        // BOM, soft hyphen).
        || matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200D}' | '\u{2028}' | '\u{2029}' | '\u{2060}' | '\u{FEFF}')
}

/// A user id as it may appear anywhere (signing in, a recipient, a group
/// member): 1 to `max_chars` characters, none of them a control or a
/// bidirectional formatting character. `field` names it in the error.
pub fn check_user_id(field: &str, user: &str, max_chars: usize) -> Result<(), ServiceError> {
    let invalid = |why: String| {
        ServiceError::new(
            ErrorCode::InvalidFrame,
            format!("{field} is not a valid user id: {why}"),
        )
    };
    if user.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    let chars = user.chars().count();
    if chars > max_chars {
        return Err(invalid(format!(
            "it has {chars} characters, more than {max_chars}"
        )));
    }
    if let Some(c) = user
        .chars()
        .find(|&c| c.is_control() || is_hidden_control(c))
    {
        return Err(invalid(format!(
            "it contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_bounded_and_free_of_control_and_bidi_characters() {
        for ok in [
            "ANZ-1",
            "demo-\u{00e9}l\u{00e8}ve",
            "demo-\u{4e2d}\u{6587}",
            &"x".repeat(128),
        ] {
            assert!(check_user_id("data.to", ok, 128).is_ok(), "{ok:?}");
        }
        for (bad, why) in [
            ("", "it is empty"),
            (
                &"x".repeat(129) as &str,
                "it has 129 characters, more than 128",
            ),
            ("demo-a\nb", "it contains the control character U+000A"),
            ("demo-\u{0000}", "it contains the control character U+0000"),
            (
                "demo-\u{202E}nimda",
                "it contains the control character U+202E",
            ),
            ("demo-\u{2066}x", "it contains the control character U+2066"),
        ] {
            let e = check_user_id("data.to", bad, 128).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidFrame);
            assert_eq!(e.message, format!("data.to is not a valid user id: {why}"));
        }
    }

    #[test]
    fn message_ids_of_the_allowed_characters_and_lengths_pass() {
        for id in [
            "a",
            "Z",
            "0",
            "_",
            "-",
            "msg-2026_12_05-AbC9",
            &"x".repeat(MAX_MESSAGE_ID_CHARS),
            "0193a0b1-1111-7222-8333-444455556666",
        ] {
            assert!(check_message_id(id).is_ok(), "{id:?}");
        }
    }

    #[test]
    fn other_message_ids_are_invalid_frames_that_say_why() {
        for (id, why) in [
            ("", "it is empty"),
            (
                &"x".repeat(MAX_MESSAGE_ID_CHARS + 1),
                "it has 65 characters",
            ),
            ("a b", "it contains ' '"),
            ("a.b", "it contains '.'"),
            ("a/b", "it contains '/'"),
            ("é", "it contains 'é'"),
            ("id\n", "it contains '\\n'"),
            ("👋", "it contains '👋'"),
        ] {
            let err = check_message_id(id).expect_err(id);
            assert_eq!(err.code, ErrorCode::InvalidFrame, "{id:?}");
            assert!(
                err.message.starts_with("data.id must be 1 to 64"),
                "{}",
                err.message
            );
            assert!(err.message.ends_with(why), "{id:?}: {}", err.message);
        }
        // 64 characters that are not ASCII are refused for the characters,
        // not counted in bytes.
        let err = check_message_id(&"é".repeat(40)).expect_err("non-ASCII");
        assert!(err.message.ends_with("it contains 'é'"), "{}", err.message);
    }
}
