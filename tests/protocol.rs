//! Client protocol v1 through real WebSocket connections against a running
//! node.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Closed, Deployment, TestNode, close_code};
use switchboard_config::{AppConfig, AuthMode, Config};

/// Each protocol test runs twice: against one in-process node (`single::`)
/// and against a multi-process cluster (`cluster::`: two gateways, delivery,
/// router+groups+auth, real etcd and Redis), with clients spread over the
/// gateways.
macro_rules! protocol_tests {
    ($($name:ident $(=> $edit:expr)?;)*) => {
        mod single {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let node = Deployment::single(|_c: &mut Config| { $( ($edit)(_c); )? }).await;
                    super::$name(node).await;
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(node) = Deployment::cluster(|_c: &mut Config| { $( ($edit)(_c); )? }).await else {
                        return;
                    };
                    super::$name(node).await;
                }
            )*
        }
    };
}

protocol_tests! {
    two_users_exchange_fast_and_reliable_messages;
    reliable_to_offline_user_is_fetched_in_order_and_paged;
    confirmation_reaches_an_online_sender_when_the_recipient_fetches;
    fast_to_an_offline_user_is_not_stored;
    every_connection_of_a_user_gets_every_message;
    ad_hoc_group_message_reaches_every_listed_user;
    ack_mode_redelivers_until_acknowledged;
    master_user_sees_one_connect_and_one_disconnect_per_user;
    content_round_trips_byte_exactly;
    fetched_messages_have_distinct_ids;
    a_client_message_id_is_checked_and_becomes_the_message_id;
    a_client_message_id_belongs_to_its_sender;
    a_resent_client_message_id_is_accepted_again_and_shown_once;
    pipelined_messages_keep_their_order_and_each_gets_its_answer => |c: &mut Config| {
        c.limits.messages_per_second = 10_000;
    };
    bad_input_gets_clear_errors_while_others_keep_talking => |c: &mut Config| {
        c.apps = vec![AppConfig::demo(), jwt_app()];
        c.limits.max_frame_bytes = 4096;
        c.limits.max_content_bytes = 2048;
        // Well below what one connection can route, on any shape, so the
        // flood below is refused quickly.
        c.limits.messages_per_second = 50;
    };
    silent_connection_is_closed_at_the_auth_timeout => |c: &mut Config| c.limits.auth_timeout_secs = 1;
    slow_consumer_is_disconnected_and_others_are_not_held_up => |c: &mut Config| {
        c.limits.send_queue_frames = 8;
        // Large frames, so that what is sent is more than the kernel's
        // socket buffers hold even when pushes arrive spread out (cluster).
        c.limits.max_content_bytes = 64 * 1024;
        c.limits.max_frame_bytes = 80 * 1024;
    };
    a_small_outbound_backlog_slows_senders_but_loses_and_reorders_nothing => |c: &mut Config| {
        c.limits.messages_per_second = 10_000;
        c.limits.backlog_frames = 4;
    };
    a_reader_that_stops_does_not_hold_up_others_behind_a_small_backlog => |c: &mut Config| {
        c.limits.messages_per_second = 10_000;
        c.limits.backlog_frames = 64;
        c.limits.max_content_bytes = 64 * 1024;
        c.limits.max_frame_bytes = 80 * 1024;
    };
    idle_connection_is_pinged_and_dropped_when_silent => |c: &mut Config| {
        c.limits.ping_interval_secs = 1;
        c.limits.idle_timeout_secs = 2;
    };
}

const QUIET: Duration = Duration::from_millis(300);

fn ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["data"]["id"].as_str().expect("id").to_owned())
        .collect()
}

async fn two_users_exchange_fast_and_reliable_messages(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;

    ann.message("demo-bob", "hello reliable", "RELIABLE", "r1")
        .await;
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["from"], "demo-ann");
    assert_eq!(m["data"]["content"], "hello reliable");
    assert_eq!(m["reference"], "r1");
    assert!(m["data"]["seq"].as_u64().expect("seq on RELIABLE") > 0);
    assert!(m["data"]["ts"].as_i64().expect("ts") > 0);
    let id = m["data"]["id"].as_str().expect("id").to_owned();
    let c = ann.recv_type("MESSAGE_CONFIRMATION").await;
    assert_eq!(c["data"]["reference"], "r1");
    assert_eq!(c["data"]["id"], id.as_str());

    bob.message("demo-ann", "hello fast", "FAST", "r2").await;
    let m = ann.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["content"], "hello fast");
    assert_eq!(m["data"]["from"], "demo-bob");
    assert_eq!(m["reference"], "r2");
    assert!(
        m["data"].get("seq").is_none(),
        "FAST messages carry no seq: {m}"
    );

    // Default feature is RELIABLE.
    ann.send(
        json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"default"},"reference":"r3"}),
    )
    .await;
    let m = bob.recv_type("MESSAGE").await;
    assert!(m["data"]["seq"].as_u64().is_some());
    assert_eq!(
        ann.recv_type("MESSAGE_CONFIRMATION").await["data"]["reference"],
        "r3"
    );
    node.shutdown().await;
}

