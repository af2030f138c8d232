//! The ScyllaDB engine: [`Store`], [`Queue`](crate::Queue) and
//! [`GroupStore`](crate::GroupStore) in one keyspace of a ScyllaDB cluster,
//! shared by any number of Switchboard processes.
//!
//! - One session per process, token-aware (the driver's default policy with
//!   token awareness: each request goes to a replica of its partition, and
//!   to the right shard), every statement prepared at start-up, every
//!   request at the configured consistency (default `LOCAL_QUORUM`).
//! - The schema is created or migrated at start-up (scylla_schema.rs).
//! - Sequence numbers are time-based and given out in the process, no
//!   lightweight transaction on the message path (scylla_seq.rs). A fetch
//!   shows a row only once every lower number that will ever be
//!   acknowledged has been: the [`Horizon`], `write_deadline +
//!   clock_skew` behind the clock. A fetch whose page reaches past it waits
//!   (at most that long) and reads again.
//! - What one process must not do twice at once (store one client id,
//!   remove one message) is serialized in the process by key; across
//!   processes the delivery role gives each inbox one owner. Where two
//!   owners overlap (an ownership hand-over), the worst is a duplicate,
//!   which at-least-once delivery allows and clients drop by id.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::policies::load_balancing::DefaultPolicy;
use ::scylla::statement::batch::{Batch, BatchType};
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::unprepared::Statement;
use ::scylla::statement::{Consistency, SerialConsistency};
use ::scylla::value::{CqlValue, Row};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use prost::Message;

use crate::scylla_schema::{self, SCHEMA_VERSION};
use crate::scylla_seq::{Horizon, SeqClock, wall_micros};
use crate::{
    Appended, FollowUp, InboxKey, InboxMessage, InboxPage, Removal, Store, StoreError,
    decode_header, decode_stored,
};

/// Requests one call sends at once (a large append, a removal's
/// follow-ups): the driver multiplexes them over one connection per shard,
/// and an append of a few thousand copies must finish within the write
/// deadline.
const PARALLEL: usize = 128;
/// Inboxes one `remove_many` works on at once.
const PARALLEL_INBOXES: usize = 32;
/// Values in one `IN (…)` of clustering keys: ScyllaDB refuses more than
/// 100 by default (`max_clustering_key_restrictions_per_query`).
const IN_CHUNK: usize = 100;
/// Rows per page of a fetch.
const PAGE_ROWS: i32 = 500;
/// The longest TTL ScyllaDB takes: 20 years.
const MAX_TTL_SECS: u64 = 20 * 365 * 24 * 3600;
/// How long a follow-up's marker is kept: longer than a removal is retried.
const FOLLOW_UP_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One write of a request, boxed: a request's writes differ in type.
pub(crate) type Write<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Runs `futures`, at most `limit` at a time, and collects their results
/// in order; the first error ends it. (Built from a `Vec`, not a lazy map
/// over an iterator: `async_trait`'s `Send` check cannot see through the
/// latter's closure.)
pub(crate) async fn at_most<T, F>(limit: usize, futures: Vec<F>) -> Result<Vec<T>, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    futures_util::stream::iter(futures)
        .buffered(limit)
        .try_collect()
        .await
}

pub(crate) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("scylla: {e}"))
}

/// How to reach and use the cluster.
#[derive(Debug, Clone)]
pub struct ScyllaOptions {
    /// Contact points, `host:port`; the driver discovers the other nodes.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replicas per partition (the keyspace's `NetworkTopologyStrategy`
    /// factor in each datacenter) when the keyspace is created.
    pub replication_factor: u32,
    /// Of every read and write; lightweight transactions use the matching
    /// serial consistency (`LOCAL_SERIAL` for the `LOCAL_*` levels).
    pub consistency: Consistency,
    /// How long a client-given message id is remembered per sender.
    pub id_window: Duration,
    /// A request (its retries included) not answered in this time fails.
    pub request_timeout: Duration,
    /// An append (or follow-up) whose writes are not all acknowledged this
    /// long after its sequence numbers were given out fails, so that the
    /// fetch horizon never waits longer than this plus the clock skew.
    pub write_deadline: Duration,
    /// The most the clocks of two Switchboard processes may differ (NTP in
    /// one datacenter keeps them within milliseconds).
    pub clock_skew: Duration,
}

impl ScyllaOptions {
    /// Options from the `[store]` settings: `url` is `host:port` contact
    /// points separated by commas, `consistency` a CQL level name.
    pub fn from_settings(
        url: &str,
        keyspace: &str,
        replication_factor: u32,
        consistency: &str,
        id_window: Duration,
    ) -> Result<Self, StoreError> {
        scylla_schema::check_keyspace(keyspace)?;
        if replication_factor == 0 {
            return Err(StoreError::Invalid(
                "store.replication_factor must be at least 1".into(),
            ));
        }
        Ok(ScyllaOptions {
            nodes: parse_nodes(url)?,
            keyspace: keyspace.to_owned(),
            replication_factor,
            consistency: parse_consistency(consistency)?,
            id_window,
            request_timeout: Duration::from_secs(5),
            write_deadline: Duration::from_secs(1),
            clock_skew: Duration::from_millis(100),
        })
    }
}

