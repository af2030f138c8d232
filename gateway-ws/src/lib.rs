//! The gateway role: the client port. It speaks client protocol v1 over
//! WebSocket, holds the live connections and writes pushed messages to them.

mod quota;
pub use quota::GatewayQuotas;
mod channels;
pub mod commands;
mod connection;
mod counters;
mod edge;
pub mod frames;
pub mod grpc;
mod json;
mod ratelimit;
mod read_ahead;
mod registry;
pub mod rest;
mod seen;
mod server;
pub mod session;
#[cfg(test)]
mod test_doubles;
pub mod tls;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_config::Limits;
use switchboard_mesh::{
    AuthClient, ChannelsClient, DeliveryClient, GroupAdminClient, RouterClient, ServiceError, pb,
};
use switchboard_presence::Presence;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use commands::ClientCommand;
pub use read_ahead::ReadAhead;
pub use server::{
    serve, serve_client_port, serve_metrics, serve_metrics_with_readiness, serve_with_ui,
};
pub use session::Session;

use registry::Registry;

/// What a gateway needs from the rest of the mesh.
#[derive(Clone)]
pub struct GatewayDeps {
    /// The deployment's domain (the `domain` of the receive span).
    pub domain: String,
    pub auth: AuthClient,
    pub router: RouterClient,
    pub delivery: DeliveryClient,
    /// Persistent groups (the groups role).
    pub groups: GroupAdminClient,
    /// Topics and rooms (the groups role).
    pub channels: ChannelsClient,
    /// The webhook dead letters (where the store is).
    pub webhook_admin: switchboard_mesh::WebhookAdminClient,
    pub presence: Arc<dyn Presence>,
    /// What `/readyz` checks.
    pub readiness: Arc<dyn Readiness>,
    /// Users homed in other domains (federation): they are redirected
    /// there at AUTH_CLIENT. `None`: every user is at home here.
    pub homes: Option<Arc<dyn Homes>>,
}

/// Where users live, for redirects at sign-in (federation).
pub trait Homes: Send + Sync + 'static {
    /// The client URL of the user's home domain, when that is another
    /// domain than this one.
    fn redirect(&self, app_id: &str, user_id: &str) -> Option<String>;
}

/// One dependency checked by `/readyz`: its name, and why it failed.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub error: Option<String>,
}

/// The dependencies a node needs to serve (store, presence, …).
#[async_trait]
pub trait Readiness: Send + Sync + 'static {
    async fn check(&self) -> Vec<Check>;
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("client port: {0}")]
    Io(#[from] std::io::Error),
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("client port TLS: {0}")]
    Tls(String),
}

/// Reports of RELIABLE messages written to a socket, batched to delivery.
const DELIVERED_QUEUE: usize = 65_536;
/// Reports sent in one Delivered call: a store behind under load must not
/// make the reports, and through them the socket writers, wait.
const DELIVERED_BATCH: usize = 16_384;

pub(crate) struct GatewayInner {
    pub id: String,
    pub limits: Limits,
    pub deps: GatewayDeps,
    pub registry: Registry,
    pub channels: Arc<channels::ChannelRegistry>,
    pub delivered_tx: mpsc::Sender<pb::DeliveredItem>,
    /// Cancelled at shutdown: every connection closes with 1001.
    pub shutdown: CancellationToken,
    pub next_conn_id: std::sync::atomic::AtomicU64,
    /// Sender budgets and app connection counts; none until set.
    pub quotas: std::sync::OnceLock<quota::Quotas>,
    /// The same-gateway FAST shortcut; none until switched on.
    pub same_gateway: std::sync::OnceLock<session::same_gateway::Shortcut>,
}

/// A gateway instance. Cheap to clone.
#[derive(Clone)]
pub struct GatewayRole {
    pub(crate) inner: Arc<GatewayInner>,
}

