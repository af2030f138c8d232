//! The multi-process cluster under failure: real `switchboard` processes,
//! real etcd and Redis, kill -9 and restarts.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::{Cluster, FULL_SHAPE, Infra, PROTOCOL_SHAPE};
use support::{Client, free_port};
use switchboard_mesh::{ErrorCode, RouterClient, pb};
use switchboard_presence::{Presence, RedisPresence};

const QUIET: Duration = Duration::from_millis(300);

/// The index in a `m<i>` content.
fn index_of(frame: &Value) -> usize {
    frame["data"]["content"]
        .as_str()
        .and_then(|c| c.strip_prefix('m'))
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("unexpected content in {frame}"))
}

#[tokio::test]
async fn delivery_killed_mid_stream_loses_no_accepted_message() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    const N: usize = 1000;
    let mut cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.limits.messages_per_second = 100_000;
        c.limits.max_refusals = 100_000;
    })
    .await;
    let gw1 = cluster.proc("gw1").url();
    let gw2 = cluster.proc("gw2").url();
    let mut ann = Client::login_with(&gw1, "demo-ann", true).await;
    let mut bob = Client::login(&gw2, "demo-bob").await;

    // bob reads everything pushed to him, until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut pushed: Vec<(usize, String)> = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                f = bob.try_recv(Duration::from_secs(60)) => match f {
                    Some(f) if f["type"] == "MESSAGE" => {
                        pushed.push((index_of(&f), f["data"]["id"].as_str().expect("id").to_owned()));
                    }
                    Some(_) => {}
                    None => panic!("bob's connection ended during the outage"),
                },
            }
        }
        (bob, pushed)
    });

    // All N sends go out at once; the gateway works through them in order.
    for i in 0..N {
        ann.message("demo-bob", &format!("m{i}"), "RELIABLE", &format!("r{i}"))
            .await;
    }
    let mut accepted: BTreeMap<usize, String> = BTreeMap::new();
    let mut unavailable: BTreeSet<usize> = BTreeSet::new();
    let mut killed_at: Option<Instant> = None;
    let mut restarted_at: Option<Instant> = None;
    let mut first_accept_after_restart: Option<Duration> = None;
    while accepted.len() + unavailable.len() < N {
        let f = ann
            .try_recv(Duration::from_secs(30))
            .await
            .expect("ann's connection stays open and every send is answered");
        let reference = f["reference"].as_str().unwrap_or_default();
        let Some(i) = reference.strip_prefix('r').and_then(|i| i.parse().ok()) else {
            continue;
        };
        match f["type"].as_str() {
            Some("MESSAGE_ACCEPTED") => {
                let id = f["data"]["id"].as_str().expect("id").to_owned();
                assert!(accepted.insert(i, id).is_none(), "r{i} accepted twice");
                if let (Some(at), None) = (restarted_at, first_accept_after_restart) {
                    first_accept_after_restart = Some(at.elapsed());
                }
            }
            Some("ERROR") => {
                assert_eq!(f["data"]["code"], "UNAVAILABLE", "{f}");
                assert!(unavailable.insert(i), "r{i} refused twice");
            }
            _ => continue,
        }
        if killed_at.is_none() && accepted.len() >= 300 {
            cluster.kill9("delivery");
            killed_at = Some(Instant::now());
        }
        // Long enough for the lease to expire and for sends to be refused.
        if let (Some(at), None) = (killed_at, restarted_at)
            && at.elapsed() > Duration::from_secs(5)
        {
            cluster.restart("delivery");
            restarted_at = Some(Instant::now());
        }
    }
    if restarted_at.is_none() {
        // Everything was answered while delivery was down.
        cluster.restart("delivery");
    }
    assert!(
        !unavailable.is_empty(),
        "sends during the outage are refused with UNAVAILABLE"
    );
    assert!(
        accepted.len() > 300 + 100,
        "sends resume once delivery is back ({} accepted)",
        accepted.len()
    );

    // After the last accepted message reached bob (or sits in his inbox),
    // fetch what the push path lost in the crash.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(());
    let (mut bob, pushed) = reader.await.expect("reader");
    let (fetched, _) = bob.fetch_all(1000).await;
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut by_index: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (i, id) in pushed.iter().cloned().chain(fetched.iter().map(|f| {
        (
            index_of(f),
            f["data"]["id"].as_str().expect("id").to_owned(),
        )
    })) {
        *copies.entry(id.clone()).or_default() += 1;
        by_index.entry(i).or_default().insert(id);
    }
    for (i, id) in &accepted {
        assert!(
            by_index.get(i).is_some_and(|ids| ids.contains(id)),
            "accepted message m{i} ({id}) never reached bob"
        );
    }
    for (i, ids) in &by_index {
        assert!(*i < N, "m{i} was never sent");
        assert_eq!(ids.len(), 1, "m{i} arrived under several ids: {ids:?}");
    }
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    eprintln!(
        "delivery kill -9: {} accepted, {} refused (UNAVAILABLE), {} distinct received, {} duplicate copies; first accept {:?} after the restart",
        accepted.len(),
        unavailable.len(),
        copies.len(),
        duplicates,
        first_accept_after_restart
    );
    // Refused sends may still have been stored before the crash; accepted
    // ones are all there, each once after de-duplication.
    assert!(copies.len() >= accepted.len());
    assert!(copies.len() <= accepted.len() + unavailable.len());

    // The same connections keep working.
    ann.message("demo-bob", "m0", "FAST", "after").await;
    assert_eq!(bob.recv_type("MESSAGE").await["reference"], "after");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_killed_groups_process_is_taken_over() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = Cluster::start(infra, FULL_SHAPE, |_| {}).await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let mut cat = Client::login(&cluster.proc("gw1").url(), "demo-cat").await;

    /// Sends one group message and waits until bob and cat have it. A
    /// fan-out the killed instance had done but not yet answered is retried
    /// on the survivor, so a message may arrive twice under the same id:
    /// clients de-duplicate by id, and so does this.
    async fn group_round(
        ann: &mut Client,
        recipients: &mut [(&mut Client, HashMap<String, String>)],
        tag: &str,
    ) -> usize {
        ann.send(json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cat"],"content":tag},"reference":tag}))
            .await;
        let mut duplicates = 0;
        for (c, seen) in recipients.iter_mut() {
            loop {
                let m = c.recv_type("MESSAGE").await;
                let id = m["data"]["id"].as_str().expect("id").to_owned();
                let content = m["data"]["content"].as_str().expect("content").to_owned();
                if let Some(earlier) = seen.get(&id) {
                    assert_eq!(*earlier, content, "one id, one message");
                    duplicates += 1;
                    continue;
                }
                assert_eq!(content, tag, "group messages arrive in order");
                seen.insert(id, content);
                break;
            }
        }
        duplicates
    }
    let mut recipients = [(&mut bob, HashMap::new()), (&mut cat, HashMap::new())];
    // Ad-hoc group messages are owned by message id: both instances serve.
    let mut duplicates = 0;
    for i in 0..10 {
        duplicates += group_round(&mut ann, &mut recipients, &format!("before{i}")).await;
    }
    cluster.kill9("groups1");
    let killed = Instant::now();
    // Every group message right after the kill is delivered: the ones the
    // dead instance owned go to the survivor.
    for i in 0..20 {
        duplicates += group_round(&mut ann, &mut recipients, &format!("after{i}")).await;
    }
    let takeover = killed.elapsed();
    eprintln!(
        "groups kill -9: 20 group messages delivered {takeover:?} after the kill ({duplicates} duplicate copies, same ids)"
    );
    assert!(
        duplicates <= 2,
        "at most the one in-flight fan-out is repeated"
    );
    assert!(
        takeover < Duration::from_secs(2),
        "takeover within the 2 s lease TTL, took {takeover:?}"
    );
    // No ERROR reached the sender.
    while let Some(f) = ann.try_recv(QUIET).await {
        assert_ne!(f["type"], "ERROR", "{f}");
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn users_of_a_killed_gateway_reconnect_elsewhere_and_fetch() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = Cluster::start(infra.clone(), PROTOCOL_SHAPE, |_| {}).await;
    let gw1 = cluster.proc("gw1").url();
    let mut ann = Client::login_with(&gw1, "demo-ann", true).await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    ann.send_accepted("demo-bob", "m0", "r0").await;
    let first = bob.recv_type("MESSAGE").await;
    assert_eq!(first["data"]["content"], "m0");
    let first_id = first["data"]["id"].clone();

    cluster.kill9("gw2");
    // bob's socket is gone with it.
    assert!(bob.try_recv(Duration::from_secs(5)).await.is_none());
    // Messages sent while bob has no connection wait in his inbox.
    for i in 1..=5 {
        ann.send_accepted("demo-bob", &format!("m{i}"), &format!("r{i}"))
            .await;
    }
    let mut bob = Client::login(&gw1, "demo-bob").await;
    let (fetched, _) = bob.fetch_all(100).await;
    // m0 may come again: its delivered report may not have left gw2 before
    // the kill (at least once; the client drops it by id).
    let got: Vec<usize> = fetched
        .iter()
        .filter(|f| f["type"] == "MESSAGE" && f["data"]["id"] != first_id)
        .map(index_of)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);

    // After the gateway TTL, presence lists only the live gateway, and
    // delivery to bob does not wait on the dead one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let presence =
        RedisPresence::connect(&infra.redis, &cluster.redis_prefix, Duration::from_secs(2))
            .await
            .expect("redis");
    let gateways = presence
        .gateways("demo", "demo-bob")
        .await
        .expect("presence");
    let gw1_id = format!("gw1-{}", &cluster.etcd_prefix[8..16]);
    assert_eq!(gateways, vec![(gw1_id, 1)]);
    let sent = Instant::now();
    ann.message("demo-bob", "m6", "FAST", "").await;
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["content"], "m6");
    eprintln!(
        "after the gateway died: a FAST message took {:?}",
        sent.elapsed()
    );
    cluster.shutdown().await;
}

