//! The LSM store: fjall (a pure-Rust log-structured merge tree) under the
//! data dir.
//!
//! An inbox is a queue: every message is written once and deleted once,
//! usually moments later. An LSM tree writes both as sequential journal
//! appends, and a "weak" (single) delete lets compaction drop the value and
//! its tombstone together. One writer thread commits everything queued in one
//! batch and syncs the journal once per batch (group commit).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use crate::group_commit::{Engine, GroupCommit, Outcome, WriteOp, needs_sync};
use crate::{
    FollowUp, InboxKey, InboxMessage, InboxPage, Prepared, Removal, Store, StoreError,
    decode_stored,
};
use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};

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
    /// Size of the in-memory table before it is written out. Inbox messages
    /// live moments, so a small table suffices, and every insert searches a
    /// shallower skip list (8 MiB: ~10 % less store-writer CPU than fjall's
    /// default 64 MiB here, docs/benchmarks.md).
    pub memtable_bytes: u64,
    /// Bytes of recently appended messages kept in memory until removed, so
    /// a removal needs no read of the tree.
    pub recent_bytes: usize,
}

impl Default for FjallStoreOptions {
    fn default() -> Self {
        FjallStoreOptions {
            max_batch: 8192,
            queue_capacity: 65_536,
            cache_bytes: 64 * 1024 * 1024,
            memtable_bytes: 8 * 1024 * 1024,
            recent_bytes: 32 * 1024 * 1024,
        }
    }
}

pub struct FjallStore {
    inbox: Keyspace,
    writer: GroupCommit,
}

struct Writer {
    db: Database,
    inbox: Keyspace,
    last_seq: Keyspace,
    /// Last assigned sequence number per inbox prefix (loaded on first use).
    seq_cache: HashMap<Vec<u8>, u64>,
    recent: Recent,
}

/// Messages this process appended and has not removed yet, oldest first out
/// past a byte budget. A delivered message is removed moments after its
/// append; the removal finds it here instead of searching the tree.
struct Recent {
    values: HashMap<Slice, Slice>,
    order: VecDeque<Slice>,
    bytes: usize,
    budget: usize,
}

