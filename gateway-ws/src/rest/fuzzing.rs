//! Properties of the REST API's request bodies, for the fuzz targets
//! (fuzz/) and the property tests: checked with `assert!`, so a violation
//! is a crash the fuzzer reports. Reached through [`crate::fuzzing`].

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use switchboard_mesh::ErrorCode;

use super::groups::{Members, NewGroup, Rename};
use super::{ApiError, SendMessage, check_send, json_body};
use crate::commands::{check_message_id, check_user_id};

/// Any body, read as each request type the REST handlers take (with the
/// handlers' own reader and checks): a value, or a 400/413 refusal with
/// one of the body codes — never a panic, never a 5xx. Returns the body
/// types that accepted it (`send` after the send checks).
pub fn check_rest_body(body: &[u8]) -> Vec<&'static str> {
    let mut accepted = Vec::new();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let read = |what: &str, e: ApiError| {
        assert!(
            matches!(
                e.status(),
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE
            ),
            "{what}: status {}",
            e.status()
        );
        assert!(
            matches!(
                e.code(),
                ErrorCode::InvalidJson
                    | ErrorCode::InvalidFrame
                    | ErrorCode::UnknownType
                    | ErrorCode::PayloadTooLarge
            ),
            "{what}: code {:?}",
            e.code()
        );
    };
    let bytes = || Ok(Bytes::copy_from_slice(body));
    match json_body::<SendMessage>(&headers, bytes()) {
        Ok(send) => match check_send(&send) {
            Ok(()) => {
                accepted.push("send");
                if let Some(id) = &send.id {
                    let _ = check_message_id(id);
                }
                if let Some(from) = &send.from {
                    let _ = check_user_id("from", from, 128);
                }
            }
            Err(e) => read("send", e),
        },
        Err(e) => read("send", e),
    }
    match json_body::<NewGroup>(&headers, bytes()) {
        Ok(_) => accepted.push("new group"),
        Err(e) => read("new group", e),
    }
    match json_body::<Members>(&headers, bytes()) {
        Ok(_) => accepted.push("members"),
        Err(e) => read("members", e),
    }
    match json_body::<Rename>(&headers, bytes()) {
        Ok(_) => accepted.push("rename"),
        Err(e) => read("rename", e),
    }
    // Without the JSON content type every body is refused with 415.
    let e = json_body::<Rename>(&HeaderMap::new(), bytes()).err();
    assert_eq!(
        e.map(|e| e.status()),
        Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
    );
    accepted
}
