//! The public gRPC API, `switchboard.api.v1.Messaging`, on the client port
//! beside HTTP and WebSocket (HTTP/2 requests to its paths), with server
//! reflection. Like the REST handlers, each call is a thin adapter over a
//! [`Session`]: the API key in the `authorization` metadata is checked
//! with the same scopes, then the session acts for a user of the app and
//! runs the same code a WebSocket frame would.

use std::future::Future;

use axum::Router;
use switchboard_config::ApiScope;
use switchboard_mesh::{ServiceError, pb};
use switchboard_proto::api::v1 as api;
use tonic::{Request, Response, Status};

use crate::commands::{GroupCommand, GroupMessage, Message, Publish, RequestMeta};
use crate::session::{ApiGrant, ChannelOutcome, KeyCheck, Session};
use crate::{GatewayError, GatewayRole};

use api::messaging_server::{Messaging, MessagingServer};
use pb::GroupOp as Op;

/// The metadata key that carries the protocol's error code of a failed
/// call (as the mesh's own errors do).
const ERROR_CODE_KEY: &str = "x-switchboard-error";

/// The gRPC services' routes, for the client port's router: `Messaging`
/// and server reflection (v1 and v1alpha, which older grpcurl asks).
pub fn router(gateway: &GatewayRole) -> Result<Router, GatewayError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // A call carries what one WebSocket frame would.
    let limit = gateway.inner.limits.max_frame_bytes;
    let messaging = MessagingServer::new(MessagingApi {
        gateway: gateway.clone(),
    })
    .max_decoding_message_size(limit);
    // Each service under its own path prefix, as tonic's `Routes` mounts
    // them, but without its catch-all fallback: other paths keep the HTTP
    // router's answers.
    Ok(Router::new()
        .route_service(&service_path(&messaging), messaging)
        .route_service(&service_path(&reflection_v1), reflection_v1)
        .route_service(&service_path(&reflection_v1alpha), reflection_v1alpha))
}

fn service_path<S: tonic::server::NamedService>(_: &S) -> String {
    format!("/{}/{{*rest}}", S::NAME)
}

/// The `Messaging` service.
#[derive(Clone)]
pub struct MessagingApi {
    gateway: GatewayRole,
}

/// A failed call: the shared code's gRPC status, the code at the start of
/// the message and in the `x-switchboard-error` metadata.
fn status(e: ServiceError) -> Status {
    let mut status = Status::new(
        e.code.grpc_code(),
        format!("{}: {}", e.code.as_str(), e.message),
    );
    if let Ok(v) = e.code.as_str().parse() {
        status.metadata_mut().insert(ERROR_CODE_KEY, v);
    }
    status
}

