//! Control-plane metadata: the records every process of a deployment must
//! agree on and an operator changes while it runs. Client apps, and the
//! federation topology (one record for the whole network of domains,
//! under a prefix all domains share); API keys (public API) are next.
//!
//! One trait, [`Metadata`]: get / list / put / delete of records by
//! [`Kind`] and key, values as JSON, and a stream of [`Change`]s. Two
//! implementations:
//! - [`EtcdMetadata`] when the node is configured with etcd: keys
//!   `<prefix><kind>/<key>` under the deployment's prefix, watched live;
//! - [`StaticMetadata`] when standalone: in memory, filled from the config
//!   file's `[[apps]]`.
//!
//! A crate of its own rather than part of discovery: discovery is who is
//! alive (leased, ephemeral keys), metadata is what is configured (durable
//! records); the auth role (and later the router's topology) reads
//! metadata and has no business with membership, and standalone nodes have
//! metadata without any discovery.

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

pub mod contract;
mod etcd;
mod follow;

pub use etcd::EtcdMetadata;
pub use follow::{CurrentTopology, TopologyView, follow_topology};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {0} did not answer within {1:?}")]
    Timeout(String, std::time::Duration),
    #[error("invalid metadata key {0:?}: 1 to 256 characters, no '/'")]
    Key(String),
    #[error("{kind} record {key:?} is not valid: {reason}")]
    Invalid {
        kind: Kind,
        key: String,
        reason: String,
    },
    #[error("{0}")]
    Seed(String),
}

/// What a record is. Each kind is a key space of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Client apps ([`switchboard_config::AppConfig`]), keyed by app id.
    Apps,
    /// The federation topology ([`switchboard_topology::Topology`]): one
    /// record, key [`TOPOLOGY_KEY`], under the federation's shared prefix
    /// ([`switchboard_topology::DEFAULT_PREFIX`] by default).
    Topology,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Apps, Kind::Topology];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Apps => "apps",
            Kind::Topology => "topology",
        }
    }
}

/// The key of the one topology record: `<prefix>topology/current`.
pub const TOPOLOGY_KEY: &str = "current";

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: Kind,
    pub key: String,
    pub op: ChangeOp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeOp {
    /// Written (created or replaced) with this value.
    Put(Vec<u8>),
    Deleted,
    /// Changes may have been missed (the history they were in is gone):
    /// read the whole kind again. `key` is empty.
    Reload,
}

/// Changes buffered per subscriber; one that falls further behind gets
/// `RecvError::Lagged` and must read the kind again.
pub const CHANGES_BUFFER: usize = 1024;

/// The control-plane records of a deployment.
#[async_trait]
pub trait Metadata: Send + Sync + 'static {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, MetadataError>;
    /// Every record of `kind`, by key.
    async fn list(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, MetadataError>;
    async fn put(&self, kind: Kind, key: &str, value: Vec<u8>) -> Result<(), MetadataError>;
    /// Whether there was such a record.
    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, MetadataError>;
    /// Changes from now on, made here or (etcd) by any process.
    fn changes(&self) -> broadcast::Receiver<Change>;
}

/// A record type stored under one kind, as JSON.
pub trait Record: Serialize + DeserializeOwned + Send + Sync {
    const KIND: Kind;
    fn key(&self) -> &str;
    /// Checked before a put: what no reader could use is refused.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Record for switchboard_config::AppConfig {
    const KIND: Kind = Kind::Apps;

    fn key(&self) -> &str {
        &self.app_id
    }

    fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| e.to_string())
    }
}

/// The whole topology is one record: an `apply` replaces it atomically,
/// and no reader ever sees half of a change.
impl Record for switchboard_topology::Topology {
    const KIND: Kind = Kind::Topology;

    fn key(&self) -> &str {
        TOPOLOGY_KEY
    }

    fn check(&self) -> Result<(), String> {
        self.check()
            .map(|_| ())
            .map_err(|problems| problems.to_string())
    }
}

