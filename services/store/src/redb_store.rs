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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{FollowUp, InboxKey, InboxMessage, InboxPage, Removal, Store, StoreError};

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
}

impl Default for RedbStoreOptions {
    fn default() -> Self {
        RedbStoreOptions {
            max_batch: 8192,
            queue_capacity: 65_536,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

enum WriteOp {
    Append {
        app_id: String,
        messages: Vec<InboxMessage>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    Remove {
        inbox: InboxKey,
        seqs: Vec<u64>,
        follow_up: Option<FollowUp>,
        reply: oneshot::Sender<Result<Removal, StoreError>>,
    },
}

/// The default store: redb in `<data_dir>/inbox.redb`.
pub struct RedbStore {
    db: Arc<Database>,
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
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
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let writer_db = db.clone();
        let max_batch = options.max_batch.max(1);
        let writer_thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_db, rx, max_batch))
            .map_err(backend)?;
        Ok(RedbStore {
            db,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(writer_thread)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn submit(&self, op: WriteOp) -> Result<(), StoreError> {
        let tx = {
            let guard = self
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.clone().ok_or(StoreError::Closed)?
        };
        tx.send(op).await.map_err(|_| StoreError::Closed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
        {
            return Err(StoreError::Closed);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }
}

fn writer_loop(db: &Database, mut rx: mpsc::Receiver<WriteOp>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(db, &mut batch);
    }
}

enum Outcome {
    Appended(Vec<u64>),
    Removed(Removal),
}

/// Assigns the next sequence number of an inbox and inserts the message.
fn insert_next(
    inbox: &mut redb::Table<(&str, &str, u64), &[u8]>,
    last_seq: &mut redb::Table<(&str, &str), u64>,
    app_id: &str,
    msg: &mut InboxMessage,
) -> Result<u64, StoreError> {
    let key = (app_id, msg.to.as_str());
    let seq = last_seq
        .get(key)
        .map_err(backend)?
        .map(|g| g.value())
        .unwrap_or(0)
        + 1;
    last_seq.insert(key, seq).map_err(backend)?;
    msg.seq = seq;
    inbox
        .insert((key.0, key.1, seq), msg.encode_to_vec().as_slice())
        .map_err(backend)?;
    Ok(seq)
}

/// Applies a batch in one transaction. Appends make the commit durable;
/// a batch of removals alone is committed without fsync (the next durable
/// commit persists it too).
fn commit_batch(db: &Database, batch: &mut Vec<WriteOp>) {
    let result = (|| -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let mut txn = db.begin_write().map_err(backend)?;
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
                        for msg in messages.iter_mut() {
                            seqs.push(insert_next(&mut inbox, &mut last_seq, app_id, msg)?);
                        }
                        Ok(Outcome::Appended(seqs))
                    }
                    WriteOp::Remove {
                        inbox: key,
                        seqs,
                        follow_up,
                        ..
                    } => {
                        let mut removal = Removal::default();
                        for seq in seqs.iter() {
                            let old = inbox
                                .remove((key.app_id.as_str(), key.user_id.as_str(), *seq))
                                .map_err(backend)?
                                .map(|bytes| InboxMessage::decode(bytes.value()));
                            if let Some(msg) = old {
                                removal.removed.push(msg?);
                            }
                        }
                        if let Some(follow_up) = follow_up {
                            for msg in &removal.removed {
                                if let Some(mut next) = follow_up(msg) {
                                    insert_next(&mut inbox, &mut last_seq, &key.app_id, &mut next)?;
                                    removal.appended.push(next);
                                }
                            }
                        }
                        Ok(Outcome::Removed(removal))
                    }
                };
                outcomes.push(outcome);
            }
        }
        // Appends (messages, confirmations) are synced before anyone hears
        // of them; removals alone are not (see Store::remove).
        let durable = outcomes.iter().any(|o| match o {
            Ok(Outcome::Appended(_)) => true,
            Ok(Outcome::Removed(r)) => !r.appended.is_empty(),
            Err(_) => false,
        });
        if !durable {
            txn.set_durability(Durability::None).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(outcomes)
    })();

    match result {
        Ok(outcomes) => {
            for (op, outcome) in batch.drain(..).zip(outcomes) {
                match (op, outcome) {
                    (WriteOp::Append { reply, .. }, Ok(Outcome::Appended(seqs))) => {
                        let _ = reply.send(Ok(seqs));
                    }
                    (WriteOp::Remove { reply, .. }, Ok(Outcome::Removed(msgs))) => {
                        let _ = reply.send(Ok(msgs));
                    }
                    (WriteOp::Append { reply, .. }, Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    (WriteOp::Remove { reply, .. }, Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    (op, _) => fail(op, StoreError::Backend("outcome mismatch".into())),
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, ops = batch.len(), "store commit failed");
            for op in batch.drain(..) {
                fail(op, StoreError::Backend(e.to_string()));
            }
        }
    }
}

fn fail(op: WriteOp, err: StoreError) {
    match op {
        WriteOp::Append { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        WriteOp::Remove { reply, .. } => {
            let _ = reply.send(Err(err));
        }
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
        messages: Vec<InboxMessage>,
    ) -> Result<Vec<u64>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Append {
            app_id: app_id.to_owned(),
            messages,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
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
                let (_, value) = entry.map_err(backend)?;
                if page.messages.len() < limit {
                    page.messages.push(InboxMessage::decode(value.value())?);
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
        if seqs.is_empty() {
            return Ok(Removal::default());
        }
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Remove {
            inbox: inbox.clone(),
            seqs: seqs.to_vec(),
            follow_up,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn count(&self, inbox: &InboxKey) -> Result<u64, StoreError> {
        Ok(self.fetch(inbox, 0, 0).await?.left)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Dropping the sender lets the writer drain what is queued and stop.
        let sender = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(sender);
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(backend)?
                .map_err(|_| StoreError::Backend("store writer panicked".into()))?;
        }
        Ok(())
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
            let msgs = (0..10)
                .map(|i| crate::contract::message("a-1", &format!("m{i}")))
                .collect();
            store.append("a", msgs).await.expect("append");
            store.close().await.expect("close");
        }
        let store = open(dir.path()).await;
        let page = store.fetch(&inbox, 0, 100).await.expect("fetch");
        assert_eq!(page.messages.len(), 10);
        // Sequence numbers continue after a restart.
        let seqs = store
            .append("a", vec![crate::contract::message("a-1", "next")])
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
            .append("a", vec![crate::contract::message("a-1", "x")])
            .await;
        assert!(matches!(err, Err(StoreError::Closed)));
    }
}