async fn reliable_to_offline_user_is_fetched_in_order_and_paged(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    for i in 0..25 {
        ann.message("demo-bob", &format!("m{i}"), "RELIABLE", &format!("ref{i}"))
            .await;
    }
    // Nothing is delivered yet, so no confirmation comes.
    ann.expect_silence(QUIET).await;
    ann.close().await;

    let mut bob = Client::login(&node.url(), "demo-bob").await;
    bob.expect_silence(QUIET).await;
    let (frames, lefts) = bob.fetch_all(10).await;
    assert_eq!(lefts, vec![15, 5, 0]);
    let contents: Vec<&str> = frames
        .iter()
        .map(|f| f["data"]["content"].as_str().expect("content"))
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, expected);
    let seqs: Vec<u64> = frames
        .iter()
        .map(|f| f["data"]["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The sender was offline when they were delivered: the confirmations
    // wait in its inbox.
    // Delivery is reported asynchronously after the write, so the last
    // confirmations may still be on their way: fetch until all are there.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut confirmations = Vec::new();
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let (frames, _) = ann.fetch_all(100).await;
        confirmations.extend(frames);
        let distinct: HashSet<&Value> = confirmations
            .iter()
            .filter(|f| f["type"] == "MESSAGE_CONFIRMATION")
            .map(|f| &f["data"]["reference"])
            .collect();
        if distinct.len() >= 25 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refs: HashSet<&str> = confirmations
        .iter()
        .filter(|f| f["type"] == "MESSAGE_CONFIRMATION")
        .map(|f| f["data"]["reference"].as_str().expect("reference"))
        .collect();
    assert_eq!(refs.len(), 25, "{confirmations:?}");
    assert!(refs.contains("ref0") && refs.contains("ref24"));

    // Delivered messages are gone.
    let (again, lefts) = bob.fetch_all(10).await;
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(lefts, vec![0]);
    node.shutdown().await;
}

async fn confirmation_reaches_an_online_sender_when_the_recipient_fetches(node: Deployment) {
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.send_accepted("demo-bob", "later", "late-ref").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(10).await;
    assert_eq!(frames.len(), 1);
    let c = ann.recv_type("MESSAGE_CONFIRMATION").await;
    assert_eq!(c["data"]["reference"], "late-ref");
    assert_eq!(c["data"]["id"], frames[0]["data"]["id"]);
    node.shutdown().await;
}

async fn fast_to_an_offline_user_is_not_stored(node: Deployment) {
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.message("demo-bob", "gone", "FAST", "f1").await;
    // Frames of one connection are handled in order: once the RELIABLE one
    // is accepted, the FAST one was handled too.
    ann.send_accepted("demo-bob", "kept", "r1").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, lefts) = bob.fetch_all(10).await;
    let contents: Vec<&str> = frames
        .iter()
        .map(|f| f["data"]["content"].as_str().expect("content"))
        .collect();
    assert_eq!(contents, vec!["kept"]);
    assert_eq!(lefts, vec![0]);
    node.shutdown().await;
}

async fn every_connection_of_a_user_gets_every_message(node: Deployment) {
    let mut bobs = vec![
        Client::login(&node.url(), "demo-bob").await,
        Client::login(&node.url(), "demo-bob").await,
        Client::login(&node.url(), "demo-bob").await,
    ];
    let mut ann_sender = Client::login(&node.url(), "demo-ann").await;
    let mut ann_other = Client::login(&node.url(), "demo-ann").await;

    for i in 0..3 {
        ann_sender
            .message(
                "demo-bob",
                &format!("to all {i}"),
                "RELIABLE",
                &format!("r{i}"),
            )
            .await;
    }
    for bob in &mut bobs {
        for i in 0..3 {
            let m = bob.recv_type("MESSAGE").await;
            assert_eq!(m["data"]["content"], format!("to all {i}"));
        }
    }
    for i in 0..3 {
        let sent = ann_other.recv_type("MESSAGE_SENT").await;
        assert_eq!(sent["data"]["to"], "demo-bob");
        assert_eq!(sent["data"]["content"], format!("to all {i}"));
        assert_eq!(sent["reference"], format!("r{i}"));
    }
    // The sending connection gets confirmations, never a MESSAGE_SENT copy.
    let mut confirmations = 0;
    while let Some(f) = ann_sender.try_recv(QUIET).await {
        assert_ne!(f["type"], "MESSAGE_SENT", "{f}");
        if f["type"] == "MESSAGE_CONFIRMATION" {
            confirmations += 1;
        }
    }
    assert_eq!(
        confirmations, 3,
        "one confirmation per message, not per connection"
    );
    node.shutdown().await;
}

