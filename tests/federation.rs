//! Federation with real processes: four domains in a ring 1–2–3–4–1, each a
//! `switchboard run` with its own store and ports, one etcd (the one
//! `scripts/test.sh` starts) holding the topology under a prefix of the
//! test's own. Users are homed by id range: ANZ-0…999 in d1, 1000…1999 in
//! d2, 2000…2999 in d3, 3000… in d4.
//!
//! The tests share the machine's two cores with the rest of the suite, so
//! they run one at a time (each starts four servers).

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, free_port};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

const SECRET: &str = "ring-secret";
const APP: &str = "app-id-343";

/// One test at a time: each runs four servers.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// One domain: a `switchboard run` process.
struct Domain {
    name: String,
    client: SocketAddr,
    mesh: SocketAddr,
    federation: SocketAddr,
    data_dir: PathBuf,
    child: Option<Child>,
}

impl Domain {
    fn url(&self) -> String {
        format!("ws://{}/ws", self.client)
    }
}

struct Ring {
    etcd: String,
    prefix: String,
    domains: Vec<Domain>,
    _dir: tempfile::TempDir,
    /// Weights of the links 1-2, 2-3, 3-4, 4-1.
    weights: [u32; 4],
    /// What the topology names as each domain's federation endpoint (a
    /// proxy in front of the domain, when the test puts one there).
    federation_urls: Vec<String>,
    /// OTLP endpoint every domain exports its spans to.
    otlp: Option<String>,
    /// Mutual TLS between domains: `<dir>/dN.crt`, `dN.key`, `ca.crt`.
    tls: Option<PathBuf>,
    /// A secret per link ([`link_secret`]) instead of one shared secret.
    link_secrets: bool,
    /// More `SWITCHBOARD_*` settings for every domain.
    extra_env: Vec<(String, String)>,
}

/// The secret of the link between two domains, in the per-link setup.
fn link_secret(a: &str, b: &str) -> String {
    let (x, y) = if a < b { (a, b) } else { (b, a) };
    format!("link-{x}-{y}")
}

impl Ring {
    /// Starts d1…d4 and applies the ring topology.
    async fn start(etcd: String, weights: [u32; 4]) -> Ring {
        Self::start_traced(etcd, weights, None).await
    }

    async fn start_traced(etcd: String, weights: [u32; 4], otlp: Option<String>) -> Ring {
        Self::start_with(etcd, weights, otlp, None, false).await
    }

    async fn start_with(
        etcd: String,
        weights: [u32; 4],
        otlp: Option<String>,
        tls: Option<PathBuf>,
        link_secrets: bool,
    ) -> Ring {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("/sbtest-ring/{}/", switchboard_testenv::unique());
        let domains: Vec<Domain> = (1..=4)
            .map(|i| Domain {
                name: format!("d{i}"),
                client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                mesh: SocketAddr::from(([127, 0, 0, 1], free_port())),
                federation: SocketAddr::from(([127, 0, 0, 1], free_port())),
                data_dir: dir.path().join(format!("d{i}")),
                child: None,
            })
            .collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let federation_urls = domains
            .iter()
            .map(|d| format!("{scheme}://{}", d.federation))
            .collect();
        let mut ring = Ring {
            etcd,
            prefix,
            domains,
            _dir: dir,
            weights,
            federation_urls,
            otlp,
            tls,
            link_secrets,
            extra_env: Vec::new(),
        };
        ring.apply();
        for i in 0..4 {
            ring.spawn(i);
        }
        for i in 0..4 {
            ring.wait_listening(i).await;
        }
        ring
    }

    fn topology_yaml(&self) -> String {
        let mut y = String::from("domains:\n");
        for (d, fed) in self.domains.iter().zip(&self.federation_urls) {
            y.push_str(&format!(
                "  - {{name: {}, federation: '{fed}', client: '{}'}}\n",
                d.name,
                d.url()
            ));
        }
        let [w12, w23, w34, w41] = self.weights;
        y.push_str(&format!(
            "domainLinks:\n  - {{n1: d1, n2: d2, weight: {w12}}}\n  - {{n1: d2, n2: d3, weight: {w23}}}\n  - {{n1: d3, n2: d4, weight: {w34}}}\n  - {{n1: d4, n2: d1, weight: {w41}}}\n"
        ));
        y.push_str(&format!(
            "clientApps:\n  - appName: ANZ\n    appId: {APP}\n    masterUserId: ANZ-0\n    authEnabled: false\n    userDistributions:\n      - {{domainName: d1, from: 0, to: 999}}\n      - {{domainName: d2, from: 1000, to: 1999}}\n      - {{domainName: d3, from: 2000, to: 2999}}\n      - {{domainName: d4, from: 3000}}\n"
        ));
        y
    }

