//! The LSM store: fjall (a pure-Rust log-structured merge tree) under the
//! data dir.
//!
//! An inbox is a queue: every message is written once and deleted once,
//! usually moments later. An LSM tree writes both as sequential journal
//! appends, and a "weak" (single) delete lets compaction drop the value and
//! its tombstone together. One writer thread commits everything queued in one
//! batch and syncs the journal once per batch (group commit).
//!
//! The id index of client-given message ids is written in the log frame of
//! the message it came with (one sync for both), kept in memory while its
//! segment lives, and moved into the `client_ids` keyspace (key → accepted
//! at, Unix ms) when the segment retires. Entries past the window are
//! ignored at lookup and dropped by a compaction filter.

use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::group_commit::{Engine, GroupCommit, Outcome, WriteOp};
use crate::groups::{FjallGroups, GroupStore};
use crate::hot::{self, HotLog, HotOptions, SharedIndex, Taken};
use crate::queue::{FjallQueues, Queue};
use crate::{
    Appended, FollowUp, InboxKey, InboxMessage, InboxPage, Removal, Store, StoreError,
    decode_stored, follow_up_of,
};
use async_trait::async_trait;
use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use prost::Message;

/// The keyspace of the id index.
const CLIENT_IDS: &str = "client_ids";

/// A message encoded for storage, on the caller's thread: the writer only
/// assigns its sequence number (kept in the key, not in the value).
pub(crate) struct Prepared {
    pub(crate) to: String,
    /// Whether it carries a reference: only such a message can have a
    /// follow-up (see [`FollowUp`]), so a removal reads no other.
    pub(crate) referenced: bool,
    /// Encoded straight into the buffer fjall keeps (no copy on the writer
    /// thread).
    pub(crate) value: Slice,
    /// Its id index key, when its id was given by the client.
    pub(crate) client_key: Option<Vec<u8>>,
}

impl Prepared {
    pub(crate) fn new(msg: &InboxMessage, app_id: &str, client_id: bool) -> Self {
        // The seq lives in the key only.
        let value = if msg.seq == 0 {
            encode_value(msg)
        } else {
            encode_value(&InboxMessage {
                seq: 0,
                ..msg.clone()
            })
        };
        Prepared {
            to: msg.to.clone(),
            referenced: !msg.reference.is_empty(),
            value,
            client_key: client_id.then(|| client_id_key(app_id, &msg.from, &msg.id)),
        }
    }
}

fn encode_value(msg: &InboxMessage) -> Slice {
    let mut value = byteview::ByteView::with_size(msg.encoded_len());
    let encoded = match value.get_mut() {
        Some(mut buf) => {
            let mut out: &mut [u8] = &mut buf;
            // The buffer has exactly the encoded length.
            msg.encode(&mut out).is_ok() && out.is_empty()
        }
        None => false,
    };
    if encoded {
        Slice::from(value)
    } else {
        // Unreachable in practice (a fresh buffer has one owner, and the
        // length is prost's own); the plain way.
        Slice::from(msg.encode_to_vec())
    }
}

/// `len(app) app len(from) from len(id) id` — an id index key.
fn client_id_key(app_id: &str, from: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + app_id.len() + from.len() + id.len());
    for part in [app_id, from, id] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        k.extend_from_slice(&len.to_be_bytes());
        k.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
    }
    k
}

/// Now, Unix milliseconds: id index entries outlive the process.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Drops id index entries past the window when compaction rewrites them:
/// the tree's part of the index shrinks without a scan of its own.
struct ExpiredClientIds {
    window_ms: u64,
}

impl Factory for ExpiredClientIds {
    fn name(&self) -> &str {
        "expired-client-ids"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpiryFilter {
            oldest_kept: unix_ms().saturating_sub(self.window_ms),
        })
    }
}

struct ExpiryFilter {
    oldest_kept: u64,
}

impl CompactionFilter for ExpiryFilter {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _ctx: &Context) -> CompactionFilterResult {
        let at = item.value()?;
        Ok(match accepted_at(&at) {
            Some(at) if at < self.oldest_kept => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}

/// An id index value: when it was accepted, Unix ms.
fn accepted_at(value: &[u8]) -> Option<u64> {
    value.try_into().ok().map(u64::from_be_bytes)
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// `len(app) app len(user) user` — the partition prefix of an inbox.
fn inbox_prefix(app_id: &str, user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + app_id.len() + user_id.len() + 8);
    for part in [app_id, user_id] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        k.extend_from_slice(&len.to_be_bytes());
        k.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
    }
    k
}

/// The sequence number at the end of a message key.
fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Backend("corrupt message key".into()))
}

fn message_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Tuning of the LSM store.
#[derive(Debug, Clone)]
pub struct FjallStoreOptions {
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub cache_bytes: u64,
    /// Size of the in-memory table before it is written out. Only messages
    /// that stay undelivered reach the tree, in bulk (8 MiB: ~10 % less
    /// store-writer CPU than fjall's default 64 MiB, docs/benchmarks.md).
    pub memtable_bytes: u64,
    /// Bytes of undelivered messages kept in memory by the hot tier (the
    /// inbox log) before the oldest are moved into the tree.
    pub hot_bytes: usize,
    /// Size of one inbox log segment file.
    pub segment_bytes: u64,
    /// Past `hot_bytes`, only messages at least this old are spilled into
    /// the tree: younger ones are in flight and about to be removed.
    pub spill_after: std::time::Duration,
    /// Shortest time from one sync to the next: appends arriving sooner
    /// wait for it and share one sync.
    pub sync_interval: std::time::Duration,
    /// Inbox sequence counters kept in memory; past it, those of inboxes
    /// that no live log segment appends to are written to the tree and
    /// dropped (down to half), and read back on their next append. ~100
    /// bytes each.
    pub counters_kept: usize,
    /// Start even when the inbox log is damaged: keep every intact record,
    /// log what was lost, and continue every inbox's numbers above all
    /// given out before. Without it a damaged log refuses the start
    /// ([`StoreError::Damaged`]).
    pub recover: bool,
    /// How long a client-given message id is remembered: a resend within it
    /// is a repeat.
    pub id_window: std::time::Duration,
}

impl Default for FjallStoreOptions {
    fn default() -> Self {
        FjallStoreOptions {
            max_batch: 8192,
            queue_capacity: 65_536,
            cache_bytes: 64 * 1024 * 1024,
            memtable_bytes: 8 * 1024 * 1024,
            hot_bytes: 64 * 1024 * 1024,
            segment_bytes: 8 * 1024 * 1024,
            spill_after: std::time::Duration::from_secs(5),
            sync_interval: std::time::Duration::from_micros(1000),
            counters_kept: 65_536,
            recover: false,
            id_window: std::time::Duration::from_secs(24 * 60 * 60),
        }
    }
}

pub struct FjallStore {
    inbox: Keyspace,
    /// The durable queues, in the same database.
    queues: FjallQueues,
    /// Persistent groups, in the same database.
    groups: FjallGroups,
    hot: SharedIndex,
    writer: GroupCommit,
    /// Sequence counters held in memory by the writer (after each batch).
    counters: Arc<AtomicUsize>,
}

