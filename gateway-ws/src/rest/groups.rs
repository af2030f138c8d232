//! Persistent group management over REST (scope `groups`). Each call acts
//! as one user of the app (`?as=`, the app's master user when absent), and
//! is the GROUP_* frame from that user: the owner decides, members read,
//! and members get the same GROUP_EVENT frames.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use switchboard_config::ApiScope;
use switchboard_mesh::{ErrorCode, pb};

use super::{ApiError, ErrorBody, counted, grant, json_body, method_not_allowed};
use crate::GatewayRole;
use crate::commands::GroupCommand;

use pb::GroupOp as Op;

/// The group routes, for the `/v1` router.
pub(super) fn routes() -> Router<GatewayRole> {
    Router::new()
        .route(
            "/v1/apps/{appId}/groups",
            post(create_group)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("create_group", req, next))),
        )
        .route(
            "/v1/apps/{appId}/groups/{groupId}",
            get(get_group)
                .patch(rename_group)
                .delete(delete_group)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("group", req, next))),
        )
        .route(
            "/v1/apps/{appId}/groups/{groupId}/members",
            post(add_members)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("add_members", req, next))),
        )
        .route(
            "/v1/apps/{appId}/groups/{groupId}/members/remove",
            post(remove_members)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("remove_members", req, next))),
        )
        .route(
            "/v1/apps/{appId}/users/{userId}/groups",
            get(list_groups)
                .fallback(method_not_allowed)
                .layer(from_fn(|req, next| counted("list_groups", req, next))),
        )
}

/// Whom a group call acts as.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ActAs {
    /// The user of the app the call acts as (`APPNAME-<id>`); the app's
    /// master user when absent.
    #[serde(default, rename = "as")]
    #[param(rename = "as")]
    as_user: Option<String>,
}

/// A persistent group.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    group: String,
    name: String,
    owner: String,
    /// Sorted; the owner is one of them. Empty after a delete and in lists.
    members: Vec<String>,
    /// Milliseconds since the Unix epoch.
    created_ms: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GroupList {
    /// The user's groups, without members.
    groups: Vec<Group>,
}

/// A group to create, as `GROUP_CREATE` carries it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    /// The group's id (1–64 characters of `A-Z a-z 0-9 _ -`); absent:
    /// `g-<UUIDv7>`. Creating an existing group of the same owner again
    /// answers the group.
    #[serde(default)]
    #[schema(example = "g-42")]
    group: Option<String>,
    /// At most 256 bytes.
    #[serde(default)]
    name: Option<String>,
    /// Members besides the owner (the acting user).
    #[serde(default)]
    members: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Members {
    /// Users of the app.
    members: Vec<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// The new name, at most 256 bytes.
    name: String,
}

fn group_of(record: pb::GroupRecord) -> Group {
    Group {
        group: record.group,
        name: record.name,
        owner: record.owner,
        members: record.members,
        created_ms: record.created_ms,
    }
}

fn query(q: Result<Query<ActAs>, QueryRejection>) -> Result<Option<String>, ApiError> {
    q.map(|Query(q)| q.as_user).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidFrame,
            "the query string takes one parameter: as=USER_ID",
        )
    })
}

/// Runs a group request as `as_user` with the key's `groups` scope.
async fn run(
    gateway: &GatewayRole,
    headers: &HeaderMap,
    app_id: &str,
    as_user: Option<String>,
    cmd: GroupCommand,
) -> Result<pb::GroupCommandReply, ApiError> {
    let mut session = gateway.session();
    let grant = grant(&session, headers, app_id, ApiScope::Groups).await?;
    session.act_for(grant, as_user)?;
    Ok(session.group_command(cmd).await?.reply)
}

fn one(reply: pb::GroupCommandReply) -> Result<Group, ApiError> {
    reply
        .group
        .map(group_of)
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "the groups role answered no group"))
}

fn command(op: Op, group: String) -> GroupCommand {
    GroupCommand {
        op,
        group: Some(group),
        name: None,
        members: None,
    }
}