async fn ad_hoc_group_message_reaches_every_listed_user(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut ann2 = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;
    ann.send(json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cat","demo-dan"],"content":"hi all"},"reference":"g1"}))
        .await;
    for c in [&mut bob, &mut cat] {
        let m = c.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["content"], "hi all");
        assert_eq!(m["data"]["from"], "demo-ann");
    }
    let sent = ann2.recv_type("MESSAGE_SENT").await;
    assert_eq!(
        sent["data"]["to"],
        json!(["demo-bob", "demo-cat", "demo-dan"])
    );
    // dan was offline: his copy is stored.
    let mut dan = Client::login(&node.url(), "demo-dan").await;
    let (frames, _) = dan.fetch_all(10).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["data"]["content"], "hi all");
    // No confirmation for group messages.
    ann.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn pipelined_messages_keep_their_order_and_each_gets_its_answer(node: Deployment) {
    // Frames that reach the server together are routed together; each one
    // still gets its own answer, in order, and a bad one among them is
    // refused alone.
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let frames: Vec<Value> = (0..200)
        .map(|i| match i {
            50 => {
                json!({"type":"MESSAGE","data":{"to":"other-x","content":"no"},"reference":"bad"})
            }
            120 => json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"m120"},
                          "feature":"FAST","reference":"r120"}),
            _ => json!({"type":"MESSAGE","data":{"to":"demo-bob","content":format!("m{i}")},
                        "feature":"RELIABLE","reference":format!("r{i}")}),
        })
        .collect();
    ann.send_burst(&frames).await;

    // The sender: MESSAGE_ACCEPTED for each RELIABLE one in order, the
    // refusal in its place.
    let mut answers = Vec::new();
    while answers.len() < 199 {
        let f = ann.recv().await;
        match f["type"].as_str() {
            Some("MESSAGE_ACCEPTED" | "ERROR") => {
                answers.push(f["reference"].as_str().unwrap_or_default().to_owned())
            }
            Some("MESSAGE_CONFIRMATION") => {}
            _ => panic!("unexpected frame {f}"),
        }
    }
    let expected: Vec<String> = (0..200)
        .filter(|&i| i != 120)
        .map(|i| {
            if i == 50 {
                "bad".to_owned()
            } else {
                format!("r{i}")
            }
        })
        .collect();
    assert_eq!(answers, expected);

    // The recipient: every accepted message once, in the order sent.
    let mut got = Vec::new();
    let mut last_seq = 0;
    while got.len() < 199 {
        let m = bob.recv_type("MESSAGE").await;
        if let Some(seq) = m["data"]["seq"].as_u64() {
            assert!(seq > last_seq, "seqs rise in the order sent: {m}");
            last_seq = seq;
        }
        got.push(m["data"]["content"].as_str().expect("content").to_owned());
    }
    let sent: Vec<String> = (0..200)
        .filter(|&i| i != 50)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(got, sent);
    bob.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn a_client_message_id_is_checked_and_becomes_the_message_id(node: Deployment) {
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cy = Client::login(&node.url(), "demo-cy").await;

    // A well-formed id is the message's id, for a direct and a group
    // message alike.
    let id = format!("ann_{}-Z9", "x".repeat(57));
    assert_eq!(id.len(), 64);
    ann.send(json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"mine","id":id},"reference":"d1"}))
        .await;
    let accepted = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(
        (&accepted["data"]["id"], &accepted["reference"]),
        (&json!(id), &json!("d1"))
    );
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(
        (&m["data"]["id"], &m["data"]["content"]),
        (&json!(id), &json!("mine"))
    );
    ann.send(json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cy"],"content":"ours","id":"grp-1"},"reference":"g1"}))
        .await;
    assert_eq!(
        ann.recv_type("MESSAGE_ACCEPTED").await["data"]["id"],
        "grp-1"
    );
    for c in [&mut bob, &mut cy] {
        let m = c.recv_type("MESSAGE").await;
        assert_eq!(
            (&m["data"]["id"], &m["data"]["content"]),
            (&json!("grp-1"), &json!("ours"))
        );
    }
    // Without one, the server assigns a UUIDv7 as before.
    ann.send(json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"theirs","id":null},"reference":"d2"}))
        .await;
    let assigned = ann.recv_type("MESSAGE_ACCEPTED").await;
    let assigned = assigned["data"]["id"].as_str().expect("id");
    assert_eq!(assigned.len(), 36, "{assigned}");
    assert_eq!(&assigned[14..15], "7", "a UUIDv7: {assigned}");
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["id"], assigned);

    // Anything else is refused with the frame's reference and a message
    // that says what an id may be; nothing reaches the recipients.
    for (i, bad) in [
        json!(""),
        json!("y".repeat(65)),
        json!("has space"),
        json!("dot.ted"),
        json!("ünï"),
        json!(42),
        json!(["a"]),
    ]
    .into_iter()
    .enumerate()
    {
        for kind in ["MESSAGE", "GROUP_MESSAGE"] {
            let to = if kind == "MESSAGE" {
                json!("demo-bob")
            } else {
                json!(["demo-bob"])
            };
            let reference = format!("{kind}-{i}");
            ann.send(
                json!({"type":kind,"data":{"to":to,"content":"no","id":bad},"reference":reference}),
            )
            .await;
            let e = expect_error(&mut ann, "INVALID_FRAME").await;
            assert_eq!(e["reference"], reference.as_str(), "{e}");
            let message = e["data"]["message"].as_str().expect("message");
            assert!(message.starts_with("data.id must be"), "{bad}: {message}");
        }
    }
    bob.expect_silence(QUIET).await;
    cy.expect_silence(QUIET).await;
    node.shutdown().await;
}

