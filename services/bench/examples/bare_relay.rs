//! The bare relay: the smallest WebSocket server that speaks the shape of the
//! Switchboard client protocol. It authenticates nothing, stores nothing and
//! relays each MESSAGE to the named connection. It is the ceiling one process
//! reaches on a machine, to hold Switchboard against with the same generator:
//!
//!     cargo run --release -p switchboard-bench --example bare_relay -- 127.0.0.1:8090
//!     switchboard bench --url ws://127.0.0.1:8090/ws
//!
//! It uses what the switchboard binary uses below the protocol — mimalloc, a
//! 16 KiB write buffer (frames of one batch gathered per socket write) and
//! 16 KiB read-ahead under the codec's read buffer (one `recv` for many
//! frames) — so that the ratio between the two measures Switchboard's own
//! work. `RELAY_WRITE_BUFFER=0` gives one write call per frame (the relay of
//! the first measurements), `RELAY_READ_AHEAD=0` reads straight into the
//! codec's buffer (the relay before session 6).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use switchboard_gateway::ReadAhead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Peers = Arc<RwLock<HashMap<String, mpsc::Sender<Utf8Bytes>>>>;

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: Data<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data<'a> {
    #[serde(borrow, default)]
    user_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Serialize)]
struct Out<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: OutData<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_authenticated: Option<bool>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned());
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = TcpListener::bind(&addr).await?;
    println!("bare relay on ws://{}/ws", listener.local_addr()?);
    let setting = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16 * 1024)
    };
    let write_buffer = setting("RELAY_WRITE_BUFFER");
    let read_ahead = setting("RELAY_READ_AHEAD");
    let peers: Peers = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(stream, peers.clone(), write_buffer, read_ahead));
    }
}

async fn serve(stream: TcpStream, peers: Peers, write_buffer: usize, read_ahead: usize) {
    let _ = stream.set_nodelay(true);
    let stream = ReadAhead::new(stream, read_ahead);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(write_buffer)
        .max_write_buffer_size(write_buffer + 1024 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(4096);
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64);
        while rx.recv_many(&mut batch, 64).await > 0 {
            for text in batch.drain(..) {
                if sink.feed(Message::Text(text)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut me: Option<String> = None;
    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
            continue;
        };
        match frame.kind.as_ref() {
            "AUTH_CLIENT" => {
                let Some(user) = frame.data.user_id else {
                    continue;
                };
                let user = user.into_owned();
                peers
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(user.clone(), tx.clone());
                let reply = Out {
                    kind: "AUTH_CLIENT_REPLY",
                    data: OutData {
                        from: None,
                        content: None,
                        user_id: Some(&user),
                        is_authenticated: Some(true),
                    },
                };
                let _ = tx.try_send(serde_json::to_string(&reply).unwrap_or_default().into());
                me = Some(user);
            }
            "MESSAGE" => {
                let (Some(from), Some(to), Some(content)) =
                    (me.as_deref(), frame.data.to, frame.data.content)
                else {
                    continue;
                };
                let target = peers
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(to.as_ref())
                    .cloned();
                if let Some(target) = target {
                    let out = Out {
                        kind: "MESSAGE",
                        data: OutData {
                            from: Some(from),
                            content: Some(&content),
                            user_id: None,
                            is_authenticated: None,
                        },
                    };
                    let _ = target.try_send(serde_json::to_string(&out).unwrap_or_default().into());
                }
            }
            _ => {}
        }
    }
    if let Some(user) = me {
        peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&user);
    }
    writer.abort();
}
