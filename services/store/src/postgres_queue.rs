//! Durable queues in PostgreSQL, shared by every process of a deployment.
//!
//! Ids come from a per-queue counter row updated in the enqueue's
//! statement, so one enqueue's ids are contiguous and enqueues commit in id
//! order. A lease is held in the item's row and names the database session
//! of its taker (`pg_backend_pid()` and its start time): it ends when it
//! runs out or when that session does. A taker that crashes loses its
//! connections, and its items are visible again at once, as the embedded
//! engine's in-memory leases after a restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::StoreError;
use crate::postgres::Db;
use crate::queue::{
    MAX_ENQUEUE, MAX_LEASE, MAX_PAYLOAD_BYTES, MAX_TAKE, Queue, QueueDepth, QueueItem, check_name,
};

const ENQUEUE: &str = "
WITH c AS (
    INSERT INTO queue_counters AS q (queue, last_id) VALUES ($1, $2)
    ON CONFLICT (queue) DO UPDATE SET last_id = q.last_id + EXCLUDED.last_id
    RETURNING last_id
),
items AS (
    INSERT INTO queue_items (queue, id, enqueued_at_ms, payload)
    SELECT $1, c.last_id - $2 + p.ord, $3, p.payload
    FROM c, unnest($4::bytea[]) WITH ORDINALITY AS p(payload, ord)
)
SELECT last_id FROM c";

/// The oldest items whose lease ran out or whose taker's session is gone,
/// leased to this statement's session.
const TAKE: &str = "
WITH live AS MATERIALIZED (SELECT pid, backend_start FROM pg_stat_activity),
me AS (SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()),
picked AS (
    SELECT q.id FROM queue_items q
    WHERE q.queue = $1 AND (
        q.lease_until IS NULL OR q.lease_until <= clock_timestamp()
        OR NOT EXISTS (
            SELECT 1 FROM live WHERE live.pid = q.lease_pid AND live.backend_start = q.lease_start))
    ORDER BY q.id LIMIT $2
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE queue_items q
SET attempts = q.attempts + 1,
    lease_until = clock_timestamp() + $3::bigint * interval '1 millisecond',
    lease_pid = me.pid, lease_start = me.backend_start
FROM picked, me
WHERE q.queue = $1 AND q.id = picked.id
RETURNING q.id, q.enqueued_at_ms, q.attempts, q.payload";

const ACK: &str = "
DELETE FROM queue_items WHERE queue = $1 AND id = ANY($2::bigint[])";

const DEPTH: &str = "SELECT count(*) FROM queue_items WHERE queue = $1";

const LIST: &str = "
SELECT c.queue, (SELECT count(*) FROM queue_items i WHERE i.queue = c.queue)
FROM queue_counters c ORDER BY c.queue";

/// The queues of the PostgreSQL engine.
pub(crate) struct PostgresQueues {
    db: Db,
}

impl PostgresQueues {
    pub(crate) fn new(db: Db) -> Self {
        PostgresQueues { db }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn id_of(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Malformed("a negative queue id"))
}

fn count_of(row: &tokio_postgres::Row, at: usize) -> u64 {
    u64::try_from(row.get::<_, i64>(at)).unwrap_or(0)
}

#[async_trait]
impl Queue for PostgresQueues {
    async fn enqueue(&self, queue: &str, payloads: Vec<Vec<u8>>) -> Result<Vec<u64>, StoreError> {
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
        let n = payloads.len() as i64;
        let rows = self
            .db
            .query(ENQUEUE, &[&queue, &n, &now_ms(), &payloads])
            .await?;
        let last = id_of(
            rows.first()
                .ok_or(StoreError::Malformed("an enqueue returned no id"))?
                .get(0),
        )?;
        let first = last + 1 - payloads.len() as u64;
        Ok((first..=last).collect())
    }

    async fn take(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError> {
        check_name(queue)?;
        let max = max.min(MAX_TAKE);
        if max == 0 {
            return Ok(Vec::new());
        }
        let lease_ms = i64::try_from(lease.min(MAX_LEASE).as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .db
            .query(TAKE, &[&queue, &(max as i64), &lease_ms])
            .await?;
        let mut items = rows
            .iter()
            .map(|row| {
                Ok(QueueItem {
                    id: id_of(row.get(0))?,
                    enqueued_at_ms: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                    attempts: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
                    payload: row.get(3),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING keeps no order.
        items.sort_unstable_by_key(|i| i.id);
        Ok(items)
    }

    async fn ack(&self, queue: &str, ids: &[u64]) -> Result<usize, StoreError> {
        check_name(queue)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .collect();
        let client = self.db.client().await?;
        let statement = client
            .prepare_cached(ACK)
            .await
            .map_err(crate::postgres::pg_error)?;
        let removed = client
            .execute(&statement, &[&queue, &ids])
            .await
            .map_err(crate::postgres::pg_error)?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }

    async fn depth(&self, queue: &str) -> Result<u64, StoreError> {
        check_name(queue)?;
        let rows = self.db.query(DEPTH, &[&queue]).await?;
        Ok(rows.first().map_or(0, |r| count_of(r, 0)))
    }

    async fn list(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let rows = self.db.query(LIST, &[]).await?;
        Ok(rows
            .iter()
            .map(|row| QueueDepth {
                name: row.get(0),
                depth: count_of(row, 1),
            })
            .collect())
    }
}
