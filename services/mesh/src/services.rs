//! Each role's API as a domain trait over the generated protobuf messages.

use async_trait::async_trait;

use crate::error::ServiceError;
use crate::pb;

/// Client apps and credential checks.
#[async_trait]
pub trait Auth: Send + Sync + 'static {
    async fn verify_client(
        &self,
        req: pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError>;
    async fn get_app(&self, req: pb::GetAppRequest) -> Result<pb::App, ServiceError>;
    /// Checks an API key of the public REST API. Doubles that serve no
    /// REST calls need not implement it.
    async fn verify_api_key(
        &self,
        _req: pb::VerifyApiKeyRequest,
    ) -> Result<pb::VerifyApiKeyReply, ServiceError> {
        Err(ServiceError::unavailable("API keys are not checked here"))
    }
}

/// Where an envelope goes: local delivery, group fan-out or another domain.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError>;
    /// Direct messages of one sender connection, in order, as one unit.
    async fn route_batch(&self, req: pb::RouteBatchRequest)
    -> Result<pb::RouteReply, ServiceError>;
    /// FAST messages a gateway delivered itself, reported afterwards for
    /// the router's metrics and traces. Nothing to do by default.
    async fn observe(&self, _req: pb::ObserveRequest) -> Result<pb::ObserveReply, ServiceError> {
        Ok(pb::ObserveReply {})
    }
}

/// Inbound traffic from a neighbouring domain (the federation port).
#[async_trait]
pub trait Federation: Send + Sync + 'static {
    /// `from_domain` is the caller as the federation guard accepted it (a
    /// per-peer secret or a TLS certificate binds the name; one shared
    /// secret trusts every holder to name itself); the request's own field
    /// is not used.
    async fn forward(
        &self,
        from_domain: &str,
        req: pb::ForwardRequest,
    ) -> Result<pb::ForwardReply, ServiceError>;
}

/// Fan-out of a group message into per-recipient deliveries.
#[async_trait]
pub trait Groups: Send + Sync + 'static {
    async fn fanout(&self, req: pb::FanoutRequest) -> Result<pb::FanoutReply, ServiceError>;
}

/// Per-user inboxes, push to gateways, confirmations.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError>;
    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError>;
    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError>;
    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError>;
}

/// Push of messages to the live connections a gateway holds.
#[async_trait]
pub trait Gateway: Send + Sync + 'static {
    async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError>;
}

/// Persistent groups: a client's requests about a group, served by the
/// groups instance that owns it.
#[async_trait]
pub trait GroupAdmin: Send + Sync + 'static {
    async fn command(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError>;
}

/// The stored groups, served where the store is (the delivery process of a
/// deployment with the embedded store).
#[async_trait]
pub trait GroupRecords: Send + Sync + 'static {
    async fn call(
        &self,
        req: pb::GroupRecordsRequest,
    ) -> Result<pb::GroupRecordsReply, ServiceError>;
}

/// The webhook dead letters of an app, where the store is.
#[async_trait]
pub trait WebhookAdmin: Send + Sync + 'static {
    async fn dead_letters(
        &self,
        req: pb::DeadLettersRequest,
    ) -> Result<pb::DeadLettersReply, ServiceError>;
}
