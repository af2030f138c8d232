//! The LSM store: fjall (a pure-Rust log-structured merge tree) under the
//! data dir.
//!
//! An inbox is a queue: every message is written once and deleted once,
//! usually moments later. An LSM tree writes both as sequential journal
//! appends, and a "weak" (single) delete lets compaction drop the value and
//! its tombstone together. One writer thread commits everything queued in one
//! batch and syncs the journal once per batch (group commit).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::group_commit::{Engine, GroupCommit, Outcome, WriteOp, needs_sync};
use crate::{FollowUp, InboxKey, InboxMessage, InboxPage, Removal, Store, StoreError};
use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;

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
}

impl Default for FjallStoreOptions {
    fn default() -> Self {
        FjallStoreOptions {
            max_batch: 8192,
            queue_capacity: 65_536,
            cache_bytes: 64 * 1024 * 1024,
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
}

impl FjallStore {
    pub fn open(data_dir: &Path, options: FjallStoreOptions) -> Result<Self, StoreError> {
        let path = data_dir.join("inbox.lsm");
        std::fs::create_dir_all(&path).map_err(backend)?;
        let db = Database::builder(&path)
            .cache_size(options.cache_bytes)
            .open()
            .map_err(backend)?;
        let inbox = db
            .keyspace("inbox", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let last_seq = db
            .keyspace("inbox_last_seq", KeyspaceCreateOptions::default)
            .map_err(backend)?;
        let writer = Writer {
            db,
            inbox: inbox.clone(),
            last_seq,
            seq_cache: HashMap::new(),
        };
        let writer = GroupCommit::start(writer, options.max_batch, options.queue_capacity)?;
        Ok(FjallStore { inbox, writer })
    }
}

/// The writes of one batch, last write per key wins (an append and a removal
/// of the same message in one batch cancel out).
#[derive(Default)]
struct Pending {
    inbox: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
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
        msg: &mut InboxMessage,
        pending: &mut Pending,
    ) -> Result<u64, StoreError> {
        let prefix = inbox_prefix(app_id, &msg.to);
        let seq = self.next_seq(&prefix, pending)?;
        msg.seq = seq;
        pending
            .inbox
            .insert(message_key(&prefix, seq), Some(msg.encode_to_vec()));
        Ok(seq)
    }

    fn apply(&mut self, op: &mut WriteOp, pending: &mut Pending) -> Result<Outcome, StoreError> {
        match op {
            WriteOp::Append {
                app_id, messages, ..
            } => {
                let mut seqs = Vec::with_capacity(messages.len());
                for msg in messages.iter_mut() {
                    seqs.push(self.append_one(app_id, msg, pending)?);
                }
                Ok(Outcome::Appended(seqs))
            }
            WriteOp::Remove {
                inbox,
                seqs,
                follow_up,
                ..
            } => {
                let prefix = inbox_prefix(&inbox.app_id, &inbox.user_id);
                let mut removal = Removal::default();
                for &seq in seqs.iter() {
                    let key = message_key(&prefix, seq);
                    let current = match pending.inbox.get(&key) {
                        Some(v) => v.clone(),
                        None => self.inbox.get(&key).map_err(backend)?.map(|v| v.to_vec()),
                    };
                    if let Some(bytes) = current {
                        removal
                            .removed
                            .push(InboxMessage::decode(bytes.as_slice())?);
                        pending.inbox.insert(key, None);
                    }
                }
                if let Some(follow_up) = follow_up {
                    for i in 0..removal.removed.len() {
                        if let Some(mut next) = follow_up(&removal.removed[i]) {
                            self.append_one(&inbox.app_id, &mut next, pending)?;
                            removal.appended.push(next);
                        }
                    }
                }
                Ok(Outcome::Removed(removal))
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
            // Nothing of this batch was written: forget its sequence numbers;
            // the next use reloads them from disk.
            for prefix in &touched {
                self.seq_cache.remove(prefix);
            }
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
        messages: Vec<InboxMessage>,
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
                    let value = guard.value().map_err(backend)?;
                    page.messages.push(InboxMessage::decode(value.as_ref())?);
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
            let msgs = (0..10)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            let seqs = store.append("a", msgs).await.expect("append");
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
            .append("a", vec![crate::contract::message("a-1", "next")])
            .await
            .expect("append");
        assert_eq!(seqs, vec![11]);
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
