//! The embedded store: one redb file under the data dir.
//!
//! redb is a pure-Rust, copy-on-write B-tree with ACID transactions and
//! checksummed commits; a commit with `Durability::Immediate` is fsync'd. An
//! fsync costs milliseconds here, so writes go through one writer thread that
//! commits everything queued since the last commit in a single transaction
//! (group commit): under load, thousands of appends share one fsync. Readers
//! use MVCC snapshots and never wait for the writer.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::group_commit::{Engine, GroupCommit, Outcome, WriteOp, needs_sync};
use crate::{
    FollowUp, InboxKey, InboxMessage, InboxPage, Prepared, Removal, Store, StoreError,
    decode_stored, follow_up_of,
};
use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// (app, user, seq) → encoded InboxMessage.
const INBOX: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("inbox");
/// (app, user) → the last sequence number assigned in that inbox.
const LAST_SEQ: TableDefinition<(&str, &str), u64> = TableDefinition::new("inbox_last_seq");

/// Tuning of the embedded store.
#[derive(Debug, Clone)]
pub struct RedbStoreOptions {
    /// Most operations committed in one transaction.
    pub max_batch: usize,
    /// Operations waiting for the writer before callers are slowed down.
    pub queue_capacity: usize,
    /// redb page cache, bytes.
    pub cache_bytes: usize,
    /// Shortest time from one sync to the next (see [`crate::FjallStoreOptions`]).
    pub sync_interval: std::time::Duration,
}

impl Default for RedbStoreOptions {
    fn default() -> Self {
        RedbStoreOptions {
            max_batch: 8192,
            queue_capacity: 65_536,
            cache_bytes: 64 * 1024 * 1024,
            sync_interval: std::time::Duration::from_micros(1000),
        }
    }
}

/// The redb store: one file, `<data_dir>/inbox.redb`.
pub struct RedbStore {
    db: Arc<Database>,
    writer: GroupCommit,
    path: PathBuf,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path, options: RedbStoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let path = data_dir.join("inbox.redb");
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(&path)
            .map_err(backend)?;
        // Create the tables once so readers never see them missing.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(INBOX).map_err(backend)?;
        txn.open_table(LAST_SEQ).map_err(backend)?;
        txn.commit().map_err(backend)?;

        let db = Arc::new(db);
        let writer = GroupCommit::start(
            RedbEngine { db: db.clone() },
            options.max_batch,
            options.queue_capacity,
            options.sync_interval,
        )?;
        Ok(RedbStore { db, writer, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self.writer.is_closed() {
            return Err(StoreError::Closed);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }
}

/// Assigns the next sequence number of an inbox and inserts the message.
fn insert_next(
    inbox: &mut redb::Table<(&str, &str, u64), &[u8]>,
    last_seq: &mut redb::Table<(&str, &str), u64>,
    app_id: &str,
    msg: &Prepared,
) -> Result<u64, StoreError> {
    let key = (app_id, msg.to.as_str());
    let seq = last_seq
        .get(key)
        .map_err(backend)?
        .map(|g| g.value())
        .unwrap_or(0)
        + 1;
    last_seq.insert(key, seq).map_err(backend)?;
    inbox
        .insert((key.0, key.1, seq), &*msg.value)
        .map_err(backend)?;
    Ok(seq)
}

/// The redb side of group commit: one write transaction per batch.
struct RedbEngine {
    db: Arc<Database>,
}

impl Engine for RedbEngine {
    fn commit(&mut self, batch: &mut [WriteOp]) -> Result<Vec<Outcome>, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut inbox = txn.open_table(INBOX).map_err(backend)?;
            let mut last_seq = txn.open_table(LAST_SEQ).map_err(backend)?;
            for op in batch.iter_mut() {
                let outcome = match op {
                    WriteOp::Append {
                        app_id, messages, ..
                    } => {
                        let mut seqs = Vec::with_capacity(messages.len());
                        for msg in messages.iter() {
                            seqs.push(insert_next(&mut inbox, &mut last_seq, app_id, msg)?);
                        }
                        Outcome::Appended(seqs)
                    }
                    WriteOp::Remove {
                        removals,
                        follow_up,
                        ..
                    } => {
                        let follow_up = *follow_up;
                        let mut out = Vec::with_capacity(removals.len());
                        for (key, seqs) in removals.iter() {
                            let mut removal = Removal::default();
                            for &seq in seqs {
                                // Only a follow-up needs the message, and
                                // only its header.
                                let next = match inbox
                                    .remove((key.app_id.as_str(), key.user_id.as_str(), seq))
                                    .map_err(backend)?
                                {
                                    None => continue,
                                    Some(old) => match follow_up {
                                        Some(follow_up) => follow_up_of(follow_up, old.value())?,
                                        None => None,
                                    },
                                };
                                removal.removed.push(seq);
                                if let Some(mut next) = next {
                                    next.seq = insert_next(
                                        &mut inbox,
                                        &mut last_seq,
                                        &key.app_id,
                                        &Prepared::new(&next),
                                    )?;
                                    removal.appended.push(next);
                                }
                            }
                            out.push(removal);
                        }
                        Outcome::Removed(out)
                    }
                };
                outcomes.push(outcome);
            }
        }
        if !needs_sync(&outcomes) {
            txn.set_durability(Durability::None).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(outcomes)
    }
}

fn lower(inbox: &InboxKey, after_seq: u64) -> (&str, &str, u64) {
    (
        inbox.app_id.as_str(),
        inbox.user_id.as_str(),
        after_seq.saturating_add(1),
    )
}

fn upper(inbox: &InboxKey) -> (&str, &str, u64) {
    (inbox.app_id.as_str(), inbox.user_id.as_str(), u64::MAX)
}

#[async_trait]
impl Store for RedbStore {
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
        let inbox = inbox.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(INBOX).map_err(backend)?;
            let range = table
                .range::<(&str, &str, u64)>((
                    Bound::Included(lower(&inbox, after_seq)),
                    Bound::Included(upper(&inbox)),
                ))
                .map_err(backend)?;
            let mut page = InboxPage::default();
            for entry in range {
                let (key, value) = entry.map_err(backend)?;
                if page.messages.len() < limit {
                    page.messages
                        .push(decode_stored(value.value(), key.value().2)?);
                } else {
                    page.left += 1;
                }
            }
            Ok(page)
        })
        .await
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

    async fn open(dir: &Path) -> RedbStore {
        RedbStore::open(dir, RedbStoreOptions::default()).expect("open store")
    }

    crate::store_contract_tests!({
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        (store, dir)
    });

    #[tokio::test]
    async fn messages_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = InboxKey::new("a", "a-1");
        {
            let store = open(dir.path()).await;
            let msgs: Vec<_> = (0..10)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            store.append("a", &msgs).await.expect("append");
            store.close().await.expect("close");
        }
        let store = open(dir.path()).await;
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 10);
        // Sequence numbers continue after a restart.
        let seqs = store
            .append("a", &[crate::contract::message("a-1", "next")])
            .await
            .expect("append");
        assert_eq!(seqs, vec![11]);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn closed_store_refuses_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        store.close().await.expect("close");
        let err = store
            .append("a", &[crate::contract::message("a-1", "x")])
            .await;
        assert!(matches!(err, Err(StoreError::Closed)));
    }
}
