//! `switchboard soak`: a mixed workload held for a long time, reporting
//! every interval what a soak is for — the server's memory and open files,
//! what is stored and not yet delivered, and whether anything was lost.
//!
//! Without `--rate` a short ramp first finds the node's capacity (RELIABLE
//! direct messages between connected pairs, `switchboard bench`'s
//! workload: the highest step with nothing lost, p99 ≤ 100 ms and ≥ 95 %
//! of its rate received) and the soak sends at half of it, counted in
//! pushes (a send of the mix below is 1.8 of them).
//!
//! The users (`--users`, all in acknowledged mode) play three parts by
//! index: seven in ten are *steady* (always connected; they send), two in
//! ten *churn* (connect, fetch what they missed, stay a few seconds, leave,
//! stay away a few seconds) and one in ten is *slow*: it reads at
//! `--slow-read-factor` times the rate it is sent (estimated from the
//! workload's mix), but stops reading for 10 s of every 30, so a backlog
//! builds in its send queue and is worked off: slow, never infinitely
//! behind. If the server closes it as a slow consumer it reconnects and is
//! sent its stored messages again. Steady users send, in turn: RELIABLE
//! direct messages to anyone, FAST direct messages to steady users
//! (counted for loss) and to slow users (not counted: the server may drop
//! them), and, one send in twenty, a RELIABLE GROUP_MESSAGE to eight users.
//!
//! Every RELIABLE copy is tracked by (recipient, id) from the moment it is
//! sent; `MESSAGE_ACCEPTED` marks it stored, an `ERROR` carrying its id as
//! reference marks it refused. A stored copy never received by the end of
//! the drain is *lost*. At the end every churning and slow user connects
//! and fetches until its inbox is empty. FAST messages between steady users
//! are tracked one by one too; one that never arrives is classified: its
//! recipient's or its sender's connection was down at the send or ended
//! within 10 s after it (FAST is dropped with a connection, by design),
//! refused, or unexplained.

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
    /// send and eight copies). Default: half of the capacity a short ramp
    /// finds first, in pushes (1.8 per send of the mix).
    #[arg(long)]
    pub rate: Option<f64>,
    /// A slow user reads this many times the rate it is sent (when it
    /// reads: it pauses 10 s in every 30).
    #[arg(long, default_value_t = 2.0)]
    pub slow_read_factor: f64,
    /// Connections of the capacity ramp (pairs sending to each other).
    #[arg(long, default_value_t = 200)]
    pub ramp_connections: usize,
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
    /// Of those, the copies for slow users.
    pub slow_undelivered: u64,
    /// The oldest of those, seconds.
    pub oldest_undelivered_s: f64,
    /// Sends per second since the previous sample (did the generator keep
    /// to its rate?).
    pub send_rate: f64,
    /// FAST messages between steady users not received yet (in flight).
    pub fast_in_flight: u64,
    pub received: u64,
    /// MESSAGE_CONFIRMATIONs received (and acknowledged).
    pub confirmations: u64,
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
    /// Why those were lost: `recipient_down` (the recipient's connection
    /// was down at the send or ended within 10 s after it),
    /// `sender_down` (the same for the sender's), `refused` (an ERROR for
    /// it), `unexplained`.
    pub lost_fast_by_cause: std::collections::BTreeMap<String, u64>,
    /// Sends per second the soak ran at.
    pub rate: f64,
    /// The ramp that chose it (absent with `--rate`).
    pub capacity: Option<Capacity>,
    /// Up to 20 lost copies, as `id -> recipient`, to look up in the
    /// server's log and traces.
    pub lost_examples: Vec<String>,
    pub refused_by_code: std::collections::BTreeMap<String, u64>,
    pub server_closes: std::collections::BTreeMap<String, u64>,
}

/// What the capacity ramp found.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// RELIABLE direct messages per second, the highest step that kept up.
    pub msgs_per_sec: f64,
    /// Every step: (target msgs/s, received msgs/s, p99 ms, lost).
    pub steps: Vec<(f64, f64, f64, u64)>,
}

/// Target rates of the ramp, all connections together.
const RAMP: [f64; 8] = [
    1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0, 40_000.0, 80_000.0, 160_000.0,
];

