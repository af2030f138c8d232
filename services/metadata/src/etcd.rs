//! Metadata in etcd: `<prefix><kind>/<key>` → the record as JSON.
//!
//! One watch per kind feeds the change stream. When the watch breaks (etcd
//! restarted, the connection dropped) it is created again from the last
//! revision seen + 1, so no change is lost or repeated; when that history
//! was compacted away, subscribers get [`ChangeOp::Reload`].

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{CHANGES_BUFFER, Change, ChangeOp, Kind, Metadata, MetadataError, check_key};

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause before a broken watch is created again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// etcd's default limit of operations in one transaction is 128.
const MAX_SEED: usize = 100;

/// The metadata of a deployment in etcd.
pub struct EtcdMetadata {
    client: Client,
    endpoints: String,
    prefix: String,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
}

impl EtcdMetadata {
    /// Connects and starts following every kind under `prefix` (the
    /// deployment's key prefix, e.g. `/switchboard/`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, MetadataError> {
        Self::connect_kinds(endpoints, prefix, &Kind::ALL).await
    }

    /// Connects and follows only `kinds` under `prefix` (the federation's
    /// shared prefix holds the topology and nothing else). The other kinds
    /// can still be read and written; their changes are not notified.
    pub async fn connect_kinds(
        endpoints: &[String],
        prefix: &str,
        kinds: &[Kind],
    ) -> Result<Self, MetadataError> {
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = bounded(&joined, Client::connect(endpoints, Some(options))).await?;
        let me = EtcdMetadata {
            client,
            endpoints: joined,
            prefix: prefix.to_owned(),
            changes: broadcast::channel(CHANGES_BUFFER).0,
            stop: CancellationToken::new(),
        };
        for &kind in kinds {
            // Changes after this revision are the watch's: none is missed
            // between connecting and the watch's start.
            let mut c = me.client.clone();
            let now = bounded(
                &me.endpoints,
                c.get(
                    me.kind_prefix(kind),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ),
            )
            .await?;
            let revision = now.header().map(|h| h.revision()).unwrap_or(0);
            tokio::spawn(watch_kind(Watch {
                client: me.client.clone(),
                endpoints: me.endpoints.clone(),
                kind,
                prefix: me.kind_prefix(kind),
                changes: me.changes.clone(),
                stop: me.stop.clone(),
                revision,
            }));
        }
        Ok(me)
    }

    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}{}/", self.prefix, kind.as_str())
    }

    fn key(&self, kind: Kind, key: &str) -> Result<String, MetadataError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.kind_prefix(kind)))
    }

    /// Every key under `<prefix><sub>` (not a record kind: e.g. the link
    /// states domains publish under `links/`), with the part after the
    /// prefix and the value.
    pub async fn list_under(&self, sub: &str) -> Result<Vec<(String, Vec<u8>)>, MetadataError> {
        let prefix = format!("{}{sub}", self.prefix);
        let mut c = self.client.clone();
        let reply = bounded(
            &self.endpoints,
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(reply
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
                Some((key.to_owned(), kv.value().to_vec()))
            })
            .collect())
    }

    /// Writes `records` of `kind` if this deployment's metadata was never
    /// seeded for that kind, atomically with a marker
    /// (`<prefix>seeded/<kind>`): the config file seeds etcd once, and
    /// afterwards etcd is the truth (an app deleted there stays deleted
    /// when a process restarts with the old config). Returns whether it
    /// seeded.
    pub async fn seed_once(
        &self,
        kind: Kind,
        records: &[(String, Vec<u8>)],
    ) -> Result<bool, MetadataError> {
        if records.len() > MAX_SEED {
            return Err(MetadataError::Seed(format!(
                "{} {kind} records to seed etcd with; at most {MAX_SEED} in one transaction: \
                 put the rest with `switchboard apps put`",
                records.len()
            )));
        }
        let marker = format!("{}seeded/{}", self.prefix, kind.as_str());
        let mut ops = vec![TxnOp::put(marker.clone(), "1", None)];
        for (key, value) in records {
            ops.push(TxnOp::put(self.key(kind, key)?, value.clone(), None));
        }
        let txn = Txn::new()
            .when([Compare::create_revision(marker, CompareOp::Equal, 0)])
            .and_then(ops);
        let mut c = self.client.clone();
        let reply = bounded(&self.endpoints, c.txn(txn)).await?;
        Ok(reply.succeeded())
    }
}

