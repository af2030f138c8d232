//! The live, authenticated connections of this gateway, by user.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use switchboard_mesh::pb;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::frames;

/// A frame on its way to one connection.
pub struct Outbound {
    pub text: Utf8Bytes,
    /// A stored message: reported delivered once written (or tracked for
    /// acknowledgement in ack mode).
    /// Boxed: most frames carry none, and a small `Outbound` keeps each
    /// connection's queue blocks small.
    pub stored: Option<Box<Stored>>,
    /// When the message was accepted (ms since the epoch), for the delivery
    /// latency metric; 0 for replies.
    pub accepted_ms: i64,
}

pub struct Stored {
    pub seq: u64,
    pub id: String,
}

/// Why the server closes a connection.
#[derive(Debug, Clone)]
pub enum CloseReason {
    /// The client closed or the socket failed: nothing more to send.
    Client,
    Server(u16, String),
}

/// State shared by a connection's reader and writer and the registry.
pub struct ConnShared {
    pub id: u64,
    pub cancel: CancellationToken,
    close: Mutex<Option<CloseReason>>,
}

impl ConnShared {
    pub fn new(id: u64, cancel: CancellationToken) -> Self {
        ConnShared {
            id,
            cancel,
            close: Mutex::new(None),
        }
    }

    /// Asks the connection to close; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut slot = self
            .close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.cancel.cancel();
    }

    /// The reason, or `None` when cancelled from outside (server shutdown).
    pub fn reason(&self) -> Option<CloseReason> {
        self.close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[derive(Clone)]
pub struct ConnHandle {
    pub shared: Arc<ConnShared>,
    pub tx: mpsc::Sender<Outbound>,
}

impl ConnHandle {
    /// Queues a frame; a full queue marks a slow consumer and closes it.
    pub fn send(&self, frame: Outbound) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("switchboard_slow_consumer_disconnects_total").increment(1);
                self.shared.close(CloseReason::Server(
                    1008,
                    "slow consumer: send queue full".into(),
                ));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

type UserKey = (String, String);
type Shard = RwLock<HashMap<UserKey, Vec<ConnHandle>>>;
const SHARDS: usize = 32;

pub struct Registry {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    count: std::sync::atomic::AtomicUsize,
    pub(crate) counters: crate::counters::Counters,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            count: std::sync::atomic::AtomicUsize::new(0),
            counters: crate::counters::Counters::new(),
        }
    }
}

impl Registry {
    fn shard(&self, app_id: &str, user_id: &str) -> &Shard {
        let mut h = self.hasher.build_hasher();
        app_id.hash(&mut h);
        user_id.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn add(&self, app_id: &str, user_id: &str, handle: ConnHandle) {
        let mut map = self
            .shard(app_id, user_id)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry((app_id.to_owned(), user_id.to_owned()))
            .or_default()
            .push(handle);
        let now = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        metrics::gauge!("switchboard_connections").set(now as f64);
    }

    pub fn remove(&self, app_id: &str, user_id: &str, conn_id: u64) {
        let mut map = self
            .shard(app_id, user_id)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (app_id.to_owned(), user_id.to_owned());
        if let Some(conns) = map.get_mut(&key) {
            let before = conns.len();
            conns.retain(|c| c.shared.id != conn_id);
            if conns.len() < before {
                let now = self
                    .count
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
                    .saturating_sub(1);
                metrics::gauge!("switchboard_connections").set(now as f64);
            }
            if conns.is_empty() {
                map.remove(&key);
            }
        }
    }

    fn connections(&self, app_id: &str, user_id: &str) -> Vec<ConnHandle> {
        let map = self
            .shard(app_id, user_id)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&(app_id.to_owned(), user_id.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Queues a pushed message on each of the user's connections here; returns
    /// how many took it.
    pub fn push(&self, gateway_id: &str, item: &pb::PushItem) -> u32 {
        let Some(msg) = item.message.as_ref() else {
            return 0;
        };
        let excluded = item
            .exclude
            .as_ref()
            .filter(|c| c.gateway_id == gateway_id)
            .map(|c| c.conn_id);
        let mut conns = self.connections(&item.app_id, &item.user_id);
        conns.retain(|c| Some(c.shared.id) != excluded);
        if conns.is_empty() {
            return 0;
        }
        // Rendered once, shared by every connection of the user.
        let text = Utf8Bytes::from(frames::render_push(item, msg));
        let tracked = !item.sent_copy && msg.seq > 0;
        let kind = if item.sent_copy {
            "MESSAGE_SENT"
        } else {
            frames::push_type(msg)
        };
        let mut queued = 0;
        for conn in conns {
            let stored = tracked.then(|| {
                Box::new(Stored {
                    seq: msg.seq,
                    id: msg.id.clone(),
                })
            });
            if conn.send(Outbound {
                text: text.clone(),
                stored,
                accepted_ms: msg.ts,
            }) {
                queued += 1;
            }
        }
        self.counters.frames_out(kind, u64::from(queued));
        queued
    }
}