struct Writer {
    db: Database,
    inbox: Keyspace,
    last_seq: Keyspace,
    /// The sequence high-water mark (`SEQ_MARK`) and floor (`SEQ_FLOOR`).
    meta: Keyspace,
    /// No sequence number above it was given out: raised (durably, by
    /// `SEQ_BLOCK`) before one would be.
    mark: u64,
    /// Every inbox's next number is above it: the mark at the last start
    /// that lost messages.
    floor: u64,
    /// The id index's entries from retired log segments.
    client_ids: Keyspace,
    id_window_ms: u64,
    /// Last assigned sequence number per inbox prefix (loaded on first use,
    /// or from the log at start). Never rolled back: a failed batch leaves a
    /// gap, which is harmless, where reloading could reuse a number. Past
    /// `counters_kept`, entries of inboxes that no live log segment appends
    /// to are written to the tree and dropped (`trim_counters`): the map
    /// holds the inboxes written recently, not every inbox since start.
    seq_cache: HashMap<Vec<u8>, u64>,
    counters: Arc<AtomicUsize>,
    counters_kept: usize,
    hot: HotLog,
    metrics: LogMetrics,
    /// Maintenance attempts failed in a row (a full disk fails every one):
    /// the first is logged, then one line when it works again.
    maintenance_failures: u64,
}

/// What operators watch of the inbox log.
struct LogMetrics {
    bytes: metrics::Gauge,
    segments: metrics::Gauge,
    spilled: metrics::Counter,
    counters: metrics::Gauge,
}

impl LogMetrics {
    fn new() -> Self {
        LogMetrics {
            bytes: metrics::gauge!("switchboard_store_log_bytes"),
            segments: metrics::gauge!("switchboard_store_log_segments"),
            spilled: metrics::counter!("switchboard_store_spilled_total"),
            counters: metrics::gauge!("switchboard_store_counters_cached"),
        }
    }
}

/// Keys of the store's own records in the `store_meta` keyspace.
const SEQ_MARK: &[u8] = b"seq_mark";
const SEQ_FLOOR: &[u8] = b"seq_floor";
/// Sequence numbers reserved at a time: one synced write per block.
const SEQ_BLOCK: u64 = 1 << 16;

fn read_u64(keyspace: &Keyspace, key: &[u8]) -> Result<u64, StoreError> {
    match keyspace.get(key).map_err(backend)? {
        Some(bytes) => {
            let arr: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Backend("corrupt store record".into()))?;
            Ok(u64::from_be_bytes(arr))
        }
        None => Ok(0),
    }
}

impl FjallStore {
    /// Inbox sequence counters the writer holds in memory, as of its last
    /// batch (also the `switchboard_store_counters_cached` gauge).
    pub fn counters_cached(&self) -> usize {
        self.counters.load(Ordering::Relaxed)
    }

    /// The durable queues kept in this store's database.
    pub fn queues(&self) -> Arc<dyn Queue> {
        Arc::new(self.queues.clone())
    }

    /// The persistent groups kept in this store's database.
    pub fn groups(&self) -> Arc<dyn GroupStore> {
        Arc::new(self.groups.clone())
    }

