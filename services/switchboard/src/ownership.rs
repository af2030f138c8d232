//! Sharded delivery: which inboxes this delivery process serves.
//!
//! With a shared store any number of delivery processes run; an inbox
//! `(app, user)` belongs to one of them by rendezvous hashing over the live
//! delivery instances (the same hash callers' pools use to pick where to
//! send). Two processes must never serve one inbox at once, also while the
//! member list changes. The fence:
//!
//! - Each process applies a new member list ("view") under a write lock
//!   that waits for every call in flight to finish; from then on it refuses
//!   (UNAVAILABLE, "moved") calls for inboxes it does not own in that view.
//!   Losing an inbox is therefore immediate.
//! - Then it publishes the view it applied under its own key in etcd (held
//!   by its lease). An inbox it gains — owned in the new view but not in the
//!   last view every member had applied — is served only once every other
//!   member of the new view has published that view: each of them has
//!   stopped serving it and drained its calls.
//! - Before publishing, it waits (at most [`PUSH_FLUSH`]) until what its
//!   drained calls pushed has reached the gateways: the new owner's pushes
//!   of an inbox then follow the old owner's on every gateway connection.
//! - A killed process serves nothing; its key and its membership go with its
//!   lease, and the survivors' views no longer count it. A process stopping
//!   gracefully first refuses everything, drains its calls and flushes its
//!   pushes ([`Ownership::leave`]), and only then gives its lease back.
//!
//! A refused call is retried by the caller's pool at the owner of its own
//! (possibly newer) member list, within its retry budget.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_discovery::{Members, Publisher};
use switchboard_mesh::{
    Delivery, GatewayTable, ServiceError, inbox_key, owner_among, pb, routing_keys,
};
use tokio::sync::{RwLock, watch};

/// The member lists of one process.
#[derive(Default)]
struct Views {
    /// The delivery instances as this process sees them now, sorted.
    current: Vec<String>,
    /// The last view every member of it had applied (`None` until the
    /// first one settles).
    settled: Option<Vec<String>>,
    /// The process is stopping: it serves nothing any more.
    leaving: bool,
}

impl Views {
    /// Whether this process may serve `inbox` now.
    fn serves(&self, me: &str, key: &[u8]) -> Result<(), String> {
        if self.leaving {
            return Err(format!("{me} is stopping"));
        }
        let owner = owner_among(&self.current, key).unwrap_or_default();
        if owner != me {
            return Err(format!("its delivery instance is {owner}"));
        }
        match &self.settled {
            Some(settled) if settled == &self.current => Ok(()),
            Some(settled) if owner_among(settled, key) == Some(me) => Ok(()),
            _ => Err(format!(
                "it is moving to {me}, which waits until every delivery instance has applied the new member list"
            )),
        }
    }
}

/// The inboxes this process serves; see the module documentation.
#[derive(Clone)]
pub(crate) struct Ownership {
    me: String,
    views: Arc<RwLock<Views>>,
    /// The push streams to flush before an inbox is given up.
    gateways: Arc<GatewayTable>,
}

/// Where processes publish the view they applied.
fn views_prefix(discovery_prefix: &str) -> String {
    format!("{discovery_prefix}delivery-views/")
}

/// A view as one string (published and compared).
fn fingerprint(view: &[String]) -> String {
    view.join(",")
}

/// How often a process that waits for the others reads their views.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// A settling wait this long is logged (once per view): the inboxes this
/// process gains are refused until it ends, and it ends only when etcd
/// answers and every member has published the view.
const SETTLE_SLOW: Duration = Duration::from_secs(5);

/// How long giving inboxes up waits for the pushes already made to reach
/// the gateways (a gateway that reads nothing must not hold a move up).
const PUSH_FLUSH: Duration = Duration::from_secs(1);

