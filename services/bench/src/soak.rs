//! `switchboard soak`: a mixed workload held for a long time, reporting
//! every interval what a soak is for — the server's memory and open files,
//! what is stored and not yet delivered, and whether anything was lost.
//!
//! The users (`--users`, all in acknowledged mode) play three parts by
//! index: seven in ten are *steady* (always connected; they send), two in
//! ten *churn* (connect, fetch what they missed, stay a few seconds, leave,
//! stay away a few seconds) and one in ten is *slow* (reads one frame a
//! second, fewer than it is sent, so its send queue grows until the server
//! closes it as a slow consumer; it reconnects). Steady users send, in
//! turn: RELIABLE direct messages to anyone, FAST direct messages to steady
//! users (counted for loss: both ends are always online) and to slow users
//! (not counted: the server may drop them), and, one send in twenty, a
//! RELIABLE GROUP_MESSAGE to eight users.
//!
//! Every RELIABLE copy is tracked by (recipient, id) from the moment it is
//! sent; `MESSAGE_ACCEPTED` marks it stored, an `ERROR` carrying its id as
//! reference marks it refused. A stored copy never received by the end of
//! the drain is *lost*. At the end every churning and slow user connects
//! and fetches until its inbox is empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::{BenchError, Ws, connect, lock, raise_file_limit};

/// Options of `switchboard soak`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SoakArgs {
    /// Server URL; repeat for several (users are spread round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8088/ws")]
    pub urls: Vec<String>,
    /// How long to send.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "crate::secs")]
    pub duration: Duration,
    /// Sends per second, all steady users together (a GROUP_MESSAGE is one
    /// send and eight copies).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Users; a tenth are slow, a fifth churn.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Characters of message content.
    #[arg(long, short = 'p', default_value_t = 200)]
    pub payload: usize,
    /// Time between two report lines.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "crate::secs")]
    pub report_every: Duration,
    /// Longest wait after the sending for stored messages to arrive.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "crate::secs")]
    pub drain: Duration,
    /// Server processes to sample (RSS and open files from /proc); repeat
    /// for a cluster, the figures are summed.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// appId to authenticate with.
    #[arg(long, default_value = "demo")]
    pub app_id: String,
    /// App name: user ids are `<app-name>-soak-<run>-<i>`.
    #[arg(long, default_value = "demo")]
    pub app_name: String,
    /// Token sent in AUTH_CLIENT.
    #[arg(long, default_value = "")]
    #[serde(skip)]
    pub token: String,
}

/// One report line.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSample {
    pub seconds: f64,
    /// Resident memory of the sampled server processes, MiB (0 without --pid).
    pub rss_mib: f64,
    /// Open files of the sampled server processes.
    pub open_files: u64,
    pub sent_reliable: u64,
    pub sent_fast: u64,
    pub sent_group: u64,
    /// RELIABLE copies stored and not yet received: the inboxes' total as
    /// far as this generator knows.
    pub stored_undelivered: u64,
    /// The oldest of those, seconds.
    pub oldest_undelivered_s: f64,
    pub received: u64,
    pub connects: u64,
    pub slow_consumer_closes: u64,
    pub other_server_closes: u64,
    pub refused: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub options: SoakArgs,
    pub samples: Vec<SoakSample>,
    /// RELIABLE copies stored (accepted) and never received.
    pub lost_reliable: u64,
    /// RELIABLE copies sent whose send was neither accepted nor refused
    /// (the sender's connection broke first); not counted as lost.
    pub unconfirmed_reliable: u64,
    /// RELIABLE copies received again after their first arrival
    /// (redelivery of an unacknowledged message: allowed, counted).
    pub redelivered: u64,
    /// FAST messages between steady users sent and not received.
    pub lost_fast: u64,
    pub fast_between_steady: u64,
    /// Up to 20 lost copies, as `id -> recipient`, to look up in the
    /// server's log and traces.
    pub lost_examples: Vec<String>,
    pub refused_by_code: std::collections::BTreeMap<String, u64>,
    pub server_closes: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Steady,
    Churn,
    Slow,
}

