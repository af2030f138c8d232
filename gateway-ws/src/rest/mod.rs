//! The public REST API, `/v1` on the client port: server-side callers send
//! messages (to users, groups and topics) and read presence, the online
//! list and inbox depths with an app's API key. Each
//! handler is a thin adapter over a [`Session`](crate::Session), so a call
//! behaves exactly as the WebSocket frame it mirrors (same checks, ids,
//! inboxes, confirmations, `MESSAGE_SENT` copies and traces). The OpenAPI
//! document is generated from the annotations here ([`openapi`]).

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod groups;
mod webhooks;
mod words;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use switchboard_config::ApiScope;
use switchboard_mesh::{ErrorCode, pb};
use utoipa::OpenApi;

use crate::GatewayRole;
use crate::commands::{GroupMessage, Message, Publish, RequestMeta};
use crate::session::{ApiGrant, ChannelOutcome, KeyCheck, Session};

pub use error::{ApiError, ErrorBody};

/// The `/v1` routes, for the client port's router.
pub fn router(gateway: &GatewayRole) -> Router<GatewayRole> {
    // A REST body carries what one WebSocket frame would.
    let body_limit = gateway.inner.limits.max_frame_bytes;
    Router::new()
        .route(
            "/v1/apps/{appId}/messages",
            post(send_message)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("send_message", req, next))),
        )
        .route(
            "/v1/apps/{appId}/users/{userId}/presence",
            get(user_presence)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("user_presence", req, next))),
        )
        .route(
            "/v1/apps/{appId}/online",
            get(online_users)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("online_users", req, next))),
        )
        .route(
            "/v1/apps/{appId}/users/{userId}/inbox",
            get(inbox_depth)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("inbox_depth", req, next))),
        )
        .merge(groups::routes())
        .merge(webhooks::routes())
        .route("/v1/openapi.json", get(openapi_json))
        .route("/v1/{*rest}", axum::routing::any(unknown_operation))
        .layer(DefaultBodyLimit::max(body_limit))
}

/// Counts a request of `operation` by its answer's status, and times it.
async fn counted(operation: &'static str, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    metrics::counter!(
        "switchboard_rest_requests_total",
        "operation" => operation,
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    metrics::histogram!("switchboard_rest_request_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The OpenAPI 3.1 document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::ui::AdminDoc::openapi());
    doc
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard REST API",
        version = "1",
        description = "Send messages, manage persistent groups, and read presence, the online list and inbox depths with an app's API key \
                       (`Authorization: Bearer <key>`). Every call behaves as the WebSocket \
                       frame it mirrors (docs/protocol.md). Errors are `{code, message}` with \
                       the protocol's error codes."
    ),
    paths(
        send_message, user_presence, online_users, inbox_depth,
        groups::create_group, groups::get_group, groups::rename_group, groups::delete_group,
        groups::add_members, groups::remove_members, groups::list_groups,
        webhooks::list_dead_letters, webhooks::replay_dead_letters,
    ),
    components(schemas(
        SendMessage, Recipients, Feature, MessageAccepted, Presence, OnlineUsers, InboxDepth, ErrorBody,
        groups::Group, groups::GroupList, groups::NewGroup, groups::Members, groups::Rename,
        webhooks::DeadLetter, webhooks::DeadLetters,
    )),
    modifiers(&BearerKey),
    tags((name = "messages"), (name = "users"), (name = "groups"), (name = "webhooks"))
)]
struct ApiDoc;

struct BearerKey;

impl utoipa::Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key of the app (`switchboard apps new-key`), with the scope \
                         the operation names",
                    ))
                    .build(),
            ),
        );
    }
}

/// A message to send, as a `MESSAGE` (`to` a user) or `GROUP_MESSAGE`
/// (`to` a list of users, or `group`) frame would carry it. Exactly one of
/// `to`, `group`, `topic` and `room`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// A user of the app (`APPNAME-<id>`), or a list of them (an ad-hoc
    /// group: no confirmation).
    #[serde(default)]
    to: Option<Recipients>,
    /// A persistent group's id (the sender must be a member).
    #[serde(default)]
    group: Option<String>,
    /// A topic: published as `PUBLISH` from `from` would be (every
    /// subscriber gets a `PUBLICATION`); `id` and `feature` do not apply.
    #[serde(default)]
    topic: Option<String>,
    /// A room: not available through REST (rooms take messages from their
    /// members' connections), answered 400 `UNKNOWN_TYPE`.
    #[serde(default)]
    room: Option<String>,
    /// The message text, at most `limits.max_content_bytes` bytes (UTF-8).
    content: String,
    /// The sending user, any user of the app; the app's master user when
    /// absent.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    feature: Option<Feature>,
    /// The message's own id (1–64 characters of `A-Z a-z 0-9 _ -`): a
    /// resend of an accepted id is accepted again, stored and shown once.
    #[serde(default)]
    #[schema(example = "order-1234-shipped")]
    id: Option<String>,
    /// The sender's correlation string: a RELIABLE direct message with one
    /// gets a `MESSAGE_CONFIRMATION` to `from` once delivered.
    #[serde(default)]
    reference: Option<String>,
}

