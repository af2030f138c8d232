//! What the operator console (`[ui] console`) reads from this process: the
//! members discovery lists, and the federation's topology with the link
//! states its domains publish in etcd (as `topology show` prints them).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_config::Config;
use switchboard_discovery::Members;
use switchboard_gateway::ui::{
    ClusterMember, ClusterView, ConsoleSource, DomainInfo, FederationView, LinkInfo,
};
use switchboard_metadata::{EtcdMetadata, TopologyView};
use tokio::sync::watch;

pub(crate) struct NodeConsole {
    node_id: String,
    /// The mesh secret's tag: members with another are foreign.
    tag: String,
    members: Option<watch::Receiver<Arc<Members>>>,
    federating: bool,
    topology: Option<TopologyView>,
    /// The federation's prefix in etcd, where link states are published.
    links: Option<EtcdMetadata>,
}

impl NodeConsole {
    pub(crate) async fn open(
        config: &Config,
        node_id: &str,
        members: Option<watch::Receiver<Arc<Members>>>,
        topology: Option<TopologyView>,
    ) -> Arc<dyn ConsoleSource> {
        let links = match config.etcd.is_empty() {
            true => None,
            // Without it the links show `unknown`; the rest still works.
            false => EtcdMetadata::connect_kinds(&config.etcd, &config.federation_prefix(), &[])
                .await
                .map_err(|e| tracing::warn!(error = %e, "the console cannot read link states"))
                .ok(),
        };
        Arc::new(NodeConsole {
            node_id: node_id.to_owned(),
            tag: switchboard_mesh::secret_tag(&config.mesh_secret),
            members,
            federating: config.federation.enabled(),
            topology,
            links,
        })
    }
}

#[async_trait]
impl ConsoleSource for NodeConsole {
    fn cluster(&self) -> ClusterView {
        let Some(members) = &self.members else {
            return ClusterView::default();
        };
        let members = members.borrow().clone();
        ClusterView {
            discovery: true,
            members: members
                .values()
                .map(|m| ClusterMember {
                    id: m.id.clone(),
                    roles: m.roles.clone(),
                    addr: m.addr.clone(),
                    foreign: m.tag != self.tag,
                    this: m.id == self.node_id,
                })
                .collect(),
        }
    }

    async fn federation(&self) -> FederationView {
        let mut view = FederationView {
            enabled: self.federating,
            ..FederationView::default()
        };
        let Some(current) = self.topology.as_ref().and_then(|t| t.borrow().clone()) else {
            return view;
        };
        // What each domain publishes about its links: (reporter, peer) → up.
        let mut reports: BTreeMap<(String, String), bool> = BTreeMap::new();
        if let Some(metadata) = &self.links {
            match metadata.list_under("links/").await {
                Ok(entries) => {
                    for (key, value) in entries {
                        let Some((reporter, peer)) = key.split_once('/') else {
                            continue;
                        };
                        let up = serde_json::from_slice::<serde_json::Value>(&value)
                            .ok()
                            .and_then(|v| v.get("up")?.as_bool());
                        if let Some(up) = up {
                            reports.insert((reporter.to_owned(), peer.to_owned()), up);
                        }
                    }
                }
                Err(e) => view.error = Some(format!("cannot read the link states: {e}")),
            }
        }
        view.domains = current
            .network
            .domains()
            .iter()
            .map(|d| DomainInfo {
                name: d.name.clone(),
                client: d.client.clone(),
                federation: d.federation.clone(),
            })
            .collect();
        view.links = current
            .network
            .links()
            .map(|(a, b, weight)| {
                let seen = |x: &str, y: &str| reports.get(&(x.to_owned(), y.to_owned())).copied();
                let state = match (seen(a, b), seen(b, a)) {
                    (None, None) => "unknown",
                    (Some(false), _) | (_, Some(false)) => "down",
                    _ => "up",
                };
                LinkInfo {
                    a: a.to_owned(),
                    b: b.to_owned(),
                    weight,
                    state: state.to_owned(),
                }
            })
            .collect();
        view
    }
}