impl Recent {
    fn new(budget: usize) -> Self {
        Recent {
            values: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn insert(&mut self, key: Slice, value: Slice) {
        if value.len() > self.budget {
            return;
        }
        self.bytes += value.len();
        self.order.push_back(key.clone());
        if let Some(old) = self.values.insert(key, value) {
            self.bytes -= old.len();
        }
        while self.bytes > self.budget || self.order.len() > 4 * self.values.len().max(1024) {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.values.remove(&oldest) {
                self.bytes -= v.len();
            }
        }
    }

    fn take(&mut self, key: &[u8]) -> Option<Slice> {
        let v = self.values.remove(key)?;
        self.bytes -= v.len();
        Some(v)
    }

    fn clear(&mut self) {
        self.values.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

impl FjallStore {
    pub fn open(data_dir: &Path, options: FjallStoreOptions) -> Result<Self, StoreError> {
        let path = data_dir.join("inbox.lsm");
        std::fs::create_dir_all(&path).map_err(backend)?;
        let db = Database::builder(&path)
            .cache_size(options.cache_bytes)
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
        let writer = Writer {
            db,
            inbox: inbox.clone(),
            last_seq,
            seq_cache: HashMap::new(),
            recent: Recent::new(options.recent_bytes),
        };
        let writer = GroupCommit::start(writer, options.max_batch, options.queue_capacity)?;
        Ok(FjallStore { inbox, writer })
    }
}

/// The writes of one batch, last write per key wins (an append and a removal
/// of the same message in one batch cancel out).
#[derive(Default)]
struct Pending {
    inbox: BTreeMap<Slice, Option<Slice>>,
    last_seq: BTreeMap<Vec<u8>, u64>,
}

impl Writer {
    fn next_seq(&mut self, prefix: &[u8], pending: &mut Pending) -> Result<u64, StoreError> {
        let last = match self.seq_cache.get(prefix) {
            Some(&seq) => seq,
            None => match self.last_seq.get(prefix).map_err(backend)? {
                Some(bytes) => {
                    let arr: [u8; 8] = bytes
                        .as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Backend("corrupt sequence counter".into()))?;
                    u64::from_be_bytes(arr)
                }
                None => 0,
            },
        };
        let seq = last + 1;
        self.seq_cache.insert(prefix.to_vec(), seq);
        pending.last_seq.insert(prefix.to_vec(), seq);
        Ok(seq)
    }

    fn append_one(
        &mut self,
        app_id: &str,
        msg: Prepared,
        pending: &mut Pending,
    ) -> Result<u64, StoreError> {
        let prefix = inbox_prefix(app_id, &msg.to);
        let seq = self.next_seq(&prefix, pending)?;
        let key = Slice::from(message_key(&prefix, seq));
        let value = Slice::from(msg.value);
        self.recent.insert(key.clone(), value.clone());
        pending.inbox.insert(key, Some(value));
        Ok(seq)
    }

    /// The stored value of a message, if it is still there.
    fn current(&mut self, key: &[u8], pending: &Pending) -> Result<Option<Slice>, StoreError> {
        if let Some(v) = self.recent.take(key) {
            return Ok(Some(v));
        }
        if let Some(v) = pending.inbox.get(key) {
            return Ok(v.clone());
        }
        self.inbox.get(key).map_err(backend)
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
            let key = message_key(&prefix, seq);
            if let Some(bytes) = self.current(&key, pending)? {
                removal.removed.push(decode_stored(&bytes, seq)?);
                pending.inbox.insert(Slice::from(key), None);
            }
        }
        if let Some(follow_up) = follow_up {
            for i in 0..removal.removed.len() {
                if let Some(mut next) = follow_up(&removal.removed[i]) {
                    next.seq = self.append_one(&inbox.app_id, Prepared::new(&next), pending)?;
                    removal.appended.push(next);
                }
            }
        }
        Ok(removal)
    }

    fn apply(&mut self, op: &mut WriteOp, pending: &mut Pending) -> Result<Outcome, StoreError> {
        match op {
            WriteOp::Append {
                app_id, messages, ..
            } => {
                let mut seqs = Vec::with_capacity(messages.len());
                for msg in std::mem::take(messages) {
                    seqs.push(self.append_one(app_id, msg, pending)?);
                }
                Ok(Outcome::Appended(seqs))
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
}

impl Engine for Writer {
    fn commit(&mut self, batch: &mut [WriteOp]) -> Result<Vec<Outcome>, StoreError> {
        let mut pending = Pending::default();
        let outcomes: Result<Vec<Outcome>, StoreError> = batch
            .iter_mut()
            .map(|op| self.apply(op, &mut pending))
            .collect();
        let touched: Vec<Vec<u8>> = pending.last_seq.keys().cloned().collect();
        let result = outcomes.and_then(|outcomes| {
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
            let mode = if needs_sync(&outcomes) {
                PersistMode::SyncData
            } else {
                PersistMode::Buffer
            };
            self.db.persist(mode).map_err(backend)?;
            Ok(outcomes)
        });
        if result.is_err() {
            // Nothing of this batch was written: forget its sequence numbers
            // (the next use reloads them from disk) and what it put in or
            // took out of memory.
            for prefix in &touched {
                self.seq_cache.remove(prefix);
            }
            self.recent.clear();
        }
        result
    }

    fn finish(&mut self) {
        if let Err(e) = self.db.persist(PersistMode::SyncAll) {
            tracing::error!(error = %e, "store: final persist failed");
        }
    }
}

#[async_trait]
impl Store for FjallStore {
    async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
    ) -> Result<Vec<u64>, StoreError> {
        self.writer.append(app_id, messages).await
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
        let keyspace = self.inbox.clone();
        tokio::task::spawn_blocking(move || {
            let from = message_key(&prefix, after_seq.saturating_add(1));
            let to = message_key(&prefix, u64::MAX);
            let mut page = InboxPage::default();
            for guard in keyspace.range(from..=to) {
                if page.messages.len() < limit {
                    let (key, value) = guard.into_inner().map_err(backend)?;
                    page.messages.push(decode_stored(&value, seq_of(&key)?)?);
                } else {
                    // Counting the rest needs only the keys.
                    guard.key().map_err(backend)?;
                    page.left += 1;
                }
            }
            Ok(page)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> FjallStore {
        FjallStore::open(dir, FjallStoreOptions::default()).expect("open store")
    }

    crate::store_contract_tests!({
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        (store, dir)
    });

    #[tokio::test]
    async fn messages_and_counters_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        {
            let store = open(dir.path());
            let msgs: Vec<_> = (0..10)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            let seqs = store.append("a", &msgs).await.expect("append");
            store
                .remove(&inbox, &seqs[..2], None)
                .await
                .expect("remove");
            store.close().await.expect("close");
        }
        let store = open(dir.path());
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 8);
        let seqs = store
            .append("a", &[crate::contract::message("a-1", "next")])
            .await
            .expect("append");
        assert_eq!(seqs, vec![11]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn removals_past_the_memory_budget_read_the_tree() {
        // A budget of one message: nearly every removal misses memory and
        // reads the tree, and must still remove each message exactly once.
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallStoreOptions {
            recent_bytes: 64,
            ..FjallStoreOptions::default()
        };
        let store = FjallStore::open(dir.path(), options).expect("open");
        let inbox = InboxKey::new("a", "a-1");
        let msgs: Vec<_> = (0..50)
            .map(|i| crate::contract::message("a-1", &format!("m{i}")))
            .collect();
        let seqs = store.append("a", &msgs).await.expect("append");
        let first = store
            .remove(&inbox, &seqs[..30], None)
            .await
            .expect("remove");
        assert_eq!(first.removed.len(), 30);
        assert_eq!(first.removed[29].content, "m29");
        assert_eq!(first.removed[29].seq, seqs[29]);
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
            let seqs = store.append("a", &msgs).await.expect("append");
            store.close().await.expect("close");
            seqs
        };
        let store = open(dir.path());
        let removal = store.remove(&inbox, &seqs, None).await.expect("remove");
        assert_eq!(removal.removed.len(), 5);
        assert_eq!(removal.removed[4].seq, seqs[4]);
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

    #[test]
    fn prefixes_do_not_collide() {
        // ("ab", "c") and ("a", "bc") must be different inboxes.
        assert_ne!(inbox_prefix("ab", "c"), inbox_prefix("a", "bc"));
        let p = inbox_prefix("a", "b");
        assert!(message_key(&p, 1) < message_key(&p, 2));
        assert!(message_key(&p, 255) < message_key(&p, 256));
    }
}
