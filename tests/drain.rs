//! Connections that hold the client port without using it, and the time a
//! shutdown takes.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use support::TestNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Plays an HTTP/2 client that sends no request but answers what the
/// server asks (SETTINGS, PING), until the server closes; returns the
/// types of the frames it got.
async fn idle_http2_client(tcp: &mut TcpStream) -> Vec<u8> {
    // The client preface and an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    let mut types = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline, tcp.read_exact(&mut head)).await {
            Err(_) => panic!("the idle HTTP/2 connection is still open after 30 s: {types:?}"),
            Ok(Err(_)) => return types,
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        match tokio::time::timeout_at(deadline, tcp.read_exact(&mut payload)).await {
            Err(_) => panic!("a frame cut short"),
            Ok(Err(_)) => return types,
            Ok(Ok(_)) => {}
        }
        let (kind, flags) = (head[3], head[4]);
        types.push(kind);
        let answer = match (kind, flags & 1) {
            // SETTINGS, not an ACK: acknowledge it.
            (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
            // PING, not an ACK: answer with the same payload.
            (6, 0) => {
                let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                pong
            }
            _ => continue,
        };
        if tcp.write_all(&answer).await.is_err() {
            return types;
        }
    }
}

/// An HTTP/2 connection (what the gRPC API uses) that sends no request is
/// closed with GOAWAY after `http2_idle_timeout_secs`, although it answers
/// the server's pings: it does not keep a connection slot for ever.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    let node =
        TestNode::start_with(|c| c.limits.http2_idle_timeout_secs = 1, Default::default()).await;
    let mut tcp = TcpStream::connect(node.client_addr).await.expect("connect");
    let types = idle_http2_client(&mut tcp).await;
    assert!(types.contains(&7), "no GOAWAY before the close: {types:?}");
    node.shutdown().await;
}