fn part(i: usize) -> Part {
    match i % 10 {
        7 | 8 => Part::Churn,
        9 => Part::Slow,
        _ => Part::Steady,
    }
}

/// A RELIABLE send in flight: who has not received it yet.
struct Pending {
    left: Vec<u32>,
    accepted: bool,
    at: Instant,
}

#[derive(Default)]
struct Counters {
    sent_reliable: AtomicU64,
    sent_fast: AtomicU64,
    sent_group: AtomicU64,
    fast_steady_sent: AtomicU64,
    fast_steady_received: AtomicU64,
    received: AtomicU64,
    redelivered: AtomicU64,
    connects: AtomicU64,
    refused: AtomicU64,
}

struct World {
    users: Vec<String>,
    pending: Mutex<HashMap<String, Pending>>,
    counters: Counters,
    refused_by_code: Mutex<std::collections::BTreeMap<String, u64>>,
    server_closes: Mutex<std::collections::BTreeMap<String, u64>>,
    hello: Vec<String>,
    urls: Vec<String>,
    payload: String,
    run: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Sending,
    /// Senders stop; churning and slow users come online and fetch.
    Drain,
    Done,
}

/// A small deterministic generator (xorshift), one per task.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs the soak; one report line per `--report-every` goes to stderr as it
/// is taken.
pub async fn run(args: SoakArgs) -> Result<SoakReport, BenchError> {
    if args.urls.is_empty() || args.users < 20 {
        return Err(BenchError::Options(
            "need at least one --url and 20 users".into(),
        ));
    }
    if !args.rate.is_finite() || args.rate <= 0.0 || args.rate > 1_000_000.0 {
        return Err(BenchError::Options(
            "--rate must be between 0 and 1000000 sends per second".into(),
        ));
    }
    let limit = raise_file_limit();
    let needed = args.users as u64 + 64;
    if needed > limit {
        return Err(BenchError::FileLimit { needed, limit });
    }
    let run_id = format!("{:x}", std::process::id() ^ crate::shared_seed());
    let users: Vec<String> = (0..args.users)
        .map(|i| format!("{}-soak-{run_id}-{i}", args.app_name))
        .collect();
    let hello = users
        .iter()
        .map(|u| {
            serde_json::json!({"type": "AUTH_CLIENT", "data": {
                "appId": args.app_id, "userId": u, "token": args.token, "acks": true}})
            .to_string()
        })
        .collect();
    let world = Arc::new(World {
        users,
        pending: Mutex::default(),
        counters: Counters::default(),
        refused_by_code: Mutex::default(),
        server_closes: Mutex::default(),
        hello,
        urls: args.urls.clone(),
        payload: "x".repeat(args.payload),
        run: run_id,
    });
    let steady: Vec<u32> = (0..args.users)
        .filter(|&i| part(i) == Part::Steady)
        .map(|i| i as u32)
        .collect();
    let slow: Vec<u32> = (0..args.users)
        .filter(|&i| part(i) == Part::Slow)
        .map(|i| i as u32)
        .collect();
    let per_sender = Duration::from_secs_f64(steady.len() as f64 / args.rate);
    let (phase_tx, phase_rx) = watch::channel(Phase::Sending);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let targets = Arc::new((steady.clone(), slow));
    for i in 0..args.users {
        let world = world.clone();
        let phase = phase_rx.clone();
        let targets = targets.clone();
        tasks.spawn(async move {
            match part(i) {
                Part::Steady => steady_user(world, i, per_sender, targets, phase).await,
                Part::Churn | Part::Slow => visiting_user(world, i, phase).await,
            }
        });
    }

    let mut samples = Vec::new();
    let mut next_report = started + args.report_every;
    let send_until = started + args.duration;
    loop {
        let now = Instant::now();
        if now >= send_until {
            break;
        }
        tokio::time::sleep_until(next_report.min(send_until)).await;
        if Instant::now() >= next_report {
            let s = sample(&world, &args.pids, started);
            eprintln!("{}", format_sample(&s));
            samples.push(s);
            next_report += args.report_every;
        }
    }
    let _ = phase_tx.send(Phase::Drain);
    let drain_until = Instant::now() + args.drain;
    // Senders finish the send they are in; then wait for every stored copy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while Instant::now() < drain_until && stored_undelivered(&world).0 > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = sample(&world, &args.pids, started);
    eprintln!("{} (after the drain)", format_sample(&last));
    samples.push(last);
    let _ = phase_tx.send(Phase::Done);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let (lost, _) = stored_undelivered(&world);
    let lost_examples = {
        let pending = lock(&world.pending);
        let mut examples = Vec::new();
        for (id, p) in pending.iter().filter(|(_, p)| p.accepted) {
            for r in &p.left {
                examples.push(format!("{id} -> {}", world.users[*r as usize]));
            }
        }
        examples.truncate(20);
        examples
    };
    let unconfirmed = lock(&world.pending)
        .values()
        .filter(|p| !p.accepted)
        .map(|p| p.left.len() as u64)
        .sum();
    let c = &world.counters;
    let fast_sent = c.fast_steady_sent.load(Ordering::Relaxed);
    let fast_received = c.fast_steady_received.load(Ordering::Relaxed);
    Ok(SoakReport {
        options: args,
        samples,
        lost_reliable: lost,
        unconfirmed_reliable: unconfirmed,
        redelivered: c.redelivered.load(Ordering::Relaxed),
        lost_fast: fast_sent.saturating_sub(fast_received),
        fast_between_steady: fast_sent,
        lost_examples,
        refused_by_code: lock(&world.refused_by_code).clone(),
        server_closes: lock(&world.server_closes).clone(),
    })
}