fn invalid(message: impl Into<String>) -> Status {
    status(ServiceError::invalid(message))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The key of `authorization: Bearer <key>`.
fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn group_of(record: pb::GroupRecord) -> api::Group {
    api::Group {
        group: record.group,
        name: record.name,
        owner: record.owner,
        members: record.members,
        created_ms: record.created_ms,
    }
}

/// Counts a call of `operation` by its answer's code, and times it.
async fn counted<T>(
    operation: &'static str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    let started = std::time::Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    metrics::counter!(
        "switchboard_grpc_api_requests_total",
        "operation" => operation,
        "code" => format!("{code:?}")
    )
    .increment(1);
    metrics::histogram!("switchboard_grpc_api_request_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    result.map(Response::new)
}

impl MessagingApi {
    /// A new session and the grant of the request's key for `scope`.
    async fn grant<T>(
        &self,
        req: &Request<T>,
        app_id: &str,
        scope: ApiScope,
    ) -> Result<(Session, ApiGrant), Status> {
        let session = self.gateway.session();
        let grant = session
            .check_key(KeyCheck {
                app_id,
                key: bearer(req),
                scope,
            })
            .await
            .map_err(status)?;
        Ok((session, grant))
    }

    /// A session acting for `user` (empty: the app's master user) with
    /// the request's key checked for `scope`.
    async fn acting<T>(
        &self,
        req: &Request<T>,
        app_id: &str,
        user: &str,
        scope: ApiScope,
    ) -> Result<Session, Status> {
        let (mut session, grant) = self.grant(req, app_id, scope).await?;
        session
            .act_for(grant, non_empty(user.to_owned()))
            .map_err(status)?;
        Ok(session)
    }

    /// A group request, as the GROUP_* frame from the acting user.
    async fn group<T>(
        &self,
        req: &Request<T>,
        app_id: &str,
        as_user: &str,
        cmd: GroupCommand,
    ) -> Result<pb::GroupCommandReply, Status> {
        let session = self.acting(req, app_id, as_user, ApiScope::Groups).await?;
        let outcome = session.group_command(cmd).await.map_err(status)?;
        Ok(outcome.reply)
    }

    async fn one_group<T>(
        &self,
        req: &Request<T>,
        app_id: &str,
        as_user: &str,
        cmd: GroupCommand,
    ) -> Result<api::Group, Status> {
        let reply = self.group(req, app_id, as_user, cmd).await?;
        reply
            .group
            .map(group_of)
            .ok_or_else(|| status(ServiceError::internal("the groups role answered no group")))
    }

    async fn send(
        &self,
        req: Request<api::SendMessageRequest>,
    ) -> Result<api::SendMessageReply, Status> {
        let (mut session, grant) = self
            .grant(&req, &req.get_ref().app_id, ApiScope::Send)
            .await?;
        let meta = RequestMeta {
            reference: None,
            traceparent: traceparent(&req),
        };
        let body = req.into_inner();
        let Some(target) = body.target else {
            return Err(invalid("give one of to, users, group and topic"));
        };
        let feature = match body.feature.map(api::Feature::try_from) {
            None | Some(Ok(api::Feature::Reliable)) => pb::Feature::Reliable,
            Some(Ok(api::Feature::Fast)) => pb::Feature::Fast,
            Some(Err(_)) => return Err(invalid("unknown feature")),
        };
        let id = non_empty(body.id);
        let is_topic = matches!(target, api::send_message_request::Target::Topic(_));
        if is_topic && (id.is_some() || body.feature.is_some()) {
            return Err(invalid(
                "id and feature do not apply to a topic publication",
            ));
        }
        session
            .act_for(grant, non_empty(body.from))
            .map_err(status)?;
        let meta = RequestMeta {
            reference: non_empty(body.reference),
            ..meta
        };
        use api::send_message_request::Target;
        let accepted = match target {
            Target::Topic(topic) => {
                let published = session
                    .publish(Publish {
                        topic,
                        content: body.content,
                    })
                    .await
                    .map_err(status)?;
                let ChannelOutcome::Published { id, offset, .. } = published else {
                    return Err(status(ServiceError::internal("unexpected publish outcome")));
                };
                return Ok(api::SendMessageReply {
                    id,
                    offset: Some(offset),
                    inbox_full: Vec::new(),
                });
            }
            Target::To(to) => {
                let msg = Message {
                    to,
                    content: body.content,
                    id,
                    feature,
                };
                session.send_direct(msg, &meta).await
            }
            Target::Users(users) => {
                let msg = GroupMessage {
                    to: Some(users.users),
                    group: None,
                    content: body.content,
                    id,
                    feature,
                };
                session.send_group(msg, &meta).await
            }
            Target::Group(group) => {
                let msg = GroupMessage {
                    to: None,
                    group: Some(group),
                    content: body.content,
                    id,
                    feature,
                };
                session.send_group(msg, &meta).await
            }
        }
        .map_err(status)?;
        Ok(api::SendMessageReply {
            id: accepted.id,
            offset: None,
            inbox_full: accepted.inbox_full,
        })
    }
}

fn command(op: Op, group: &str) -> GroupCommand {
    GroupCommand {
        op,
        group: non_empty(group.to_owned()),
        name: None,
        members: None,
    }
}

#[tonic::async_trait]
impl Messaging for MessagingApi {
    async fn send_message(
        &self,
        req: Request<api::SendMessageRequest>,
    ) -> Result<Response<api::SendMessageReply>, Status> {
        counted("send_message", self.send(req)).await
    }

    async fn get_presence(
        &self,
        req: Request<api::UserRequest>,
    ) -> Result<Response<api::PresenceReply>, Status> {
        counted("user_presence", async {
            let body = req.get_ref();
            if body.user_id.is_empty() {
                return Err(invalid("missing field user_id"));
            }
            let session = self
                .acting(&req, &body.app_id, &body.user_id, ApiScope::Presence)
                .await?;
            let online = session.is_online(&body.user_id).await.map_err(status)?;
            Ok(api::PresenceReply {
                user_id: body.user_id.clone(),
                online,
            })
        })
        .await
    }

    async fn list_online(
        &self,
        req: Request<api::OnlineRequest>,
    ) -> Result<Response<api::OnlineReply>, Status> {
        counted("online_users", async {
            let (session, grant) = self
                .grant(&req, &req.get_ref().app_id, ApiScope::Presence)
                .await?;
            let (users, truncated) = session.online_users(&grant).await.map_err(status)?;
            Ok(api::OnlineReply { users, truncated })
        })
        .await
    }

    async fn get_inbox_depth(
        &self,
        req: Request<api::UserRequest>,
    ) -> Result<Response<api::InboxDepthReply>, Status> {
        counted("inbox_depth", async {
            let body = req.get_ref();
            if body.user_id.is_empty() {
                return Err(invalid("missing field user_id"));
            }
            let session = self
                .acting(&req, &body.app_id, &body.user_id, ApiScope::Admin)
                .await?;
            let depth = session.inbox_depth().await.map_err(status)?;
            Ok(api::InboxDepthReply {
                user_id: body.user_id.clone(),
                depth,
            })
        })
        .await
    }

    async fn create_group(
        &self,
        req: Request<api::CreateGroupRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("create_group", async {
            let body = req.get_ref();
            let cmd = GroupCommand {
                op: Op::Create,
                group: non_empty(body.group.clone()),
                name: Some(body.name.clone()),
                members: Some(body.members.clone()),
            };
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn get_group(
        &self,
        req: Request<api::GroupRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("get_group", async {
            let body = req.get_ref();
            let cmd = command(Op::Info, &body.group);
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn add_members(
        &self,
        req: Request<api::GroupMembersRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("add_members", async {
            let body = req.get_ref();
            let cmd = GroupCommand {
                members: Some(body.members.clone()),
                ..command(Op::AddMembers, &body.group)
            };
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn remove_members(
        &self,
        req: Request<api::GroupMembersRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("remove_members", async {
            let body = req.get_ref();
            let cmd = GroupCommand {
                members: Some(body.members.clone()),
                ..command(Op::RemoveMembers, &body.group)
            };
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn rename_group(
        &self,
        req: Request<api::RenameGroupRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("rename_group", async {
            let body = req.get_ref();
            let cmd = GroupCommand {
                name: Some(body.name.clone()),
                ..command(Op::Rename, &body.group)
            };
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn delete_group(
        &self,
        req: Request<api::GroupRequest>,
    ) -> Result<Response<api::Group>, Status> {
        counted("delete_group", async {
            let body = req.get_ref();
            let cmd = command(Op::Delete, &body.group);
            self.one_group(&req, &body.app_id, &body.as_user, cmd).await
        })
        .await
    }

    async fn list_groups(
        &self,
        req: Request<api::UserRequest>,
    ) -> Result<Response<api::GroupList>, Status> {
        counted("list_groups", async {
            let body = req.get_ref();
            if body.user_id.is_empty() {
                return Err(invalid("missing field user_id"));
            }
            let reply = self
                .group(&req, &body.app_id, &body.user_id, command(Op::List, ""))
                .await?;
            Ok(api::GroupList {
                groups: reply.groups.into_iter().map(group_of).collect(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_mesh::ErrorCode;

    #[test]
    fn errors_carry_the_shared_code() {
        let s = status(ServiceError::new(ErrorCode::Forbidden, "no"));
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(s.message(), "FORBIDDEN: no");
        assert_eq!(
            s.metadata()
                .get(ERROR_CODE_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("FORBIDDEN")
        );
    }
}
