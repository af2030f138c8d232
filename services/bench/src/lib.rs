//! `switchboard bench`: a load generator for the client protocol.
//!
//! N WebSocket connections, each its own user, send a message with a
//! P-character payload every T ms to themselves or to a partner. The send
//! time travels inside the message (one clock: this process), so latency is
//! measured from just before the send to the arrival of the same message.
//! Each step of `--rate-steps` runs a warm-up, a measured window and a drain on
//! the same connections and reports percentiles, loss and duplicates.

mod schedule;
pub mod soak;
pub mod stats;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

pub use schedule::Schedule;
use stats::{StepCollector, StepReport, StepTotals};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each connection sends to itself.
    #[value(name = "self")]
    SelfSend,
    /// Connections 2k and 2k+1 send to each other.
    Pair,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Feature {
    Reliable,
    Fast,
}

impl Feature {
    fn as_str(self) -> &'static str {
        match self {
            Feature::Reliable => "RELIABLE",
            Feature::Fast => "FAST",
        }
    }
}

/// Options of `switchboard bench`. The defaults are the published workload of
/// an earlier system: 1000 connections, a 1000-character message every 10 ms.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Server URL; repeat for several. Connections are spread round-robin, so
    /// in pair mode with two URLs each partner is on the other server.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8088/ws")]
    pub urls: Vec<String>,
    /// Connections, each authenticated as its own user.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Characters of message content.
    #[arg(long, short = 'p', default_value_t = 1000)]
    pub payload: usize,
    /// Milliseconds between two messages of one connection (ignored with --rate-steps).
    #[arg(long, short = 't', default_value_t = 10.0)]
    pub interval_ms: f64,
    /// Walk these rates (messages per second per connection) on the same
    /// connections, one measured step each, e.g. 100,50,20,10.
    #[arg(long, value_delimiter = ',')]
    pub rate_steps: Vec<f64>,
    #[arg(long, value_enum, default_value_t = Mode::Pair)]
    pub mode: Mode,
    #[arg(long, value_enum, default_value_t = Feature::Reliable)]
    pub feature: Feature,
    /// Measured time per step.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Unmeasured time before each step's measurement.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    /// Longest wait after a step for messages still in flight.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(serialize_with = "secs")]
    pub drain: Duration,
    /// appId to authenticate with.
    #[arg(long, default_value = "demo")]
    pub app_id: String,
    /// App name: user ids are `<app-name>-bench-<run>-<i>`.
    #[arg(long, default_value = "demo")]
    pub app_name: String,
    /// Token sent in AUTH_CLIENT.
    #[arg(long, default_value = "")]
    #[serde(skip)]
    pub token: String,
    /// Numeric user ids, one base per URL: connection i (on URL i mod
    /// URLs) is `<app-name>-<base + i>`. For a federation, where a user's
    /// home follows from its number: with bases in two domains' ranges,
    /// every pair crosses the federation. Default: `<app-name>-bench-<run>-<i>`.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_bases: Vec<u64>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Open and authenticate the connections, then hold them idle for
    /// --duration without sending (to measure memory per idle connection).
    #[arg(long)]
    pub idle: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl BenchArgs {
    /// The rates (per connection, per second) to measure, in order.
    pub fn rates(&self) -> Vec<f64> {
        if self.rate_steps.is_empty() {
            vec![1000.0 / self.interval_ms]
        } else {
            self.rate_steps.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("{needed} connections need about {needed} open files, but the limit is {limit}")]
    FileLimit { needed: u64, limit: u64 },
    #[error("{failed} of {total} connections failed; first error: {first}")]
    Connect {
        failed: usize,
        total: usize,
        first: String,
    },
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub options: BenchArgs,
    pub open_files_limit: u64,
    pub connect_seconds: f64,
    /// ERROR frames the server sent (rate limits, refusals).
    pub server_errors: u64,
    /// Connections the server closed during the run, by close code and
    /// reason (e.g. `1008 slow consumer: send queue full` past capacity):
    /// what their peers did not receive afterwards counts as lost.
    pub server_closes: std::collections::BTreeMap<String, u64>,
    pub steps: Vec<StepReport>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    Sending {
        step: usize,
        rate: f64,
        measuring: bool,
    },
    Done,
}

struct Shared {
    base: Instant,
    sent: AtomicU64,
    server_errors: AtomicU64,
    server_closes: Mutex<std::collections::BTreeMap<String, u64>>,
}

struct Conn {
    collector: Arc<Mutex<StepCollector>>,
}

/// Runs the benchmark. `progress` shows a progress bar (terminal) or prints
/// plain progress lines to stderr.
pub async fn run(args: BenchArgs, progress: bool) -> Result<BenchReport, BenchError> {
    if args.urls.is_empty() || args.connections == 0 {
        return Err(BenchError::Options(
            "need at least one --url and one connection".into(),
        ));
    }
    if !args.user_bases.is_empty() && args.user_bases.len() != args.urls.len() {
        return Err(BenchError::Options(format!(
            "--user-bases gives {} bases for {} URLs: one per --url",
            args.user_bases.len(),
            args.urls.len()
        )));
    }
    let rates = args.rates();
    if rates
        .iter()
        .any(|r| !r.is_finite() || *r <= 0.0 || *r > 100_000.0)
    {
        return Err(BenchError::Options(
            "rates must be between 0 and 100000 messages per second".into(),
        ));
    }
    let limit = raise_file_limit();
    let needed = args.connections as u64 + 64;
    if needed > limit {
        return Err(BenchError::FileLimit { needed, limit });
    }

    let shared = Arc::new(Shared {
        base: Instant::now(),
        sent: AtomicU64::new(0),
        server_errors: AtomicU64::new(0),
        server_closes: Mutex::default(),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Idle);
    let run_id = format!("{:x}", std::process::id() ^ shared_seed());
    let users: Vec<String> = (0..args.connections)
        .map(|i| match args.user_bases.get(i % args.urls.len().max(1)) {
            Some(base) => format!("{}-{}", args.app_name, base + i as u64),
            None => format!("{}-bench-{run_id}-{i}", args.app_name),
        })
        .collect();

    // Connect and authenticate everyone before sending anything.
    let connect_started = Instant::now();
    let mut set = JoinSet::new();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    for i in 0..args.connections {
        let partner = match args.mode {
            Mode::SelfSend => i,
            Mode::Pair if (i ^ 1) < args.connections => i ^ 1,
            Mode::Pair => i,
        };
        let url = args.urls[i % args.urls.len()].clone();
        let hello = serde_json::json!({"type": "AUTH_CLIENT", "data": {
            "appId": args.app_id, "userId": users[i], "token": args.token}})
        .to_string();
        let to = users[partner].clone();
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let ws = connect(&url, hello).await?;
            Ok::<_, String>((i, to, ws))
        });
    }
    let mut sockets = Vec::with_capacity(args.connections);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(conn)) => sockets.push(conn),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if failed > 0 {
        return Err(BenchError::Connect {
            failed,
            total: args.connections,
            first: first_error.unwrap_or_default(),
        });
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    sockets.sort_by_key(|(i, _, _)| *i);
    if args.idle {
        eprintln!(
            "{} connections open and authenticated in {connect_seconds:.1} s; holding them idle for {:.0} s",
            sockets.len(),
            args.duration.as_secs_f64()
        );
        tokio::time::sleep(args.duration).await;
        return Ok(BenchReport {
            options: args,
            open_files_limit: limit,
            connect_seconds,
            server_errors: 0,
            server_closes: Default::default(),
            steps: Vec::new(),
        });
    }

    let mut tasks = JoinSet::new();
    let mut conns = Vec::with_capacity(sockets.len());
    let count = sockets.len();
    for (i, to, ws) in sockets {
        let collector = Arc::new(Mutex::new(StepCollector::new(0)));
        conns.push(Conn {
            collector: collector.clone(),
        });
        let (sink, stream) = ws.split();
        tasks.spawn(read_loop(stream, collector, shared.clone()));
        tasks.spawn(write_loop(
            sink,
            WriterSpec {
                index: i,
                count,
                to,
                payload: args.payload,
                feature: args.feature,
            },
            phase_rx.clone(),
            shared.clone(),
        ));
    }

    let mut steps = Vec::with_capacity(rates.len());
    for (step, &rate) in rates.iter().enumerate() {
        let _ = phase_tx.send(Phase::Sending {
            step,
            rate,
            measuring: false,
        });
        wait_with_progress(
            progress,
            &format!("step {} warm-up", step + 1),
            args.warmup,
            &shared,
        )
        .await;
        shared.sent.store(0, Ordering::SeqCst);
        let cpu_before = process_cpu_seconds();
        let started = Instant::now();
        let _ = phase_tx.send(Phase::Sending {
            step,
            rate,
            measuring: true,
        });
        wait_with_progress(
            progress,
            &format!("step {} measure {rate}/s per connection", step + 1),
            args.duration,
            &shared,
        )
        .await;
        let _ = phase_tx.send(Phase::Idle);
        let seconds = started.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds() - cpu_before;
        // Let writers that were mid-send finish counting before anything is read.
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Drain: wait until everything sent arrived, or the bound. A writer
        // may still finish the send it started before the phase changed, so
        // the sent counter is read again each time.
        let drain_until = Instant::now() + args.drain;
        loop {
            let received: u64 = conns.iter().map(|c| lock(&c.collector).received).sum();
            if received >= shared.sent.load(Ordering::SeqCst) || Instant::now() >= drain_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = shared.sent.load(Ordering::SeqCst);
        let mut totals = StepTotals::new();
        for c in &conns {
            let mut guard = lock(&c.collector);
            let done = std::mem::replace(&mut *guard, StepCollector::new(step + 1));
            totals.add(&done);
        }
        let report = totals.report(
            step,
            rate,
            count,
            seconds,
            sent,
            100.0 * cpu / seconds.max(1e-9),
        );
        if !args.json {
            eprintln!("{}", format_step(&report));
        }
        steps.push(report);
    }

    let _ = phase_tx.send(Phase::Done);
    // Writers close their sockets; readers end when the server closes.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    Ok(BenchReport {
        options: args,
        open_files_limit: limit,
        connect_seconds,
        server_errors: shared.server_errors.load(Ordering::Relaxed),
        server_closes: lock(&shared.server_closes).clone(),
        steps,
    })
}