/// A client that lost its connection resends what it had not seen
/// accepted, with the same `data.id`: the resend is answered
/// `MESSAGE_ACCEPTED` with that id, and nobody sees the message twice —
/// online recipients, offline ones (who fetch it), group recipients.
async fn a_resent_client_message_id_is_accepted_again_and_shown_once(node: Deployment) {
    let url = node.url();
    let mut ann = Client::login_with(&url, "demo-ann", true).await;
    let mut bob = Client::login(&url, "demo-bob").await;
    let mut cy = Client::login(&url, "demo-cy").await;
    let direct = |reference: &str| json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"once","id":"resend-1"},"reference":reference});

    ann.send(direct("r1")).await;
    let first = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(first["data"]["id"], "resend-1");
    let got = bob.recv_type("MESSAGE").await;
    assert_eq!(
        (&got["data"]["id"], &got["data"]["content"]),
        (&json!("resend-1"), &json!("once"))
    );

    // The resend, on the same connection and on a new one without ack
    // mode: each is answered as accepted, with the original id.
    ann.send(direct("r2")).await;
    let again = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(
        (&again["data"]["id"], &again["reference"]),
        (&json!("resend-1"), &json!("r2"))
    );
    let mut ann2 = Client::login(&url, "demo-ann").await;
    ann2.send(direct("r3")).await;
    let third = ann2.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(
        (&third["data"]["id"], &third["reference"]),
        (&json!("resend-1"), &json!("r3"))
    );
    bob.expect_silence(QUIET).await;
    ann2.expect_silence(QUIET).await;

    // A group message: every recipient once.
    let group = json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cy"],"content":"all","id":"grp-1"},"reference":"g1"});
    ann.send(group.clone()).await;
    assert_eq!(
        ann.recv_type("MESSAGE_ACCEPTED").await["data"]["id"],
        "grp-1"
    );
    for c in [&mut bob, &mut cy] {
        assert_eq!(c.recv_type("MESSAGE").await["data"]["id"], "grp-1");
    }
    ann.send(group).await;
    assert_eq!(
        ann.recv_type("MESSAGE_ACCEPTED").await["data"]["id"],
        "grp-1"
    );
    bob.expect_silence(QUIET).await;
    cy.expect_silence(QUIET).await;

    // To an offline user: stored once, fetched once.
    for reference in ["o1", "o2"] {
        ann.send(json!({"type":"MESSAGE","data":{"to":"demo-dee","content":"later","id":"off-1"},"reference":reference}))
            .await;
        assert_eq!(
            ann.recv_type("MESSAGE_ACCEPTED").await["data"]["id"],
            "off-1"
        );
    }
    let mut dee = Client::login(&url, "demo-dee").await;
    let (frames, _) = dee.fetch_all(100).await;
    assert_eq!(ids(&frames), ["off-1"]);
    node.shutdown().await;
}

