//! The PostgreSQL store engine in the real binary: start-up against a bad
//! address or credential, messages kept across a kill -9, and sharded
//! delivery (several delivery processes, one killed, one added).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::{Cluster, Infra, SHARDED_SHAPE as SHARDED};
use support::postgres::{fresh_database, server};
use support::{Client, ProcessNode, free_port};
use switchboard_config::StoreEngine;

/// Runs `switchboard run` with a PostgreSQL store at `url`, expecting it to
/// exit by itself; its stderr.
async fn refused_start(url: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "run",
            "--client-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--mesh-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD_STORE__ENGINE", "postgres")
        .env("SWITCHBOARD_STORE__URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard kept running against {url}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(!status.success(), "{stderr}");
    stderr
}

#[tokio::test]
async fn a_wrong_address_fails_the_start_naming_it() {
    // Nothing listens there (bound and released).
    let port = free_port();
    let stderr = refused_start(&format!("postgres://sb:secret-pw@127.0.0.1:{port}/sb")).await;
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}/sb")),
        "names the address: {stderr}"
    );
    assert!(
        !stderr.contains("secret-pw"),
        "never the password: {stderr}"
    );
}

#[tokio::test]
async fn a_wrong_credential_fails_the_start_naming_it() {
    let Some(server) = server() else {
        return;
    };
    let url = fresh_database(&server).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host_and_db = rest.split_once('@').map_or(rest, |(_, r)| r);
    let stderr = refused_start(&format!("{scheme}://no-such-role@{host_and_db}")).await;
    assert!(stderr.contains(host_and_db), "names the address: {stderr}");
    assert!(
        stderr.contains("no-such-role"),
        "says what the server refused: {stderr}"
    );
}

