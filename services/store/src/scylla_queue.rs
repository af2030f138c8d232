//! Durable queues in ScyllaDB: one partition per queue, items clustered by
//! id (scylla_seq.rs: contiguous within an enqueue, never shared between
//! processes). Leases are kept in the process that took the items, as the
//! embedded engine keeps them: after a restart, or for a taker in another
//! process, every unacked item is visible, which at-least-once allows.
//! Times taken are stored (`queue_attempts`), for back-off.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::scylla::statement::batch::{Batch, BatchType};
use ::scylla::statement::prepared::PreparedStatement;
use async_trait::async_trait;
use futures_util::TryStreamExt;

use crate::StoreError;
use crate::queue::{
    MAX_ENQUEUE, MAX_LEASE, MAX_PAYLOAD_BYTES, MAX_TAKE, Queue, QueueDepth, QueueItem, check_name,
};
use crate::scylla_seq::{MAX_QUEUE_BATCH, wall_micros};
use crate::scylla_store::{KeyLocks, Shared, Write, at_most, backend, from_cql, to_cql};

/// Items per write of an enqueue (one partition: applied together).
const ITEMS_PER_BATCH: usize = 50;
/// Payload bytes per write of an enqueue, under ScyllaDB's batch size
/// warning (128 KiB by default).
const BYTES_PER_BATCH: usize = 100 * 1024;
const IN_CHUNK: usize = 100;
const PARALLEL: usize = 16;
/// How long the times an item was taken are kept.
const ATTEMPTS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far below the first item it saw a take starts its next scan: an
/// item another process numbered with a clock this far behind is still
/// found. Below that, the scan skips the tombstones of acked items.
const SCAN_MARGIN: Duration = Duration::from_secs(10);

struct QueueStatements {
    insert: PreparedStatement,
    name: PreparedStatement,
    scan: PreparedStatement,
    present: PreparedStatement,
    attempts: PreparedStatement,
    set_attempts: PreparedStatement,
    delete: PreparedStatement,
    delete_attempts: PreparedStatement,
    count: PreparedStatement,
    names: PreparedStatement,
}

/// What this process keeps of one queue.
#[derive(Default)]
struct Local {
    /// Ids leased by this process and when the lease runs out.
    leased: BTreeMap<u64, Instant>,
    /// The lowest id the last scan found.
    floor: u64,
    /// The first ids of this process's enqueues still being written: a
    /// take hands out nothing at or above the lowest, so that items come
    /// out in id order although enqueues are written concurrently.
    writing: BTreeSet<u64>,
}

/// Takes an enqueue's first id out of `writing` when the enqueue ends,
/// written or not.
struct Writing<'a> {
    inner: &'a Inner,
    queue: &'a str,
    first: u64,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.inner.local().get_mut(self.queue) {
            state.writing.remove(&self.first);
        }
    }
}

/// The queues of the ScyllaDB engine.
#[derive(Clone)]
pub struct ScyllaQueues {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    st: QueueStatements,
    local: Mutex<HashMap<String, Local>>,
    /// One take or ack at a time per queue in this process.
    busy: KeyLocks<String>,
}

impl ScyllaQueues {
    pub(crate) async fn new(shared: Arc<Shared>) -> Result<Self, StoreError> {
        let st = QueueStatements {
            insert: shared
                .prepare(
                    "INSERT INTO {ks}.queue_items (queue, id, enqueued_ms, payload) \
                     VALUES (?, ?, ?, ?)",
                )
                .await?,
            name: shared
                .prepare("INSERT INTO {ks}.queue_names (bucket, queue) VALUES (0, ?)")
                .await?,
            scan: shared
                .prepare(
                    "SELECT id, enqueued_ms, payload FROM {ks}.queue_items WHERE queue = ? \
                     AND id >= ?",
                )
                .await?,
            present: shared
                .prepare("SELECT id FROM {ks}.queue_items WHERE queue = ? AND id IN ?")
                .await?,
            attempts: shared
                .prepare("SELECT id, attempts FROM {ks}.queue_attempts WHERE queue = ? AND id IN ?")
                .await?,
            set_attempts: shared
                .prepare(
                    "INSERT INTO {ks}.queue_attempts (queue, id, attempts) VALUES (?, ?, ?) \
                     USING TTL ?",
                )
                .await?,
            delete: shared
                .prepare("DELETE FROM {ks}.queue_items WHERE queue = ? AND id IN ?")
                .await?,
            delete_attempts: shared
                .prepare("DELETE FROM {ks}.queue_attempts WHERE queue = ? AND id IN ?")
                .await?,
            count: shared
                .prepare("SELECT COUNT(*) FROM {ks}.queue_items WHERE queue = ?")
                .await?,
            names: shared
                .prepare("SELECT queue FROM {ks}.queue_names WHERE bucket = 0")
                .await?,
        };
        Ok(ScyllaQueues {
            inner: Arc::new(Inner {
                shared,
                st,
                local: Mutex::new(HashMap::new()),
                busy: KeyLocks::new(),
            }),
        })
    }
}

