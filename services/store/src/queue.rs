//! Durable queues (outboxes): named, ordered, at-least-once. What must be
//! sent later — a federation link's outbox, the webhook outbox — is
//! enqueued here and survives a crash once [`Queue::enqueue`] returns.
//!
//! Many queues, usually one consumer each: a consumer takes a batch with a
//! lease, sends it, and acks it. Items taken are invisible to other takers
//! until acked or until the lease runs out; then they are taken again, in
//! their order (their `attempts` counts up, for back-off). Leases are not
//! durable: after a restart every unacked item is visible again, which
//! at-least-once allows.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::StoreError;

/// Most items one take returns (a larger `max` is cut to it).
pub const MAX_TAKE: usize = 1_000;
/// Most items one enqueue writes.
pub const MAX_ENQUEUE: usize = 1_000;
/// Largest payload, bytes.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest queue name, bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest lease (a longer one is cut to it).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// An item taken from a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    /// Its position in the queue: increasing in enqueue order, never
    /// reused. Acked by it.
    pub id: u64,
    /// When it was enqueued, milliseconds since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// How many times it was taken, this time included (1 the first time;
    /// counted at least until the last sync of the store).
    pub attempts: u32,
    pub payload: Vec<u8>,
}

/// A queue and its depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub name: String,
    /// Items enqueued and not acked (taken or not).
    pub depth: u64,
}

/// Durable, named, ordered, at-least-once queues.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Appends the payloads, in order, to `queue` (created on first use);
    /// durable when it returns. Their ids, in order.
    async fn enqueue(&self, queue: &str, payloads: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError>;

    /// Up to `max` (at most [`MAX_TAKE`]) of the oldest items not leased to
    /// a taker, leased for `lease` (at most [`MAX_LEASE`]): until acked or
    /// until the lease runs out, no other take returns them.
    async fn take(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError>;

    /// Removes items by id (leased or not); returns how many were still
    /// there. Durable with the store's next sync: an ack lost to a crash
    /// only redelivers.
    async fn ack(&self, queue: &str, ids: &[u64]) -> Result<usize, StoreError>;

    /// Items in `queue` (0 for a queue never used).
    async fn depth(&self, queue: &str) -> Result<u64, StoreError>;

    /// Every queue used, by name, with its depth.
    async fn list(&self) -> Result<Vec<QueueDepth>, StoreError>;
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("queue: {e}"))
}

pub(crate) fn check_name(queue: &str) -> Result<(), StoreError> {
    if queue.is_empty() || queue.len() > MAX_NAME_BYTES {
        return Err(StoreError::Invalid(format!(
            "a queue name is 1 to {MAX_NAME_BYTES} bytes, not {}",
            queue.len()
        )));
    }
    Ok(())
}

/// `len(name) u16 BE | name`: the prefix of a queue's keys.
fn prefix(queue: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + queue.len() + 8);
    // Names are checked to be short.
    k.extend_from_slice(&(queue.len() as u16).to_be_bytes());
    k.extend_from_slice(queue.as_bytes());
    k
}