    /// `switchboard topology ARGS --etcd … --prefix …`.
    fn topology_cli(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["topology"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--etcd", &self.etcd, "--prefix", &self.prefix]);
        support::switchboard_cli(&all)
    }

    /// Writes the topology (weights, endpoints) and applies it.
    fn apply(&self) {
        let path = self._dir.path().join("ring.yaml");
        std::fs::write(&path, self.topology_yaml()).expect("write topology");
        let (ok, out) = self.topology_cli(&["apply", &path.to_string_lossy()]);
        assert!(ok, "topology apply: {out}");
    }

    fn spawn(&mut self, i: usize) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        let secret_args: Vec<String> = if self.link_secrets {
            // The ring's neighbours of dN: d(N-1) and d(N+1).
            let me = self.domains[i].name.clone();
            let peers = [(i + 3) % 4, (i + 1) % 4].map(|j| self.domains[j].name.clone());
            let toml = format!(
                "[federation.peers]\n{} = \"{}\"\n{} = \"{}\"\n",
                peers[0],
                link_secret(&me, &peers[0]),
                peers[1],
                link_secret(&me, &peers[1])
            );
            let path = self._dir.path().join(format!("{me}.toml"));
            std::fs::write(&path, toml).expect("write config");
            vec!["--config".to_owned(), path.to_string_lossy().into_owned()]
        } else {
            vec!["--federation-secret".to_owned(), SECRET.to_owned()]
        };
        let d = &mut self.domains[i];
        if let Some(endpoint) = &self.otlp {
            command.env("SWITCHBOARD_OTLP_ENDPOINT", endpoint);
        }
        if let Some(dir) = &self.tls {
            command
                .env(
                    "SWITCHBOARD_FEDERATION__TLS__CERT",
                    dir.join(format!("{}.crt", d.name)),
                )
                .env(
                    "SWITCHBOARD_FEDERATION__TLS__KEY",
                    dir.join(format!("{}.key", d.name)),
                )
                .env("SWITCHBOARD_FEDERATION__TLS__CA", dir.join("ca.crt"));
        }
        command.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        let child = command
            .args(["run", "--domain", &d.name, "--etcd", &self.etcd])
            .args(["--mesh-secret", "ring-mesh-secret"])
            .args(&secret_args)
            .arg("--client-addr")
            .arg(d.client.to_string())
            .arg("--mesh-addr")
            .arg(d.mesh.to_string())
            .arg("--federation-addr")
            .arg(d.federation.to_string())
            .arg("--data-dir")
            .arg(&d.data_dir)
            .env("SWITCHBOARD_FEDERATION__PREFIX", &self.prefix)
            .env(
                "SWITCHBOARD_DISCOVERY__KEY_PREFIX",
                format!(
                    "{}{}/",
                    self.prefix.replace("/sbtest-ring/", "/sbtest-ring-d/"),
                    d.name
                ),
            )
            .env("SWITCHBOARD_DISCOVERY__LEASE_TTL_SECS", "2")
            // The senders here send hundreds in a few seconds.
            .env("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "5000")
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn switchboard");
        d.child = Some(child);
    }

    async fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let d = &mut self.domains[i];
        while Instant::now() < deadline {
            if let Some(child) = d.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{} exited at start-up: {status}", d.name);
            }
            if let Some((200, _)) = support::http_get(d.client, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} did not get ready", d.name);
    }

