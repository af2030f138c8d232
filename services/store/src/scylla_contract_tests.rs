//! The store, queue and group contract suites against a ScyllaDB node
//! named by `SWITCHBOARD_TEST_SCYLLA` (`host:9042`), each test in a fresh
//! keyspace (`sbtest_…`, replication factor 1, left for the operator of
//! that node to drop). Without the variable every test is skipped with a
//! printed reason, under CI as well: no runnable ScyllaDB installs on our
//! machines (docs/operations.md, "ScyllaDB", says how to run them).

use std::sync::Arc;
use std::time::Duration;

use crate::contract::{DAY, Harness};
use crate::group_contract::GroupHarness;
use crate::queue_contract::QueueHarness;
use crate::{GroupStore, Queue, ScyllaOptions, ScyllaStore};

fn node() -> Option<String> {
    switchboard_testenv::optional_service(
        switchboard_testenv::SCYLLA,
        "no ScyllaDB node to test against; docker run scylladb/scylla and set it to host:9042",
    )
}

/// A keyspace of its own.
pub struct ScyllaPlace {
    node: String,
    keyspace: String,
}

impl ScyllaPlace {
    fn new() -> Self {
        ScyllaPlace {
            node: std::env::var(switchboard_testenv::SCYLLA).unwrap_or_default(),
            keyspace: format!("sbtest_{}", switchboard_testenv::unique()),
        }
    }

    async fn connect(&self, id_window: Duration) -> ScyllaStore {
        let options =
            ScyllaOptions::from_settings(&self.node, &self.keyspace, 1, "local_quorum", id_window)
                .expect("options");
        ScyllaStore::connect(options)
            .await
            .expect("connect to the ScyllaDB under test")
    }
}

impl Harness for ScyllaPlace {
    type Store = ScyllaStore;

    fn available() -> bool {
        node().is_some()
    }

    async fn create() -> Self {
        ScyllaPlace::new()
    }

    async fn open(&self, id_window: Duration) -> ScyllaStore {
        self.connect(id_window).await
    }
}

impl QueueHarness for ScyllaPlace {
    fn available() -> bool {
        node().is_some()
    }

    async fn create() -> Self {
        ScyllaPlace::new()
    }

    async fn open(&self) -> Arc<dyn Queue> {
        Arc::new(self.connect(DAY).await.queues().await.expect("queues"))
    }
}

impl GroupHarness for ScyllaPlace {
    fn available() -> bool {
        node().is_some()
    }

    async fn create() -> Self {
        ScyllaPlace::new()
    }

    async fn open(&self) -> Arc<dyn GroupStore> {
        Arc::new(self.connect(DAY).await.groups().await.expect("groups"))
    }
}

crate::store_contract_tests!(ScyllaPlace);

crate::queue_contract_tests!(harness = ScyllaPlace);

crate::group_store_contract_tests!(harness = ScyllaPlace);
