//! Client protocol v1 frames: parsing what clients send into typed
//! commands ([`crate::commands`]) and rendering what they receive. JSON
//! lives here and nowhere else.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_mesh::{ErrorCode, ServiceError, pb};

use crate::commands::{
    Ack, Auth, ClientCommand, CommandKind, Fetch, GroupMessage, Message, RequestMeta,
};
use crate::json;

mod groups;
pub use groups::group_reply;
mod channels;
#[doc(hidden)]
pub mod fuzzing;

pub use channels::*;

/// A parsed client frame: its type, top-level fields and the `data` fields
/// its command reads (moved out by [`ClientFrame::command`]).
#[derive(Debug)]
pub struct ClientFrame {
    pub kind: FrameKind,
    pub meta: RequestMeta,
    data: Data,
    feature: Option<String>,
}

/// What a frame's `type` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind {
    Command(CommandKind),
    /// A type this server does not handle (kept for the error message).
    Unknown(String),
}

impl FrameKind {
    fn from_name(name: &str) -> FrameKind {
        match name {
            "AUTH_CLIENT" => FrameKind::Command(CommandKind::Auth),
            "MESSAGE" => FrameKind::Command(CommandKind::Message),
            "GROUP_MESSAGE" => FrameKind::Command(CommandKind::GroupMessage),
            "FETCH_MISSING_MESSAGES_REQUEST" => FrameKind::Command(CommandKind::Fetch),
            "ACK" => FrameKind::Command(CommandKind::Ack),
            other => match groups::op_of(other) {
                Some(op) => FrameKind::Command(CommandKind::Group(op)),
                None => match channels::kind_from_name(other) {
                    Some(kind) => FrameKind::Command(kind),
                    None => FrameKind::Unknown(other.to_owned()),
                },
            },
        }
    }

    /// The command this frame asks for; `None` for an unknown type.
    pub fn command(&self) -> Option<CommandKind> {
        match self {
            FrameKind::Command(kind) => Some(*kind),
            FrameKind::Unknown(_) => None,
        }
    }

    /// The type as a metrics label: a known type's name, or `unknown` (the
    /// type is client input; labels must stay a small set).
    pub fn label(&self) -> &'static str {
        match self {
            FrameKind::Command(kind) => type_name(*kind),
            FrameKind::Unknown(_) => "unknown",
        }
    }
}

/// A command's frame type on the wire.
pub fn type_name(kind: CommandKind) -> &'static str {
    match kind {
        CommandKind::Auth => "AUTH_CLIENT",
        CommandKind::Message => "MESSAGE",
        CommandKind::GroupMessage => "GROUP_MESSAGE",
        CommandKind::Fetch => "FETCH_MISSING_MESSAGES_REQUEST",
        CommandKind::Ack => "ACK",
        CommandKind::Group(op) => groups::type_name(op),
        other => channels::type_name(other),
    }
}

/// The `data` fields any frame type of protocol v1 reads. Others are
/// skipped while parsing, without being kept.
const DATA_FIELDS: [&str; 18] = [
    "to", "content", "group", "id", "appId", "userId", "token", "acks", "device", "count", "ids",
    "name", "members", "topic", "since", "room", "nick", "users",
];

