//! Gathers concurrent calls of one hop into batch calls.
//!
//! Each caller hands in one item and waits for its own result. Items go to
//! a lane: one per peer and per share of the ordering keys (a hash of the
//! sender), and each lane has at most one batch in flight. An idle lane
//! sends at once (after one yield, so that callers woken by the same
//! wakeup join); a lane with a batch in flight gathers what arrives and
//! sends it, up to the size bounds, when that batch is answered (after an
//! optional linger). Items of one sender therefore leave in the order they
//! were handed in, within a batch and across batches.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use foldhash::HashMap;
use tokio::sync::oneshot;

use crate::error::ServiceError;

/// Bounds of one batch and how long a busy lane waits for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Items per batch call.
    pub max_items: usize,
    /// Encoded bytes per batch call (an item larger than this goes alone).
    pub max_bytes: usize,
    /// How long a lane that has just had a batch answered waits for more
    /// items before it sends fewer than `max_items`. An idle lane never
    /// waits. Zero by default: tokio's timers tick in milliseconds, far
    /// longer than a batch takes to gather under load; what arrives while
    /// a batch is in flight is already a batch.
    pub linger: Duration,
    /// Lanes per peer: batches in flight to one peer at once.
    pub lanes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_items: 512,
            max_bytes: 4 * 1024 * 1024,
            linger: Duration::ZERO,
            lanes: 4,
        }
    }
}

/// The answer to one batch call: one result per item, in order, or a
/// failure of the whole call (every item gets it).
pub type BatchFuture<R> =
    Pin<Box<dyn Future<Output = Result<Vec<Result<R, ServiceError>>, ServiceError>> + Send>>;

/// Sends one batch to a peer.
pub type BatchSend<I, R> = Arc<dyn Fn(Arc<str>, Vec<I>) -> BatchFuture<R> + Send + Sync>;

/// Gathers items per peer and lane into batch calls made with `send`.
pub struct Coalescer<I, R> {
    limits: BatchLimits,
    send: BatchSend<I, R>,
    lanes: Mutex<LanesByPeer<I, R>>,
}

/// Per peer, its lanes.
type LanesByPeer<I, R> = HashMap<Arc<str>, Arc<[Arc<Lane<I, R>>]>>;

struct Lane<I, R> {
    state: Mutex<LaneState<I, R>>,
}

struct LaneState<I, R> {
    queue: VecDeque<Pending<I, R>>,
    /// A task is sending this lane's batches.
    busy: bool,
}

struct Pending<I, R> {
    item: I,
    bytes: usize,
    reply: oneshot::Sender<Result<R, ServiceError>>,
}