/// Create a persistent group.
///
/// As `GROUP_CREATE` from the acting user, who owns it; the members get
/// `GROUP_EVENT members_added`.
#[utoipa::path(
    post,
    path = "/v1/apps/{appId}/groups",
    tag = "groups",
    params(("appId" = String, Path, description = "The app's id"), ActAs),
    request_body = NewGroup,
    security(("apiKey" = [])),
    responses(
        (status = 201, description = "Created (or it existed with this owner)", body = Group),
        (status = 400, description = "A bad field (`INVALID_JSON`, `INVALID_FRAME`), a member not of the app (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope, the id is another owner's group, or a member is in too many groups (`FORBIDDEN`)", body = ErrorBody),
        (status = 413, description = "Body over the frame limit (`PAYLOAD_TOO_LARGE`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (`INVALID_FRAME`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn create_group(
    State(gateway): State<GatewayRole>,
    Path(app_id): Path<String>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let as_user = query(q)?;
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Groups).await?;
    let body: NewGroup = json_body(&headers, body)?;
    session.act_for(grant, as_user)?;
    let cmd = GroupCommand {
        op: Op::Create,
        group: body.group,
        name: body.name,
        members: body.members,
    };
    let group = one(session.group_command(cmd).await?.reply)?;
    Ok((StatusCode::CREATED, axum::Json(group)).into_response())
}

/// Read a group.
///
/// As `GROUP_INFO`: the acting user must be a member.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/groups/{groupId}",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("groupId" = String, Path, description = "The group's id"),
        ActAs,
    ),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The group", body = Group),
        (status = 400, description = "A bad id (`INVALID_FRAME`), an unknown group (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope (`FORBIDDEN`); the acting user is not a member (`NOT_A_MEMBER`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn get_group(
    State(gateway): State<GatewayRole>,
    Path((app_id, group)): Path<(String, String)>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
) -> Result<axum::Json<Group>, ApiError> {
    let as_user = query(q)?;
    let reply = run(
        &gateway,
        &headers,
        &app_id,
        as_user,
        command(Op::Info, group),
    )
    .await?;
    Ok(axum::Json(one(reply)?))
}

/// Rename a group.
///
/// As `GROUP_RENAME`: only the owner; members get `GROUP_EVENT renamed`.
#[utoipa::path(
    patch,
    path = "/v1/apps/{appId}/groups/{groupId}",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("groupId" = String, Path, description = "The group's id"),
        ActAs,
    ),
    request_body = Rename,
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The group after the change", body = Group),
        (status = 400, description = "A bad field (`INVALID_JSON`, `INVALID_FRAME`), an unknown group (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope, or the acting user is not the owner (`FORBIDDEN`)", body = ErrorBody),
        (status = 413, description = "Body over the frame limit (`PAYLOAD_TOO_LARGE`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (`INVALID_FRAME`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn rename_group(
    State(gateway): State<GatewayRole>,
    Path((app_id, group)): Path<(String, String)>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Group>, ApiError> {
    let as_user = query(q)?;
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Groups).await?;
    let body: Rename = json_body(&headers, body)?;
    session.act_for(grant, as_user)?;
    let cmd = GroupCommand {
        name: Some(body.name),
        ..command(Op::Rename, group)
    };
    Ok(axum::Json(one(session.group_command(cmd).await?.reply)?))
}

/// Delete a group.
///
/// As `GROUP_DELETE`: only the owner; members get `GROUP_EVENT deleted`.
/// Answers the group as it was, without members.
#[utoipa::path(
    delete,
    path = "/v1/apps/{appId}/groups/{groupId}",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("groupId" = String, Path, description = "The group's id"),
        ActAs,
    ),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "Deleted", body = Group),
        (status = 400, description = "A bad id (`INVALID_FRAME`), an unknown group (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope, or the acting user is not the owner (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn delete_group(
    State(gateway): State<GatewayRole>,
    Path((app_id, group)): Path<(String, String)>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
) -> Result<axum::Json<Group>, ApiError> {
    let as_user = query(q)?;
    let reply = run(
        &gateway,
        &headers,
        &app_id,
        as_user,
        command(Op::Delete, group),
    )
    .await?;
    Ok(axum::Json(one(reply)?))
}

