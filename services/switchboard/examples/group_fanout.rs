//! Fan-out throughput of persistent groups, all-in-one: recipient deliveries
//! per second for groups of the sizes given (default 100, 1000, 10000), and
//! the round trip of direct messages between two other users meanwhile.
//!
//! `cargo run --release -p switchboard --example group_fanout -- 100 1000 10000`
//!
//! With `--url ws://…/ws` (repeatable) it measures a running deployment
//! instead (e.g. `deploy/local/cluster.sh`; clients take the URLs in turn).
//! Its limits must allow the run: `max_frame_bytes` for the member list of
//! a GROUP_CREATE, `messages_per_second` ≥ 200.
//!
//! Per size: a fresh node in this process (its store in a temp dir), the
//! owner in ack mode, 20 members online (they must get every message), the
//! rest offline (every message goes into their inboxes, synced). The owner
//! sends RELIABLE group messages back to back; a message counts when it is
//! accepted (stored in every inbox), so deliveries/s = messages × (size − 1)
//! / time to the last MESSAGE_ACCEPTED.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::{Listeners, RemoteRoles};
use switchboard_config::Config;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const ONLINE: usize = 20;

async fn login(url: &str, user: &str, acks: bool) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    send(
        &mut ws,
        json!({"type":"AUTH_CLIENT","data":{"appId":"demo","userId":user,"token":"","acks":acks}}),
    )
    .await;
    recv_type(&mut ws, "AUTH_CLIENT_REPLY").await;
    ws
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within 60 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = next {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

async fn recv_type(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let f = recv(ws).await;
        if f["type"] == kind {
            return f;
        }
        assert_ne!(f["type"], "ERROR", "{f}");
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

/// A node in this process, or none when `urls` name a deployment.
struct Node {
    urls: Vec<String>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    async fn start(size: usize, urls: &[String]) -> Node {
        if !urls.is_empty() {
            return Node {
                urls: urls.to_vec(),
                stop: CancellationToken::new(),
                task: None,
                _dir: None,
            };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            client_addr: "127.0.0.1:0".parse().expect("addr"),
            mesh_addr: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        config.limits.max_group_members = size.max(10);
        config.limits.max_frame_bytes = 1024 * 1024;
        config.limits.messages_per_second = 100_000;
        let listeners = Listeners::bind(&config).await.expect("bind");
        let url = format!(
            "ws://{}/ws",
            listeners.client_addr().expect("addr").expect("gateway")
        );
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(switchboard::serve(
            config,
            listeners,
            RemoteRoles::default(),
            async move { token.cancelled().await },
        ));
        Node {
            urls: vec![url],
            stop,
            task: Some(task),
            _dir: Some(dir),
        }
    }

    fn url(&self, i: usize) -> &str {
        &self.urls[i % self.urls.len()]
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

async fn measure(size: usize, urls: &[String]) {
    let node = Node::start(size, urls).await;
    let group = format!("bench-{size}-{}", &switchboard_mesh::new_message_id()[24..]);
    let mut owner = login(node.url(0), "demo-owner", true).await;
    let members: Vec<String> = (1..size).map(|i| format!("demo-m{i}")).collect();
    send(
        &mut owner,
        json!({"type":"GROUP_CREATE","data":{"group":group,"name":"bench","members":members},"reference":"c"}),
    )
    .await;
    recv_type(&mut owner, "GROUP_CREATED").await;
    let mut online = Vec::new();
    for (i, user) in members.iter().take(ONLINE).enumerate() {
        online.push(login(node.url(i + 1), user, false).await);
    }

    // Direct messages between two users outside the group, one at a time,
    // for as long as the fan-out runs.
    let pinging = CancellationToken::new();
    let ping_stop = pinging.clone();
    let mut ann = login(node.url(0), "demo-ann", false).await;
    let mut bob = login(node.url(1), "demo-bob", false).await;
    let pinger = tokio::spawn(async move {
        let mut rtts = Vec::new();
        while !ping_stop.is_cancelled() {
            let started = Instant::now();
            send(
                &mut ann,
                json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"ping"},"feature":"FAST"}),
            )
            .await;
            recv_type(&mut bob, "MESSAGE").await;
            rtts.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        rtts
    });

    let messages = (200_000 / size).clamp(5, 200);
    let started = Instant::now();
    for i in 0..messages {
        send(
            &mut owner,
            json!({"type":"GROUP_MESSAGE","data":{"group":group,"content":format!("m{i}")},"reference":format!("r{i}")}),
        )
        .await;
    }
    for _ in 0..messages {
        recv_type(&mut owner, "MESSAGE_ACCEPTED").await;
    }
    let elapsed = started.elapsed();
    for ws in &mut online {
        for _ in 0..messages {
            recv_type(ws, "MESSAGE").await;
        }
    }
    pinging.cancel();
    let mut rtts = pinger.await.expect("pinger");
    rtts.sort_unstable();
    let deliveries = messages * (size - 1);
    println!(
        "{size:>6} members: {messages:>4} messages, {deliveries:>7} deliveries in {:>7.1} ms = {:>8.0} deliveries/s ({:.1} ms per message); direct RTT meanwhile ({} samples) p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64() * 1000.0,
        deliveries as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / messages as f64,
        rtts.len(),
        percentile(&rtts, 0.5).as_secs_f64() * 1000.0,
        percentile(&rtts, 0.99).as_secs_f64() * 1000.0,
        rtts.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
    node.stop().await;
}

#[tokio::main]
async fn main() {
    let mut urls = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--url" {
            urls.extend(args.next());
        } else if let Ok(n) = arg.parse::<usize>()
            && n >= 2
        {
            sizes.push(n);
        }
    }
    let sizes = if sizes.is_empty() {
        vec![100, 1_000, 10_000]
    } else {
        sizes
    };
    for size in sizes {
        measure(size, &urls).await;
    }
}
