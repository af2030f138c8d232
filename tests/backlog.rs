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
/// and for an ack-mode reader that never reads, in two halves. Once the
/// first half has filled what the configuration lets memory hold (the hot
/// tier, the engine's cache and tables, one send queue), the second half
/// adds little to the server's memory: well under half its own size. (An
/// absolute bound on RSS was too tight for the allocator's noise on a
/// loaded machine; the second half's growth tells a backlog held in memory,
/// which grows by all of it, from one held on disk.)
#[tokio::test]
async fn a_large_stored_backlog_is_held_on_disk_not_in_memory() {
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
    let warm: Vec<String> = vec!["demo-warm".into()];
    store_messages(&mut sender, &warm, 500, &content).await;

    // A reader in ack mode that never reads: sent everything, reads nothing.
    let mut stuck = Client::login_with(&node.url(), "demo-stuck", true).await;
    let mut to: Vec<String> = (0..8).map(|i| format!("demo-offline-{i}")).collect();
    to.push("demo-stuck".into());
    let half = 5_000; // 60 MiB of content
    let half_mib = (half * content.len()) as f64 / (1024.0 * 1024.0);
    // Messages stay in memory for `spill_after` (5 s) after their append
    // before they may move to the tree; appends after that move them. Wait
    // (sending a little) until RSS is at most `target`, or has found no new
    // low for 10 s, or 60 s have passed.
    let settle = async |sender: &mut Client, target: f64| {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut low = rss_mib(pid);
        let mut low_at = tokio::time::Instant::now();
        while low > target
            && low_at.elapsed() < std::time::Duration::from_secs(10)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            store_messages(sender, &warm, 10, &content).await;
            let rss = rss_mib(pid);
            if rss < low {
                low = rss;
                low_at = tokio::time::Instant::now();
            }
        }
        low
    };
    store_messages(&mut sender, &to, half, &content).await;
    let first = settle(&mut sender, 0.0).await;
    store_messages(&mut sender, &to, half, &content).await;
    let budget = first + half_mib / 2.0;
    let second = settle(&mut sender, budget).await;
    eprintln!(
        "backlog: after the first {half_mib:.0} MiB {first:.1} MiB, after the second {second:.1} MiB"
    );
    assert!(
        second <= budget,
        "RSS {second:.0} MiB after the second {half_mib:.0} MiB stored: grew by more than \
         half of it from {first:.0} MiB"
    );
    // Everything is still there, in order, for whoever comes back.
    let mut back = Client::login(&node.url(), "demo-offline-3").await;
    // Pages within the send queue's bytes.
    let (messages, _) = back.fetch_all(100).await;
    // Each half went round-robin from the first recipient.
    let each_half = (0..half).filter(|i| i % to.len() == 3).count();
    assert_eq!(messages.len(), 2 * each_half);
    drop(stuck.try_recv(std::time::Duration::from_millis(1)).await);
    node.terminate();
}