#[tokio::test]
async fn stored_messages_survive_a_kill_9_on_postgres() {
    let Some(server) = server() else {
        return;
    };
    let url = fresh_database(&server).await;
    let env = [
        ("SWITCHBOARD_STORE__ENGINE", "postgres"),
        ("SWITCHBOARD_STORE__URL", url.as_str()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ProcessNode::start_with_env(dir.path(), &env).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    for i in 0..20 {
        ann.send_accepted("demo-bob", &format!("m{i}"), &format!("r{i}"))
            .await;
    }
    node.kill9();
    // Another data dir: nothing of the inboxes is kept in the process's.
    let other = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start_with_env(other.path(), &env).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(7).await;
    let contents: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .filter_map(|f| f["data"]["content"].as_str())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, want, "every accepted message, in order");
}

/// A cluster of `shape` storing in a fresh database; `None` (a recorded
/// skip) without etcd, Redis or PostgreSQL.
async fn sharded_cluster(shape: &[(&str, &str)]) -> Option<Cluster> {
    sharded_cluster_batching(shape, false).await
}

/// [`sharded_cluster`] with `[mesh_batch] enabled` set to `batching`.
async fn sharded_cluster_batching(shape: &[(&str, &str)], batching: bool) -> Option<Cluster> {
    let infra = Infra::from_env()?;
    let url = fresh_database(&server()?).await;
    Some(
        Cluster::start(infra, shape, move |c| {
            c.store.engine = StoreEngine::Postgres;
            c.store.url = url;
            c.limits.messages_per_second = 100_000;
            c.limits.max_refusals = 100_000;
            c.mesh_batch.enabled = batching;
        })
        .await,
    )
}

const SENDERS: usize = 4;
const RECIPIENTS: usize = 8;
const PER_SENDER: usize = 500;

/// `s<sender>-m<i>` → (sender, i).
fn parse_content(frame: &Value) -> (usize, usize) {
    frame["data"]["content"]
        .as_str()
        .and_then(|c| c.strip_prefix('s'))
        .and_then(|c| c.split_once("-m"))
        .and_then(|(s, i)| Some((s.parse().ok()?, i.parse().ok()?)))
        .unwrap_or_else(|| panic!("unexpected content in {frame}"))
}

/// What one recipient saw: (sender, index, id) in arrival order, pushed
/// and then fetched.
type Seen = (Vec<(usize, usize, String)>, Vec<(usize, usize, String)>);

/// 2,000 RELIABLE messages from four senders on gw1 to eight recipients on
/// gw2 (users `demo-<tag>s<n>` and `demo-<tag>r<n>`), all sent at once; `during` runs after each answer with the number
/// accepted so far and the recipient of the message just accepted (to
/// kill, restart or add processes, and to time a takeover). Checks that every
/// accepted message reached its recipient (pushed or fetched), each id
/// under one content, and that each sender's messages came in order per
/// recipient (on the push path and in the inbox).
async fn two_thousand_through(
    cluster: &mut Cluster,
    tag: &str,
    mut during: impl FnMut(&mut Cluster, usize, Option<usize>),
) -> (usize, usize) {
    many_through(cluster, tag, PER_SENDER, &mut during).await
}

/// [`two_thousand_through`] with `per_sender` messages from each sender.
async fn many_through(
    cluster: &mut Cluster,
    tag: &str,
    per_sender: usize,
    mut during: impl FnMut(&mut Cluster, usize, Option<usize>),
) -> (usize, usize) {
    let gw1 = cluster.proc("gw1").url();
    let gw2 = cluster.proc("gw2").url();
    let mut readers = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for r in 0..RECIPIENTS {
        let mut client = Client::login(&gw2, &format!("demo-{tag}r{r}")).await;
        let mut stop = stop_rx.clone();
        readers.push(tokio::spawn(async move {
            let mut pushed = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    f = client.try_recv(Duration::from_secs(120)) => match f {
                        Some(f) if f["type"] == "MESSAGE" => {
                            let (s, i) = parse_content(&f);
                            pushed.push((s, i, f["data"]["id"].as_str().expect("id").to_owned()));
                        }
                        Some(_) => {}
                        None => panic!("a recipient's connection ended"),
                    },
                }
            }
            (client, pushed)
        }));
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(Client::login_with(&gw1, &format!("demo-{tag}s{s}"), true).await);
    }
    for (s, sender) in senders.iter_mut().enumerate() {
        let frames: Vec<Value> = (0..per_sender)
            .map(|i| {
                json!({
                    "type": "MESSAGE",
                    "data": {"to": format!("demo-{tag}r{}", i % RECIPIENTS), "content": format!("s{s}-m{i}")},
                    "feature": "RELIABLE",
                    "reference": format!("r{i}"),
                })
            })
            .collect();
        sender.send_burst(&frames).await;
    }
    // Every send is answered: accepted (with its id) or refused.
    let mut accepted: BTreeMap<(usize, usize), String> = BTreeMap::new();
    let mut refused = 0usize;
    let mut pending: Vec<usize> = vec![per_sender; SENDERS];
    while pending.iter().any(|&n| n > 0) {
        for (s, sender) in senders.iter_mut().enumerate() {
            while pending[s] > 0 {
                let Some(f) = sender.try_recv(Duration::from_millis(20)).await else {
                    break;
                };
                let Some(i) = f["reference"]
                    .as_str()
                    .and_then(|r| r.strip_prefix('r'))
                    .and_then(|i| i.parse::<usize>().ok())
                else {
                    continue;
                };
                let mut to = None;
                match f["type"].as_str() {
                    Some("MESSAGE_ACCEPTED") => {
                        let id = f["data"]["id"].as_str().expect("id").to_owned();
                        assert!(accepted.insert((s, i), id).is_none(), "s{s} r{i} twice");
                        to = Some(i % RECIPIENTS);
                    }
                    Some("ERROR") => {
                        assert_eq!(f["data"]["code"], "UNAVAILABLE", "{f}");
                        refused += 1;
                    }
                    _ => continue,
                }
                pending[s] -= 1;
                during(cluster, accepted.len(), to);
            }
        }
    }
    // What the push path lost in a crash is still stored: fetch it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let mut seen: Vec<Seen> = Vec::new();
    for reader in readers {
        let (mut client, pushed) = reader.await.expect("reader");
        let (fetched, _) = client.fetch_all(500).await;
        let fetched = fetched
            .iter()
            .filter(|f| f["type"] == "MESSAGE")
            .map(|f| {
                let (s, i) = parse_content(f);
                (s, i, f["data"]["id"].as_str().expect("id").to_owned())
            })
            .collect();
        seen.push((pushed, fetched));
    }
    let mut ids_of: HashMap<(usize, usize), BTreeSet<String>> = HashMap::new();
    for (r, (pushed, fetched)) in seen.iter().enumerate() {
        for part in [pushed, fetched] {
            // Per sender, first copies in increasing order.
            let mut last: HashMap<usize, usize> = HashMap::new();
            let mut firsts: BTreeSet<&str> = BTreeSet::new();
            for (s, i, id) in part {
                assert_eq!(i % RECIPIENTS, r, "s{s}-m{i} reached demo-r{r}");
                ids_of.entry((*s, *i)).or_default().insert(id.clone());
                if !firsts.insert(id) {
                    continue;
                }
                if let Some(prev) = last.insert(*s, *i) {
                    assert!(prev < *i, "demo-r{r} got s{s}-m{i} after s{s}-m{prev}");
                }
            }
        }
    }
    for ((s, i), id) in &accepted {
        assert!(
            ids_of.get(&(*s, *i)).is_some_and(|ids| ids.contains(id)),
            "accepted s{s}-m{i} ({id}) never reached demo-r{}",
            i % RECIPIENTS
        );
    }
    for ((s, i), ids) in &ids_of {
        assert_eq!(ids.len(), 1, "s{s}-m{i} arrived under several ids: {ids:?}");
    }
    (accepted.len(), refused)
}

