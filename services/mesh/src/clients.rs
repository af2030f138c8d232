//! Clients of each role: a handle over either the local implementation (same
//! process, a direct call) or a tonic client on a (balanced) channel. The
//! caller's code is the same either way.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use switchboard_proto::mesh as pb;
use tonic::transport::Channel;

use crate::error::ServiceError;
use crate::services::{Auth, Delivery, Gateway, Groups, Router};

macro_rules! client_handle {
    ($(#[$doc:meta])* $client:ident, $trait:ident, $remote:ident, $grpc:ty) => {
        client_handle!($(#[$doc])* $client, $trait, $remote, $grpc, |channel| $remote(<$grpc>::new(channel)));
    };
    ($(#[$doc:meta])* $client:ident, $trait:ident, $remote:ident, $grpc:ty, |$ch:ident| $ctor:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $client(Arc<dyn $trait>);

        impl $client {
            /// A client calling the implementation in this process directly.
            pub fn from_local(local: Arc<dyn $trait>) -> Self {
                $client(local)
            }

            /// A client calling a remote instance over gRPC.
            pub fn from_channel($ch: Channel) -> Self {
                $client(Arc::new($ctor))
            }
        }

        impl From<$client> for Arc<dyn $trait> {
            fn from(client: $client) -> Self {
                client.0
            }
        }

        impl Deref for $client {
            type Target = dyn $trait;
            fn deref(&self) -> &Self::Target {
                self.0.as_ref()
            }
        }

    };
}

macro_rules! remote_call {
    ($self:ident . $method:ident ($req:expr)) => {
        $self
            .0
            .clone()
            .$method($req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(ServiceError::from)
    };
}

client_handle!(
    /// Client of the auth role.
    AuthClient, Auth, RemoteAuth, pb::auth_client::AuthClient<Channel>
);
client_handle!(
    /// Client of the router role.
    RouterClient, Router, RemoteRouter, pb::router_client::RouterClient<Channel>,
    |channel| RemoteRouter(
        pb::router_client::RouterClient::new(channel.clone()),
        pb::federation_client::FederationClient::new(channel),
    )
);
client_handle!(
    /// Client of the groups role.
    GroupsClient, Groups, RemoteGroups, pb::groups_client::GroupsClient<Channel>
);
client_handle!(
    /// Client of the delivery role.
    DeliveryClient, Delivery, RemoteDelivery, pb::delivery_client::DeliveryClient<Channel>
);
client_handle!(
    /// Client of one gateway.
    GatewayClient, Gateway, RemoteGateway, pb::gateway_client::GatewayClient<Channel>
);

struct RemoteAuth(pb::auth_client::AuthClient<Channel>);
struct RemoteRouter(
    pb::router_client::RouterClient<Channel>,
    pb::federation_client::FederationClient<Channel>,
);
struct RemoteGroups(pb::groups_client::GroupsClient<Channel>);
struct RemoteDelivery(pb::delivery_client::DeliveryClient<Channel>);
struct RemoteGateway(pb::gateway_client::GatewayClient<Channel>);

#[async_trait]
impl Auth for RemoteAuth {
    async fn verify_client(
        &self,
        req: pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError> {
        remote_call!(self.verify_client(req))
    }
    async fn get_app(&self, req: pb::GetAppRequest) -> Result<pb::App, ServiceError> {
        remote_call!(self.get_app(req))
    }
}

#[async_trait]
impl Router for RemoteRouter {
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        remote_call!(self.route(req))
    }
    async fn forward(&self, req: pb::ForwardRequest) -> Result<pb::ForwardReply, ServiceError> {
        // Inbound federation is its own service on the same mesh port.
        self.1
            .clone()
            .forward(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(ServiceError::from)
    }
}

#[async_trait]
impl Groups for RemoteGroups {
    async fn fanout(&self, req: pb::FanoutRequest) -> Result<pb::FanoutReply, ServiceError> {
        remote_call!(self.fanout(req))
    }
}

#[async_trait]
impl Delivery for RemoteDelivery {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        remote_call!(self.deliver(req))
    }
    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        remote_call!(self.fetch(req))
    }
    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        remote_call!(self.delivered(req))
    }
    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        remote_call!(self.presence_changed(req))
    }
}

#[async_trait]
impl Gateway for RemoteGateway {
    async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
        remote_call!(self.push(req))
    }
}

/// Finds the gateway that holds a connection, by gateway id. Presence names
/// gateways by id; this turns an id into a client.
pub trait GatewayDirectory: Send + Sync + 'static {
    fn gateway(&self, gateway_id: &str) -> Option<GatewayClient>;
}

/// A fixed set of gateways (the single-process default, and tests). Later the
/// etcd discovery feeds the same trait.
#[derive(Default)]
pub struct StaticGatewayDirectory {
    gateways: RwLock<HashMap<String, GatewayClient>>,
}

impl StaticGatewayDirectory {
    pub fn insert(&self, gateway_id: impl Into<String>, client: GatewayClient) {
        let mut map = self
            .gateways
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(gateway_id.into(), client);
    }
}

impl GatewayDirectory for StaticGatewayDirectory {
    fn gateway(&self, gateway_id: &str) -> Option<GatewayClient> {
        let map = self
            .gateways
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(gateway_id).cloned()
    }
}
