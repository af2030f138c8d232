//! Federation: this domain linked with its neighbours.
//!
//! - **Where a recipient lives**: its home domain from the topology's
//!   distribution rules (a user no rule places, or of an app the topology
//!   does not name, is local).
//! - **Which way**: the shortest path over the links that are up
//!   ([`switchboard_topology::Network`]), avoiding every domain the
//!   envelope already passed through, so that no envelope loops even while
//!   two domains disagree about a link. Ties are broken by name, so every
//!   router agrees.
//! - **How**: RELIABLE envelopes go into the next hop's durable outbox (a
//!   [`Queue`] named `federation/<peer>`) before the sender hears they are
//!   accepted; a worker per link sends them in batches with retry and
//!   backoff, and re-routes what waits there when the routes change. FAST
//!   ones are sent at once, or dropped (counted) when no path is up.
//! - **Link state**: a link is down after [`DOWN_AFTER`] failed calls in a
//!   row (health checks included: an idle link is probed every
//!   [`PROBE_EVERY`]) and up after one success. Each domain publishes its
//!   links' state in etcd under its lease (`<prefix>links/<self>/<peer>`),
//!   and routes around links others see down; for its own links its own
//!   observation wins.
//! - **Inbound**: [`Federation::forward`] (the federation port) accepts
//!   envelopes from neighbours only, refuses loops and envelopes past their
//!   hop limit, delivers what is for here (de-duplicated by message id in
//!   the store's id index) and hands the rest on.

mod link;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use switchboard_discovery::Publisher;
use switchboard_mesh::{ErrorCode, ServiceError, pb};
use switchboard_metadata::TopologyView;
use switchboard_store::Queue;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::local::Local;
use link::Link;
pub use routes::RouteTable;

/// Failed calls in a row after which a link is down.
pub const DOWN_AFTER: u32 = 2;
/// An idle link (nothing sent for this long) is probed with an empty call.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Most envelopes in one `Forward` call.
pub const MAX_FORWARD_BATCH: usize = 1_000;
/// How often the link states other domains publish are read from etcd.
pub const READ_STATES_EVERY: Duration = Duration::from_millis(300);

/// Settings of this domain's federation.
#[derive(Clone)]
pub struct FederationOptions {
    pub domain: String,
    /// The etcd prefix the domains share (link states under `links/`).
    pub prefix: String,
    /// The credential of links without their own.
    pub secret: String,
    /// Per-neighbour credentials.
    pub peers: BTreeMap<String, String>,
    /// Domains an envelope may pass through.
    pub hop_limit: u32,
    /// Mutual TLS on calls to neighbours: each neighbour's certificate must
    /// name its domain.
    pub tls: Option<switchboard_mesh::MeshTls>,
}

/// Where part of an envelope goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Target {
    /// Recipients of this domain.
    Local,
    /// The neighbour on the path to the recipients' home domain.
    Peer(String),
    /// No path now, not even over links that are down: refused.
    Nowhere,
}

/// The federation of this domain.
pub struct Federation {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) options: FederationOptions,
    pub(crate) local: Local,
    pub(crate) queues: Arc<dyn Queue>,
    pub(crate) discovery: Option<Publisher>,
    /// The routes in force; replaced whole when the topology or a link
    /// state changes (its version wakes the link workers).
    pub(crate) routes: watch::Sender<Arc<RouteTable>>,
    pub(crate) links: Mutex<HashMap<String, Arc<Link>>>,
    /// Held while routes are computed and replaced: a slower computation
    /// never overwrites a newer one (each reads the state afresh inside).
    pub(crate) recomputing: Mutex<()>,
    /// The topology in force (what the routes are computed from).
    pub(crate) topology: Mutex<Option<Arc<switchboard_metadata::CurrentTopology>>>,
    /// Down links as other domains publish them: (reporter, peer).
    pub(crate) reported_down: Mutex<Vec<(String, String)>>,
    pub(crate) stop: CancellationToken,
}