impl GatewayRole {
    pub fn new(id: impl Into<String>, limits: Limits, deps: GatewayDeps) -> Self {
        let (delivered_tx, delivered_rx) = mpsc::channel(DELIVERED_QUEUE);
        let registry = Registry::new(limits.backlog_frames);
        tokio::spawn(report_delivered(deps.delivery.clone(), delivered_rx));
        let id = id.into();
        let channels = Arc::new(channels::ChannelRegistry::new(&id));
        tokio::spawn(channels::follow_presence(
            deps.presence.changes(),
            Arc::downgrade(&channels),
        ));
        let inner = Arc::new(GatewayInner {
            id,
            limits,
            deps,
            registry,
            channels,
            delivered_tx,
            shutdown: CancellationToken::new(),
            next_conn_id: std::sync::atomic::AtomicU64::new(1),
            quotas: std::sync::OnceLock::new(),
            same_gateway: std::sync::OnceLock::new(),
        });
        tokio::spawn(channels::sync_with_owners(Arc::downgrade(&inner)));
        GatewayRole { inner }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Enforces `quotas` from now on. Set once; later calls are ignored.
    pub fn set_quotas(&self, quotas: GatewayQuotas) {
        let _ = self.inner.quotas.set(quota::Quotas::new(quotas));
    }

    /// As [`GatewayRole::set_quotas`], with the apps (by id) that have their own.
    pub fn set_quotas_per_app(
        &self,
        quotas: GatewayQuotas,
        per_app: std::collections::HashMap<String, GatewayQuotas>,
    ) {
        let _ = self
            .inner
            .quotas
            .set(quota::Quotas::with_apps(quotas, per_app));
    }

    /// Delivers FAST direct messages between users connected only here
    /// without the router (a router in another process), reporting them
    /// to `router` afterwards for its metrics and traces. Set once.
    pub fn deliver_same_gateway_fast(&self, router: RouterClient) {
        let _ = self
            .inner
            .same_gateway
            .set(session::same_gateway::Shortcut::start(
                self.inner.id.clone(),
                router,
            ));
    }

    /// A new client session on this gateway, for a transport other than
    /// its WebSocket port (the session's pushes reach no connection: stored
    /// messages wait for a fetch).
    pub fn session(&self) -> Session {
        let conn_id = self
            .inner
            .next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Session::new(self.inner.clone(), conn_id)
    }

    /// Number of authenticated connections.
    pub fn connections(&self) -> usize {
        self.inner.registry.len()
    }

    /// Closes every connection with 1001 and waits (bounded) until they are gone.
    pub async fn close_all(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        while self.inner.registry.len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn report_delivered(delivery: DeliveryClient, mut rx: mpsc::Receiver<pb::DeliveredItem>) {
    let mut buf = Vec::with_capacity(DELIVERED_BATCH);
    while rx.recv_many(&mut buf, DELIVERED_BATCH).await > 0 {
        let items = std::mem::take(&mut buf);
        let count = items.len();
        // On failure the messages stay in their inboxes and are fetched
        // again: a duplicate, never a loss.
        if let Err(e) = delivery.delivered(pb::DeliveredRequest { items }).await {
            tracing::warn!(error = %e, count, "delivered report failed");
        }
    }
}

#[async_trait]
impl switchboard_mesh::Gateway for GatewayRole {
    async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
        let connections = req
            .items
            .iter()
            .map(|item| {
                if let Some(channel) = &item.channel {
                    return self.inner.channels.push(channel);
                }
                let span = tracing::info_span!(
                    "gateway.push",
                    message.id = item.message.as_ref().map(|m| m.id.as_str()).unwrap_or_default(),
                    gateway = %self.inner.id,
                    connections = tracing::field::Empty,
                );
                switchboard_telemetry::continue_traceparent(&span, &item.traceparent);
                let _entered = span.enter();
                let n = self.inner.registry.push(&self.inner.id, item);
                span.record("connections", n);
                n
            })
            .collect();
        Ok(pb::PushReply { connections })
    }
}

/// Not an API: the parsers of client input with the properties they must
/// keep, for the fuzz targets in `fuzz/` and the property tests.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::frames::fuzzing::check_frame;
    pub use crate::rest::fuzzing::check_rest_body;
}
