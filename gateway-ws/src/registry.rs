//! The live, authenticated connections of this gateway, by user.

use foldhash::{HashMap, HashMapExt};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use switchboard_mesh::pb;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::frames;

/// A frame on its way to one connection.
pub struct Outbound {
    pub text: Utf8Bytes,
    /// Set for messages pushed to the connection; `None` for replies.
    pub push: Option<Push>,
}

/// What a connection's send queue holds: a frame, boxed, so that the
/// queue's buffer holds pointers, not frames (a queue that once held many
/// keeps 8 bytes per slot, not a frame's size), for one allocation per
/// frame (a pushed message had one already, for its `Push`).
pub type Queued = Box<Outbound>;

impl Outbound {
    pub fn reply(text: Utf8Bytes) -> Self {
        Outbound { text, push: None }
    }

    pub fn stored(&self) -> Option<&Stored> {
        self.push.as_ref()?.stored.as_ref()
    }
}

/// What a pushed message carries besides its text.
pub struct Push {
    /// A stored message: reported delivered once written (or tracked for
    /// acknowledgement in ack mode).
    pub stored: Option<Stored>,
    /// When the message was accepted (ms since the epoch), for the delivery
    /// latency metric; 0 when unknown.
    pub accepted_ms: i64,
    /// Counts the frame in the gateway's backlog until it is dropped
    /// (written, or discarded with a closed connection's queue).
    pub _backlog: Option<BacklogToken>,
}

pub struct Stored {
    pub seq: u64,
    pub id: String,
}

/// Frames pushed to this gateway's connections and not written yet. Past
/// the limit, connection readers wait before taking more messages: under
/// overload, ingestion slows to what the sockets drain (senders feel TCP
/// backpressure) instead of queueing without bound while deliveries starve.
pub struct Backlog {
    queued: AtomicUsize,
    limit: usize,
    per_connection: usize,
    drained: Notify,
}

/// Frames one connection's queue counts in the backlog at most: a 64th of
/// the limit, at most 256. A client that stops reading holds only this many
/// (until it is closed as a slow consumer: its queue fills, or a write
/// stalls for 10 s), so filling the backlog takes 64 such clients.
const BACKLOG_PER_CONNECTION: usize = 256;

/// How long a reader waits before looking at the backlog again, should a
/// wake-up be missed.
const BACKLOG_RECHECK: Duration = Duration::from_millis(50);

