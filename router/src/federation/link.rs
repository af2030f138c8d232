//! One link to a neighbouring domain: its outbox worker, its state and its
//! client.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prost::Message;
use switchboard_mesh::{FederationCredentials, pb};
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::{DOWN_AFTER, FederationOptions, Inner, PROBE_EVERY, Target};

/// Outbox queue names: `federation/<peer>`.
pub(crate) const QUEUE_PREFIX: &str = "federation/";
/// Envelopes per call.
const BATCH: usize = 256;
/// Items taken are leased this long: after a failed move they come back.
const LEASE: Duration = Duration::from_secs(30);
/// One call to a neighbour may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

type Client =
    pb::federation_client::FederationClient<InterceptedService<Channel, FederationCredentials>>;

pub(crate) struct Link {
    pub(crate) peer: String,
    pub(crate) queue: String,
    credentials: Option<FederationCredentials>,
    /// (federation URL, client on it): rebuilt when the URL changes.
    client: Mutex<Option<(String, Client)>>,
    up: AtomicBool,
    /// Whether any call result was seen (the state is published from then).
    observed: AtomicBool,
    failures: AtomicU32,
    wake: Notify,
    /// Writes of this link's state to etcd take turns.
    pub(crate) publishing: tokio::sync::Mutex<()>,
    /// FAST calls in flight; past [`MAX_FAST_IN_FLIGHT`] FAST envelopes are
    /// dropped (counted) rather than piling up toward a slow neighbour.
    fast_in_flight: AtomicUsize,
}

/// FAST calls one link may have in flight.
const MAX_FAST_IN_FLIGHT: usize = 64;

impl Link {
    pub(crate) fn new(peer: &str, options: &FederationOptions) -> Self {
        let secret = options.peers.get(peer).unwrap_or(&options.secret);
        let credentials = match FederationCredentials::new(&options.domain, secret) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(peer, error = %e, "invalid federation credential: this link cannot send");
                None
            }
        };
        metrics::gauge!("switchboard_federation_link_up", "peer" => peer.to_owned()).set(1.0);
        Link {
            peer: peer.to_owned(),
            queue: format!("{QUEUE_PREFIX}{peer}"),
            credentials,
            client: Mutex::new(None),
            up: AtomicBool::new(true),
            observed: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            wake: Notify::new(),
            publishing: tokio::sync::Mutex::new(()),
            fast_in_flight: AtomicUsize::new(0),
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// New items are in the outbox.
    pub(crate) fn enqueued(&self, n: usize) {
        metrics::gauge!("switchboard_federation_outbox_depth", "peer" => self.peer.clone())
            .increment(n as f64);
        self.wake.notify_one();
    }

    fn client(&self, inner: &Inner) -> Result<Client, String> {
        let url = {
            let routes = inner.routes.borrow();
            let topology = routes
                .topology
                .as_ref()
                .ok_or_else(|| "no topology".to_owned())?;
            if !routes.is_neighbour(&self.peer) {
                return Err(format!("{} is not a neighbour in the topology", self.peer));
            }
            topology
                .network
                .domain(&self.peer)
                .map(|d| d.federation.clone())
                .ok_or_else(|| format!("{} is not in the topology", self.peer))?
        };
        let mut slot = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, client)) = slot.as_ref()
            && *at == url
        {
            return Ok(client.clone());
        }
        let credentials = self
            .credentials
            .clone()
            .ok_or_else(|| "invalid credential".to_owned())?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("bad federation URL {url:?}: {e}"))?;
        if let Some(tls) = &inner.options.tls {
            // The neighbour's certificate must name its domain.
            endpoint = endpoint
                .tls_config(tls.client_config(&self.peer))
                .map_err(|e| format!("federation TLS for {}: {e}", self.peer))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(3))
            .connect_lazy();
        let client =
            pb::federation_client::FederationClient::with_interceptor(channel, credentials)
                .max_decoding_message_size(switchboard_mesh::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(switchboard_mesh::MAX_MESSAGE_BYTES);
        *slot = Some((url, client.clone()));
        Ok(client)
    }

    /// One Forward call with these envelopes (none: a health check).
    async fn call(
        &self,
        inner: &Inner,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<pb::ForwardReply, String> {
        let mut client = self.client(inner)?;
        let req = pb::ForwardRequest {
            from_domain: inner.options.domain.clone(),
            envelopes,
        };
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, client.forward(req)).await;
        let outcome = match result {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        metrics::histogram!(
            "switchboard_federation_forward_seconds",
            "peer" => self.peer.clone(),
            "status" => if outcome.is_ok() { "ok" } else { "error" }
        )
        .record(started.elapsed().as_secs_f64());
        outcome
    }

    fn succeeded(self: &Arc<Self>, inner: &Arc<Inner>) {
        self.failures.store(0, Ordering::Relaxed);
        let first = !self.observed.swap(true, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %self.peer, "federation link up");
            metrics::gauge!("switchboard_federation_link_up", "peer" => self.peer.clone()).set(1.0);
            inner.recompute();
            inner.publish_state(self);
        } else if first {
            inner.publish_state(self);
        }
    }

    fn failed(self: &Arc<Self>, inner: &Arc<Inner>, error: &str) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.observed.store(true, Ordering::Relaxed);
        if failures >= DOWN_AFTER && self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(peer = %self.peer, error, "federation link down");
            metrics::gauge!("switchboard_federation_link_up", "peer" => self.peer.clone()).set(0.0);
            inner.recompute();
            inner.publish_state(self);
        } else {
            tracing::debug!(peer = %self.peer, error, failures, "federation call failed");
        }
    }

    /// FAST envelopes: sent now when the link is up, else dropped (counted).
    pub(crate) fn send_fast(self: &Arc<Self>, inner: &Arc<Inner>, envelopes: Vec<pb::Envelope>) {
        if !self.is_up() {
            metrics::counter!("switchboard_federation_dropped_total", "reason" => "fast: no path up")
                .increment(envelopes.len() as u64);
            return;
        }
        if self.fast_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_FAST_IN_FLIGHT {
            self.fast_in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("switchboard_federation_dropped_total", "reason" => "fast: link busy")
                .increment(envelopes.len() as u64);
            return;
        }
        let (link, inner) = (self.clone(), inner.clone());
        tokio::spawn(async move {
            let n = envelopes.len() as u64;
            let result = link.call(&inner, envelopes).await;
            link.fast_in_flight.fetch_sub(1, Ordering::AcqRel);
            match result {
                Ok(_) => {
                    metrics::counter!("switchboard_federation_forwarded_total", "peer" => link.peer.clone()).increment(n);
                    link.succeeded(&inner);
                }
                Err(e) => {
                    metrics::counter!("switchboard_federation_dropped_total", "reason" => "fast: call failed")
                        .increment(n);
                    link.failed(&inner, &e);
                }
            }
        });
    }

    async fn refresh_depth(&self, inner: &Inner) {
        if let Ok(depth) = inner.queues.depth(&self.queue).await {
            metrics::gauge!("switchboard_federation_outbox_depth", "peer" => self.peer.clone())
                .set(depth as f64);
        }
    }
}

