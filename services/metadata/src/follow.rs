//! The federation topology, followed: every process that routes or
//! redirects holds the current one in a `watch` channel, replaced whole on
//! each valid change, and kept as it was through an etcd outage or an
//! invalid record (an `apply` checks before it writes, but a hand-written
//! key must not take the network down).

use std::sync::Arc;
use std::time::Duration;

use switchboard_topology::{Network, Topology};
use tokio::sync::{broadcast::error::RecvError, watch};

use crate::{Kind, Metadata, MetadataExt, TOPOLOGY_KEY};

/// A checked topology and the network it describes.
#[derive(Debug)]
pub struct CurrentTopology {
    pub topology: Topology,
    pub network: Network,
}

/// The topology in force: `None` while none was ever read (or it was
/// deleted).
pub type TopologyView = watch::Receiver<Option<Arc<CurrentTopology>>>;

/// Pause between reads while the metadata backend does not answer.
const RETRY: Duration = Duration::from_millis(500);
/// How long [`follow_topology`] waits for the first read before it returns
/// (the view fills in when the read succeeds later).
const FIRST_READ: Duration = Duration::from_secs(3);

/// Follows the topology record of `metadata` until the returned view and
/// every clone of it are dropped.
pub async fn follow_topology(metadata: Arc<dyn Metadata>) -> TopologyView {
    // Subscribed before the first read: no change falls in between.
    let mut changes = metadata.changes();
    let (tx, rx) = watch::channel(None);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        loop {
            // Read until one read succeeds.
            loop {
                if tx.is_closed() {
                    return;
                }
                match metadata.get_record::<Topology>(TOPOLOGY_KEY).await {
                    Ok(record) => {
                        apply(&tx, record);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the federation topology; keeping the last one, retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            // Then wait for the next change of the topology.
            loop {
                let change = tokio::select! {
                    _ = tx.closed() => return,
                    change = changes.recv() => change,
                };
                match change {
                    Ok(change) if change.kind != Kind::Topology => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return,
                }
            }
            while changes.try_recv().is_ok() {}
        }
    });
    let _ = tokio::time::timeout(FIRST_READ, first_rx).await;
    rx
}

fn apply(tx: &watch::Sender<Option<Arc<CurrentTopology>>>, record: Option<Topology>) {
    let Some(topology) = record else {
        if tx.borrow().is_some() {
            tracing::warn!(
                "the federation topology was deleted: no domain is reachable until one is applied"
            );
            tx.send_replace(None);
        }
        return;
    };
    if tx
        .borrow()
        .as_ref()
        .is_some_and(|current| current.topology == topology)
    {
        return;
    }
    match topology.check() {
        Ok(network) => {
            tracing::info!(
                domains = topology.domains.len(),
                links = topology.domain_links.len(),
                apps = topology.client_apps.len(),
                "federation topology in force"
            );
            tx.send_replace(Some(Arc::new(CurrentTopology { topology, network })));
        }
        Err(problems) => {
            tracing::error!(%problems, "the federation topology in etcd is invalid; keeping the last valid one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticMetadata;

    const RING: &str = "domains:\n  - {name: d1, federation: 'http://127.0.0.1:1', client: 'ws://127.0.0.1:2/ws'}\n  - {name: d2, federation: 'http://127.0.0.1:3', client: 'ws://127.0.0.1:4/ws'}\ndomainLinks:\n  - {n1: d1, n2: d2}\n";

    #[tokio::test]
    async fn the_view_follows_valid_changes_and_keeps_the_last_through_invalid_ones() {
        let metadata = Arc::new(StaticMetadata::default());
        let mut view = follow_topology(metadata.clone()).await;
        assert!(view.borrow().is_none());
        let topology = Topology::from_yaml(RING).expect("yaml");
        metadata.put_record(&topology).await.expect("put");
        tokio::time::timeout(Duration::from_secs(15), view.changed())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(
            view.borrow().as_ref().map(|c| c.network.domains().len()),
            Some(2)
        );
        // An invalid record (bypassing the check, as a hand edit would):
        // the view keeps the last valid topology.
        let mut bad = topology.clone();
        bad.domain_links[0].n2 = "nowhere".into();
        metadata
            .put(
                Kind::Topology,
                TOPOLOGY_KEY,
                serde_json::to_vec(&bad).expect("json"),
            )
            .await
            .expect("put");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            view.borrow()
                .as_ref()
                .map(|c| c.topology.domain_links[0].n2.clone()),
            Some("d2".to_owned())
        );
    }
}