/// A private etcd (this test stops it), on free ports.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.spawn();
        etcd
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("etcd did not listen on {}", self.client_port);
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (scripts/test.sh installs it)");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn traffic_survives_an_etcd_outage_and_registrations_return() {
    let Some(mut infra) = Infra::from_env() else {
        return;
    };
    let mut etcd = Etcd::start();
    etcd.wait_ready().await;
    infra.etcd = etcd.url();
    // The default lease TTL: registrations must outlive the time etcd
    // takes to come back and the keep-alives to get through again.
    let mut cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.discovery.lease_ttl_secs = 5;
    })
    .await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    // Both gateways are known to delivery before etcd goes: one message
    // each way. (A gateway that registered moments before the outage can
    // be unknown to delivery until etcd is back; on a loaded machine the
    // watch event naming gw2 could arrive after the stop, and the test then
    // failed: "push to an unknown gateway skipped", a message left stored.)
    ann.message("demo-bob", "m1000", "RELIABLE", "r1000").await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 1000);
    bob.message("demo-ann", "m1001", "RELIABLE", "r1001").await;
    assert_eq!(index_of(&ann.recv_type("MESSAGE").await), 1001);

    etcd.stop();
    // At least ten seconds and ten round trips without etcd: messages keep
    // flowing between the known instances, both ways (each one must arrive
    // within the client's receive timeout; how many fit in the time depends
    // on the machine's load, so that is not asserted).
    let outage = Instant::now();
    let mut i = 0;
    while i < 10 || outage.elapsed() < Duration::from_secs(10) {
        ann.message("demo-bob", &format!("m{i}"), "RELIABLE", &format!("r{i}"))
            .await;
        assert_eq!(index_of(&bob.recv_type("MESSAGE").await), i);
        bob.message("demo-ann", &format!("m{i}"), "FAST", "").await;
        assert_eq!(index_of(&ann.recv_type("MESSAGE").await), i);
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    etcd.spawn();
    etcd.wait_ready().await;
    // Registrations are back: a gateway started now finds every role, and
    // delivery (whose watch had broken) finds the new gateway.
    cluster.add("gw3", "gateway", |_| {});
    // Every gateway (gw3 included) knows an instance of every role again.
    cluster.wait_ready().await;
    // gw3 knows everyone; the others learn of gw3 once their watches are
    // re-established (each retries every 200 ms while etcd is away).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut cat = Client::login(&cluster.proc("gw3").url(), "demo-cat").await;
    ann.message("demo-cat", "m100", "RELIABLE", "r100").await;
    assert_eq!(index_of(&cat.recv_type("MESSAGE").await), 100);
    cat.message("demo-bob", "m101", "RELIABLE", "r101").await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 101);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_process_with_the_wrong_mesh_secret_cannot_call_or_join() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = Cluster::start(infra, PROTOCOL_SHAPE, |_| {}).await;

    // A direct mesh call without the secret is refused.
    let core = cluster.proc("core").mesh_addr;
    let channel = support::mesh_channel(core).await;
    let err = RouterClient::from_channel(channel)
        .route(pb::RouteRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code, ErrorCode::NotAuthenticated, "{err}");

    // A gateway with another secret is ignored by the others and finds no
    // instance it may call: it never becomes ready, and its users cannot
    // log in.
    cluster.add("intruder", "gateway", |c| c.mesh_secret = "wrong".into());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = cluster.readyz("intruder").await.expect("answers");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.to_string().contains("no instance of"),
        "readyz names the missing roles: {body}"
    );
    let mut c = Client::connect(&cluster.proc("intruder").url()).await;
    c.send(json!({"type":"AUTH_CLIENT","data":{"appId":"demo","userId":"demo-eve","token":""}}))
        .await;
    let reply = c.recv().await;
    assert_ne!(reply["data"]["isAuthenticated"], true, "{reply}");

    // The real gateways still work, and never push to the intruder.
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    ann.message("demo-bob", "m1", "RELIABLE", "r1").await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_second_delivery_process_is_refused() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |_| {}).await;
    let (status, stderr) = cluster
        .run_to_exit("delivery2", "delivery", Duration::from_secs(20))
        .await;
    let status = status.expect("the second delivery process exits by itself");
    assert!(!status.success());
    assert!(
        stderr.contains("second delivery process") && stderr.contains("shared store"),
        "the refusal names the reason: {stderr}"
    );
    // The first one is untouched.
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    ann.message("demo-bob", "m1", "RELIABLE", "r1").await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 1);
    cluster.shutdown().await;
}