/// Splits an enqueue into writes of at most [`ITEMS_PER_BATCH`] items and
/// about [`BYTES_PER_BATCH`] bytes (a larger payload goes alone).
fn write_groups(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start >= ITEMS_PER_BATCH || bytes + size > BYTES_PER_BATCH) {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

impl Inner {
    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn count(&self, queue: &str) -> Result<u64, StoreError> {
        let (n,) = self
            .shared
            .session
            .execute_unpaged(&self.st.count, (queue,))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?
            .first_row::<(i64,)>()
            .map_err(backend)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Of `ids`, those still in the queue.
    async fn present(&self, queue: &str, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let result = self
                .shared
                .session
                .execute_unpaged(&self.st.present, (queue, chunk.to_vec()))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            for row in result.rows::<(i64,)>().map_err(backend)? {
                out.push(row.map_err(backend)?.0);
            }
        }
        Ok(out)
    }

    /// How many times each of `ids` was taken before (absent: never).
    async fn attempts(&self, queue: &str, ids: &[i64]) -> Result<HashMap<i64, i32>, StoreError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(IN_CHUNK) {
            let result = self
                .shared
                .session
                .execute_unpaged(&self.st.attempts, (queue, chunk.to_vec()))
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            for row in result.rows::<(i64, Option<i32>)>().map_err(backend)? {
                let (id, n) = row.map_err(backend)?;
                out.insert(id, n.unwrap_or(0));
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Queue for ScyllaQueues {
    async fn enqueue(&self, queue: &str, payloads: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
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
        let session = &inner.shared.session;
        session
            .execute_unpaged(&inner.st.name, (queue,))
            .await
            .map_err(backend)?;
        let first = {
            let mut local = inner.local();
            let first = inner.shared.clock.next_queue_ids(payloads.len());
            local
                .entry(queue.to_owned())
                .or_default()
                .writing
                .insert(first);
            first
        };
        let _writing = Writing {
            inner,
            queue,
            first,
        };
        let ids: Vec<u64> = (first..).take(payloads.len()).collect();
        let enqueued_ms = to_cql(wall_micros() / 1000)?;
        let sizes: Vec<usize> = payloads.iter().map(Vec::len).collect();
        let mut payloads = payloads.into_iter();
        let mut writes: Vec<Write<'_>> = Vec::new();
        for range in write_groups(&sizes) {
            if range.len() == 1 {
                // A large payload goes alone, as a plain write: a batch
                // that large is refused.
                let payload = payloads.next().unwrap_or_default();
                let values = (queue, to_cql(ids[range.start])?, enqueued_ms, payload);
                writes.push(Box::pin(async move {
                    session
                        .execute_unpaged(&inner.st.insert, values)
                        .await
                        .map(|_| ())
                        .map_err(backend)
                }));
                continue;
            }
            let mut batch = Batch::new(BatchType::Unlogged);
            let mut values = Vec::with_capacity(range.len());
            for i in range {
                batch.append_statement(inner.st.insert.clone());
                let payload = payloads.next().unwrap_or_default();
                values.push((queue, to_cql(ids[i])?, enqueued_ms, payload));
            }
            writes.push(Box::pin(async move {
                session
                    .batch(&batch, values)
                    .await
                    .map(|_| ())
                    .map_err(backend)
            }));
        }
        at_most(PARALLEL, writes).await?;
        Ok(ids)
    }

    async fn take(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        check_name(queue)?;
        let max = max.min(MAX_TAKE);
        if max == 0 {
            return Ok(Vec::new());
        }
        let _busy = inner.busy.lock(vec![queue.to_owned()]).await;
        let now = Instant::now();
        let until = now + lease.min(MAX_LEASE);
        let (leased, floor, writing) = {
            let mut local = inner.local();
            let state = local.entry(queue.to_owned()).or_default();
            state.leased.retain(|_, until| *until > now);
            let writing = state.writing.first().copied().unwrap_or(u64::MAX);
            (state.leased.clone(), state.floor, writing)
        };
        let margin = u64::try_from(SCAN_MARGIN.as_micros()).unwrap_or(0) * MAX_QUEUE_BATCH;
        let start = to_cql(floor.saturating_sub(margin))?;
        let mut rows = inner
            .shared
            .session
            .execute_iter(inner.st.scan.clone(), (queue, start))
            .await
            .map_err(backend)?
            .rows_stream::<(i64, Option<i64>, Option<Vec<u8>>)>()
            .map_err(backend)?;
        let mut first_seen = None;
        let mut taken = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(backend)? {
            let (id, enqueued_ms, payload) = row;
            let id = from_cql(id)?;
            if id >= writing {
                // An earlier enqueue of this process is still being written.
                break;
            }
            first_seen.get_or_insert(id);
            if leased.contains_key(&id) {
                continue;
            }
            let payload = payload.ok_or(StoreError::Malformed("a queue item without a payload"))?;
            taken.push(QueueItem {
                id,
                enqueued_at_ms: enqueued_ms
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or(0),
                attempts: 1,
                payload,
            });
            if taken.len() >= max {
                break;
            }
        }
        drop(rows);
        let ids = taken
            .iter()
            .map(|i| to_cql(i.id))
            .collect::<Result<Vec<_>, _>>()?;
        let before = inner.attempts(queue, &ids).await?;
        let ttl = i32::try_from(ATTEMPTS_TTL.as_secs()).unwrap_or(i32::MAX);
        for item in &mut taken {
            let id = to_cql(item.id)?;
            let n = before.get(&id).copied().unwrap_or(0).saturating_add(1);
            item.attempts = u32::try_from(n).unwrap_or(1);
        }
        let session = &inner.shared.session;
        let mut writes = Vec::with_capacity(taken.len());
        for item in &taken {
            let attempts = i32::try_from(item.attempts).unwrap_or(i32::MAX);
            let id = to_cql(item.id)?;
            writes.push(async move {
                session
                    .execute_unpaged(&inner.st.set_attempts, (queue, id, attempts, ttl))
                    .await
                    .map_err(backend)
            });
        }
        at_most(PARALLEL, writes).await?;
        let mut local = inner.local();
        let state = local.entry(queue.to_owned()).or_default();
        if let Some(first) = first_seen {
            state.floor = state.floor.max(first);
        }
        for item in &taken {
            state.leased.insert(item.id, until);
        }
        Ok(taken)
    }

    async fn ack(&self, queue: &str, ids: &[u64]) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        check_name(queue)?;
        let _busy = inner.busy.lock(vec![queue.to_owned()]).await;
        let mut seen = HashSet::new();
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .filter(|id| seen.insert(*id))
            .collect();
        let present = inner.present(queue, &ids).await?;
        for chunk in present.chunks(IN_CHUNK) {
            let session = &inner.shared.session;
            session
                .execute_unpaged(&inner.st.delete, (queue, chunk.to_vec()))
                .await
                .map_err(backend)?;
            session
                .execute_unpaged(&inner.st.delete_attempts, (queue, chunk.to_vec()))
                .await
                .map_err(backend)?;
        }
        let mut local = inner.local();
        if let Some(state) = local.get_mut(queue) {
            for id in &ids {
                state.leased.remove(&from_cql(*id)?);
            }
        }
        Ok(present.len())
    }

    async fn depth(&self, queue: &str) -> Result<u64, StoreError> {
        self.inner.shared.check_open()?;
        check_name(queue)?;
        self.inner.count(queue).await
    }

    async fn list(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        let names: Vec<String> = inner
            .shared
            .session
            .execute_iter(inner.st.names.clone(), ())
            .await
            .map_err(backend)?
            .rows_stream::<(String,)>()
            .map_err(backend)?
            .map_ok(|(name,)| name)
            .map_err(backend)
            .try_collect()
            .await?;
        let mut counts = Vec::with_capacity(names.len());
        for name in names {
            counts.push(async move {
                let depth = inner.count(&name).await?;
                Ok::<_, StoreError>(QueueDepth { name, depth })
            });
        }
        at_most(PARALLEL, counts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enqueues_are_split_by_count_and_bytes() {
        assert!(write_groups(&[]).is_empty());
        assert_eq!(write_groups(&[8; 120]), [0..50, 50..100, 100..120]);
        let big = BYTES_PER_BATCH;
        assert_eq!(
            write_groups(&[big, 1, big / 2, big / 2, 1]),
            [0..1, 1..3, 3..5]
        );
        // One payload past the limit still goes, alone.
        assert_eq!(write_groups(&[1, 2 * big, 1]), [0..1, 1..2, 2..3]);
    }
}
