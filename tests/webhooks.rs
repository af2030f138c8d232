//! Push webhooks against the real binary: a receiver inside the test that
//! verifies every Standard Webhooks signature, fails when told to, and
//! records what it got.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{Client, ProcessNode};
use tokio::sync::Mutex;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Receiver {
    /// Requests still to fail (500) before any succeeds.
    fail_next: AtomicUsize,
    /// Refuse every request (503) while set.
    down: AtomicBool,
    attempts: AtomicUsize,
    unsigned: AtomicUsize,
    /// (webhook-id, body) of every accepted request, in arrival order.
    got: Mutex<Vec<(String, Value)>>,
}

async fn hook(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> http::StatusCode {
    r.attempts.fetch_add(1, Ordering::SeqCst);
    let signer = standardwebhooks::Webhook::new(SECRET).expect("secret");
    if signer.verify(&body, &headers).is_err() {
        r.unsigned.fetch_add(1, Ordering::SeqCst);
        return http::StatusCode::UNAUTHORIZED;
    }
    if r.down.load(Ordering::SeqCst) {
        return http::StatusCode::SERVICE_UNAVAILABLE;
    }
    if r.fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return http::StatusCode::INTERNAL_SERVER_ERROR;
    }
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    r.got.lock().await.push((id, body));
    http::StatusCode::NO_CONTENT
}

async fn receiver() -> (Arc<Receiver>, SocketAddr) {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (r, addr)
}

/// A config file giving the demo app a webhook at `addr`.
fn config(dir: &std::path::Path, addr: SocketAddr, retry_for: &str) -> String {
    let path = dir.join("webhooks.toml");
    std::fs::write(
        &path,
        format!(
            "[webhooks]\nretry_for = \"{retry_for}\"\nbackoff_min = \"50ms\"\ntimeout = \"2s\"\n\
             [[webhooks.apps]]\napp_id = \"demo\"\nurl = \"http://{addr}/hook\"\nsecret = \"{SECRET}\"\npreview_chars = 5\n"
        ),
    )
    .expect("write config");
    path.to_string_lossy().into_owned()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 30 s: {what}");
}

#[tokio::test]
async fn offline_users_are_pushed_signed_retried_and_nothing_is_lost_to_a_kill9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, addr) = receiver().await;
    r.fail_next.store(3, Ordering::SeqCst);
    let cfg = config(dir.path(), addr, "1h");
    let env = [("SWITCHBOARD_CONFIG", cfg.as_str())];
    let data = dir.path().join("data");
    let mut node = ProcessNode::start_with_env(&data, &env).await;

    // bob has nobody connected: an event, after three failed attempts.
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let id = ann.send_accepted("demo-bob", "hello world", "r1").await;
    wait_for("the first event", async || r.got.lock().await.len() == 1).await;
    let (event_id, event) = r.got.lock().await[0].clone();
    assert!(event_id.starts_with("evt_"), "{event_id}");
    assert_eq!(event["type"], "message.offline", "{event}");
    let data_of = &event["data"];
    assert_eq!(data_of["appId"], "demo");
    assert_eq!(data_of["userId"], "demo-bob");
    assert_eq!(data_of["from"], "demo-ann");
    assert_eq!(data_of["messageId"], id.as_str());
    assert_eq!(data_of["kind"], "direct");
    assert_eq!(data_of["preview"], "hello");
    assert!(
        r.attempts.load(Ordering::SeqCst) >= 4,
        "three failures, then success"
    );

    // A connected recipient: no event.
    let mut carol = Client::login(&node.url(), "demo-carol").await;
    ann.send_accepted("demo-carol", "you are here", "r2").await;
    carol.recv_type("MESSAGE").await;

    // The receiver is down while five more are written for bob; the
    // server is killed with them in its outbox and comes back.
    r.down.store(true, Ordering::SeqCst);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            ann.send_accepted("demo-bob", &format!("m{i}"), &format!("k{i}"))
                .await,
        );
    }
    node.kill9();
    r.down.store(false, Ordering::SeqCst);
    let node = ProcessNode::start_with_env(&data, &env).await;
    wait_for("the five events after the restart", async || {
        r.got.lock().await.len() >= 6
    })
    .await;
    let got = r.got.lock().await.clone();
    let after: Vec<&str> = got[1..]
        .iter()
        .filter_map(|(_, e)| e["data"]["messageId"].as_str())
        .collect();
    // At least once, in the outbox's order; a repeat carries the same
    // webhook-id.
    let mut distinct: Vec<&str> = Vec::new();
    for m in &after {
        if !distinct.contains(m) {
            distinct.push(m);
        }
    }
    assert_eq!(distinct, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        got.iter().all(|(_, e)| e["data"]["userId"] == "demo-bob"),
        "only bob was offline"
    );
    assert_eq!(r.unsigned.load(Ordering::SeqCst), 0, "every request signed");
    drop(node);
}