impl Federation {
    /// Starts following the topology and link states and the outbox
    /// workers (one per neighbour, and one per outbox left from before).
    pub async fn start(
        options: FederationOptions,
        topology: TopologyView,
        local: Local,
        queues: Arc<dyn Queue>,
        discovery: Option<Publisher>,
    ) -> Result<Arc<Federation>, ServiceError> {
        let table = RouteTable::new(
            &options.domain,
            topology.borrow().clone(),
            Vec::new(),
            &HashMap::new(),
        );
        let inner = Arc::new(Inner {
            options,
            local,
            queues,
            discovery,
            routes: watch::channel(Arc::new(table)).0,
            links: Mutex::new(HashMap::new()),
            recomputing: Mutex::new(()),
            topology: Mutex::new(topology.borrow().clone()),
            reported_down: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        });
        // Outboxes with items from before a restart get their workers even
        // if their peer is no neighbour any more (their items re-route).
        let left = inner
            .queues
            .list()
            .await
            .map_err(|e| ServiceError::new(ErrorCode::Unavailable, e.to_string()))?;
        for q in left {
            if let Some(peer) = q.name.strip_prefix(link::QUEUE_PREFIX)
                && q.depth > 0
            {
                tracing::info!(
                    peer,
                    depth = q.depth,
                    "federation outbox holds envelopes from before; sending"
                );
                inner.link(peer);
            }
        }
        inner.recompute();
        tokio::spawn(follow_topology(inner.clone(), topology));
        tokio::spawn(read_link_states(inner.clone()));
        Ok(Arc::new(Federation { inner }))
    }

