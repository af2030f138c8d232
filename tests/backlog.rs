//! Clients far behind: a reader catching up on a large stored backlog in
//! acknowledged mode, and what a backlog costs the server's memory.

#[path = "support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{Client, TestNode, WAIT, close_code};
use switchboard_mesh::DeliveryClient;

/// Stored messages for demo-bob, counted over the mesh (no side effect).
async fn stored_for_bob(delivery: &DeliveryClient) -> u64 {
    let page = delivery
        .fetch(switchboard_mesh::pb::FetchRequest {
            app_id: "demo".into(),
            user_id: "demo-bob".into(),
            count: 1,
            after_seq: 0,
        })
        .await
        .expect("fetch");
    page.messages.len() as u64 + page.left
}

fn ack(id: &str) -> Value {
    json!({"type": "ACK", "data": {"ids": [id]}})
}

/// Reads `n` MESSAGE frames; panics on an ERROR or a close.
async fn read_messages(c: &mut Client, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("MESSAGE") => ids.push(f["data"]["id"].as_str().expect("id").to_owned()),
            Some("ERROR") => panic!("refused while catching up: {f}"),
            _ => {}
        }
    }
    ids
}

/// A reader coming back to 5,000 stored messages acknowledges each in its
/// own ACK frame, back to back, far past `acks_per_second`: it is never
/// refused nor closed, and its inbox empties. ACKs that acknowledge
/// nothing (ids already acknowledged, unknown ids, one large frame of
/// them) still spend the budget and a flood of them is closed.
#[tokio::test]
async fn acknowledging_a_large_backlog_one_frame_per_message_is_never_limited() {
    const BACKLOG: usize = 5_000;
    let node = TestNode::start_with(
        |c| {
            support::open_mesh(c);
            c.limits.acks_per_second = 50;
            c.limits.max_refusals = 20;
            c.limits.messages_per_second = 100_000;
        },
        Default::default(),
    )
    .await;
    let delivery = DeliveryClient::from_channel(support::mesh_channel(node.mesh_addr()).await);

    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let sends: Vec<Value> = (0..BACKLOG)
        .map(|i| {
            json!({"type": "MESSAGE", "feature": "RELIABLE", "reference": format!("r{i}"),
                "data": {"to": "demo-bob", "content": format!("m{i}")}})
        })
        .collect();
    for chunk in sends.chunks(500) {
        ann.send_burst(chunk).await;
    }
    let mut accepted = 0;
    while accepted < BACKLOG {
        let f = ann.recv().await;
        assert_ne!(f["type"], "ERROR", "{f}");
        if f["type"] == "MESSAGE_ACCEPTED" {
            accepted += 1;
        }
    }
    assert_eq!(stored_for_bob(&delivery).await, BACKLOG as u64);

    // Ack mode: the replay brings the first page (max_fetch_count), FETCH
    // the rest; every message is acknowledged in its own frame.
    let mut bob = Client::login_with(&node.url(), "demo-bob", true).await;
    let mut ids = read_messages(&mut bob, 1_000).await;
    let acks: Vec<Value> = ids.iter().map(|id| ack(id)).collect();
    bob.send_burst(&acks).await;
    while ids.len() < BACKLOG {
        bob.send(json!({"type": "FETCH_MISSING_MESSAGES_REQUEST", "data": {"count": 1000}}))
            .await;
        let page = read_messages(&mut bob, (BACKLOG - ids.len()).min(1_000)).await;
        let acks: Vec<Value> = page.iter().map(|id| ack(id)).collect();
        bob.send_burst(&acks).await;
        ids.extend(page);
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), BACKLOG);

    // Every ACK was taken: the inbox empties (the reports reach delivery
    // in the background).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut left = stored_for_bob(&delivery).await;
    while left > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = stored_for_bob(&delivery).await;
    }
    assert_eq!(left, 0, "acknowledged messages are still stored");
    // Still open: a message reaches it.
    ann.message("demo-bob", "still here", "FAST", "live").await;
    let f = bob.recv_type("MESSAGE").await;
    assert_eq!(f["data"]["content"], "still here");

    // Acknowledging the same messages again acknowledges nothing: a flood
    // of those is limited and closed like any other.
    let again: Vec<Value> = ids[..500].iter().map(|id| ack(id)).collect();
    bob.send_burst(&again).await;
    let mut limited = 0;
    while let Some(f) = bob.try_recv(WAIT).await {
        if f["type"] == "ERROR" && f["data"]["code"] == "RATE_LIMITED" {
            limited += 1;
        }
    }
    assert!(limited > 0, "repeated ACKs were not rate limited");
    assert_eq!(close_code(&bob.closed().await), Some(1008));

    // One large ACK of unknown ids spends the budget at once: the next
    // ACK is refused.
    let mut mallory = Client::login_with(&node.url(), "demo-mallory", true).await;
    let unknown: Vec<String> = (0..1_000).map(|i| format!("nope-{i}")).collect();
    mallory
        .send(json!({"type": "ACK", "data": {"ids": unknown}}))
        .await;
    mallory.send(ack("nope")).await;
    let f = mallory.recv_type("ERROR").await;
    assert_eq!(f["data"]["code"], "RATE_LIMITED", "{f}");
    node.shutdown().await;
}