async fn a_client_message_id_belongs_to_its_sender(node: Deployment) {
    // Two senders that happen to pick the same id send two messages.
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut cy = Client::login_with(&node.url(), "demo-cy", true).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    for (sender, content) in [(&mut ann, "from ann"), (&mut cy, "from cy")] {
        sender
            .send(json!({"type":"MESSAGE","data":{"to":"demo-bob","content":content,"id":"same-1"},"reference":content}))
            .await;
        assert_eq!(
            sender.recv_type("MESSAGE_ACCEPTED").await["data"]["id"],
            "same-1"
        );
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = bob.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["id"], "same-1", "{m}");
        got.push((m["data"]["from"].clone(), m["data"]["content"].clone()));
    }
    assert_eq!(
        got,
        [
            (json!("demo-ann"), json!("from ann")),
            (json!("demo-cy"), json!("from cy"))
        ]
    );
    bob.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn ack_mode_redelivers_until_acknowledged(node: Deployment) {
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut bob = Client::login_with(&node.url(), "demo-bob", true).await;

    ann.message("demo-bob", "one", "RELIABLE", "a1").await;
    let accepted = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(accepted["data"]["reference"], "a1");
    ann.message("demo-bob", "two", "RELIABLE", "a2").await;
    assert_eq!(
        ann.recv_type("MESSAGE_ACCEPTED").await["data"]["reference"],
        "a2"
    );

    let one = bob.recv_type("MESSAGE").await;
    let two = bob.recv_type("MESSAGE").await;
    assert_eq!(one["data"]["content"], "one");
    assert_eq!(two["data"]["content"], "two");
    // Written but not acknowledged: not delivered, no confirmation.
    ann.expect_silence(QUIET).await;

    bob.send(json!({"type":"ACK","data":{"ids":[one["data"]["id"]]}}))
        .await;
    let c = ann.recv_type("MESSAGE_CONFIRMATION").await;
    assert_eq!(c["data"]["reference"], "a1");
    // ann acknowledges its confirmation too.
    ann.send(json!({"type":"ACK","data":{"ids":[c["data"]["id"]]}}))
        .await;
    bob.close().await;

    let mut bob = Client::login_with(&node.url(), "demo-bob", true).await;
    let again = bob.recv_type("MESSAGE").await;
    assert_eq!(again["data"]["content"], "two");
    assert_eq!(again["data"]["id"], two["data"]["id"]);
    bob.expect_silence(QUIET).await;
    bob.send(json!({"type":"ACK","data":{"ids":[two["data"]["id"]]}}))
        .await;
    assert_eq!(
        ann.recv_type("MESSAGE_CONFIRMATION").await["data"]["reference"],
        "a2"
    );
    bob.close().await;

    let mut bob = Client::login_with(&node.url(), "demo-bob", true).await;
    bob.expect_silence(QUIET).await;
    let (frames, lefts) = bob.fetch_all(10).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(lefts, vec![0]);
    node.shutdown().await;
}

async fn master_user_sees_one_connect_and_one_disconnect_per_user(node: Deployment) {
    let mut master = Client::login(&node.url(), "demo-0").await;
    let first = Client::login(&node.url(), "demo-7").await;
    let second = Client::login(&node.url(), "demo-7").await;
    let connected = master.recv().await;
    assert_eq!(connected["type"], "USER_CONNECTED");
    assert_eq!(connected["data"]["userId"], "demo-7");
    master.expect_silence(QUIET).await;
    first.close().await;
    master.expect_silence(QUIET).await;
    second.close().await;
    let gone = master.recv().await;
    assert_eq!(gone["type"], "USER_DISCONNECTED");
    assert_eq!(gone["data"]["userId"], "demo-7");
    master.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn content_round_trips_byte_exactly(node: Deployment) {
    let samples = [
        "plain",
        "ünïcödé 日本語 👋🏽 \u{200d}",
        "quotes \" ' \\ \\\" and slashes / \\\\",
        "control \u{0}\u{1}\u{7}\u{8}\u{b}\u{c}\u{1b}\u{1f}\u{7f} \n\r\t end",
        "{\"json\":\"inside\"}",
        "",
    ];
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    for s in samples {
        ann.message("demo-bob", s, "RELIABLE", "").await;
        let m = bob.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["content"], s);
    }
    bob.close().await;
    // The same through the store.
    for (i, s) in samples.iter().enumerate() {
        ann.send_accepted("demo-bob", s, &format!("s{i}")).await;
    }
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(100).await;
    let got: Vec<&str> = frames
        .iter()
        .map(|f| f["data"]["content"].as_str().expect("content"))
        .collect();
    assert_eq!(got, samples);
    node.shutdown().await;
}