#[tokio::test]
async fn an_event_failing_for_its_whole_retry_period_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, addr) = receiver().await;
    r.fail_next.store(usize::MAX, Ordering::SeqCst);
    let cfg = config(dir.path(), addr, "1s");
    let node =
        ProcessNode::start_with_env(&dir.path().join("data"), &[("SWITCHBOARD_CONFIG", &cfg)])
            .await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.send_accepted("demo-bob", "nobody hears", "r1").await;
    wait_for("the event in the dead letters", async || {
        let Some((200, _, text)) = support::http_get_text(node.client_addr, "/metrics").await
        else {
            return false;
        };
        text.lines().any(|l| {
            l.starts_with("switchboard_webhooks_dead_lettered_total")
                && l.contains("app=\"demo\"")
                && l.ends_with(" 1")
        })
    })
    .await;
    assert!(r.attempts.load(Ordering::SeqCst) >= 2, "retried first");
    assert!(r.got.lock().await.is_empty());
}

/// The receiver at a given port (to come back where it was unreachable).
async fn receiver_at(port: u16) -> Arc<Receiver> {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the receiver's port");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    r
}

async fn cli(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::switchboard_cli(&args)
    })
    .await
    .expect("the command ran")
}

/// An unreachable URL: the event is dead-lettered after the (short) retry
/// period; `switchboard apps webhooks dead-letters` lists it; the receiver
/// comes back, and `--replay` delivers it, signed, with its webhook-id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_through_the_admin_api() {
    use sha2::Digest;
    const ADMIN_KEY: &str = "sbk_webhooks_admin_0123456789";
    let dir = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = config(dir.path(), addr, "1s");
    let hash: String = sha2::Sha256::digest(ADMIN_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut text = std::fs::read_to_string(&cfg).expect("read config");
    text.push_str(&format!(
        "[[apps]]\nname = \"demo\"\napp_id = \"demo\"\nmaster_user_id = \"demo-0\"\nauth = \"none\"\n\
         api_keys = [{{ name = \"ops\", sha256 = \"{hash}\", scopes = [\"admin\"] }}]\n"
    ));
    std::fs::write(&cfg, text).expect("write config");
    let node =
        ProcessNode::start_with_env(&dir.path().join("data"), &[("SWITCHBOARD_CONFIG", &cfg)])
            .await;
    let url = format!("http://{}", node.client_addr);
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let message_id = ann.send_accepted("demo-bob", "nobody hears", "r1").await;

    let list = [
        "apps",
        "webhooks",
        "dead-letters",
        "--url",
        &url,
        "--key",
        ADMIN_KEY,
        "--app",
        "demo",
    ];
    let mut listed = String::new();
    wait_for("the event in the dead letters", async || {
        let (ok, out) = cli(&list).await;
        assert!(ok, "{out}");
        listed = out;
        listed.contains("1 listed; 1 dead letters")
    })
    .await;
    assert!(
        listed.contains(&message_id),
        "the event names the message: {listed}"
    );
    let webhook_id = listed
        .lines()
        .next()
        .and_then(|l| l.split('\t').nth(1))
        .expect("a line per dead letter")
        .to_owned();

    // Wrong keys are refused; nothing is replayed without a receiver.
    let (ok, out) = cli(&[
        "apps",
        "webhooks",
        "dead-letters",
        "--url",
        &url,
        "--key",
        "nope",
        "--app",
        "demo",
    ])
    .await;
    assert!(!ok && out.contains("NOT_AUTHENTICATED"), "{out}");

    // The receiver comes back; the replay delivers the event signed.
    let r = receiver_at(port).await;
    let mut replay = list.to_vec();
    replay.push("--replay");
    let (ok, out) = cli(&replay).await;
    assert!(ok, "{out}");
    assert!(out.contains("replayed 1; 0 dead letters left"), "{out}");
    wait_for("the replayed event", async || {
        !r.got.lock().await.is_empty()
    })
    .await;
    let got = r.got.lock().await.clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, webhook_id, "the same webhook-id");
    assert_eq!(got[0].1["data"]["messageId"], message_id.as_str());
    assert_eq!(r.unsigned.load(Ordering::SeqCst), 0, "signed");
    let (ok, out) = cli(&list).await;
    assert!(ok && out.contains("0 listed; 0 dead letters"), "{out}");
    drop(node);
}