/// One user or a list of users.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Recipients {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
pub enum Feature {
    /// Stored until delivered (the default).
    #[serde(rename = "RELIABLE")]
    Reliable,
    /// Pushed to connected recipients only.
    #[serde(rename = "FAST")]
    Fast,
}

/// The message was accepted as the WebSocket frame would be: RELIABLE ones
/// are stored.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MessageAccepted {
    /// The message's id: the given `id`, or a UUIDv7.
    id: String,
    /// A topic publication's offset in its topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    /// Recipients of a RELIABLE group message whose inbox is full: it was
    /// not stored for them (it was for the others). Absent when none.
    #[serde(rename = "inboxFull", skip_serializing_if = "Vec::is_empty")]
    inbox_full: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OnlineUsers {
    /// The app's users with an open connection, sorted.
    users: Vec<String>,
    /// More are online than `limits.max_user_list` (the list is cut).
    truncated: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    user_id: String,
    /// Whether the user has an open connection on any gateway.
    online: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxDepth {
    user_id: String,
    /// Stored messages (and confirmations) waiting for the user.
    depth: u64,
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

async fn grant(
    session: &Session,
    headers: &HeaderMap,
    app_id: &str,
    scope: ApiScope,
) -> Result<ApiGrant, ApiError> {
    Ok(session
        .check_key(KeyCheck {
            app_id,
            key: bearer(headers),
            scope,
        })
        .await?)
}

/// The JSON body of a request: `application/json`, within the size limit,
/// well-formed, with known fields of the right types.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::with_status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InvalidFrame,
            "the body must be JSON: send Content-Type: application/json",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the body exceeds the size limit",
            )
        } else {
            ApiError::new(ErrorCode::InvalidFrame, e.body_text())
        }
    })?;
    // serde reads a struct from an array too (field by position); every
    // body of this API is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::new(
            ErrorCode::InvalidFrame,
            "the body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        use serde_json::error::Category;
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON: {inner}"))
            }
            Category::Data => ApiError::new(
                ErrorCode::InvalidFrame,
                words::data_error(&path, &inner.to_string()),
            ),
        }
    })?;
    // Trailing characters after the value are bad JSON too.
    de.end()
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// What a send's body must hold whoever sends it: one target, and no
/// fields that do not apply to it.
fn check_send(body: &SendMessage) -> Result<(), ApiError> {
    let given = [
        body.to.is_some(),
        body.group.is_some(),
        body.topic.is_some(),
        body.room.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ApiError::new(
            ErrorCode::InvalidFrame,
            "give exactly one of to, group, topic and room",
        ));
    }
    if body.room.is_some() {
        return Err(ApiError::new(
            ErrorCode::UnknownType,
            "sending to a room is not available through REST: rooms take messages from their \
             members' connections (ROOM_JOIN over WebSocket)",
        ));
    }
    if body.topic.is_some() && (body.id.is_some() || body.feature.is_some()) {
        return Err(ApiError::new(
            ErrorCode::InvalidFrame,
            "id and feature do not apply to a topic publication",
        ));
    }
    Ok(())
}

