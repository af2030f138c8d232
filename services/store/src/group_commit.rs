//! Group commit, shared by the embedded engines: one writer thread takes
//! everything queued (up to a batch size), hands it to the engine to apply as
//! one atomic write — synced when it appended anything — and answers every
//! caller. Under load, hundreds of appends share one sync.

use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::{FollowUp, InboxKey, InboxMessage, Prepared, Removal, StoreError};

pub(crate) enum WriteOp {
    Append {
        app_id: String,
        messages: Vec<Prepared>,
        reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
    },
    /// Removals from any number of inboxes (a delivered report), one reply.
    Remove {
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
        reply: oneshot::Sender<Result<Vec<Removal>, StoreError>>,
    },
}

impl WriteOp {
    /// Messages written by the operation.
    fn weight(&self) -> usize {
        match self {
            WriteOp::Append { messages, .. } => messages.len(),
            WriteOp::Remove { removals, .. } => removals.iter().map(|(_, s)| s.len()).sum(),
        }
    }
}

/// What one operation of a batch did.
pub(crate) enum Outcome {
    Appended(Vec<u64>),
    Removed(Vec<Removal>),
}

/// Whether a batch must be synced before its callers hear back: appends
/// (messages, confirmations) are; removals alone are not (see
/// `Store::remove`).
pub(crate) fn needs_sync(outcomes: &[Outcome]) -> bool {
    outcomes.iter().any(|o| match o {
        Outcome::Appended(_) => true,
        Outcome::Removed(rs) => rs.iter().any(|r| !r.appended.is_empty()),
    })
}

/// An engine's side of group commit.
pub(crate) trait Engine: Send + 'static {
    /// Applies the whole batch atomically (one outcome per operation, in
    /// order), synced when [`needs_sync`] says so; or fails it whole.
    fn commit(&mut self, batch: &mut [WriteOp]) -> Result<Vec<Outcome>, StoreError>;

    /// Called once when the store closes, after the last batch.
    fn finish(&mut self) {}
}

/// The writer thread and its queue.
pub(crate) struct GroupCommit {
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl GroupCommit {
    pub(crate) fn start(
        mut engine: impl Engine,
        max_batch: usize,
        queue_capacity: usize,
    ) -> Result<Self, StoreError> {
        let (tx, mut rx) = mpsc::channel::<WriteOp>(queue_capacity.max(1));
        let max_batch = max_batch.max(1);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut batch = Vec::new();
                while let Some(op) = rx.blocking_recv() {
                    // Bounded by messages, not operations: an operation can
                    // carry many (a pipelined connection's batch, a report).
                    let mut weight = op.weight();
                    batch.push(op);
                    while weight < max_batch {
                        match rx.try_recv() {
                            Ok(op) => {
                                weight += op.weight();
                                batch.push(op);
                            }
                            Err(_) => break,
                        }
                    }
                    let result = engine.commit(&mut batch);
                    answer(&mut batch, result);
                }
                engine.finish();
            })
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(GroupCommit {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.tx).is_none()
    }

    async fn submit(&self, op: WriteOp) -> Result<(), StoreError> {
        let tx = lock(&self.tx).clone().ok_or(StoreError::Closed)?;
        tx.send(op).await.map_err(|_| StoreError::Closed)
    }

    pub(crate) async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
    ) -> Result<Vec<u64>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded here, on the caller's thread: the writer is one thread
        // for the whole store, the callers are many.
        let messages = messages.iter().map(Prepared::new).collect();
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Append {
            app_id: app_id.to_owned(),
            messages,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn remove(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError> {
        if seqs.is_empty() {
            return Ok(Removal::default());
        }
        let mut removals = self
            .remove_many(vec![(inbox.clone(), seqs.to_vec())], follow_up)
            .await?;
        removals.pop().ok_or(StoreError::Backend(
            "store engine lost a removal".to_owned(),
        ))
    }

    pub(crate) async fn remove_many(
        &self,
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
    ) -> Result<Vec<Removal>, StoreError> {
        if removals.iter().all(|(_, seqs)| seqs.is_empty()) {
            return Ok(vec![Removal::default(); removals.len()]);
        }
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Remove {
            removals,
            follow_up,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops taking writes, lets the writer finish what is queued, and joins it.
    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        drop(lock(&self.tx).take());
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))?
                .map_err(|_| StoreError::Backend("store writer panicked".into()))?;
        }
        Ok(())
    }
}

fn answer(batch: &mut Vec<WriteOp>, result: Result<Vec<Outcome>, StoreError>) {
    match result {
        Ok(outcomes) if outcomes.len() == batch.len() => {
            for (op, outcome) in batch.drain(..).zip(outcomes) {
                match (op, outcome) {
                    (WriteOp::Append { reply, .. }, Outcome::Appended(seqs)) => {
                        let _ = reply.send(Ok(seqs));
                    }
                    (WriteOp::Remove { reply, .. }, Outcome::Removed(removals)) => {
                        let _ = reply.send(Ok(removals));
                    }
                    (op, _) => fail(op, "store engine answered out of order"),
                }
            }
        }
        Ok(_) => {
            for op in batch.drain(..) {
                fail(op, "store engine lost an outcome");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, ops = batch.len(), "store commit failed");
            let message = e.to_string();
            for op in batch.drain(..) {
                fail(op, &message);
            }
        }
    }
}

fn fail(op: WriteOp, message: &str) {
    let err = || StoreError::Backend(message.to_owned());
    match op {
        WriteOp::Append { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        WriteOp::Remove { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
    }
}