/// Runs the ramp: `switchboard bench` on its own users, steps of a few
/// seconds, stopped at the first step that does not keep up.
async fn find_capacity(args: &SoakArgs) -> Result<Capacity, BenchError> {
    let mut steps = Vec::new();
    let mut best = 0.0f64;
    let connections = args.ramp_connections.max(2) & !1;
    for target in RAMP {
        let bench = crate::BenchArgs {
            urls: args.urls.clone(),
            connections,
            payload: args.payload,
            interval_ms: 1000.0,
            rate_steps: vec![target / connections as f64],
            mode: crate::Mode::Pair,
            feature: crate::Feature::Reliable,
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            drain: Duration::from_secs(5),
            app_id: args.app_id.clone(),
            app_name: args.app_name.clone(),
            token: args.token.clone(),
            user_bases: Vec::new(),
            connect_concurrency: 64,
            idle: false,
            json: true,
        };
        let report = crate::run(bench, false).await?;
        let Some(step) = report.steps.first() else {
            break;
        };
        steps.push((target, step.msgs_per_sec, step.p99_ms, step.lost));
        eprintln!(
            "ramp: {target:.0} msgs/s asked, {:.0} received, p99 {:.1} ms, lost {}",
            step.msgs_per_sec, step.p99_ms, step.lost
        );
        let kept_up = step.lost == 0
            && report.server_errors == 0
            && step.p99_ms <= 100.0
            && step.msgs_per_sec >= 0.95 * target;
        if !kept_up {
            break;
        }
        best = target;
    }
    if best == 0.0 {
        return Err(BenchError::Options(
            "the capacity ramp did not keep up even at its first step; give --rate".into(),
        ));
    }
    Ok(Capacity {
        msgs_per_sec: best,
        steps,
    })
}

/// Pushes per send of [`next_send`]'s mix: a group message (1 in 20) to
/// eight users, a RELIABLE direct one (9 in 20) to its recipient and its
/// `MESSAGE_CONFIRMATION` to the sender, a FAST one (10 in 20). The
/// capacity ramp counts one push per message (RELIABLE pairs, no
/// confirmation): half its capacity is this many times fewer sends. A
/// push of the mix costs more than one of the ramp's on average (acks,
/// client ids, `MESSAGE_ACCEPTED`; FAST ones are not stored), so this is
/// the lower bound of the conversion, not an equivalent load.
const DELIVERIES_PER_SEND: f64 = (8.0 + 9.0 * 2.0 + 10.0) / 20.0;

/// Copies a slow user is sent per second at `rate` sends per second, from
/// [`next_send`]'s mix: a group message (1 in 20) has 8 recipients, a
/// RELIABLE direct one (9 in 20) one, each slow with the slow users'
/// share; FAST to a slow user is 1 send in 10.
fn slow_incoming(rate: f64, users: usize, slow_users: usize) -> f64 {
    let share = slow_users as f64 / users as f64;
    rate * ((8.0 / 20.0 + 9.0 / 20.0) * share + 0.1) / slow_users.max(1) as f64
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
    confirmations: AtomicU64,
    redelivered: AtomicU64,
    connects: AtomicU64,
    refused: AtomicU64,
}

/// A FAST message between steady users, not received yet.
struct FastSent {
    from: u32,
    to: u32,
    at: Instant,
}

/// When a user's connections were down: (went down, came back).
type Gaps = Vec<(Instant, Option<Instant>)>;

