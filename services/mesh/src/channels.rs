//! The channels API (topics and rooms), served by the groups role: the
//! domain trait, its client (local, or the owning groups instance by
//! rendezvous hashing on the topic or room) and its tonic adapter.

use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_proto::mesh as pb;
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::pool::Pool;

/// Topics (publish/subscribe with recovery) and ephemeral rooms.
#[async_trait]
pub trait Channels: Send + Sync + 'static {
    async fn subscribe(
        &self,
        req: pb::TopicSubscribeRequest,
    ) -> Result<pb::TopicSubscribeReply, ServiceError>;
    async fn unsubscribe(
        &self,
        req: pb::TopicUnsubscribeRequest,
    ) -> Result<pb::TopicUnsubscribeReply, ServiceError>;
    async fn publish(&self, req: pb::PublishRequest) -> Result<pb::PublishReply, ServiceError>;
    async fn room_join(&self, req: pb::RoomJoinRequest) -> Result<pb::RoomJoinReply, ServiceError>;
    async fn room_leave(
        &self,
        req: pb::RoomLeaveRequest,
    ) -> Result<pb::RoomLeaveReply, ServiceError>;
    async fn room_send(&self, req: pb::RoomSendRequest) -> Result<pb::RoomSendReply, ServiceError>;
    async fn room_sync(&self, req: pb::RoomSyncRequest) -> Result<pb::RoomSyncReply, ServiceError>;
}

/// The key a topic or room is owned by: app and name, so that two apps'
/// channels of one name are two channels.
pub fn channel_key(app_id: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(app_id.len() + name.len() + 1);
    key.extend_from_slice(app_id.as_bytes());
    key.push(b'/');
    key.extend_from_slice(name.as_bytes());
    key
}

/// Client of the channels API: calls go to the groups instance that owns
/// the topic or room.
#[derive(Clone)]
pub struct ChannelsClient(Arc<dyn Channels>);

impl ChannelsClient {
    pub fn from_local(local: Arc<dyn Channels>) -> Self {
        ChannelsClient(local)
    }

    /// The groups instances in `pool`.
    pub fn from_pool(pool: Arc<Pool>) -> Self {
        ChannelsClient(Arc::new(RemoteChannels(pool)))
    }
}

impl From<ChannelsClient> for Arc<dyn Channels> {
    fn from(client: ChannelsClient) -> Self {
        client.0
    }
}

impl Deref for ChannelsClient {
    type Target = dyn Channels;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

struct RemoteChannels(Arc<Pool>);

use pb::channels_client::ChannelsClient as ChannelsGrpc;

macro_rules! owned_call {
    ($self:ident, $method:ident ($req:ident), $app:expr, $name:expr) => {{
        let key = channel_key($app, $name);
        $self
            .0
            .call(Some(&key), |channel| {
                let req = $req.clone();
                let mut client = ChannelsGrpc::new(channel)
                    .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
                async move { client.$method(req).await }
            })
            .await
    }};
}

fn room_of(req: &pb::RoomSendRequest) -> &str {
    req.message
        .as_ref()
        .map(|m| m.room.as_str())
        .unwrap_or_default()
}

fn topic_of(req: &pb::PublishRequest) -> (&str, &str) {
    req.publication
        .as_ref()
        .map(|p| (p.app_id.as_str(), p.topic.as_str()))
        .unwrap_or_default()
}

#[async_trait]
impl Channels for RemoteChannels {
    async fn subscribe(
        &self,
        req: pb::TopicSubscribeRequest,
    ) -> Result<pb::TopicSubscribeReply, ServiceError> {
        owned_call!(self, subscribe(req), &req.app_id, &req.topic)
    }
    async fn unsubscribe(
        &self,
        req: pb::TopicUnsubscribeRequest,
    ) -> Result<pb::TopicUnsubscribeReply, ServiceError> {
        owned_call!(self, unsubscribe(req), &req.app_id, &req.topic)
    }
    async fn publish(&self, req: pb::PublishRequest) -> Result<pb::PublishReply, ServiceError> {
        let (app, topic) = topic_of(&req);
        owned_call!(self, publish(req), app, topic)
    }
    async fn room_join(&self, req: pb::RoomJoinRequest) -> Result<pb::RoomJoinReply, ServiceError> {
        owned_call!(self, room_join(req), &req.app_id, &req.room)
    }
    async fn room_leave(
        &self,
        req: pb::RoomLeaveRequest,
    ) -> Result<pb::RoomLeaveReply, ServiceError> {
        owned_call!(self, room_leave(req), &req.app_id, &req.room)
    }
    async fn room_send(&self, req: pb::RoomSendRequest) -> Result<pb::RoomSendReply, ServiceError> {
        owned_call!(self, room_send(req), &req.app_id, room_of(&req))
    }
    async fn room_sync(&self, req: pb::RoomSyncRequest) -> Result<pb::RoomSyncReply, ServiceError> {
        owned_call!(self, room_sync(req), &req.app_id, &req.room)
    }
}

/// The channels API on the mesh (served by the groups role).
#[derive(Clone)]
pub struct ChannelsService(Arc<dyn Channels>);

impl ChannelsService {
    pub fn new(inner: Arc<dyn Channels>) -> Self {
        ChannelsService(inner)
    }

    pub fn into_server(self) -> pb::channels_server::ChannelsServer<Self> {
        pb::channels_server::ChannelsServer::new(self)
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
    }
}

/// One unary call with a server span continuing the caller's trace.
macro_rules! served {
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
        tracing::Instrument::instrument($self.0.$method($req.into_inner()), span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }};
}

#[tonic::async_trait]
impl pb::channels_server::Channels for ChannelsService {
    async fn subscribe(
        &self,
        req: Request<pb::TopicSubscribeRequest>,
    ) -> Result<Response<pb::TopicSubscribeReply>, Status> {
        served!(self.subscribe(req), "Channels/Subscribe")
    }
    async fn unsubscribe(
        &self,
        req: Request<pb::TopicUnsubscribeRequest>,
    ) -> Result<Response<pb::TopicUnsubscribeReply>, Status> {
        served!(self.unsubscribe(req), "Channels/Unsubscribe")
    }
    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishReply>, Status> {
        served!(self.publish(req), "Channels/Publish")
    }
    async fn room_join(
        &self,
        req: Request<pb::RoomJoinRequest>,
    ) -> Result<Response<pb::RoomJoinReply>, Status> {
        served!(self.room_join(req), "Channels/RoomJoin")
    }
    async fn room_leave(
        &self,
        req: Request<pb::RoomLeaveRequest>,
    ) -> Result<Response<pb::RoomLeaveReply>, Status> {
        served!(self.room_leave(req), "Channels/RoomLeave")
    }
    async fn room_send(
        &self,
        req: Request<pb::RoomSendRequest>,
    ) -> Result<Response<pb::RoomSendReply>, Status> {
        served!(self.room_send(req), "Channels/RoomSend")
    }
    async fn room_sync(
        &self,
        req: Request<pb::RoomSyncRequest>,
    ) -> Result<Response<pb::RoomSyncReply>, Status> {
        served!(self.room_sync(req), "Channels/RoomSync")
    }
}
