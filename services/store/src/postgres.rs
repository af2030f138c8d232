//! The PostgreSQL engine: inboxes, the id index, durable queues and
//! persistent groups in one database shared by every delivery process.
//!
//! Each call is one statement (one round trip) over a pooled connection
//! with a cached prepared statement; batches go in as arrays (`unnest`).
//! Sequence numbers come from a per-inbox counter row updated in the same
//! statement that inserts the messages: appends to one inbox take that
//! row's lock in turn and commit in the order of their numbers, so a reader
//! paging by `seq` never sees a number before the lower ones acknowledged.
//! The schema is versioned: numbered SQL files (`migrations/postgres/`)
//! applied at start-up under an advisory lock, recorded in
//! `schema_migrations`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prost::Message;
use tokio_postgres::NoTls;

use crate::{
    Appended, FollowUp, GroupStore, InboxKey, InboxMessage, InboxPage, Queue, Removal, Store,
    StoreError, decode_stored, follow_up_of,
};

/// The schema's migrations, in order: (version, name, SQL). A database
/// records each one applied; a new one is appended, never edited.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../migrations/postgres/0001_initial.sql"),
)];

/// Serializes the migrations of processes starting at once (an arbitrary
/// constant: the advisory lock's key).
const MIGRATION_LOCK: i64 = 0x5357_4254_4348_0001;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// Most connections this process holds.
    pub pool_size: usize,
    /// How long a client-given message id is remembered per sender.
    pub id_window: Duration,
    /// Bound on connecting (and on waiting for a pooled connection).
    pub connect_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            url: String::new(),
            pool_size: 16,
            id_window: Duration::from_secs(24 * 3600),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A database error with what PostgreSQL said (its `Display` alone is
/// "db error").
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(describe(&e))
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "postgres: {} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        None => {
            let mut text = format!("postgres: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// Whether a failed statement may simply be run again (a deadlock between
/// two batches locking inbox counters, a serialization failure).
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// The pool shared by the inboxes, queues and groups of one process.
#[derive(Clone)]
pub(crate) struct Db {
    pool: Pool,
    closed: Arc<AtomicBool>,
}

/// Retries of a statement that hit a deadlock.
const RETRIES: usize = 3;

impl Db {
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Closed => StoreError::Closed,
            deadpool_postgres::PoolError::Backend(e) => pg_error(e),
            other => StoreError::Backend(format!("postgres pool: {other}")),
        })
    }

    /// Runs one prepared statement, again after a deadlock.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
        let mut attempt = 0;
        loop {
            match client.query(&statement, params).await {
                Ok(rows) => return Ok(rows),
                Err(e) if retryable(&e) && attempt < RETRIES => attempt += 1,
                Err(e) => return Err(pg_error(e)),
            }
        }
    }
}

/// Connects once outside the pool, applies the migrations this database
/// lacks and returns the pool. A bad address or credential fails here,
/// naming the address.
async fn open_pool(options: &PostgresOptions) -> Result<Pool, StoreError> {
    let config = pg_config(options)?;
    let target = describe_target(&config);
    let connect = tokio::time::timeout(options.connect_timeout, config.connect(NoTls)).await;
    let (mut client, connection) = match connect {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            return Err(StoreError::Backend(format!(
                "cannot connect to PostgreSQL at {target}: {}",
                describe(&e)
            )));
        }
        Err(_) => {
            return Err(StoreError::Backend(format!(
                "cannot connect to PostgreSQL at {target}: no answer within {:?}",
                options.connect_timeout
            )));
        }
    };
    let driver = tokio::spawn(connection);
    let migrated = migrate(&mut client).await;
    drop(client);
    let _ = driver.await;
    migrated?;
    build_pool(config, options)
}

fn pg_config(options: &PostgresOptions) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = options
        .url
        .parse()
        .map_err(|e| StoreError::Invalid(format!("store.url is not a PostgreSQL URL: {e}")))?;
    config.connect_timeout(options.connect_timeout);
    if config.get_application_name().is_none() {
        config.application_name("switchboard");
    }
    Ok(config)
}

fn build_pool(
    config: tokio_postgres::Config,
    options: &PostgresOptions,
) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.connect_timeout))
        .create_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))
}

