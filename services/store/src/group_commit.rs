//! Group commit of the embedded engine: one writer thread takes
//! everything queued (up to a batch size), hands it to the engine to apply as
//! one atomic write — synced when it appended anything — and answers every
//! caller. Under load, hundreds of appends share one sync.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::fjall_store::Prepared;
use crate::{Appended, FollowUp, InboxKey, InboxMessage, Removal, StoreError};

pub(crate) enum WriteOp {
    Append {
        app_id: String,
        messages: Vec<Prepared>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    /// Removals from any number of inboxes (a delivered report), one reply.
    Remove {
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
        reply: oneshot::Sender<Result<Vec<Removal>, StoreError>>,
    },
}

impl WriteOp {
    fn is_append(&self) -> bool {
        matches!(self, WriteOp::Append { .. })
    }

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
    Appended(Vec<Appended>),
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
        sync_interval: Duration,
    ) -> Result<Self, StoreError> {
        let (tx, mut rx) = mpsc::channel::<WriteOp>(queue_capacity.max(1));
        let max_batch = max_batch.max(1);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let mut batch = Vec::new();
                let mut last_sync: Option<Instant> = None;
                while let Some(op) = rx.blocking_recv() {
                    // Bounded by messages, not operations: an operation can
                    // carry many (a pipelined connection's batch, a report).
                    let mut weight = op.weight();
                    batch.push(op);
                    take_queued(&mut rx, &mut batch, &mut weight, max_batch);
                    // A batch that will sync waits until `sync_interval`
                    // after the last sync, taking what arrives meanwhile:
                    // under load, fewer and larger syncs (each is a VM exit
                    // and two context switches here); a lone append after
                    // a quiet moment is not held.
                    if weight < max_batch
                        && let Some(at) = last_sync
                        && batch.iter().any(WriteOp::is_append)
                    {
                        let ready = at + sync_interval;
                        let now = Instant::now();
                        if now < ready {
                            std::thread::sleep(ready - now);
                            take_queued(&mut rx, &mut batch, &mut weight, max_batch);
                        }
                    }
                    let result = engine.commit(&mut batch);
                    if matches!(&result, Ok(outcomes) if needs_sync(outcomes)) {
                        last_sync = Some(Instant::now());
                    }
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
        client_ids: &[bool],
    ) -> Result<Vec<Appended>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if !client_ids.is_empty() && client_ids.len() != messages.len() {
            return Err(StoreError::Invalid(
                "client_ids must be empty or hold one flag per message".into(),
            ));
        }
        // Encoded here, on the caller's thread: the writer is one thread
        // for the whole store, the callers are many.
        let messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Prepared::new(m, app_id, client_ids.get(i).copied().unwrap_or(false)))
            .collect();
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

/// Moves what is queued into the batch, up to `max_batch` messages.
fn take_queued(
    rx: &mut mpsc::Receiver<WriteOp>,
    batch: &mut Vec<WriteOp>,
    weight: &mut usize,
    max_batch: usize,
) {
    while *weight < max_batch {
        match rx.try_recv() {
            Ok(op) => {
                *weight += op.weight();
                batch.push(op);
            }
            Err(_) => break,
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Commits instantly and counts its batches.
    struct Counting(Arc<AtomicUsize>);

    impl Engine for Counting {
        fn commit(&mut self, batch: &mut [WriteOp]) -> Result<Vec<Outcome>, StoreError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(batch
                .iter()
                .map(|op| match op {
                    WriteOp::Append { messages, .. } => {
                        Outcome::Appended(vec![Appended::Stored(1); messages.len()])
                    }
                    WriteOp::Remove { .. } => Outcome::Removed(Vec::new()),
                })
                .collect())
        }
    }

    async fn appends_5ms_apart(interval: Duration) -> usize {
        let commits = Arc::new(AtomicUsize::new(0));
        let writer = Arc::new(
            GroupCommit::start(Counting(commits.clone()), 8192, 1024, interval).expect("start"),
        );
        let msg = InboxMessage {
            to: "a-1".into(),
            ..Default::default()
        };
        // A first sync, then ten appends that each find the writer idle.
        writer
            .append("a", std::slice::from_ref(&msg), &[])
            .await
            .expect("append");
        let before = commits.load(Ordering::SeqCst);
        let mut calls = Vec::new();
        for _ in 0..10 {
            let (writer, msg) = (writer.clone(), msg.clone());
            calls.push(tokio::spawn(async move {
                writer.append("a", &[msg], &[]).await
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for call in calls {
            call.await.expect("join").expect("append");
        }
        writer.close().await.expect("close");
        commits.load(Ordering::SeqCst) - before
    }

    #[tokio::test]
    async fn appends_within_the_sync_interval_share_one_sync() {
        // All ten arrive within ~50 ms of the first sync: one more sync
        // (two if the machine stalls), not ten.
        let shared = appends_5ms_apart(Duration::from_millis(400)).await;
        assert!(shared <= 2, "{shared} syncs for ten appends");
        // Without an interval each append that finds the writer idle is
        // synced alone.
        let alone = appends_5ms_apart(Duration::ZERO).await;
        assert!(alone >= 5, "{alone} syncs for ten appends 5 ms apart");
    }
}