    pub fn open(data_dir: &Path, options: FjallStoreOptions) -> Result<Self, StoreError> {
        let path = data_dir.join("inbox.lsm");
        std::fs::create_dir_all(&path).map_err(backend)?;
        clear_interrupted_creation(&path).map_err(backend)?;
        let id_window_ms = u64::try_from(options.id_window.as_millis()).unwrap_or(u64::MAX);
        let expiry: Arc<dyn Factory> = Arc::new(ExpiredClientIds {
            window_ms: id_window_ms,
        });
        let db = Database::builder(&path)
            .cache_size(options.cache_bytes)
            .with_compaction_filter_factories(Arc::new(move |keyspace| {
                (keyspace == CLIENT_IDS).then(|| Arc::clone(&expiry))
            }))
            .open()
            .map_err(backend)?;
        let memtable = options.memtable_bytes;
        let inbox = db
            .keyspace("inbox", || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable)
            })
            .map_err(backend)?;
        let last_seq = db
            .keyspace("inbox_last_seq", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let meta = db
            .keyspace("store_meta", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let client_ids = db
            .keyspace(CLIENT_IDS, KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let segment_bytes = options.segment_bytes.max(4096);
        // Twice the budget's worth of segments, and at least 64 (512 MiB):
        // room for messages in flight under overload (~40 segments at
        // 100,000 RELIABLE msgs/s offered here) and for segments that each
        // keep a few undelivered messages.
        let segments = (options.hot_bytes as u64 / segment_bytes).saturating_mul(2);
        let hot_options = HotOptions {
            budget: options.hot_bytes,
            spill_after: options.spill_after,
            segment_bytes,
            max_segments: usize::try_from(segments).unwrap_or(usize::MAX).max(64),
        };
        let tree = inbox.clone();
        let manifest = data_dir.join("inbox.log").join(crate::manifest::FILE);
        let manifest_found = manifest.exists();
        let mut recovered = HotLog::open(
            &data_dir.join("inbox.log"),
            hot_options,
            options.recover,
            |prefix, seq| tree.contains_key(message_key(prefix, seq)).map_err(backend),
        )?;
        let mark = read_u64(&meta, SEQ_MARK)?;
        let mut floor = read_u64(&meta, SEQ_FLOOR)?;
        if mark > 0 && !manifest_found {
            // The tree says numbers were given out, so a log existed (its
            // manifest is written before the first number): the log
            // directory was deleted or lost with whatever it held.
            let detail = format!(
                "the inbox log's manifest is missing, but sequence numbers up to {mark} were given out: the log was deleted or lost"
            );
            if !options.recover {
                return Err(StoreError::Damaged {
                    file: manifest,
                    offset: 0,
                    detail,
                });
            }
            tracing::error!(file = %manifest.display(), "store recovery: {detail}");
            recovered.lost = true;
        }
        if recovered.lost {
            // Every number given out is at most the mark. A store written
            // before the mark existed has none: the log's highest number
            // and a block above it is the best bound there is.
            let log_max = recovered.last_seqs.values().copied().max().unwrap_or(0);
            let above = if mark > 0 { mark } else { log_max + SEQ_BLOCK };
            floor = floor.max(above);
            let mut wb = db.batch();
            wb.insert(&meta, SEQ_FLOOR, floor.to_be_bytes().to_vec());
            wb.commit().map_err(backend)?;
            db.persist(PersistMode::SyncAll).map_err(backend)?;
            tracing::error!(
                floor,
                "store recovery: messages may be lost; every inbox's sequence numbers continue above {floor}"
            );
        }
        recovered.log.begin()?;
        let queues = FjallQueues::open(&db)?;
        let groups = FjallGroups::open(&db)?;
        let mut writer = Writer {
            db,
            inbox: inbox.clone(),
            last_seq,
            meta,
            mark,
            floor,
            client_ids,
            id_window_ms,
            seq_cache: HashMap::new(),
            counters: Arc::default(),
            counters_kept: options.counters_kept,
            hot: recovered.log,
            metrics: LogMetrics::new(),
            maintenance_failures: 0,
        };
        for (prefix, seq) in recovered.last_seqs {
            let stored = writer.stored_last_seq(&prefix)?;
            writer.seq_cache.insert(prefix, seq.max(stored));
        }
        writer.publish_footprint();
        let hot = writer.hot.index();
        let counters = Arc::clone(&writer.counters);
        let writer = GroupCommit::start(
            writer,
            options.max_batch,
            options.queue_capacity,
            options.sync_interval,
        )?;
        Ok(FjallStore {
            inbox,
            queues,
            groups,
            hot,
            writer,
            counters,
        })
    }
}

/// The tree writes of one batch, last write per key wins (an append and a
/// removal of the same message in one batch cancel out).
#[derive(Default)]
struct Pending {
    inbox: BTreeMap<Slice, Option<Slice>>,
    last_seq: BTreeMap<Vec<u8>, u64>,
}

impl Pending {
    fn appends(&self) -> bool {
        self.inbox.values().any(Option::is_some)
    }
}

/// Where a removed message was: the hot tier or the tree. Its sender's
/// confirmation goes to the same place, so that removal and confirmation
/// are one atomic write.
#[derive(Clone, Copy, PartialEq)]
enum Tier {
    Hot,
    Tree,
}

impl Writer {
    fn stored_last_seq(&self, prefix: &[u8]) -> Result<u64, StoreError> {
        match self.last_seq.get(prefix).map_err(backend)? {
            Some(bytes) => {
                let arr: [u8; 8] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Backend("corrupt sequence counter".into()))?;
                Ok(u64::from_be_bytes(arr))
            }
            None => Ok(0),
        }
    }

    fn next_seq(&mut self, prefix: &[u8]) -> Result<u64, StoreError> {
        // The usual case: a known inbox, counted up in place.
        let seq = if let Some(last) = self.seq_cache.get_mut(prefix) {
            *last = (*last).max(self.floor) + 1;
            *last
        } else {
            let seq = self.stored_last_seq(prefix)?.max(self.floor) + 1;
            self.seq_cache.insert(prefix.to_vec(), seq);
            seq
        };
        if seq > self.mark {
            self.reserve(seq)?;
        }
        Ok(seq)
    }

    /// Raises the high-water mark past `seq`, synced before `seq` is given
    /// out: whatever a damaged log loses later, no number above the floor
    /// set from the mark was ever used.
    fn reserve(&mut self, seq: u64) -> Result<(), StoreError> {
        let mark = seq.saturating_add(SEQ_BLOCK);
        let mut wb = self.db.batch();
        wb.insert(&self.meta, SEQ_MARK, mark.to_be_bytes().to_vec());
        wb.commit().map_err(backend)?;
        self.db.persist(PersistMode::SyncData).map_err(backend)?;
        self.mark = mark;
        Ok(())
    }

    /// Whether a client id was accepted within the window: the log's
    /// entries first (newer), then the tree's.
    fn seen_within_window(&self, key: &[u8], now: u64) -> Result<bool, StoreError> {
        let within = |at: u64| now.saturating_sub(at) < self.id_window_ms;
        if let Some(at) = self.hot.client_id_at(key) {
            return Ok(within(at));
        }
        Ok(self
            .client_ids
            .get(key)
            .map_err(backend)?
            .and_then(|v| accepted_at(&v))
            .is_some_and(within))
    }

    /// Appends the messages of one call. A message with a client id is
    /// looked up in the id index; copies of one send (same key, other
    /// recipients) share its first copy's answer and one entry.
    fn append_all(
        &mut self,
        app_id: &str,
        messages: Vec<Prepared>,
        pending: &mut Pending,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut out = Vec::with_capacity(messages.len());
        // Sends of this call: key → (repeat, recipients so far). Empty (no
        // allocation) without client ids.
        let mut sends: HashMap<Vec<u8>, (bool, Vec<String>)> = HashMap::new();
        let mut now = None;
        for mut msg in messages {
            if let Some(key) = msg.client_key.take() {
                let repeat = match sends.get_mut(&key) {
                    Some((repeat, to)) => {
                        if to.contains(&msg.to) {
                            true
                        } else {
                            to.push(msg.to.clone());
                            *repeat
                        }
                    }
                    None => {
                        let now = *now.get_or_insert_with(unix_ms);
                        let repeat = self.seen_within_window(&key, now)?;
                        if !repeat {
                            self.hot.stage_client_id(&key, now);
                        }
                        sends.insert(key, (repeat, vec![msg.to.clone()]));
                        repeat
                    }
                };
                if repeat {
                    out.push(Appended::Repeat);
                    continue;
                }
            }
            out.push(Appended::Stored(self.append_one(
                app_id,
                msg,
                Tier::Hot,
                pending,
            )?));
        }
        Ok(out)
    }

    fn append_one(
        &mut self,
        app_id: &str,
        msg: Prepared,
        tier: Tier,
        pending: &mut Pending,
    ) -> Result<u64, StoreError> {
        let prefix = inbox_prefix(app_id, &msg.to);
        let seq = self.next_seq(&prefix)?;
        let value = msg.value;
        match tier {
            Tier::Hot => self.hot.stage_append(&prefix, seq, value, msg.referenced),
            Tier::Tree => {
                pending
                    .inbox
                    .insert(Slice::from(message_key(&prefix, seq)), Some(value));
                pending.last_seq.insert(prefix, seq);
            }
        }
        Ok(seq)
    }

    /// Takes a message out of the tree, if it is still there.
    fn take_from_tree(
        &mut self,
        key: Vec<u8>,
        pending: &mut Pending,
    ) -> Result<Option<Slice>, StoreError> {
        let value = match pending.inbox.get(key.as_slice()) {
            Some(v) => v.clone(),
            None => self.inbox.get(&key).map_err(backend)?,
        };
        if value.is_some() {
            pending.inbox.insert(Slice::from(key), None);
        }
        Ok(value)
    }

    fn remove_from(
        &mut self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
        pending: &mut Pending,
    ) -> Result<Removal, StoreError> {
        let prefix = inbox_prefix(&inbox.app_id, &inbox.user_id);
        let mut removal = Removal::default();
        for &seq in seqs {
            // Only a follow-up needs anything of the message, only of one
            // with a reference, and only its header: a message without one
            // (the hot tier knows) is not read, a body never decoded.
            // The tree does not know about references: its value is read.
            let (taken, tier) = match self.hot.stage_remove(&prefix, seq) {
                Some(taken) => (Some(taken), Tier::Hot),
                None => (
                    self.take_from_tree(message_key(&prefix, seq), pending)?
                        .map(Taken::Referenced),
                    Tier::Tree,
                ),
            };
            let Some(taken) = taken else { continue };
            removal.removed.push(seq);
            if let (Some(follow_up), Taken::Referenced(stored)) = (follow_up, &taken)
                && let Some(mut next) = follow_up_of(follow_up, stored)?
            {
                let prepared = Prepared::new(&next, &inbox.app_id, false);
                next.seq = self.append_one(&inbox.app_id, prepared, tier, pending)?;
                removal.appended.push(next);
            }
        }
        Ok(removal)
    }

    fn apply(&mut self, op: &mut WriteOp, pending: &mut Pending) -> Result<Outcome, StoreError> {
        match op {
            WriteOp::Append {
                app_id, messages, ..
            } => {
                let messages = std::mem::take(messages);
                Ok(Outcome::Appended(
                    self.append_all(app_id, messages, pending)?,
                ))
            }
            WriteOp::Remove {
                removals,
                follow_up,
                ..
            } => {
                let mut out = Vec::with_capacity(removals.len());
                for (inbox, seqs) in removals.iter() {
                    out.push(self.remove_from(inbox, seqs, *follow_up, pending)?);
                }
                Ok(Outcome::Removed(out))
            }
        }
    }

    /// Writes the tree's part of a batch, synced when it appends.
    fn commit_tree(&mut self, pending: Pending) -> Result<(), StoreError> {
        if pending.inbox.is_empty() && pending.last_seq.is_empty() {
            return Ok(());
        }
        let mode = if pending.appends() {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let mut wb = self.db.batch();
        for (key, value) in pending.inbox {
            match value {
                Some(v) => wb.insert(&self.inbox, key, v),
                // Each message is written once: a single delete lets
                // compaction drop it with its value.
                None => wb.remove_weak(&self.inbox, key),
            }
        }
        for (key, seq) in pending.last_seq {
            wb.insert(&self.last_seq, key, seq.to_be_bytes().to_vec());
        }
        wb.commit().map_err(backend)?;
        self.db.persist(mode).map_err(backend)
    }

    fn publish_footprint(&self) {
        let (bytes, segments) = self.hot.footprint();
        self.metrics.bytes.set(bytes as f64);
        self.metrics.segments.set(segments as f64);
        let counters = self.seq_cache.len();
        self.counters.store(counters, Ordering::Relaxed);
        self.metrics.counters.set(counters as f64);
    }

    /// Deletes log segments whose messages are all delivered, and spills
    /// the oldest segment's undelivered messages into the tree when the hot
    /// tier is over budget, and trims the counters held in memory. The tree
    /// is synced before a segment goes.
    fn maintain(&mut self) -> Result<(), StoreError> {
        while let Some(retirement) = self.hot.next_retirement()? {
            let mut wb = self.db.batch();
            for (prefix, seq, value) in &retirement.entries {
                wb.insert(&self.inbox, message_key(prefix, *seq), value.clone());
            }
            for prefix in &retirement.inboxes {
                if let Some(seq) = self.seq_cache.get(prefix) {
                    wb.insert(&self.last_seq, prefix.clone(), seq.to_be_bytes().to_vec());
                }
            }
            // Entries already past the window are not worth keeping.
            let oldest_kept = unix_ms().saturating_sub(self.id_window_ms);
            for (key, at) in &retirement.client_ids {
                if *at >= oldest_kept {
                    wb.insert(&self.client_ids, key.clone(), at.to_be_bytes().to_vec());
                }
            }
            wb.commit().map_err(backend)?;
            self.db.persist(PersistMode::SyncData).map_err(backend)?;
            if !retirement.entries.is_empty() {
                self.metrics
                    .spilled
                    .increment(retirement.entries.len() as u64);
                tracing::debug!(
                    messages = retirement.entries.len(),
                    "store: undelivered messages moved from the inbox log into the tree"
                );
            }
            self.hot.retired(retirement)?;
        }
        self.trim_counters()
    }

    /// Past `counters_kept` counters in memory, drops those of inboxes that
    /// no live log segment appends to (down to half the limit, so that the
    /// scan is rare), after writing them to the tree: a later append reads
    /// the same number back, whatever wrote the inbox last (the log, a
    /// confirmation stored in the tree, a batch that failed after taking
    /// numbers).
    fn trim_counters(&mut self) -> Result<(), StoreError> {
        let len = self.seq_cache.len();
        if len <= self.counters_kept {
            return Ok(());
        }
        let quiet: Vec<(Vec<u8>, u64)> = self
            .seq_cache
            .iter()
            .filter(|(prefix, _)| !self.hot.appends_to(prefix))
            .take(len - self.counters_kept / 2)
            .map(|(prefix, &seq)| (prefix.clone(), seq))
            .collect();
        if quiet.is_empty() {
            return Ok(());
        }
        let mut wb = self.db.batch();
        for (prefix, seq) in &quiet {
            wb.insert(&self.last_seq, prefix.clone(), seq.to_be_bytes().to_vec());
        }
        wb.commit().map_err(backend)?;
        self.db.persist(PersistMode::SyncData).map_err(backend)?;
        for (prefix, _) in quiet {
            self.seq_cache.remove(&prefix);
        }
        Ok(())
    }
}

impl Engine for Writer {
    fn commit(&mut self, batch: &mut [WriteOp]) -> Result<Vec<Outcome>, StoreError> {
        let mut pending = Pending::default();
        let outcomes: Result<Vec<Outcome>, StoreError> = batch
            .iter_mut()
            .map(|op| self.apply(op, &mut pending))
            .collect();
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.hot.abort();
                return Err(e);
            }
        };
        // Each removal and its confirmation are in the same part (log or
        // tree), so the two writes need no order between them.
        let sync = self.hot.appends_staged();
        self.hot.commit(sync)?;
        self.commit_tree(pending)?;
        match self.maintain() {
            Err(e) => {
                if self.maintenance_failures == 0 {
                    tracing::error!(error = %e, "store: inbox log maintenance failed; retried after each batch, logged again when it works");
                }
                self.maintenance_failures += 1;
            }
            Ok(()) if self.maintenance_failures > 0 => {
                tracing::warn!(
                    failed = self.maintenance_failures,
                    "store: inbox log maintenance works again"
                );
                self.maintenance_failures = 0;
            }
            Ok(()) => {}
        }
        self.publish_footprint();
        Ok(outcomes)
    }

    fn finish(&mut self) {
        if let Err(e) = self.db.persist(PersistMode::SyncAll) {
            tracing::error!(error = %e, "store: final persist failed");
        }
    }
}