fn shared_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
fn raise_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_BUFFER: usize = 16 * 1024;

async fn connect(url: &str, hello: String) -> Result<Ws, String> {
    let attempt = async {
        // tungstenite zero-fills its whole read buffer (128 KiB by default)
        // before every read: ~10 % of the generator's CPU, and 1.3 GB at
        // 10,000 connections. 16 KiB still takes many frames per read.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
            .await
            .map_err(|e| format!("connect {url}: {e}"))?;
        ws.send(Message::Text(hello.into()))
            .await
            .map_err(|e| format!("send AUTH_CLIENT: {e}"))?;
        while let Some(msg) = ws.next().await {
            let msg = msg.map_err(|e| format!("read AUTH_CLIENT_REPLY: {e}"))?;
            if let Message::Text(t) = msg {
                let v: serde_json::Value =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("bad reply: {e}"))?;
                if v["type"] == "AUTH_CLIENT_REPLY" {
                    if v["data"]["isAuthenticated"] == true {
                        return Ok(ws);
                    }
                    return Err(format!("authentication refused: {}", v["data"]["reason"]));
                }
            }
        }
        Err("connection closed before AUTH_CLIENT_REPLY".to_owned())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("connect {url}: timed out"))?
}

struct WriterSpec {
    index: usize,
    count: usize,
    to: String,
    payload: usize,
    feature: Feature,
}