fn item_key(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn id_of(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(StoreError::Malformed("a queue key without an id"))
}

/// Stored value: `version 1 | enqueued_at_ms u64 BE | payload`.
const VALUE_VERSION: u8 = 1;

pub(crate) fn encode_item(enqueued_at_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(VALUE_VERSION);
    v.extend_from_slice(&enqueued_at_ms.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

pub(crate) fn decode_item(id: u64, value: &[u8], attempts: u32) -> Result<QueueItem, StoreError> {
    match value {
        [VALUE_VERSION, rest @ ..] if rest.len() >= 8 => {
            let (at, payload) = rest.split_at(8);
            let mut ms = [0; 8];
            ms.copy_from_slice(at);
            Ok(QueueItem {
                id,
                enqueued_at_ms: u64::from_be_bytes(ms),
                attempts,
                payload: payload.to_vec(),
            })
        }
        _ => Err(StoreError::Malformed("a queue item of an unknown format")),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What is kept in memory of one queue.
#[derive(Default)]
struct QueueState {
    /// The next id (also stored, so ids are never reused).
    next: u64,
    depth: u64,
    /// Leased ids and when their lease runs out.
    leased: BTreeMap<u64, Instant>,
}

struct Inner {
    db: Database,
    /// Items: `prefix | id` → value.
    items: Keyspace,
    /// Per queue: `name` → next id.
    heads: Keyspace,
    /// Times taken, per item key (not synced of its own).
    attempts: Keyspace,
    queues: Mutex<HashMap<String, QueueState>>,
    /// Enqueues written so far, numbered.
    written: AtomicU64,
    /// The number of the last enqueue a sync covered. Held while syncing:
    /// enqueues that wait for it find their write covered and return
    /// without a sync of their own (group commit).
    synced: Mutex<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, QueueState>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes enqueue number `mine` durable: by a sync of this caller or of
    /// one that began after it was written.
    fn sync(&self, mine: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= mine {
            return Ok(());
        }
        // Every enqueue numbered up to here was written before this load.
        let covered = self.written.load(Ordering::Acquire);
        self.db.persist(PersistMode::SyncData).map_err(backend)?;
        *synced = covered;
        Ok(())
    }
}

/// The queues of the fjall store: three keyspaces in its database,
/// checksummed by fjall (its journal and its blocks), synced on enqueue.
#[derive(Clone)]
pub struct FjallQueues {
    inner: Arc<Inner>,
}

impl FjallQueues {
    /// Opens the queues' keyspaces in `db` and counts what each holds.
    pub(crate) fn open(db: &Database) -> Result<Self, StoreError> {
        let items = db
            .keyspace("queue_items", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let heads = db
            .keyspace("queue_heads", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let attempts = db
            .keyspace("queue_attempts", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let mut queues = HashMap::new();
        for guard in heads.iter() {
            let (name, next) = guard.into_inner().map_err(backend)?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::Malformed("a queue name that is not UTF-8"))?;
            let next = <[u8; 8]>::try_from(next.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Malformed("a queue head that is not a number"))?;
            let mut depth = 0;
            for guard in items.prefix(prefix(&name)) {
                guard.key().map_err(backend)?;
                depth += 1;
            }
            queues.insert(
                name,
                QueueState {
                    next,
                    depth,
                    leased: BTreeMap::new(),
                },
            );
        }
        Ok(FjallQueues {
            inner: Arc::new(Inner {
                db: db.clone(),
                items,
                heads,
                attempts,
                queues: Mutex::new(queues),
                written: AtomicU64::new(0),
                synced: Mutex::new(0),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(backend)?
    }
}

#[async_trait]
impl Queue for FjallQueues {
    async fn enqueue(&self, queue: &str, payloads: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
        check_name(queue)?;
        if payloads.len() > MAX_ENQUEUE {
            return Err(StoreError::Invalid(format!(
                "at most {MAX_ENQUEUE} items per enqueue, not {}",
                payloads.len()
            )));
        }
        if let Some(big) = payloads.iter().find(|p| p.len() > MAX_PAYLOAD_BYTES) {
            return Err(StoreError::Invalid(format!(
                "a queue payload is at most {MAX_PAYLOAD_BYTES} bytes, not {}",
                big.len()
            )));
        }
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let queue = queue.to_owned();
        self.blocking(move |inner| {
            let at = now_ms();
            let prefix = prefix(&queue);
            let (ids, mine) = {
                // Ids are given and written under the lock, so that a take
                // never sees a later id before an earlier one.
                let mut queues = inner.lock();
                let state = queues.entry(queue.clone()).or_default();
                let first = state.next;
                let mut wb = inner.db.batch();
                for (i, payload) in payloads.iter().enumerate() {
                    wb.insert(
                        &inner.items,
                        item_key(&prefix, first + i as u64),
                        encode_item(at, payload),
                    );
                }
                let next = first + payloads.len() as u64;
                wb.insert(&inner.heads, queue.as_bytes(), next.to_be_bytes().to_vec());
                wb.commit().map_err(backend)?;
                state.next = next;
                state.depth += payloads.len() as u64;
                let mine = inner.written.fetch_add(1, Ordering::AcqRel) + 1;
                ((first..next).collect::<Vec<u64>>(), mine)
            };
            // Outside the queues' lock: concurrent enqueues share fjall's
            // journal, and one sync covers every write before it.
            inner.sync(mine)?;
            Ok(ids)
        })
        .await
    }

    async fn take(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError> {
        check_name(queue)?;
        let max = max.min(MAX_TAKE);
        if max == 0 {
            return Ok(Vec::new());
        }
        let queue = queue.to_owned();
        self.blocking(move |inner| {
            let mut queues = inner.lock();
            let Some(state) = queues.get_mut(&queue) else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            state.leased.retain(|_, until| *until > now);
            // Leased ids are ids still there (an ack drops its lease): no
            // scan for items that are all leased.
            let available = state.depth.saturating_sub(state.leased.len() as u64);
            let want = usize::try_from(available).unwrap_or(usize::MAX).min(max);
            let mut taken = Vec::new();
            if want == 0 {
                return Ok(taken);
            }
            let mut wb = inner.db.batch();
            for guard in inner.items.prefix(prefix(&queue)) {
                let (key, value) = guard.into_inner().map_err(backend)?;
                let id = id_of(&key)?;
                if state.leased.contains_key(&id) {
                    continue;
                }
                let attempts = match inner.attempts.get(&key).map_err(backend)? {
                    Some(n) => <[u8; 4]>::try_from(n.as_ref())
                        .map(u32::from_be_bytes)
                        .unwrap_or(0),
                    None => 0,
                }
                .saturating_add(1);
                wb.insert(
                    &inner.attempts,
                    key.clone(),
                    attempts.to_be_bytes().to_vec(),
                );
                taken.push(decode_item(id, &value, attempts)?);
                if taken.len() == want {
                    break;
                }
            }
            wb.commit().map_err(backend)?;
            let until = now + lease.min(MAX_LEASE);
            for item in &taken {
                state.leased.insert(item.id, until);
            }
            Ok(taken)
        })
        .await
    }

    async fn ack(&self, queue: &str, ids: &[u64]) -> Result<usize, StoreError> {
        check_name(queue)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let queue = queue.to_owned();
        // An id acked twice in one call counts once (the batch is not
        // committed while it is counted).
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        self.blocking(move |inner| {
            let mut queues = inner.lock();
            let Some(state) = queues.get_mut(&queue) else {
                return Ok(0);
            };
            let prefix = prefix(&queue);
            let mut wb = inner.db.batch();
            let mut removed = 0;
            for id in ids {
                let key = item_key(&prefix, id);
                if inner.items.contains_key(&key).map_err(backend)? {
                    // Written once, removed once: a single delete lets
                    // compaction drop both.
                    wb.remove_weak(&inner.items, key.clone());
                    wb.remove(&inner.attempts, key);
                    state.leased.remove(&id);
                    removed += 1;
                }
            }
            wb.commit().map_err(backend)?;
            state.depth = state.depth.saturating_sub(removed as u64);
            Ok(removed)
        })
        .await
    }

    async fn depth(&self, queue: &str) -> Result<u64, StoreError> {
        check_name(queue)?;
        Ok(self.inner.lock().get(queue).map_or(0, |s| s.depth))
    }

    async fn list(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let mut out: Vec<QueueDepth> = self
            .inner
            .lock()
            .iter()
            .map(|(name, s)| QueueDepth {
                name: name.clone(),
                depth: s.depth,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