    /// A graceful stop (SIGTERM): spans are flushed.
    fn terminate(&mut self, i: usize) {
        if let Some(mut child) = self.domains[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.domains[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
        self.wait_listening(i).await;
    }

    fn url(&self, i: usize) -> String {
        self.domains[i].url()
    }

    /// A counter of domain `i`'s /metrics (summed over the label sets that
    /// contain every one of `labels`).
    async fn metric(&self, i: usize, name: &str, labels: &[&str]) -> f64 {
        let Some((200, _, text)) = support::http_get_text(self.domains[i].client, "/metrics").await
        else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for i in 0..self.domains.len() {
            self.kill9(i);
        }
    }
}

async fn login(url: &str, user: &str) -> Client {
    login_with(url, user, false).await
}

/// In ack mode a sender hears MESSAGE_ACCEPTED for each stored message.
async fn login_with(url: &str, user: &str, acks: bool) -> Client {
    let mut c = Client::connect(url).await;
    let reply = c
        .auth(json!({"appId": APP, "userId": user, "token": "", "acks": acks}))
        .await;
    assert_eq!(reply["data"]["isAuthenticated"], true, "{user}: {reply}");
    c
}

/// The next MESSAGE frame within `wait`.
async fn next_message(c: &mut Client, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let f = c.try_recv(left).await?;
        if f["type"] == "MESSAGE" {
            return Some(f);
        }
    }
}

fn hops(f: &Value) -> Vec<String> {
    f["data"]["hops"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends one RELIABLE message a → b until one arrives (the links may still
/// be coming up); returns the frame b got.
async fn first_delivery(a: &mut Client, b: &mut Client, to: &str) -> Value {
    a.message(to, "warm-up", "RELIABLE", "").await;
    next_message(b, Duration::from_secs(20))
        .await
        .expect("the first message crosses the federation")
}

#[tokio::test]
async fn messages_take_the_cheapest_path_and_everything_crosses_back() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    // 1-2-3 costs 2, 1-4-3 costs 4.
    let mut ring = Ring::start(etcd, [1, 1, 2, 2]).await;

    // A user of d3 signing in at d1 is sent home.
    let mut roamer = Client::connect(&ring.url(0)).await;
    let reply = roamer
        .auth(json!({"appId": APP, "userId": "ANZ-2001", "token": ""}))
        .await;
    assert_eq!(reply["data"]["isAuthenticated"], false, "{reply}");
    assert_eq!(reply["data"]["redirect"], ring.url(2), "{reply}");

    let mut alice = login(&ring.url(0), "ANZ-1").await;
    let mut alice_phone = login(&ring.url(0), "ANZ-1").await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let warm = first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    assert_eq!(hops(&warm), ["d1", "d2", "d3"], "{warm}");

    // RELIABLE with a reference: delivered by the cheapest path, confirmed
    // back to the sender's domain, copied to the sender's other device.
    alice
        .message("ANZ-2001", "hello carol", "RELIABLE", "r1")
        .await;
    let got = next_message(&mut carol, Duration::from_secs(10))
        .await
        .expect("carol gets it");
    assert_eq!(got["data"]["content"], "hello carol");
    assert_eq!(got["data"]["from"], "ANZ-1");
    assert_eq!(hops(&got), ["d1", "d2", "d3"]);
    let sent = alice_phone.recv_type("MESSAGE_SENT").await;
    assert_eq!(sent["data"]["to"], "ANZ-2001", "{sent}");
    let confirmation = alice.recv_type("MESSAGE_CONFIRMATION").await;
    assert_eq!(confirmation["data"]["reference"], "r1", "{confirmation}");
    assert_eq!(confirmation["data"]["id"], got["data"]["id"]);

    // The way back, and FAST.
    carol.message("ANZ-1", "hi alice", "FAST", "").await;
    let back = next_message(&mut alice, Duration::from_secs(10))
        .await
        .expect("alice gets the reply");
    assert_eq!(back["data"]["content"], "hi alice");
    assert_eq!(hops(&back), ["d3", "d2", "d1"]);

    // An ad-hoc group with members in d1, d2 and d3: one copy to the next
    // hop d2 (which keeps its member's and passes one copy on to d3).
    let mut dave = login(&ring.url(1), "ANZ-1001").await;
    let mut erin = login(&ring.url(2), "ANZ-2002").await;
    let mut frank = login(&ring.url(0), "ANZ-5").await;
    let before = ring
        .metric(
            0,
            "switchboard_federation_forwarded_total",
            &["peer=\"d2\""],
        )
        .await;
    alice
        .send(json!({
            "type": "GROUP_MESSAGE",
            "data": {"to": ["ANZ-2001", "ANZ-2002", "ANZ-1001", "ANZ-5"], "content": "all of you"},
            "feature": "RELIABLE",
        }))
        .await;
    for (who, c) in [
        ("carol", &mut carol),
        ("erin", &mut erin),
        ("dave", &mut dave),
        ("frank", &mut frank),
    ] {
        let f = next_message(c, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{who} gets the group message"));
        assert_eq!(f["data"]["content"], "all of you", "{who}: {f}");
    }
    let after = ring
        .metric(
            0,
            "switchboard_federation_forwarded_total",
            &["peer=\"d2\""],
        )
        .await;
    assert_eq!(
        after - before,
        1.0,
        "one envelope to d2 for three members behind it"
    );

    // A persistent group held in d1 with a member in d3: the copy for
    // carol crosses the federation like a direct message, with its group.
    alice
        .send(json!({"type": "GROUP_CREATE", "data": {"name": "Team", "members": ["ANZ-5", "ANZ-2001"], "group": "team-1"}}))
        .await;
    let created = alice.recv_type("GROUP_CREATED").await;
    assert_eq!(created["data"]["group"], "team-1", "{created}");
    alice
        .send(json!({"type": "GROUP_MESSAGE", "data": {"group": "team-1", "content": "to the team"}, "feature": "RELIABLE"}))
        .await;
    for (who, c) in [("carol", &mut carol), ("frank", &mut frank)] {
        let f = loop {
            let f = next_message(c, Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("{who} gets the team message"));
            if f["data"]["content"] == "to the team" {
                break f;
            }
        };
        assert_eq!(f["data"]["group"], "team-1", "{who}: {f}");
        if who == "carol" {
            assert_eq!(hops(&f), ["d1", "d2", "d3"], "{f}");
        }
    }

    // A heavier 1-2 link: new messages take 1-4-3 (cost 4 < 11).
    ring.weights = [10, 1, 2, 2];
    ring.apply();
    let changed = Instant::now();
    let mut moved = None;
    for n in 0..100 {
        alice
            .message("ANZ-2001", &format!("after {n}"), "RELIABLE", "")
            .await;
        let f = next_message(&mut carol, Duration::from_secs(10))
            .await
            .expect("delivered during the change");
        if hops(&f) == ["d1", "d4", "d3"] {
            moved = Some(changed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = moved.expect("new messages take the new path");
    eprintln!("route change: new messages took the new path after {moved:?}");
    assert!(moved < Duration::from_secs(1), "{moved:?}");
}

/// Sends untagged messages a → b until one arrives by `path` (at most
/// 100, 100 ms apart); whether one did.
async fn wait_for_path(a: &mut Client, b: &mut Client, path: &[&str]) -> bool {
    for _ in 0..100 {
        a.message("ANZ-2001", "which way?", "RELIABLE", "").await;
        if let Some(f) = next_message(b, Duration::from_secs(10)).await
            && hops(&f) == path
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// What a recipient got: distinct ids, frames that repeated an id, and
/// how many came by each path.
struct Received {
    ids: HashSet<String>,
    repeats: usize,
    paths: BTreeMap<String, usize>,
}

// Multi-threaded: the receiver in this process must answer while the
// test waits for the domains to stop and flush their spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_across_three_domains() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let receiver = support::otlp::Receiver::start().await;
    let mut ring = Ring::start_traced(etcd, [1, 1, 2, 2], Some(receiver.endpoint())).await;
    let mut alice = login(&ring.url(0), "ANZ-1").await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    alice.message("ANZ-2001", "traced", "RELIABLE", "t1").await;
    let got = next_message(&mut carol, Duration::from_secs(10))
        .await
        .expect("delivered");
    let id = got["data"]["id"].as_str().expect("id").to_owned();
    for i in 0..4 {
        ring.terminate(i);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let trace = loop {
        let spans = receiver.spans();
        let trace_id = spans
            .iter()
            .find(|s| {
                s.name == "gateway.receive"
                    && s.attributes.get("message.id").map(String::as_str) == Some(id.as_str())
            })
            .map(|s| s.trace_id.clone());
        let trace: Vec<support::otlp::Span> = spans
            .into_iter()
            .filter(|s| Some(&s.trace_id) == trace_id.as_ref())
            .collect();
        if trace.iter().any(|s| s.name == "gateway.push") || Instant::now() > deadline {
            break trace;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let names: Vec<(String, Option<String>)> = trace
        .iter()
        .map(|s| (s.name.clone(), s.attributes.get("domain").cloned()))
        .collect();
    // Sent in d1, forwarded by d1 and d2, received by d2 and d3, pushed in d3.
    for (name, domain) in [("federation.receive", "d2"), ("federation.receive", "d3")] {
        assert!(
            names
                .iter()
                .any(|(n, d)| n == name && d.as_deref() == Some(domain)),
            "{name} in {domain}: {names:?}"
        );
    }
    let forwards = trace
        .iter()
        .filter(|s| s.name == "federation.forward")
        .count();
    assert!(
        forwards >= 2,
        "a federation.forward span per hop: {names:?}"
    );
    assert!(trace.iter().any(|s| s.name == "gateway.push"), "{names:?}");
}

/// Reads MESSAGE frames until `n` distinct ids of the ones sent with `tag`
/// arrived or nothing came for `quiet` (others are skipped).
async fn collect(c: &mut Client, tag: &str, n: usize, quiet: Duration) -> Received {
    let mut got = Received {
        ids: HashSet::new(),
        repeats: 0,
        paths: BTreeMap::new(),
    };
    while got.ids.len() < n {
        let Some(f) = next_message(c, quiet).await else {
            break;
        };
        let id = f["data"]["id"].as_str().unwrap_or_default().to_owned();
        if !id.starts_with(&format!("{tag}-")) {
            continue;
        }
        if !got.ids.insert(id) {
            got.repeats += 1;
        }
        *got.paths.entry(hops(&f).join(">")).or_default() += 1;
    }
    got
}

/// Sends `n` RELIABLE messages and returns the ids the server accepted.
/// `during` runs after the first `at` were sent.
async fn send_accepted(
    alice: &mut Client,
    to: &str,
    tag: &str,
    n: usize,
    at: usize,
    mut during: impl AsyncFnMut(),
) -> Vec<String> {
    let mut accepted = Vec::new();
    for i in 0..n {
        if i == at {
            during().await;
        }
        let reference = format!("m{i}");
        // A steady stream, so that what the test does meanwhile happens
        // while messages are on their way.
        tokio::time::sleep(Duration::from_millis(2)).await;
        alice
            .send(json!({
                "type": "MESSAGE",
                "data": {"to": to, "content": format!("message {i}"), "id": format!("{tag}-{i}")},
                "feature": "RELIABLE",
                "reference": reference,
            }))
            .await;
    }
    // Every frame is answered (accepted or an error).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    while answered < n && Instant::now() < deadline {
        let Some(f) = alice.try_recv(Duration::from_secs(10)).await else {
            break;
        };
        match f["type"].as_str() {
            // (Not an earlier message's.)
            Some("MESSAGE_ACCEPTED")
                if f["data"]["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&format!("{tag}-"))) =>
            {
                answered += 1;
                accepted.push(f["data"]["id"].as_str().unwrap_or_default().to_owned());
            }
            Some("ERROR") => {
                answered += 1;
                eprintln!("send refused: {f}");
            }
            _ => {}
        }
    }
    accepted
}

#[tokio::test]
async fn nothing_accepted_is_lost_when_the_domain_on_the_path_dies_or_a_link_is_cut() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    // d2 is reached through a proxy that the test can cut.
    let proxy = Proxy::start().await;
    let mut ring = {
        let mut r = Ring::start(etcd, [1, 1, 2, 2]).await;
        r.federation_urls[1] = format!("http://{}", proxy.addr);
        proxy.target(r.domains[1].federation).await;
        r.apply();
        r
    };
    let mut alice = login_with(&ring.url(0), "ANZ-1", true).await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let warm = first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    assert_eq!(hops(&warm), ["d1", "d2", "d3"], "{warm}");

    // 1. kill -9 of d2 (on the path in use) while 500 are sent; what d2
    // had taken on arrives after it returns.
    let accepted = send_accepted(&mut alice, "ANZ-2001", "killed", 500, 150, async || {
        ring.kill9(1);
    })
    .await;
    // d2 comes back only after d1 has seen it gone and sent on through
    // d4 (else everything could simply wait for d2's return).
    let deadline = Instant::now() + Duration::from_secs(15);
    while ring
        .metric(
            0,
            "switchboard_federation_forwarded_total",
            &["peer=\"d4\""],
        )
        .await
        == 0.0
    {
        assert!(Instant::now() < deadline, "d1 never sent through d4");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ring.restart(1).await;
    let got = collect(
        &mut carol,
        "killed",
        accepted.len(),
        Duration::from_secs(20),
    )
    .await;
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !got.ids.contains(*id))
        .collect();
    eprintln!(
        "d2 killed: {} accepted, {} arrived, {} frames repeated an id, paths {:?}, missing {:?}",
        accepted.len(),
        got.ids.len(),
        got.repeats,
        got.paths,
        missing.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        accepted.len() >= 400,
        "most sends are accepted: {}",
        accepted.len()
    );
    assert!(
        missing.is_empty(),
        "{} accepted messages missing",
        missing.len()
    );
    assert_eq!(got.repeats, 0, "a message shown twice");
    assert!(
        got.paths.get("d1>d4>d3").copied().unwrap_or(0) > 0,
        "traffic took the other path: {:?}",
        got.paths
    );

    // 2. The link cut instead (the proxy in front of d2 closes), then
    // healed: again nothing accepted is lost. First the cheap path again.
    assert!(
        wait_for_path(&mut alice, &mut carol, &["d1", "d2", "d3"]).await,
        "d2 back on the path before the cut"
    );
    let accepted = send_accepted(&mut alice, "ANZ-2001", "cut", 500, 150, async || {
        proxy.cut().await;
    })
    .await;
    let got = collect(&mut carol, "cut", accepted.len(), Duration::from_secs(20)).await;
    let missing = accepted.iter().filter(|id| !got.ids.contains(*id)).count();
    eprintln!(
        "link cut: {} accepted, paths {:?}",
        accepted.len(),
        got.paths
    );
    assert_eq!(
        missing,
        0,
        "{missing} of {} accepted missing after the cut",
        accepted.len()
    );
    assert_eq!(got.repeats, 0, "a message shown twice");
    assert!(
        got.paths.get("d1>d4>d3").copied().unwrap_or(0) > 0
            && got.paths.get("d1>d2>d3").copied().unwrap_or(0) > 0,
        "traffic went through d2 before the cut and round it after: {:?}",
        got.paths
    );
    proxy.reopen().await;
    // Healed: traffic goes the cheap way again.
    let healed = wait_for_path(&mut alice, &mut carol, &["d1", "d2", "d3"]).await;
    assert!(
        healed,
        "traffic returns to the cheapest path once the link is back"
    );
}

#[tokio::test]
async fn outboxes_survive_a_kill9_of_the_sending_domain() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let mut ring = Ring::start(etcd, [1, 1, 1, 1]).await;
    let mut alice = login_with(&ring.url(0), "ANZ-1", true).await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    carol.close().await;

    // No path from d1 to d3: both neighbours of d1 are gone.
    ring.kill9(1);
    ring.kill9(3);
    let accepted = send_accepted(&mut alice, "ANZ-2001", "queued", 50, 0, async || {}).await;
    assert_eq!(
        accepted.len(),
        50,
        "accepted into the outbox while no path is up"
    );
    drop(alice);
    // The sending domain dies with all of it in its outboxes.
    ring.kill9(0);
    ring.restart(0).await;
    ring.restart(1).await;
    ring.restart(3).await;

    // carol (offline meanwhile) finds every one in her inbox.
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got: BTreeMap<String, Value> = BTreeMap::new();
    while got.len() < 50 && Instant::now() < deadline {
        let (frames, _) = carol.fetch_all(100).await;
        for f in frames.into_iter().filter(|f| f["type"] == "MESSAGE") {
            got.insert(f["data"]["id"].as_str().unwrap_or_default().to_owned(), f);
        }
        if let Some(f) = next_message(&mut carol, Duration::from_millis(500)).await {
            got.insert(f["data"]["id"].as_str().unwrap_or_default().to_owned(), f);
        }
    }
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !got.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of 50 lost: {missing:?}",
        missing.len()
    );
}

#[tokio::test]
async fn forged_envelopes_wrong_credentials_and_invalid_topologies_are_refused() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let ring = Ring::start(etcd, [1, 1, 1, 1]).await;
    let d3 = format!("http://{}", ring.domains[2].federation);
    let call = |domain: &'static str,
                secret: &'static str,
                envelopes: Vec<switchboard_mesh::pb::Envelope>| {
        let d3 = d3.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(d3)
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let creds =
                switchboard_mesh::FederationCredentials::new(domain, secret).expect("creds");
            let mut client =
                switchboard_mesh::pb::federation_client::FederationClient::with_interceptor(
                    channel, creds,
                );
            client
                .forward(switchboard_mesh::pb::ForwardRequest {
                    from_domain: domain.to_owned(),
                    envelopes,
                })
                .await
        }
    };
    let envelope = |hops: &[&str]| switchboard_mesh::pb::Envelope {
        id: switchboard_mesh::new_message_id(),
        app_id: APP.into(),
        from: "ANZ-1".into(),
        to: vec!["ANZ-2001".into()],
        content: "forged".into(),
        hops: hops.iter().map(|h| (*h).to_owned()).collect(),
        hop_limit: 8,
        ..Default::default()
    };

    let wrong = call("d2", "not-the-secret", vec![envelope(&["d2"])]).await;
    assert_eq!(
        wrong.expect_err("wrong secret").code(),
        tonic::Code::Unauthenticated
    );
    // d1 is no neighbour of d3.
    let stranger = call("d1", SECRET, vec![envelope(&["d1"])]).await;
    assert_eq!(
        stranger.expect_err("not linked").code(),
        tonic::Code::PermissionDenied
    );
    // A hop list that passed d3 before, one that does not end with the
    // caller, one past its limit, a d1 user's message claiming to have
    // started in d2, one of an app the topology does not list: refused for
    // good, each said why.
    let mut limited = envelope(&["d1", "d2"]);
    limited.hop_limit = 2;
    let mut impostor = envelope(&["d2"]);
    impostor.from = "ANZ-5".into();
    let mut private_app = envelope(&["d2"]);
    private_app.app_id = "demo".into();
    private_app.from = "demo-1".into();
    let reply = call(
        "d2",
        SECRET,
        vec![
            envelope(&["d3", "d2"]),
            envelope(&["d4"]),
            limited,
            impostor,
            private_app,
        ],
    )
    .await
    .expect("a neighbour's call")
    .into_inner();
    let reasons: Vec<(bool, String)> = reply
        .outcomes
        .iter()
        .map(|o| (o.accepted, o.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 5);
    for (i, word) in ["loop", "calling domain", "hop limit", "sender", "app"]
        .into_iter()
        .enumerate()
    {
        assert!(
            !reasons[i].0 && reasons[i].1.contains(word),
            "{word}: {reasons:?}"
        );
    }
    // Nothing of it reached carol.
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let (frames, _) = carol.fetch_all(100).await;
    assert!(
        frames.iter().all(|f| f["data"]["content"] != "forged"),
        "{frames:?}"
    );

    // An invalid topology changes nothing and says why.
    let bad = ring._dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        ring.topology_yaml()
            .replace("{n1: d3, n2: d4", "{n1: d3, n2: d9"),
    )
    .expect("write");
    let (ok, out) = ring.topology_cli(&["apply", &bad.to_string_lossy()]);
    assert!(!ok, "{out}");
    assert!(out.contains("d9"), "{out}");
    let (ok, out) = ring.topology_cli(&["show"]);
    assert!(ok, "{out}");
    assert!(out.contains("d3 - d4  weight=1  state=up"), "{out}");
    assert!(!out.contains("d9"), "{out}");
}

#[tokio::test]
async fn with_a_secret_per_link_no_domain_can_call_under_another_ones_name() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let ring = Ring::start_with(etcd, [1, 1, 2, 2], None, None, true).await;
    let mut alice = login(&ring.url(0), "ANZ-1").await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let f = first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    assert_eq!(hops(&f), ["d1", "d2", "d3"], "{f}");

    // d3's federation port, called as d2: with the d2-d3 secret it is let
    // in; d4 using its own d3-d4 secret under d2's name is not.
    let d3 = format!("http://{}", ring.domains[2].federation);
    let call = |secret: String| {
        let d3 = d3.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(d3)
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let creds = switchboard_mesh::FederationCredentials::new("d2", &secret).expect("creds");
            switchboard_mesh::pb::federation_client::FederationClient::with_interceptor(
                channel, creds,
            )
            .forward(switchboard_mesh::pb::ForwardRequest {
                from_domain: "d2".into(),
                envelopes: Vec::new(),
            })
            .await
        }
    };
    assert!(call(link_secret("d2", "d3")).await.is_ok());
    let impostor = call(link_secret("d3", "d4")).await.expect_err("d4 as d2");
    assert_eq!(impostor.code(), tonic::Code::Unauthenticated);
}

/// A CA and a certificate per domain naming it (DNS subject alternative
/// name `dN`), as PEM files in `dir`.
fn domain_certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write ca");
    for i in 1..=4 {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec![format!("d{i}")]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        std::fs::write(dir.join(format!("d{i}.crt")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("d{i}.key")), key.serialize_pem()).expect("write key");
    }
}

#[tokio::test]
async fn domains_can_require_mutual_tls_with_their_names_in_the_certificates() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let certs = tempfile::tempdir().expect("tempdir");
    domain_certificates(certs.path());
    let ring = Ring::start_with(
        etcd,
        [1, 1, 2, 2],
        None,
        Some(certs.path().to_owned()),
        false,
    )
    .await;
    let mut alice = login(&ring.url(0), "ANZ-1").await;
    let mut carol = login(&ring.url(2), "ANZ-2001").await;
    let f = first_delivery(&mut alice, &mut carol, "ANZ-2001").await;
    assert_eq!(hops(&f), ["d1", "d2", "d3"], "{f}");

    // d3's federation port, called as d2 with the right secret: with d2's
    // certificate it is let in; with d4's (the same CA, another name), or
    // over plain HTTP/2, it is not.
    let d3 = ring.domains[2].federation;
    let call = |cert: &'static str| {
        let dir = certs.path().to_owned();
        async move {
            let read = |f: &str| std::fs::read(dir.join(f)).expect("read pem");
            let tls = switchboard_mesh::MeshTls {
                cert_pem: read(&format!("{cert}.crt")),
                key_pem: read(&format!("{cert}.key")),
                ca_pem: read("ca.crt"),
            };
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{d3}"))
                .expect("url")
                .tls_config(tls.client_config("d3"))
                .expect("tls")
                .connect()
                .await
                .expect("connect");
            let creds = switchboard_mesh::FederationCredentials::new("d2", SECRET).expect("creds");
            switchboard_mesh::pb::federation_client::FederationClient::with_interceptor(
                channel, creds,
            )
            .forward(switchboard_mesh::pb::ForwardRequest {
                from_domain: "d2".into(),
                envelopes: Vec::new(),
            })
            .await
        }
    };
    assert!(call("d2").await.is_ok(), "d2's own certificate");
    let other = call("d4").await.expect_err("d4's certificate claiming d2");
    assert_eq!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{d3}"))
        .expect("url")
        .connect()
        .await;
    if let Ok(channel) = plain {
        let creds = switchboard_mesh::FederationCredentials::new("d2", SECRET).expect("creds");
        let reply = switchboard_mesh::pb::federation_client::FederationClient::with_interceptor(
            channel, creds,
        )
        .forward(switchboard_mesh::pb::ForwardRequest::default())
        .await;
        assert!(reply.is_err(), "plain HTTP/2 is not served");
    }
}

/// A TCP proxy the test can cut (close every connection, refuse new
/// ones) and reopen on the same port.
struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    target: Option<SocketAddr>,
    accept: Option<tokio::task::JoinHandle<()>>,
    conns: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proxy = Proxy {
            addr,
            state: Arc::default(),
        };
        proxy.reopen().await;
        proxy
    }

    async fn target(&self, target: SocketAddr) {
        self.state.lock().await.target = Some(target);
    }

    async fn cut(&self) {
        let mut s = self.state.lock().await;
        if let Some(a) = s.accept.take() {
            a.abort();
        }
        for c in s.conns.drain(..) {
            c.abort();
        }
    }

    async fn reopen(&self) {
        let listener = {
            let mut tries = 0;
            loop {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => break l,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("proxy cannot listen on {}: {e}", self.addr),
                }
            }
        };
        let state = self.state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut s = state.lock().await;
                let Some(target) = s.target else {
                    continue;
                };
                s.conns.push(tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let _ = tokio::join!(
                        tokio::io::copy(&mut ri, &mut wo),
                        tokio::io::copy(&mut ro, &mut wi)
                    );
                }));
            }
        });
        self.state.lock().await.accept = Some(accept);
    }
}