/// The content of a benchmark message: `step|measured|seq|send_us|` padded
/// with `x` to the payload size.
pub fn bench_content(
    step: usize,
    measured: bool,
    seq: u64,
    send_us: u64,
    payload: usize,
) -> String {
    let mut s = String::with_capacity(payload.max(48));
    let _ = write!(s, "{step}|{}|{seq}|{send_us}|", u8::from(measured));
    let pad = payload.saturating_sub(s.len());
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// Parses the content of a benchmark message out of a MESSAGE frame without a
/// full JSON parse: `(step, measured, seq, send_us)`.
pub fn parse_bench_frame(frame: &str) -> Option<(usize, bool, u64, u64)> {
    if !frame.contains("\"type\":\"MESSAGE\"") {
        return None;
    }
    let start = frame.find("\"content\":\"")? + "\"content\":\"".len();
    let mut parts = frame[start..].splitn(5, '|');
    let step = parts.next()?.parse().ok()?;
    let measured = parts.next()? == "1";
    let seq = parts.next()?.parse().ok()?;
    let send_us = parts.next()?.parse().ok()?;
    Some((step, measured, seq, send_us))
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    spec: WriterSpec,
    mut phase: watch::Receiver<Phase>,
    shared: Arc<Shared>,
) {
    let feature = spec.feature.as_str();
    let mut seq: u64 = 0;
    let mut current_step = usize::MAX;
    'outer: loop {
        let now_phase = *phase.borrow_and_update();
        let (step, rate, measuring) = match now_phase {
            Phase::Done => break,
            Phase::Idle => {
                if phase.changed().await.is_err() {
                    break;
                }
                continue;
            }
            Phase::Sending {
                step,
                rate,
                measuring,
            } => (step, rate, measuring),
        };
        if step != current_step {
            current_step = step;
            seq = 0;
        }
        let interval = Duration::from_secs_f64(1.0 / rate);
        let schedule = Schedule::staggered(Instant::now(), interval, spec.index, spec.count);
        let mut k: u64 = 0;
        loop {
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() {
                        break 'outer;
                    }
                    continue 'outer;
                }
                _ = tokio::time::sleep_until(schedule.at(k)) => {
                    // The phase may have changed while this task slept.
                    if phase.has_changed().unwrap_or(true) {
                        continue 'outer;
                    }
                    let n = schedule.to_send(Instant::now(), k).max(1);
                    for _ in 0..n {
                        let send_us = u64::try_from(shared.base.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let content = bench_content(step, measuring, seq, send_us, spec.payload);
                        if measuring {
                            seq += 1;
                            // Counted before it leaves, so a reader of the
                            // counter never sees an arrival it did not count.
                            shared.sent.fetch_add(1, Ordering::SeqCst);
                        }
                        let frame = format!(
                            "{{\"type\":\"MESSAGE\",\"data\":{{\"to\":\"{}\",\"content\":\"{content}\"}},\"feature\":\"{feature}\"}}",
                            spec.to
                        );
                        if sink.feed(Message::Text(frame.into())).await.is_err() {
                            break 'outer;
                        }
                    }
                    if sink.flush().await.is_err() {
                        break 'outer;
                    }
                    k += n;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

async fn read_loop(
    mut stream: futures_util::stream::SplitStream<Ws>,
    collector: Arc<Mutex<StepCollector>>,
    shared: Arc<Shared>,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let text = match msg {
            Message::Text(text) => text,
            // A close the server started carries its code; the answer to
            // the generator's own close at the end has none (or 1000).
            Message::Close(Some(frame)) if u16::from(frame.code) != 1000 => {
                let key = format!("{} {}", u16::from(frame.code), frame.reason);
                *lock(&shared.server_closes).entry(key).or_default() += 1;
                continue;
            }
            _ => continue,
        };
        let text = text.as_str();
        match parse_bench_frame(text) {
            Some((step, true, seq, send_us)) => {
                let now_us = u64::try_from(shared.base.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut c = lock(&collector);
                if c.step == step {
                    c.record(seq, now_us.saturating_sub(send_us));
                }
            }
            Some(_) => {}
            None => {
                if text.contains("\"type\":\"ERROR\"") {
                    shared.server_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn wait_with_progress(progress: bool, label: &str, dur: Duration, shared: &Shared) {
    if !progress {
        tokio::time::sleep(dur).await;
        return;
    }
    let end = Instant::now() + dur;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(dur.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:40} [{bar:30}] {elapsed}/{duration}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(label.to_owned());
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let left = end.saturating_duration_since(Instant::now());
            bar.set_position((dur - left).as_millis() as u64);
        }
        bar.finish_and_clear();
    } else {
        eprintln!("{label}: {:.0} s", dur.as_secs_f64());
        while Instant::now() < end {
            let left = end.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_secs(5))).await;
            if Instant::now() < end {
                eprintln!(
                    "  … {:.0} s left, {} sent so far",
                    end.saturating_duration_since(Instant::now()).as_secs_f64(),
                    shared.sent.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// CPU time (user + system) of this process so far, in seconds.
fn process_cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15 are utime and stime in clock ticks
    // (USER_HZ, 100 on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

/// One human-readable line per step.
pub fn format_step(r: &StepReport) -> String {
    format!(
        "step {}: {} conns @ {}/s each: {:.0} msgs/s, sent {} received {} lost {} dup {}, \
         latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}, generator CPU {:.0}%",
        r.step + 1,
        r.connections,
        r.rate_per_connection,
        r.msgs_per_sec,
        r.sent,
        r.received,
        r.lost,
        r.duplicates,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.generator_cpu_pct
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_through_a_frame() {
        let c = bench_content(2, true, 41, 123_456, 100);
        assert_eq!(c.len(), 100);
        let frame = format!(
            "{{\"type\":\"MESSAGE\",\"data\":{{\"from\":\"demo-1\",\"content\":\"{c}\",\"id\":\"x\"}}}}"
        );
        assert_eq!(parse_bench_frame(&frame), Some((2, true, 41, 123_456)));
        let short = bench_content(0, false, 0, 1, 4);
        assert!(short.len() >= 4);
        assert!(parse_bench_frame("{\"type\":\"ERROR\"}").is_none());
        assert!(
            parse_bench_frame("{\"type\":\"MESSAGE\",\"data\":{\"content\":\"hello\"}}").is_none()
        );
    }

    #[test]
    fn rates_default_to_the_interval() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let cli = Cli::parse_from(["bench"]);
        assert_eq!(cli.args.rates(), vec![100.0]);
        assert_eq!(cli.args.connections, 1000);
        assert_eq!(cli.args.payload, 1000);
        let cli = Cli::parse_from([
            "bench",
            "--rate-steps",
            "100,50,20,10",
            "--duration",
            "500ms",
        ]);
        assert_eq!(cli.args.rates(), vec![100.0, 50.0, 20.0, 10.0]);
        assert_eq!(cli.args.duration, Duration::from_millis(500));
    }
}