#[tokio::test]
async fn a_killed_delivery_process_hands_its_inboxes_to_the_others() {
    let Some(mut cluster) = sharded_cluster(SHARDED).await else {
        return;
    };
    // The process that owns demo-r0's inbox is the one killed.
    let victim = cluster.owner_of(
        &["d1", "d2", "d3"],
        &switchboard_mesh::inbox_key("demo", "demo-r0"),
    );
    let mut killed_at: Option<Instant> = None;
    let mut probe = None;
    let mut restarted = false;
    let gw1 = cluster.proc("gw1").url();
    let (accepted, refused) = two_thousand_through(&mut cluster, "", |cluster, accepted, _| {
        if killed_at.is_none() && accepted >= 500 {
            cluster.kill9(&victim);
            let at = Instant::now();
            killed_at = Some(at);
            // From the kill on, one fresh send to demo-r0 at a time until
            // one is accepted: when its inbox is served again.
            let gw1 = gw1.clone();
            probe = Some(tokio::spawn(async move {
                let mut prober = Client::login_with(&gw1, "demo-probe", true).await;
                let mut k = 0;
                loop {
                    prober
                        .message("demo-r0", &format!("s9-m{k}"), "RELIABLE", "probe")
                        .await;
                    k += RECIPIENTS;
                    loop {
                        let f = prober.recv().await;
                        match f["type"].as_str() {
                            Some("MESSAGE_ACCEPTED") => return at.elapsed(),
                            Some("ERROR") => break,
                            _ => {}
                        }
                    }
                }
            }));
            return;
        }
        if let (Some(at), false) = (killed_at, restarted)
            && at.elapsed() > Duration::from_secs(6)
        {
            cluster.restart(&victim);
            restarted = true;
        }
    })
    .await;
    let served_again = match probe {
        Some(probe) => Some(probe.await.expect("probe")),
        None => None,
    };
    eprintln!(
        "kill -9 of one of three delivery processes ({victim}): {accepted} accepted, {refused} refused; \
         its inbox demo-r0 took a new message {served_again:?} after the kill"
    );
    assert!(killed_at.is_some(), "{victim} was killed mid-way");
    assert!(
        accepted > 1500,
        "the survivors took {victim}'s inboxes over ({accepted} accepted)"
    );
    if !restarted {
        cluster.restart(&victim);
    }
    cluster.wait_ready().await;
    // Every inbox is served again, by three processes.
    let mut a = Client::login_with(&cluster.proc("gw1").url(), "demo-a", true).await;
    for r in 0..RECIPIENTS {
        a.send_accepted(&format!("demo-r{r}"), "after", &format!("after{r}"))
            .await;
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn delivery_scales_out_from_two_to_three_under_load() {
    let Some(mut cluster) = sharded_cluster(&SHARDED[..5]).await else {
        return;
    };
    let mut added = false;
    let (accepted, refused) = two_thousand_through(&mut cluster, "", |cluster, accepted, _| {
        if !added && accepted >= 500 {
            cluster.add("d3", "delivery", |_| {});
            added = true;
        }
    })
    .await;
    eprintln!(
        "scale-out from two to three delivery processes: {accepted} accepted, {refused} refused"
    );
    assert!(added);
    assert_eq!(
        accepted,
        SENDERS * PER_SENDER,
        "a process joining refuses nothing"
    );
    cluster.shutdown().await;
}

/// Messages per sender while inboxes move: enough that the load outlasts
/// a process's start and the member list settling.
const MOVING: usize = 2_500;

/// With `[mesh_batch] enabled`, inboxes move while four senders pipeline
/// to eight recipients: to a third delivery process that joins, then back
/// to the first two when it stops. Each sender's messages reach each
/// recipient in order, pushed and fetched, and nothing accepted is lost.
/// Not in the default run: one run in about ninety on a busy machine
/// stalled before any move (see `[mesh_batch]` in docs/operations.md).
#[tokio::test]
#[ignore = "batched sharded delivery stalled once in ~90 runs on a busy machine; run with --ignored"]
async fn batched_delivery_keeps_order_while_scaling_out_and_back_in_under_load() {
    let Some(mut cluster) = sharded_cluster_batching(&SHARDED[..5], true).await else {
        return;
    };
    let mut added = false;
    let (accepted, refused) = many_through(&mut cluster, "out", MOVING, |cluster, accepted, _| {
        if !added && accepted >= 500 {
            cluster.add("d3", "delivery", |_| {});
            added = true;
        }
    })
    .await;
    eprintln!("batched scale-out from two to three: {accepted} accepted, {refused} refused");
    assert!(added);
    assert_eq!(
        accepted,
        SENDERS * MOVING,
        "a process joining refuses nothing"
    );
    // Every process knows d3 before it leaves again.
    cluster.wait_known().await;
    let mut stopped = false;
    let (accepted, refused) = many_through(&mut cluster, "in", MOVING, |cluster, accepted, _| {
        if !stopped && accepted >= 500 {
            // SIGTERM without waiting: the stop drains while sends go on.
            let pid = cluster.proc("d3").pid().expect("d3 runs");
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            stopped = true;
        }
    })
    .await;
    eprintln!("batched scale-in from three to two: {accepted} accepted, {refused} refused");
    assert!(stopped);
    cluster.shutdown().await;
}
