//! Client protocol v1 frames: parsing what clients send and rendering what
//! they receive. JSON lives here and nowhere else.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_mesh::{ErrorCode, pb};

use crate::json;

/// A parsed client frame: its type, `data` fields and top-level fields.
#[derive(Debug)]
pub struct ClientFrame {
    pub kind: String,
    data: Data,
    pub feature: Option<String>,
    pub reference: Option<String>,
    /// A client's own W3C `traceparent`: the message joins that trace.
    pub traceparent: Option<String>,
}

/// The `data` fields any frame type of protocol v1 reads. Others are
/// skipped while parsing, without being kept.
const DATA_FIELDS: [&str; 10] = [
    "to", "content", "group", "appId", "userId", "token", "acks", "device", "count", "ids",
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
    kind: Option<Value>,
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
            kind: None,
            data: DataSlot::Absent,
            feature: None,
            reference: None,
            traceparent: None,
        };
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_str() {
                "type" => top.kind = Some(map.next_value()?),
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
        Some(Value::String(s)) => s,
        _ => {
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
        data,
        feature,
        reference,
        traceparent,
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
        pb::MessageKind::UserConnected => "USER_CONNECTED",
        pb::MessageKind::UserDisconnected => "USER_DISCONNECTED",
    }
}

/// A frame type as a metrics label: the known ones, or `unknown` (the type
/// is client input; labels must stay a small set).
pub fn known_type(kind: &str) -> &'static str {
    KNOWN_TYPES
        .iter()
        .find(|&&t| t == kind)
        .copied()
        .unwrap_or("unknown")
}

/// The client frame types this server handles.
pub const KNOWN_TYPES: [&str; 5] = [
    "MESSAGE",
    "AUTH_CLIENT",
    "GROUP_MESSAGE",
    "FETCH_MISSING_MESSAGES_REQUEST",
    "ACK",
];

impl ClientFrame {
    fn err(&self, code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError::new(code, message).with_reference(self.reference.clone())
    }

    /// A required string field of `data`, moved out.
    pub fn take_string(&mut self, field: &str) -> Result<String, FrameError> {
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

    pub fn take_optional_string(&mut self, field: &str) -> Result<Option<String>, FrameError> {
        match self.data.take(field) {
            Some(Value::String(s)) => Ok(Some(s)),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be a string"),
            )),
        }
    }

    pub fn take_bool(&mut self, field: &str) -> Result<bool, FrameError> {
        match self.data.take(field) {
            Some(Value::Bool(b)) => Ok(b),
            None | Some(Value::Null) => Ok(false),
            Some(_) => Err(self.err(
                ErrorCode::InvalidFrame,
                format!("data.{field} must be true or false"),
            )),
        }
    }

    pub fn take_string_list(&mut self, field: &str) -> Result<Option<Vec<String>>, FrameError> {
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

    pub fn take_count(&mut self, field: &str, default: u32) -> Result<u32, FrameError> {
        match self.data.take(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
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
    pub fn feature(&self) -> Result<pb::Feature, FrameError> {
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
                        .opt_str("group", non_empty(&msg.group));
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
        pb::MessageKind::UserConnected => {
            render("USER_CONNECTED", UserData { user_id: &msg.from }, None)
        }
        pb::MessageKind::UserDisconnected => {
            render("USER_DISCONNECTED", UserData { user_id: &msg.from }, None)
        }
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
}

pub fn auth_reply(app_id: &str, user_id: &str, ok: bool, reason: Option<&str>) -> String {
    render(
        "AUTH_CLIENT_REPLY",
        AuthReplyData {
            app_id,
            user_id,
            is_authenticated: ok,
            reason,
        },
        None,
    )
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: &'a str,
    message: &'a str,
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
        assert_eq!(f.kind, "MESSAGE");
        assert_eq!(f.reference.as_deref(), Some("r"));
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
        assert_eq!(f.kind, "MESSAGE");
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
            f.take_count("count", 1).expect_err("negative").code,
            ErrorCode::InvalidFrame
        );
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
}