const JWT_SECRET: &str = "test-secret";

fn jwt_app() -> AppConfig {
    AppConfig {
        name: "ANZ".into(),
        app_id: "app-id-343".into(),
        master_user_id: "ANZ-0".into(),
        auth: AuthMode::Jwt,
        jwt_secret: Some(JWT_SECRET.into()),
        jwt_public_key_pem: None,
        jwt_public_key_file: None,
        jwt_audience: None,
        auth_url: None,
        ..AppConfig::demo()
    }
}

fn jwt(secret: &str, sub: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": now + exp_offset}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

async fn expect_error(c: &mut Client, code: &str) -> Value {
    let f = c.recv_type("ERROR").await;
    assert_eq!(f["data"]["code"], code, "{f}");
    assert!(f["data"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    f
}

async fn expect_auth_refused(url: &str, data: Value, reason_part: &str) {
    let mut c = Client::connect(url).await;
    let reply = c.auth(data).await;
    assert_eq!(reply["data"]["isAuthenticated"], false, "{reply}");
    let reason = reply["data"]["reason"].as_str().expect("reason");
    assert!(reason.contains(reason_part), "{reason}");
    assert_eq!(close_code(&c.closed().await), Some(1008));
}

async fn bad_input_gets_clear_errors_while_others_keep_talking(node: Deployment) {
    // A pair that keeps talking in the background the whole time.
    let pair_url = node.url();
    let background = tokio::spawn(async move {
        let mut ann = Client::login(&pair_url, "demo-ann").await;
        let mut bob = Client::login(&pair_url, "demo-bob").await;
        let mut got = 0;
        for i in 0..100 {
            ann.message("demo-bob", &format!("bg{i}"), "RELIABLE", "")
                .await;
            let m = bob.recv_type("MESSAGE").await;
            assert_eq!(m["data"]["content"], format!("bg{i}"));
            got += 1;
            // Under the 50 messages/s limit.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        got
    });

    // Before authentication.
    let mut c = Client::connect(&node.url()).await;
    c.message("demo-bob", "x", "RELIABLE", "early").await;
    let e = expect_error(&mut c, "NOT_AUTHENTICATED").await;
    assert_eq!(e["reference"], "early");

    // Authentication failures: reply with a reason, then close 1008.
    expect_auth_refused(
        &node.url(),
        json!({"appId":"demo","userId":"other-1","token":""}),
        "demo-<id>",
    )
    .await;
    expect_auth_refused(
        &node.url(),
        json!({"appId":"nope","userId":"demo-1","token":""}),
        "appId",
    )
    .await;
    expect_auth_refused(
        &node.url(),
        json!({"appId":"app-id-343","userId":"ANZ-1","token": jwt("wrong", "ANZ-1", 600)}),
        "signature",
    )
    .await;
    expect_auth_refused(
        &node.url(),
        json!({"appId":"app-id-343","userId":"ANZ-1","token": jwt(JWT_SECRET, "ANZ-1", -3600)}),
        "expired",
    )
    .await;
    let mut anz = Client::connect(&node.url()).await;
    let ok = anz
        .auth(json!({"appId":"app-id-343","userId":"ANZ-1","token": jwt(JWT_SECRET, "ANZ-1", 600)}))
        .await;
    assert_eq!(ok["data"]["isAuthenticated"], true, "{ok}");

    // Garbage after authentication keeps the connection open.
    let mut c = Client::login(&node.url(), "demo-mallory").await;
    c.send_text("{not json".into()).await;
    expect_error(&mut c, "INVALID_JSON").await;
    c.send(json!({"type":"TELEPORT","data":{},"reference":"t1"}))
        .await;
    assert_eq!(
        expect_error(&mut c, "UNKNOWN_TYPE").await["reference"],
        "t1"
    );
    c.send(json!({"type":"MESSAGE","data":{"content":"no recipient"},"reference":"m1"}))
        .await;
    assert_eq!(
        expect_error(&mut c, "INVALID_FRAME").await["reference"],
        "m1"
    );
    c.send(json!({"type":"MESSAGE","data":{"to":"demo-bob","content":7}}))
        .await;
    expect_error(&mut c, "INVALID_FRAME").await;
    c.send(json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"x"},"feature":"SLOW"}))
        .await;
    expect_error(&mut c, "INVALID_FRAME").await;
    c.message("ANZ-1", "cross-app", "RELIABLE", "x1").await;
    expect_error(&mut c, "INVALID_RECIPIENT").await;
    c.message("demo-nobody", &"y".repeat(3000), "RELIABLE", "big")
        .await;
    expect_error(&mut c, "PAYLOAD_TOO_LARGE").await;
    c.send_text(format!(
        "{{\"type\":\"MESSAGE\",\"data\":{{\"to\":\"demo-bob\",\"content\":\"{}\"}}}}",
        "z".repeat(5000)
    ))
    .await;
    expect_error(&mut c, "PAYLOAD_TOO_LARGE").await;
    c.send(json!({"type":"GROUP_MESSAGE","data":{"to":[],"content":"x"}}))
        .await;
    expect_error(&mut c, "INVALID_FRAME").await;
    // Still usable.
    c.message("demo-nobody", "still here", "FAST", "").await;

    // A frame far beyond the limit closes the socket with 1009.
    let mut huge = Client::login(&node.url(), "demo-huge").await;
    huge.send_text("x".repeat(4096 * 5)).await;
    assert_eq!(close_code(&huge.closed().await), Some(1009));

    // A flood past the rate limit: RATE_LIMITED, then the socket is closed.
    let mut flood = Client::login(&node.url(), "demo-flood").await;
    for i in 0..600 {
        flood
            .send(json!({"type":"MESSAGE","data":{"to":"demo-sink","content":"f"},"feature":"FAST","reference":format!("f{i}")}))
            .await;
    }
    let mut limited = 0;
    let closed = loop {
        match flood.try_recv(support::WAIT).await {
            Some(f) if f["type"] == "ERROR" => {
                assert_eq!(f["data"]["code"], "RATE_LIMITED", "{f}");
                limited += 1;
            }
            Some(_) => {}
            None => break flood.closed().await,
        }
    };
    assert_eq!(close_code(&closed), Some(1008), "{closed:?}");
    assert!(limited > 100, "got {limited} RATE_LIMITED errors");

    assert_eq!(background.await.expect("background pair"), 100);
    node.shutdown().await;
}

async fn silent_connection_is_closed_at_the_auth_timeout(node: Deployment) {
    let mut c = Client::connect(&node.url()).await;
    let closed = c.closed().await;
    assert_eq!(close_code(&closed), Some(1008), "{closed:?}");
    node.shutdown().await;
}

async fn slow_consumer_is_disconnected_and_others_are_not_held_up(node: Deployment) {
    let mut slow = Client::login(&node.url(), "demo-slow").await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let payload = "p".repeat(60_000);
    // Enough to fill the socket buffers (~11 MB) and then the send queue.
    for _ in 0..190 {
        ann.message("demo-slow", &payload, "FAST", "").await;
    }
    ann.message("demo-bob", "after the flood", "FAST", "").await;
    assert_eq!(
        bob.recv_type("MESSAGE").await["data"]["content"],
        "after the flood"
    );
    // The slow reader finally reads: some frames, then the end of the socket.
    let mut frames = 0;
    let end = loop {
        match slow.try_recv(support::WAIT).await {
            Some(_) => frames += 1,
            None => break slow.closed().await,
        }
    };
    assert!(
        frames < 190,
        "a slow consumer must not get everything queued ({frames})"
    );
    if let Closed::Frame(Some(f)) = &end {
        assert_eq!(u16::from(f.code), 1008);
    }
    node.shutdown().await;
}

async fn a_small_outbound_backlog_slows_senders_but_loses_and_reorders_nothing(node: Deployment) {
    // Four frames not yet written stop every reader of the gateway: two
    // senders flood each other, each in one burst, and everything arrives.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let burst = |to: &str, feature: &str| -> Vec<Value> {
        (0..300)
            .map(|i| json!({"type":"MESSAGE","data":{"to":to,"content":format!("{i}")},"feature":feature}))
            .collect()
    };
    ann.send_burst(&burst("demo-bob", "RELIABLE")).await;
    bob.send_burst(&burst("demo-ann", "FAST")).await;
    for (client, feature) in [(&mut bob, "RELIABLE"), (&mut ann, "FAST")] {
        let mut seqs = Vec::new();
        for i in 0..300 {
            let m = client.recv_type("MESSAGE").await;
            assert_eq!(m["data"]["content"], format!("{i}"), "{feature} in order");
            seqs.push(m["data"]["seq"].as_u64());
        }
        if feature == "RELIABLE" {
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "rising seqs");
        }
    }
    ann.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn a_reader_that_stops_does_not_hold_up_others_behind_a_small_backlog(node: Deployment) {
    // A client that does not read has hundreds of frames queued for it
    // (more than its socket buffers hold; its 4096-frame queue does not
    // fill, so it is not closed). They must not count against the 64-frame
    // backlog beyond its share (64 / 64 = one), or every reader would wait.
    let stuck = Client::login(&node.url(), "demo-stuck").await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let payload = "p".repeat(60_000);
    // Bounded below the 10 s after which a client whose socket write stalls
    // is closed (which would release its frames anyway): being held up
    // until then is the failure.
    let flow = async {
        for _ in 0..400 {
            ann.message("demo-stuck", &payload, "FAST", "").await;
        }
        for i in 0..20 {
            ann.message("demo-bob", &format!("after {i}"), "FAST", "")
                .await;
        }
        for i in 0..20 {
            let m = bob.recv_type("MESSAGE").await;
            assert_eq!(m["data"]["content"], format!("after {i}"));
        }
    };
    tokio::time::timeout(Duration::from_secs(5), flow)
        .await
        .expect("others are not held up by a client that does not read");
    stuck.close().await;
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let node = TestNode::start().await;
    let mut c = Client::login(&node.url(), "demo-ann").await;
    let stopping = tokio::spawn(node.shutdown());
    let closed = c.closed().await;
    assert_eq!(close_code(&closed), Some(1001), "{closed:?}");
    stopping.await.expect("shutdown");
}

