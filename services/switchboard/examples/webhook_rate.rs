//! Push webhooks under load, against a running server whose app has a
//! webhook pointing at this program's receiver (`http://RECEIVER/hook`,
//! secret `--secret`). One WebSocket sender sends RELIABLE messages to
//! users nobody is connected as, so each one makes a `message.offline`
//! event.
//!
//! 1. Rate: `--burst` messages as fast as the sender goes; reports events
//!    received per second (first send to last event).
//! 2. Receiver down: for `--down` the receiver answers 503 while the sender
//!    sends `--rate` messages per second; then it answers again and the
//!    sending goes on for `--after`. Reports the outbox depth each second
//!    (the server's `switchboard_webhooks_outbox_depth` gauge), its peak, and
//!    how long after the receiver came back every event had arrived.
//!
//! The sender is one connection: give the server a `limits.messages_per_second`
//! above the burst's pace, or the gateway refuses part of it.
//!
//! cargo run -p switchboard --example webhook_rate -- --url 127.0.0.1:8088 \
//!     --receiver 127.0.0.1:9901 --secret whsec_… --burst 2000 --rate 100 --down 60s

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Where this program's receiver listens (the app's webhook URL is
    /// http://RECEIVER/hook).
    #[arg(long, default_value = "127.0.0.1:9901")]
    receiver: String,
    /// The webhook's secret (every request's signature is checked).
    #[arg(long)]
    secret: String,
    /// An app with auth `none`.
    #[arg(long, default_value = "demo")]
    app: String,
    #[arg(long, default_value_t = 2000)]
    burst: usize,
    /// Messages per second during the outage.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value = "60", value_parser = secs)]
    down: Duration,
    /// Sending goes on this long after the receiver is back.
    #[arg(long, default_value = "10", value_parser = secs)]
    after: Duration,
}

fn secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Default)]
struct Receiver {
    down: AtomicBool,
    unsigned: AtomicUsize,
    refused: AtomicUsize,
    /// Distinct webhook ids received.
    ids: Mutex<HashSet<String>>,
    last: Mutex<Option<Instant>>,
}

struct Hook {
    r: Arc<Receiver>,
    signer: standardwebhooks::Webhook,
}

async fn hook(
    axum::extract::State(h): axum::extract::State<Arc<Hook>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> http::StatusCode {
    if h.signer.verify(&body, &headers).is_err() {
        h.r.unsigned.fetch_add(1, Ordering::Relaxed);
        return http::StatusCode::UNAUTHORIZED;
    }
    if h.r.down.load(Ordering::Relaxed) {
        h.r.refused.fetch_add(1, Ordering::Relaxed);
        return http::StatusCode::SERVICE_UNAVAILABLE;
    }
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    h.r.ids.lock().await.insert(id);
    *h.r.last.lock().await = Some(Instant::now());
    http::StatusCode::NO_CONTENT
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

async fn outbox_depth(http: &reqwest::Client, url: &str) -> Option<f64> {
    let text = http
        .get(format!("http://{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| l.starts_with("switchboard_webhooks_outbox_depth"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

async fn wait_for(r: &Receiver, want: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if r.ids.lock().await.len() >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = Arc::new(Receiver::default());
    let state = Arc::new(Hook {
        r: r.clone(),
        signer: standardwebhooks::Webhook::new(&args.secret)?,
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&args.receiver).await?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let http = reqwest::Client::new();
    let ws = login(&args.url, &args.app, &format!("{}-sender", args.app)).await?;
    // Drains the sender's answers (accepted, confirmations).
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let mut next = 0usize;

    // 1. Rate.
    let started = Instant::now();
    for _ in 0..args.burst {
        let frame = json!({"type": "MESSAGE", "data": {"to": format!("{}-offline{next}", args.app), "content": "x"}, "feature": "RELIABLE"});
        sink.send(Message::Text(frame.to_string().into())).await?;
        next += 1;
    }
    let sent_in = started.elapsed();
    let complete = wait_for(&r, next, Duration::from_secs(120)).await;
    let last = r.last.lock().await.unwrap_or_else(Instant::now);
    let took = last.duration_since(started);
    println!(
        "rate: {} events sent in {:.2}s, all received: {complete}, last after {:.2}s: {:.0} events/s",
        args.burst,
        sent_in.as_secs_f64(),
        took.as_secs_f64(),
        args.burst as f64 / took.as_secs_f64()
    );

    // 2. Receiver down under load, then back.
    r.down.store(true, Ordering::Relaxed);
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut tick = tokio::time::interval(period);
    let phase = Instant::now();
    let mut peak = 0f64;
    let mut last_report = Instant::now();
    let mut back_at = None;
    while phase.elapsed() < args.down + args.after {
        tick.tick().await;
        let frame = json!({"type": "MESSAGE", "data": {"to": format!("{}-offline{next}", args.app), "content": "x"}, "feature": "RELIABLE"});
        sink.send(Message::Text(frame.to_string().into())).await?;
        next += 1;
        if back_at.is_none() && phase.elapsed() >= args.down {
            r.down.store(false, Ordering::Relaxed);
            back_at = Some(Instant::now());
            println!("receiver back after {:.0}s", args.down.as_secs_f64());
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let depth = outbox_depth(&http, &args.url).await.unwrap_or(f64::NAN);
            peak = peak.max(depth);
            println!(
                "t={:>3.0}s outbox depth {depth:.0}, received {}",
                phase.elapsed().as_secs_f64(),
                r.ids.lock().await.len()
            );
        }
    }
    let back_at = back_at.unwrap_or_else(Instant::now);
    let complete = wait_for(&r, next, Duration::from_secs(600)).await;
    let caught_up = r
        .last
        .lock()
        .await
        .map(|l| l.duration_since(back_at))
        .unwrap_or_default();
    println!(
        "down {:.0}s at {:.0}/s: peak outbox depth {peak:.0}; every event ({next}) received: {complete}, \
         {:.1}s after the receiver came back; refused attempts {}, unsigned {}",
        args.down.as_secs_f64(),
        args.rate,
        caught_up.as_secs_f64(),
        r.refused.load(Ordering::Relaxed),
        r.unsigned.load(Ordering::Relaxed)
    );
    Ok(())
}
