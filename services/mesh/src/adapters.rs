//! tonic server adapters: a local implementation exposed on the mesh port.
//! Errors become `tonic::Status` here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use switchboard_proto::mesh as pb;
use tonic::{Request, Response, Status, Streaming};

use crate::services::{Auth, Delivery, Federation, Gateway, Groups, Router};

macro_rules! adapter {
    ($(#[$doc:meta])* $name:ident, $trait:ident, $server:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(Arc<dyn $trait>);

        impl $name {
            pub fn new(inner: Arc<dyn $trait>) -> Self {
                $name(inner)
            }

            pub fn into_server(self) -> $server<Self> {
                $server::new(self)
                    .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
            }
        }
    };
}

/// One unary call: a server span continuing the caller's trace, the call,
/// and its duration by method and status.
macro_rules! unary {
    ($self:ident . $method:ident ($req:ident), $rpc:literal) => {{
        let span = tracing::info_span!(
            "mesh.server",
            otel.name = $rpc,
            otel.kind = "server",
            rpc.method = $rpc
        );
        switchboard_telemetry::continue_trace(&span, |key| {
            $req.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let started = std::time::Instant::now();
        let result = tracing::Instrument::instrument($self.0.$method($req.into_inner()), span)
            .await
            .map(Response::new)
            .map_err(Status::from);
        let status = match &result {
            Ok(_) => "ok",
            Err(s) => crate::error::status_label(s.code()),
        };
        metrics::histogram!(
            "switchboard_mesh_server_duration_seconds",
            "method" => $rpc,
            "status" => status
        )
        .record(started.elapsed().as_secs_f64());
        result
    }};
}

use pb::auth_server::AuthServer;
use pb::delivery_server::DeliveryServer;
use pb::federation_server::FederationServer;
use pb::gateway_server::GatewayServer;
use pb::groups_server::GroupsServer;
use pb::router_server::RouterServer;

adapter!(
    /// The auth role on the mesh.
    AuthService, Auth, AuthServer
);
adapter!(
    /// The router role on the mesh.
    RouterService, Router, RouterServer
);
adapter!(
    /// Inbound federation, served by the router role on the federation port.
    FederationService, Federation, FederationServer
);
adapter!(
    /// The groups role on the mesh.
    GroupsService, Groups, GroupsServer
);
adapter!(
    /// The delivery role on the mesh.
    DeliveryService, Delivery, DeliveryServer
);
/// A gateway on the mesh. Its push streams end when `closing` is cancelled,
/// so a graceful stop does not wait for delivery to hang up.
#[derive(Clone)]
pub struct GatewayService(Arc<dyn Gateway>, tokio_util::sync::CancellationToken);

impl GatewayService {
    pub fn new(inner: Arc<dyn Gateway>, closing: tokio_util::sync::CancellationToken) -> Self {
        GatewayService(inner, closing)
    }

    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn verify_client(
        &self,
        req: Request<pb::VerifyClientRequest>,
    ) -> Result<Response<pb::VerifyClientReply>, Status> {
        unary!(self.verify_client(req), "Auth/VerifyClient")
    }
    async fn get_app(&self, req: Request<pb::GetAppRequest>) -> Result<Response<pb::App>, Status> {
        unary!(self.get_app(req), "Auth/GetApp")
    }
    async fn verify_api_key(
        &self,
        req: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyReply>, Status> {
        unary!(self.verify_api_key(req), "Auth/VerifyApiKey")
    }
}

#[tonic::async_trait]
impl pb::router_server::Router for RouterService {
    async fn route(
        &self,
        req: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteReply>, Status> {
        unary!(self.route(req), "Router/Route")
    }

    async fn route_batch(
        &self,
        req: Request<pb::RouteBatchRequest>,
    ) -> Result<Response<pb::RouteReply>, Status> {
        unary!(self.route_batch(req), "Router/RouteBatch")
    }

    async fn route_many(
        &self,
        req: Request<pb::RouteManyRequest>,
    ) -> Result<Response<pb::RouteManyReply>, Status> {
        let started = std::time::Instant::now();
        let reply = crate::batched::route_many(self.0.clone(), req.into_inner()).await;
        batch_served("Router/RouteMany", started);
        Ok(Response::new(reply))
    }

    async fn observe(
        &self,
        req: Request<pb::ObserveRequest>,
    ) -> Result<Response<pb::ObserveReply>, Status> {
        unary!(self.observe(req), "Router/Observe")
    }
}

/// A batch call's duration (its items' outcomes are in its reply).
fn batch_served(rpc: &'static str, started: std::time::Instant) {
    metrics::histogram!(
        "switchboard_mesh_server_duration_seconds",
        "method" => rpc,
        "status" => "ok"
    )
    .record(started.elapsed().as_secs_f64());
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardReply>, Status> {
        // The guard put the caller's proven domain into the extensions.
        let from = req
            .extensions()
            .get::<crate::credentials::PeerDomain>()
            .map(|d| d.0.clone())
            .ok_or_else(|| Status::unauthenticated("no federation credential"))?;
        let call = FederationCall(FromPeer(self.0.clone(), from));
        unary!(call.forward(req), "Federation/Forward")
    }
}

/// One federation call with its proven caller, shaped for `unary!`.
struct FederationCall(FromPeer);
struct FromPeer(Arc<dyn Federation>, String);

impl FromPeer {
    async fn forward(
        &self,
        req: pb::ForwardRequest,
    ) -> Result<pb::ForwardReply, crate::ServiceError> {
        self.0.forward(&self.1, req).await
    }
}

#[tonic::async_trait]
impl pb::groups_server::Groups for GroupsService {
    async fn fanout(
        &self,
        req: Request<pb::FanoutRequest>,
    ) -> Result<Response<pb::FanoutReply>, Status> {
        unary!(self.fanout(req), "Groups/Fanout")
    }
}

#[tonic::async_trait]
impl pb::delivery_server::Delivery for DeliveryService {
    async fn deliver(
        &self,
        req: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        unary!(self.deliver(req), "Delivery/Deliver")
    }
    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        unary!(self.fetch(req), "Delivery/Fetch")
    }
    async fn delivered(
        &self,
        req: Request<pb::DeliveredRequest>,
    ) -> Result<Response<pb::DeliveredReply>, Status> {
        unary!(self.delivered(req), "Delivery/Delivered")
    }
    async fn presence_changed(
        &self,
        req: Request<pb::PresenceChangeRequest>,
    ) -> Result<Response<pb::PresenceChangeReply>, Status> {
        unary!(self.presence_changed(req), "Delivery/PresenceChanged")
    }
    async fn deliver_many(
        &self,
        req: Request<pb::DeliverManyRequest>,
    ) -> Result<Response<pb::DeliverManyReply>, Status> {
        let started = std::time::Instant::now();
        let reply = crate::batched::deliver_many(self.0.clone(), req.into_inner()).await;
        batch_served("Delivery/DeliverMany", started);
        Ok(Response::new(reply))
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::PushReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn push(&self, req: Request<pb::PushRequest>) -> Result<Response<pb::PushReply>, Status> {
        unary!(self.push(req), "Gateway/Push")
    }

    type PushStreamStream = PushStream;

    async fn push_stream(
        &self,
        req: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<Self::PushStreamStream>, Status> {
        let gateway = self.0.clone();
        let replies = req.into_inner().then(move |item| {
            let gateway = gateway.clone();
            async move {
                match item {
                    Ok(push) => gateway.push(push).await.map_err(Status::from),
                    Err(status) => Err(status),
                }
            }
        });
        let closing = self.1.clone().cancelled_owned();
        Ok(Response::new(Box::pin(replies.take_until(closing))))
    }
}

// ---------------------------------------------------------------- persistent groups

use crate::services::{GroupAdmin, GroupRecords};
use pb::group_admin_server::GroupAdminServer;
use pb::group_records_server::GroupRecordsServer;

adapter!(
    /// Persistent groups of the groups role on the mesh.
    GroupAdminService, GroupAdmin, GroupAdminServer
);
adapter!(
    /// The stored groups on the mesh, where the store is.
    GroupRecordsService, GroupRecords, GroupRecordsServer
);

#[tonic::async_trait]
impl pb::group_admin_server::GroupAdmin for GroupAdminService {
    async fn command(
        &self,
        req: Request<pb::GroupCommandRequest>,
    ) -> Result<Response<pb::GroupCommandReply>, Status> {
        unary!(self.command(req), "GroupAdmin/Command")
    }
}

#[tonic::async_trait]
impl pb::group_records_server::GroupRecords for GroupRecordsService {
    async fn call(
        &self,
        req: Request<pb::GroupRecordsRequest>,
    ) -> Result<Response<pb::GroupRecordsReply>, Status> {
        unary!(self.call(req), "GroupRecords/Call")
    }
}

// ---------------------------------------------------------------- webhooks

use crate::services::WebhookAdmin;
use pb::webhook_admin_server::WebhookAdminServer;

adapter!(
    /// The webhook dead letters on the mesh, where the store is.
    WebhookAdminService, WebhookAdmin, WebhookAdminServer
);

#[tonic::async_trait]
impl pb::webhook_admin_server::WebhookAdmin for WebhookAdminService {
    async fn dead_letters(
        &self,
        req: Request<pb::DeadLettersRequest>,
    ) -> Result<Response<pb::DeadLettersReply>, Status> {
        unary!(self.dead_letters(req), "WebhookAdmin/DeadLetters")
    }
}