/// A CA and one certificate for 127.0.0.1 signed by it, as PEM files in
/// `dir`: (cert, key, ca).
fn mesh_certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let paths = (
        dir.join("mesh.crt"),
        dir.join("mesh.key"),
        dir.join("ca.crt"),
    );
    std::fs::write(&paths.0, cert.pem()).expect("write cert");
    std::fs::write(&paths.1, key.serialize_pem()).expect("write key");
    std::fs::write(&paths.2, ca_cert.pem()).expect("write ca");
    paths
}

#[tokio::test]
async fn the_mesh_runs_over_mutual_tls() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key, ca) = mesh_certificates(certs.path());
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.mesh_tls.cert = cert.clone();
        c.mesh_tls.key = key.clone();
        c.mesh_tls.ca = ca.clone();
    })
    .await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    ann.message("demo-bob", "m1", "RELIABLE", "r1").await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 1);
    assert_eq!(
        ann.recv_type("MESSAGE_CONFIRMATION").await["data"]["reference"],
        "r1"
    );

    // Plain HTTP/2 to the mesh port gets nowhere.
    let core = cluster.proc("core").mesh_addr;
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{core}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let err = RouterClient::from_channel(plain)
        .route(pb::RouteRequest::default())
        .await
        .expect_err("plaintext refused");
    // The TLS handshake fails: a transport error, never an answer.
    assert!(
        matches!(err.code, ErrorCode::Unavailable | ErrorCode::Internal),
        "{err}"
    );
    cluster.shutdown().await;
}