async fn fetched_messages_have_distinct_ids(node: Deployment) {
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    for i in 0..10 {
        ann.send_accepted("demo-bob", &format!("{i}"), &format!("r{i}"))
            .await;
    }
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(3).await;
    let all = ids(&frames);
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 10);
    assert_eq!(unique.len(), 10);
    node.shutdown().await;
}

async fn idle_connection_is_pinged_and_dropped_when_silent(node: Deployment) {
    // The master user reads all the time, so it answers pings and stays.
    let mut master = Client::login(&node.url(), "demo-0").await;
    // A client that sends nothing and never reads never answers a ping.
    let silent = Client::login(&node.url(), "demo-silent").await;
    let connected = master.recv_type("USER_CONNECTED").await;
    assert_eq!(connected["data"]["userId"], "demo-silent");
    let started = tokio::time::Instant::now();
    let gone = master.recv_type("USER_DISCONNECTED").await;
    assert_eq!(gone["data"]["userId"], "demo-silent");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "dropped after {waited:?}, idle timeout is 2 s"
    );
    // The master, idle too but answering pings, is still served.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    ann.message("demo-0", "still there?", "FAST", "").await;
    assert_eq!(
        master.recv_type("MESSAGE").await["data"]["content"],
        "still there?"
    );
    drop(silent);
    node.shutdown().await;
}