impl Drop for EtcdMetadata {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait]
impl Metadata for EtcdMetadata {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, MetadataError> {
        let key = self.key(kind, key)?;
        let mut c = self.client.clone();
        let reply = bounded(&self.endpoints, c.get(key, None)).await?;
        Ok(reply.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, MetadataError> {
        let prefix = self.kind_prefix(kind);
        let mut c = self.client.clone();
        let reply = bounded(
            &self.endpoints,
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(reply
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = record_key(&prefix, kv.key())?;
                Some((key, kv.value().to_vec()))
            })
            .collect())
    }

    async fn put(&self, kind: Kind, key: &str, value: Vec<u8>) -> Result<(), MetadataError> {
        let key = self.key(kind, key)?;
        let mut c = self.client.clone();
        bounded(&self.endpoints, c.put(key, value, None)).await?;
        Ok(())
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, MetadataError> {
        let key = self.key(kind, key)?;
        let mut c = self.client.clone();
        let reply = bounded(&self.endpoints, c.delete(key, None)).await?;
        Ok(reply.deleted() > 0)
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// The record key of an etcd key under `prefix` (nothing nested deeper).
fn record_key(prefix: &str, etcd_key: &[u8]) -> Option<String> {
    let rest = etcd_key.strip_prefix(prefix.as_bytes())?;
    let key = std::str::from_utf8(rest).ok()?;
    check_key(key).ok()?;
    Some(key.to_owned())
}

async fn bounded<T>(
    endpoints: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, MetadataError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(MetadataError::Etcd {
            endpoints: endpoints.to_owned(),
            source,
        }),
        Err(_) => Err(MetadataError::Timeout(endpoints.to_owned(), CALL_TIMEOUT)),
    }
}

struct Watch {
    client: Client,
    endpoints: String,
    kind: Kind,
    prefix: String,
    changes: broadcast::Sender<Change>,
    stop: CancellationToken,
    /// The last revision whose changes were passed on.
    revision: i64,
}

/// Follows one kind until stopped, re-creating the watch from the last
/// revision + 1 whenever it breaks.
async fn watch_kind(mut w: Watch) {
    let mut healthy = true;
    loop {
        let mut c = w.client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(w.revision + 1);
        match bounded(&w.endpoints, c.watch(w.prefix.clone(), Some(options))).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    _ = w.stop.cancelled() => return,
                    m = stream.message() => m,
                };
                let reply = match message {
                    Ok(Some(reply)) => reply,
                    Ok(None) => break,
                    Err(e) => {
                        if healthy {
                            tracing::warn!(kind = %w.kind, error = %e, "metadata watch failed; re-creating it");
                            healthy = false;
                        }
                        break;
                    }
                };
                if !healthy {
                    tracing::info!(kind = %w.kind, "metadata watch re-created");
                    healthy = true;
                }
                if reply.canceled() {
                    // The history after our revision was compacted: start
                    // at the oldest kept and have subscribers read anew.
                    if reply.compact_revision() > w.revision + 1 {
                        w.revision = reply.compact_revision() - 1;
                        let _ = w.changes.send(Change {
                            kind: w.kind,
                            key: String::new(),
                            op: ChangeOp::Reload,
                        });
                    }
                    break;
                }
                for event in reply.events() {
                    let Some(kv) = event.kv() else { continue };
                    w.revision = w.revision.max(kv.mod_revision());
                    let Some(key) = record_key(&w.prefix, kv.key()) else {
                        continue;
                    };
                    let op = match event.event_type() {
                        EventType::Put => ChangeOp::Put(kv.value().to_vec()),
                        EventType::Delete => ChangeOp::Deleted,
                    };
                    // No subscriber is not an error.
                    let _ = w.changes.send(Change {
                        kind: w.kind,
                        key,
                        op,
                    });
                }
            },
            Err(e) => {
                if healthy {
                    tracing::warn!(kind = %w.kind, error = %e, "cannot watch metadata; retrying");
                    healthy = false;
                }
            }
        }
        tokio::select! {
            _ = w.stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }
}
