//! REST and WebSocket sends side by side, in one run against one server:
//! N senders each send RATE RELIABLE messages per second to their own
//! WebSocket recipient for DURATION, first over WebSocket (`MESSAGE`
//! frames), then through `POST /v1/apps/{app}/messages`. Reports, per
//! transport, messages received per second and the send-to-receipt latency
//! (p50, p99, max); for REST also the latency of the 202 answer.
//!
//! cargo run --release -p switchboard --example rest_vs_ws -- \
//!     --url 127.0.0.1:8088 --key sbk_… --senders 20 --rate 50 --duration 10s

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// The server's client port, host:port.
    #[arg(long, default_value = "127.0.0.1:8088")]
    url: String,
    /// An API key of the app with the `send` scope.
    #[arg(long, env = "SWITCHBOARD_API_KEY")]
    key: String,
    /// An app with auth `none` (its users sign in without a token).
    #[arg(long, default_value = "demo")]
    app: String,
    #[arg(long, default_value_t = 20)]
    senders: usize,
    /// Messages per second per sender.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = humantime_secs)]
    duration: Duration,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Duration::from_secs_f64(secs))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn login(url: &str, app: &str, user: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{url}/ws")).await?;
    let auth = json!({"type": "AUTH_CLIENT", "data": {"appId": app, "userId": user, "token": ""}});
    ws.send(Message::Text(auth.to_string().into())).await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(t) = frame? {
            let v: serde_json::Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "AUTH_CLIENT_REPLY" {
                anyhow::ensure!(v["data"]["isAuthenticated"] == true, "refused: {v}");
                return Ok(ws);
            }
        }
    }
    anyhow::bail!("closed before AUTH_CLIENT_REPLY")
}

/// Latencies of one transport, in microseconds.
#[derive(Default)]
struct Samples {
    delivered: Vec<u64>,
    answered: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at] as f64 / 1000.0
}

async fn phase(args: &Args, rest: bool, start: Instant) -> anyhow::Result<(Samples, usize)> {
    let tag = if rest { "rest" } else { "ws" };
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sending = Arc::new(AtomicBool::new(true));
    let mut receivers = Vec::new();
    for i in 0..args.senders {
        let mut ws = login(&args.url, &args.app, &format!("{}-{tag}r{i}", args.app)).await?;
        let samples = samples.clone();
        receivers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
                let Ok(Some(Ok(Message::Text(t)))) = frame else {
                    break;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else {
                    continue;
                };
                if v["type"] == "MESSAGE"
                    && let Some(sent) = v["data"]["content"]
                        .as_str()
                        .and_then(|c| c.parse::<u64>().ok())
                {
                    got.push((start.elapsed().as_micros() as u64).saturating_sub(sent));
                }
            }
            samples.lock().await.delivered.extend(got);
        }));
    }
    let http = reqwest::Client::new();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut senders = Vec::new();
    for i in 0..args.senders {
        let (url, app, key) = (args.url.clone(), args.app.clone(), args.key.clone());
        let (http, samples, sending) = (http.clone(), samples.clone(), sending.clone());
        let mut ws = if rest {
            None
        } else {
            Some(login(&url, &app, &format!("{app}-{tag}s{i}")).await?)
        };
        senders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let to = format!("{app}-{tag}r{i}");
            let from = format!("{app}-{tag}s{i}");
            let post = format!("http://{url}/v1/apps/{app}/messages");
            let mut sent = 0usize;
            let mut answered = Vec::new();
            while sending.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = start.elapsed().as_micros() as u64;
                let content = now.to_string();
                match &mut ws {
                    Some(ws) => {
                        let frame = json!({"type": "MESSAGE", "data": {"to": to, "content": content}, "feature": "RELIABLE"});
                        if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        let body = json!({"to": to, "from": from, "content": content});
                        let t0 = Instant::now();
                        match http.post(&post).bearer_auth(&key).json(&body).send().await {
                            Ok(r) if r.status().as_u16() == 202 => {
                                answered.push(t0.elapsed().as_micros() as u64)
                            }
                            Ok(r) => eprintln!("REST answered {}", r.status()),
                            Err(e) => eprintln!("REST failed: {e}"),
                        }
                    }
                }
                sent += 1;
            }
            samples.lock().await.answered.extend(answered);
            sent
        }));
    }
    tokio::time::sleep(args.duration).await;
    sending.store(false, Ordering::Relaxed);
    let mut sent = 0;
    for s in senders {
        sent += s.await?;
    }
    for r in receivers {
        r.await?;
    }
    let samples = Arc::try_unwrap(samples)
        .map_err(|_| anyhow::anyhow!("tasks still hold the samples"))?
        .into_inner();
    Ok((samples, sent))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let start = Instant::now();
    let mut rows = HashMap::new();
    for rest in [false, true] {
        let (mut samples, sent) = phase(&args, rest, start).await?;
        samples.delivered.sort_unstable();
        samples.answered.sort_unstable();
        rows.insert(rest, (samples, sent));
    }
    println!(
        "{} senders x {}/s for {:?}, RELIABLE, each to its own connected recipient",
        args.senders, args.rate, args.duration
    );
    println!(
        "transport  sent    received  recv/s    deliver p50/p99/max ms      answer p50/p99 ms"
    );
    for rest in [false, true] {
        let (s, sent) = &rows[&rest];
        let d = &s.delivered;
        let answer = if rest {
            format!("{:.2}/{:.2}", pct(&s.answered, 0.5), pct(&s.answered, 0.99))
        } else {
            "-".to_owned()
        };
        println!(
            "{:<10} {:<7} {:<9} {:<9.0} {:>7.2}/{:.2}/{:.2}        {answer}",
            if rest { "REST" } else { "WebSocket" },
            sent,
            d.len(),
            d.len() as f64 / args.duration.as_secs_f64(),
            pct(d, 0.5),
            pct(d, 0.99),
            pct(d, 1.0),
        );
    }
    Ok(())
}