/// An entry of the tree's range in a fetch: its seq alone (to count it) or
/// with its value (to return it).
trait TreeEntry {
    fn seq(self) -> Result<u64, StoreError>;
    fn seq_and_value(self) -> Result<(u64, Slice), StoreError>;
}

impl TreeEntry for fjall::Guard {
    fn seq(self) -> Result<u64, StoreError> {
        seq_of(&self.key().map_err(backend)?)
    }

    fn seq_and_value(self) -> Result<(u64, Slice), StoreError> {
        let (key, value) = self.into_inner().map_err(backend)?;
        Ok((seq_of(&key)?, value))
    }
}

/// One page of an inbox from its two tiers, both oldest first: the log's
/// first messages (read first; `hot_rest` more after them) and the tree's.
/// A message in both — moved from the log into the tree while the fetch ran
/// — is returned once, and counted once unless it is past the log's part.
fn merge_page<T: TreeEntry>(
    hot: Vec<(u64, Slice)>,
    hot_rest: u64,
    tree: impl Iterator<Item = T>,
    limit: usize,
) -> Result<InboxPage, StoreError> {
    let mut page = InboxPage::default();
    let put = |page: &mut InboxPage, seq: u64, value: &[u8]| {
        if page.messages.len() < limit {
            page.messages.push(decode_stored(value, seq)?);
        } else {
            page.left += 1;
        }
        Ok::<(), StoreError>(())
    };
    let mut hot = hot.into_iter().peekable();
    for entry in tree {
        if page.messages.len() < limit {
            let (seq, value) = entry.seq_and_value()?;
            let mut twice = false;
            while let Some((hot_seq, hot_value)) = hot.next_if(|(s, _)| *s <= seq) {
                twice |= hot_seq == seq;
                put(&mut page, hot_seq, &hot_value)?;
            }
            if !twice {
                put(&mut page, seq, &value)?;
            }
        } else {
            // Counting the rest needs only the keys.
            let seq = entry.seq()?;
            while hot.next_if(|(s, _)| *s < seq).is_some() {
                page.left += 1;
            }
            hot.next_if(|(s, _)| *s == seq);
            page.left += 1;
        }
    }
    for (seq, value) in hot {
        put(&mut page, seq, &value)?;
    }
    page.left += hot_rest;
    Ok(page)
}