#[tokio::test]
async fn presence_in_redis_serves_the_same_protocol() {
    let Some(redis) = support::test_redis() else {
        return;
    };
    let prefix = format!("sbtest:{}:", switchboard_mesh::new_message_id());
    let node = TestNode::start_with(
        |c| {
            c.redis = redis;
            c.presence.key_prefix = prefix;
        },
        Default::default(),
    )
    .await;
    let mut master = Client::login(&node.url(), "demo-0").await;
    let first = Client::login(&node.url(), "demo-7").await;
    let mut second = Client::login(&node.url(), "demo-7").await;
    let connected = master.recv().await;
    assert_eq!(connected["type"], "USER_CONNECTED");
    assert_eq!(connected["data"]["userId"], "demo-7");
    master.expect_silence(QUIET).await;

    // Pushes find the user's connections through Redis.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let ann_online = master.recv().await;
    assert_eq!(ann_online["type"], "USER_CONNECTED");
    assert_eq!(ann_online["data"]["userId"], "demo-ann");
    ann.message("demo-7", "via redis", "RELIABLE", "r1").await;
    assert_eq!(
        second.recv_type("MESSAGE").await["data"]["content"],
        "via redis"
    );
    assert_eq!(
        ann.recv_type("MESSAGE_CONFIRMATION").await["data"]["reference"],
        "r1"
    );

    first.close().await;
    master.expect_silence(QUIET).await;
    second.close().await;
    let gone = master.recv().await;
    assert_eq!(gone["type"], "USER_DISCONNECTED");
    master.expect_silence(QUIET).await;
    node.shutdown().await;
}