/// `deploy/local/cluster.sh` as an operator uses it: start, talk through
/// both gateways, stop; nothing it started is left running.
#[tokio::test]
async fn deploy_local_script_starts_and_stops_a_full_cluster() {
    // The script starts its own etcd and Redis; it needs the same binaries.
    if Infra::from_env().is_none() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/local/cluster.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(script)
            .args(args)
            .env("SWITCHBOARD_BIN", env!("CARGO_BIN_EXE_switchboard"))
            .env("SWITCHBOARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .expect("run cluster.sh")
    };
    let cluster_dir = dir.path().join("cluster");
    let cluster_dir = cluster_dir.to_str().expect("utf-8 path");
    let started = run(&["start", cluster_dir]);
    assert!(started.status.success(), "cluster.sh start failed");
    let env_text = std::fs::read_to_string(dir.path().join("cluster/env")).expect("env file");
    let var = |name: &str| {
        env_text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {env_text}"))
            .trim_matches('\'')
            .to_owned()
    };
    let pids: Vec<u32> = std::fs::read_to_string(dir.path().join("cluster/pids"))
        .expect("pids file")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 9, "etcd, Redis and 7 switchboard processes");

    let mut ann = Client::login(&var("GW1_URL"), "demo-ann").await;
    let mut bob = Client::login(&var("GW2_URL"), "demo-bob").await;
    ann.send(
        json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob"],"content":"m1"},"reference":"g1"}),
    )
    .await;
    assert_eq!(index_of(&bob.recv_type("MESSAGE").await), 1);
    bob.message("demo-ann", "m2", "RELIABLE", "r2").await;
    assert_eq!(index_of(&ann.recv_type("MESSAGE").await), 2);

    let stopped = run(&["stop", cluster_dir]);
    assert!(stopped.status.success(), "cluster.sh stop failed");
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        assert!(
            stat.is_empty() || state == Some("Z"),
            "process {pid} still runs after cluster.sh stop"
        );
    }
}