/// `host:9042,host2:9042` → its contact points.
pub fn parse_nodes(url: &str) -> Result<Vec<String>, StoreError> {
    let nodes: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if nodes.is_empty() {
        return Err(StoreError::Invalid(
            "store.url names no ScyllaDB node (host:9042,host2:9042)".into(),
        ));
    }
    for node in &nodes {
        let port_ok = node
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(StoreError::Invalid(format!(
                "store.url: {node:?} is not host:port (host:9042,host2:9042)"
            )));
        }
    }
    Ok(nodes)
}

/// A CQL consistency level by name (`local_quorum`, `QUORUM`, `one`, …).
pub fn parse_consistency(name: &str) -> Result<Consistency, StoreError> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "local_one" => Consistency::LocalOne,
        // EACH_QUORUM and ANY are write-only levels: every level here
        // serves reads and writes alike.
        _ => {
            return Err(StoreError::Invalid(format!(
                "store.consistency {name:?} is not one of local_quorum, quorum, all, one, two, \
                 three, local_one"
            )));
        }
    })
}

/// The serial consistency of lightweight transactions at `consistency`.
fn serial_of(consistency: Consistency) -> SerialConsistency {
    match consistency {
        Consistency::LocalQuorum | Consistency::LocalOne => SerialConsistency::LocalSerial,
        _ => SerialConsistency::Serial,
    }
}

/// What the engine's parts share: the session and the clocks.
pub(crate) struct Shared {
    pub(crate) session: Session,
    pub(crate) keyspace: String,
    pub(crate) clock: SeqClock,
    pub(crate) closed: AtomicBool,
}

impl Shared {
    pub(crate) fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Prepares `cql` (`{ks}` replaced by the keyspace), idempotent unless
    /// it is a lightweight transaction.
    pub(crate) async fn prepare(&self, cql: &str) -> Result<PreparedStatement, StoreError> {
        let text = cql.replace("{ks}", &self.keyspace);
        let mut statement = Statement::new(text).with_page_size(PAGE_ROWS);
        statement.set_is_idempotent(!cql.contains(" IF "));
        self.session
            .prepare(statement)
            .await
            .map_err(|e| StoreError::Backend(format!("scylla: cannot prepare {cql:?}: {e}")))
    }
}

/// Locks by key, within the process: what must not run twice at once for
/// one key (one client id, one inbox). Entries go when unused.
pub(crate) struct KeyLocks<K> {
    map: std::sync::Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Eq + Hash + Clone + Ord> KeyLocks<K> {
    pub(crate) fn new() -> Self {
        KeyLocks {
            map: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Holds every key of `keys` (locked in order: two callers never wait
    /// on each other crosswise).
    pub(crate) async fn lock(&self, mut keys: Vec<K>) -> KeyGuard<'_, K> {
        keys.sort_unstable();
        keys.dedup();
        let mut held = Vec::with_capacity(keys.len());
        for key in keys {
            let lock = {
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                Arc::clone(map.entry(key.clone()).or_default())
            };
            held.push((key, lock.lock_owned().await));
        }
        KeyGuard { locks: self, held }
    }
}

pub(crate) struct KeyGuard<'a, K: Eq + Hash> {
    locks: &'a KeyLocks<K>,
    held: Vec<(K, tokio::sync::OwnedMutexGuard<()>)>,
}

impl<K: Eq + Hash> Drop for KeyGuard<'_, K> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        for (key, guard) in self.held.drain(..) {
            drop(guard);
            // Nobody else holds or waits for it: forget it.
            if map.get(&key).is_some_and(|l| Arc::strong_count(l) == 1) {
                map.remove(&key);
            }
        }
    }
}