/// Stored copies not received yet, and the age of the oldest (seconds).
fn stored_undelivered(world: &World) -> (u64, f64) {
    let pending = lock(&world.pending);
    let mut count = 0;
    let mut oldest = 0.0f64;
    for p in pending.values().filter(|p| p.accepted) {
        count += p.left.len() as u64;
        oldest = oldest.max(p.at.elapsed().as_secs_f64());
    }
    (count, oldest)
}

fn sample(world: &World, pids: &[u32], started: Instant) -> SoakSample {
    let (rss_kib, open_files) = pids.iter().fold((0u64, 0u64), |(rss, files), pid| {
        (rss + rss_kib(*pid), files + open_files(*pid))
    });
    let (undelivered, oldest) = stored_undelivered(world);
    let c = &world.counters;
    let closes = lock(&world.server_closes);
    let slow_closes = closes
        .iter()
        .filter(|(k, _)| k.contains("slow consumer"))
        .map(|(_, n)| *n)
        .sum();
    let all_closes: u64 = closes.values().sum();
    SoakSample {
        seconds: started.elapsed().as_secs_f64(),
        rss_mib: rss_kib as f64 / 1024.0,
        open_files,
        sent_reliable: c.sent_reliable.load(Ordering::Relaxed),
        sent_fast: c.sent_fast.load(Ordering::Relaxed),
        sent_group: c.sent_group.load(Ordering::Relaxed),
        stored_undelivered: undelivered,
        oldest_undelivered_s: oldest,
        received: c.received.load(Ordering::Relaxed),
        connects: c.connects.load(Ordering::Relaxed),
        slow_consumer_closes: slow_closes,
        other_server_closes: all_closes - slow_closes,
        refused: c.refused.load(Ordering::Relaxed),
    }
}

/// `VmRSS` of a process in KiB; 0 when it cannot be read.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// One line per sample.
pub fn format_sample(s: &SoakSample) -> String {
    format!(
        "t={:.0}s rss={:.1}MiB files={} sent R={} F={} G={} received={} stored-undelivered={} (oldest {:.1}s) connects={} slow-closes={} other-closes={} refused={}",
        s.seconds,
        s.rss_mib,
        s.open_files,
        s.sent_reliable,
        s.sent_fast,
        s.sent_group,
        s.received,
        s.stored_undelivered,
        s.oldest_undelivered_s,
        s.connects,
        s.slow_consumer_closes,
        s.other_server_closes,
        s.refused
    )
}

