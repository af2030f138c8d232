//! The console's API, `/v1/admin` on the client port: this process, the
//! cluster's members, the federation and this process's counters. Served
//! only where `[ui] console` is on, to API keys of `[ui] console_app`
//! with the `admin` scope.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use switchboard_config::ApiScope;
use utoipa::OpenApi;

use super::UiOptions;
use super::stats::{CodeCount, Latency, LinkGauge, MessageCount, NodeStats, summarise};
use crate::GatewayRole;
use crate::rest::{ApiError, ErrorBody};
use crate::session::KeyCheck;

/// Cluster and federation state, from the process that assembles the roles.
#[async_trait]
pub trait ConsoleSource: Send + Sync + 'static {
    /// The processes registered in discovery.
    fn cluster(&self) -> ClusterView;
    /// The federation's domains and links, with their states.
    async fn federation(&self) -> FederationView;
}

/// The processes of this deployment.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// Whether this process uses discovery (etcd); without it the
    /// deployment is this one process.
    pub discovery: bool,
    pub members: Vec<ClusterMember>,
}

/// One process registered in discovery (listed while its lease lives).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    pub id: String,
    pub roles: Vec<String>,
    /// The mesh address others dial.
    pub addr: String,
    /// Registered with another mesh secret: ignored by this process.
    pub foreign: bool,
    /// This process.
    pub this: bool,
}

/// The federation as the topology in etcd describes it.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct FederationView {
    /// Whether this process federates (`federation.addr` set).
    pub enabled: bool,
    pub domains: Vec<DomainInfo>,
    pub links: Vec<LinkInfo>,
    /// Why the state could not be read, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DomainInfo {
    pub name: String,
    /// Where its clients connect.
    pub client: String,
    /// Where neighbouring domains call it.
    pub federation: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LinkInfo {
    pub a: String,
    pub b: String,
    pub weight: u64,
    /// `up`, `down` (either end reports it down) or `unknown` (neither
    /// end reports).
    pub state: String,
}

/// This process.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub node: String,
    pub domain: String,
    pub roles: Vec<String>,
    /// Jaeger's UI: the console links message ids to their traces there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jaeger_url: Option<String>,
    /// The `service.name` of this process's spans (`switchboard-all`, or
    /// `switchboard-` and its roles joined by `+`).
    pub trace_service: String,
    /// What `/readyz` checks, and why each failed.
    pub checks: Vec<ReadinessCheck>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadinessCheck {
    pub name: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

type Options = Extension<Arc<UiOptions>>;

pub(super) fn router(options: Arc<UiOptions>) -> Router<GatewayRole> {
    Router::new()
        .route("/v1/admin/node", get(node))
        .route("/v1/admin/cluster", get(cluster))
        .route("/v1/admin/federation", get(federation))
        .route("/v1/admin/stats", get(stats))
        .layer(Extension(options))
}

async fn admit(
    gateway: &GatewayRole,
    options: &UiOptions,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    gateway
        .session()
        .check_key(KeyCheck {
            app_id: &options.config.console_app,
            key: crate::rest::bearer(headers),
            scope: ApiScope::Admin,
        })
        .await?;
    Ok(())
}

/// This process: id, domain, roles and readiness.
#[utoipa::path(
    get,
    path = "/v1/admin/node",
    tag = "admin",
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "This process", body = NodeView),
        (status = 401, description = "Missing or wrong API key of `ui.console_app` (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 404, description = "The console is off (`ui.console`)", body = ErrorBody),
    )
)]
async fn node(
    State(gateway): State<GatewayRole>,
    Extension(options): Options,
    headers: HeaderMap,
) -> Result<Json<NodeView>, ApiError> {
    admit(&gateway, &options, &headers).await?;
    let checks = gateway
        .inner
        .deps
        .readiness
        .check()
        .await
        .into_iter()
        .map(|c| ReadinessCheck {
            name: c.name.to_owned(),
            ok: c.error.is_none(),
            error: c.error,
        })
        .collect();
    Ok(Json(NodeView {
        node: gateway.id().to_owned(),
        domain: gateway.inner.deps.domain.clone(),
        roles: options.roles.clone(),
        trace_service: match options.roles.len() {
            // As the binary names its tracer (every role: `-all`).
            5 => "switchboard-all".to_owned(),
            _ => format!("switchboard-{}", options.roles.join("+")),
        },
        jaeger_url: Some(options.config.jaeger_url.clone()).filter(|u| !u.is_empty()),
        checks,
    }))
}

/// The processes registered in discovery.
#[utoipa::path(
    get,
    path = "/v1/admin/cluster",
    tag = "admin",
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The members, by id", body = ClusterView),
        (status = 401, description = "Missing or wrong API key of `ui.console_app` (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 404, description = "The console is off (`ui.console`)", body = ErrorBody),
    )
)]
async fn cluster(
    State(gateway): State<GatewayRole>,
    Extension(options): Options,
    headers: HeaderMap,
) -> Result<Json<ClusterView>, ApiError> {
    admit(&gateway, &options, &headers).await?;
    let view = match &options.source {
        Some(source) => source.cluster(),
        None => ClusterView::default(),
    };
    Ok(Json(view))
}

/// The federation's domains and links.
#[utoipa::path(
    get,
    path = "/v1/admin/federation",
    tag = "admin",
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Domains and links with their states", body = FederationView),
        (status = 401, description = "Missing or wrong API key of `ui.console_app` (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 404, description = "The console is off (`ui.console`)", body = ErrorBody),
    )
)]
async fn federation(
    State(gateway): State<GatewayRole>,
    Extension(options): Options,
    headers: HeaderMap,
) -> Result<Json<FederationView>, ApiError> {
    admit(&gateway, &options, &headers).await?;
    let view = match &options.source {
        Some(source) => source.federation().await,
        None => FederationView::default(),
    };
    Ok(Json(view))
}

/// This process's counters, from its own metrics.
#[utoipa::path(
    get,
    path = "/v1/admin/stats",
    tag = "admin",
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Totals since start; the console derives rates", body = NodeStats),
        (status = 401, description = "Missing or wrong API key of `ui.console_app` (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 404, description = "The console is off (`ui.console`)", body = ErrorBody),
    )
)]
async fn stats(
    State(gateway): State<GatewayRole>,
    Extension(options): Options,
    headers: HeaderMap,
) -> Result<Json<NodeStats>, ApiError> {
    admit(&gateway, &options, &headers).await?;
    let text = switchboard_telemetry::metrics_handle().render();
    Ok(Json(summarise(&text)))
}

/// The admin API's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(node, cluster, federation, stats),
    components(schemas(
        NodeView,
        ReadinessCheck,
        ClusterView,
        ClusterMember,
        FederationView,
        DomainInfo,
        LinkInfo,
        NodeStats,
        MessageCount,
        CodeCount,
        Latency,
        LinkGauge
    )),
    tags((name = "admin", description = "The operator console's reads (`[ui] console`): an API key of `ui.console_app` with the `admin` scope"))
)]
pub struct AdminDoc;