/// `switchboard apps ARGS` against a cluster's etcd prefix: (success, stdout
/// and stderr).
fn apps_cli(etcd: &str, prefix: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["apps"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--etcd", etcd, "--key-prefix", prefix]);
    support::switchboard_cli(&all)
}

/// Whether `user` of `app` gets in through `url` (auth none).
async fn authenticates(url: &str, app: &str, user: &str) -> bool {
    let mut c = Client::connect(url).await;
    let reply = c
        .auth(json!({"appId": app, "userId": user, "token": ""}))
        .await;
    reply["data"]["isAuthenticated"] == true
}

/// Polls until `user` of `app` is let in (or not, `want`), for up to `limit`.
async fn until_authenticates(url: &str, app: &str, user: &str, want: bool, limit: Duration) {
    let started = Instant::now();
    while authenticates(url, app, user).await != want {
        assert!(
            started.elapsed() < limit,
            "{app}/{user}: authenticated is still not {want} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn apps_changed_in_etcd_are_used_without_a_restart() {
    let Some(mut infra) = Infra::from_env() else {
        return;
    };
    // An etcd of its own: it is restarted below.
    let mut etcd = Etcd::start();
    etcd.wait_ready().await;
    infra.etcd = etcd.url();
    let seeded = switchboard_config::AppConfig {
        name: "seeded".into(),
        app_id: "seeded-app".into(),
        ..switchboard_config::AppConfig::demo()
    };
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| c.apps = vec![seeded]).await;
    let prefix = cluster.etcd_prefix.clone();
    let url = cluster.proc("gw1").url();
    // The config file's app seeded etcd; with an app configured, the
    // development app is not served.
    assert!(authenticates(&url, "seeded-app", "seeded-1").await);
    assert!(!authenticates(&url, "demo", "demo-1").await);
    assert!(!authenticates(&url, "late-app", "late-1").await);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("apps.toml");
    std::fs::write(
        &file,
        "[[apps]]\nname = \"late\"\napp_id = \"late-app\"\nauth = \"none\"\n",
    )
    .expect("write apps file");
    let (ok, out) = apps_cli(&etcd.url(), &prefix, &["put", &file.to_string_lossy()]);
    assert!(ok, "{out}");
    // In use by new connections within two seconds, through either gateway.
    until_authenticates(&url, "late-app", "late-1", true, Duration::from_secs(2)).await;
    assert!(authenticates(&cluster.proc("gw2").url(), "late-app", "late-2").await);
    let (ok, out) = apps_cli(&etcd.url(), &prefix, &["list"]);
    assert!(
        ok && out.contains("late-app\tname=late") && out.contains("seeded-app"),
        "{out}"
    );

    // etcd restarts: the auth process's watch breaks and is re-created
    // from where it was; a change made after the restart is followed.
    etcd.stop();
    etcd.spawn();
    etcd.wait_ready().await;
    std::fs::write(
        &file,
        "[[apps]]\nname = \"after\"\napp_id = \"after-app\"\nauth = \"none\"\n",
    )
    .expect("write apps file");
    let started = Instant::now();
    let put = loop {
        let (ok, out) = apps_cli(&etcd.url(), &prefix, &["put", &file.to_string_lossy()]);
        if ok || started.elapsed() > Duration::from_secs(10) {
            break (ok, out);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(put.0, "{}", put.1);
    until_authenticates(&url, "after-app", "after-1", true, Duration::from_secs(5)).await;

    let (ok, out) = apps_cli(&etcd.url(), &prefix, &["delete", "late-app"]);
    assert!(ok, "{out}");
    until_authenticates(&url, "late-app", "late-1", false, Duration::from_secs(2)).await;
    // A bad app is refused before anything is written.
    std::fs::write(
        &file,
        "[[apps]]\nname = \"x\"\napp_id = \"x-app\"\nauth = \"jwt\"\n",
    )
    .expect("write apps file");
    let (ok, out) = apps_cli(&etcd.url(), &prefix, &["put", &file.to_string_lossy()]);
    assert!(!ok && out.contains("jwt"), "{out}");
    let (ok, out) = apps_cli(&etcd.url(), &prefix, &["delete", "late-app"]);
    assert!(!ok && out.contains("no such app"), "{out}");
}

/// The delivery process dies between storing a message and replying (the
/// failpoint aborts it as a kill -9 would). The sender's resend of the same
/// client id, once delivery is back, is answered as a repeat, and the
/// recipient's inbox holds the message once.
#[tokio::test]
async fn a_resend_after_delivery_died_between_store_and_reply_is_stored_once() {
    use switchboard_mesh::{DeliveryClient, MeshCredentials, Pool};
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = Cluster::start(infra, PROTOCOL_SHAPE, |_| {}).await;
    // Delivery again, now with the failpoint (it takes over its own claim).
    cluster.kill9("delivery");
    cluster.restart_with_env(
        "delivery",
        &[("SWITCHBOARD_FAILPOINT", "delivery-after-append")],
    );
    cluster.wait_ready().await;
    // The recipient is connected (ack mode: nothing leaves the inbox until
    // he acknowledges it) on a gateway that outlives the delivery process.
    let mut bob = Client::login_with(&cluster.url(), "demo-bob", true).await;
    let credentials = || MeshCredentials::new(support::cluster::TEST_SECRET).expect("secret");
    let router = RouterClient::from_pool(Pool::fixed(
        "router",
        support::mesh_channel(cluster.proc("core").mesh_addr).await,
        credentials(),
    ));
    let envelope = support::client_id_envelope("client-7", "exactly once");
    let route = |envelope: pb::Envelope| {
        let router = router.clone();
        async move {
            router
                .route(pb::RouteRequest {
                    envelope: Some(envelope),
                })
                .await
        }
    };
    // Routes until one succeeds: the router finds a restarted delivery
    // through etcd; until then a route may fail as unavailable.
    let route_until_ok = |envelope: pb::Envelope| {
        let route = &route;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match route(envelope.clone()).await {
                    Ok(reply) => break reply,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("route: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("route: {e}"),
                }
            }
        }
    };
    // A FAST message is not stored: it passes the failpoint, and shows the
    // router reaches the new delivery process.
    route_until_ok(pb::Envelope {
        id: switchboard_mesh::new_message_id(),
        client_id: false,
        feature: pb::Feature::Fast.into(),
        ..envelope.clone()
    })
    .await;
    let lost = tokio::time::timeout(Duration::from_secs(30), route(envelope.clone())).await;
    assert!(
        !matches!(lost, Ok(Ok(_))),
        "no reply from a process that died: {lost:?}"
    );
    let exit = cluster
        .wait_exit("delivery", Duration::from_secs(10))
        .await
        .expect("delivery dies at the failpoint");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(exit.signal(), Some(6), "aborted (SIGABRT): {exit}");

    cluster.restart("delivery");
    cluster.wait_ready().await;
    let again = route_until_ok(envelope.clone()).await;
    assert_eq!(again.repeated, vec![0], "answered as a repeat");
    // Its first push never went out (the process died before): the repeat
    // pushes the stored message, once.
    let pushed = loop {
        let m = bob.recv_type("MESSAGE").await;
        if m["data"]["id"] == "client-7" {
            break m;
        }
    };
    assert_eq!(pushed["data"]["content"], "exactly once");
    bob.expect_silence(Duration::from_millis(500)).await;
    let delivery = DeliveryClient::from_pool(Pool::fixed(
        "delivery",
        support::mesh_channel(cluster.proc("delivery").mesh_addr).await,
        credentials(),
    ));
    let inbox = support::bob_inbox(&delivery).await;
    let ids: Vec<&str> = inbox.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["client-7"], "stored exactly once");
    cluster.shutdown().await;
}