/// Connects, creates or migrates the schema, and claims a writer number.
pub(crate) async fn connect(options: &ScyllaOptions) -> Result<Arc<Shared>, StoreError> {
    let policy = DefaultPolicy::builder().token_aware(true).build();
    let profile = ExecutionProfile::builder()
        .consistency(options.consistency)
        .serial_consistency(Some(serial_of(options.consistency)))
        .request_timeout(Some(options.request_timeout))
        .load_balancing_policy(policy)
        .build();
    let session = SessionBuilder::new()
        .known_nodes(&options.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .map_err(|e| {
            StoreError::Backend(format!(
                "cannot connect to ScyllaDB at {}: {e}",
                options.nodes.join(",")
            ))
        })?;
    migrate(&session, &options.keyspace, options.replication_factor).await?;
    let serial = match serial_of(options.consistency) {
        SerialConsistency::LocalSerial => Consistency::LocalSerial,
        SerialConsistency::Serial => Consistency::Serial,
    };
    let writer = claim_writer(&session, &options.keyspace, serial).await?;
    tracing::info!(
        keyspace = %options.keyspace,
        writer,
        consistency = %options.consistency,
        "scylla store connected"
    );
    Ok(Arc::new(Shared {
        session,
        keyspace: options.keyspace.clone(),
        clock: SeqClock::new(writer),
        closed: AtomicBool::new(false),
    }))
}

/// Creates the keyspace and brings its schema to [`SCHEMA_VERSION`]. The
/// driver waits for schema agreement after each change.
async fn migrate(session: &Session, keyspace: &str, rf: u32) -> Result<(), StoreError> {
    let ddl = |cql: String| async move {
        session
            .query_unpaged(cql.as_str(), &[])
            .await
            .map_err(|e| StoreError::Backend(format!("scylla: schema: {e} (in {cql:?})")))
    };
    ddl(scylla_schema::keyspace_statement(keyspace, rf)).await?;
    ddl(scylla_schema::version_table_statement(keyspace)).await?;
    let version = session
        .query_unpaged(
            format!("SELECT version FROM {keyspace}.schema_version WHERE component = 'store'"),
            &[],
        )
        .await
        .map_err(backend)?
        .into_rows_result()
        .map_err(backend)?
        .maybe_first_row::<(Option<i32>,)>()
        .map_err(backend)?
        .and_then(|(v,)| v)
        .unwrap_or(0);
    let statements = scylla_schema::migrations(keyspace, version)?;
    if statements.is_empty() {
        return Ok(());
    }
    for cql in statements {
        ddl(cql).await?;
    }
    session
        .query_unpaged(
            format!(
                "INSERT INTO {keyspace}.schema_version (component, version, applied_ms) \
                 VALUES ('store', ?, ?)"
            ),
            (
                SCHEMA_VERSION,
                i64::try_from(wall_micros() / 1000).unwrap_or(0),
            ),
        )
        .await
        .map_err(backend)?;
    tracing::info!(
        keyspace,
        from = version,
        to = SCHEMA_VERSION,
        "scylla schema migrated"
    );
    Ok(())
}

/// The `[applied]` column of a lightweight transaction's answer.
pub(crate) fn applied(
    result: ::scylla::response::query_result::QueryResult,
) -> Result<bool, StoreError> {
    let rows = result.into_rows_result().map_err(backend)?;
    let row: Option<Row> = rows.maybe_first_row().map_err(backend)?;
    row.and_then(|r| r.columns.into_iter().next().flatten())
        .and_then(|v| v.as_boolean())
        .ok_or_else(|| backend("a conditional write answered without [applied]"))
}

/// Counts the process incarnations up by one (a lightweight transaction,
/// once per start) and returns the new count: the writer number.
async fn claim_writer(
    session: &Session,
    keyspace: &str,
    serial: Consistency,
) -> Result<u64, StoreError> {
    let read = format!("SELECT incarnation FROM {keyspace}.writers WHERE name = 'seq'");
    let insert = format!(
        "INSERT INTO {keyspace}.writers (name, incarnation) VALUES ('seq', 1) IF NOT EXISTS"
    );
    let update = format!(
        "UPDATE {keyspace}.writers SET incarnation = ? WHERE name = 'seq' IF incarnation = ?"
    );
    for _ in 0..50 {
        let mut read_stmt = Statement::new(read.as_str());
        // The value a conditional write last committed.
        read_stmt.set_consistency(serial);
        let current = session
            .query_unpaged(read_stmt, &[])
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(backend)?
            .and_then(|(n,)| n);
        let (won, next) = match current {
            None => (
                applied(
                    session
                        .query_unpaged(insert.as_str(), &[])
                        .await
                        .map_err(backend)?,
                )?,
                1,
            ),
            Some(n) => (
                applied(
                    session
                        .query_unpaged(update.as_str(), (n + 1, n))
                        .await
                        .map_err(backend)?,
                )?,
                n + 1,
            ),
        };
        if won {
            return Ok(u64::try_from(next).unwrap_or(0));
        }
    }
    Err(backend(
        "could not claim a writer number (50 tries lost to other starting processes)",
    ))
}

/// The prepared statements of the inboxes.
struct InboxStatements {
    insert: PreparedStatement,
    page: PreparedStatement,
    count: PreparedStatement,
    by_seqs: PreparedStatement,
    delete: PreparedStatement,
    id_lookup: PreparedStatement,
    id_insert: PreparedStatement,
    follow_up_lookup: PreparedStatement,
    follow_up_insert: PreparedStatement,
}

impl InboxStatements {
    async fn prepare(shared: &Shared) -> Result<Self, StoreError> {
        Ok(InboxStatements {
            insert: shared
                .prepare("INSERT INTO {ks}.inbox (app_id, user_id, seq, msg) VALUES (?, ?, ?, ?)")
                .await?,
            page: shared
                .prepare(
                    "SELECT seq, msg FROM {ks}.inbox WHERE app_id = ? AND user_id = ? AND seq > ? \
                     LIMIT ?",
                )
                .await?,
            count: shared
                .prepare(
                    "SELECT COUNT(*) FROM {ks}.inbox WHERE app_id = ? AND user_id = ? AND seq > ?",
                )
                .await?,
            by_seqs: shared
                .prepare(
                    "SELECT seq, msg FROM {ks}.inbox WHERE app_id = ? AND user_id = ? AND seq IN ?",
                )
                .await?,
            delete: shared
                .prepare("DELETE FROM {ks}.inbox WHERE app_id = ? AND user_id = ? AND seq IN ?")
                .await?,
            id_lookup: shared
                .prepare(
                    "SELECT accepted_us FROM {ks}.message_ids WHERE app_id = ? AND sender = ? \
                     AND id = ?",
                )
                .await?,
            id_insert: shared
                .prepare(
                    "INSERT INTO {ks}.message_ids (app_id, sender, id, accepted_us) \
                     VALUES (?, ?, ?, ?) USING TTL ?",
                )
                .await?,
            follow_up_lookup: shared
                .prepare(
                    "SELECT seq FROM {ks}.inbox_follow_ups WHERE app_id = ? AND user_id = ? \
                     AND id = ?",
                )
                .await?,
            follow_up_insert: shared
                .prepare(
                    "INSERT INTO {ks}.inbox_follow_ups (app_id, user_id, id, seq) \
                     VALUES (?, ?, ?, ?) USING TTL ?",
                )
                .await?,
        })
    }
}

/// The ScyllaDB engine. [`ScyllaStore::queues`] and
/// [`ScyllaStore::groups`] share its session.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    shared: Arc<Shared>,
    st: InboxStatements,
    id_window: Duration,
    write_deadline: Duration,
    horizon: Horizon,
    /// `(app, sender, id)` of appends with a client id in progress.
    ids: KeyLocks<(String, String, String)>,
    /// Inboxes with a removal in progress.
    removing: KeyLocks<InboxKey>,
    /// `(app, inbox, id)` of follow-ups being written (the copies of one
    /// group message confirm to one sender under one id).
    follow_ups: KeyLocks<(String, String, String)>,
}