    /// The routes in force.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.inner.routes.borrow().clone()
    }

    /// Whether `user_id` of `app_id` lives in another domain.
    pub fn is_remote(&self, app_id: &str, user_id: &str) -> bool {
        self.routes().home(app_id, user_id).is_some()
    }

    /// Whether a topology naming this domain is in force (routes exist).
    pub fn is_ready(&self) -> bool {
        self.routes().names_me()
    }

    /// Routes an envelope from a sender of this domain: the local part here,
    /// the rest to next hops. Returns (local recipients, whether the local
    /// part was a repeat) — `None` when nothing was for here.
    pub(crate) async fn route(
        &self,
        mut envelope: pb::Envelope,
    ) -> Result<crate::LocalRouted, ServiceError> {
        // The hop limit is this domain's setting where a message enters
        // the federation.
        envelope.hop_limit = self.inner.options.hop_limit;
        // Nothing to split for a message whose recipients all live here
        // (the common case: no copy of the envelope).
        let routes = self.routes();
        if envelope
            .to
            .iter()
            .all(|to| routes.home(&envelope.app_id, to).is_none())
        {
            return self.inner.local.route(envelope).await;
        }
        let parts = self.inner.split(envelope.clone(), &[]);
        // Every part has a way before any is delivered: no recipient gets a
        // message its sender is told failed.
        if parts.iter().any(|(t, _)| *t == Target::Nowhere) {
            return Err(ServiceError::new(
                ErrorCode::Unavailable,
                "no route to the recipient's home domain",
            ));
        }
        let mut recipients = 0u32;
        let mut repeat = false;
        let mut inbox_full = Vec::new();
        let mut remote = Vec::new();
        for (target, part) in parts {
            match target {
                Target::Local => {
                    let mut part = part;
                    // The sender's copy is made once, below, for the whole message.
                    part.origin = None;
                    let routed = self.inner.local.route(part).await?;
                    recipients += routed.recipients;
                    repeat |= routed.repeated;
                    inbox_full.extend(routed.inbox_full);
                }
                Target::Peer(peer) => {
                    recipients += part.to.len() as u32;
                    remote.push((peer, part));
                }
                Target::Nowhere => {
                    return Err(ServiceError::new(
                        ErrorCode::Unavailable,
                        "no route to the recipient's home domain",
                    ));
                }
            }
        }
        self.inner.send(remote).await?;
        if envelope.origin.is_some() && !repeat {
            self.inner.local.sent_copies(vec![envelope]).await?;
        }
        Ok(crate::LocalRouted {
            recipients,
            repeated: repeat,
            inbox_full,
        })
    }

    /// Direct messages of one connection, in order: local ones in one
    /// delivery call, the others into their outboxes. Repeats by position.
    pub(crate) async fn route_batch(
        &self,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<crate::BatchRouted, ServiceError> {
        let routes = self.routes();
        if envelopes
            .iter()
            .all(|e| e.to.len() == 1 && routes.home(&e.app_id, &e.to[0]).is_none())
        {
            return self.inner.local.deliver_batch(envelopes).await;
        }
        let n = envelopes.len();
        let mut local = Vec::new();
        let mut local_at = Vec::new();
        let mut remote = Vec::new();
        let mut copies = Vec::new();
        for (i, mut e) in envelopes.into_iter().enumerate() {
            e.hop_limit = self.inner.options.hop_limit;
            let mut parts = self.inner.split(e.clone(), &[]);
            match parts.pop() {
                Some((Target::Local, part)) if parts.is_empty() => {
                    local.push(part);
                    local_at.push(i);
                }
                Some((Target::Peer(peer), part)) if parts.is_empty() => {
                    if e.origin.is_some() {
                        copies.push(e);
                    }
                    remote.push((peer, part));
                }
                _ => {
                    return Err(ServiceError::new(
                        ErrorCode::Unavailable,
                        "no route to the recipient's home domain",
                    ));
                }
            }
        }
        let mut repeated = vec![false; n];
        let mut inbox_full = vec![false; n];
        let delivered = self.inner.local.deliver_batch(local).await?;
        for (k, at) in local_at.into_iter().enumerate() {
            repeated[at] = delivered.repeated.get(k).copied().unwrap_or(false);
            inbox_full[at] = delivered.inbox_full.get(k).copied().unwrap_or(false);
        }
        self.inner.send(remote).await?;
        self.inner.local.sent_copies(copies).await?;
        Ok(crate::BatchRouted {
            repeated,
            inbox_full,
        })
    }

    /// Hands messages this domain created (sender confirmations) toward
    /// their recipients' home domains; durable when it returns.
    pub async fn forward_from_here(
        &self,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<(), ServiceError> {
        let mut remote = Vec::new();
        for mut e in envelopes {
            if e.hop_limit == 0 {
                e.hop_limit = self.inner.options.hop_limit;
            }
            for (target, part) in self.inner.split(e, &[]) {
                match target {
                    Target::Peer(peer) => remote.push((peer, part)),
                    Target::Local => {
                        self.inner.local.route(part).await?;
                    }
                    Target::Nowhere => {
                        return Err(ServiceError::new(
                            ErrorCode::Unavailable,
                            "no route to the recipient's home domain",
                        ));
                    }
                }
            }
        }
        self.inner.send(remote).await
    }

    /// Stops the link workers (what is in the outboxes stays there).
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl Inner {
    /// The link to `peer`, its worker started on first use.
    pub(crate) fn link(self: &Arc<Self>, peer: &str) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = links.get(peer) {
            return l.clone();
        }
        let l = Arc::new(Link::new(peer, &self.options));
        links.insert(peer.to_owned(), l.clone());
        tokio::spawn(link::run(self.clone(), l.clone()));
        l
    }

    /// Splits an envelope by where its recipients go, given the domains it
    /// passed through (`visited`, this one excluded). Direct messages and
    /// confirmations have one part; an ad-hoc group one part per next hop.
    fn split(&self, envelope: pb::Envelope, visited: &[String]) -> Vec<(Target, pb::Envelope)> {
        let routes = self.routes.borrow().clone();
        // Presence events stay in their domain: the master user's
        // presence is per domain. A persistent group's message goes to the
        // groups role of the domain that holds the group (its copies for
        // members elsewhere, one recipient each, are routed like any).
        if matches!(
            envelope.kind(),
            pb::MessageKind::UserConnected | pb::MessageKind::UserDisconnected
        ) || (!envelope.group.is_empty() && envelope.to.is_empty())
        {
            return vec![(Target::Local, envelope)];
        }
        let targets: Vec<Target> = envelope
            .to
            .iter()
            .map(|to| routes.target(&envelope.app_id, to, visited))
            .collect();
        if targets.iter().all(|t| *t == targets[0]) {
            let t = targets.into_iter().next().unwrap_or(Target::Local);
            return vec![(t, envelope)];
        }
        let mut by: BTreeMap<Target, Vec<String>> = BTreeMap::new();
        let mut rest = envelope;
        for (to, t) in std::mem::take(&mut rest.to).into_iter().zip(targets) {
            by.entry(t).or_default().push(to);
        }
        by.into_iter()
            .map(|(t, to)| {
                let mut part = rest.clone();
                part.to = to;
                (t, part)
            })
            .collect()
    }

    /// Hands envelopes to their next hops: RELIABLE ones into the outboxes
    /// (durable when this returns), FAST ones sent now or dropped.
    pub(crate) async fn send(
        self: &Arc<Self>,
        parts: Vec<(String, pb::Envelope)>,
    ) -> Result<(), ServiceError> {
        let mut outboxes: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut fast: BTreeMap<String, Vec<pb::Envelope>> = BTreeMap::new();
        for (peer, mut e) in parts {
            if e.hops.last().is_none_or(|h| *h != self.options.domain) {
                e.hops.push(self.options.domain.clone());
            }
            // Set once, where the message enters the federation; a
            // forwarding domain has set it to its receive span already.
            if e.traceparent.is_empty()
                && let Some(tp) = switchboard_telemetry::current_traceparent()
            {
                e.traceparent = tp;
            }
            if e.feature() == pb::Feature::Fast {
                fast.entry(peer).or_default().push(e);
            } else {
                outboxes.entry(peer).or_default().push(e.encode_to_vec());
            }
        }
        for (peer, payloads) in outboxes {
            let link = self.link(&peer);
            let n = payloads.len();
            self.queues
                .enqueue(&link.queue, payloads)
                .await
                .map_err(|e| {
                    ServiceError::new(ErrorCode::Unavailable, format!("federation outbox: {e}"))
                })?;
            link.enqueued(n);
        }
        for (peer, envelopes) in fast {
            let link = self.link(&peer);
            link.send_fast(self, envelopes);
        }
        Ok(())
    }

    /// Recomputes the routes from the topology and every link state, all
    /// read afresh under one lock.
    pub(crate) fn recompute(&self) {
        let _one = self
            .recomputing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let topology = self
            .topology
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let reported = self
            .reported_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let own: HashMap<String, bool> = self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(peer, l)| (peer.clone(), l.is_up()))
            .collect();
        let table = RouteTable::new(&self.options.domain, topology, reported, &own);
        let changed = {
            let current = self.routes.borrow();
            current.next_hops() != table.next_hops() || current.topology_differs(&table)
        };
        if changed {
            tracing::info!(routes = %table.describe(), "federation routes");
        }
        self.routes.send_replace(Arc::new(table));
    }

    /// Publishes this domain's observation of `link` in etcd. Writes of
    /// one link take turns and each writes the state as it is when its
    /// turn comes, so the last write is the latest state.
    pub(crate) fn publish_state(self: &Arc<Self>, link: &Arc<Link>) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        let key = format!(
            "{}links/{}/{}",
            self.options.prefix, self.options.domain, link.peer
        );
        let (discovery, link) = (discovery.clone(), link.clone());
        tokio::spawn(async move {
            let _turn = link.publishing.lock().await;
            let value = serde_json::json!({
                "up": link.is_up(),
                "since_ms": switchboard_mesh::now_ms(),
            })
            .to_string();
            if let Err(e) = discovery.publish(&key, &value).await {
                tracing::warn!(error = %e, %key, "cannot publish a federation link state in etcd");
            }
        });
    }
}

