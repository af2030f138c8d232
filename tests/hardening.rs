//! The edges an attacker on the network tries: malformed frames, requests
//! that never finish, connection floods, ACK floods, hostile user ids and
//! clients that never read. Each runs against a real node.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::{Client, TestNode, WAIT, close_code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// A text frame whose payload is not UTF-8 fails the connection with 1007
/// (RFC 6455 §8.1), with a reason, and others go on.
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_closed_with_1007() {
    let node = TestNode::start().await;
    let mut bad = Client::login(&node.url(), "demo-mallory").await;
    let mut ok = Client::login(&node.url(), "demo-ann").await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    bad.send_message(Message::Frame(frame)).await;
    let closed = bad.closed().await;
    assert_eq!(close_code(&closed), Some(1007), "{closed:?}");
    let support::Closed::Frame(Some(f)) = &closed else {
        unreachable!("checked above")
    };
    assert_eq!(f.reason.as_str(), "text frame is not valid UTF-8");
    ok.message("demo-ann", "still here", "FAST", "r1").await;
    assert_eq!(
        ok.recv_type("MESSAGE").await["data"]["content"],
        "still here"
    );
    node.shutdown().await;
}

/// Reads from `tcp` until the peer closes; `None` when it is still open
/// after `limit`.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that starts an HTTP request (a WebSocket upgrade) and never
/// finishes it is closed after `http_header_timeout_secs`; so is one that
/// connects and sends nothing, or half of the HTTP/2 preface. Health checks answer all along.
#[tokio::test]
async fn a_request_head_that_never_ends_is_closed_after_the_header_timeout() {
    let node = TestNode::start_with(
        |c| c.limits.http_header_timeout_secs = 1,
        Default::default(),
    )
    .await;
    let mut half = TcpStream::connect(node.client_addr).await.expect("connect");
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let mut silent = TcpStream::connect(node.client_addr).await.expect("connect");
    let mut half_h2 = TcpStream::connect(node.client_addr).await.expect("connect");
    half_h2
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    let (status, _) = support::http_get(node.client_addr, "/healthz")
        .await
        .expect("healthz answers");
    assert_eq!(status, 200);
    let started = tokio::time::Instant::now();
    for tcp in [&mut half, &mut silent, &mut half_h2] {
        assert!(
            read_until_closed(tcp, WAIT).await.is_some(),
            "a connection without a whole request head stays open"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    node.shutdown().await;
}

/// Past `max_connections_per_ip`, a new connection gets 503 with a JSON
/// body; a closed one frees its place; a WebSocket holds its place while it
/// is open. The process cap works the same way.
#[tokio::test]
async fn connections_over_the_caps_get_503_and_closing_one_frees_its_place() {
    let node = TestNode::start_with(
        |c| {
            c.limits.max_connections_per_ip = 2;
        },
        Default::default(),
    )
    .await;
    let ws = Client::login(&node.url(), "demo-ann").await;
    let idle = TcpStream::connect(node.client_addr).await.expect("connect");
    let mut third = TcpStream::connect(node.client_addr).await.expect("connect");
    let answer = read_until_closed(&mut third, WAIT)
        .await
        .expect("the refused connection is closed");
    let answer = String::from_utf8(answer).expect("text");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body = answer.split_once("\r\n\r\n").expect("a body").1;
    let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(body["code"], "UNAVAILABLE", "{body}");
    assert_eq!(body["message"], "too many connections from your address");
    drop(idle);
    // The server sees the close shortly; then there is room again.
    let mut admitted = false;
    for _ in 0..100 {
        if let Some((200, _)) = support::http_get(node.client_addr, "/healthz").await {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a closed connection's place was not freed");
    drop(ws);
    node.shutdown().await;

    let node = TestNode::start_with(|c| c.limits.max_connections = 1, Default::default()).await;
    let _held = Client::login(&node.url(), "demo-ann").await;
    let (status, body) = support::http_get(node.client_addr, "/healthz")
        .await
        .expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["message"],
        "this server holds as many connections as it allows; retry later or elsewhere"
    );
    node.shutdown().await;
}

/// ACK frames have their own rate limit: a flood gets RATE_LIMITED and is
/// closed, while ACKs at a normal pace pass.
#[tokio::test]
async fn an_ack_flood_is_rate_limited_and_closed() {
    let node = TestNode::start_with(
        |c| {
            c.limits.acks_per_second = 50;
            c.limits.max_refusals = 20;
        },
        Default::default(),
    )
    .await;
    let mut flood = Client::login_with(&node.url(), "demo-mallory", true).await;
    let ack = json!({"type": "ACK", "data": {"ids": ["nope"]}});
    let frames = vec![ack; 500];
    flood.send_burst(&frames).await;
    let mut limited = 0;
    while let Some(f) = flood.try_recv(WAIT).await {
        if f["type"] == "ERROR" && f["data"]["code"] == "RATE_LIMITED" {
            assert_eq!(
                f["data"]["message"], "more than 50 ACK frames per second",
                "{f}"
            );
            limited += 1;
        }
    }
    assert!(limited > 0, "no ACK was rate limited");
    let closed = flood.closed().await;
    assert_eq!(close_code(&closed), Some(1008), "{closed:?}");
    node.shutdown().await;
}

/// User ids are bounded (128 characters by default) and may hold no
/// control or bidirectional formatting character, wherever they appear.
#[tokio::test]
async fn long_and_control_character_user_ids_are_refused() {
    let node = TestNode::start().await;
    for (user, why) in [
        (
            format!("demo-{}", "x".repeat(124)),
            "it has 129 characters, more than 128",
        ),
        (
            "demo-a\u{7}b".to_owned(),
            "it contains the control character U+0007",
        ),
        (
            "demo-\u{202E}nimda".to_owned(),
            "it contains the control character U+202E",
        ),
    ] {
        let mut c = Client::connect(&node.url()).await;
        c.send(
            json!({"type": "AUTH_CLIENT", "data": {"appId": "demo", "userId": user, "token": ""}}),
        )
        .await;
        let f = c.recv().await;
        assert_eq!(f["type"], "ERROR", "{f}");
        assert_eq!(f["data"]["code"], "INVALID_FRAME", "{f}");
        assert_eq!(
            f["data"]["message"],
            format!("data.userId is not a valid user id: {why}")
        );
    }
    let longest = format!("demo-{}", "x".repeat(123));
    let _ok = Client::login(&node.url(), &longest).await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    ann.message("demo-\u{2067}x", "hi", "RELIABLE", "r1").await;
    let f = ann.recv_type("ERROR").await;
    assert_eq!(f["data"]["code"], "INVALID_FRAME", "{f}");
    assert_eq!(
        f["data"]["message"],
        "recipient is not a valid user id: it contains the control character U+2067"
    );
    node.shutdown().await;
}

/// A client that never reads is closed as a slow consumer once the bytes
/// queued for it pass `send_queue_bytes`, long before the frame bound.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_by_queued_bytes() {
    let node = TestNode::start_with(
        |c| {
            c.limits.send_queue_bytes = 64 * 1024;
            c.limits.messages_per_second = 100_000;
        },
        Default::default(),
    )
    .await;
    let mut stuck = Client::login(&node.url(), "demo-stuck").await;
    let mut sender = Client::login(&node.url(), "demo-sender").await;
    let content = "x".repeat(16 * 1024);
    // Enough to fill the socket buffers on both sides and then the queue.
    let frames: Vec<_> = (0..2000)
        .map(|i| json!({"type": "MESSAGE", "data": {"to": "demo-stuck", "content": content}, "feature": "FAST", "reference": format!("r{i}")}))
        .collect();
    for chunk in frames.chunks(100) {
        sender.send_burst(chunk).await;
    }
    let closed = stuck.closed().await;
    assert_eq!(close_code(&closed), Some(1008), "{closed:?}");
    let support::Closed::Frame(Some(f)) = &closed else {
        unreachable!("checked above")
    };
    assert_eq!(f.reason.as_str(), "slow consumer: send queue full");
    node.shutdown().await;
}

/// `switchboard run` (every role, no etcd) opens no mesh port: nothing can
/// call its roles from outside. A process that must listen on the mesh
/// refuses to start without a mesh secret (or mesh TLS) and says how to
/// fix it; `--insecure-mesh` runs it open, with a warning.
#[tokio::test]
async fn all_in_one_has_no_mesh_port_and_an_open_mesh_must_be_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = support::ProcessNode::start(dir.path()).await;
    assert!(
        TcpStream::connect(node.mesh_addr).await.is_err(),
        "the all-in-one node listens on its mesh address"
    );
    drop(node);

    let mesh_port = support::free_port();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--roles", "router"])
            .args(["--mesh-addr", &format!("127.0.0.1:{mesh_port}")])
            .args(extra)
            .env("SWITCHBOARD_LOG", "warn")
            .output()
            .expect("run switchboard")
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the mesh port 127.0.0.1:{mesh_port} would accept calls from anyone who reaches it: set mesh_secret"
        )) && stderr.contains("--insecure-mesh"),
        "{stderr}"
    );
    // With --insecure-mesh (or a secret) the mesh is accepted; this router
    // then stops for want of etcd to find the other roles.
    for extra in [&["--insecure-mesh"][..], &["--mesh-secret", "s3cret"]] {
        let out = run(extra);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("would accept calls from anyone"),
            "{stderr}"
        );
        assert!(stderr.contains("there is no etcd to find it"), "{stderr}");
    }
}

