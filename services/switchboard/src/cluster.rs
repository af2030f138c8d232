//! Turning the member list from discovery into role pools and gateway links.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use switchboard_config::{Config, Role};
use switchboard_discovery::Members;
use switchboard_mesh::{GatewayTable, MeshConnector, Pool};
use tokio::sync::watch;

/// Pools of the roles this process reaches over the mesh.
#[derive(Clone, Default)]
pub(crate) struct Pools {
    pools: HashMap<Role, Arc<Pool>>,
}

impl Pools {
    /// One pool per role not run here, when discovery is configured; and
    /// one of every groups instance, this one included, whose topics and
    /// rooms go to their owner even from a process that runs groups too;
    /// likewise of every delivery instance with a shared store, where each
    /// inbox has its owner (sharded delivery).
    pub(crate) fn new(config: &Config, connector: &MeshConnector) -> Self {
        if config.etcd.is_empty() {
            return Pools::default();
        }
        let sharded = config.store.engine.is_shared();
        let pools = Role::ALL
            .into_iter()
            .filter(|r| {
                (!config.runs(*r) || *r == Role::Groups || (*r == Role::Delivery && sharded))
                    && *r != Role::Gateway
            })
            .map(|r| (r, Pool::new(r.as_str(), connector.clone())))
            .collect();
        Pools { pools }
    }

    pub(crate) fn get(&self, role: Role) -> Option<Arc<Pool>> {
        self.pools.get(&role).cloned()
    }

    /// Roles reached over the mesh with no instance known now.
    pub(crate) fn without_instances(&self) -> Vec<&'static str> {
        let mut missing: Vec<&'static str> = self
            .pools
            .values()
            .filter(|p| p.ids().is_empty())
            .map(|p| p.role())
            .collect();
        missing.sort_unstable();
        missing
    }
}

/// Follows the member list: feeds every pool with the instances of its
/// role, and the gateway table with the other gateways. Members whose mesh
/// secret differs (another tag) are ignored, with a warning once each.
pub(crate) fn follow(
    mut members: watch::Receiver<Arc<Members>>,
    self_id: String,
    tag: String,
    pools: Pools,
    gateways: Arc<GatewayTable>,
    connector: MeshConnector,
) {
    tokio::spawn(async move {
        let mut warned: BTreeSet<String> = BTreeSet::new();
        loop {
            let current = members.borrow_and_update().clone();
            for m in current.values() {
                if m.tag != tag && warned.insert(m.id.clone()) {
                    tracing::warn!(
                        member = %m.id, addr = %m.addr,
                        "ignoring a process with another mesh secret"
                    );
                }
            }
            let trusted = || current.values().filter(|m| m.tag == tag);
            for (role, pool) in &pools.pools {
                let instances: Vec<(String, String)> = trusted()
                    .filter(|m| m.has_role(role.as_str()))
                    .map(|m| (m.id.clone(), m.addr.clone()))
                    .collect();
                metrics::gauge!("switchboard_mesh_instances", "role" => role.as_str())
                    .set(instances.len() as f64);
                pool.update(&instances);
            }
            let remote_gateways: Vec<(String, String)> = trusted()
                .filter(|m| m.id != self_id && m.has_role(Role::Gateway.as_str()))
                .map(|m| (m.id.clone(), m.addr.clone()))
                .collect();
            gateways.update_remote(&remote_gateways, &connector);
            if members.changed().await.is_err() {
                return;
            }
        }
    });
}