/// A client id's key in the sender's id index.
type IdKey = (String, String, String);

/// One message row, ready to write.
struct InboxRow {
    app: String,
    user: String,
    seq: i64,
    bytes: Vec<u8>,
}

impl ScyllaStore {
    /// Connects to the cluster, creates or migrates the schema, and
    /// prepares every statement. A node that cannot be reached, a bad
    /// credential or a refused schema fails here, naming it.
    pub async fn connect(options: ScyllaOptions) -> Result<Self, StoreError> {
        let shared = connect(&options).await?;
        let st = InboxStatements::prepare(&shared).await?;
        let horizon = Horizon::new(options.write_deadline, options.clock_skew);
        tracing::info!(
            settle_ms = horizon.settle().as_millis(),
            "a fetch shows messages once every lower number is settled"
        );
        Ok(ScyllaStore {
            inner: Arc::new(StoreInner {
                shared,
                st,
                id_window: options.id_window,
                write_deadline: options.write_deadline,
                horizon,
                ids: KeyLocks::new(),
                removing: KeyLocks::new(),
                follow_ups: KeyLocks::new(),
            }),
        })
    }

    /// The durable queues, in the same keyspace.
    pub async fn queues(&self) -> Result<crate::scylla_queue::ScyllaQueues, StoreError> {
        crate::scylla_queue::ScyllaQueues::new(Arc::clone(&self.inner.shared)).await
    }

    /// The persistent groups, in the same keyspace.
    pub async fn groups(&self) -> Result<crate::scylla_groups::ScyllaGroups, StoreError> {
        crate::scylla_groups::ScyllaGroups::new(Arc::clone(&self.inner.shared)).await
    }
}

/// A sequence number as CQL stores it (`bigint`).
pub(crate) fn to_cql(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Invalid(format!("{n} is past a CQL bigint")))
}

/// A stored sequence number back; a negative one is damage.
pub(crate) fn from_cql(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Malformed("a negative sequence number"))
}

/// The bytes a message is stored as: its encoding without the seq (the
/// clustering key carries it).
pub fn encode_row(msg: &InboxMessage) -> Vec<u8> {
    let mut msg = msg.clone();
    msg.seq = 0;
    msg.encode_to_vec()
}

/// A stored row back to the message, its seq from the key.
pub fn decode_row(seq: i64, bytes: &[u8]) -> Result<InboxMessage, StoreError> {
    decode_stored(bytes, from_cql(seq)?)
}