/// `host:port/database` without the credentials.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// Applies the missing migrations in order, each in its own transaction,
/// holding an advisory lock so that processes starting together migrate
/// once. Refuses a database migrated past what this build knows.
async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let result = apply_migrations(client).await;
    // Also released when this connection closes.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_migrations(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg_error)?;
    let applied: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = applied.last()
        && newest > known
    {
        return Err(StoreError::Backend(format!(
            "the PostgreSQL schema is at version {newest}, newer than this build knows ({known}): \
             run a newer switchboard"
        )));
    }
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.batch_execute(sql).await.map_err(|e| {
            StoreError::Backend(format!("migration {version} ({name}): {}", describe(&e)))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        tracing::info!(version, name, "postgres schema migrated");
    }
    Ok(())
}

/// Appends messages: id-index entries for the flagged ones (a key accepted
/// within the window is a repeat), then per inbox a block of sequence
/// numbers from its counter, then the messages. One statement, one
/// transaction; locks are taken in key order (id keys, then inboxes).
const APPEND: &str = "
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bool[], $6::bool[], $7::bytea[])
        WITH ORDINALITY AS t(to_user, from_user, id, flag, has_ref, body, ord)
),
keys AS (SELECT DISTINCT from_user, id FROM input WHERE flag),
fresh AS (
    INSERT INTO id_index AS x (app, sender, client_id, accepted_at)
    SELECT $1, from_user, id, now() FROM keys ORDER BY from_user, id
    ON CONFLICT (app, sender, client_id) DO UPDATE SET accepted_at = EXCLUDED.accepted_at
        WHERE x.accepted_at < EXCLUDED.accepted_at - $8::bigint * interval '1 millisecond'
    RETURNING sender, client_id
),
kept AS (
    SELECT to_user, has_ref, body, ord FROM input WHERE NOT flag
    UNION ALL
    (SELECT DISTINCT ON (i.from_user, i.id, i.to_user) i.to_user, i.has_ref, i.body, i.ord
        FROM input i JOIN fresh f ON f.sender = i.from_user AND f.client_id = i.id
        WHERE i.flag
        ORDER BY i.from_user, i.id, i.to_user, i.ord)
),
numbered AS (
    SELECT to_user, has_ref, body, ord,
        row_number() OVER (PARTITION BY to_user ORDER BY ord) AS rn,
        count(*) OVER (PARTITION BY to_user) AS n
    FROM kept
),
counters AS (
    INSERT INTO inbox_counters AS c (app, user_id, last_seq)
    SELECT $1, to_user, max(n) FROM numbered GROUP BY to_user ORDER BY to_user
    ON CONFLICT (app, user_id) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq
    RETURNING user_id, last_seq
),
assigned AS (
    SELECT nb.ord, nb.to_user, nb.has_ref, nb.body, c.last_seq - nb.n + nb.rn AS seq
    FROM numbered nb JOIN counters c ON c.user_id = nb.to_user
),
stored AS (
    INSERT INTO inbox (app, user_id, seq, has_ref, body)
    SELECT $1, to_user, seq, has_ref, body FROM assigned
)
SELECT ord, seq FROM assigned";

/// Stores follow-ups keyed by (inbox, key): one already there is kept and
/// its sequence number returned.
const FOLLOW_UPS: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bool[], $5::bytea[])
        WITH ORDINALITY AS t(app, to_user, key, has_ref, body, ord)
),
uniq AS (
    SELECT DISTINCT ON (app, to_user, key) * FROM input ORDER BY app, to_user, key, ord
),
numbered AS (
    SELECT *, row_number() OVER (PARTITION BY app, to_user ORDER BY ord) AS rn,
        count(*) OVER (PARTITION BY app, to_user) AS n
    FROM uniq
),
counters AS (
    INSERT INTO inbox_counters AS c (app, user_id, last_seq)
    SELECT app, to_user, max(n) FROM numbered GROUP BY app, to_user ORDER BY app, to_user
    ON CONFLICT (app, user_id) DO UPDATE SET last_seq = c.last_seq + EXCLUDED.last_seq
    RETURNING app, user_id, last_seq
)
INSERT INTO inbox AS i (app, user_id, seq, has_ref, follow_key, body)
SELECT nb.app, nb.to_user, c.last_seq - nb.n + nb.rn, nb.has_ref, nb.key, nb.body
FROM numbered nb JOIN counters c ON c.app = nb.app AND c.user_id = nb.to_user
ON CONFLICT (app, user_id, follow_key) WHERE follow_key IS NOT NULL
    DO UPDATE SET follow_key = EXCLUDED.follow_key
RETURNING app, user_id, follow_key, seq";