async fn open(world: &World, i: usize) -> Option<Ws> {
    let url = &world.urls[i % world.urls.len()];
    match connect(url, world.hello[i].clone()).await {
        Ok(ws) => {
            world.counters.connects.fetch_add(1, Ordering::Relaxed);
            Some(ws)
        }
        Err(e) => {
            tracing::warn!(user = i, error = %e, "soak: connect failed");
            None
        }
    }
}

/// What one received frame asks of its connection.
enum Reply {
    None,
    Ack(String),
    FetchMore,
}

/// Accounts for one frame received by user `me`.
fn on_frame(world: &World, me: u32, text: &str) -> Reply {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Reply::None;
    };
    let data = &v["data"];
    match v["type"].as_str() {
        Some("MESSAGE") => {
            world.counters.received.fetch_add(1, Ordering::Relaxed);
            let Some(id) = data["id"].as_str() else {
                return Reply::None;
            };
            if data.get("seq").is_none() {
                if data["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("F|"))
                {
                    world
                        .counters
                        .fast_steady_received
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Reply::None;
            }
            let mut pending = lock(&world.pending);
            let first = match pending.get_mut(id) {
                Some(p) => match p.left.iter().position(|r| *r == me) {
                    Some(k) => {
                        p.left.swap_remove(k);
                        // Arrival proves it was stored, even when the
                        // acceptance is still on its way to the sender.
                        p.accepted = true;
                        if p.left.is_empty() {
                            pending.remove(id);
                        }
                        true
                    }
                    None => false,
                },
                None => false,
            };
            drop(pending);
            if !first {
                world.counters.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            Reply::Ack(id.to_owned())
        }
        Some("MESSAGE_ACCEPTED") => {
            if let Some(id) = data["id"].as_str()
                && let Some(p) = lock(&world.pending).get_mut(id)
            {
                p.accepted = true;
            }
            Reply::None
        }
        Some("ERROR") => {
            world.counters.refused.fetch_add(1, Ordering::Relaxed);
            let code = data["code"].as_str().unwrap_or("?").to_owned();
            *lock(&world.refused_by_code).entry(code).or_default() += 1;
            if let Some(id) = v["reference"].as_str() {
                lock(&world.pending).remove(id);
            }
            Reply::None
        }
        Some("FETCH_MISSING_MESSAGES_COMPLETE") if data["leftMissingCount"].as_u64() > Some(0) => {
            Reply::FetchMore
        }
        _ => Reply::None,
    }
}

fn note_close(world: &World, msg: &Message) {
    if let Message::Close(Some(frame)) = msg
        && u16::from(frame.code) != 1000
    {
        let key = format!("{} {}", u16::from(frame.code), frame.reason);
        *lock(&world.server_closes).entry(key).or_default() += 1;
    }
}

/// Accounts for one frame received by user `me`; what to send back.
fn answer(world: &World, me: u32, msg: &Message) -> Option<Message> {
    note_close(world, msg);
    let Message::Text(t) = msg else {
        return None;
    };
    match on_frame(world, me, t.as_str()) {
        Reply::Ack(id) => Some(ack(&id)),
        Reply::FetchMore => Some(Message::text(FETCH)),
        Reply::None => None,
    }
}

const FETCH: &str = r#"{"type":"FETCH_MISSING_MESSAGES_REQUEST","data":{"count":500}}"#;

fn ack(id: &str) -> Message {
    Message::Text(format!(r#"{{"type":"ACK","data":{{"ids":["{id}"]}}}}"#).into())
}

/// A steady user: always connected (reconnects if closed), sends on its
/// schedule, acknowledges what it receives.
async fn steady_user(
    world: Arc<World>,
    i: usize,
    every: Duration,
    targets: Arc<(Vec<u32>, Vec<u32>)>,
    mut phase: watch::Receiver<Phase>,
) {
    let me = i as u32;
    let mut rng = Rng::new(i as u64 + 1);
    let mut k: u64 = 0;
    // Spread the senders over one interval.
    let offset = every.mul_f64(rng.below(1000) as f64 / 1000.0);
    let mut tick = tokio::time::interval_at(Instant::now() + offset, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'connection: while *phase.borrow() != Phase::Done {
        let Some(mut ws) = open(&world, i).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        ws.send(Message::text(FETCH)).await.ok();
        loop {
            let sending = *phase.borrow() == Phase::Sending;
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Done {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
                _ = tick.tick(), if sending => {
                    let frame = next_send(&world, me, k, &mut rng, &targets);
                    k += 1;
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        continue 'connection;
                    }
                }
                msg = ws.next() => {
                    let Some(Ok(msg)) = msg else { continue 'connection };
                    if let Some(out) = answer(&world, me, &msg) && ws.send(out).await.is_err() {
                        continue 'connection;
                    }
                }
            }
        }
    }
}

/// The next frame of steady user `me`, its copies recorded first.
fn next_send(
    world: &World,
    me: u32,
    k: u64,
    rng: &mut Rng,
    targets: &(Vec<u32>, Vec<u32>),
) -> String {
    let (steady, slow) = targets;
    let id = format!("s{}-{me}-{k}", world.run);
    let c = &world.counters;
    if k.is_multiple_of(20) {
        let to: Vec<u32> = (0..8)
            .map(|_| rng.below(world.users.len()) as u32)
            .collect();
        let mut to_sorted = to.clone();
        to_sorted.sort_unstable();
        to_sorted.dedup();
        // A group message does not come back to its sender (its other
        // devices get MESSAGE_SENT).
        to_sorted.retain(|r| *r != me);
        track(world, &id, to_sorted.clone());
        c.sent_group.fetch_add(1, Ordering::Relaxed);
        let names: Vec<&str> = to_sorted
            .iter()
            .map(|r| world.users[*r as usize].as_str())
            .collect();
        return serde_json::json!({"type": "GROUP_MESSAGE", "feature": "RELIABLE", "reference": id,
            "data": {"to": names, "content": format!("G|{}", world.payload), "id": id}})
        .to_string();
    }
    if k.is_multiple_of(2) {
        let to = rng.below(world.users.len()) as u32;
        track(world, &id, vec![to]);
        c.sent_reliable.fetch_add(1, Ordering::Relaxed);
        return message(world, to, &id, "R", "RELIABLE");
    }
    c.sent_fast.fetch_add(1, Ordering::Relaxed);
    if k % 10 == 3 && !slow.is_empty() {
        let to = slow[rng.below(slow.len())];
        return message(world, to, &id, "S", "FAST");
    }
    let to = steady[rng.below(steady.len())];
    c.fast_steady_sent.fetch_add(1, Ordering::Relaxed);
    message(world, to, &id, "F", "FAST")
}

fn message(world: &World, to: u32, id: &str, kind: &str, feature: &str) -> String {
    serde_json::json!({"type": "MESSAGE", "feature": feature, "reference": id,
        "data": {"to": world.users[to as usize], "content": format!("{kind}|{}", world.payload), "id": id}})
    .to_string()
}

fn track(world: &World, id: &str, to: Vec<u32>) {
    lock(&world.pending).insert(
        id.to_owned(),
        Pending {
            left: to,
            accepted: false,
            at: Instant::now(),
        },
    );
}

/// A churning or slow user: comes and goes (churn) or reads slowly (slow);
/// in the drain both stay online and fetch until their inbox is empty.
async fn visiting_user(world: Arc<World>, i: usize, mut phase: watch::Receiver<Phase>) {
    let me = i as u32;
    let slow = part(i) == Part::Slow;
    let mut rng = Rng::new(i as u64 + 7);
    while *phase.borrow() != Phase::Done {
        let draining = *phase.borrow() == Phase::Drain;
        if !draining && !slow {
            // Away for 1–5 s.
            let away = Duration::from_millis(1000 + rng.below(4000) as u64);
            tokio::select! {
                _ = tokio::time::sleep(away) => {}
                _ = phase.changed() => {}
            }
        }
        let Some(mut ws) = open(&world, i).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if ws.send(Message::text(FETCH)).await.is_err() {
            continue;
        }
        // Online for 2–8 s (churn), until closed (slow), or to the end.
        let stay = Duration::from_millis(2000 + rng.below(6000) as u64);
        let leave_at = (!draining && !slow).then(|| Instant::now() + stay);
        loop {
            let until = leave_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Done {
                        let _ = ws.close(None).await;
                        return;
                    }
                    if *phase.borrow() == Phase::Drain {
                        // Come back online at once and stay.
                        let _ = ws.close(None).await;
                        break;
                    }
                }
                _ = tokio::time::sleep_until(until), if leave_at.is_some() => {
                    let _ = ws.close(None).await;
                    break;
                }
                msg = ws.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    if let Some(out) = answer(&world, me, &msg) && ws.send(out).await.is_err() {
                        break;
                    }
                    if slow && *phase.borrow() == Phase::Sending {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_seven_steady_two_churn_one_slow_in_ten() {
        let parts: Vec<Part> = (0..10).map(part).collect();
        assert_eq!(parts.iter().filter(|p| **p == Part::Steady).count(), 7);
        assert_eq!(parts.iter().filter(|p| **p == Part::Churn).count(), 2);
        assert_eq!(parts.iter().filter(|p| **p == Part::Slow).count(), 1);
    }

    fn world(n: usize) -> World {
        let users: Vec<String> = (0..n).map(|i| format!("demo-{i}")).collect();
        World {
            users,
            pending: Mutex::default(),
            counters: Counters::default(),
            refused_by_code: Mutex::default(),
            server_closes: Mutex::default(),
            hello: Vec::new(),
            urls: vec!["ws://127.0.0.1:1/ws".into()],
            payload: "x".into(),
            run: "r".into(),
        }
    }

    #[test]
    fn a_stored_copy_counts_until_its_recipient_receives_it_once() {
        let w = world(3);
        track(&w, "m1", vec![1, 2]);
        assert_eq!(stored_undelivered(&w).0, 0, "not accepted yet");
        on_frame(&w, 0, r#"{"type":"MESSAGE_ACCEPTED","data":{"id":"m1"}}"#);
        assert_eq!(stored_undelivered(&w).0, 2);
        let frame =
            r#"{"type":"MESSAGE","data":{"from":"demo-0","content":"R|x","id":"m1","seq":1}}"#;
        assert!(matches!(on_frame(&w, 1, frame), Reply::Ack(id) if id == "m1"));
        assert_eq!(stored_undelivered(&w).0, 1);
        on_frame(&w, 1, frame);
        assert_eq!(w.counters.redelivered.load(Ordering::Relaxed), 1);
        on_frame(&w, 2, frame);
        assert_eq!(stored_undelivered(&w).0, 0);
        assert!(lock(&w.pending).is_empty());
    }

    #[test]
    fn a_refused_send_is_not_counted_as_lost() {
        let w = world(2);
        track(&w, "m2", vec![1]);
        on_frame(
            &w,
            0,
            r#"{"type":"ERROR","data":{"code":"RATE_LIMITED","message":"slow down"},"reference":"m2"}"#,
        );
        assert!(lock(&w.pending).is_empty());
        assert_eq!(lock(&w.refused_by_code).get("RATE_LIMITED"), Some(&1));
    }

    #[test]
    fn a_group_send_tracks_each_distinct_recipient() {
        let w = world(4);
        let mut rng = Rng::new(1);
        let frame = next_send(&w, 0, 0, &mut rng, &(vec![0, 1], vec![3]));
        let v: serde_json::Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(v["type"], "GROUP_MESSAGE");
        let to = v["data"]["to"].as_array().expect("to").len();
        let id = v["data"]["id"].as_str().expect("id");
        assert_eq!(lock(&w.pending)[id].left.len(), to);
    }
}
