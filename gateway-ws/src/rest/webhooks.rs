//! The webhook dead letters of an app over REST (scope `admin`): events
//! that failed for their whole retry period, listed and replayed. Served by
//! whichever process holds the store (a gateway elsewhere asks it over the
//! mesh).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::middleware::from_fn;
use axum::routing::{get, post};
use serde::Serialize;
use switchboard_config::ApiScope;
use switchboard_mesh::pb;

use super::{ApiError, ErrorBody, counted, grant, method_not_allowed};
use crate::GatewayRole;

pub(super) fn routes() -> Router<GatewayRole> {
    Router::new()
        .route(
            "/v1/apps/{appId}/webhooks/dead-letters",
            get(list_dead_letters)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("dead_letters", req, next))),
        )
        .route(
            "/v1/apps/{appId}/webhooks/dead-letters/replay",
            post(replay_dead_letters)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| {
                    counted("replay_dead_letters", req, next)
                })),
        )
}

/// A webhook event that failed for its whole retry period.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Its position in the app's dead letters.
    id: u64,
    /// The event's `webhook-id` (the same when it is replayed).
    webhook_id: String,
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    dead_at_ms: u64,
    /// The event, as it was POSTed (`{"type": "message.offline", …}`).
    #[schema(value_type = Object)]
    event: serde_json::Value,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetters {
    /// The oldest first, at most 1,000.
    dead_letters: Vec<DeadLetter>,
    /// Dead letters left after the call.
    depth: u64,
}

fn dead_letters(reply: pb::DeadLettersReply) -> DeadLetters {
    DeadLetters {
        dead_letters: reply
            .letters
            .into_iter()
            .map(|l| DeadLetter {
                id: l.id,
                webhook_id: l.webhook_id,
                dead_at_ms: l.dead_at_ms,
                event: serde_json::from_str(&l.body).unwrap_or(serde_json::Value::String(l.body)),
            })
            .collect(),
        depth: reply.depth,
    }
}

/// List an app's webhook dead letters.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/webhooks/dead-letters",
    tag = "webhooks",
    params(("appId" = String, Path, description = "The app's id")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The oldest dead letters (at most 1,000) and how many there are", body = DeadLetters),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "The store did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn list_dead_letters(
    State(gateway): State<GatewayRole>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<DeadLetters>, ApiError> {
    let session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Admin).await?;
    let reply = session.webhook_dead_letters(&grant, false).await?;
    Ok(axum::Json(dead_letters(reply)))
}

/// Replay an app's webhook dead letters.
///
/// Moves the oldest (at most 1,000) back to the app's webhook outbox: they
/// are POSTed again, signed, in order, with their original `webhook-id`.
/// Answers the events moved.
#[utoipa::path(
    post,
    path = "/v1/apps/{appId}/webhooks/dead-letters/replay",
    tag = "webhooks",
    params(("appId" = String, Path, description = "The app's id")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The dead letters moved back to the outbox, and how many are left", body = DeadLetters),
        (status = 400, description = "The app has no webhook configured (`INVALID_FRAME`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "The store did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn replay_dead_letters(
    State(gateway): State<GatewayRole>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<DeadLetters>, ApiError> {
    let session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Admin).await?;
    let reply = session.webhook_dead_letters(&grant, true).await?;
    Ok(axum::Json(dead_letters(reply)))
}