impl Backlog {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Backlog {
            queued: AtomicUsize::new(0),
            limit,
            per_connection: (limit / 64).clamp(1, BACKLOG_PER_CONNECTION),
            drained: Notify::new(),
        })
    }

    /// A token for a frame queued behind `waiting` others on its
    /// connection; none past the connection's share (or without a limit).
    pub fn token(self: &Arc<Self>, waiting: usize) -> Option<BacklogToken> {
        if self.limit == 0 || waiting >= self.per_connection {
            return None;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        Some(BacklogToken(Arc::clone(self)))
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether readers must wait (the limit is reached).
    pub fn is_full(&self) -> bool {
        self.limit != 0 && self.queued() >= self.limit
    }

    /// Returns once the backlog is under its limit; whether it had to wait.
    pub async fn room(&self) -> bool {
        if !self.is_full() {
            return false;
        }
        loop {
            let drained = self.drained.notified();
            if self.queued() < self.limit {
                return true;
            }
            let _ = tokio::time::timeout(BACKLOG_RECHECK, drained).await;
        }
    }
}

/// One frame in the backlog; dropping it takes the frame out.
pub struct BacklogToken(Arc<Backlog>);

impl Drop for BacklogToken {
    fn drop(&mut self) {
        let before = self.0.queued.fetch_sub(1, Ordering::AcqRel);
        if before == self.0.limit {
            self.0.drained.notify_waiters();
        }
    }
}

/// Why the server closes a connection.
#[derive(Debug, Clone)]
pub enum CloseReason {
    /// The client closed or the socket failed: nothing more to send.
    Client,
    Server(u16, String),
}

/// State shared by a connection's reader and writer and the registry,
/// with the connection's send queue.
pub struct ConnShared {
    pub id: u64,
    pub cancel: CancellationToken,
    close: Mutex<Option<CloseReason>>,
    /// Bytes of the frames in the send queue (taken out when the writer
    /// takes them).
    queued_bytes: AtomicUsize,
    /// Past this many queued bytes the connection is a slow consumer.
    max_queued_bytes: usize,
    queue: SendQueue,
}

/// A connection's send queue: frames in order, one reader (the writer
/// loop), bounded in frames. A lock and a [`Notify`] in place of an mpsc
/// channel: an idle connection's queue is these few words, where a tokio
/// channel allocates ~800 bytes (its shared state and first block of 32
/// slots) for each connection before its first frame.
struct SendQueue {
    state: Mutex<QueueState>,
    /// Woken when a frame is queued (a permit is kept when the writer is
    /// not waiting, so no wakeup is lost between its check and its wait).
    ready: Notify,
    /// Frames in the queue, read without the lock (the backlog's share).
    len: AtomicUsize,
    max_frames: usize,
}

#[derive(Default)]
struct QueueState {
    frames: std::collections::VecDeque<Queued>,
    /// The writer has stopped: nothing more is taken.
    closed: bool,
}

/// A queue buffer past this many slots is given back once the queue is
/// empty: one burst does not keep its size for the connection's life.
const QUEUE_KEEP_SLOTS: usize = 256;

/// Why a frame was not queued.
enum QueueRefusal {
    Full,
    Closed,
}

impl SendQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, frame: Queued) -> Result<(), QueueRefusal> {
        let mut state = self.lock();
        if state.closed {
            return Err(QueueRefusal::Closed);
        }
        if state.frames.len() >= self.max_frames {
            return Err(QueueRefusal::Full);
        }
        state.frames.push_back(frame);
        self.len.store(state.frames.len(), Ordering::Relaxed);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Moves up to `limit` frames into `into` (closed or not); how many.
    fn take(&self, into: &mut Vec<Queued>, limit: usize) -> usize {
        let mut state = self.lock();
        let n = state.frames.len().min(limit);
        into.extend(state.frames.drain(..n));
        if state.frames.is_empty() && state.frames.capacity() > QUEUE_KEEP_SLOTS {
            state.frames = std::collections::VecDeque::new();
        }
        self.len.store(state.frames.len(), Ordering::Relaxed);
        n
    }

    /// Closes the queue: later frames are refused, and those still queued
    /// are dropped (their backlog share with them).
    fn close(&self) {
        let dropped = {
            let mut state = self.lock();
            state.closed = true;
            self.len.store(0, Ordering::Relaxed);
            std::mem::take(&mut state.frames)
        };
        drop(dropped);
    }
}

impl ConnShared {
    /// A connection's shared state; its send queue holds up to
    /// `max_queued_frames` frames and `max_queued_bytes` bytes.
    pub fn new(
        id: u64,
        cancel: CancellationToken,
        max_queued_frames: usize,
        max_queued_bytes: usize,
    ) -> Self {
        ConnShared {
            id,
            cancel,
            close: Mutex::new(None),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes,
            queue: SendQueue {
                state: Mutex::new(QueueState::default()),
                ready: Notify::new(),
                len: AtomicUsize::new(0),
                max_frames: max_queued_frames.max(1),
            },
        }
    }

    /// Waits for frames and moves up to `limit` (at least 1) of them into
    /// `into`; returns how many, never 0 (the writer loop; one caller at a
    /// time). Cancel-safe: frames are taken only when it returns.
    pub async fn recv_many(&self, into: &mut Vec<Queued>, limit: usize) -> usize {
        let limit = limit.max(1);
        loop {
            let n = self.queue.take(into, limit);
            if n > 0 {
                return n;
            }
            self.queue.ready.notified().await;
        }
    }

    /// What is queued now, without waiting.
    pub fn take_queued(&self, into: &mut Vec<Queued>) -> usize {
        self.queue.take(into, usize::MAX)
    }

    /// Frames waiting in the send queue.
    pub fn queued_frames(&self) -> usize {
        self.queue.len.load(Ordering::Relaxed)
    }

    /// The writer has stopped: the queue refuses frames from now on and
    /// drops what it holds.
    pub fn close_queue(&self) {
        self.queue.close();
    }