/// Applies every topology change: new routes, workers for new neighbours.
async fn follow_topology(inner: Arc<Inner>, mut topology: TopologyView) {
    loop {
        let current = topology.borrow_and_update().clone();
        if let Some(t) = &current {
            let me = &inner.options.domain;
            if t.network.domain(me).is_none() {
                tracing::error!(domain = %me, "this domain is not in the federation topology: nothing is forwarded");
            }
            for (a, b, _) in t.network.links() {
                if a == me {
                    inner.link(b);
                } else if b == me {
                    inner.link(a);
                }
            }
        }
        *inner
            .topology
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = current;
        inner.recompute();
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            changed = topology.changed() => if changed.is_err() { return },
        }
    }
}

/// Reads the link states every domain publishes, and routes around the
/// links others see down.
async fn read_link_states(inner: Arc<Inner>) {
    let Some(discovery) = inner.discovery.clone() else {
        return;
    };
    let prefix = format!("{}links/", inner.options.prefix);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(READ_STATES_EVERY) => {}
        }
        match discovery.read_prefix(&prefix).await {
            Ok(kvs) => {
                failing = false;
                let mut down: Vec<(String, String)> = kvs
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let rest = k.strip_prefix(&prefix)?;
                        let (reporter, peer) = rest.split_once('/')?;
                        let up = serde_json::from_str::<serde_json::Value>(&v)
                            .ok()?
                            .get("up")?
                            .as_bool()?;
                        (!up).then(|| (reporter.to_owned(), peer.to_owned()))
                    })
                    .collect();
                down.sort();
                let changed = {
                    let mut current = inner
                        .reported_down
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    let changed = *current != down;
                    *current = down;
                    changed
                };
                if changed {
                    inner.recompute();
                }
            }
            Err(e) => {
                // Keep the last states: an etcd outage changes no route.
                if !failing {
                    tracing::warn!(error = %e, "cannot read federation link states; keeping the last");
                    failing = true;
                }
            }
        }
    }
}