/// Typed access on top of any [`Metadata`].
#[async_trait]
pub trait MetadataExt: Metadata {
    async fn get_record<R: Record>(&self, key: &str) -> Result<Option<R>, MetadataError> {
        match self.get(R::KIND, key).await? {
            Some(value) => decode::<R>(key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Every record of the type; a malformed one is left out, with a
    /// warning (one bad record must not hide the others).
    async fn list_records<R: Record>(&self) -> Result<Vec<R>, MetadataError> {
        let mut out = Vec::new();
        for (key, value) in self.list(R::KIND).await? {
            match decode::<R>(&key, &value) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed metadata record"),
            }
        }
        Ok(out)
    }

    async fn put_record<R: Record>(&self, record: &R) -> Result<(), MetadataError> {
        let invalid = |reason: String| MetadataError::Invalid {
            kind: R::KIND,
            key: record.key().to_owned(),
            reason,
        };
        record.check().map_err(invalid)?;
        let value = serde_json::to_vec(record).map_err(|e| invalid(e.to_string()))?;
        self.put(R::KIND, record.key(), value).await
    }

    async fn delete_record<R: Record>(&self, key: &str) -> Result<bool, MetadataError> {
        self.delete(R::KIND, key).await
    }
}

impl<T: Metadata + ?Sized> MetadataExt for T {}

/// The record of `key` from its JSON, checked.
pub fn decode<R: Record>(key: &str, value: &[u8]) -> Result<R, MetadataError> {
    let invalid = |reason: String| MetadataError::Invalid {
        kind: R::KIND,
        key: key.to_owned(),
        reason,
    };
    let record: R = serde_json::from_slice(value).map_err(|e| invalid(e.to_string()))?;
    if record.key() != key {
        return Err(invalid(format!(
            "stored under {key:?} but names {:?}",
            record.key()
        )));
    }
    record.check().map_err(invalid)?;
    Ok(record)
}

/// Keys are one path segment: `<prefix><kind>/<key>` stays unambiguous.
pub fn check_key(key: &str) -> Result<(), MetadataError> {
    if key.is_empty() || key.len() > 256 || key.contains('/') {
        return Err(MetadataError::Key(key.to_owned()));
    }
    Ok(())
}

/// Metadata of a standalone node: in memory, filled from the config file.
/// Changes made through it are seen by this process only and are gone at
/// the next start.
pub struct StaticMetadata {
    records: RwLock<BTreeMap<(Kind, String), Vec<u8>>>,
    changes: broadcast::Sender<Change>,
}

impl Default for StaticMetadata {
    fn default() -> Self {
        StaticMetadata {
            records: RwLock::new(BTreeMap::new()),
            changes: broadcast::channel(CHANGES_BUFFER).0,
        }
    }
}

impl StaticMetadata {
    /// Holding the config file's apps.
    pub fn with_apps(apps: &[switchboard_config::AppConfig]) -> Result<Self, MetadataError> {
        let me = StaticMetadata::default();
        {
            let mut records = me.write();
            for app in apps {
                check_key(&app.app_id)?;
                let value = serde_json::to_vec(app).map_err(|e| MetadataError::Invalid {
                    kind: Kind::Apps,
                    key: app.app_id.clone(),
                    reason: e.to_string(),
                })?;
                records.insert((Kind::Apps, app.app_id.clone()), value);
            }
        }
        Ok(me)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(Kind, String), Vec<u8>>> {
        self.records
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(Kind, String), Vec<u8>>> {
        self.records
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Metadata for StaticMetadata {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, MetadataError> {
        check_key(key)?;
        Ok(self.read().get(&(kind, key.to_owned())).cloned())
    }

    async fn list(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, MetadataError> {
        Ok(self
            .read()
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, key), value)| (key.clone(), value.clone()))
            .collect())
    }

    async fn put(&self, kind: Kind, key: &str, value: Vec<u8>) -> Result<(), MetadataError> {
        check_key(key)?;
        self.write().insert((kind, key.to_owned()), value.clone());
        // No subscriber is not an error.
        let _ = self.changes.send(Change {
            kind,
            key: key.to_owned(),
            op: ChangeOp::Put(value),
        });
        Ok(())
    }

    async fn delete(&self, kind: Kind, key: &str) -> Result<bool, MetadataError> {
        check_key(key)?;
        let existed = self.write().remove(&(kind, key.to_owned())).is_some();
        if existed {
            let _ = self.changes.send(Change {
                kind,
                key: key.to_owned(),
                op: ChangeOp::Deleted,
            });
        }
        Ok(existed)
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_metadata_keeps_the_contract() {
        contract::run_all(&StaticMetadata::default()).await;
    }

    #[tokio::test]
    async fn a_topology_is_one_record_and_an_invalid_one_is_refused() {
        use switchboard_topology::Topology;
        let m = StaticMetadata::default();
        let ring = include_str!("../../../deploy/federation/ring.yaml");
        let topology = Topology::from_yaml(ring).expect("ring");
        m.put_record(&topology).await.expect("put");
        let keys: Vec<String> = m
            .list(Kind::Topology)
            .await
            .expect("list")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![TOPOLOGY_KEY.to_owned()]);
        let mut broken = topology.clone();
        broken.domain_links[0].n2 = "domain-99".into();
        broken.domain_links[1].weight = 0;
        let err = m.put_record(&broken).await.expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("no domain named \"domain-99\"") && text.contains("weight 0"),
            "{text}"
        );
        let stored: Option<Topology> = m.get_record(TOPOLOGY_KEY).await.expect("get");
        assert_eq!(stored, Some(topology));
    }

    #[tokio::test]
    async fn static_metadata_holds_the_config_apps() {
        let m = StaticMetadata::with_apps(&[switchboard_config::AppConfig::demo()]).expect("apps");
        let apps: Vec<switchboard_config::AppConfig> = m.list_records().await.expect("list");
        assert_eq!(apps, vec![switchboard_config::AppConfig::demo()]);
    }
}