impl<I, R> Coalescer<I, R>
where
    I: Send + 'static,
    R: Send + 'static,
{
    pub fn new(limits: BatchLimits, send: BatchSend<I, R>) -> Arc<Self> {
        let limits = BatchLimits {
            max_items: limits.max_items.max(1),
            max_bytes: limits.max_bytes.max(1),
            linger: limits.linger,
            lanes: limits.lanes.max(1),
        };
        Arc::new(Coalescer {
            limits,
            send,
            lanes: Mutex::new(HashMap::default()),
        })
    }

    /// Hands `item` (`bytes` long encoded) to the batch going to `peer`;
    /// items with the same `order_key` keep the order of their calls.
    pub async fn call(
        self: &Arc<Self>,
        peer: &str,
        order_key: &[u8],
        bytes: usize,
        item: I,
    ) -> Result<R, ServiceError> {
        let lane_no = (xxhash_rust::xxh3::xxh3_64(order_key) % self.limits.lanes as u64) as usize;
        let lane = self.lane(peer, lane_no);
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = lane.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.queue.push_back(Pending { item, bytes, reply });
            !std::mem::replace(&mut state.busy, true)
        };
        if start {
            let peer: Arc<str> = Arc::from(peer);
            tokio::spawn(self.clone().drain(peer, lane));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ServiceError::unavailable("batch call abandoned")))
    }

    fn lane(&self, peer: &str, lane_no: usize) -> Arc<Lane<I, R>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(of_peer) = lanes.get(peer) {
            return of_peer[lane_no].clone();
        }
        let of_peer: Arc<[Arc<Lane<I, R>>]> = (0..self.limits.lanes)
            .map(|_| {
                Arc::new(Lane {
                    state: Mutex::new(LaneState {
                        queue: VecDeque::new(),
                        busy: false,
                    }),
                })
            })
            .collect();
        let lane = of_peer[lane_no].clone();
        lanes.insert(Arc::from(peer), of_peer);
        lane
    }

    /// Sends the lane's batches, one at a time, until its queue is empty.
    async fn drain(self: Arc<Self>, peer: Arc<str>, lane: Arc<Lane<I, R>>) {
        // A send that panics unwinds this task: the guard fails what waits
        // and leaves the lane idle, or it would stay busy (and its callers
        // unanswered) forever.
        let _guard = DrainGuard { lane: &lane };
        // Callers woken by the same event (one read of many frames, one
        // store commit) join the first batch.
        tokio::task::yield_now().await;
        let mut answered_one = false;
        loop {
            if answered_one && !self.limits.linger.is_zero() && !self.full(&lane) {
                tokio::time::sleep(self.limits.linger).await;
            }
            let Some(batch) = self.take(&lane) else {
                return;
            };
            let (items, replies): (Vec<I>, Vec<_>) =
                batch.into_iter().map(|p| (p.item, p.reply)).unzip();
            let n = items.len();
            match watched(&peer, n, (self.send)(peer.clone(), items)).await {
                Ok(results) if results.len() == n => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                Ok(results) => {
                    let e = ServiceError::internal(format!(
                        "a batch of {n} was answered with {} results",
                        results.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            answered_one = true;
        }
    }

    fn full(&self, lane: &Lane<I, R>) -> bool {
        let state = lane.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.queue.len() >= self.limits.max_items
            || state.queue.iter().map(|p| p.bytes).sum::<usize>() >= self.limits.max_bytes
    }

    /// The next batch, or `None` (and the lane idle) when nothing waits.
    /// Items whose callers have gone (a timeout gave up on them, and the
    /// caller may since have sent its next item) are dropped unsent: sent
    /// now, one would land after items its caller sent later.
    fn take(&self, lane: &Lane<I, R>) -> Option<Vec<Pending<I, R>>> {
        let mut state = lane.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while let Some(next) = state.queue.front() {
            if next.reply.is_closed() {
                state.queue.pop_front();
                metrics::counter!("switchboard_mesh_batch_abandoned_total").increment(1);
                continue;
            }
            let fits = batch.is_empty()
                || (batch.len() < self.limits.max_items
                    && bytes.saturating_add(next.bytes) <= self.limits.max_bytes);
            if !fits {
                break;
            }
            bytes = bytes.saturating_add(next.bytes);
            if let Some(p) = state.queue.pop_front() {
                batch.push(p);
            }
        }
        if batch.is_empty() {
            state.busy = false;
            return None;
        }
        Some(batch)
    }
}

/// How long a batch call may be in flight before it is logged as stuck:
/// well past the callers' retry budget, which bounds every batch send.
const STUCK_AFTER: Duration = Duration::from_secs(15);

/// Awaits a batch call, logging (once) one that is still in flight after
/// [`STUCK_AFTER`]: a lane has one batch in flight, so a call that never
/// ends would leave every later caller of the lane to its own timeout.
async fn watched<T>(peer: &str, items: usize, call: impl Future<Output = T>) -> T {
    tokio::pin!(call);
    match tokio::time::timeout(STUCK_AFTER, call.as_mut()).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(
                peer,
                items,
                secs = STUCK_AFTER.as_secs(),
                "a batch call has been in flight this long; its lane waits for it"
            );
            metrics::counter!("switchboard_mesh_batch_stuck_total").increment(1);
            call.await
        }
    }
}

/// Resets a lane whose drain task ends without emptying it: a panic in a
/// batch send (the only way it can). Its waiting callers are told the
/// batch call was abandoned, and the next call starts a new drain.
struct DrainGuard<'a, I, R> {
    lane: &'a Lane<I, R>,
}

impl<I, R> Drop for DrainGuard<'_, I, R> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut state = self
            .lane
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.queue.clear();
        state.busy = false;
    }
}

/// Runs `run` on every item: items with different keys at once, items
/// with the same key one after the other in the given order. The results
/// come back in the items' order (a batch call's server side).
pub async fn run_ordered<I, R, K, F, Fut>(items: Vec<I>, key: K, run: F) -> Vec<R>
where
    K: Fn(&I) -> Vec<u8>,
    F: Fn(I) -> Fut,
    Fut: Future<Output = R>,
{
    let n = items.len();
    let mut groups: Vec<Vec<(usize, I)>> = Vec::new();
    let mut by_key: HashMap<Vec<u8>, usize> = HashMap::default();
    for (at, item) in items.into_iter().enumerate() {
        let k = key(&item);
        let g = *by_key.entry(k).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push((at, item));
    }
    let run = &run;
    let chains = groups.into_iter().map(|group| async move {
        let mut out = Vec::with_capacity(group.len());
        for (at, item) in group {
            out.push((at, run(item).await));
        }
        out
    });
    let mut results: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for chain in futures_util::future::join_all(chains).await {
        for (at, r) in chain {
            results[at] = Some(r);
        }
    }
    results.into_iter().flatten().collect()
}

/// An item's error as a batch reply carries it.
pub fn item_error(e: ServiceError) -> crate::pb::ItemError {
    crate::pb::ItemError {
        code: e.code.as_str().to_owned(),
        message: e.message,
    }
}

/// The error a batch reply carried for an item.
pub fn from_item_error(e: crate::pb::ItemError) -> ServiceError {
    let code = crate::ErrorCode::parse(&e.code).unwrap_or(crate::ErrorCode::Internal);
    ServiceError::new(code, e.message)
}

#[cfg(test)]
mod tests;