/// A page and the number of messages after `$3`, in one snapshot.
const FETCH: &str = "
SELECT p.seq, p.body, t.total
FROM (SELECT count(*) AS total FROM inbox WHERE app = $1 AND user_id = $2 AND seq > $3) t
LEFT JOIN LATERAL (
    SELECT seq, body FROM inbox WHERE app = $1 AND user_id = $2 AND seq > $3
    ORDER BY seq LIMIT $4
) p ON true
ORDER BY p.seq";

const COUNT: &str = "SELECT count(*) FROM inbox WHERE app = $1 AND user_id = $2";

/// The stored bytes of the messages to remove that carry a reference.
const REFERENCED: &str = "
SELECT app, user_id, seq, body FROM inbox
WHERE has_ref AND (app, user_id, seq) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]))";

const DELETE: &str = "
DELETE FROM inbox
WHERE (app, user_id, seq) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]))
RETURNING app, user_id, seq";

/// Forgets id-index entries past the window, a bounded batch at a time.
const SWEEP_IDS: &str = "
DELETE FROM id_index WHERE ctid IN (
    SELECT ctid FROM id_index WHERE accepted_at < now() - $1::bigint * interval '1 millisecond'
    LIMIT 10000)";

/// How often the id index is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The PostgreSQL engine; see the module documentation.
pub struct PostgresStore {
    db: Db,
    id_window_ms: i64,
    sweeper: tokio::task::JoinHandle<()>,
}

impl PostgresStore {
    /// Connects, migrates the schema and opens the pool. Fails with a
    /// message naming the address when the database cannot be reached or
    /// refuses the credentials.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        let pool = open_pool(&options).await?;
        let db = Db {
            pool,
            closed: Arc::new(AtomicBool::new(false)),
        };
        let id_window_ms = i64::try_from(options.id_window.as_millis()).unwrap_or(i64::MAX);
        let sweeper = {
            let db = db.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match db.query(SWEEP_IDS, &[&id_window_ms]).await {
                        Ok(_) => {}
                        Err(StoreError::Closed) => return,
                        Err(e) => tracing::warn!(error = %e, "cannot sweep the id index"),
                    }
                }
            })
        };
        Ok(PostgresStore {
            db,
            id_window_ms,
            sweeper,
        })
    }

    /// The durable queues, in the same database.
    pub fn queues(&self) -> Arc<dyn Queue> {
        Arc::new(crate::postgres_queue::PostgresQueues::new(self.db.clone()))
    }

    /// Persistent groups, in the same database.
    pub fn groups(&self) -> Arc<dyn GroupStore> {
        Arc::new(crate::postgres_groups::PostgresGroups::new(self.db.clone()))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_of(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Malformed("a negative sequence number"))
}

