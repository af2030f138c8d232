//! The cluster's batched hops (gateway → router → delivery → gateway) with
//! many senders at once, so that calls of different connections share
//! batches: per-sender order, nothing lost or doubled, and kill -9 of the
//! router or of delivery with batches in flight loses no accepted message.
//! Batching is opt-in (`[mesh_batch] enabled`): these clusters turn it on.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::Client;
use support::cluster::{Cluster, FULL_SHAPE, Infra};

/// Generous: every process shares two busy cores.
const PATIENCE: Duration = Duration::from_secs(60);

/// `(sender, index)` from a `s<sender>-<index>` content.
fn parse(frame: &Value) -> (usize, usize) {
    frame["data"]["content"]
        .as_str()
        .and_then(|c| c.strip_prefix('s'))
        .and_then(|c| c.split_once('-'))
        .and_then(|(s, i)| Some((s.parse().ok()?, i.parse().ok()?)))
        .unwrap_or_else(|| panic!("unexpected content in {frame}"))
}

fn message(to: &str, content: &str, feature: &str, reference: &str) -> Value {
    json!({
        "type": "MESSAGE",
        "data": {"to": to, "content": content},
        "feature": feature,
        "reference": reference,
    })
}

/// Waits until `done` holds, checking every few milliseconds, for at most
/// `PATIENCE`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn many_senders_keep_their_order_through_batched_hops_with_nothing_lost_or_doubled() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    const SENDERS: usize = 8;
    const RECIPIENTS: usize = 4;
    const N: usize = 200;
    let cluster = Cluster::start(infra, FULL_SHAPE, |c| {
        c.mesh_batch.enabled = true;
        c.limits.messages_per_second = 100_000;
    })
    .await;
    let gw = [cluster.proc("gw1").url(), cluster.proc("gw2").url()];

    let mut readers = Vec::new();
    for r in 0..RECIPIENTS {
        let mut client = Client::login(&gw[r % 2], &format!("demo-rcpt{r}")).await;
        readers.push(tokio::spawn(async move {
            let mut got: Vec<(usize, usize)> = Vec::new();
            // Every sender sends N / RECIPIENTS to each recipient.
            while got.len() < SENDERS * N / RECIPIENTS {
                let f = client
                    .try_recv(PATIENCE)
                    .await
                    .unwrap_or_else(|| panic!("rcpt{r} got only {} messages", got.len()));
                if f["type"] == "MESSAGE" {
                    got.push(parse(&f));
                }
            }
            (client, got)
        }));
    }

    // Half the senders FAST, half RELIABLE; each pipelines bursts of 10,
    // all at once, on both gateways.
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = Client::login(&gw[(s + 1) % 2], &format!("demo-snd{s}")).await;
        senders.push(tokio::spawn(async move {
            let feature = if s % 2 == 0 { "FAST" } else { "RELIABLE" };
            for burst in 0..N / 10 {
                let frames: Vec<Value> = (burst * 10..burst * 10 + 10)
                    .map(|i| {
                        message(
                            &format!("demo-rcpt{}", i % RECIPIENTS),
                            &format!("s{s}-{i}"),
                            feature,
                            &format!("r{i}"),
                        )
                    })
                    .collect();
                client.send_burst(&frames).await;
            }
            client
        }));
    }
    let mut keep = Vec::new();
    for sender in senders {
        keep.push(sender.await.expect("sender"));
    }

    for (r, reader) in readers.into_iter().enumerate() {
        let (_client, got) = reader.await.expect("reader");
        let mut by_sender: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (s, i) in got {
            by_sender.entry(s).or_default().push(i);
        }
        assert_eq!(by_sender.len(), SENDERS, "rcpt{r} heard from every sender");
        for (s, order) in by_sender {
            let expected: Vec<usize> = (0..N).filter(|i| i % RECIPIENTS == r).collect();
            assert_eq!(
                order, expected,
                "rcpt{r} got sender {s}'s messages once each, in the order sent"
            );
        }
    }
    cluster.shutdown().await;
}

/// What one sender saw: accepted (index → id) and refused indexes.
#[derive(Default)]
struct Answers {
    accepted: BTreeMap<usize, String>,
    unavailable: BTreeSet<usize>,
}