/// Whether a send's copies (`rows`, `bytes` of messages) go in one logged
/// batch with its index entry: ScyllaDB refuses batches past 1 MiB by
/// default and warns past 128 KiB.
fn fits_one_batch(rows: usize, bytes: usize) -> bool {
    rows <= 100 && bytes <= 100 * 1024
}

/// What an append answers for each message, given which keys were
/// accepted before: per key, the first copy for each recipient is stored
/// and the rest are repeats; a key seen before repeats every copy. `None`
/// in the result: to store.
fn plan_append(
    messages: &[InboxMessage],
    client_ids: &[bool],
    seen: &HashSet<(&str, &str)>,
) -> Vec<Option<Appended>> {
    let mut recipients: HashSet<(&str, &str, &str)> = HashSet::new();
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !client_ids.get(i).copied().unwrap_or(false) {
                return None;
            }
            if seen.contains(&(m.from.as_str(), m.id.as_str()))
                || !recipients.insert((m.from.as_str(), m.id.as_str(), m.to.as_str()))
            {
                Some(Appended::Repeat)
            } else {
                None
            }
        })
        .collect()
}

impl StoreInner {
    /// Whether `(app, sender, id)` was accepted within the id window.
    async fn accepted(&self, app: &str, sender: &str, id: &str) -> Result<bool, StoreError> {
        let result = self
            .shared
            .session
            .execute_unpaged(&self.st.id_lookup, (app, sender, id))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?;
        let Some((accepted_us,)) = result
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(backend)?
        else {
            return Ok(false);
        };
        // The TTL is whole seconds and rounded up; the window is exact.
        let window = u64::try_from(self.id_window.as_micros()).unwrap_or(u64::MAX);
        let at = accepted_us.and_then(|a| u64::try_from(a).ok()).unwrap_or(0);
        Ok(wall_micros().saturating_sub(at) < window)
    }

    fn id_ttl(&self) -> i32 {
        // Rounded up, plus one: ScyllaDB expires on whole seconds. At most
        // the 20 years ScyllaDB allows.
        let secs = self.id_window.as_secs().saturating_add(2).min(MAX_TTL_SECS);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }

    async fn write_rows(
        &self,
        plain: Vec<InboxRow>,
        keyed: Vec<(IdKey, Vec<InboxRow>)>,
    ) -> Result<(), StoreError> {
        let session = &self.shared.session;
        let accepted_us = to_cql(wall_micros())?;
        let ttl = self.id_ttl();
        let mut writes: Vec<Write<'_>> = Vec::with_capacity(plain.len() + keyed.len());
        for r in plain {
            writes.push(Box::pin(async move {
                session
                    .execute_unpaged(&self.st.insert, (r.app, r.user, r.seq, r.bytes))
                    .await
                    .map(|_| ())
                    .map_err(backend)
            }));
        }
        // A send with a client id: its copies and its index entry in one
        // logged batch, which the cluster applies whole or not at all. A
        // send too large for one batch (a large group's copies) writes its
        // copies first and the index entry after them: a crash between
        // leaves copies without an entry, and a resend stores them again,
        // which at-least-once allows; never an entry without its copies.
        for ((app, sender, id), rows) in keyed {
            let index = vec![
                CqlValue::Text(app),
                CqlValue::Text(sender),
                CqlValue::Text(id),
                CqlValue::BigInt(accepted_us),
                CqlValue::Int(ttl),
            ];
            let bytes: usize = rows.iter().map(|r| r.bytes.len()).sum();
            let whole = fits_one_batch(rows.len(), bytes);
            let mut batch = Batch::new(BatchType::Logged);
            let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(rows.len() + 1);
            let mut copies: Vec<Write<'_>> = Vec::new();
            for r in rows {
                let row = vec![
                    CqlValue::Text(r.app),
                    CqlValue::Text(r.user),
                    CqlValue::BigInt(r.seq),
                    CqlValue::Blob(r.bytes),
                ];
                if whole {
                    batch.append_statement(self.st.insert.clone());
                    values.push(row);
                } else {
                    copies.push(Box::pin(async move {
                        session
                            .execute_unpaged(&self.st.insert, row)
                            .await
                            .map(|_| ())
                            .map_err(backend)
                    }));
                }
            }
            batch.append_statement(self.st.id_insert.clone());
            values.push(index);
            writes.push(Box::pin(async move {
                at_most(PARALLEL, copies).await?;
                session
                    .batch(&batch, values)
                    .await
                    .map(|_| ())
                    .map_err(backend)
            }));
        }
        let writes = at_most(PARALLEL, writes);
        // Past the deadline the append fails, so that the fetch horizon
        // never has to wait for an acknowledgement later than it.
        tokio::time::timeout(self.write_deadline, writes)
            .await
            .map_err(|_| {
                backend(format!(
                    "the append was not acknowledged within {:?}",
                    self.write_deadline
                ))
            })??;
        Ok(())
    }