/// An app with `allowed_origins` refuses browser connections from other
/// origins at AUTH_CLIENT (and anonymous room joins); connections without
/// an `Origin` header (not from a browser) and from a listed origin pass.
#[tokio::test]
async fn a_foreign_origin_is_refused_where_the_app_lists_its_origins() {
    use switchboard_config::AppConfig;
    let node = TestNode::start_with(
        |c| {
            c.apps = vec![AppConfig {
                allowed_origins: vec!["https://chat.example.com".into()],
                anonymous_rooms: true,
                ..AppConfig::demo()
            }];
        },
        Default::default(),
    )
    .await;
    let auth = json!({"type": "AUTH_CLIENT", "data": {"appId": "demo", "userId": "demo-ann", "token": ""}});
    let mut evil = Client::connect_from(&node.url(), "https://evil.example").await;
    evil.send(auth.clone()).await;
    let reply = evil.recv_type("AUTH_CLIENT_REPLY").await;
    assert_eq!(reply["data"]["isAuthenticated"], false, "{reply}");
    assert_eq!(
        reply["data"]["reason"],
        "connections from web pages of https://evil.example are not allowed for this app"
    );
    let mut anon = Client::connect_from(&node.url(), "https://evil.example").await;
    anon.send(json!({"type": "ROOM_JOIN", "data": {"appId": "demo", "room": "lobby"}}))
        .await;
    let f = anon.recv_type("ERROR").await;
    assert_eq!(f["data"]["code"], "FORBIDDEN", "{f}");

    for mut ok in [
        Client::connect_from(&node.url(), "https://CHAT.example.com").await,
        Client::connect(&node.url()).await,
    ] {
        ok.send(auth.clone()).await;
        let reply = ok.recv_type("AUTH_CLIENT_REPLY").await;
        assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
    }
    node.shutdown().await;
}
