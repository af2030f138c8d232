//! The web UI (docs/ui.md) in a real browser: headless Chromium driven by
//! Playwright (`tests/ui/run.mjs`, one scenario per test) against a running
//! Switchboard. `scripts/test.sh` installs Debian's `chromium` and the
//! pinned `playwright-core` (`npm ci` in `tests/ui`); without them a test is
//! skipped with its reason, and fails under `CI=true`. Every scenario saves
//! a screenshot of each page under `target/ui-screenshots/`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use support::TestNode;
use support::cluster::{Cluster, Infra, PROTOCOL_SHAPE};
use switchboard::RemoteRoles;
use switchboard_config::{ApiKeyConfig, ApiScope, AppConfig, Config};

const ADMIN_KEY: &str = "sbk_test_console_admin_0123456789";
const SEND_KEY: &str = "sbk_test_console_send_0123456789";
const JAEGER: &str = "http://jaeger.example:16686";
/// A whole scenario, browser start included; a step waits 15 s at most.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Node, Playwright and Chromium, when all are there.
fn browser() -> Option<PathBuf> {
    let chromium = std::env::var("SWITCHBOARD_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let playwright = workspace().join("tests/ui/node_modules/playwright-core/package.json");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = if !node {
        Some("node is not installed".to_owned())
    } else if !playwright.exists() {
        Some("playwright-core is not installed (npm ci in tests/ui)".to_owned())
    } else if !Path::new(&chromium).exists() {
        Some(format!("{chromium} is not installed"))
    } else {
        None
    };
    match missing {
        None => Some(workspace().join("tests/ui/run.mjs")),
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{why} (CI=true): scripts/test.sh installs it")
        }
        Some(why) => {
            switchboard_testenv::record_skip(&format!("{why}; scripts/test.sh installs it"));
            None
        }
    }
}

/// A running scenario of `run.mjs` against `base`.
struct Run {
    name: String,
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Run {
    fn start(script: &Path, name: &str, base: &str, options: Value) -> Run {
        std::fs::create_dir_all(shots()).expect("screenshot dir");
        let mut child = tokio::process::Command::new("node")
            .arg(script)
            .args([name, base])
            .arg(shots())
            .arg(options.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let stdout = child.stdout.take().expect("piped");
        Run {
            name: name.to_owned(),
            child,
            stdout: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        }
    }

    /// Waits until the scenario hands over at `label` (`PAUSE label`).
    async fn paused(&mut self, label: &str) {
        let line = tokio::time::timeout(SCENARIO_TIMEOUT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("scenario {} did not reach {label}", self.name));
        match line.expect("stdout") {
            Some(l) if l == format!("PAUSE {label}") => {}
            other => {
                let rest = self.finish_output().await;
                panic!(
                    "scenario {}: expected PAUSE {label}, got {other:?}\n{rest}",
                    self.name
                )
            }
        }
    }

    /// Lets the scenario go on after [`Run::paused`].
    async fn resume(&mut self) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin.write_all(b"go\n").await.expect("write to node");
        stdin.flush().await.expect("flush");
    }

    async fn finish_output(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err),
            )
            .await;
        }
        err
    }

    /// Waits for the end; fails with the step that failed and the page
    /// errors. Returns the scenario's report.
    async fn finish(mut self) -> Value {
        let mut last = String::from("{}");
        let status = tokio::time::timeout(SCENARIO_TIMEOUT, async {
            while let Ok(Some(line)) = self.stdout.next_line().await {
                last = line;
            }
            self.child.wait().await
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "scenario {} did not end within {SCENARIO_TIMEOUT:?}",
                self.name
            )
        })
        .expect("node ran");
        let stderr = self.finish_output().await;
        assert!(
            status.success(),
            "scenario {}: {stderr}\n(screenshots in {})",
            self.name,
            shots().display()
        );
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("report {last:?}: {e}"))
    }
}

fn shots() -> PathBuf {
    workspace().join("target/ui-screenshots")
}

/// Runs one scenario of `run.mjs` against `base` and returns its report.
async fn scenario(script: &Path, name: &str, base: &str, options: Value) -> Value {
    Run::start(script, name, base, options).finish().await
}