#[async_trait]
impl switchboard_mesh::Federation for Federation {
    async fn forward(
        &self,
        from_domain: &str,
        req: pb::ForwardRequest,
    ) -> Result<pb::ForwardReply, ServiceError> {
        let inner = &self.inner;
        let me = inner.options.domain.as_str();
        let routes = self.routes();
        if !routes.is_neighbour(from_domain) {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                format!("{from_domain} is not linked to {me} in the topology"),
            ));
        }
        if req.envelopes.len() > MAX_FORWARD_BATCH {
            return Err(ServiceError::invalid(format!(
                "at most {MAX_FORWARD_BATCH} envelopes per call, not {}",
                req.envelopes.len()
            )));
        }
        metrics::counter!("switchboard_federation_received_total", "peer" => from_domain.to_owned())
            .increment(req.envelopes.len() as u64);
        let network = routes.topology.as_ref().map(|t| &t.network);
        let mut outcomes = Vec::with_capacity(req.envelopes.len());
        // Direct ones for here go in one delivery call; the positions.
        let mut local = Vec::new();
        let mut onward = Vec::new();
        // Each envelope's receive span, by position: the work done for it
        // below continues its own trace.
        let mut spans = Vec::with_capacity(req.envelopes.len());
        for mut e in req.envelopes {
            let refused = |e: &pb::Envelope, reason: &str| {
                metrics::counter!("switchboard_federation_dropped_total", "reason" => reason.to_owned()).increment(1);
                tracing::warn!(id = %e.id, from = from_domain, hops = ?e.hops, reason, "forwarded envelope refused");
                pb::ForwardOutcome {
                    accepted: false,
                    reason: reason.to_owned(),
                }
            };
            if e.hops.iter().any(|h| h == me) {
                outcomes.push(refused(&e, "loop: the envelope passed this domain before"));
                spans.push(tracing::Span::none());
                continue;
            }
            if e.hops.last().map(String::as_str) != Some(from_domain) {
                outcomes.push(refused(
                    &e,
                    "the hop list does not end with the calling domain",
                ));
                spans.push(tracing::Span::none());
                continue;
            }
            // Every hop a domain of the topology; no sender raises the
            // limit above this domain's own.
            if e.hops
                .iter()
                .any(|h| network.is_none_or(|n| n.domain(h).is_none()))
            {
                outcomes.push(refused(&e, "a hop is not a domain of the topology"));
                spans.push(tracing::Span::none());
                continue;
            }
            e.hop_limit = e.hop_limit.min(inner.options.hop_limit);
            if e.hops.len() as u32 >= e.hop_limit.max(1) {
                outcomes.push(refused(&e, "hop limit reached"));
                spans.push(tracing::Span::none());
                continue;
            }
            // Only the apps of the topology cross domains, and a sender is
            // a user of the domain the envelope started in: a neighbour
            // cannot write into this domain's own apps or speak for
            // users of other domains.
            let Some(network) = network.filter(|n| n.domain(me).is_some()) else {
                outcomes.push(refused(&e, "this domain is not in the federation topology"));
                spans.push(tracing::Span::none());
                continue;
            };
            let sender_home = network.home_domain(&e.app_id, &e.from);
            if sender_home.is_none() {
                outcomes.push(refused(
                    &e,
                    "the app or the sender is not placed by the federation topology",
                ));
                spans.push(tracing::Span::none());
                continue;
            }
            if sender_home != e.hops.first().map(String::as_str) {
                outcomes.push(refused(
                    &e,
                    "the sender is not a user of the domain the envelope started in",
                ));
                spans.push(tracing::Span::none());
                continue;
            }
            let span = tracing::info_span!(
                "federation.receive",
                message.id = %e.id,
                from_domain,
                domain = me,
                hops = e.hops.len()
            );
            if !e.traceparent.is_empty() {
                switchboard_telemetry::continue_traceparent(&span, &e.traceparent);
            }
            let entered = span.enter();
            let visited: Vec<String> = e.hops.clone();
            e.hops.push(me.to_owned());
            // Not this domain's connections: no MESSAGE_SENT copies here.
            e.origin = None;
            // Every domain de-duplicates by message id: a retried batch
            // stores nothing twice.
            // Undelivered notices excepted: one carries the id of the
            // message it is about, under the refused recipient's name,
            // which that user's own messages or a later confirmation of
            // the same message would be taken as repeats of.
            e.client_id = e.kind() != pb::MessageKind::Undelivered;
            if let Some(tp) = switchboard_telemetry::current_traceparent() {
                e.traceparent = tp;
            }
            let at = outcomes.len();
            outcomes.push(pb::ForwardOutcome {
                accepted: true,
                reason: String::new(),
            });
            drop(entered);
            spans.push(span.clone());
            for (target, part) in inner.split(e, &visited) {
                match target {
                    Target::Local => local.push((at, part)),
                    Target::Peer(peer) => onward.push((peer, part)),
                    Target::Nowhere => {
                        outcomes[at] = refused(&part, "no route to the recipient's home domain");
                    }
                }
            }
        }
        // Durable here before the caller acks: a failure fails the call and
        // the caller retries the whole batch (dedup by id).
        // Ad-hoc group messages are fanned out here; a persistent group's
        // copies (one recipient each, the group held elsewhere) are
        // delivered like direct ones.
        // Notices to the senders of messages refused here for good.
        let mut undelivered = Vec::new();
        let (groups, direct): (Vec<_>, Vec<_>) = local
            .into_iter()
            .partition(|(_, e)| e.kind() == pb::MessageKind::Group && e.group.is_empty());
        if let Some(&(first, _)) = direct.first() {
            // One delivery call for them all; its spans join the first
            // one's trace (one envelope per call at moderate rates).
            let span = spans
                .get(first)
                .cloned()
                .unwrap_or_else(tracing::Span::none);
            // What a refusal is told with (the envelopes move); only for
            // those a notice can be about.
            let heads: Vec<(usize, Option<pb::Envelope>)> = direct
                .iter()
                .map(|(at, e)| (*at, noticeable(e).then(|| head_of(e))))
                .collect();
            let routed = tracing::Instrument::instrument(
                inner
                    .local
                    .deliver_batch(direct.into_iter().map(|(_, e)| e).collect()),
                span,
            )
            .await?;
            // Not stored: the outcome says so, so that the sending domain
            // logs and counts the loss instead of taking it for delivered,
            // and the sender is told.
            for (k, (at, head)) in heads.into_iter().enumerate() {
                if routed.inbox_full.get(k).copied().unwrap_or(false) {
                    metrics::counter!("switchboard_federation_dropped_total", "reason" => INBOX_FULL_REASON)
                        .increment(1);
                    tracing::warn!(id = ?head.as_ref().map(|h| &h.id), from = from_domain, reason = INBOX_FULL_REASON, "forwarded envelope refused");
                    outcomes[at] = pb::ForwardOutcome {
                        accepted: false,
                        reason: INBOX_FULL_REASON.to_owned(),
                    };
                    if let Some(head) = head {
                        let to = head.to.clone();
                        undelivered.extend(undelivered_notice(&head, to, ErrorCode::InboxFull));
                    }
                }
            }
        }
        for (at, e) in groups {
            let span = spans.get(at).cloned().unwrap_or_else(tracing::Span::none);
            let head = head_of(&e);
            let routed = tracing::Instrument::instrument(inner.local.route(e), span).await?;
            if !routed.inbox_full.is_empty() {
                // Stored for the others; a Forward outcome has no room for
                // a partial refusal: logged, counted and told to the sender.
                metrics::counter!("switchboard_federation_dropped_total", "reason" => INBOX_FULL_REASON)
                    .increment(routed.inbox_full.len() as u64);
                tracing::warn!(id = %head.id, from = from_domain, full = routed.inbox_full.len(), "forwarded group message not stored for recipients whose inbox is full");
                undelivered.extend(undelivered_notice(
                    &head,
                    routed.inbox_full,
                    ErrorCode::InboxFull,
                ));
            }
        }
        inner.send(onward).await?;
        // Toward the senders' home domains through the outboxes, each on
        // its own (one without a route does not take the others with
        // it). A notice that cannot be queued does not fail the messages
        // that were stored. If the caller retries this batch, a notice
        // is queued again: notices are not de-duplicated (see the
        // `client_id` above), so its sender may see it twice.
        for notice in undelivered {
            let id = notice.id.clone();
            match self.forward_from_here(vec![notice]).await {
                Ok(()) => {
                    metrics::counter!("switchboard_federation_undelivered_notices_total")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("switchboard_federation_dropped_total", "reason" => "undelivered notice: cannot queue")
                        .increment(1);
                    tracing::warn!(%id, error = %e, "cannot queue the notice of a refused message for its sender");
                }
            }
        }
        Ok(pb::ForwardReply { outcomes })
    }
}