/// Resident memory of a process, MiB, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// Sends `count` RELIABLE messages of `content` round-robin to `to`, in
/// bursts, and waits until every one is stored.
async fn store_messages(sender: &mut Client, to: &[String], count: usize, content: &str) {
    let mut next = 0;
    while next < count {
        let burst: Vec<Value> = (next..(next + 100).min(count))
            .map(|i| {
                json!({"type": "MESSAGE", "feature": "RELIABLE", "reference": format!("r{i}"),
                    "data": {"to": to[i % to.len()], "content": content}})
            })
            .collect();
        sender.send_burst(&burst).await;
        let mut accepted = 0;
        while accepted < burst.len() {
            let f = sender.recv().await;
            assert_ne!(f["type"], "ERROR", "{f}");
            if f["type"] == "MESSAGE_ACCEPTED" {
                accepted += 1;
            }
        }
        next += burst.len();
    }
}

/// Stored messages live on disk: 120 MiB stored for users who are offline,
/// and for an ack-mode reader that never reads, raise the server's memory
/// by what the configuration allows (the hot tier, the engine's cache and
/// tables, one send queue), not by the backlog.
#[tokio::test]
async fn a_large_stored_backlog_is_held_on_disk_not_in_memory() {
    const HOT_MIB: f64 = 16.0;
    const CACHE_MIB: f64 = 16.0;
    const SEND_QUEUE_MIB: f64 = 4.0;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = support::ProcessNode::start_with_env(
        dir.path(),
        &[
            ("SWITCHBOARD_STORE__HOT_MIB", "16"),
            ("SWITCHBOARD_STORE__CACHE_MIB", "16"),
            ("SWITCHBOARD_LIMITS__SEND_QUEUE_BYTES", "4194304"),
            ("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "100000"),
            ("SWITCHBOARD_QUOTAS__SENDER_BYTES_PER_SECOND", "1073741824"),
            ("SWITCHBOARD_QUOTAS__SENDER_BURST_BYTES", "1073741824"),
        ],
    )
    .await;
    let pid = node.child.id();
    let mut sender = Client::login_with(&node.url(), "demo-ann", true).await;
    let content = "x".repeat(12 * 1024);
    // Warm up: the allocator's and the engine's first growth are not the
    // backlog's.
    let warm: Vec<String> = vec!["demo-warm".into()];
    store_messages(&mut sender, &warm, 500, &content).await;
    let baseline = rss_mib(pid);

    // A reader in ack mode that never reads: sent everything, reads nothing.
    let mut stuck = Client::login_with(&node.url(), "demo-stuck", true).await;
    let mut to: Vec<String> = (0..8).map(|i| format!("demo-offline-{i}")).collect();
    to.push("demo-stuck".into());
    let total = 10_000; // 120 MiB of content
    store_messages(&mut sender, &to, total, &content).await;
    // Messages stay in memory for `spill_after` (5 s) after their append
    // before they may move to the tree; appends after that move them.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let budget = baseline + HOT_MIB + CACHE_MIB + SEND_QUEUE_MIB + 48.0;
    let mut rss = rss_mib(pid);
    eprintln!("backlog: right after the sends {rss:.1} MiB");
    while rss > budget && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        store_messages(&mut sender, &warm, 10, &content).await;
        rss = rss_mib(pid);
    }
    eprintln!("backlog: baseline {baseline:.1} MiB, after {rss:.1} MiB, budget {budget:.1} MiB");
    assert!(
        rss <= budget,
        "RSS {rss:.0} MiB after storing {total} messages of 12 KiB: over {budget:.0} MiB \
         (baseline {baseline:.0} MiB)"
    );
    // Everything is still there, in order, for whoever comes back.
    let mut back = Client::login(&node.url(), "demo-offline-3").await;
    // Pages within the send queue's bytes.
    let (messages, _) = back.fetch_all(100).await;
    assert_eq!(messages.len(), total / to.len());
    drop(stuck.try_recv(std::time::Duration::from_millis(1)).await);
    node.terminate();
}