#[async_trait]
impl Store for PostgresStore {
    async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
        client_ids: &[bool],
    ) -> Result<Vec<Appended>, StoreError> {
        if !client_ids.is_empty() && client_ids.len() != messages.len() {
            return Err(StoreError::Invalid(format!(
                "{} client-id flags for {} messages",
                client_ids.len(),
                messages.len()
            )));
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let to: Vec<&str> = messages.iter().map(|m| m.to.as_str()).collect();
        let from: Vec<&str> = messages.iter().map(|m| m.from.as_str()).collect();
        let ids: Vec<&[u8]> = messages.iter().map(|m| m.id.as_bytes()).collect();
        let flags: Vec<bool> = match client_ids.is_empty() {
            true => vec![false; messages.len()],
            false => client_ids.to_vec(),
        };
        let has_ref: Vec<bool> = messages.iter().map(|m| !m.reference.is_empty()).collect();
        let bodies: Vec<Vec<u8>> = messages.iter().map(Message::encode_to_vec).collect();
        let rows = self
            .db
            .query(
                APPEND,
                &[
                    &app_id,
                    &to,
                    &from,
                    &ids,
                    &flags,
                    &has_ref,
                    &bodies,
                    &self.id_window_ms,
                ],
            )
            .await?;
        let mut out = vec![Appended::Repeat; messages.len()];
        for row in rows {
            let ord: i64 = row.get(0);
            let seq = seq_of(row.get(1))?;
            let slot = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or(StoreError::Malformed("an append answered for no message"))?;
            *slot = Appended::Stored(seq);
        }
        Ok(out)
    }

    async fn fetch(
        &self,
        inbox: &InboxKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .db
            .query(
                FETCH,
                &[&inbox.app_id, &inbox.user_id, &seq_param(after_seq), &limit],
            )
            .await?;
        let mut page = InboxPage::default();
        let mut total = 0u64;
        for row in rows {
            total = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
            let (Some(seq), Some(body)) =
                (row.get::<_, Option<i64>>(0), row.get::<_, Option<&[u8]>>(1))
            else {
                continue;
            };
            page.messages.push(decode_stored(body, seq_of(seq)?)?);
        }
        page.left = total.saturating_sub(page.messages.len() as u64);
        Ok(page)
    }

    async fn remove(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError> {
        let mut out = self
            .remove_many(vec![(inbox.clone(), seqs.to_vec())], follow_up)
            .await?;
        Ok(out.pop().unwrap_or_default())
    }

    async fn remove_many(
        &self,
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
    ) -> Result<Vec<Removal>, StoreError> {
        let mut apps: Vec<&str> = Vec::new();
        let mut users: Vec<&str> = Vec::new();
        let mut seqs: Vec<i64> = Vec::new();
        for (inbox, list) in &removals {
            for &seq in list {
                apps.push(&inbox.app_id);
                users.push(&inbox.user_id);
                seqs.push(seq_param(seq));
            }
        }
        if seqs.is_empty() {
            return Ok(vec![Removal::default(); removals.len()]);
        }
        // Follow-ups first, each keyed in its inbox: a crash before the
        // delete leaves the message, and its next removal finds them.
        let mut follow_ups: HashMap<(String, String, u64), InboxMessage> = HashMap::new();
        if let Some(follow_up) = follow_up {
            let rows = self.db.query(REFERENCED, &[&apps, &users, &seqs]).await?;
            let mut built: Vec<(String, String, u64, InboxMessage)> = Vec::new();
            for row in &rows {
                let body: &[u8] = row.get(3);
                if let Some(msg) = follow_up_of(follow_up, body)? {
                    built.push((row.get(0), row.get(1), seq_of(row.get(2))?, msg));
                }
            }
            if !built.is_empty() {
                let f_apps: Vec<&str> = built.iter().map(|b| b.0.as_str()).collect();
                let f_to: Vec<&str> = built.iter().map(|b| b.3.to.as_str()).collect();
                let f_keys: Vec<&[u8]> = built.iter().map(|b| b.3.id.as_bytes()).collect();
                let f_ref: Vec<bool> = built.iter().map(|b| !b.3.reference.is_empty()).collect();
                let f_bodies: Vec<Vec<u8>> = built.iter().map(|b| b.3.encode_to_vec()).collect();
                let stored = self
                    .db
                    .query(FOLLOW_UPS, &[&f_apps, &f_to, &f_keys, &f_ref, &f_bodies])
                    .await?;
                let mut seq_by_key: HashMap<(String, String, Vec<u8>), u64> = HashMap::new();
                for row in stored {
                    seq_by_key.insert((row.get(0), row.get(1), row.get(2)), seq_of(row.get(3))?);
                }
                for (app, user, seq, mut msg) in built {
                    let key = (app.clone(), msg.to.clone(), msg.id.as_bytes().to_vec());
                    if let Some(&stored_seq) = seq_by_key.get(&key) {
                        msg.seq = stored_seq;
                        follow_ups.insert((app, user, seq), msg);
                    }
                }
            }
        }
        let deleted = self.db.query(DELETE, &[&apps, &users, &seqs]).await?;
        let mut gone: std::collections::HashSet<(String, String, u64)> =
            std::collections::HashSet::with_capacity(deleted.len());
        for row in deleted {
            gone.insert((row.get(0), row.get(1), seq_of(row.get(2))?));
        }
        let mut out = Vec::with_capacity(removals.len());
        for (inbox, list) in removals {
            let mut removal = Removal::default();
            for seq in list {
                let key = (inbox.app_id.clone(), inbox.user_id.clone(), seq);
                // Removed by this call (a seq listed twice counts once).
                if gone.remove(&key) {
                    removal.removed.push(seq);
                    if let Some(msg) = follow_ups.remove(&key) {
                        removal.appended.push(msg);
                    }
                }
            }
            out.push(removal);
        }
        Ok(out)
    }

    async fn count(&self, inbox: &InboxKey) -> Result<u64, StoreError> {
        let rows = self
            .db
            .query(COUNT, &[&inbox.app_id, &inbox.user_id])
            .await?;
        Ok(rows
            .first()
            .map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.db.closed.store(true, Ordering::Release);
        self.sweeper.abort();
        self.db.pool.close();
        Ok(())
    }
}