    async fn page(
        &self,
        inbox: &InboxKey,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        self.shared
            .session
            .execute_iter(
                self.st.page.clone(),
                (&inbox.app_id, &inbox.user_id, after, limit),
            )
            .await
            .map_err(backend)?
            .rows_stream::<(i64, Vec<u8>)>()
            .map_err(backend)?
            .map_err(backend)
            .try_collect()
            .await
    }

    async fn count_after(&self, inbox: &InboxKey, after: i64) -> Result<u64, StoreError> {
        let (n,) = self
            .shared
            .session
            .execute_unpaged(&self.st.count, (&inbox.app_id, &inbox.user_id, after))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?
            .first_row::<(i64,)>()
            .map_err(backend)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The rows of `seqs` still in the inbox.
    async fn rows_of(
        &self,
        inbox: &InboxKey,
        seqs: &[i64],
    ) -> Result<HashMap<i64, Vec<u8>>, StoreError> {
        let mut found = HashMap::new();
        for chunk in seqs.chunks(IN_CHUNK) {
            let result = self
                .shared
                .session
                .execute_unpaged(
                    &self.st.by_seqs,
                    (&inbox.app_id, &inbox.user_id, chunk.to_vec()),
                )
                .await
                .map_err(backend)?
                .into_rows_result()
                .map_err(backend)?;
            for row in result.rows::<(i64, Vec<u8>)>().map_err(backend)? {
                let (seq, bytes) = row.map_err(backend)?;
                found.insert(seq, bytes);
            }
        }
        Ok(found)
    }

    /// Writes a follow-up into its inbox unless its marker says it was
    /// written: the message and the marker in one write (one partition key,
    /// so the same replicas apply them together).
    async fn write_follow_up(
        &self,
        app: &str,
        mut msg: InboxMessage,
    ) -> Result<InboxMessage, StoreError> {
        let session = &self.shared.session;
        let _held = self
            .follow_ups
            .lock(vec![(app.to_owned(), msg.to.clone(), msg.id.clone())])
            .await;
        let existing = session
            .execute_unpaged(&self.st.follow_up_lookup, (app, &msg.to, &msg.id))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(backend)?
            .and_then(|(seq,)| seq);
        if let Some(seq) = existing {
            // Written by an earlier removal that did not finish: listed
            // again, so that it is pushed (at least once).
            msg.seq = from_cql(seq)?;
            return Ok(msg);
        }
        let seq = self.shared.clock.next_seqs(1)[0];
        msg.seq = seq;
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.append_statement(self.st.insert.clone());
        batch.append_statement(self.st.follow_up_insert.clone());
        let ttl = i32::try_from(FOLLOW_UP_TTL.as_secs()).unwrap_or(i32::MAX);
        let seq = to_cql(seq)?;
        let values = (
            (app, &msg.to, seq, encode_row(&msg)),
            (app, &msg.to, &msg.id, seq, ttl),
        );
        tokio::time::timeout(self.write_deadline, session.batch(&batch, values))
            .await
            .map_err(|_| backend("a follow-up was not acknowledged in time"))?
            .map_err(backend)?;
        Ok(msg)
    }

    async fn remove_one(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError> {
        let mut wanted = Vec::with_capacity(seqs.len());
        let mut seen = HashSet::new();
        for &seq in seqs {
            // A number past a bigint was never given out.
            if let Ok(seq) = i64::try_from(seq)
                && seen.insert(seq)
            {
                wanted.push(seq);
            }
        }
        let _held = self.removing.lock(vec![inbox.clone()]).await;
        let found = self.rows_of(inbox, &wanted).await?;
        let present: Vec<i64> = wanted
            .into_iter()
            .filter(|s| found.contains_key(s))
            .collect();
        let mut removal = Removal::default();
        if let Some(follow_up) = follow_up {
            let mut pending = Vec::new();
            let mut keys = HashSet::new();
            for seq in &present {
                let bytes = &found[seq];
                let header = decode_header(bytes)?;
                if !header.reference.is_empty()
                    && let Some(msg) = follow_up(&header)
                    && keys.insert((msg.to.clone(), msg.id.clone()))
                {
                    pending.push(msg);
                }
            }
            // The follow-ups first, then the removal: a crash between the
            // two leaves the message, removed again later, and the second
            // follow-up write finds the first one's marker.
            let app = inbox.app_id.as_str();
            let writes: Vec<_> = pending
                .into_iter()
                .map(|msg| self.write_follow_up(app, msg))
                .collect();
            removal.appended = at_most(PARALLEL, writes).await?;
        }
        for chunk in present.chunks(IN_CHUNK) {
            self.shared
                .session
                .execute_unpaged(
                    &self.st.delete,
                    (&inbox.app_id, &inbox.user_id, chunk.to_vec()),
                )
                .await
                .map_err(backend)?;
        }
        removal.removed = present
            .into_iter()
            .map(from_cql)
            .collect::<Result<_, _>>()?;
        Ok(removal)
    }
}

#[async_trait]
impl Store for ScyllaStore {
    async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
        client_ids: &[bool],
    ) -> Result<Vec<Appended>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        if !client_ids.is_empty() && client_ids.len() != messages.len() {
            return Err(StoreError::Invalid(format!(
                "{} client id flags for {} messages",
                client_ids.len(),
                messages.len()
            )));
        }
        let flagged = |i: usize| client_ids.get(i).copied().unwrap_or(false);
        let keys: Vec<IdKey> = messages
            .iter()
            .enumerate()
            .filter(|(i, _)| flagged(*i))
            .map(|(_, m)| (app_id.to_owned(), m.from.clone(), m.id.clone()))
            .collect();
        // Of concurrent appends of one key in this process, one stores it.
        let _held = inner.ids.lock(keys.clone()).await;
        let mut distinct = keys;
        distinct.sort_unstable();
        distinct.dedup();
        let mut lookups = Vec::with_capacity(distinct.len());
        for (app, from, id) in &distinct {
            lookups.push(async move {
                inner
                    .accepted(app, from, id)
                    .await
                    .map(|seen| seen.then_some((from.as_str(), id.as_str())))
            });
        }
        let lookups = at_most(PARALLEL, lookups).await?;
        let seen: HashSet<(&str, &str)> = lookups.into_iter().flatten().collect();
        let mut plan = plan_append(messages, client_ids, &seen);
        let to_store: Vec<usize> = (0..messages.len()).filter(|&i| plan[i].is_none()).collect();
        // Numbered last, just before the writes: the horizon counts from here.
        let seqs = inner.shared.clock.next_seqs(to_store.len());
        let mut plain = Vec::new();
        let mut keyed: HashMap<IdKey, Vec<InboxRow>> = HashMap::new();
        for (&i, &seq) in to_store.iter().zip(&seqs) {
            let msg = &messages[i];
            let row = InboxRow {
                app: app_id.to_owned(),
                user: msg.to.clone(),
                seq: to_cql(seq)?,
                bytes: encode_row(msg),
            };
            if flagged(i) {
                keyed
                    .entry((app_id.to_owned(), msg.from.clone(), msg.id.clone()))
                    .or_default()
                    .push(row);
            } else {
                plain.push(row);
            }
            plan[i] = Some(Appended::Stored(seq));
        }
        inner.write_rows(plain, keyed.into_iter().collect()).await?;
        Ok(plan
            .into_iter()
            .map(|a| a.unwrap_or(Appended::Repeat))
            .collect())
    }