#[async_trait]
impl Store for FjallStore {
    async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
        client_ids: &[bool],
    ) -> Result<Vec<Appended>, StoreError> {
        self.writer.append(app_id, messages, client_ids).await
    }

    async fn fetch(
        &self,
        inbox: &InboxKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        if self.writer.is_closed() {
            return Err(StoreError::Closed);
        }
        let prefix = inbox_prefix(&inbox.app_id, &inbox.user_id);
        // The log first, then the tree: a message moved from one to the
        // other meanwhile is seen twice (and taken once), never missed.
        // Only the log's first `limit` can be on the page: any later one is
        // larger than all of them.
        let (hot, hot_rest) = hot::lock(&self.hot).after(&prefix, after_seq, limit);
        let keyspace = self.inbox.clone();
        tokio::task::spawn_blocking(move || {
            let from = message_key(&prefix, after_seq.saturating_add(1));
            let to = message_key(&prefix, u64::MAX);
            merge_page(hot, hot_rest, keyspace.range(from..=to), limit)
        })
        .await
        .map_err(backend)?
    }

    async fn remove(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError> {
        self.writer.remove(inbox, seqs, follow_up).await
    }

    async fn remove_many(
        &self,
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
    ) -> Result<Vec<Removal>, StoreError> {
        self.writer.remove_many(removals, follow_up).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.writer.close().await
    }
}

/// fjall 3 creates a database in steps — its lock file, its journal
/// `0.jnl`, its keyspaces folder — and writes its `version` marker last.
/// A process killed in between leaves a folder without the marker, which
/// every later open takes for a new database and fails to create
/// (`0.jnl` exists) — the store could never open again. Such a folder
/// holds nothing: nothing is written before the open returns. When the
/// folder holds exactly those leftovers (an empty keyspaces folder, a
/// journal with nothing written in it: zeros, as fjall preallocates it),
/// they are removed and the open creates the database afresh; anything
/// else is left for fjall to refuse.
fn clear_interrupted_creation(path: &Path) -> std::io::Result<()> {
    if path.join("version").try_exists()? {
        return Ok(());
    }
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let meta = entry.metadata()?;
        let leftover = match name.to_str() {
            Some("lock") => meta.is_file(),
            Some("0.jnl") => meta.is_file() && only_zeros(&entry.path())?,
            Some("keyspaces") => meta.is_dir() && std::fs::read_dir(entry.path())?.next().is_none(),
            _ => false,
        };
        if !leftover {
            // Not an interrupted creation: fjall decides.
            return Ok(());
        }
        leftovers.push((entry.path(), meta.is_dir()));
    }
    if leftovers.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(),
        "the store's database was never fully created (a process stopped while creating it; no version marker): removing its leftovers and creating it again"
    );
    for (leftover, dir) in leftovers {
        if dir {
            std::fs::remove_dir(&leftover)?;
        } else {
            std::fs::remove_file(&leftover)?;
        }
    }
    Ok(())
}