/// The `Forward` outcome's reason for a message refused for a full inbox.
const INBOX_FULL_REASON: &str = "INBOX_FULL: the recipient's inbox is full";

/// Whether a refused message is told to its sender: RELIABLE direct and
/// group messages (FAST ones are never stored, so never refused for a full
/// inbox; a notice about a notice, or a confirmation, would never end).
fn noticeable(e: &pb::Envelope) -> bool {
    e.feature() == pb::Feature::Reliable
        && matches!(e.kind(), pb::MessageKind::Direct | pb::MessageKind::Group)
}

/// What an undelivered notice needs of a message: all but its content.
fn head_of(e: &pb::Envelope) -> pb::Envelope {
    pb::Envelope {
        id: e.id.clone(),
        app_id: e.app_id.clone(),
        from: e.from.clone(),
        to: e.to.clone(),
        group: e.group.clone(),
        reference: e.reference.clone(),
        kind: e.kind,
        feature: e.feature,
        ..Default::default()
    }
}

/// The notice to a message's sender that it was not stored for
/// `recipients` (users of this domain), for good: RELIABLE, routed to the
/// sender's home domain like a confirmation, shown there as an `ERROR`
/// with the message's id and reference. None for what is not a direct or
/// group message (a notice about a notice would never end).
fn undelivered_notice(
    message: &pb::Envelope,
    recipients: Vec<String>,
    code: ErrorCode,
) -> Option<pb::Envelope> {
    if !noticeable(message) {
        return None;
    }
    let from = recipients.first()?.clone();
    let content = serde_json::json!({ "code": code.as_str(), "recipients": recipients });
    Some(pb::Envelope {
        id: message.id.clone(),
        app_id: message.app_id.clone(),
        from,
        to: vec![message.from.clone()],
        group: message.group.clone(),
        content: content.to_string(),
        reference: message.reference.clone(),
        feature: pb::Feature::Reliable.into(),
        kind: pb::MessageKind::Undelivered.into(),
        ts: switchboard_mesh::now_ms(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