/// The outbox worker of one link: takes batches, re-routes what no longer
/// goes this way, sends the rest with retry and backoff, acks what the
/// neighbour accepted (or refused for good).
pub(crate) async fn run(inner: Arc<Inner>, link: Arc<Link>) {
    let mut routes = inner.routes.subscribe();
    let mut batch: Vec<(u64, pb::Envelope)> = Vec::new();
    let mut backoff = BACKOFF_MIN;
    let mut last_call = Instant::now() - PROBE_EVERY;
    link.refresh_depth(&inner).await;
    loop {
        if inner.stop.is_cancelled() {
            return;
        }
        if batch.is_empty() {
            match inner.queues.take(&link.queue, BATCH, LEASE).await {
                Ok(items) => {
                    let mut damaged = Vec::new();
                    for item in items {
                        match pb::Envelope::decode(item.payload.as_slice()) {
                            Ok(e) => batch.push((item.id, e)),
                            Err(e) => {
                                tracing::error!(queue = %link.queue, id = item.id, error = %e, "damaged outbox item: it cannot be sent and is removed");
                                metrics::counter!("switchboard_federation_dropped_total", "reason" => "damaged outbox item").increment(1);
                                damaged.push(item.id);
                            }
                        }
                    }
                    if !damaged.is_empty() {
                        let _ = inner.queues.ack(&link.queue, &damaged).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %link.queue, error = %e, "cannot read a federation outbox");
                    wait(&inner, &link, &mut routes, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if batch.is_empty() {
            // Idle: probe the link now and then, so that its state is known
            // before traffic needs it.
            if last_call.elapsed() >= PROBE_EVERY && inner.routes.borrow().is_neighbour(&link.peer)
            {
                last_call = Instant::now();
                match link.call(&inner, Vec::new()).await {
                    Ok(_) => link.succeeded(&inner),
                    Err(e) => link.failed(&inner, &e),
                }
            }
            wait(&inner, &link, &mut routes, PROBE_EVERY).await;
            continue;
        }
        // Without a topology that names this domain nothing can be
        // routed: everything waits (never delivered here by mistake).
        let table = inner.routes.borrow().clone();
        if !table.names_me() {
            wait(&inner, &link, &mut routes, PROBE_EVERY).await;
            continue;
        }
        // What no longer goes this way goes its new way.
        let mut stay = Vec::with_capacity(batch.len());
        let mut moved_ids = Vec::new();
        let mut moves: Vec<(String, pb::Envelope)> = Vec::new();
        let mut local: Vec<pb::Envelope> = Vec::new();
        for (id, e) in batch.drain(..) {
            let visited: Vec<String> = e
                .hops
                .iter()
                .filter(|h| **h != inner.options.domain)
                .cloned()
                .collect();
            let all_here = e
                .to
                .iter()
                .all(|to| table.target(&e.app_id, to, &visited) == Target::Peer(link.peer.clone()));
            if all_here {
                stay.push((id, e));
                continue;
            }
            moved_ids.push(id);
            for (target, mut part) in inner.split(e, &visited) {
                match target {
                    Target::Peer(peer) => moves.push((peer, part)),
                    Target::Local => {
                        part.origin = None;
                        part.client_id = true;
                        local.push(part);
                    }
                    Target::Nowhere => {
                        tracing::error!(id = %part.id, hops = ?part.hops, "no route left to the recipient's home domain: envelope dropped");
                        metrics::counter!("switchboard_federation_dropped_total", "reason" => "no route").increment(1);
                    }
                }
            }
        }
        if !moved_ids.is_empty() {
            let mut ok = inner.send(moves).await.is_ok();
            for e in local {
                ok &= inner.local.route(e).await.is_ok();
            }
            if ok {
                let _ = inner.queues.ack(&link.queue, &moved_ids).await;
                metrics::counter!("switchboard_federation_rerouted_total", "peer" => link.peer.clone())
                    .increment(moved_ids.len() as u64);
                link.refresh_depth(&inner).await;
            } else {
                tracing::warn!(peer = %link.peer, "cannot re-route outbox items now; they come back after their lease");
            }
        }
        batch = stay;
        if batch.is_empty() {
            continue;
        }
        if !link.is_up() && last_call.elapsed() < PROBE_EVERY {
            let rest = PROBE_EVERY - last_call.elapsed();
            wait(&inner, &link, &mut routes, rest).await;
            continue;
        }
        // Each envelope's trace goes on through a span of its own: one
        // call carries envelopes of many traces.
        let spans: Vec<tracing::Span> = batch
            .iter_mut()
            .map(|(_, e)| {
                let span = tracing::info_span!(
                    "federation.forward",
                    message.id = %e.id,
                    peer = %link.peer,
                    hop = e.hops.len()
                );
                if !e.traceparent.is_empty() {
                    switchboard_telemetry::continue_traceparent(&span, &e.traceparent);
                }
                if let Some(tp) = span.in_scope(switchboard_telemetry::current_traceparent) {
                    e.traceparent = tp;
                }
                span
            })
            .collect();
        last_call = Instant::now();
        let envelopes: Vec<pb::Envelope> = batch.iter().map(|(_, e)| e.clone()).collect();
        let n = envelopes.len();
        let result = match link.call(&inner, envelopes).await {
            // An answer must account for every envelope; one that does not
            // accepted none of them.
            Ok(reply) if reply.outcomes.len() != n => Err(format!(
                "{} outcomes for {n} envelopes",
                reply.outcomes.len()
            )),
            other => other,
        };
        match result {
            Ok(reply) => {
                let refused = reply.outcomes.iter().filter(|o| !o.accepted).count();
                for (o, (_, e)) in reply.outcomes.iter().zip(&batch) {
                    if !o.accepted {
                        tracing::error!(peer = %link.peer, id = %e.id, reason = %o.reason, "neighbour refused an envelope for good");
                    }
                }
                let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
                if let Err(e) = inner.queues.ack(&link.queue, &ids).await {
                    tracing::warn!(error = %e, "cannot ack sent outbox items: they may be sent again (the receiver dedups)");
                }
                metrics::counter!("switchboard_federation_forwarded_total", "peer" => link.peer.clone())
                    .increment((n - refused) as u64);
                if refused > 0 {
                    metrics::counter!("switchboard_federation_dropped_total", "reason" => "refused by neighbour")
                        .increment(refused as u64);
                }
                link.succeeded(&inner);
                link.refresh_depth(&inner).await;
                backoff = BACKOFF_MIN;
                batch.clear();
            }
            Err(e) => {
                metrics::counter!("switchboard_federation_retried_total", "peer" => link.peer.clone())
                    .increment(n as u64);
                link.failed(&inner, &e);
                wait(&inner, &link, &mut routes, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        drop(spans);
    }
}

/// Sleeps up to `at_most`, waking early for new items, a route change or
/// the stop.
async fn wait(
    inner: &Inner,
    link: &Link,
    routes: &mut tokio::sync::watch::Receiver<Arc<super::RouteTable>>,
    at_most: Duration,
) {
    tokio::select! {
        _ = inner.stop.cancelled() => {}
        _ = link.wake.notified() => {}
        _ = routes.changed() => {}
        _ = tokio::time::sleep(at_most) => {}
    }
}