fn base_of(node: &TestNode) -> String {
    format!("http://{}", node.client_addr)
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The demo app with an admin key and a send key; the console on for it.
fn with_console(c: &mut Config) {
    let key = |name: &str, secret: &str, scope| ApiKeyConfig {
        name: name.into(),
        sha256: sha256_hex(secret),
        scopes: vec![scope],
    };
    c.apps = vec![AppConfig {
        api_keys: vec![
            key("ops", ADMIN_KEY, ApiScope::Admin),
            key("backend", SEND_KEY, ApiScope::Send),
        ],
        ..AppConfig::demo()
    }];
    c.ui.console = true;
    c.ui.console_app = "demo".into();
    c.ui.jaeger_url = JAEGER.into();
}

#[tokio::test]
async fn two_users_exchange_a_reliable_message_and_a_second_tab_shows_it() {
    let Some(script) = browser() else { return };
    let node = TestNode::start().await;
    let report = scenario(&script, "direct", &base_of(&node), json!({})).await;
    // What docs/ui.md quotes: the page's own clock, first load, empty cache.
    println!("measured: {report}");
    assert!(
        report["firstLoadBytes"].as_u64().is_some_and(|b| b > 0),
        "{report}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_user_who_signs_in_later_sees_the_missed_message() {
    let Some(script) = browser() else { return };
    let node = TestNode::start_with(with_console, RemoteRoles::default()).await;
    let base = base_of(&node);
    scenario(&script, "missed", &base, json!({})).await;
    // The page runs in the acknowledged mode: what it was shown is
    // ACKed, the message dan fetched and the MESSAGE_CONFIRMATION ann got
    // alike, so neither inbox keeps anything to send again.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for user in ["demo-dan", "demo-ann"] {
        loop {
            let res = http
                .get(format!("{base}/v1/apps/demo/users/{user}/inbox"))
                .bearer_auth(ADMIN_KEY)
                .send()
                .await
                .expect("answer");
            let body: Value = res.json().await.expect("json");
            if body["depth"] == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}'s inbox still holds what the page was shown: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_group_a_room_an_anonymous_guest_and_a_topic_at_phone_width() {
    let Some(script) = browser() else { return };
    // Rooms open to anonymous members, as an app may allow.
    let node = TestNode::start_with(
        |c| {
            c.apps = vec![AppConfig {
                anonymous_rooms: true,
                ..AppConfig::demo()
            }]
        },
        RemoteRoles::default(),
    )
    .await;
    scenario(&script, "channels", &base_of(&node), json!({"phone": true})).await;
    node.shutdown().await;
}

#[tokio::test]
async fn the_pages_reconnect_when_the_server_comes_back() {
    let Some(script) = browser() else { return };
    let node = TestNode::start().await;
    let addr = node.client_addr;
    let mut run = Run::start(&script, "reconnect", &base_of(&node), json!({}));
    run.paused("stop").await;
    // Every socket is closed with 1001 (going away).
    node.shutdown().await;
    run.resume().await;
    run.paused("start").await;
    let node = TestNode::start_with(|c| c.client_addr = addr, RemoteRoles::default()).await;
    run.resume().await;
    run.finish().await;
    node.shutdown().await;
}

#[tokio::test]
async fn the_console_lists_the_processes_of_a_local_cluster() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let Some(script) = browser() else { return };
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, with_console).await;
    let members: Vec<String> = cluster
        .procs
        .iter()
        .map(|p| p.node_id().to_owned())
        .collect();
    let gw = cluster.proc("gw1").client_addr.expect("a gateway");
    scenario(
        &script,
        "console",
        &format!("http://{gw}"),
        json!({"key": ADMIN_KEY, "members": members, "jaeger": JAEGER}),
    )
    .await;
    cluster.shutdown().await;
}

