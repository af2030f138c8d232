//! The WebSocket adapter over a session, end to end on an in-memory socket
//! (the other roles are [`crate::test_doubles`]): how outcomes become frames.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_config::Limits;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::test_doubles::{Inboxes, gateway};

type Socket = WebSocketStream<tokio::io::DuplexStream>;

/// A client connected to a gateway (with test doubles behind it), signed
/// in as `user`.
async fn connected(user: &str, acks: bool) -> (Socket, std::sync::Arc<Inboxes>) {
    let (gateway, inboxes) = gateway(Limits::default());
    let (near, far) = tokio::io::duplex(256 * 1024);
    let inner = gateway.inner.clone();
    tokio::spawn(async move {
        let ws = WebSocketStream::from_raw_socket(far, Role::Server, None).await;
        super::run(inner, Box::new(ws), None).await;
    });
    let mut client = WebSocketStream::from_raw_socket(near, Role::Client, None).await;
    send(
        &mut client,
        &[json!({"type":"AUTH_CLIENT","data":{"appId":"demo","userId":user,"acks":acks}})],
    )
    .await;
    let reply = recv(&mut client).await;
    assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
    (client, inboxes)
}

/// Sends frames back to back, flushed once (they arrive together).
async fn send(client: &mut Socket, frames: &[Value]) {
    for frame in frames {
        client
            .feed(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }
    client.flush().await.expect("flush");
}

async fn recv(client: &mut Socket) -> Value {
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(15), client.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("read");
        if let Message::Text(text) = next {
            return serde_json::from_str(text.as_str()).expect("JSON");
        }
    }
}

fn message(id: &str, reference: &str, feature: &str) -> Value {
    json!({"type":"MESSAGE","data":{"to":"demo-bob","content":reference,"id":id},
           "feature":feature,"reference":reference})
}

/// A frame that is always answered (UNKNOWN_TYPE): what came before it
/// was answered already, or not at all.
fn marker(reference: &str) -> Value {
    json!({"type":"TELEPORT","reference":reference})
}

/// The `(type, reference, data.id)` of the frames up to the marker.
async fn answers_until(client: &mut Socket, marker: &str) -> Vec<(String, String, String)> {
    let mut answers = Vec::new();
    loop {
        let f = recv(client).await;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let answer = (
            text(&f["type"]),
            text(&f["reference"]),
            text(&f["data"]["id"]),
        );
        if answer.0 == "ERROR" && answer.1 == marker {
            assert_eq!(f["data"]["code"], "UNKNOWN_TYPE", "{f}");
            return answers;
        }
        answers.push(answer);
    }
}

fn accepted(reference: &str, id: &str) -> (String, String, String) {
    (
        "MESSAGE_ACCEPTED".to_owned(),
        reference.to_owned(),
        id.to_owned(),
    )
}

#[tokio::test]
async fn a_resend_is_answered_accepted_without_ack_mode_and_nothing_else_is() {
    let (mut ann, inboxes) = connected("demo-ann", false).await;
    // Alone (one route call each) ...
    send(&mut ann, &[message("x1", "first", "RELIABLE")]).await;
    send(&mut ann, &[marker("m1")]).await;
    assert_eq!(answers_until(&mut ann, "m1").await, []);
    send(
        &mut ann,
        &[message("x1", "again", "RELIABLE"), marker("m2")],
    )
    .await;
    assert_eq!(
        answers_until(&mut ann, "m2").await,
        [accepted("again", "x1")]
    );
    // ... and among frames routed together: only the resend is answered.
    send(
        &mut ann,
        &[
            message("b1", "n1", "RELIABLE"),
            message("x1", "dup", "RELIABLE"),
            message("b2", "n2", "FAST"),
            marker("m3"),
        ],
    )
    .await;
    assert_eq!(answers_until(&mut ann, "m3").await, [accepted("dup", "x1")]);
    let ids: Vec<String> = inboxes.routed().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["x1", "b1", "b2"], "each id routed once");
}

#[tokio::test]
async fn in_ack_mode_every_reliable_send_and_every_resend_is_answered() {
    let (mut ann, _) = connected("demo-ann", true).await;
    send(
        &mut ann,
        &[
            message("r1", "reliable", "RELIABLE"),
            message("f1", "fast", "FAST"),
            message("r1", "reliable again", "RELIABLE"),
            message("f1", "fast again", "FAST"),
            json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"x","id":"no good"},"reference":"bad"}),
            marker("m"),
        ],
    )
    .await;
    let answers = answers_until(&mut ann, "m").await;
    assert_eq!(
        answers[..3],
        [
            accepted("reliable", "r1"),
            accepted("reliable again", "r1"),
            accepted("fast again", "f1"),
        ]
    );
    assert_eq!(
        (answers[3].0.as_str(), answers[3].1.as_str()),
        ("ERROR", "bad")
    );
    assert_eq!(answers.len(), 4);
}
