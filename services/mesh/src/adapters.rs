//! tonic server adapters: a local implementation exposed on the mesh port.
//! Errors become `tonic::Status` here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use switchboard_proto::mesh as pb;
use tonic::{Request, Response, Status, Streaming};

use crate::services::{Auth, Delivery, Gateway, Groups, Router};

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

macro_rules! unary {
    ($self:ident . $method:ident ($req:ident)) => {
        $self
            .0
            .$method($req.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    };
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
    /// Inbound federation, served by the router role.
    FederationService, Router, FederationServer
);
adapter!(
    /// The groups role on the mesh.
    GroupsService, Groups, GroupsServer
);
adapter!(
    /// The delivery role on the mesh.
    DeliveryService, Delivery, DeliveryServer
);
adapter!(
    /// A gateway on the mesh.
    GatewayService, Gateway, GatewayServer
);

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn verify_client(
        &self,
        req: Request<pb::VerifyClientRequest>,
    ) -> Result<Response<pb::VerifyClientReply>, Status> {
        unary!(self.verify_client(req))
    }
    async fn get_app(&self, req: Request<pb::GetAppRequest>) -> Result<Response<pb::App>, Status> {
        unary!(self.get_app(req))
    }
}

#[tonic::async_trait]
impl pb::router_server::Router for RouterService {
    async fn route(
        &self,
        req: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteReply>, Status> {
        unary!(self.route(req))
    }
}

#[tonic::async_trait]
impl pb::federation_server::Federation for FederationService {
    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardReply>, Status> {
        unary!(self.forward(req))
    }
}

#[tonic::async_trait]
impl pb::groups_server::Groups for GroupsService {
    async fn fanout(
        &self,
        req: Request<pb::FanoutRequest>,
    ) -> Result<Response<pb::FanoutReply>, Status> {
        unary!(self.fanout(req))
    }
}

#[tonic::async_trait]
impl pb::delivery_server::Delivery for DeliveryService {
    async fn deliver(
        &self,
        req: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        unary!(self.deliver(req))
    }
    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        unary!(self.fetch(req))
    }
    async fn delivered(
        &self,
        req: Request<pb::DeliveredRequest>,
    ) -> Result<Response<pb::DeliveredReply>, Status> {
        unary!(self.delivered(req))
    }
    async fn presence_changed(
        &self,
        req: Request<pb::PresenceChangeRequest>,
    ) -> Result<Response<pb::PresenceChangeReply>, Status> {
        unary!(self.presence_changed(req))
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::PushReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn push(&self, req: Request<pb::PushRequest>) -> Result<Response<pb::PushReply>, Status> {
        unary!(self.push(req))
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
        Ok(Response::new(Box::pin(replies)))
    }
}