/// The known fields of `data`, each once (a repeated field: the last value
/// counts, as with any JSON object reader).
#[derive(Debug, Default)]
struct Data(Vec<(&'static str, Value)>);

impl Data {
    fn set(&mut self, field: &'static str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| *k == field) {
            Some(slot) => slot.1 = value,
            None => self.0.push((field, value)),
        }
    }

    fn take(&mut self, field: &str) -> Option<Value> {
        debug_assert!(DATA_FIELDS.contains(&field), "data.{field} is not parsed");
        let at = self.0.iter().position(|(k, _)| *k == field)?;
        Some(self.0.swap_remove(at).1)
    }
}

/// What `data` was: read field by field (no map of every key is built).
enum DataSlot {
    Absent,
    Null,
    Object(Data),
    Other,
}

/// The top-level fields a frame has; everything else is skipped.
struct Top {
    kind: KindSlot,
    data: DataSlot,
    feature: Option<Value>,
    reference: Option<Value>,
    traceparent: Option<Value>,
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a frame is a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut top = Top {
            kind: KindSlot::Absent,
            data: DataSlot::Absent,
            feature: None,
            reference: None,
            traceparent: None,
        };
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_str() {
                "type" => top.kind = map.next_value_seed(KindSeed)?,
                "data" => top.data = map.next_value_seed(DataSeed)?,
                "feature" => top.feature = Some(map.next_value()?),
                "reference" => top.reference = Some(map.next_value()?),
                "traceparent" => top.traceparent = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(top)
    }
}

/// A key, borrowed from the frame unless it has escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl Key<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// What `type` was: a string is mapped to its kind as it is read (no
/// string is kept for a known type).
enum KindSlot {
    Absent,
    Kind(FrameKind),
    NotString,
}

struct KindSeed;

impl<'de> DeserializeSeed<'de> for KindSeed {
    type Value = KindSlot;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<KindSlot, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KindSeed {
    type Value = KindSlot;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<KindSlot, E> {
        Ok(KindSlot::Kind(FrameKind::from_name(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KindSlot, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(KindSlot::NotString)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KindSlot, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KindSlot::NotString)
    }

    fn visit_unit<E>(self) -> Result<KindSlot, E> {
        Ok(KindSlot::NotString)
    }

    fn visit_bool<E>(self, _: bool) -> Result<KindSlot, E> {
        Ok(KindSlot::NotString)
    }

    fn visit_i64<E>(self, _: i64) -> Result<KindSlot, E> {
        Ok(KindSlot::NotString)
    }

    fn visit_u64<E>(self, _: u64) -> Result<KindSlot, E> {
        Ok(KindSlot::NotString)
    }

    fn visit_f64<E>(self, _: f64) -> Result<KindSlot, E> {
        Ok(KindSlot::NotString)
    }
}

struct DataSeed;

impl<'de> DeserializeSeed<'de> for DataSeed {
    type Value = DataSlot;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<DataSlot, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed {
    type Value = DataSlot;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DataSlot, A::Error> {
        let mut data = Data::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match DATA_FIELDS.iter().find(|&&f| f == key.as_str()) {
                Some(&field) => data.set(field, map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(DataSlot::Object(data))
    }

    fn visit_unit<E>(self) -> Result<DataSlot, E> {
        Ok(DataSlot::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DataSlot, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(DataSlot::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<DataSlot, E> {
        Ok(DataSlot::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<DataSlot, E> {
        Ok(DataSlot::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<DataSlot, E> {
        Ok(DataSlot::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<DataSlot, E> {
        Ok(DataSlot::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<DataSlot, E> {
        Ok(DataSlot::Other)
    }
}

/// Why a frame was refused, with the reference when it could be read.
#[derive(Debug)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<String>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            reference: None,
        }
    }

    pub fn with_reference(mut self, reference: Option<String>) -> Self {
        self.reference = reference;
        self
    }

    /// A session's refusal of a request, answered with its reference.
    pub fn refused(err: ServiceError, meta: &RequestMeta) -> Self {
        FrameError::new(err.code, err.message).with_reference(meta.reference.clone())
    }
}

pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = de
        .deserialize_map(TopVisitor)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| match e.classify() {
            // Well-formed JSON of the wrong shape: not an object.
            serde_json::error::Category::Data => {
                FrameError::new(ErrorCode::InvalidFrame, "a frame is a JSON object")
            }
            _ => FrameError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")),
        })?;
    let reference = match top.reference {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(FrameError::new(
                ErrorCode::InvalidFrame,
                "reference must be a string",
            ));
        }
    };
    let kind = match top.kind {
        KindSlot::Kind(kind) => kind,
        KindSlot::Absent | KindSlot::NotString => {
            return Err(
                FrameError::new(ErrorCode::InvalidFrame, "missing string field type")
                    .with_reference(reference),
            );
        }
    };
    let data = match top.data {
        DataSlot::Object(data) => data,
        DataSlot::Absent | DataSlot::Null => Data::default(),
        DataSlot::Other => {
            return Err(
                FrameError::new(ErrorCode::InvalidFrame, "data must be an object")
                    .with_reference(reference),
            );
        }
    };
    let feature = optional_string(top.feature, "feature", &reference)?;
    let traceparent = optional_string(top.traceparent, "traceparent", &reference)?;
    Ok(ClientFrame {
        kind,
        meta: RequestMeta {
            reference,
            traceparent,
        },
        data,
        feature,
    })
}

/// An optional top-level string field (absent or null: `None`).
fn optional_string(
    value: Option<Value>,
    name: &str,
    reference: &Option<String>,
) -> Result<Option<String>, FrameError> {
    match value {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(FrameError::new(
            ErrorCode::InvalidFrame,
            format!("{name} must be a string"),
        )
        .with_reference(reference.clone())),
    }
}

/// The frame type a pushed message is rendered as (metrics label).
pub fn push_type(msg: &pb::InboxMessage) -> &'static str {
    match msg.kind() {
        pb::MessageKind::Direct | pb::MessageKind::Group => "MESSAGE",
        pb::MessageKind::Confirmation => "MESSAGE_CONFIRMATION",
        pb::MessageKind::Undelivered => "ERROR",
        pb::MessageKind::UserConnected => "USER_CONNECTED",
        pb::MessageKind::UserDisconnected => "USER_DISCONNECTED",
        pb::MessageKind::GroupEvent => "GROUP_EVENT",
    }
}

/// The client frame types this server handles.
pub const KNOWN_TYPES: [&str; 14] = [
    "MESSAGE",
    "AUTH_CLIENT",
    "GROUP_MESSAGE",
    "FETCH_MISSING_MESSAGES_REQUEST",
    "ACK",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PUBLISH",
    "ROOM_JOIN",
    "ROOM_MESSAGE",
    "ROOM_LEAVE",
    "PRESENCE_SUBSCRIBE",
    "PRESENCE_UNSUBSCRIBE",
    "USER_LIST_REQUEST",
];

impl ClientFrame {
    /// A MESSAGE frame's command (the hot path reads it without the enum).
    pub fn message(&mut self) -> Result<Message, FrameError> {
        Ok(Message {
            to: self.take_string("to")?,
            content: self.take_string("content")?,
            id: self.take_optional_string("id")?,
            feature: self.feature()?,
        })
    }

    fn err(&self, code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError::new(code, message).with_reference(self.meta.reference.clone())
    }

    /// The frame's typed command, its `data` fields moved out (no copy).
    /// Fields are read in a fixed order: the first bad one is reported.
    pub fn command(&mut self) -> Result<ClientCommand, FrameError> {
        let kind = match &self.kind {
            FrameKind::Command(kind) => *kind,
            FrameKind::Unknown(name) => {
                return Err(self.err(
                    ErrorCode::UnknownType,
                    format!("unknown frame type {name:?}"),
                ));
            }
        };
        Ok(match kind {
            CommandKind::Auth => ClientCommand::Auth(Auth {
                app_id: self.take_string("appId")?,
                user_id: self.take_string("userId")?,
                token: self.take_optional_string("token")?.unwrap_or_default(),
                acks: self.take_bool("acks")?,
                device: self.take_optional_string("device")?,
            }),
            CommandKind::Message => ClientCommand::Message(self.message()?),
            CommandKind::GroupMessage => ClientCommand::GroupMessage(GroupMessage {
                to: self.take_string_list("to")?,
                group: self.take_optional_string("group")?,
                content: self.take_string("content")?,
                id: self.take_optional_string("id")?,
                feature: self.feature()?,
            }),
            CommandKind::Fetch => ClientCommand::Fetch(Fetch {
                count: self.take_optional_count("count")?,
            }),
            CommandKind::Ack => ClientCommand::Ack(Ack {
                ids: self
                    .take_string_list("ids")?
                    .ok_or_else(|| self.err(ErrorCode::InvalidFrame, "missing field data.ids"))?,
            }),
            CommandKind::Group(op) => ClientCommand::Group(self.group_command(op)?),
            other => self.channel_command(other)?,
        })
    }

    /// A required string field of `data`, moved out.
    fn take_string(&mut self, field: &str) -> Result<String, FrameError> {
        match self.data.take(field) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be a string"),
            )),
            None => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("missing field data.{field}"),
            )),
        }
    }

    fn take_optional_string(&mut self, field: &str) -> Result<Option<String>, FrameError> {
        match self.data.take(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be a string"),
            )),
        }
    }

    fn take_bool(&mut self, field: &str) -> Result<bool, FrameError> {
        match self.data.take(field) {
            Some(Value::Bool(b)) => Ok(b),
            None | Some(Value::Null) => Ok(false),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be true or false"),
            )),
        }
    }

    fn take_string_list(&mut self, field: &str) -> Result<Option<Vec<String>>, FrameError> {
        match self.data.take(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(self.err(
                        ErrorCode::InvalidFrame,
                        format!("data.{field} must be a list of strings"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be a list of strings"),
            )),
        }
    }

    fn take_optional_count(&mut self, field: &str) -> Result<Option<u32>, FrameError> {
        match self.data.take(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| Some(u32::try_from(n).unwrap_or(u32::MAX)))
                .ok_or_else(|| {
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

    /// `feature`: RELIABLE (default) or FAST.
    fn feature(&self) -> Result<pb::Feature, FrameError> {
        match self.feature.as_deref() {
            None | Some("RELIABLE") => Ok(pb::Feature::Reliable),
            Some("FAST") => Ok(pb::Feature::Fast),
            Some(other) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("feature must be RELIABLE or FAST, not {other:?}"),
            )),
        }
    }
}

// ---------------------------------------------------------------- rendering

#[derive(Serialize)]
struct Out<'a, D: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
}

fn render<D: Serialize>(kind: &str, data: D, reference: Option<&str>) -> String {
    serde_json::to_string(&Out {
        kind,
        data,
        reference,
    })
    // Serializing plain structs of strings and numbers cannot fail.
    .unwrap_or_default()
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[derive(Serialize)]
#[serde(untagged)]
enum SentTo<'a> {
    One(&'a str),
    Many(&'a [String]),
}

#[derive(Serialize)]
struct SentData<'a> {
    to: SentTo<'a>,
    content: &'a str,
    id: &'a str,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfirmationData<'a> {
    reference: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserData<'a> {
    user_id: &'a str,
}

/// Renders a pushed message as the frame its recipient gets.
pub fn render_push(item: &pb::PushItem, msg: &pb::InboxMessage) -> String {
    let seq = (msg.seq > 0).then_some(msg.seq);
    if item.sent_copy {
        let to = match (msg.kind(), item.to.as_slice()) {
            (pb::MessageKind::Direct, [one]) => SentTo::One(one),
            (_, many) => SentTo::Many(many),
        };
        return render(
            "MESSAGE_SENT",
            SentData {
                to,
                content: &msg.content,
                id: &msg.id,
                ts: msg.ts,
                group: non_empty(&msg.group),
            },
            non_empty(&msg.reference),
        );
    }
    match msg.kind() {
        // The frame nearly every delivery is: written by hand (see `json`),
        // the same JSON the other frames get from serde.
        pb::MessageKind::Direct | pb::MessageKind::Group => {
            let mut out = String::with_capacity(msg.content.len() + 128);
            json::Object::begin(&mut out)
                .str("type", "MESSAGE")
                .object("data", |data| {
                    data.str("from", &msg.from)
                        .str("content", &msg.content)
                        .str("id", &msg.id)
                        .int("ts", msg.ts)
                        .opt_uint("seq", seq)
                        .opt_str("group", non_empty(&msg.group))
                        .str_list("hops", &msg.hops);
                })
                .opt_str("reference", non_empty(&msg.reference))
                .end();
            out
        }
        pb::MessageKind::Confirmation => render(
            "MESSAGE_CONFIRMATION",
            ConfirmationData {
                reference: &msg.reference,
                id: &msg.id,
                seq,
            },
            None,
        ),
        pb::MessageKind::Undelivered => undelivered(msg, seq),
        pb::MessageKind::UserConnected => {
            render("USER_CONNECTED", UserData { user_id: &msg.from }, None)
        }
        pb::MessageKind::UserDisconnected => {
            render("USER_DISCONNECTED", UserData { user_id: &msg.from }, None)
        }
        pb::MessageKind::GroupEvent => groups::group_event(msg),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthReplyData<'a> {
    app_id: &'a str,
    user_id: &'a str,
    is_authenticated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// The home domain's client URL (federation).
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect: Option<&'a str>,
}

pub fn auth_reply(
    app_id: &str,
    user_id: &str,
    ok: bool,
    reason: Option<&str>,
    redirect: Option<&str>,
) -> String {
    render(
        "AUTH_CLIENT_REPLY",
        AuthReplyData {
            app_id,
            user_id,
            is_authenticated: ok,
            reason,
            redirect,
        },
        None,
    )
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct InboxFullData<'a> {
    code: &'a str,
    message: String,
    id: &'a str,
    recipients: &'a [String],
    /// A stored notice's number in the sender's inbox (to ACK it).
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

/// The ERROR of a group message that was not stored for some recipients,
/// their inboxes being full (it was accepted for the others).
pub fn inbox_full(reference: Option<&str>, id: &str, recipients: &[String]) -> String {
    render(
        "ERROR",
        InboxFullData {
            code: ErrorCode::InboxFull.as_str(),
            message: format!(
                "not stored for {} recipient(s) whose inbox is full; accepted for the others",
                recipients.len()
            ),
            id,
            recipients,
            seq: None,
        },
        reference,
    )
}

/// What an undelivered notice carries (`content`).
#[derive(serde::Deserialize)]
struct UndeliveredNotice {
    code: String,
    #[serde(default)]
    recipients: Vec<String>,
}

/// The `ERROR` that tells a sender, after `MESSAGE_ACCEPTED`, that another
/// domain refused its message for good (a full inbox there): the frame a
/// refusal here gets, with the message's id, reference and, in the
/// acknowledged mode, the `seq` to ACK.
fn undelivered(msg: &pb::InboxMessage, seq: Option<u64>) -> String {
    let notice = serde_json::from_str::<UndeliveredNotice>(&msg.content).unwrap_or_else(|_| {
        // Damaged or from a newer version: still a refusal, named by who
        // sent the notice.
        UndeliveredNotice {
            code: ErrorCode::InboxFull.as_str().to_owned(),
            recipients: Vec::new(),
        }
    });
    let recipients = if notice.recipients.is_empty() {
        std::slice::from_ref(&msg.from)
    } else {
        notice.recipients.as_slice()
    };
    let code = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .find(|c| *c == notice.code)
        .unwrap_or(ErrorCode::Internal.as_str());
    let why = if code == ErrorCode::InboxFull.as_str() {
        "the recipient's inbox is full"
    } else {
        code
    };
    let message = format!(
        "message {} was not delivered to {}: {why}",
        msg.id,
        recipients.join(", ")
    );
    render(
        "ERROR",
        InboxFullData {
            code,
            message,
            id: &msg.id,
            recipients,
            seq,
        },
        non_empty(&msg.reference),
    )
}

pub fn error(err: &FrameError) -> String {
    render(
        "ERROR",
        ErrorData {
            code: err.code.as_str(),
            message: &err.message,
        },
        err.reference.as_deref(),
    )
}

#[derive(Serialize)]
struct AcceptedData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    id: &'a str,
}

pub fn accepted(reference: Option<&str>, id: &str) -> String {
    render(
        "MESSAGE_ACCEPTED",
        AcceptedData { reference, id },
        reference,
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FetchCompleteData {
    left_missing_count: u64,
}

pub fn fetch_complete(left: u64) -> String {
    render(
        "FETCH_MISSING_MESSAGES_COMPLETE",
        FetchCompleteData {
            left_missing_count: left,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_moves_fields_out() {
        let mut f = parse(r#"{"type":"MESSAGE","data":{"to":"a-1","content":"x"},"feature":"FAST","reference":"r"}"#)
            .expect("parse");
        assert_eq!(f.kind, FrameKind::Command(CommandKind::Message));
        assert_eq!(f.meta.reference.as_deref(), Some("r"));
        assert_eq!(f.feature().expect("feature"), pb::Feature::Fast);
        assert_eq!(f.take_string("to").expect("to"), "a-1");
        let e = f.take_string("to").expect_err("moved");
        assert_eq!(e.code, ErrorCode::InvalidFrame);
        assert_eq!(e.reference.as_deref(), Some("r"));
    }

    #[test]
    fn parse_errors_have_codes() {
        assert_eq!(
            parse("{nope").expect_err("bad").code,
            ErrorCode::InvalidJson
        );
        assert_eq!(parse("[1]").expect_err("bad").code, ErrorCode::InvalidFrame);
        assert_eq!(
            parse(r#"{"data":{}}"#).expect_err("bad").code,
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            parse(r#"{"type":"X","data":3}"#).expect_err("bad").code,
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn parse_reads_objects_as_any_json_reader_would() {
        // Escaped keys, unknown fields (any shape) skipped, a repeated field's
        // last value, whitespace around.
        let mut f = parse(
            r#" {"t\u0079pe":"MESSAGE","x":{"deep":[1,{"a":null}]},"data":{"to":"a-1","to":"a-2","extra":[true],"content":"c\n"},"feature":null} "#,
        )
        .expect("parse");
        assert_eq!(f.kind, FrameKind::Command(CommandKind::Message));
        assert_eq!(f.feature, None);
        assert_eq!(f.take_string("to").expect("to"), "a-2");
        assert_eq!(f.take_string("content").expect("content"), "c\n");
        assert!(f.take_optional_string("group").expect("group").is_none());
        // A frame without data, or with null data, has no fields.
        let mut f = parse(r#"{"type":"ACK","data":null}"#).expect("parse");
        assert!(f.take_string_list("ids").expect("ids").is_none());
    }

    #[test]
    fn each_malformed_frame_gets_its_own_error() {
        for (text, code, message, reference) in [
            ("", ErrorCode::InvalidJson, "invalid JSON", None),
            ("{} x", ErrorCode::InvalidJson, "invalid JSON", None),
            (
                r#"{"type":"A""#,
                ErrorCode::InvalidJson,
                "invalid JSON",
                None,
            ),
            (
                "null",
                ErrorCode::InvalidFrame,
                "a frame is a JSON object",
                None,
            ),
            (
                r#""MESSAGE""#,
                ErrorCode::InvalidFrame,
                "a frame is a JSON object",
                None,
            ),
            (
                r#"{"type":"A","reference":3}"#,
                ErrorCode::InvalidFrame,
                "reference must be a string",
                None,
            ),
            (
                r#"{"reference":"r","type":7}"#,
                ErrorCode::InvalidFrame,
                "missing string field type",
                Some("r"),
            ),
            (
                r#"{"type":"A","data":[1],"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "data must be an object",
                Some("r"),
            ),
            (
                r#"{"type":"A","data":"x"}"#,
                ErrorCode::InvalidFrame,
                "data must be an object",
                None,
            ),
            (
                r#"{"type":"A","feature":1,"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "feature must be a string",
                Some("r"),
            ),
            (
                r#"{"type":"A","traceparent":{}}"#,
                ErrorCode::InvalidFrame,
                "traceparent must be a string",
                None,
            ),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.code, code, "{text}");
            assert!(e.message.starts_with(message), "{text}: {}", e.message);
            assert_eq!(e.reference.as_deref(), reference, "{text}");
        }
        let mut f = parse(r#"{"type":"MESSAGE","data":{"to":5,"count":-1}}"#).expect("parse");
        assert_eq!(
            f.take_string("to").expect_err("number").code,
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            f.take_optional_count("count").expect_err("negative").code,
            ErrorCode::InvalidFrame
        );
    }

    #[test]
    fn frames_become_typed_commands() {
        let mut f = parse(r#"{"type":"MESSAGE","data":{"to":"a-1","content":"x","id":"c-1"},"feature":"FAST","reference":"r"}"#)
            .expect("parse");
        let ClientCommand::Message(m) = f.command().expect("command") else {
            panic!("not a message");
        };
        assert_eq!((m.to.as_str(), m.content.as_str()), ("a-1", "x"));
        assert_eq!(m.id.as_deref(), Some("c-1"));
        assert_eq!(m.feature, pb::Feature::Fast);

        let mut f = parse(r#"{"type":"GROUP_MESSAGE","data":{"to":["a-1","a-2"],"content":"x"}}"#)
            .expect("parse");
        let ClientCommand::GroupMessage(g) = f.command().expect("command") else {
            panic!("not a group message");
        };
        assert_eq!(g.to, Some(vec!["a-1".to_owned(), "a-2".to_owned()]));
        assert_eq!(
            (g.group, g.id, g.feature),
            (None, None, pb::Feature::Reliable)
        );

        let mut f = parse(
            r#"{"type":"AUTH_CLIENT","data":{"appId":"demo","userId":"demo-1","acks":true}}"#,
        )
        .expect("parse");
        let ClientCommand::Auth(a) = f.command().expect("command") else {
            panic!("not auth");
        };
        assert_eq!(
            (
                a.app_id.as_str(),
                a.user_id.as_str(),
                a.token.as_str(),
                a.acks
            ),
            ("demo", "demo-1", "", true)
        );

        let mut f = parse(r#"{"type":"FETCH_MISSING_MESSAGES_REQUEST"}"#).expect("parse");
        assert!(matches!(
            f.command(),
            Ok(ClientCommand::Fetch(Fetch { count: None }))
        ));
        let mut f = parse(r#"{"type":"ACK","data":{"ids":["x"]}}"#).expect("parse");
        assert!(matches!(f.command(), Ok(ClientCommand::Ack(Ack { ids })) if ids == ["x"]));
    }

    #[test]
    fn command_errors_keep_the_wording_and_reference() {
        for (text, code, message) in [
            (
                r#"{"type":"TELEPORT","reference":"r"}"#,
                ErrorCode::UnknownType,
                "unknown frame type \"TELEPORT\"",
            ),
            (
                r#"{"type":"MESSAGE","data":{"content":"x"},"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "missing field data.to",
            ),
            (
                r#"{"type":"MESSAGE","data":{"to":"a-1","content":"x","id":7},"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "data.id must be a string",
            ),
            (
                r#"{"type":"GROUP_MESSAGE","data":{"to":["a-1"],"content":"x","id":["i"]},"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "data.id must be a string",
            ),
            (
                r#"{"type":"MESSAGE","data":{"to":"a-1","content":"x"},"feature":"SLOW","reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "feature must be RELIABLE or FAST, not \"SLOW\"",
            ),
            (
                r#"{"type":"ACK","data":{},"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "missing field data.ids",
            ),
            (
                r#"{"type":"AUTH_CLIENT","data":{"appId":"a","userId":"u","acks":"yes"},"reference":"r"}"#,
                ErrorCode::InvalidFrame,
                "data.acks must be true or false",
            ),
        ] {
            let mut f = parse(text).expect(text);
            let e = f.command().expect_err(text);
            assert_eq!((e.code, e.message.as_str()), (code, message), "{text}");
            assert_eq!(e.reference.as_deref(), Some("r"), "{text}");
        }
        // A type that is not a string is not a type.
        let e = parse(r#"{"type":{"a":[1]},"reference":"r"}"#).expect_err("object type");
        assert_eq!(e.message, "missing string field type");
        // Escapes in a type name are read as any JSON reader would.
        let f = parse(r#"{"type":"M\u0045SSAGE"}"#).expect("parse");
        assert_eq!(f.kind, FrameKind::Command(CommandKind::Message));
        assert_eq!(f.kind.label(), "MESSAGE");
        assert_eq!(FrameKind::Unknown("X".into()).label(), "unknown");
    }

    #[test]
    fn any_frame_serde_writes_reads_back_as_the_same_command() {
        let ids = [None, Some("a"), Some("x-1_Y"), Some("")];
        let texts = [
            "",
            "plain",
            "quote \" back \\ slash",
            "ünï👋\u{0}\n",
            "{\"type\":\"ACK\"}",
        ];
        for id in ids {
            for to in texts {
                for content in texts {
                    for feature in [None, Some("FAST"), Some("RELIABLE")] {
                        let mut frame = serde_json::json!({
                            "type": "MESSAGE",
                            "data": {"to": to, "content": content, "extra": {"type": "ACK"}},
                            "reference": content,
                        });
                        if let Some(id) = id {
                            frame["data"]["id"] = id.into();
                        }
                        if let Some(feature) = feature {
                            frame["feature"] = feature.into();
                        }
                        let text = frame.to_string();
                        let mut f = parse(&text).expect(&text);
                        assert_eq!(f.meta.reference.as_deref(), Some(content));
                        let Ok(ClientCommand::Message(m)) = f.command() else {
                            panic!("{text}");
                        };
                        assert_eq!((m.to.as_str(), m.content.as_str()), (to, content));
                        assert_eq!(m.id.as_deref(), id);
                        let expected = match feature {
                            Some("FAST") => pb::Feature::Fast,
                            _ => pb::Feature::Reliable,
                        };
                        assert_eq!(m.feature, expected);
                    }
                }
            }
        }
    }

    #[test]
    fn every_cut_of_a_frame_is_refused_without_a_panic() {
        let text = r#"{"type":"GROUP_MESSAGE","data":{"to":["a-1","a-2"],"content":"h\u00e9 \"x\"","id":"i-1","n":[1,2.5,-3,true,null,{}]},"feature":"FAST","reference":"r","traceparent":"t"}"#;
        let mut f = parse(text).expect("whole frame");
        assert!(matches!(f.command(), Ok(ClientCommand::GroupMessage(_))));
        for cut in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            let e = parse(&text[..cut]).expect_err(&text[..cut]);
            assert_eq!(e.code, ErrorCode::InvalidJson, "{}", &text[..cut]);
        }
    }

    /// The MESSAGE frame as serde renders it: what the hand-written one
    /// must equal.
    #[derive(Serialize)]
    struct MessageData<'a> {
        from: &'a str,
        content: &'a str,
        id: &'a str,
        ts: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<&'a str>,
    }

    #[test]
    fn the_message_frame_is_the_json_serde_writes() {
        let item = pb::PushItem::default();
        for (seq, group, reference, ts) in [
            (0, "", "", 0),
            (7, "", "r\"ef", -1),
            (u64::MAX, "g-1", "", i64::MAX),
            (1, "gr\u{1}oup", "r", i64::MIN),
        ] {
            let msg = pb::InboxMessage {
                id: "0193-id".into(),
                kind: if group.is_empty() {
                    pb::MessageKind::Direct
                } else {
                    pb::MessageKind::Group
                }
                .into(),
                from: "a-\"1".into(),
                to: "a-2".into(),
                group: group.into(),
                content: "héllo \"wörld\"\n\t👋".repeat(40),
                reference: reference.into(),
                ts,
                seq,
                ..Default::default()
            };
            let expected = render(
                "MESSAGE",
                MessageData {
                    from: &msg.from,
                    content: &msg.content,
                    id: &msg.id,
                    ts: msg.ts,
                    seq: (seq > 0).then_some(seq),
                    group: non_empty(group),
                },
                non_empty(reference),
            );
            assert_eq!(render_push(&item, &msg), expected);
        }
    }

    #[test]
    fn rendered_message_round_trips_content() {
        let content = "a\"b\\c\u{0}\u{1f}\n👋";
        let msg = pb::InboxMessage {
            id: "i".into(),
            from: "a-1".into(),
            to: "a-2".into(),
            content: content.into(),
            reference: "r".into(),
            ts: 5,
            seq: 3,
            ..Default::default()
        };
        let item = pb::PushItem::default();
        let text = render_push(&item, &msg);
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["type"], "MESSAGE");
        assert_eq!(v["data"]["content"], content);
        assert_eq!(v["data"]["seq"], 3);
        assert_eq!(v["reference"], "r");
    }

    #[test]
    fn an_undelivered_notice_is_the_error_its_sender_would_have_had() {
        let mut msg = pb::InboxMessage {
            id: "m-1".into(),
            kind: pb::MessageKind::Undelivered.into(),
            from: "a-2".into(),
            to: "a-1".into(),
            content: r#"{"code":"INBOX_FULL","recipients":["a-2","a-3"]}"#.into(),
            reference: "r9".into(),
            seq: 4,
            ..Default::default()
        };
        let item = pb::PushItem::default();
        assert_eq!(push_type(&msg), "ERROR");
        let v: Value = serde_json::from_str(&render_push(&item, &msg)).expect("json");
        assert_eq!(v["type"], "ERROR");
        assert_eq!(v["data"]["code"], "INBOX_FULL");
        assert_eq!(v["data"]["id"], "m-1");
        assert_eq!(v["data"]["recipients"], serde_json::json!(["a-2", "a-3"]));
        assert_eq!(v["data"]["seq"], 4);
        assert_eq!(v["reference"], "r9");
        // Damaged content, or a code this version does not know: still an
        // error about that message, naming the notice's sender.
        for content in ["not json", r#"{"code":"SOMETHING_NEW"}"#] {
            msg.content = content.into();
            let v: Value = serde_json::from_str(&render_push(&item, &msg)).expect("json");
            assert_eq!(v["type"], "ERROR");
            assert_eq!(v["data"]["id"], "m-1");
            assert_eq!(v["data"]["recipients"], serde_json::json!(["a-2"]));
            assert!(v["data"]["code"] == "INBOX_FULL" || v["data"]["code"] == "INTERNAL");
        }
    }
}