/// Without a browser: the headers every page carries, and who may read the
/// admin API.
#[tokio::test]
async fn pages_have_a_strict_csp_and_the_admin_api_needs_an_admin_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let node = TestNode::start_with(with_console, RemoteRoles::default()).await;
    let base = base_of(&node);
    for path in ["/", "/console", "/ui/chat.js", "/ui/style.css"] {
        let res = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("answer");
        assert_eq!(res.status(), 200, "{path}");
        let csp = res.headers()["content-security-policy"]
            .to_str()
            .expect("csp");
        assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
    }
    let get = |key: Option<&str>| {
        let mut req = http.get(format!("{base}/v1/admin/node"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let res = get(None).await.expect("answer");
    assert_eq!(res.status(), 401);
    let res = get(Some(SEND_KEY)).await.expect("answer");
    assert_eq!(res.status(), 403);
    let res = get(Some(ADMIN_KEY)).await.expect("answer");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["domain"], "local", "{body}");
    assert_eq!(body["jaegerUrl"], JAEGER, "{body}");
    assert_eq!(body["traceService"], "switchboard-all", "{body}");
    node.shutdown().await;

    // Off unless configured: no console, no admin API; the chat stays.
    let plain = TestNode::start().await;
    let base = base_of(&plain);
    for (path, status) in [("/console", 404), ("/v1/admin/node", 404), ("/", 200)] {
        let res = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("answer");
        assert_eq!(res.status(), status, "{path}");
    }
    plain.shutdown().await;
}

/// Without a browser: the console's federation view, from the topology in
/// etcd and the link states the domains publish, while the one neighbour
/// is not running.
#[tokio::test]
async fn the_admin_api_shows_the_federation_and_a_link_down() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = switchboard_mesh::new_message_id().replace('-', "");
    let prefix = format!("/sbtest-ui/{tag}/");
    let fed = |_: u8| format!("127.0.0.1:{}", support::free_port());
    let (d1_fed, d2_fed) = (fed(1), fed(2));
    let topology = format!(
        "domains:\n  - {{name: d1, federation: 'http://{d1_fed}', client: 'ws://127.0.0.1:1/ws'}}\n  \
         - {{name: d2, federation: 'http://{d2_fed}', client: 'ws://127.0.0.1:2/ws'}}\n\
         domainLinks:\n  - {{n1: d1, n2: d2, weight: 3}}\n\
         clientApps:\n  - appName: ANZ\n    appId: anz\n    masterUserId: ANZ-0\n    authEnabled: false\n    \
         userDistributions:\n      - {{domainName: d1, from: 0, to: 999}}\n      - {{domainName: d2, from: 1000}}\n"
    );
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, topology).expect("write topology");
    let (ok, out) = support::switchboard_cli(&[
        "topology",
        "apply",
        &path.to_string_lossy(),
        "--etcd",
        &etcd,
        "--prefix",
        &prefix,
    ]);
    assert!(ok, "topology apply: {out}");
    let node = TestNode::start_with(
        |c| {
            with_console(c);
            c.domain = "d1".into();
            c.etcd = vec![etcd.clone()];
            c.discovery.key_prefix = format!("/sbtest-ui-d/{tag}/");
            c.federation.addr = d1_fed.clone();
            c.federation.secret = "ui-test-link".into();
            c.federation.prefix = prefix.clone();
        },
        RemoteRoles::default(),
    )
    .await;
    let http = reqwest::Client::new();
    let base = base_of(&node);
    let read = |path: &'static str| {
        let req = http.get(format!("{base}{path}")).bearer_auth(ADMIN_KEY);
        async move {
            let res = req.send().await.expect("answer");
            assert_eq!(res.status(), 200, "{path}");
            res.json::<Value>().await.expect("json")
        }
    };
    // d1 finds d2 unreachable and publishes the link down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = read("/v1/admin/federation").await;
        if view["links"][0]["state"] == "down" {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link is not shown down: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view["enabled"], true, "{view}");
    let names: Vec<&str> = view["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["d1", "d2"], "{view}");
    assert_eq!(
        (
            &view["links"][0]["a"],
            &view["links"][0]["b"],
            &view["links"][0]["weight"]
        ),
        (&json!("d1"), &json!("d2"), &json!(3)),
        "{view}"
    );
    // This process's own gauge of the link, with its outbox.
    let stats = read("/v1/admin/stats").await;
    let link = stats["links"]
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["peer"] == "d2")
        .cloned()
        .unwrap_or_else(|| panic!("no link to d2 in {stats}"));
    assert_eq!(link["up"], false, "{stats}");
    assert_eq!(link["outboxDepth"], 0.0, "{stats}");
    let cluster = read("/v1/admin/cluster").await;
    assert_eq!(cluster["discovery"], true, "{cluster}");
    assert_eq!(cluster["members"][0]["this"], true, "{cluster}");
    node.shutdown().await;
}

#[test]
fn the_console_needs_its_app_and_jaeger_an_http_url() {
    let env = Default::default();
    let err = Config::from_toml_and_env("[ui]\nconsole = true\n", &env).expect_err("no app");
    assert!(err.to_string().contains("ui.console_app"), "{err}");
    let err = Config::from_toml_and_env("[ui]\njaeger_url = \"jaeger:16686\"\n", &env)
        .expect_err("not a URL");
    assert!(err.to_string().contains("ui.jaeger_url"), "{err}");
    let on = "[ui]\nconsole = true\nconsole_app = \"ops\"\n";
    let config = Config::from_toml_and_env(on, &env).expect("valid");
    assert!(config.ui.console && config.ui.chat);
    let env = [("SWITCHBOARD_UI__CHAT".to_owned(), "false".to_owned())].into();
    let config = Config::from_toml_and_env("", &env).expect("valid");
    assert!(!config.ui.chat);
}
