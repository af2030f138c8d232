//! Two measurements of topics and rooms against a running server:
//!
//! - `topic URL SUBSCRIBERS PUBLICATIONS RATE`: SUBSCRIBERS connections
//!   subscribe to one topic; one more publishes PUBLICATIONS at RATE per
//!   second; prints p50/p99/max from PUBLISH sent to PUBLICATION read, over
//!   every subscriber's copy.
//! - `rooms URL PID ROOMS MESSAGES SIZE`: one member fills ROOMS rooms with
//!   MESSAGES messages of SIZE bytes each and leaves them (they are kept,
//!   idle, with their history); prints the server's (PID) RSS growth per room.
//!
//! Raise the server's `limits.messages_per_second` for the rooms run.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn login(url: &str, user: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    send(
        &mut ws,
        json!({"type":"AUTH_CLIENT","data":{"appId":"demo","userId":user,"token":""}}),
    )
    .await;
    until(&mut ws, "AUTH_CLIENT_REPLY").await;
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["type"] == kind {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended waiting for {kind}: {other:?}"),
        }
    }
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn topic(url: &str, subscribers: usize, publications: usize, rate: u64) {
    let started = Instant::now();
    let mut readers = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    for i in 0..subscribers {
        let mut ws = login(url, &format!("demo-s{i}")).await;
        send(
            &mut ws,
            json!({"type":"SUBSCRIBE","data":{"topic":"measure"}}),
        )
        .await;
        until(&mut ws, "SUBSCRIBED").await;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            for _ in 0..publications {
                let p = until(&mut ws, "PUBLICATION").await;
                let sent_ns: u64 = p["data"]["content"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .expect("ns");
                let now = started.elapsed().as_nanos() as u64;
                let _ = tx.send(Duration::from_nanos(now.saturating_sub(sent_ns)));
            }
        }));
    }
    drop(tx);
    let mut publisher = login(url, "demo-publisher").await;
    let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut tick = tokio::time::interval(every);
    for _ in 0..publications {
        tick.tick().await;
        let ns = started.elapsed().as_nanos() as u64;
        send(
            &mut publisher,
            json!({"type":"PUBLISH","data":{"topic":"measure","content":ns.to_string()}}),
        )
        .await;
    }
    let mut latencies = Vec::new();
    while let Some(l) = rx.recv().await {
        latencies.push(l);
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    println!(
        "topic: {subscribers} subscribers, {publications} publications at {rate}/s: {} deliveries, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

async fn rooms(url: &str, pid: &str, rooms: usize, messages: usize, size: usize) {
    let mut ws = login(url, "demo-filler").await;
    let before = rss_kib(pid);
    let content = "x".repeat(size);
    for r in 0..rooms {
        let room = format!("measure-{r}");
        send(&mut ws, json!({"type":"ROOM_JOIN","data":{"room":room}})).await;
        until(&mut ws, "ROOM_JOINED").await;
        for _ in 0..messages {
            send(
                &mut ws,
                json!({"type":"ROOM_MESSAGE","data":{"room":room,"content":content}}),
            )
            .await;
            until(&mut ws, "ROOM_MESSAGE").await;
        }
        send(&mut ws, json!({"type":"ROOM_LEAVE","data":{"room":room}})).await;
    }
    // Settle, then read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    println!(
        "rooms: {rooms} rooms × {messages} messages of {size} bytes: RSS {before} → {after} KiB, {:.0} KiB per room",
        (after.saturating_sub(before)) as f64 / rooms as f64
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("a number argument")
    };
    match args.get(1).map(String::as_str) {
        Some("topic") => topic(&args[2], num(3) as usize, num(4) as usize, num(5)).await,
        Some("rooms") => {
            rooms(
                &args[2],
                &args[3],
                num(4) as usize,
                num(5) as usize,
                num(6) as usize,
            )
            .await
        }
        _ => eprintln!(
            "usage: channels_measure topic URL SUBSCRIBERS PUBLICATIONS RATE | rooms URL PID ROOMS MESSAGES SIZE"
        ),
    }
}