/// A RELIABLE message forwarded to a domain where its recipient's inbox is
/// full is refused there for good, not taken for delivered: the refusal
/// (reason INBOX_FULL) is counted in both domains, the recipient has
/// exactly what fit, and the sender — who heard MESSAGE_ACCEPTED when the
/// message entered its own domain's outbox — is told afterwards with an
/// `ERROR INBOX_FULL` carrying the message's id and reference
/// (docs/federation.md, limits).
#[tokio::test]
async fn a_message_forwarded_to_a_full_inbox_is_refused_counted_and_told_to_its_sender() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let _one = SERIAL.lock().await;
    let mut ring = Ring::start(etcd, [1, 1, 1, 1]).await;
    // Restarted with the quota: one stored message per inbox.
    ring.extra_env = vec![("SWITCHBOARD_QUOTAS__INBOX_MAX_MESSAGES".into(), "1".into())];
    for i in 0..4 {
        ring.restart(i).await;
    }
    let mut alice = login_with(&ring.url(0), "ANZ-5", true).await;
    let mut ids = Vec::new();
    for (i, content) in ["fits", "too many"].into_iter().enumerate() {
        alice
            .send(json!({
                "type": "MESSAGE",
                "data": {"to": "ANZ-1500", "content": content},
                "feature": "RELIABLE",
                "reference": format!("q{i}"),
            }))
            .await;
        let accepted = alice.recv_type("MESSAGE_ACCEPTED").await;
        ids.push(accepted["data"]["id"].as_str().expect("id").to_owned());
    }
    // The sender hears of the refusal, on the connection it sent from.
    let deadline = Instant::now() + Duration::from_secs(30);
    let told = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = alice.try_recv(left).await else {
            panic!("the sender was not told that its message was refused");
        };
        if f["type"] == "ERROR" {
            break f;
        }
    };
    assert_eq!(told["data"]["code"], "INBOX_FULL", "{told}");
    assert_eq!(told["data"]["id"], ids[1].as_str(), "{told}");
    assert_eq!(told["reference"], "q1", "{told}");
    assert_eq!(told["data"]["recipients"], json!(["ANZ-1500"]), "{told}");
    // A stored notice, like a confirmation: a device that was not
    // connected finds it when it fetches (the first one has not ACKed it).
    assert!(told["data"]["seq"].as_u64().is_some(), "{told}");
    let mut other_device = login(&ring.url(0), "ANZ-5").await;
    let (stored, _) = other_device.fetch_all(100).await;
    assert!(
        stored
            .iter()
            .any(|f| f["type"] == "ERROR" && f["data"]["id"] == ids[1].as_str()),
        "the notice is not in the sender's inbox: {stored:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused_there = ring
            .metric(1, "switchboard_federation_dropped_total", &["INBOX_FULL"])
            .await;
        let refused_here = ring
            .metric(
                0,
                "switchboard_federation_dropped_total",
                &["refused by neighbour"],
            )
            .await;
        if refused_there >= 1.0 && refused_here >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal was not counted: {refused_there} in d2, {refused_here} in d1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An ad-hoc group message with one full inbox there: stored for the
    // other recipient, and its sender told which recipient did not get it.
    alice
        .send(json!({
            "type": "GROUP_MESSAGE",
            "data": {"to": ["ANZ-1500", "ANZ-1501"], "content": "to both"},
            "feature": "RELIABLE",
            "reference": "g1",
        }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut accepted, mut told) = (None, None);
    while accepted.is_none() || told.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = alice.try_recv(left).await else {
            panic!("no answer and notice for the group message: {accepted:?} {told:?}");
        };
        if f["type"] == "MESSAGE_ACCEPTED" && f["data"]["reference"] == "g1" {
            accepted = Some(f);
        } else if f["type"] == "ERROR" && f["reference"] == "g1" {
            told = Some(f);
        }
    }
    let (accepted, told) = (accepted.unwrap_or_default(), told.unwrap_or_default());
    assert_eq!(told["data"]["code"], "INBOX_FULL", "{told}");
    assert_eq!(
        told["data"]["id"], accepted["data"]["id"],
        "{told} {accepted}"
    );
    assert_eq!(told["data"]["recipients"], json!(["ANZ-1500"]), "{told}");
    let mut carol = login(&ring.url(1), "ANZ-1501").await;
    let (frames, _) = carol.fetch_all(100).await;
    let got: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .filter_map(|f| f["data"]["content"].as_str())
        .collect();
    assert_eq!(got, ["to both"]);
    let mut bob = login(&ring.url(1), "ANZ-1500").await;
    let (frames, _) = bob.fetch_all(100).await;
    let got: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .filter_map(|f| f["data"]["content"].as_str())
        .collect();
    assert_eq!(got, ["fits"]);
}