    async fn fetch(
        &self,
        inbox: &InboxKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        // Past every number given out: nothing is after it.
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(InboxPage::default());
        };
        if limit == 0 {
            let left = inner.count_after(inbox, after).await?;
            return Ok(InboxPage {
                messages: Vec::new(),
                left,
            });
        }
        let mut rows = inner.page(inbox, after, limit).await?;
        let horizon = inner.horizon.at(wall_micros());
        if let Some(&(last, _)) = rows.last()
            && from_cql(last)? >= horizon
        {
            // The page reaches rows a lower number may still join: wait
            // until it is settled, then read it again.
            // At most the settle time: a row numbered further ahead comes
            // from a clock ahead of ours by more than the allowed skew, and
            // stays unshown (counted in `left`) until ours catches up.
            let wait = inner.horizon.wait_for(from_cql(last)?, wall_micros());
            tokio::time::sleep(wait.min(inner.horizon.settle())).await;
            rows = inner.page(inbox, after, limit).await?;
        }
        let horizon = to_cql(inner.horizon.at(wall_micros()))?;
        rows.retain(|(seq, _)| *seq < horizon);
        let messages = rows
            .iter()
            .map(|(seq, bytes)| decode_row(*seq, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let last = rows.last().map_or(after, |(seq, _)| *seq);
        let left = inner.count_after(inbox, last).await?;
        Ok(InboxPage { messages, left })
    }

    async fn remove(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError> {
        self.inner.shared.check_open()?;
        self.inner.remove_one(inbox, seqs, follow_up).await
    }

    async fn remove_many(
        &self,
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
    ) -> Result<Vec<Removal>, StoreError> {
        self.inner.shared.check_open()?;
        // Inboxes are independent partitions: removed side by side (an
        // inbox listed twice waits for its own lock).
        let inner = &*self.inner;
        let mut each = Vec::with_capacity(removals.len());
        for (inbox, seqs) in &removals {
            each.push(inner.remove_one(inbox, seqs, follow_up));
        }
        at_most(PARALLEL_INBOXES, each).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.shared.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_contact_points() {
        assert_eq!(
            parse_nodes("10.0.0.1:9042, scylla-2:9042,").expect("nodes"),
            ["10.0.0.1:9042", "scylla-2:9042"]
        );
        assert_eq!(parse_nodes("[::1]:9042").expect("v6"), ["[::1]:9042"]);
        for bad in ["", " , ", "scylla", "scylla:port", ":9042", "h:70000"] {
            let err = parse_nodes(bad).expect_err(bad);
            assert!(err.to_string().contains("store.url"), "{err}");
        }
    }

    #[test]
    fn consistency_names_map_to_cql_levels() {
        assert_eq!(
            parse_consistency("local_quorum").expect("lq"),
            Consistency::LocalQuorum
        );
        assert_eq!(parse_consistency("QUORUM").expect("q"), Consistency::Quorum);
        assert_eq!(parse_consistency(" one ").expect("one"), Consistency::One);
        for bad in ["serial", "each_quorum", "any", ""] {
            let err = parse_consistency(bad).expect_err("not a level for reads and writes");
            assert!(err.to_string().contains("store.consistency"), "{err}");
        }
        assert_eq!(
            serial_of(Consistency::LocalQuorum),
            SerialConsistency::LocalSerial
        );
        assert_eq!(serial_of(Consistency::Quorum), SerialConsistency::Serial);
    }

    #[test]
    fn settings_are_checked_together() {
        let o = ScyllaOptions::from_settings(
            "h:9042",
            "sb",
            3,
            "local_quorum",
            Duration::from_secs(60),
        )
        .expect("options");
        assert_eq!(o.nodes, ["h:9042"]);
        assert_eq!(o.replication_factor, 3);
        assert_eq!(o.consistency, Consistency::LocalQuorum);
        assert!(ScyllaOptions::from_settings("h:9042", "sb", 0, "one", Duration::ZERO).is_err());
        assert!(ScyllaOptions::from_settings("h:9042", "s-b", 1, "one", Duration::ZERO).is_err());
    }

    fn msg(i: u64) -> InboxMessage {
        InboxMessage {
            id: format!("m-{i}"),
            kind: 1,
            from: "app-ann".into(),
            to: "app-bob".into(),
            group: "g".into(),
            content: "héllo \u{0} 👋".repeat(i as usize),
            reference: "r".into(),
            ts: 1_764_000_000_000,
            seq: 99,
            feature: 1,
            hops: vec!["d1".into()],
        }
    }

    #[test]
    fn a_row_maps_back_to_its_message_with_the_key_as_seq() {
        for i in 0..5 {
            let m = msg(i);
            let bytes = encode_row(&m);
            let back = decode_row(1_807_000_000_000_000_123, &bytes).expect("decodes");
            assert_eq!(back.seq, 1_807_000_000_000_000_123);
            assert_eq!(InboxMessage { seq: 99, ..back }, m);
            // The stored bytes do not carry the seq.
            assert_eq!(InboxMessage::decode(bytes.as_slice()).expect("raw").seq, 0);
        }
        assert!(decode_row(-1, &encode_row(&msg(1))).is_err());
        assert!(
            decode_row(5, &[0x0a, 0x05, b'a']).is_err(),
            "damage is an error"
        );
        assert!(to_cql(u64::MAX).is_err());
    }

    #[test]
    fn a_large_send_is_written_copies_first() {
        assert!(fits_one_batch(1, 0));
        assert!(fits_one_batch(100, 100 * 1024));
        assert!(!fits_one_batch(101, 10), "a large group's copies");
        assert!(!fits_one_batch(2, 100 * 1024 + 1), "large contents");
    }

    #[test]
    fn an_append_plan_stores_each_send_once_per_recipient() {
        let sent = |id: &str, to: &str| InboxMessage {
            id: id.into(),
            from: "ann".into(),
            to: to.into(),
            ..Default::default()
        };
        let messages = [
            sent("g-1", "bob"),
            sent("g-1", "cid"),
            sent("g-1", "bob"),
            sent("old", "bob"),
            sent("plain", "bob"),
            sent("plain", "bob"),
        ];
        let flags = [true, true, true, true, false, false];
        let seen: HashSet<(&str, &str)> = [("ann", "old")].into_iter().collect();
        let plan = plan_append(&messages, &flags, &seen);
        assert_eq!(
            plan,
            [
                None,
                None,
                Some(Appended::Repeat),
                Some(Appended::Repeat),
                None,
                None
            ]
        );
        assert_eq!(plan_append(&messages, &[], &seen), vec![None; 6]);
    }

    #[tokio::test]
    async fn key_locks_serialize_one_key_and_forget_it_after() {
        use futures_util::FutureExt;
        let locks: KeyLocks<u32> = KeyLocks::new();
        let held = locks.lock(vec![2, 1, 2]).await;
        let other = locks.lock(vec![3]).now_or_never();
        assert!(other.is_some(), "another key is free");
        drop(other);
        assert!(
            locks.lock(vec![1]).now_or_never().is_none(),
            "a held key waits"
        );
        drop(held);
        drop(locks.lock(vec![1]).await);
        assert!(locks.map.lock().expect("map").is_empty(), "forgotten");
    }
}