async fn change_members(
    op: Op,
    gateway: GatewayRole,
    app_id: String,
    group: String,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Group>, ApiError> {
    let as_user = query(q)?;
    let mut session = gateway.session();
    let grant = grant(&session, &headers, &app_id, ApiScope::Groups).await?;
    let body: Members = json_body(&headers, body)?;
    session.act_for(grant, as_user)?;
    let cmd = GroupCommand {
        members: Some(body.members),
        ..command(op, group)
    };
    Ok(axum::Json(one(session.group_command(cmd).await?.reply)?))
}

/// Add members to a group.
///
/// As `GROUP_ADD_MEMBERS`: only the owner; members (the new ones included)
/// get `GROUP_EVENT members_added`.
#[utoipa::path(
    post,
    path = "/v1/apps/{appId}/groups/{groupId}/members",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("groupId" = String, Path, description = "The group's id"),
        ActAs,
    ),
    request_body = Members,
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The group after the change", body = Group),
        (status = 400, description = "A bad field (`INVALID_JSON`, `INVALID_FRAME`), a member not of the app or an unknown group (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope, the acting user is not the owner, or a new member is in too many groups (`FORBIDDEN`)", body = ErrorBody),
        (status = 413, description = "Body over the frame limit (`PAYLOAD_TOO_LARGE`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (`INVALID_FRAME`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn add_members(
    State(gateway): State<GatewayRole>,
    Path((app_id, group)): Path<(String, String)>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Group>, ApiError> {
    change_members(Op::AddMembers, gateway, app_id, group, q, headers, body).await
}

/// Remove members from a group.
///
/// As `GROUP_REMOVE_MEMBERS`: only the owner, who cannot be removed;
/// members and the removed get `GROUP_EVENT members_removed`.
#[utoipa::path(
    post,
    path = "/v1/apps/{appId}/groups/{groupId}/members/remove",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("groupId" = String, Path, description = "The group's id"),
        ActAs,
    ),
    request_body = Members,
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The group after the change", body = Group),
        (status = 400, description = "A bad field (`INVALID_JSON`, `INVALID_FRAME`), a member not of the app or an unknown group (`INVALID_RECIPIENT`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope, or the acting user is not the owner (`FORBIDDEN`)", body = ErrorBody),
        (status = 413, description = "Body over the frame limit (`PAYLOAD_TOO_LARGE`)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (`INVALID_FRAME`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn remove_members(
    State(gateway): State<GatewayRole>,
    Path((app_id, group)): Path<(String, String)>,
    q: Result<Query<ActAs>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Group>, ApiError> {
    change_members(Op::RemoveMembers, gateway, app_id, group, q, headers, body).await
}

/// List a user's groups.
///
/// As `GROUPS_LIST` from the user.
#[utoipa::path(
    get,
    path = "/v1/apps/{appId}/users/{userId}/groups",
    tag = "groups",
    params(
        ("appId" = String, Path, description = "The app's id"),
        ("userId" = String, Path, description = "A user of the app (`APPNAME-<id>`)"),
    ),
    security(("apiKey" = [])),
    responses(
        (status = 200, description = "The groups the user belongs to", body = GroupList),
        (status = 400, description = "Not a user of the app (`INVALID_FRAME`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (`NOT_AUTHENTICATED`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `groups` scope (`FORBIDDEN`)", body = ErrorBody),
        (status = 503, description = "The groups role did not answer; try again (`UNAVAILABLE`)", body = ErrorBody),
    )
)]
async fn list_groups(
    State(gateway): State<GatewayRole>,
    Path((app_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<GroupList>, ApiError> {
    let cmd = GroupCommand {
        op: Op::List,
        group: None,
        name: None,
        members: None,
    };
    let reply = run(&gateway, &headers, &app_id, Some(user_id), cmd).await?;
    Ok(axum::Json(GroupList {
        groups: reply.groups.into_iter().map(group_of).collect(),
    }))
}
