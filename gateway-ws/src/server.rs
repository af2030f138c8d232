//! The client port: HTTP (health, REST), the WebSocket upgrade and the
//! public gRPC API on one listener.

use std::future::Future;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use std::sync::Arc;

use crate::edge::ConnSlot;
use crate::read_ahead::ReadAhead;
use crate::tls::ClientTls;
use crate::ui::UiOptions;
use crate::{GatewayError, GatewayRole, Readiness, connection};

/// Serves the client port on an already-bound listener until `shutdown`
/// resolves; then stops accepting and closes every socket with 1001.
pub async fn serve(
    listener: TcpListener,
    gateway: GatewayRole,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    serve_with_ui(listener, gateway, UiOptions::default(), shutdown).await
}

/// [`serve`], with the web UI as `ui` configures it (docs/ui.md).
pub async fn serve_with_ui(
    listener: TcpListener,
    gateway: GatewayRole,
    ui: UiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    serve_client_port(listener, gateway, ui, None, shutdown).await
}

/// [`serve_with_ui`], over TLS when `tls` is given (`wss://`, `https://`;
/// its files are watched for new certificates while the port is open).
pub async fn serve_client_port(
    listener: TcpListener,
    gateway: GatewayRole,
    ui: UiOptions,
    tls: Option<Arc<ClientTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws_upgrade))
        .merge(crate::rest::router(&gateway))
        .merge(crate::ui::router(ui))
        .with_state(gateway.clone())
        // gRPC (HTTP/2, h2c) beside HTTP/1.1 and the WebSocket upgrade.
        .merge(crate::grpc::router(&gateway)?);
    let closing = gateway.clone();
    let limits = &gateway.inner.limits;
    let edge = crate::edge::Edge::new(limits.max_connections, limits.max_connections_per_ip);
    let header_timeout = std::time::Duration::from_secs(limits.http_header_timeout_secs);
    let watching = tokio_util::sync::CancellationToken::new();
    if let Some(tls) = &tls {
        tokio::spawn(Arc::clone(tls).watch(watching.clone()));
    }
    crate::edge::serve(
        listener,
        app,
        edge,
        header_timeout,
        std::time::Duration::from_secs(limits.http2_idle_timeout_secs),
        tls,
        shutdown,
        || async move {
            closing.close_all(std::time::Duration::from_secs(5)).await;
        },
    )
    .await;
    watching.cancel();
    Ok(())
}

/// Prometheus text exposition of this process's metrics.
pub async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        switchboard_telemetry::metrics_handle().render(),
    )
        .into_response()
}

/// Serves `/metrics`, `/healthz` and `/readyz` (what `readiness` checks):
/// the metrics listener of processes without a client port, where
/// orchestrators probe them.
pub async fn serve_metrics_with_readiness(
    listener: TcpListener,
    readiness: Arc<dyn Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(node_readyz))
        .with_state(readiness);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn node_readyz(State(readiness): State<Arc<dyn Readiness>>) -> Response {
    readiness_response(readiness.as_ref()).await
}

/// Serves only `/metrics` (and `/healthz`): for processes without a client
/// port.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// 200 when every dependency answers, 503 naming those that did not.
async fn readyz(State(gateway): State<GatewayRole>) -> Response {
    readiness_response(gateway.inner.deps.readiness.as_ref()).await
}

async fn readiness_response(readiness: &dyn Readiness) -> Response {
    let checks = readiness.check().await;
    let ready = checks.iter().all(|c| c.error.is_none());
    let body: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|c| {
            let state = c.error.unwrap_or_else(|| "ok".to_owned());
            (c.name.to_owned(), serde_json::Value::String(state))
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"ready": ready, "checks": body})),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({"error": {"code": "INVALID_FRAME", "message": message}})),
    )
        .into_response()
}

async fn ws_upgrade(State(gateway): State<GatewayRole>, mut req: Request) -> Response {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return bad_request("this endpoint speaks WebSocket: send an Upgrade: websocket request");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return bad_request("Sec-WebSocket-Version must be 13");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    // An Origin that is not text is kept as such (and matches no allowed
    // origin), not taken for a client without one.
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return bad_request("connection cannot be upgraded");
    };
    // The limits are read through `inner` inside the task: a clone would
    // stay in the task's future for the connection's whole life.
    let inner = gateway.inner.clone();
    // The connection's place under the client port's caps, held until the
    // WebSocket closes.
    let slot = req.extensions_mut().remove::<Arc<ConnSlot>>();
    tokio::spawn(async move {
        let _slot = slot;
        match on_upgrade.await {
            Ok(upgraded) => {
                let limits = &inner.limits;
                let hard_limit = limits.max_frame_bytes.saturating_mul(4);
                let config = WebSocketConfig::default()
                    .read_buffer_size(limits.read_buffer_bytes)
                    .write_buffer_size(limits.write_buffer_bytes)
                    .max_write_buffer_size(
                        limits
                            .write_buffer_bytes
                            .saturating_add(hard_limit.saturating_mul(4)),
                    )
                    .max_message_size(Some(hard_limit))
                    .max_frame_size(Some(hard_limit));
                // Boxed, each: this task's future is as large as its
                // largest state, and it lives as long as the connection.
                let ws = Box::pin(WebSocketStream::from_raw_socket(
                    ReadAhead::new(TokioIo::new(upgraded), limits.read_ahead_bytes),
                    Role::Server,
                    Some(config),
                ))
                .await;
                Box::pin(connection::run(inner, Box::new(ws), origin)).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