async fn kill9_with_batches_in_flight_loses_no_accepted_message(victim: &str) {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    const SENDERS: usize = 6;
    const N: usize = 300;
    let mut cluster = Cluster::start(infra, FULL_SHAPE, |c| {
        c.mesh_batch.enabled = true;
        c.limits.messages_per_second = 100_000;
        c.limits.max_refusals = 100_000;
    })
    .await;
    let gw = [cluster.proc("gw1").url(), cluster.proc("gw2").url()];
    let accepted_total = Arc::new(AtomicUsize::new(0));
    let refused_total = Arc::new(AtomicUsize::new(0));

    // Recipient s reads until sender s's end marker, then fetches what
    // the push path lost in the crash.
    let mut readers = Vec::new();
    for s in 0..SENDERS {
        let mut client = Client::login(&gw[s % 2], &format!("demo-rcpt{s}")).await;
        readers.push(tokio::spawn(async move {
            let mut frames = Vec::new();
            loop {
                let f = client
                    .try_recv(PATIENCE * 2)
                    .await
                    .unwrap_or_else(|| panic!("rcpt{s} never got the end marker"));
                if f["type"] != "MESSAGE" {
                    continue;
                }
                if f["data"]["content"] == "end" {
                    break;
                }
                frames.push(f);
            }
            let (fetched, _) = client.fetch_all(1000).await;
            frames.extend(fetched.into_iter().filter(|f| f["type"] == "MESSAGE"));
            frames
        }));
    }

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut client = Client::login_with(&gw[(s + 1) % 2], &format!("demo-snd{s}"), true).await;
        let (accepted_total, refused_total) = (accepted_total.clone(), refused_total.clone());
        senders.push(tokio::spawn(async move {
            let to = format!("demo-rcpt{s}");
            for burst in 0..N / 10 {
                let frames: Vec<Value> = (burst * 10..burst * 10 + 10)
                    .map(|i| message(&to, &format!("s{s}-{i}"), "RELIABLE", &format!("r{i}")))
                    .collect();
                client.send_burst(&frames).await;
            }
            let mut answers = Answers::default();
            while answers.accepted.len() + answers.unavailable.len() < N {
                let f = client
                    .try_recv(PATIENCE * 2)
                    .await
                    .expect("every send is answered");
                let Some(i) = f["reference"]
                    .as_str()
                    .and_then(|r| r.strip_prefix('r'))
                    .and_then(|i| i.parse().ok())
                else {
                    continue;
                };
                match f["type"].as_str() {
                    Some("MESSAGE_ACCEPTED") => {
                        let id = f["data"]["id"].as_str().expect("id").to_owned();
                        assert!(
                            answers.accepted.insert(i, id).is_none(),
                            "r{i} accepted twice"
                        );
                        accepted_total.fetch_add(1, Ordering::SeqCst);
                    }
                    Some("ERROR") => {
                        assert_eq!(f["data"]["code"], "UNAVAILABLE", "{f}");
                        assert!(answers.unavailable.insert(i), "r{i} refused twice");
                        refused_total.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            (client, answers)
        }));
    }

    // Kill with a third of the messages accepted (the rest in flight or
    // queued), start again once sends are being refused.
    let total = SENDERS * N;
    let accepted = accepted_total.clone();
    until("a third of the sends accepted", || {
        accepted.load(Ordering::SeqCst) >= total / 3
    })
    .await;
    cluster.kill9(victim);
    let refused = refused_total.clone();
    let (accepted, refused_or_done) = (accepted_total.clone(), refused.clone());
    until("sends refused while it is down (or all answered)", || {
        refused_or_done.load(Ordering::SeqCst) > 0 || accepted.load(Ordering::SeqCst) == total
    })
    .await;
    cluster.restart(victim);

    let mut all_answers = Vec::new();
    for sender in senders {
        let (mut client, answers) = sender.await.expect("sender");
        // The last message: once it is pushed, everything before it was
        // pushed or is stored.
        client
            .send_accepted(&format!("demo-rcpt{}", all_answers.len()), "end", "end")
            .await;
        all_answers.push((client, answers));
    }
    let mut accepted_sum = 0;
    for (s, reader) in readers.into_iter().enumerate() {
        let frames = reader.await.expect("reader");
        let answers = &all_answers[s].1;
        accepted_sum += answers.accepted.len();
        let mut by_index: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        let mut copies: HashMap<String, usize> = HashMap::new();
        for f in &frames {
            let (from, i) = parse(f);
            assert_eq!(from, s, "rcpt{s} got only sender {s}'s messages");
            let id = f["data"]["id"].as_str().expect("id").to_owned();
            *copies.entry(id.clone()).or_default() += 1;
            by_index.entry(i).or_default().insert(id);
        }
        for (i, id) in &answers.accepted {
            assert!(
                by_index.get(i).is_some_and(|ids| ids.contains(id)),
                "accepted message s{s}-{i} ({id}) never reached rcpt{s}"
            );
        }
        for (i, ids) in &by_index {
            assert!(*i < N, "s{s}-{i} was never sent");
            assert_eq!(ids.len(), 1, "s{s}-{i} arrived under several ids: {ids:?}");
        }
        assert!(copies.len() <= answers.accepted.len() + answers.unavailable.len());
    }
    eprintln!(
        "{victim} kill -9 with batches in flight: {accepted_sum} of {total} accepted, {} refused",
        refused.load(Ordering::SeqCst)
    );
    assert!(accepted_sum > total / 3, "sends resumed after the restart");
    cluster.shutdown().await;
}

#[tokio::test]
async fn router_killed_with_batches_in_flight_loses_no_accepted_message() {
    kill9_with_batches_in_flight_loses_no_accepted_message("router").await;
}

#[tokio::test]
async fn delivery_killed_with_batches_in_flight_loses_no_accepted_message() {
    kill9_with_batches_in_flight_loses_no_accepted_message("delivery").await;
}