    /// The writer took frames of `bytes` out of the queue.
    pub fn dequeued(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn slow_consumer(&self) {
        // Pushes keep coming until the connection leaves the registry: the
        // disconnect is counted once.
        if self.close(CloseReason::Server(
            1008,
            "slow consumer: send queue full".into(),
        )) {
            metrics::counter!("switchboard_slow_consumer_disconnects_total").increment(1);
        }
    }

    /// Closes the connection for `reason`; true for the call that closed
    /// it (later reasons are ignored), so a close is counted once.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut slot = self
            .close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = slot.is_none() && !self.cancel.is_cancelled();
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.cancel.cancel();
        first
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
}

impl ConnHandle {
    /// Queues a frame; a full queue (in frames or in bytes) marks a slow
    /// consumer and closes it. One frame larger than the byte bound is
    /// queued when nothing else is.
    pub fn send(&self, frame: Outbound) -> bool {
        let len = frame.text.len();
        let shared = &self.shared;
        let before = shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > shared.max_queued_bytes {
            shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            shared.slow_consumer();
            return false;
        }
        match shared.queue.push(Box::new(frame)) {
            Ok(()) => true,
            Err(refusal) => {
                shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if let QueueRefusal::Full = refusal {
                    shared.slow_consumer();
                }
                false
            }
        }
    }
}

/// A shard's connections: app → user → that user's connections here. Two
/// levels, so that a lookup by `&str` allocates no key.
type Shard = RwLock<HashMap<String, HashMap<String, Vec<ConnHandle>>>>;
const SHARDS: usize = 32;

pub struct Registry {
    shards: Vec<Shard>,
    hasher: foldhash::fast::RandomState,
    count: std::sync::atomic::AtomicUsize,
    pub(crate) counters: crate::counters::Counters,
    pub(crate) backlog: Arc<Backlog>,
}

impl Registry {
    /// A registry whose pushes count in a backlog of `backlog_frames` (0:
    /// no limit).
    pub fn new(backlog_frames: usize) -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            count: std::sync::atomic::AtomicUsize::new(0),
            counters: crate::counters::Counters::new(),
            backlog: Backlog::new(backlog_frames),
        }
    }

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
        map.entry(app_id.to_owned())
            .or_default()
            .entry(user_id.to_owned())
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
        let Some(users) = map.get_mut(app_id) else {
            return;
        };
        if let Some(conns) = users.get_mut(user_id) {
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
                users.remove(user_id);
            }
        }
        if users.is_empty() {
            map.remove(app_id);
        }
    }

    /// How many connections the user has on this gateway.
    pub fn connections_of(&self, app_id: &str, user_id: &str) -> usize {
        self.shard(app_id, user_id)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(app_id)
            .and_then(|users| users.get(user_id))
            .map_or(0, Vec::len)
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
        // Queued under the shard's read lock (a queue never blocks): the
        // handles are not cloned per message.
        let map = self
            .shard(&item.app_id, &item.user_id)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(all) = map
            .get(item.app_id.as_str())
            .and_then(|users| users.get(item.user_id.as_str()))
        else {
            return 0;
        };
        let mut conns = all
            .iter()
            .filter(|c| Some(c.shared.id) != excluded)
            .peekable();
        if conns.peek().is_none() {
            return 0;
        }
        // Rendered once, shared by every connection of the user.
        let mut text = Utf8Bytes::from(frames::render_push(item, msg));
        let tracked = !item.sent_copy && msg.seq > 0;
        let kind = if item.sent_copy {
            "MESSAGE_SENT"
        } else {
            frames::push_type(msg)
        };
        let mut queued = 0;
        while let Some(conn) = conns.next() {
            let stored = tracked.then(|| Stored {
                seq: msg.seq,
                id: msg.id.clone(),
            });
            // A queue already long (a client not reading) stops adding to
            // the gateway's backlog.
            let waiting = conn.shared.queued_frames();
            let backlog = self.backlog.token(waiting);
            let push = Push {
                stored,
                accepted_ms: msg.ts,
                _backlog: backlog,
            };
            // The last connection takes the text itself: a clone makes the
            // buffer shared (an allocation), needed only for several.
            let text = if conns.peek().is_some() {
                text.clone()
            } else {
                std::mem::take(&mut text)
            };
            if conn.send(Outbound {
                text,
                push: Some(push),
            }) {
                queued += 1;
            }
        }
        drop(map);
        self.counters.frames_out(kind, u64::from(queued));
        queued
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::*;

    #[test]
    fn a_close_is_reported_once_and_the_first_reason_wins() {
        let shared = ConnShared::new(1, CancellationToken::new(), 8, usize::MAX);
        let full = || CloseReason::Server(1008, "slow consumer: send queue full".into());
        assert!(shared.close(full()), "the first close closes");
        assert!(
            !shared.close(full()),
            "a push to a closing connection is not a second close"
        );
        assert!(!shared.close(CloseReason::Client));
        assert!(matches!(
            shared.reason(),
            Some(CloseReason::Server(1008, _))
        ));
        let stopped = ConnShared::new(2, CancellationToken::new(), 8, usize::MAX);
        stopped.cancel.cancel(); // server shutdown
        assert!(
            !stopped.close(full()),
            "a connection already stopping is not counted"
        );
    }

    #[tokio::test]
    async fn readers_wait_past_the_limit_and_go_on_when_frames_are_written() {
        let backlog = Backlog::new(128); // two frames per connection
        let a = backlog.token(0).expect("counted");
        assert!(!backlog.room().await, "under the limit: no wait");
        let mut held = vec![a];
        for _ in 1..128 {
            held.push(backlog.token(0).expect("counted"));
        }
        assert_eq!(backlog.queued(), 128);
        let waiter = {
            let backlog = Arc::clone(&backlog);
            tokio::spawn(async move { backlog.room().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "at the limit a reader waits");
        // One frame written (its token dropped): the reader goes on.
        held.pop();
        let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert!(waited);
        drop(held);
        assert_eq!(backlog.queued(), 0, "every frame leaves the count");
    }

    #[test]
    fn a_connection_counts_only_its_share() {
        let backlog = Backlog::new(128);
        assert!(backlog.token(1).is_some());
        assert!(backlog.token(2).is_none(), "past 128 / 64 queued frames");
        assert!(Backlog::new(0).token(0).is_none(), "0: no gate");
        assert_eq!(backlog.queued(), 0);
    }

    #[tokio::test]
    async fn frames_dropped_with_a_closed_queue_leave_the_backlog() {
        let backlog = Backlog::new(1024);
        let conn = ConnHandle {
            shared: Arc::new(ConnShared::new(1, CancellationToken::new(), 8, 1 << 20)),
        };
        for _ in 0..3 {
            let push = Push {
                stored: None,
                accepted_ms: 0,
                _backlog: backlog.token(0),
            };
            assert!(conn.send(Outbound {
                text: Utf8Bytes::from_static("x"),
                push: Some(push),
            }));
        }
        assert_eq!(backlog.queued(), 3);
        assert_eq!(conn.shared.queued_frames(), 3);
        // The connection is gone with frames still queued.
        conn.shared.close_queue();
        assert_eq!(backlog.queued(), 0);
        assert!(
            !conn.send(Outbound::reply(Utf8Bytes::from_static("late"))),
            "a closed queue takes nothing"
        );
    }

    #[tokio::test]
    async fn the_send_queue_keeps_order_and_wakes_its_writer() {
        let shared = Arc::new(ConnShared::new(1, CancellationToken::new(), 4, 1 << 20));
        let conn = ConnHandle {
            shared: shared.clone(),
        };
        let writer = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 6 {
                let mut batch = Vec::new();
                shared.recv_many(&mut batch, 64).await;
                got.extend(batch.into_iter().map(|f| f.text.to_string()));
            }
            got
        });
        for i in 0..6 {
            // Past 4 frames not yet taken the queue is full: wait for the
            // writer to take some.
            while conn.shared.queued_frames() >= 4 {
                tokio::task::yield_now().await;
            }
            assert!(conn.send(Outbound::reply(Utf8Bytes::from(format!("f{i}")))));
            tokio::task::yield_now().await;
        }
        let got = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer was woken")
            .expect("writer");
        assert_eq!(got, ["f0", "f1", "f2", "f3", "f4", "f5"]);
    }

    #[test]
    fn a_full_send_queue_refuses_and_closes_a_slow_consumer() {
        let conn = ConnHandle {
            shared: Arc::new(ConnShared::new(1, CancellationToken::new(), 2, 1 << 20)),
        };
        assert!(conn.send(Outbound::reply(Utf8Bytes::from_static("a"))));
        assert!(conn.send(Outbound::reply(Utf8Bytes::from_static("b"))));
        assert!(!conn.send(Outbound::reply(Utf8Bytes::from_static("c"))));
        assert!(
            conn.shared.cancel.is_cancelled(),
            "closed as a slow consumer"
        );
        assert!(matches!(
            conn.shared.reason(),
            Some(CloseReason::Server(1008, _))
        ));
    }
}