/// Whether the file holds nothing but zero bytes.
fn only_zeros(file: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(file)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> FjallStore {
        FjallStore::open(dir, FjallStoreOptions::default()).expect("open store")
    }

    /// A temp dir holding one store.
    struct FjallHarness(tempfile::TempDir);

    impl crate::contract::Harness for FjallHarness {
        type Store = FjallStore;

        async fn create() -> Self {
            FjallHarness(tempfile::tempdir().expect("tempdir"))
        }

        async fn open(&self, id_window: std::time::Duration) -> FjallStore {
            let options = FjallStoreOptions {
                id_window,
                ..FjallStoreOptions::default()
            };
            FjallStore::open(self.0.path(), options).expect("open store")
        }
    }

    crate::store_contract_tests!(FjallHarness);

    crate::queue_contract_tests!(|dir: &Path| open(dir).queues());

    crate::group_store_contract_tests!(|dir: &Path| open(dir).groups());

    /// What fjall 3's creation leaves when killed before its version
    /// marker: the lock, an empty keyspaces folder, a preallocated journal.
    fn interrupted_creation(dir: &Path) -> std::path::PathBuf {
        let db = dir.join("inbox.lsm");
        std::fs::create_dir_all(db.join("keyspaces")).expect("keyspaces");
        std::fs::write(db.join("lock"), b"").expect("lock");
        let journal = std::fs::File::create(db.join("0.jnl")).expect("journal");
        journal.set_len(64 * 1024 * 1024).expect("preallocate");
        db
    }

    #[tokio::test]
    async fn a_store_whose_creation_was_killed_opens_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = interrupted_creation(dir.path());
        let store = open(dir.path());
        let seqs =
            crate::contract::stored(&store, "a", &[crate::contract::message("a-1", "m")]).await;
        assert_eq!(seqs.len(), 1);
        store.close().await.expect("close");
        assert!(db.join("version").exists(), "created anew");
    }

    #[test]
    fn a_folder_that_is_not_an_interrupted_creation_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = interrupted_creation(dir.path());
        // Something was written in the journal: not a leftover of creation.
        std::fs::write(db.join("0.jnl"), b"written").expect("write");
        clear_interrupted_creation(&db).expect("check");
        assert!(db.join("0.jnl").exists());
        assert!(FjallStore::open(dir.path(), FjallStoreOptions::default()).is_err());

        // Another file beside the leftovers: left alone too.
        let other = tempfile::tempdir().expect("tempdir");
        let db = interrupted_creation(other.path());
        std::fs::write(db.join("notes.txt"), b"mine").expect("write");
        clear_interrupted_creation(&db).expect("check");
        assert!(db.join("0.jnl").exists() && db.join("notes.txt").exists());
    }

    #[tokio::test]
    async fn messages_and_counters_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        {
            let store = open(dir.path());
            let msgs: Vec<_> = (0..10)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            let seqs = crate::contract::stored(&store, "a", &msgs).await;
            store
                .remove(&inbox, &seqs[..2], None)
                .await
                .expect("remove");
            store.close().await.expect("close");
        }
        let store = open(dir.path());
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 8);
        let seqs =
            crate::contract::stored(&store, "a", &[crate::contract::message("a-1", "next")]).await;
        assert_eq!(seqs, vec![11]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn removals_past_the_memory_budget_read_the_tree() {
        // A budget of one message: nearly every removal misses memory and
        // reads the tree, and must still remove each message exactly once.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallStoreOptions {
            hot_bytes: 64,
            segment_bytes: 4096,
            spill_after: std::time::Duration::ZERO,
            ..FjallStoreOptions::default()
        };
        let store = FjallStore::open(dir.path(), options).expect("open");
        let inbox = InboxKey::new("a", "a-1");
        let msgs: Vec<_> = (0..50)
            .map(|i| crate::contract::message("a-1", &format!("m{i}")))
            .collect();
        let seqs = crate::contract::stored(&store, "a", &msgs).await;
        let first = store
            .remove(&inbox, &seqs[..30], None)
            .await
            .expect("remove");
        assert_eq!(first.removed, seqs[..30]);
        let left = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(left.messages.len(), 20);
        assert_eq!(left.messages[0].content, "m30");
        let again = store.remove(&inbox, &seqs, None).await.expect("remove");
        assert_eq!(again.removed.len(), 20, "only what was left");
        assert_eq!(store.count(&inbox).await.expect("count"), 0);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn messages_stored_before_a_restart_are_removed_once() {
        // After reopening, nothing is in memory: removals read the tree.
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        let seqs = {
            let store = open(dir.path());
            let msgs: Vec<_> = (0..5)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            let seqs = crate::contract::stored(&store, "a", &msgs).await;
            store.close().await.expect("close");
            seqs
        };
        let store = open(dir.path());
        let removal = store.remove(&inbox, &seqs, None).await.expect("remove");
        assert_eq!(removal.removed, seqs);
        assert!(
            store
                .remove(&inbox, &seqs, None)
                .await
                .expect("remove")
                .removed
                .is_empty()
        );
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn follow_ups_after_a_restart_see_only_referenced_messages() {
        // Replayed from the log, the hot tier does not know which messages
        // carry a reference: it reads them at removal.
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        let seqs = {
            let store = open(dir.path());
            let mut with_ref = crate::contract::message("a-1", "r");
            with_ref.reference = "ref".into();
            with_ref.from = "a-2".into();
            let msgs = [crate::contract::message("a-1", "plain"), with_ref];
            let seqs = crate::contract::stored(&store, "a", &msgs).await;
            store.close().await.expect("close");
            seqs
        };
        let store = open(dir.path());
        let removal = store
            .remove(&inbox, &seqs, Some(crate::contract::confirm_any))
            .await
            .expect("remove");
        assert_eq!(removal.removed, seqs);
        let to: Vec<&str> = removal.appended.iter().map(|m| m.to.as_str()).collect();
        assert_eq!(to, ["a-2"]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn counters_of_inboxes_gone_quiet_leave_memory_and_are_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = "q".repeat(300);
        let quiet: Vec<InboxKey> = (0..50)
            .map(|i| InboxKey::new("a", format!("a-q{i}")))
            .collect();
        {
            let options = FjallStoreOptions {
                counters_kept: 0,
                ..small_hot_tier()
            };
            let store = FjallStore::open(dir.path(), options).expect("open");
            for inbox in &quiet {
                let msg = crate::contract::message(&inbox.user_id, &body);
                let seqs = crate::contract::stored(&store, "a", &[msg]).await;
                assert_eq!(seqs, vec![1]);
                store.remove(inbox, &seqs, None).await.expect("remove");
            }
            // One busy inbox: its segments fill and retire, and with them
            // the quiet inboxes' counters leave memory for the tree.
            let busy = InboxKey::new("a", "a-busy");
            for _ in 0..100 {
                let msg = crate::contract::message("a-busy", &body);
                let seqs = crate::contract::stored(&store, "a", &[msg]).await;
                store.remove(&busy, &seqs, None).await.expect("remove");
            }
            let cached = store.counters_cached();
            assert!(cached <= 5, "{cached} counters still in memory");
            // A quiet inbox written again continues its numbers.
            let msg = crate::contract::message("a-q0", "again");
            let seqs = crate::contract::stored(&store, "a", &[msg]).await;
            assert_eq!(seqs, vec![2]);
            store.close().await.expect("close");
        }
        // And after a restart.
        let store = FjallStore::open(dir.path(), small_hot_tier()).expect("open");
        for (i, want) in [(0, 3), (1, 2), (49, 2)] {
            let msg = crate::contract::message(&quiet[i].user_id, "later");
            let seqs = crate::contract::stored(&store, "a", &[msg]).await;
            assert_eq!(seqs, vec![want], "inbox {i}");
        }
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn counters_of_senders_confirmed_from_the_tree_leave_memory_too() {
        // Messages spilled into the tree before their delivery get their
        // confirmations stored in the tree: those senders' inboxes never
        // appear in the log, and their counters must leave memory as well.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallStoreOptions {
            hot_bytes: 64,
            segment_bytes: 4096,
            spill_after: std::time::Duration::ZERO,
            counters_kept: 0,
            ..FjallStoreOptions::default()
        };
        let store = FjallStore::open(dir.path(), options).expect("open");
        let inbox = InboxKey::new("a", "a-1");
        let body = "s".repeat(300);
        let msgs: Vec<_> = (0..30)
            .map(|i| {
                let mut m = crate::contract::message("a-1", &body);
                m.from = format!("a-s{i}");
                m.reference = format!("r{i}");
                m
            })
            .collect();
        let seqs = crate::contract::stored(&store, "a", &msgs).await;
        let removal = store
            .remove(&inbox, &seqs, Some(crate::contract::confirm_any))
            .await
            .expect("remove");
        assert_eq!(removal.appended.len(), 30);
        // Later batches retire what is left and trim.
        for _ in 0..20 {
            let msg = crate::contract::message("a-busy", &body);
            let seqs = crate::contract::stored(&store, "a", &[msg]).await;
            store
                .remove(&InboxKey::new("a", "a-busy"), &seqs, None)
                .await
                .expect("remove");
        }
        let cached = store.counters_cached();
        assert!(cached <= 5, "{cached} counters still in memory");
        // Each sender's inbox holds its confirmation (seq 1): the next
        // number is 2, read back from the tree.
        for i in [0, 29] {
            let msg = crate::contract::message(&format!("a-s{i}"), "next");
            let seqs = crate::contract::stored(&store, "a", &[msg]).await;
            assert_eq!(seqs, vec![2], "sender {i}");
        }
        store.close().await.expect("close");
    }

    fn log_segments(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("inbox.log"))
            .expect("log dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }

    fn small_hot_tier() -> FjallStoreOptions {
        FjallStoreOptions {
            hot_bytes: 8 * 1024,
            segment_bytes: 4096,
            spill_after: std::time::Duration::ZERO,
            ..FjallStoreOptions::default()
        }
    }

    #[tokio::test]
    async fn client_ids_move_into_the_tree_with_their_segment_and_expire_there() {
        // The id index entry leaves memory with its log segment: a resend is
        // still a repeat (read from the tree), also after a restart, until
        // the window has passed.
        let dir = tempfile::tempdir().expect("tempdir");
        let window = std::time::Duration::from_secs(2);
        let options = || FjallStoreOptions {
            id_window: window,
            ..small_hot_tier()
        };
        let send = [crate::contract::message("a-bob", "once")];
        let store = FjallStore::open(dir.path(), options()).expect("open");
        let accepted = std::time::Instant::now();
        let first = store.append("a", &send, &[true]).await.expect("append");
        assert_eq!(first, [Appended::Stored(1)]);
        // Delivered: nothing but the id entry keeps its segment.
        let inbox = InboxKey::new("a", "a-bob");
        store.remove(&inbox, &[1], None).await.expect("remove");
        let busy = InboxKey::new("a", "a-busy");
        let body = "b".repeat(300);
        for _ in 0..60 {
            let msg = [crate::contract::message("a-busy", &body)];
            let seqs = crate::contract::stored(&store, "a", &msg).await;
            store.remove(&busy, &seqs, None).await.expect("remove");
        }
        let first_segment = dir.path().join("inbox.log").join(format!("{:016}.log", 1));
        assert!(
            !first_segment.exists(),
            "the entry's segment retired: {:?}",
            log_segments(dir.path())
        );
        let from_tree = store.append("a", &send, &[true]).await.expect("append");
        store.close().await.expect("close");
        drop(store);
        let store = FjallStore::open(dir.path(), options()).expect("reopen");
        let after_restart = store.append("a", &send, &[true]).await.expect("append");
        if accepted.elapsed() < window {
            assert_eq!(from_tree, [Appended::Repeat]);
            assert_eq!(after_restart, [Appended::Repeat]);
        }
        tokio::time::sleep(window).await;
        let later = store.append("a", &send, &[true]).await.expect("append");
        assert!(matches!(later[..], [Appended::Stored(_)]), "{later:?}");
        let page = store.fetch(&inbox, 0, 10).await.expect("fetch");
        // The first was delivered; a repeat adds nothing.
        let stored = |a: &[Appended]| usize::from(a != [Appended::Repeat]);
        let want = 1 + stored(&from_tree) + stored(&after_restart);
        assert_eq!(page.messages.len(), want, "{from_tree:?} {after_restart:?}");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn client_ids_of_undelivered_messages_spilled_past_the_budget_still_repeat() {
        // Id entries count against the hot tier's budget: with a tiny one,
        // segments are spilled while their messages are undelivered, and
        // every id is still answered as a repeat, from the tree.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallStoreOptions {
            hot_bytes: 512,
            segment_bytes: 4096,
            spill_after: std::time::Duration::ZERO,
            ..FjallStoreOptions::default()
        };
        let store = FjallStore::open(dir.path(), options).expect("open");
        let send = |i: usize| {
            let mut m = crate::contract::message("a-off", &format!("m{i}"));
            m.id = format!("client-{i}");
            [m]
        };
        for i in 0..200 {
            let first = store.append("a", &send(i), &[true]).await.expect("append");
            assert!(matches!(first[..], [Appended::Stored(_)]), "{i}: {first:?}");
        }
        assert!(
            log_segments(dir.path()).len() <= 6,
            "spilled: {:?}",
            log_segments(dir.path())
        );
        for i in 0..200 {
            let again = store.append("a", &send(i), &[true]).await.expect("append");
            assert_eq!(again, [Appended::Repeat], "{i}");
        }
        let inbox = InboxKey::new("a", "a-off");
        assert_eq!(store.count(&inbox).await.expect("count"), 200);
        store.close().await.expect("close");
    }

    #[test]
    fn compaction_drops_client_ids_past_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let expiry: Arc<dyn Factory> = Arc::new(ExpiredClientIds { window_ms: 60_000 });
        let db = Database::builder(dir.path())
            .with_compaction_filter_factories(Arc::new(move |keyspace| {
                (keyspace == CLIENT_IDS).then(|| Arc::clone(&expiry))
            }))
            .open()
            .expect("open");
        let ids = db
            .keyspace(CLIENT_IDS, KeyspaceCreateOptions::default)
            .expect("keyspace");
        let now = unix_ms();
        ids.insert("old", (now - 120_000).to_be_bytes().to_vec())
            .expect("insert");
        ids.insert("new", now.to_be_bytes().to_vec())
            .expect("insert");
        ids.rotate_memtable_and_wait().expect("flush");
        ids.major_compact().expect("compact");
        assert!(ids.get("old").expect("get").is_none(), "expired: dropped");
        assert!(ids.get("new").expect("get").is_some(), "within the window");
    }

    #[tokio::test]
    async fn an_append_without_client_ids_may_not_be_misaligned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let two = [
            crate::contract::message("a-1", "x"),
            crate::contract::message("a-1", "y"),
        ];
        let err = store.append("a", &two, &[true]).await.expect_err("refused");
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn messages_in_flight_stay_in_the_log_past_the_budget() {
        // Young messages are about to be delivered: over the budget they are
        // not moved into the tree (under overload that made deliveries
        // collapse); once older than `spill_after` they are.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = |spill_after| FjallStoreOptions {
            spill_after,
            ..small_hot_tier()
        };
        let body = "w".repeat(400);
        let msgs: Vec<_> = (0..100)
            .map(|i| crate::contract::message("a-1", &format!("{i}{body}")))
            .collect();
        let store = FjallStore::open(dir.path(), options(std::time::Duration::from_secs(60)))
            .expect("open");
        for m in &msgs {
            crate::contract::stored(&store, "a", std::slice::from_ref(m)).await;
        }
        let in_memory = hot::lock(&store.hot).bytes();
        assert!(
            in_memory > 40_000,
            "all 100 still in the log: {in_memory} bytes"
        );
        store.close().await.expect("close");
        drop(store);
        let store = FjallStore::open(dir.path(), options(std::time::Duration::ZERO)).expect("open");
        crate::contract::stored(&store, "a", &[crate::contract::message("a-1", "next")]).await;
        let in_memory = hot::lock(&store.hot).bytes();
        assert!(
            in_memory <= 8 * 1024 + 4096,
            "old ones spilled: {in_memory} bytes"
        );
        let page = store
            .fetch(&InboxKey::new("a", "a-1"), 0, 1000)
            .await
            .expect("fetch");
        assert_eq!(page.messages.len(), 101);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn undelivered_messages_move_into_the_tree_and_survive_restarts() {
        // An offline user's inbox grows past the hot tier's budget while an
        // online user's messages come and go: the log stays small, the
        // offline inbox stays whole and in order, also after a restart.
        let dir = tempfile::tempdir().expect("tempdir");
        let offline = InboxKey::new("a", "a-off");
        let online = InboxKey::new("a", "a-on");
        let body = "x".repeat(200);
        {
            let store = FjallStore::open(dir.path(), small_hot_tier()).expect("open");
            for i in 0..300 {
                let msgs = [
                    crate::contract::message("a-off", &format!("{i:03}{body}")),
                    crate::contract::message("a-on", &format!("{i:03}")),
                ];
                let seqs = crate::contract::stored(&store, "a", &msgs).await;
                assert_eq!(seqs, vec![i + 1, i + 1]);
                let removed = store
                    .remove(&online, &seqs[1..], None)
                    .await
                    .expect("remove");
                assert_eq!(removed.removed.len(), 1);
            }
            // 300 × ~230 bytes went through a 8 KiB hot tier.
            let files = log_segments(dir.path());
            assert!(files.len() <= 8, "log kept small: {files:?}");
            let page = store.fetch(&offline, 0, 1000).await.expect("fetch");
            assert_eq!(page.messages.len(), 300);
            assert!(page.messages.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
            assert_eq!(page.messages[299].content, format!("299{body}"));
            store.close().await.expect("close");
        }
        let store = FjallStore::open(dir.path(), small_hot_tier()).expect("reopen");
        let page = store.fetch(&offline, 0, 100).await.expect("fetch");
        assert_eq!((page.messages.len(), page.left), (100, 200));
        assert_eq!(page.messages[0].content, format!("000{body}"));
        let page = store.fetch(&offline, 250, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 50);
        assert_eq!(store.count(&online).await.expect("count"), 0);
        // Numbers go on after the restart, in both inboxes.
        let seqs = crate::contract::stored(
            &store,
            "a",
            &[
                crate::contract::message("a-off", "next"),
                crate::contract::message("a-on", "next"),
            ],
        )
        .await;
        assert_eq!(seqs, vec![301, 301]);
        let all: Vec<u64> = (1..=301).collect();
        let removal = store.remove(&offline, &all, None).await.expect("remove");
        assert_eq!(removal.removed.len(), 301);
        assert_eq!(store.count(&offline).await.expect("count"), 0);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_dormant_inbox_keeps_its_numbers_after_its_segments_are_gone() {
        // An inbox's last messages are delivered, then it falls silent while
        // others fill and retire many segments: after a restart its numbers
        // go on (the counter came from the tree, not the log).
        let dir = tempfile::tempdir().expect("tempdir");
        let quiet = InboxKey::new("a", "a-quiet");
        let busy = InboxKey::new("a", "a-busy");
        let body = "y".repeat(300);
        {
            let store = FjallStore::open(dir.path(), small_hot_tier()).expect("open");
            for i in 0..5 {
                let seqs = crate::contract::stored(
                    &store,
                    "a",
                    &[crate::contract::message("a-quiet", &format!("q{i}"))],
                )
                .await;
                store.remove(&quiet, &seqs, None).await.expect("remove");
            }
            for i in 0..100 {
                let seqs = crate::contract::stored(
                    &store,
                    "a",
                    &[crate::contract::message("a-busy", &format!("{i}{body}"))],
                )
                .await;
                store.remove(&busy, &seqs, None).await.expect("remove");
            }
            store.close().await.expect("close");
        }
        let store = FjallStore::open(dir.path(), small_hot_tier()).expect("reopen");
        let seqs =
            crate::contract::stored(&store, "a", &[crate::contract::message("a-quiet", "after")])
                .await;
        assert_eq!(seqs, vec![6], "numbers are never reused");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn the_next_segment_file_is_prepared_in_the_background() {
        // Undelivered messages keep every segment alive, so no retired file
        // can be reused: after a rotation a new spare is written aside.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallStoreOptions {
            hot_bytes: 1 << 20,
            segment_bytes: 4096,
            ..FjallStoreOptions::default()
        };
        let store = FjallStore::open(dir.path(), options).expect("open");
        let body = "z".repeat(500);
        for i in 0..20 {
            crate::contract::stored(
                &store,
                "a",
                &[crate::contract::message("a-off", &format!("{i}{body}"))],
            )
            .await;
        }
        let spare = dir.path().join("inbox.log").join("fresh.spare");
        // Up to 10 s: the spare is written and synced by a background
        // thread, which a busy machine (CI) may not run for a while.
        let mut waited = 0;
        while !spare.exists() && waited < 500 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            waited += 1;
        }
        assert!(
            spare.exists(),
            "a spare was prepared: {:?}",
            log_segments(dir.path())
        );
        assert_eq!(std::fs::metadata(&spare).expect("spare").len(), 4096);
        let page = store
            .fetch(&InboxKey::new("a", "a-off"), 0, 100)
            .await
            .expect("fetch");
        assert_eq!(page.messages.len(), 20);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_torn_log_tail_loses_only_the_unacknowledged_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        {
            let store = open(dir.path());
            for i in 0..10 {
                crate::contract::stored(
                    &store,
                    "a",
                    &[crate::contract::message("a-1", &format!("m{i}"))],
                )
                .await;
            }
            store.close().await.expect("close");
        }
        // A batch whose write was cut short by a crash: a frame header that
        // promises more than follows.
        let last = log_segments(dir.path())
            .into_iter()
            .rfind(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
            .expect("a written segment");
        // Segment files are preallocated: the frames end where the zeros
        // begin.
        let mut bytes = std::fs::read(&last).expect("read segment");
        let end = bytes.iter().rposition(|&b| b != 0).expect("frames") + 1;
        let mut torn = 500u32.to_le_bytes().to_vec();
        torn.extend_from_slice(&[7; 30]);
        bytes.splice(end..end + torn.len(), torn);
        std::fs::write(&last, bytes).expect("tear the tail");
        let store = open(dir.path());
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 10);
        assert_eq!(page.messages[9].content, "m9");
        let seqs =
            crate::contract::stored(&store, "a", &[crate::contract::message("a-1", "after")]).await;
        // A cut tail may have held an acknowledged frame (damage to its
        // length or seal reads the same): numbers go on above the
        // high-water mark, never reusing one that may have been given out.
        assert!(seqs[0] > 11, "seq {} may reuse a torn frame's", seqs[0]);
        store.close().await.expect("close");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.count(&inbox).await.expect("count"), 11);
        let page = store.fetch(&inbox, 10, 10).await.expect("fetch");
        assert_eq!(page.messages[0].content, "after");
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_segment_left_behind_by_a_crash_after_its_spill_is_not_read_twice() {
        // A crash between syncing spilled messages into the tree and
        // deleting their segment leaves both: the restart must not show or
        // keep the messages twice.
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        {
            let store = open(dir.path());
            let msgs: Vec<_> = (0..20)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            crate::contract::stored(&store, "a", &msgs).await;
            store.close().await.expect("close");
        }
        let saved: Vec<(std::path::PathBuf, Vec<u8>)> = log_segments(dir.path())
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).expect("read segment");
                (p, bytes)
            })
            .collect();
        {
            // A tiny budget: the next batch spills everything into the tree.
            let options = FjallStoreOptions {
                hot_bytes: 16,
                segment_bytes: 4096,
                spill_after: std::time::Duration::ZERO,
                ..FjallStoreOptions::default()
            };
            let store = FjallStore::open(dir.path(), options).expect("open");
            crate::contract::stored(&store, "a", &[crate::contract::message("a-1", "m20")]).await;
            store.close().await.expect("close");
        }
        for (path, bytes) in &saved {
            std::fs::write(path, bytes).expect("restore segment");
        }
        let store = open(dir.path());
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        let contents: Vec<_> = page.messages.iter().map(|m| m.content.clone()).collect();
        let expected: Vec<_> = (0..=20).map(|i| format!("m{i}")).collect();
        assert_eq!(contents, expected);
        let all: Vec<u64> = (1..=21).collect();
        let removal = store.remove(&inbox, &all, None).await.expect("remove");
        assert_eq!(removal.removed.len(), 21);
        store.close().await.expect("close");
        drop(store);
        let store = open(dir.path());
        assert_eq!(
            store.count(&inbox).await.expect("count"),
            0,
            "no message comes back"
        );
        store.close().await.expect("close");
    }

    impl TreeEntry for (u64, Slice) {
        fn seq(self) -> Result<u64, StoreError> {
            Ok(self.0)
        }

        fn seq_and_value(self) -> Result<(u64, Slice), StoreError> {
            Ok(self)
        }
    }

    #[test]
    fn a_page_merges_both_tiers_and_takes_a_message_in_both_once() {
        let value = |tier: &str, seq: u64| {
            let msg = crate::contract::message("a-1", &format!("{tier}{seq}"));
            Prepared::new(&msg, "a", false).value
        };
        let hot = |seqs: &[u64]| {
            seqs.iter()
                .map(|&s| (s, value("log", s)))
                .collect::<Vec<_>>()
        };
        let tree = |seqs: &[u64]| {
            seqs.iter()
                .map(|&s| (s, value("tree", s)))
                .collect::<Vec<_>>()
        };
        // 3 is in both (moved into the tree while the fetch ran); so is 6,
        // past the page.
        let page = |limit| {
            merge_page(
                hot(&[2, 3, 5, 6]),
                0,
                tree(&[1, 3, 4, 6, 7]).into_iter(),
                limit,
            )
            .expect("merge")
        };
        let all = page(100);
        let seqs: Vec<u64> = all.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(all.messages[2].content, "log3", "the log's copy is taken");
        assert_eq!(all.left, 0);
        let first = page(3);
        let seqs: Vec<u64> = first.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, first.left), (vec![1, 2, 3], 4));
        assert_eq!(page(0).left, 7, "a count counts each message once");
        let only_log = merge_page(hot(&[4, 9]), 0, tree(&[]).into_iter(), 1).expect("merge");
        assert_eq!((only_log.messages[0].seq, only_log.left), (4, 1));
        // The log's part cut at the page size, 3 more behind it.
        let cut = merge_page(hot(&[2, 5]), 3, tree(&[1, 4]).into_iter(), 2).expect("merge");
        let seqs: Vec<u64> = cut.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, cut.left), (vec![1, 2], 2 + 3));
    }

    #[test]
    fn prefixes_do_not_collide() {
        // ("ab", "c") and ("a", "bc") must be different inboxes.
        assert_ne!(inbox_prefix("ab", "c"), inbox_prefix("a", "bc"));
        let p = inbox_prefix("a", "b");
        assert!(message_key(&p, 1) < message_key(&p, 2));
        assert!(message_key(&p, 255) < message_key(&p, 256));
    }
}