impl Ownership {
    /// Follows the member list (`tag`: the mesh secret's, as the pools
    /// trust members) and publishes each view applied.
    pub(crate) fn follow(
        me: String,
        tag: String,
        mut members: watch::Receiver<Arc<Members>>,
        publisher: Publisher,
        discovery_prefix: &str,
        gateways: Arc<GatewayTable>,
        on_settle: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        let ownership = Ownership {
            me,
            views: Arc::default(),
            gateways,
        };
        let prefix = views_prefix(discovery_prefix);
        let this = ownership.clone();
        tokio::spawn(async move {
            loop {
                let view = {
                    let current = members.borrow_and_update();
                    let mut ids: Vec<String> = current
                        .values()
                        .filter(|m| m.tag == tag && m.has_role("delivery"))
                        .map(|m| m.id.clone())
                        .collect();
                    ids.sort_unstable();
                    ids
                };
                if view != this.views.read().await.current {
                    this.apply(view, &publisher, &prefix, &mut members, on_settle.as_ref())
                        .await;
                }
                if members.changed().await.is_err() {
                    return;
                }
            }
        });
        ownership
    }

    /// Applies `view`: drains the calls in flight, refuses what is no
    /// longer ours, publishes the view and waits (until the member list
    /// changes again) for every other member to have applied it.
    async fn apply(
        &self,
        view: Vec<String>,
        publisher: &Publisher,
        prefix: &str,
        members: &mut watch::Receiver<Arc<Members>>,
        on_settle: &(dyn Fn() + Send + Sync),
    ) {
        {
            let mut views = self.views.write().await;
            if views.leaving {
                return;
            }
            views.current = view.clone();
        }
        // The calls drained above pushed what they stored: on the gateways
        // before the new owners (who wait for this view to be published)
        // push anything of those inboxes.
        self.flush_pushes().await;
        let mine = fingerprint(&view);
        tracing::info!(instances = %mine, "delivery member list applied");
        // From here the inboxes this process gains wait for the view to
        // settle (publishing it included).
        let waiting_since = tokio::time::Instant::now();
        let key = format!("{prefix}{}", self.me);
        loop {
            match publisher.publish(&key, &mine).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish the applied delivery member list");
                    tokio::time::sleep(SETTLE_POLL * 4).await;
                }
            }
            if members.has_changed().unwrap_or(true) {
                return;
            }
        }
        let mut told = false;
        loop {
            let read = publisher.read_prefix(prefix).await;
            let behind: Vec<&String> = match &read {
                Ok(published) => view
                    .iter()
                    .filter(|id| **id != self.me)
                    .filter(|id| {
                        let their_key = format!("{prefix}{id}");
                        !published.iter().any(|(k, v)| *k == their_key && *v == mine)
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            // The inboxes this process gains are refused until the view
            // settles: a wait this long is said once, with its cause.
            if !told && waiting_since.elapsed() >= SETTLE_SLOW {
                told = true;
                match &read {
                    Err(e) => tracing::warn!(
                        secs = SETTLE_SLOW.as_secs(),
                        error = %e,
                        "delivery member list not settled: cannot read the views the others applied from etcd; the inboxes moving here are refused meanwhile"
                    ),
                    Ok(_) => tracing::warn!(
                        secs = SETTLE_SLOW.as_secs(),
                        waiting_for = ?behind,
                        "delivery member list not settled: members have not published it yet; the inboxes moving here are refused meanwhile"
                    ),
                }
            }
            if read.is_ok() && behind.is_empty() {
                let mut views = self.views.write().await;
                if views.current == view {
                    // Under the write lock: no call in flight.
                    on_settle();
                    views.settled = Some(view);
                    if told {
                        tracing::info!(
                            after_ms = waiting_since.elapsed().as_millis() as u64,
                            "delivery member list settled after a slow wait"
                        );
                    } else {
                        tracing::info!("delivery member list settled");
                    }
                }
                return;
            }
            // A newer list supersedes this one: the caller applies it.
            if members.has_changed().unwrap_or(true) {
                return;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    async fn flush_pushes(&self) {
        if !self.gateways.flush_pushes(PUSH_FLUSH).await {
            tracing::warn!(
                within_ms = PUSH_FLUSH.as_millis() as u64,
                "pushes to a gateway still on their way when inboxes move"
            );
        }
    }

    /// Stops serving (every call is refused as "moved" from now on, after
    /// the calls in flight have finished) and waits for their pushes to
    /// reach the gateways; the caller then gives the lease back, and the
    /// other processes take the inboxes over.
    pub(crate) async fn leave(&self) {
        self.views.write().await.leaving = true;
        self.flush_pushes().await;
        tracing::info!("delivery stopped serving its inboxes");
    }

    /// Holds the view for the duration of a call when this process serves
    /// every inbox of `keys` ([`inbox_key`]); otherwise a "moved" answer.
    async fn admit(
        &self,
        keys: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, Views>, ServiceError> {
        let views = self.views.read().await;
        for key in keys {
            if let Err(why) = views.serves(&self.me, &key) {
                metrics::counter!("switchboard_delivery_moved_total").increment(1);
                let inbox = String::from_utf8_lossy(&key).replace('\0', "/");
                return Err(ServiceError::moved(format!("inbox {inbox}: {why}")));
            }
        }
        Ok(views)
    }
}

/// The delivery role behind the fence: every call is admitted by
/// [`Ownership`] and holds its view until it returns.
pub(crate) struct OwnedDelivery {
    pub(crate) inner: Arc<dyn Delivery>,
    pub(crate) ownership: Ownership,
}

#[async_trait]
impl Delivery for OwnedDelivery {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        // The copies of one client-id send come with their first copy's
        // owner, as callers route them (`routing_keys`).
        let _held = self.ownership.admit(routing_keys(&req.envelopes)).await?;
        self.inner.deliver(req).await
    }

    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        let _held = self
            .ownership
            .admit([inbox_key(&req.app_id, &req.user_id)])
            .await?;
        self.inner.fetch(req).await
    }

    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        let _held = self
            .ownership
            .admit(req.items.iter().map(|i| inbox_key(&i.app_id, &i.user_id)))
            .await?;
        self.inner.delivered(req).await
    }

    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        // A FAST notice to the app's master user: nothing stored, no order
        // to keep across instances.
        self.inner.presence_changed(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn an_inbox_is_served_by_its_owner_only_once_the_view_settles() {
        let old = ids(&["d1", "d2"]);
        let new = ids(&["d1", "d2", "d3"]);
        // An inbox that moves to d3 when d3 joins.
        let moving = (0..1000)
            .map(|i| inbox_key("app", &format!("user-{i}")))
            .find(|k| owner_among(&new, k) == Some("d3"))
            .expect("some inbox moves to d3");
        let staying = (0..1000)
            .map(|i| inbox_key("app", &format!("user-{i}")))
            .find(|k| owner_among(&new, k) == Some("d1") && owner_among(&old, k) == Some("d1"))
            .expect("some inbox stays at d1");
        let before = owner_among(&old, &moving).expect("an owner").to_owned();
        let views = Views {
            current: new.clone(),
            settled: Some(old.clone()),
            leaving: false,
        };
        assert!(views.serves("d3", &moving).is_err(), "d3 waits");
        assert!(
            views.serves(&before, &moving).is_err(),
            "no longer its old owner's"
        );
        assert!(
            views.serves("d1", &staying).is_ok(),
            "unmoved inboxes go on"
        );
        let mut settled = Views {
            current: new.clone(),
            settled: Some(new),
            leaving: false,
        };
        assert!(settled.serves("d3", &moving).is_ok());
        settled.leaving = true;
        assert!(
            settled.serves("d1", &staying).is_err(),
            "nothing once stopping"
        );
        assert!(
            Views::default().serves("d1", &staying).is_err(),
            "nothing before a view"
        );
    }
}
