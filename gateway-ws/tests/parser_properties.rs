//! Property tests of what turns client input into commands: WebSocket text
//! frames and REST bodies. The same checks the fuzz targets in fuzz/ run
//! (`switchboard_gateway::fuzzing`), on generated input: never a panic,
//! refusals with the protocol's codes, commands that round trip.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use switchboard_gateway::fuzzing::{check_frame, check_rest_body};

const TYPES: [&str; 24] = [
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
    "GROUP_CREATE",
    "GROUP_ADD_MEMBERS",
    "GROUP_REMOVE_MEMBERS",
    "GROUP_RENAME",
    "GROUP_LEAVE",
    "GROUP_DELETE",
    "GROUP_INFO",
    "GROUPS_LIST",
    "NOT_A_TYPE",
    "",
];

const FIELDS: [&str; 22] = [
    "to",
    "content",
    "group",
    "id",
    "appId",
    "userId",
    "token",
    "acks",
    "device",
    "count",
    "ids",
    "name",
    "members",
    "topic",
    "since",
    "room",
    "nick",
    "users",
    "from",
    "feature",
    "reference",
    "unknown",
];

/// Any JSON value, small.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string-ish value: what the fields usually hold, sometimes not.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[A-Za-z0-9_-]{0,10}".prop_map(Value::from),
        2 => prop::collection::vec("[a-z-]{0,6}".prop_map(Value::from), 0..4).prop_map(Value::from),
        1 => any::<u32>().prop_map(Value::from),
        1 => value(),
    ]
}

/// A frame that looks like a client's: a known type, known fields with
/// mostly plausible values, sometimes top-level fields of the wrong type.
fn frame() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&TYPES[..]),
        prop::collection::vec((prop::sample::select(&FIELDS[..]), field_value()), 0..7),
        prop::option::of(field_value()),
        prop::option::of(prop_oneof![
            Just(json!("FAST")),
            Just(json!("RELIABLE")),
            value()
        ]),
        prop::option::of(value()),
    )
        .prop_map(|(kind, fields, reference, feature, data_other)| {
            let mut top = Map::new();
            top.insert("type".into(), kind.into());
            let data: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            top.insert("data".into(), data_other.unwrap_or(Value::Object(data)));
            if let Some(r) = reference {
                top.insert("reference".into(), r);
            }
            if let Some(f) = feature {
                top.insert("feature".into(), f);
            }
            Value::Object(top).to_string()
        })
}

/// A JSON text cut or with one byte changed: syntax errors anywhere.
fn damaged(text: String, at: usize, byte: u8, cut: bool) -> Vec<u8> {
    let mut bytes = text.into_bytes();
    if bytes.is_empty() {
        return bytes;
    }
    let at = at % bytes.len();
    if cut {
        bytes.truncate(at);
    } else {
        bytes[at] = byte;
    }
    bytes
}

proptest! {
    #[test]
    fn frames_parse_to_commands_or_clear_refusals(text in frame()) {
        check_frame(&text);
    }

    #[test]
    fn damaged_frames_are_refused_not_a_panic(
        text in frame(), at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()
    ) {
        if let Ok(text) = String::from_utf8(damaged(text, at, byte, cut)) {
            check_frame(&text);
        }
    }

    #[test]
    fn any_text_is_a_frame_or_a_refusal(text in "\\PC{0,64}") {
        check_frame(&text);
    }

    #[test]
    fn rest_bodies_are_read_or_refused_with_a_4xx(text in frame(), body in value()) {
        check_rest_body(text.as_bytes());
        check_rest_body(body.to_string().as_bytes());
    }

    #[test]
    fn damaged_rest_bodies_are_refused_with_a_4xx(
        text in frame(), at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()
    ) {
        check_rest_body(&damaged(text, at, byte, cut));
    }
}

#[test]
fn rest_bodies_of_each_shape_are_read() {
    // Valid bodies pass the checks: a refusal here would be a wrong check.
    for (body, accepted) in [
        (
            r#"{"to":"demo-bob","content":"hi","id":"m-1","feature":"FAST"}"#,
            &["send"][..],
        ),
        (
            r#"{"to":["demo-bob","demo-ann"],"content":"hi"}"#,
            &["send"],
        ),
        (
            r#"{"group":"g-1","content":"hi","from":"demo-ann"}"#,
            &["send"],
        ),
        (r#"{"topic":"news","content":"hi"}"#, &["send"]),
        (r#"{"to":"demo-bob","group":"g-1","content":"hi"}"#, &[]),
        (r#"{"members":["demo-bob"]}"#, &["new group", "members"]),
        (r#"{"name":"team"}"#, &["new group", "rename"]),
        (r#"{}"#, &["new group"]),
    ] {
        assert_eq!(check_rest_body(body.as_bytes()), accepted, "{body}");
    }
}

#[test]
fn frames_of_each_kind_are_read() {
    for text in [
        r#"{"type":"AUTH_CLIENT","data":{"appId":"demo","userId":"demo-ann","acks":true}}"#,
        r#"{"type":"MESSAGE","data":{"to":"demo-bob","content":"hi","id":"m-1"},"feature":"FAST","reference":"r1"}"#,
        r#"{"type":"GROUP_MESSAGE","data":{"to":["demo-bob"],"content":"hi"}}"#,
        r#"{"type":"FETCH_MISSING_MESSAGES_REQUEST","data":{"count":99999999999}}"#,
        r#"{"type":"ACK","data":{"ids":["a","b"]}}"#,
        r#"{"type":"GROUP_CREATE","data":{"group":"g-1","members":["demo-bob"]}}"#,
        r#"{"type":"SUBSCRIBE","data":{"topic":"news","since":3}}"#,
        r#"{"type":"ROOM_JOIN","data":{"room":"r","nick":"ann"}}"#,
        r#"{"type":"PRESENCE_SUBSCRIBE","data":{"users":["demo-bob"]}}"#,
        r#"{"type":"USER_LIST_REQUEST"}"#,
    ] {
        assert!(check_frame(text), "{text}");
    }
    assert!(!check_frame(r#"{"type":"MESSAGE","data":{"to":1}}"#));
}
