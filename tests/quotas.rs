//! Quotas that protect everyone from one user: a full inbox, a sender's
//! fan-out budget, an app's connections, and the store's disk floor. Each
//! runs against a real node with real WebSocket clients.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, ProcessNode, TestNode};

/// Generous: the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(30);

/// The answer to the send whose reference is `reference`: MESSAGE_ACCEPTED
/// or ERROR (other frames are skipped).
async fn answer(client: &mut Client, reference: &str) -> Value {
    loop {
        let f = client.recv().await;
        let kind = f["type"].as_str().unwrap_or_default();
        let about = f["reference"] == reference || f["data"]["reference"] == reference;
        if about && (kind == "MESSAGE_ACCEPTED" || kind == "ERROR") {
            return f;
        }
    }
}

/// Sends a RELIABLE direct message from an ack-mode client; its answer.
async fn send_reliable(client: &mut Client, to: &str, content: &str, reference: &str) -> Value {
    client.message(to, content, "RELIABLE", reference).await;
    answer(client, reference).await
}

/// Contents of the MESSAGE frames among `frames`, in order.
fn contents(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .map(|f| f["data"]["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A full inbox refuses RELIABLE messages with INBOX_FULL (nothing is
/// silently dropped); its owner fetches exactly the accepted ones; a group
/// message is stored for the others and its sender learns who was full;
/// once read, the inbox takes messages again.
#[tokio::test]
async fn a_full_inbox_refuses_with_inbox_full_and_keeps_what_it_accepted() {
    let node = TestNode::start_with(|c| c.quotas.inbox_max_messages = 3, Default::default()).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    for i in 0..3 {
        let reply = send_reliable(&mut ann, "demo-bob", &format!("m{i}"), &format!("r{i}")).await;
        assert_eq!(reply["type"], "MESSAGE_ACCEPTED", "{reply}");
    }
    for i in 3..5 {
        let reply = send_reliable(&mut ann, "demo-bob", &format!("m{i}"), &format!("r{i}")).await;
        assert_eq!(reply["type"], "ERROR", "{reply}");
        assert_eq!(reply["data"]["code"], "INBOX_FULL", "{reply}");
    }
    // FAST is never stored: no quota.
    // A group message: stored for cy, refused for bob.
    ann.send(json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cy"],"content":"all"},"reference":"g1"}))
        .await;
    let mut told = (false, false);
    while told != (true, true) {
        let f = ann.recv().await;
        if f["reference"] != "g1" && f["data"]["reference"] != "g1" {
            continue;
        }
        match f["type"].as_str() {
            Some("ERROR") => {
                assert_eq!(f["data"]["code"], "INBOX_FULL", "{f}");
                assert_eq!(f["data"]["recipients"], json!(["demo-bob"]), "{f}");
                told.0 = true;
            }
            Some("MESSAGE_ACCEPTED") => told.1 = true,
            _ => {}
        }
    }
    let mut cy = Client::login(&node.url(), "demo-cy").await;
    let (frames, _) = cy.fetch_all(100).await;
    assert_eq!(contents(&frames), vec!["all"]);

    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(100).await;
    assert_eq!(contents(&frames), vec!["m0", "m1", "m2"]);
    bob.close().await;
    // Read (delivered): the inbox empties and takes messages again once
    // the gateway has reported them delivered.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reference = format!("again{attempt}");
        let reply = send_reliable(&mut ann, "demo-bob", "after", &reference).await;
        if reply["type"] == "MESSAGE_ACCEPTED" {
            break;
        }
        assert_eq!(reply["data"]["code"], "INBOX_FULL", "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inbox never took messages again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(100).await;
    assert_eq!(contents(&frames), vec!["after"]);
    node.shutdown().await;
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The amplification of issue 21: one sender with no credential (auth
/// `none`) sends GROUP_MESSAGEs of 16 KB to 1,000 offline users. The
/// sender's budget lets the first through (it costs what 1,000 direct
/// messages cost) and refuses the rest with RATE_LIMITED; the store grows
/// by about one message's worth instead of ten.
#[tokio::test]
async fn the_group_message_amplification_is_bounded_by_the_sender_budget() {
    let mut data_dir = PathBuf::new();
    let node = TestNode::start_with(
        |c| {
            data_dir = c.data_dir.clone();
            // Room for one such message at once, and a refill so slow that
            // no second one fits while the test runs.
            c.quotas.sender_burst_bytes = 17_000_000;
            c.quotas.sender_bytes_per_second = 1_000;
        },
        Default::default(),
    )
    .await;
    let recipients: Vec<String> = (0..1000).map(|i| format!("demo-off{i}")).collect();
    let content = "x".repeat(16_000);
    let mut mallory = Client::login_with(&node.url(), "demo-mallory", true).await;
    let before = dir_bytes(&data_dir);
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..10 {
        let reference = format!("amp{i}");
        mallory
            .send(json!({"type":"GROUP_MESSAGE","data":{"to":recipients,"content":content},"reference":reference}))
            .await;
        let reply = answer(&mut mallory, &reference).await;
        match reply["type"].as_str() {
            Some("MESSAGE_ACCEPTED") => accepted += 1,
            _ => {
                assert_eq!(reply["data"]["code"], "RATE_LIMITED", "{reply}");
                limited += 1;
            }
        }
    }
    assert_eq!((accepted, limited), (1, 9));
    let grown = dir_bytes(&data_dir).saturating_sub(before);
    // One message to 1,000 inboxes is 16 MB of content (~25 MB on disk
    // here); ten, unbounded, grew the store by ~144 MB.
    assert!(
        grown < 64_000_000,
        "the store grew by {grown} bytes for one accepted message"
    );
    // Each recipient holds exactly the accepted one.
    let mut off = Client::login(&node.url(), "demo-off7").await;
    let (frames, _) = off.fetch_all(100).await;
    assert_eq!(contents(&frames).len(), 1);
    // Another sender is not held back by mallory's budget.
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let reply = send_reliable(&mut ann, "demo-off7", "hello", "a1").await;
    assert_eq!(reply["type"], "MESSAGE_ACCEPTED", "{reply}");
    node.shutdown().await;
}

const API_KEY: &str = "sbk_quota_send_0123456789";

/// The demo app with one API key of scope `send`.
fn with_send_key(c: &mut switchboard_config::Config) {
    use sha2::Digest;
    let sha256 = sha2::Sha256::digest(API_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    c.apps = vec![switchboard_config::AppConfig {
        api_keys: vec![switchboard_config::ApiKeyConfig {
            name: "sender".into(),
            sha256,
            scopes: vec![switchboard_config::ApiScope::Send],
        }],
        ..switchboard_config::AppConfig::demo()
    }];
}

/// A full inbox through the public APIs: a direct RELIABLE send is refused
/// (REST 429, gRPC RESOURCE_EXHAUSTED, code INBOX_FULL); a group send is
/// accepted and its answer names the recipients it was not stored for.
#[tokio::test]
async fn the_public_apis_tell_the_caller_which_inboxes_are_full() {
    use switchboard_proto::api::v1 as api;
    let node = TestNode::start_with(
        |c| {
            with_send_key(c);
            c.quotas.inbox_max_messages = 1;
        },
        Default::default(),
    )
    .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let host = node
        .url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("http://{host}/v1/apps/demo/messages"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let res = post(json!({"to": "demo-bob", "content": "first"}))
        .await
        .expect("answer");
    assert_eq!(res.status().as_u16(), 202);
    let res = post(json!({"to": "demo-bob", "content": "second"}))
        .await
        .expect("answer");
    assert_eq!(res.status().as_u16(), 429);
    let body: Value = res.json().await.expect("JSON");
    assert_eq!(body["code"], "INBOX_FULL", "{body}");
    let res = post(json!({"to": ["demo-bob", "demo-cy"], "content": "all"}))
        .await
        .expect("answer");
    assert_eq!(res.status().as_u16(), 202);
    let body: Value = res.json().await.expect("JSON");
    assert_eq!(body["inboxFull"], json!(["demo-bob"]), "{body}");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect over HTTP/2");
    let mut grpc = api::messaging_client::MessagingClient::new(channel);
    let request = |target: api::send_message_request::Target| {
        let mut req = tonic::Request::new(api::SendMessageRequest {
            app_id: "demo".into(),
            target: Some(target),
            content: "by grpc".into(),
            ..Default::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {API_KEY}").parse().expect("metadata"),
        );
        req
    };
    use api::send_message_request::Target;
    let refused = grpc
        .send_message(request(Target::To("demo-bob".into())))
        .await
        .expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(
        refused
            .metadata()
            .get("x-switchboard-error")
            .and_then(|v| v.to_str().ok()),
        Some("INBOX_FULL"),
        "{refused:?}"
    );
    let reply = grpc
        .send_message(request(Target::Users(api::UserIds {
            users: vec!["demo-bob".into(), "demo-dan".into()],
        })))
        .await
        .expect("accepted for the others")
        .into_inner();
    assert_eq!(reply.inbox_full, ["demo-bob"]);
    // Stored for the others, and for bob only the first.
    let mut cy = Client::login(&node.url(), "demo-cy").await;
    assert_eq!(contents(&cy.fetch_all(100).await.0), ["all"]);
    let mut dan = Client::login(&node.url(), "demo-dan").await;
    assert_eq!(contents(&dan.fetch_all(100).await.0), ["by grpc"]);
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    assert_eq!(contents(&bob.fetch_all(100).await.0), ["first"]);
    node.shutdown().await;
}

/// Connects and authenticates as `user` of app `app`, in ack mode.
async fn login_app(url: &str, app: &str, user: &str) -> Result<Client, Value> {
    let mut c = Client::connect(url).await;
    let reply = c
        .auth(json!({"appId": app, "userId": user, "token": "", "acks": true}))
        .await;
    if reply["data"]["isAuthenticated"] == true {
        Ok(c)
    } else {
        Err(reply)
    }
}

/// Two apps, one with its own quotas (`[[apps]]` `quotas`): each inbox
/// holds what its app allows, and each app's connection limit is its own;
/// what the app does not set is the `[quotas]` value.
#[tokio::test]
async fn an_app_with_its_own_quotas_is_held_to_them_and_the_others_to_the_global_ones() {
    let node = TestNode::start_with(
        |c| {
            c.quotas.inbox_max_messages = 2;
            c.quotas.app_max_connections = 0;
            c.apps = vec![
                switchboard_config::AppConfig::demo(),
                switchboard_config::AppConfig {
                    name: "big".into(),
                    app_id: "big".into(),
                    master_user_id: "big-0".into(),
                    quotas: switchboard_config::AppQuotas {
                        inbox_max_messages: Some(4),
                        app_max_connections: Some(2),
                        ..Default::default()
                    },
                    ..switchboard_config::AppConfig::demo()
                },
            ];
        },
        Default::default(),
    )
    .await;
    let url = node.url();
    // How many RELIABLE messages an inbox takes before INBOX_FULL.
    async fn taken(sender: &mut Client, to: &str) -> usize {
        for i in 0..10 {
            let reply = send_reliable(sender, to, &format!("m{i}"), &format!("{to}-{i}")).await;
            if reply["type"] != "MESSAGE_ACCEPTED" {
                assert_eq!(reply["data"]["code"], "INBOX_FULL", "{reply}");
                return i;
            }
        }
        10
    }
    let mut ann = login_app(&url, "demo", "demo-ann").await.expect("demo");
    let mut big_ann = login_app(&url, "big", "big-ann").await.expect("big");
    assert_eq!(taken(&mut ann, "demo-bob").await, 2, "the global quota");
    assert_eq!(taken(&mut big_ann, "big-bob").await, 4, "the app's own");
    // Connections: big holds two (ann and this one); demo has no limit.
    let _second = login_app(&url, "big", "big-cy")
        .await
        .expect("big's second");
    let refused = login_app(&url, "big", "big-dan")
        .await
        .err()
        .expect("a third connection of big is refused");
    assert!(
        refused["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("maximum of 2 connections")),
        "{refused}"
    );
    for user in ["demo-cy", "demo-dan", "demo-eve"] {
        login_app(&url, "demo", user)
            .await
            .expect("demo has no limit");
    }
    node.shutdown().await;
}

/// A fetched page larger than the connection's send-queue bound is cut
/// to what fits, not dropped: the client is told how many are left, stays
/// connected, and the next FETCH goes on where the page stopped. (Before,
/// the page overflowed the queue, the connection was closed as a slow
/// consumer, the page's tail never came and FETCH_MISSING_MESSAGES_COMPLETE
/// still said nothing was left.)
#[tokio::test]
async fn a_fetched_page_larger_than_the_send_queue_comes_whole_over_several_fetches() {
    let node = TestNode::start_with(
        |c| {
            c.limits.send_queue_bytes = 65_536;
            c.limits.messages_per_second = 100_000;
        },
        Default::default(),
    )
    .await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let body = "z".repeat(16_000);
    let mut sent = Vec::new();
    for i in 0..20 {
        let content = format!("{i}-{body}");
        let reply = send_reliable(&mut ann, "demo-bob", &content, &format!("p{i}")).await;
        assert_eq!(reply["type"], "MESSAGE_ACCEPTED", "{reply}");
        sent.push(i.to_string());
    }
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, lefts) = bob.fetch_all(1000).await;
    let label = |c: &String| c.split('-').next().unwrap_or_default().to_owned();
    let fetched: Vec<String> = contents(&frames).iter().map(label).collect();
    assert_eq!(fetched, sent);
    assert!(lefts.len() > 1, "one page held 320 KB: {lefts:?}");
    assert!(lefts[0] > 0, "{lefts:?}");
    // Still connected: nothing is left, and the connection answers.
    let (frames, lefts) = bob.fetch_all(1000).await;
    assert!(contents(&frames).is_empty());
    assert_eq!(lefts, [0]);
    node.shutdown().await;
}

/// An app's connections on one gateway are capped: one more is refused at
/// AUTH_CLIENT with a reason, and a closed one makes room.
#[tokio::test]
async fn an_app_holds_at_most_its_connection_limit() {
    let node = TestNode::start_with(|c| c.quotas.app_max_connections = 2, Default::default()).await;
    let first = Client::login(&node.url(), "demo-ann").await;
    let _second = Client::login(&node.url(), "demo-bob").await;
    let mut third = Client::connect(&node.url()).await;
    let reply = third
        .auth(json!({"appId": "demo", "userId": "demo-cy", "token": ""}))
        .await;
    assert_eq!(reply["data"]["isAuthenticated"], false, "{reply}");
    assert!(
        reply["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("maximum of 2 connections")),
        "{reply}"
    );
    first.close().await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut again = Client::connect(&node.url()).await;
        let reply = again
            .auth(json!({"appId": "demo", "userId": "demo-cy", "token": ""}))
            .await;
        if reply["data"]["isAuthenticated"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed connection never made room: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop (also
/// when the test fails).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (a recorded skip) where mounting is not permitted; under
    /// `CI=true` that is a failure.
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            other => {
                let why = format!("cannot mount a tmpfs (needs root): {other:?}");
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{why}");
                }
                switchboard_testenv::record_skip(&why);
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let status = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            // Something still holds it: detach it now, freed when released.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Below the disk floor RELIABLE messages are refused with UNAVAILABLE
/// (the sender may retry) while FAST ones flow; with space back RELIABLE is
/// accepted again, and every message accepted before is delivered after a
/// kill -9 and a restart.
#[tokio::test]
async fn a_full_disk_refuses_reliable_cleanly_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount("64m") else {
        return;
    };
    let data = disk.path().join("data");
    let env = [
        ("SWITCHBOARD_QUOTAS__DISK_MIN_FREE_BYTES", "16777216"),
        ("SWITCHBOARD_QUOTAS__DISK_MIN_FREE_PERCENT", "0"),
        ("SWITCHBOARD_QUOTAS__DISK_CHECK_INTERVAL", "100ms"),
        // A small hot log: its segments fit the small disk.
        ("SWITCHBOARD_STORE__HOT_MIB", "4"),
    ];
    let mut node = ProcessNode::start_with_env(&data, &env).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let mut accepted: Vec<String> = Vec::new();
    for i in 0..5 {
        let content = format!("before-{i}");
        let reply = send_reliable(&mut ann, "demo-bob", &content, &format!("b{i}")).await;
        assert_eq!(reply["type"], "MESSAGE_ACCEPTED", "{reply}");
        accepted.push(content);
    }
    // Fill the disk to below the floor (8 MiB left of 64).
    let filler = disk.path().join("filler");
    let fill = disk.free_bytes().saturating_sub(8 * 1024 * 1024);
    std::fs::write(&filler, vec![0u8; fill as usize]).expect("fill the disk");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let content = format!("during-{attempt}");
        let reply = send_reliable(&mut ann, "demo-bob", &content, &format!("d{attempt}")).await;
        if reply["type"] == "MESSAGE_ACCEPTED" {
            // Taken before the node read the new free space: it is kept.
            accepted.push(content);
        } else {
            assert_eq!(reply["data"]["code"], "UNAVAILABLE", "{reply}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RELIABLE was still accepted with the disk below its floor"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still refused, and FAST flows to a connected user.
    let reply = send_reliable(&mut ann, "demo-bob", "refused", "d-again").await;
    assert_eq!(reply["data"]["code"], "UNAVAILABLE", "{reply}");
    ann.message("demo-carl", "fast while full", "FAST", "f1")
        .await;
    let got = carl.recv_type("MESSAGE").await;
    assert_eq!(got["data"]["content"], "fast while full");
    // Space back: RELIABLE is accepted again.
    std::fs::remove_file(&filler).expect("free the disk");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        attempt += 1;
        let content = format!("after-{attempt}");
        let reply = send_reliable(&mut ann, "demo-bob", &content, &format!("a{attempt}")).await;
        if reply["type"] == "MESSAGE_ACCEPTED" {
            accepted.push(content);
            break;
        }
        assert_eq!(reply["data"]["code"], "UNAVAILABLE", "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "RELIABLE was still refused with space back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing accepted is lost, across a crash.
    node.kill9();
    drop(node);
    let node = ProcessNode::start_with_env(&data, &env).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(100).await;
    assert_eq!(contents(&frames), accepted);
    drop(bob);
    drop(node);
}

/// With no floor, a disk that fills up under the store: a RELIABLE write
/// that fails for want of space is refused to its sender (UNAVAILABLE), the
/// process stays up, FAST flows, and once space is back the store takes
/// writes again; every accepted message survives a kill -9.
///
/// The bound on a fetched page (half the send queue) is what made this
/// test lose the tail of its one FETCH of ~8 MB before.
#[tokio::test]
async fn a_write_failing_with_no_space_is_refused_and_the_store_recovers() {
    let Some(disk) = SmallDisk::mount("64m") else {
        return;
    };
    let data = disk.path().join("data");
    let env = [
        ("SWITCHBOARD_QUOTAS__DISK_MIN_FREE_BYTES", "0"),
        ("SWITCHBOARD_QUOTAS__DISK_MIN_FREE_PERCENT", "0"),
        ("SWITCHBOARD_QUOTAS__DISK_CHECK_INTERVAL", "100ms"),
        ("SWITCHBOARD_STORE__HOT_MIB", "4"),
        // The log's segments are preallocated: filling the rest of one
        // takes a few hundred of the largest messages, sent back to back.
        ("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "100000"),
    ];
    let mut node = ProcessNode::start_with_env(&data, &env).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let mut accepted: Vec<String> = Vec::new();
    let reply = send_reliable(&mut ann, "demo-bob", "before", "b0").await;
    assert_eq!(reply["type"], "MESSAGE_ACCEPTED", "{reply}");
    accepted.push("before".into());
    // Fill every byte left.
    let filler = disk.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; disk.free_bytes() as usize]);
    let mut tail = std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .expect("open the filler");
    while std::io::Write::write_all(&mut tail, &[0u8; 4096]).is_ok() {}
    drop(tail);
    // Messages of 16 KB until one is refused: the store's next write fails.
    let content = "y".repeat(16_000);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let text = format!("{attempt}-{content}");
        let reply = send_reliable(&mut ann, "demo-bob", &text, &format!("f{attempt}")).await;
        if reply["type"] == "MESSAGE_ACCEPTED" {
            accepted.push(text);
        } else {
            assert_eq!(reply["data"]["code"], "UNAVAILABLE", "{reply}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write failed on a full disk"
        );
    }
    ann.message("demo-carl", "fast on a full disk", "FAST", "f1")
        .await;
    assert_eq!(
        carl.recv_type("MESSAGE").await["data"]["content"],
        "fast on a full disk"
    );
    std::fs::remove_file(&filler).expect("free the disk");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        attempt += 1;
        let text = format!("after-{attempt}");
        let reply = send_reliable(&mut ann, "demo-bob", &text, &format!("a{attempt}")).await;
        if reply["type"] == "MESSAGE_ACCEPTED" {
            accepted.push(text);
            break;
        }
        assert_eq!(reply["data"]["code"], "UNAVAILABLE", "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never took writes again with space back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill9();
    drop(node);
    let node = ProcessNode::start_with_env(&data, &env).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(1000).await;
    // Compared by their labels (the text before the first '-').
    let label = |c: &String| c.split('-').next().unwrap_or_default().to_owned();
    let fetched: Vec<String> = contents(&frames).iter().map(label).collect();
    let expected: Vec<String> = accepted.iter().map(label).collect();
    assert_eq!(fetched, expected);
    drop(bob);
    drop(node);
}