/// In a cluster the dead letters live with the delivery process's store:
/// a gateway's admin endpoints reach them over the mesh
/// (`WebhookAdmin/DeadLetters`), list them, and replay them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_in_a_cluster_are_reached_from_any_gateway() {
    use sha2::Digest;
    const ADMIN_KEY: &str = "sbk_webhooks_admin_cluster_0123456789";
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let port = support::free_port();
    let cluster = support::cluster::Cluster::start(infra, support::cluster::PROTOCOL_SHAPE, |c| {
        c.apps = vec![switchboard_config::AppConfig {
            api_keys: vec![switchboard_config::ApiKeyConfig {
                name: "ops".into(),
                sha256: sha2::Sha256::digest(ADMIN_KEY.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                scopes: vec![switchboard_config::ApiScope::Admin],
            }],
            ..switchboard_config::AppConfig::demo()
        }];
        c.webhooks.retry_for = Duration::from_secs(1);
        c.webhooks.backoff_min = Duration::from_millis(50);
        c.webhooks.timeout = Duration::from_secs(2);
        c.webhooks.apps = vec![switchboard_config::AppWebhook {
            app_id: "demo".into(),
            url: format!("http://127.0.0.1:{port}/hook"),
            secret: SECRET.into(),
            events: Vec::new(),
            preview_chars: 0,
        }];
    })
    .await;
    let mut ann = Client::login_with(&cluster.proc("gw1").url(), "demo-ann", true).await;
    let message_id = ann.send_accepted("demo-bob", "nobody hears", "r1").await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let base = |gw: &str| {
        let addr = cluster.proc(gw).client_addr.expect("a gateway");
        format!("http://{addr}/v1/apps/demo/webhooks/dead-letters")
    };
    let mut listed = Value::Null;
    wait_for("the event in the dead letters, seen from gw2", async || {
        let res = http
            .get(base("gw2"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("gw2 answers");
        assert_eq!(res.status(), 200);
        listed = res.json().await.expect("JSON");
        listed["depth"] == 1
    })
    .await;
    assert_eq!(
        listed["deadLetters"][0]["event"]["data"]["messageId"],
        message_id.as_str(),
        "{listed}"
    );
    let r = receiver_at(port).await;
    let replayed: Value = http
        .post(format!("{}/replay", base("gw1")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("gw1 answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(replayed["depth"], 0, "{replayed}");
    wait_for("the replayed event", async || {
        !r.got.lock().await.is_empty()
    })
    .await;
    let got = r.got.lock().await.clone();
    assert_eq!(
        got[0].0,
        listed["deadLetters"][0]["webhookId"]
            .as_str()
            .unwrap_or_default()
    );
    assert_eq!(r.unsigned.load(Ordering::SeqCst), 0);
    cluster.shutdown().await;
}