struct World {
    users: Vec<String>,
    pending: Mutex<HashMap<String, Pending>>,
    fast: Mutex<HashMap<String, FastSent>>,
    fast_refused: AtomicU64,
    /// Per user: when its connection was down (steady users only).
    gaps: Vec<Mutex<Gaps>>,
    /// Seconds between two reads of a slow user while it reads.
    slow_read_every: Duration,
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
    if let Some(rate) = args.rate
        && (!rate.is_finite() || rate <= 0.0 || rate > 1_000_000.0)
    {
        return Err(BenchError::Options(
            "--rate must be between 0 and 1000000 sends per second".into(),
        ));
    }
    if !args.slow_read_factor.is_finite() || args.slow_read_factor <= 0.0 {
        return Err(BenchError::Options(
            "--slow-read-factor must be above 0".into(),
        ));
    }
    let (rate, capacity) = match args.rate {
        Some(rate) => (rate, None),
        None => {
            let capacity = find_capacity(&args).await?;
            let rate = capacity.msgs_per_sec / 2.0 / DELIVERIES_PER_SEND;
            eprintln!(
                "capacity {:.0} msgs/s: the soak sends {rate:.0} a second \
                 ({DELIVERIES_PER_SEND} pushes each: half the capacity)",
                capacity.msgs_per_sec,
            );
            (rate, Some(capacity))
        }
    };
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
    let slow_users = (0..args.users).filter(|&i| part(i) == Part::Slow).count();
    let slow_read_every = Duration::from_secs_f64(
        1.0 / (args.slow_read_factor * slow_incoming(rate, args.users, slow_users)).max(0.01),
    );
    let world = Arc::new(World {
        // Every user is down until its first connection.
        gaps: (0..users.len())
            .map(|_| Mutex::new(vec![(Instant::now(), None)]))
            .collect(),
        users,
        pending: Mutex::default(),
        fast: Mutex::default(),
        fast_refused: AtomicU64::new(0),
        slow_read_every,
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
    let per_sender = Duration::from_secs_f64(steady.len() as f64 / rate);
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

    let mut samples: Vec<SoakSample> = Vec::new();
    let mut next_report = started + args.report_every;
    let send_until = started + args.duration;
    loop {
        let now = Instant::now();
        if now >= send_until {
            break;
        }
        tokio::time::sleep_until(next_report.min(send_until)).await;
        if Instant::now() >= next_report {
            let s = sample(&world, &args.pids, started, samples.last());
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
    let last = sample(&world, &args.pids, started, samples.last());
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
    let lost_fast_by_cause = classify_lost_fast(&world);
    Ok(SoakReport {
        options: args,
        samples,
        lost_reliable: lost,
        unconfirmed_reliable: unconfirmed,
        redelivered: c.redelivered.load(Ordering::Relaxed),
        lost_fast: lost_fast_by_cause.values().sum(),
        fast_between_steady: fast_sent,
        lost_fast_by_cause,
        rate,
        capacity,
        lost_examples,
        refused_by_code: lock(&world.refused_by_code).clone(),
        server_closes: lock(&world.server_closes).clone(),
    })
}

/// Stored copies not received yet, and the age of the oldest (seconds).
fn stored_undelivered(world: &World) -> (u64, f64) {
    let (count, _, oldest) = undelivered_split(world);
    (count, oldest)
}

/// Stored copies not received yet, those for slow users, the oldest's age.
fn undelivered_split(world: &World) -> (u64, u64, f64) {
    let pending = lock(&world.pending);
    let mut count = 0;
    let mut slow = 0;
    let mut oldest = 0.0f64;
    for p in pending.values().filter(|p| p.accepted) {
        count += p.left.len() as u64;
        slow += p
            .left
            .iter()
            .filter(|r| part(**r as usize) == Part::Slow)
            .count() as u64;
        oldest = oldest.max(p.at.elapsed().as_secs_f64());
    }
    (count, slow, oldest)
}

/// Whether `user`'s connection was down at `at` or went down within 10 s
/// after it (what its send queue held then was dropped with it).
fn was_down(world: &World, user: u32, at: Instant) -> bool {
    let window = at + Duration::from_secs(10);
    lock(&world.gaps[user as usize])
        .iter()
        .any(|(down, up)| *down <= window && up.is_none_or(|up| up >= at))
}

/// The FAST messages between steady users never received, by cause.
fn classify_lost_fast(world: &World) -> std::collections::BTreeMap<String, u64> {
    let mut causes = std::collections::BTreeMap::new();
    let refused = world.fast_refused.load(Ordering::Relaxed);
    if refused > 0 {
        causes.insert("refused".to_owned(), refused);
    }
    for f in lock(&world.fast).values() {
        let cause = if was_down(world, f.to, f.at) {
            "recipient_down"
        } else if was_down(world, f.from, f.at) {
            "sender_down"
        } else {
            "unexplained"
        };
        *causes.entry(cause.to_owned()).or_default() += 1;
    }
    causes
}

/// Marks `user`'s connection down (`false`) or up again.
fn mark(world: &World, user: u32, up: bool) {
    let mut gaps = lock(&world.gaps[user as usize]);
    let now = Instant::now();
    match (up, gaps.last_mut()) {
        (true, Some((_, back @ None))) => *back = Some(now),
        (false, last) if !matches!(last, Some((_, None))) => gaps.push((now, None)),
        _ => {}
    }
}

fn sample(
    world: &World,
    pids: &[u32],
    started: Instant,
    previous: Option<&SoakSample>,
) -> SoakSample {
    let (rss_kib, open_files) = pids.iter().fold((0u64, 0u64), |(rss, files), pid| {
        (rss + rss_kib(*pid), files + open_files(*pid))
    });
    let (undelivered, slow_undelivered, oldest) = undelivered_split(world);
    let c = &world.counters;
    let seconds = started.elapsed().as_secs_f64();
    let sent = c.sent_reliable.load(Ordering::Relaxed)
        + c.sent_fast.load(Ordering::Relaxed)
        + c.sent_group.load(Ordering::Relaxed);
    let (before, since) = previous.map_or((0, 0.0), |p| {
        (p.sent_reliable + p.sent_fast + p.sent_group, p.seconds)
    });
    let closes = lock(&world.server_closes);
    let slow_closes = closes
        .iter()
        .filter(|(k, _)| k.contains("slow consumer"))
        .map(|(_, n)| *n)
        .sum();
    let all_closes: u64 = closes.values().sum();
    SoakSample {
        seconds,
        rss_mib: rss_kib as f64 / 1024.0,
        open_files,
        sent_reliable: c.sent_reliable.load(Ordering::Relaxed),
        sent_fast: c.sent_fast.load(Ordering::Relaxed),
        sent_group: c.sent_group.load(Ordering::Relaxed),
        stored_undelivered: undelivered,
        slow_undelivered,
        oldest_undelivered_s: oldest,
        send_rate: sent.saturating_sub(before) as f64 / (seconds - since).max(0.001),
        fast_in_flight: lock(&world.fast).len() as u64,
        received: c.received.load(Ordering::Relaxed),
        confirmations: c.confirmations.load(Ordering::Relaxed),
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
        "t={:.0}s rss={:.1}MiB files={} sent R={} F={} G={} ({:.0}/s) received={} stored-undelivered={} (slow users {}, oldest {:.1}s) fast-in-flight={} connects={} slow-closes={} other-closes={} refused={}",
        s.seconds,
        s.rss_mib,
        s.open_files,
        s.sent_reliable,
        s.sent_fast,
        s.sent_group,
        s.send_rate,
        s.received,
        s.stored_undelivered,
        s.slow_undelivered,
        s.oldest_undelivered_s,
        s.fast_in_flight,
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
                    lock(&world.fast).remove(id);
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
        // Confirmations are stored in the sender's inbox and, in ack mode,
        // wait for an ACK like any stored message: unacknowledged they
        // pile up (the first one-hour soak did not ACK them).
        Some("MESSAGE_CONFIRMATION") => {
            world.counters.confirmations.fetch_add(1, Ordering::Relaxed);
            match data["id"].as_str() {
                Some(id) => Reply::Ack(id.to_owned()),
                None => Reply::None,
            }
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
                if lock(&world.fast).remove(id).is_some() {
                    world.fast_refused.fetch_add(1, Ordering::Relaxed);
                }
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
        // Down from the moment its last connection broke (no-op at first).
        mark(&world, me, false);
        let Some(mut ws) = open(&world, i).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        mark(&world, me, true);
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
    lock(&world.fast).insert(
        id.clone(),
        FastSent {
            from: me,
            to,
            at: Instant::now(),
        },
    );
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
    // Slow users pause 10 s in every 30, each at its own moment.
    let anchor = Instant::now() - Duration::from_millis(rng.below(30_000) as u64);
    let mut next_read = Instant::now();
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
                        let now = Instant::now();
                        let into = now.duration_since(anchor).as_secs_f64() % 30.0;
                        if into >= 20.0 {
                            next_read = now + Duration::from_secs_f64(30.0 - into);
                        } else {
                            // Keeps the rate over sleeps that overshoot,
                            // without a burst after a long stall.
                            next_read = (next_read + world.slow_read_every)
                                .max(now - Duration::from_millis(100));
                        }
                        tokio::time::sleep_until(next_read).await;
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
            gaps: (0..users.len()).map(|_| Mutex::default()).collect(),
            users,
            pending: Mutex::default(),
            fast: Mutex::default(),
            fast_refused: AtomicU64::new(0),
            slow_read_every: Duration::from_secs(1),
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
    fn a_lost_fast_message_is_blamed_on_a_connection_down_around_its_send() {
        let w = world(4);
        let mut rng = Rng::new(3);
        // k = 1: FAST to a steady user.
        let frame = next_send(&w, 0, 1, &mut rng, &(vec![1], vec![3]));
        let v: serde_json::Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(v["feature"], "FAST");
        assert!(classify_lost_fast(&w).get("unexplained") == Some(&1));
        mark(&w, 1, false);
        assert_eq!(classify_lost_fast(&w).get("recipient_down"), Some(&1));
        mark(&w, 1, true);
        let id = v["data"]["id"].as_str().expect("id").to_owned();
        on_frame(
            &w,
            1,
            &format!(
                r#"{{"type":"MESSAGE","data":{{"from":"demo-0","content":"F|x","id":"{id}"}}}}"#
            ),
        );
        assert!(classify_lost_fast(&w).is_empty(), "received");
    }

    #[test]
    fn a_slow_user_is_sent_its_share_of_the_mix() {
        // 100 users, 10 slow, 1,000 sends a second: 85 copies a second to
        // anyone, a tenth of them slow, plus 100 FAST to slow users.
        let per_slow = slow_incoming(1000.0, 100, 10);
        assert!((per_slow - 18.5).abs() < 1e-9, "{per_slow}");
    }

    #[test]
    fn a_confirmation_is_acknowledged() {
        let w = world(2);
        let frame = r#"{"type":"MESSAGE_CONFIRMATION","data":{"reference":"m3","id":"m3"}}"#;
        assert!(matches!(on_frame(&w, 0, frame), Reply::Ack(id) if id == "m3"));
        assert_eq!(w.counters.confirmations.load(Ordering::Relaxed), 1);
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