fn meta(headers: &HeaderMap, reference: Option<String>) -> RequestMeta {
    RequestMeta {
        reference: reference.filter(|r| !r.is_empty()),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// Send a message.
///
/// Accepted as the WebSocket `MESSAGE` (`to` a user), `GROUP_MESSAGE`
/// (`to` a list, or `group`) or `PUBLISH` (`topic`, answered with its
/// offset) frame from `from` would be: RELIABLE messages
/// are stored before the answer; `from`'s connections get `MESSAGE_SENT`
/// copies; a RELIABLE direct message with a `reference` gets a
/// `MESSAGE_CONFIRMATION` to `from` once delivered.
#[utoipa::path(
    post,
    path = "/v1/apps/{appId}/messages",
    tag = "messages",
    params(("appId" = String, Path, description = "The app's id")),
    request_body = SendMessage,
    security(("apiKey" = [])),
    responses(
        (status = 202, description = "Accepted (stored, when RELIABLE)", body = MessageAccepted),
        (status = 400, description = "Invalid JSON (`INVALID_JSON`), a missing or wrong field (`INVALID_FRAME`), a recipient not of the app or an unknown group (`INVALID_RECIPIENT`), a room (`UNKNOWN_TYPE`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `send` scope, the sender is not a member of the group, or may not publish to the app's topics (`FORBIDDEN`, `NOT_A_MEMBER`)", body = ErrorBody),
        (status = 413, description = "Body over the frame limit, or content over the content limit (`PAYLOAD_TOO_LARGE`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (`INVALID_FRAME`)", body = ErrorBody),
        (status = 429, description = "RELIABLE to a user whose inbox is full (`INBOX_FULL`): not stored", body = ErrorBody),
        (status = 503, description = "A role did not answer in time; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn send_message(
    State(gateway): State<GatewayRole>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Send).await?;
    let body: SendMessage = json_body(&headers, body)?;
    let feature = match body.feature.unwrap_or(Feature::Reliable) {
        Feature::Reliable => pb::Feature::Reliable,
        Feature::Fast => pb::Feature::Fast,
    };
    check_send(&body)?;
    session.act_for(grant, body.from)?;
    if let Some(topic) = body.topic {
        let published = session
            .publish(Publish {
                topic,
                content: body.content,
            })
            .await?;
        let ChannelOutcome::Published { id, offset, .. } = published else {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "unexpected publish outcome",
            ));
        };
        let accepted = MessageAccepted {
            id,
            offset: Some(offset),
            inbox_full: Vec::new(),
        };
        return Ok((StatusCode::ACCEPTED, axum::Json(accepted)).into_response());
    }
    let meta = meta(&headers, body.reference);
    let accepted = match (body.to, body.group) {
        (Some(Recipients::One(to)), _) => {
            let msg = Message {
                to,
                content: body.content,
                id: body.id,
                feature,
            };
            session.send_direct(msg, &meta).await?
        }
        (to, group) => {
            let msg = GroupMessage {
                to: to.map(|to| match to {
                    Recipients::One(one) => vec![one],
                    Recipients::Many(many) => many,
                }),
                group,
                content: body.content,
                id: body.id,
                feature,
            };
            session.send_group(msg, &meta).await?
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(MessageAccepted {
            id: accepted.id,
            offset: None,
            inbox_full: accepted.inbox_full,
        }),
    )
        .into_response())
}

/// Read a user's presence.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/users/{userId}/presence",
    tag = "users",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("userId" = String, Path, description = "A user of the app (`APPNAME-<id>`)"),
    ),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Whether the user is connected", body = Presence),
        (status = 400, description = "Not a user of the app (`INVALID_FRAME`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `presence` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "Presence did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn user_presence(
    State(gateway): State<GatewayRole>,
    Path((app_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<Presence>, ApiError> {
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Presence).await?;
    session.act_for(grant, Some(user_id.clone()))?;
    let online = session.is_online(&user_id).await?;
    Ok(axum::Json(Presence { user_id, online }))
}

/// Read the app's online users.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/online",
    tag = "users",
    params(("appId" = String, Path, description = "The app's id")),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The connected users, sorted, capped at `limits.max_user_list`", body = OnlineUsers),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `presence` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "Presence did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn online_users(
    State(gateway): State<GatewayRole>,
    Path(app_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<OnlineUsers>, ApiError> {
    let session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Presence).await?;
    let (users, truncated) = session.online_users(&grant).await?;
    Ok(axum::Json(OnlineUsers { users, truncated }))
}

/// Read the depth of a user's inbox.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/users/{userId}/inbox",
    tag = "users",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("userId" = String, Path, description = "A user of the app (`APPNAME-<id>`)"),
    ),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The number of stored messages waiting", body = InboxDepth),
        (status = 400, description = "Not a user of the app (`INVALID_FRAME`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "The store did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn inbox_depth(
    State(gateway): State<GatewayRole>,
    Path((app_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<InboxDepth>, ApiError> {
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Admin).await?;
    session.act_for(grant, Some(user_id.clone()))?;
    let depth = session.inbox_depth().await?;
    Ok(axum::Json(InboxDepth { user_id, depth }))
}

async fn openapi_json() -> Response {
    match openapi().to_pretty_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::new(ErrorCode::Internal, e.to_string()).into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::UnknownType,
        "this path does not take this method: see /v1/openapi.json",
    )
}

async fn unknown_operation() -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownType,
        "no such operation: see /v1/openapi.json",
    )
}
