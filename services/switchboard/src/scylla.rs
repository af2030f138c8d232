//! `[store] engine = "scylla"`: the inboxes, queues and groups in a
//! ScyllaDB keyspace, one session shared by the three.

use std::sync::Arc;

use switchboard_config::StoreConfig;
use switchboard_store::{ScyllaOptions, ScyllaStore, StoreError};

use crate::OpenedStore;

/// Connects (a node that cannot be reached fails the start, naming it),
/// creates or migrates the schema, and opens the three parts.
pub(crate) async fn open(config: &StoreConfig) -> Result<OpenedStore, StoreError> {
    let options = ScyllaOptions::from_settings(
        &config.url,
        &config.keyspace,
        config.replication_factor,
        &config.consistency,
        config.id_window,
    )?;
    let store = ScyllaStore::connect(options).await?;
    Ok(OpenedStore {
        queues: Arc::new(store.queues().await?),
        groups: Arc::new(store.groups().await?),
        inbox: Arc::new(store),
    })
}
