//! Clients of each role: a handle over either the local implementation (same
//! process, a direct call) or the role's instances on the mesh (a [`Pool`]
//! with failover). The caller's code is the same either way.

use foldhash::HashMap;
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use switchboard_proto::mesh as pb;
use tonic::transport::Channel;

use crate::coalescer::{BatchLimits, Coalescer};
use crate::connector::MeshConnector;
use crate::credentials::MeshCredentials;
use crate::error::ServiceError;
use crate::gateway_link::GatewayLink;
use crate::pool::Pool;
use crate::services::{Auth, Delivery, Gateway, Groups, Router};

macro_rules! client_handle {
    ($(#[$doc:meta])* $client:ident, $trait:ident, $remote:ident, $role:literal) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $client(Arc<dyn $trait>);

        impl $client {
            /// A client calling the implementation in this process directly.
            pub fn from_local(local: Arc<dyn $trait>) -> Self {
                $client(local)
            }

            /// A client calling the role's instances in `pool`.
            pub fn from_pool(pool: Arc<Pool>) -> Self {
                $client(Arc::new($remote(pool)))
            }

            /// A client calling one remote instance over gRPC.
            pub fn from_channel(channel: Channel) -> Self {
                Self::from_pool(Pool::fixed($role, channel, MeshCredentials::default()))
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

/// A generated gRPC client on `channel`, with the mesh's message size cap.
macro_rules! grpc_client {
    ($grpc:ident, $channel:expr) => {
        $grpc::new($channel)
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
    };
}

/// One call through the pool: `$grpc::new(channel).$method(req.clone())`,
/// retried on other instances when one cannot be reached.
macro_rules! pooled {
    ($self:ident, $grpc:ident :: $method:ident ($req:ident), key = $key:expr) => {
        $self
            .0
            .call($key, |channel| {
                let req = $req.clone();
                let mut client = grpc_client!($grpc, channel);
                async move { client.$method(req).await }
            })
            .await
    };
    ($self:ident, $grpc:ident :: $method:ident ($req:ident)) => {
        pooled!($self, $grpc::$method($req), key = None)
    };
}

client_handle!(
    /// Client of the auth role.
    AuthClient, Auth, RemoteAuth, "auth"
);
client_handle!(
    /// Client of the router role.
    RouterClient, Router, RemoteRouter, "router"
);
client_handle!(
    /// Client of the groups role. Calls go to the instance that owns the
    /// group (rendezvous hashing over the live instances).
    GroupsClient, Groups, RemoteGroups, "groups"
);
client_handle!(
    /// Client of the delivery role.
    DeliveryClient, Delivery, RemoteDelivery, "delivery"
);

struct RemoteAuth(Arc<Pool>);
struct RemoteRouter(Arc<Pool>);
struct RemoteGroups(Arc<Pool>);
struct RemoteDelivery(Arc<Pool>);

/// The router instances, with the coalescer that gathers this process's
/// route calls into `RouteMany` calls. Only through
/// [`RouterClient::from_pool_batched`] (`[mesh_batch] enabled`).
struct BatchedRouter(Arc<Coalescer<pb::RouteManyItem, pb::RouteReply>>);

/// The delivery instances, with the coalescer that gathers this process's
/// deliver calls into `DeliverMany` calls per owner; its other calls are
/// [`RemoteDelivery`]'s. Only through [`DeliveryClient::from_pool_batched`]
/// (`[mesh_batch] enabled`).
struct BatchedDelivery {
    remote: RemoteDelivery,
    batches: Arc<Coalescer<crate::batched::KeyedDeliverItem, pb::DeliverReply>>,
}

impl RouterClient {
    /// A client calling the router instances in `pool` through a
    /// coalescer: concurrent route calls go as `RouteMany` batches bounded
    /// by `limits`. [`RouterClient::from_pool`] makes one unary call per call.
    pub fn from_pool_batched(pool: Arc<Pool>, limits: BatchLimits) -> Self {
        RouterClient(Arc::new(BatchedRouter(crate::batched::router_batches(
            pool, limits,
        ))))
    }
}

impl DeliveryClient {
    /// A client calling the delivery instances in `pool` whose deliver
    /// calls go through a coalescer, as `DeliverMany` batches per owner
    /// bounded by `limits`. [`DeliveryClient::from_pool`] makes one unary
    /// call per call.
    pub fn from_pool_batched(pool: Arc<Pool>, limits: BatchLimits) -> Self {
        let batches = crate::batched::delivery_batches(pool.clone(), limits);
        DeliveryClient(Arc::new(BatchedDelivery {
            remote: RemoteDelivery(pool),
            batches,
        }))
    }
}

impl BatchedRouter {
    /// One route item through the coalescer.
    async fn batched(&self, item: pb::RouteManyItem) -> Result<pb::RouteReply, ServiceError> {
        let order = crate::batched::route_order_key(&item);
        let bytes = prost::Message::encoded_len(&item);
        self.0.call("", &order, bytes, item).await
    }
}

use pb::auth_client::AuthClient as AuthGrpc;
use pb::delivery_client::DeliveryClient as DeliveryGrpc;
use pb::groups_client::GroupsClient as GroupsGrpc;
use pb::router_client::RouterClient as RouterGrpc;

#[async_trait]
impl Auth for RemoteAuth {
    async fn verify_client(
        &self,
        req: pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError> {
        pooled!(self, AuthGrpc::verify_client(req))
    }
    async fn get_app(&self, req: pb::GetAppRequest) -> Result<pb::App, ServiceError> {
        pooled!(self, AuthGrpc::get_app(req))
    }
    async fn verify_api_key(
        &self,
        req: pb::VerifyApiKeyRequest,
    ) -> Result<pb::VerifyApiKeyReply, ServiceError> {
        pooled!(self, AuthGrpc::verify_api_key(req))
    }
}

#[async_trait]
impl Router for RemoteRouter {
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        pooled!(self, RouterGrpc::route(req))
    }
    async fn route_batch(
        &self,
        req: pb::RouteBatchRequest,
    ) -> Result<pb::RouteReply, ServiceError> {
        self.0
            .call(None, |channel| {
                let req = req.clone();
                let mut client = grpc_client!(RouterGrpc, channel);
                async move {
                    match client.route_batch(req.clone()).await {
                        // A router from before RouteBatch (a cluster being
                        // upgraded): one Route per message, in order.
                        Err(status) if status.code() == tonic::Code::Unimplemented => {
                            let mut recipients = 0u32;
                            for envelope in req.envelopes {
                                let reply = client
                                    .route(pb::RouteRequest {
                                        envelope: Some(envelope),
                                    })
                                    .await?;
                                recipients =
                                    recipients.saturating_add(reply.into_inner().recipients);
                            }
                            Ok(tonic::Response::new(pb::RouteReply {
                                recipients,
                                ..Default::default()
                            }))
                        }
                        other => other,
                    }
                }
            })
            .await
    }
    async fn observe(&self, req: pb::ObserveRequest) -> Result<pb::ObserveReply, ServiceError> {
        pooled!(self, RouterGrpc::observe(req))
    }
}

#[async_trait]
impl Router for BatchedRouter {
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        self.batched(pb::RouteManyItem {
            single: Some(req),
            traceparent: crate::batched::current_traceparent(),
            ..Default::default()
        })
        .await
    }
    async fn route_batch(
        &self,
        req: pb::RouteBatchRequest,
    ) -> Result<pb::RouteReply, ServiceError> {
        self.batched(pb::RouteManyItem {
            batch: Some(req),
            traceparent: crate::batched::current_traceparent(),
            single: None,
        })
        .await
    }
}

/// The key a group message is owned by: the group id, or for an ad-hoc
/// group (a list of users) the message id, which spreads them evenly.
fn group_key(req: &pb::FanoutRequest) -> Option<Vec<u8>> {
    let envelope = req.envelope.as_ref()?;
    let key = if envelope.group.is_empty() {
        &envelope.id
    } else {
        &envelope.group
    };
    Some(key.as_bytes().to_vec())
}

#[async_trait]
impl Groups for RemoteGroups {
    async fn fanout(&self, req: pb::FanoutRequest) -> Result<pb::FanoutReply, ServiceError> {
        let key = group_key(&req);
        pooled!(self, GroupsGrpc::fanout(req), key = key.as_deref())
    }
}

#[async_trait]
impl Delivery for RemoteDelivery {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        self.deliver_by_owner(req, |key, part| async move {
            pooled!(
                self,
                DeliveryGrpc::deliver(part),
                key = Some(key.as_slice())
            )
        })
        .await
    }
    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        let key = [crate::pool::inbox_key(&req.app_id, &req.user_id)];
        let mut parts = self
            .by_owner_with_retry(&key, |key, _| {
                let req = req.clone();
                async move { pooled!(self, DeliveryGrpc::fetch(req), key = Some(key.as_slice())) }
            })
            .await?;
        Ok(parts.pop().map(|(_, reply)| reply).unwrap_or_default())
    }
    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        let keys: Vec<Vec<u8>> = req
            .items
            .iter()
            .map(|i| crate::pool::inbox_key(&i.app_id, &i.user_id))
            .collect();
        let parts = self
            .by_owner_with_retry(&keys, |key, positions| {
                let part = pb::DeliveredRequest {
                    items: positions.iter().map(|&i| req.items[i].clone()).collect(),
                };
                async move {
                    pooled!(
                        self,
                        DeliveryGrpc::delivered(part),
                        key = Some(key.as_slice())
                    )
                }
            })
            .await?;
        let removed = parts
            .iter()
            .fold(0u32, |sum, (_, r)| sum.saturating_add(r.removed));
        Ok(pb::DeliveredReply { removed })
    }
    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        let key = crate::pool::inbox_key(&req.app_id, &req.user_id);
        pooled!(
            self,
            DeliveryGrpc::presence_changed(req),
            key = Some(key.as_slice())
        )
    }
}

/// [`RemoteDelivery`]'s, except that each owner's part of a deliver call
/// goes through the coalescer.
#[async_trait]
impl Delivery for BatchedDelivery {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        self.remote
            .deliver_by_owner(req, |key, part| self.batched(key, part))
            .await
    }
    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        self.remote.fetch(req).await
    }
    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        self.remote.delivered(req).await
    }
    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        self.remote.presence_changed(req).await
    }
}

impl BatchedDelivery {
    /// One deliver call to the owner of `key`, through the coalescer.
    async fn batched(
        &self,
        key: Vec<u8>,
        req: pb::DeliverRequest,
    ) -> Result<pb::DeliverReply, ServiceError> {
        let owner = self.remote.0.owner(&key).unwrap_or_default();
        let order = crate::batched::deliver_order_key(&req);
        let item = pb::DeliverManyItem {
            request: Some(req),
            traceparent: crate::batched::current_traceparent(),
        };
        let bytes = prost::Message::encoded_len(&item);
        self.batches.call(&owner, &order, bytes, (key, item)).await
    }
}

/// The inboxes whose owners a delivery call goes to: each envelope's
/// recipient's, except that the copies of one send with a client-given id
/// (a group message) all go with the first copy's: they are stored in one
/// write, so that they are all new or all repeats (see `Store::append`).
pub fn routing_keys(envelopes: &[pb::Envelope]) -> Vec<Vec<u8>> {
    let mut first_copy: HashMap<(&str, &str, &str), Vec<u8>> = HashMap::default();
    envelopes
        .iter()
        .map(|e| {
            let own = crate::pool::inbox_key(&e.app_id, e.to.first().map_or("", String::as_str));
            if !e.client_id {
                return own;
            }
            first_copy
                .entry((e.app_id.as_str(), e.from.as_str(), e.id.as_str()))
                .or_insert(own)
                .clone()
        })
        .collect()
}

impl RemoteDelivery {
    /// A deliver call split by the owners of its inboxes: `send` makes
    /// each owner's part of the call (`key` picks the owner), parts that
    /// met an inbox on the move are split again and sent again
    /// ([`RemoteDelivery::by_owner_with_retry`]), and the parts' replies
    /// are put back in the envelopes' order.
    async fn deliver_by_owner<F, Fut>(
        &self,
        req: pb::DeliverRequest,
        send: F,
    ) -> Result<pb::DeliverReply, ServiceError>
    where
        F: Fn(Vec<u8>, pb::DeliverRequest) -> Fut,
        Fut: std::future::Future<Output = Result<pb::DeliverReply, ServiceError>>,
    {
        let n = req.envelopes.len();
        let keys = routing_keys(&req.envelopes);
        let mut reply = pb::DeliverReply {
            seqs: vec![0; n],
            ..Default::default()
        };
        // The sender's copies go with one call (they are pushed once).
        let sent_copies = std::sync::Mutex::new(Some(req.sent_copies));
        let sent_copies = &sent_copies;
        let send = &send;
        let parts = self
            .by_owner_with_retry(&keys, |key, positions| {
                let part = pb::DeliverRequest {
                    envelopes: positions
                        .iter()
                        .map(|&i| req.envelopes[i].clone())
                        .collect(),
                    sent_copies: sent_copies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take()
                        .unwrap_or_default(),
                    copy_to_sender: req.copy_to_sender,
                };
                async move {
                    let copies = part.sent_copies.clone();
                    let reply = send(key, part).await;
                    if reply.is_err() && !copies.is_empty() {
                        // Not sent: the next attempt takes them.
                        *sent_copies
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(copies);
                    }
                    reply
                }
            })
            .await?;
        for (positions, part) in parts {
            if !part.repeated.is_empty() && reply.repeated.is_empty() {
                reply.repeated = vec![false; n];
            }
            for (k, &at) in positions.iter().enumerate() {
                reply.seqs[at] = part.seqs.get(k).copied().unwrap_or(0);
                if let Some(&r) = part.repeated.get(k) {
                    reply.repeated[at] = r;
                }
                if part.inbox_full.get(k).copied().unwrap_or(false) {
                    reply.inbox_full.resize(n, false);
                    reply.inbox_full[at] = true;
                }
            }
        }
        Ok(reply)
    }

    /// Calls `call` once per owner of the inboxes `keys` (rendezvous
    /// hashing over the live delivery instances; with one instance, one
    /// call), at once, with the positions of that owner's inboxes. A part
    /// answered "moved" (the member list is changing) is split again by the
    /// pool's newer list and sent again, within the pool's retry budget.
    async fn by_owner_with_retry<R, F, Fut>(
        &self,
        keys: &[Vec<u8>],
        call: F,
    ) -> Result<Vec<(Vec<usize>, R)>, ServiceError>
    where
        F: Fn(Vec<u8>, Vec<usize>) -> Fut,
        Fut: std::future::Future<Output = Result<R, ServiceError>>,
    {
        let deadline = tokio::time::Instant::now() + crate::pool::RETRY_BUDGET;
        let mut pause = std::time::Duration::from_millis(20);
        let mut todo: Vec<usize> = (0..keys.len()).collect();
        let mut done = Vec::new();
        if keys.is_empty() {
            todo.clear();
            // One call all the same (an empty request is still answered).
            let reply = call(Vec::new(), Vec::new()).await?;
            done.push((Vec::new(), reply));
            return Ok(done);
        }
        while !todo.is_empty() {
            let mut groups: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
            for &i in &todo {
                let owner = self.0.owner(&keys[i]).unwrap_or_default();
                match groups.iter_mut().find(|g| g.0 == owner) {
                    Some(group) => group.2.push(i),
                    None => groups.push((owner, keys[i].clone(), vec![i])),
                }
            }
            let calls = groups.into_iter().map(|(_, key, positions)| {
                let reply = call(key, positions.clone());
                async move { (positions, reply.await) }
            });
            let mut again = Vec::new();
            for (positions, reply) in futures_util::future::join_all(calls).await {
                match reply {
                    Ok(reply) => done.push((positions, reply)),
                    Err(e) if e.is_moved() && tokio::time::Instant::now() + pause < deadline => {
                        tracing::debug!(error = %e, "inboxes moved; asking their new owner");
                        again.extend(positions);
                    }
                    Err(e) => return Err(e),
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            again.sort_unstable();
            todo = again;
        }
        Ok(done)
    }
}

/// Client of one gateway: the local one, or a remote one reached over a
/// long-lived push stream (see [`GatewayLink`]).
#[derive(Clone)]
pub struct GatewayClient(Arc<dyn Gateway>);

impl GatewayClient {
    pub fn from_local(local: Arc<dyn Gateway>) -> Self {
        GatewayClient(local)
    }

    /// A remote gateway over a push stream on `channel`.
    pub fn from_channel(channel: Channel, credentials: MeshCredentials) -> Self {
        GatewayClient(Arc::new(GatewayLink::start(channel, credentials)))
    }
}

impl From<GatewayClient> for Arc<dyn Gateway> {
    fn from(client: GatewayClient) -> Self {
        client.0
    }
}

impl Deref for GatewayClient {
    type Target = dyn Gateway;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

/// Finds the gateway that holds a connection, by gateway id. Presence names
/// gateways by id; this turns an id into a client.
#[async_trait]
pub trait GatewayDirectory: Send + Sync + 'static {
    fn gateway(&self, gateway_id: &str) -> Option<GatewayClient>;

    /// Like [`GatewayDirectory::gateway`], but for a gateway this process
    /// has never heard of (presence can name a gateway that just started
    /// before discovery has told us its address) waits a little for it.
    async fn gateway_when_known(&self, gateway_id: &str) -> Option<GatewayClient> {
        self.gateway(gateway_id)
    }
}

/// How long a push waits for discovery to report a gateway that presence
/// already names.
const NEW_GATEWAY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The gateways this process knows: its own (if any) and the ones discovery
/// reports, each remote one with its push stream.
#[derive(Default)]
pub struct GatewayTable {
    gateways: RwLock<HashMap<String, Entry>>,
    /// Every id ever listed or waited for: only a never-seen id is waited
    /// for, once, so a dead gateway never delays a push.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    changed: tokio::sync::Notify,
}

struct Entry {
    /// Empty for a gateway in this process.
    addr: String,
    client: GatewayClient,
    /// The push stream of a remote gateway.
    link: Option<Arc<GatewayLink>>,
}

impl GatewayTable {
    /// Adds a gateway with a ready client (this process's own, or tests').
    pub fn insert(&self, gateway_id: impl Into<String>, client: GatewayClient) {
        let id = gateway_id.into();
        self.mark_seen(&id);
        self.write().insert(
            id,
            Entry {
                addr: String::new(),
                client,
                link: None,
            },
        );
        self.changed.notify_waiters();
    }

    /// Records `id` as seen; returns whether it was new.
    fn mark_seen(&self, id: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned())
    }

    /// Replaces the remote gateways with `(id, mesh address)` pairs: links to
    /// gateways that stay are kept, links to gone ones are closed.
    pub fn update_remote(&self, remote: &[(String, String)], connector: &MeshConnector) {
        for (id, _) in remote {
            self.mark_seen(id);
        }
        let mut map = self.write();
        map.retain(|id, e| {
            e.addr.is_empty() || remote.iter().any(|(i, a)| i == id && *a == e.addr)
        });
        for (id, addr) in remote {
            if map.contains_key(id) {
                continue;
            }
            match connector.channel(addr) {
                Ok(channel) => {
                    let link =
                        Arc::new(GatewayLink::start(channel, connector.credentials().clone()));
                    map.insert(
                        id.clone(),
                        Entry {
                            addr: addr.clone(),
                            client: GatewayClient(link.clone()),
                            link: Some(link),
                        },
                    );
                }
                Err(e) => tracing::warn!(gateway = %id, error = %e, "gateway skipped"),
            }
        }
        drop(map);
        self.changed.notify_waiters();
    }

    /// Waits, at most `within`, until everything pushed so far to the
    /// remote gateways has reached them (handed to their connections) or
    /// was lost with a broken stream. See [`GatewayLink::flush`].
    pub async fn flush_pushes(&self, within: std::time::Duration) -> bool {
        let links: Vec<Arc<GatewayLink>> = self
            .gateways
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter_map(|e| e.link.clone())
            .collect();
        let all = futures_util::future::join_all(links.iter().map(|l| l.flush()));
        tokio::time::timeout(within, all).await.is_ok()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.gateways
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl GatewayDirectory for GatewayTable {
    fn gateway(&self, gateway_id: &str) -> Option<GatewayClient> {
        let map = self
            .gateways
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(gateway_id).map(|e| e.client.clone())
    }

    async fn gateway_when_known(&self, gateway_id: &str) -> Option<GatewayClient> {
        if let Some(client) = self.gateway(gateway_id) {
            return Some(client);
        }
        if !self.mark_seen(gateway_id) {
            return None; // known before and gone, or already waited for
        }
        let deadline = tokio::time::Instant::now() + NEW_GATEWAY_WAIT;
        loop {
            let changed = self.changed.notified();
            if let Some(client) = self.gateway(gateway_id) {
                return Some(client);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.gateway(gateway_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    struct Nowhere;

    #[async_trait]
    impl Gateway for Nowhere {
        async fn push(&self, _req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
            Ok(pb::PushReply::default())
        }
    }

    #[tokio::test]
    async fn a_new_gateway_is_waited_for_once_and_a_gone_one_never() {
        let table = Arc::new(GatewayTable::default());
        let later = table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.insert("gw-new", GatewayClient::from_local(Arc::new(Nowhere)));
        });
        // Not listed yet: waited for until discovery reports it.
        assert!(table.gateway_when_known("gw-new").await.is_some());

        // Listed once, then gone: no wait at all.
        table.update_remote(&[], &MeshConnector::default());
        let started = tokio::time::Instant::now();
        table.insert("gw-old", GatewayClient::from_local(Arc::new(Nowhere)));
        table.write().retain(|id, _| id != "gw-old");
        assert!(table.gateway_when_known("gw-old").await.is_none());
        assert!(started.elapsed() < Duration::from_millis(50));

        // Never listed: one bounded wait, then no more waiting for it.
        tokio::time::pause();
        assert!(table.gateway_when_known("gw-ghost").await.is_none());
        let again = tokio::time::Instant::now();
        assert!(table.gateway_when_known("gw-ghost").await.is_none());
        assert_eq!(again.elapsed(), Duration::ZERO);
    }

    /// A router from before `RouteBatch`: `Route` works, `RouteBatch` is
    /// answered `UNIMPLEMENTED`.
    #[derive(Default, Clone)]
    struct OldRouter {
        routed: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl pb::router_server::Router for OldRouter {
        async fn route(
            &self,
            req: tonic::Request<pb::RouteRequest>,
        ) -> Result<tonic::Response<pb::RouteReply>, tonic::Status> {
            let id = req.into_inner().envelope.map(|e| e.id).unwrap_or_default();
            self.routed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(id);
            Ok(tonic::Response::new(pb::RouteReply {
                recipients: 1,
                ..Default::default()
            }))
        }

        /// What the server of an older proto answers for a method it does
        /// not know (gRPC status 12).
        async fn route_batch(
            &self,
            _req: tonic::Request<pb::RouteBatchRequest>,
        ) -> Result<tonic::Response<pb::RouteReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("Not implemented"))
        }

        async fn route_many(
            &self,
            _req: tonic::Request<pb::RouteManyRequest>,
        ) -> Result<tonic::Response<pb::RouteManyReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("Not implemented"))
        }

        async fn observe(
            &self,
            _req: tonic::Request<pb::ObserveRequest>,
        ) -> Result<tonic::Response<pb::ObserveReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("Not implemented"))
        }
    }

    #[tokio::test]
    async fn a_batch_to_a_router_without_route_batch_is_routed_one_by_one_in_order() {
        let old = OldRouter::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::router_server::RouterServer::new(old.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        let router = RouterClient::from_channel(channel);
        let envelopes = (0..5)
            .map(|i| pb::Envelope {
                id: format!("m{i}"),
                ..Default::default()
            })
            .collect();
        let reply = router
            .route_batch(pb::RouteBatchRequest { envelopes })
            .await
            .expect("routed through Route");
        assert_eq!(reply.recipients, 5);
        let routed = old
            .routed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert_eq!(routed, ["m0", "m1", "m2", "m3", "m4"]);
        server.abort();
    }

    /// A delivery process from before `DeliverMany`: `Deliver` works, the
    /// batch call is answered `UNIMPLEMENTED`.
    #[derive(Default, Clone)]
    struct OldDelivery {
        delivered: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl pb::delivery_server::Delivery for OldDelivery {
        async fn deliver(
            &self,
            req: tonic::Request<pb::DeliverRequest>,
        ) -> Result<tonic::Response<pb::DeliverReply>, tonic::Status> {
            let req = req.into_inner();
            let mut delivered = self
                .delivered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            delivered.extend(req.envelopes.iter().map(|e| e.id.clone()));
            Ok(tonic::Response::new(pb::DeliverReply {
                seqs: vec![u64::try_from(delivered.len()).unwrap_or(0); req.envelopes.len()],
                repeated: Vec::new(),
                inbox_full: Vec::new(),
            }))
        }
        async fn fetch(
            &self,
            _req: tonic::Request<pb::FetchRequest>,
        ) -> Result<tonic::Response<pb::FetchReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
        async fn delivered(
            &self,
            _req: tonic::Request<pb::DeliveredRequest>,
        ) -> Result<tonic::Response<pb::DeliveredReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
        async fn presence_changed(
            &self,
            _req: tonic::Request<pb::PresenceChangeRequest>,
        ) -> Result<tonic::Response<pb::PresenceChangeReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
        async fn deliver_many(
            &self,
            _req: tonic::Request<pb::DeliverManyRequest>,
        ) -> Result<tonic::Response<pb::DeliverManyReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("Not implemented"))
        }
    }

    #[tokio::test]
    async fn deliveries_to_a_process_without_deliver_many_go_one_by_one() {
        let old = OldDelivery::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::delivery_server::DeliveryServer::new(old.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        // Batching on (`[mesh_batch] enabled`): the client that sends DeliverMany.
        let delivery = DeliveryClient::from_pool_batched(
            Pool::fixed("delivery", channel, MeshCredentials::default()),
            BatchLimits::default(),
        );
        let calls = (0..4).map(|i| {
            let delivery = delivery.clone();
            async move {
                delivery
                    .deliver(pb::DeliverRequest {
                        envelopes: vec![pb::Envelope {
                            id: format!("m{i}"),
                            app_id: "app".into(),
                            from: format!("sender{i}"),
                            to: vec!["bob".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .await
            }
        });
        for reply in futures_util::future::join_all(calls).await {
            let reply = reply.expect("delivered through Deliver");
            assert_eq!(reply.seqs.len(), 1);
            assert!(reply.seqs[0] > 0);
        }
        let mut delivered = old
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        delivered.sort();
        assert_eq!(delivered, ["m0", "m1", "m2", "m3"]);
        server.abort();
    }
}

// ---------------------------------------------------------------- persistent groups

use crate::services::{GroupAdmin, GroupRecords};
use pb::group_admin_client::GroupAdminClient as GroupAdminGrpc;
use pb::group_records_client::GroupRecordsClient as GroupRecordsGrpc;

client_handle!(
    /// Client of the groups role's persistent groups. Calls go to the
    /// instance that owns the group (rendezvous hashing on its id; a list of
    /// a user's groups, which has none, on the user id).
    GroupAdminClient, GroupAdmin, RemoteGroupAdmin, "groups"
);
client_handle!(
    /// Client of the stored groups, where the store is (round robin).
    GroupRecordsClient, GroupRecords, RemoteGroupRecords, "delivery"
);

struct RemoteGroupAdmin(Arc<Pool>);
struct RemoteGroupRecords(Arc<Pool>);

#[async_trait]
impl GroupAdmin for RemoteGroupAdmin {
    async fn command(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        let key = if req.group.is_empty() {
            req.user_id.as_bytes().to_vec()
        } else {
            req.group.as_bytes().to_vec()
        };
        pooled!(self, GroupAdminGrpc::command(req), key = Some(&key[..]))
    }
}

#[async_trait]
impl GroupRecords for RemoteGroupRecords {
    async fn call(
        &self,
        req: pb::GroupRecordsRequest,
    ) -> Result<pb::GroupRecordsReply, ServiceError> {
        pooled!(self, GroupRecordsGrpc::call(req))
    }
}

// ---------------------------------------------------------------- webhooks

use crate::services::WebhookAdmin;
use pb::webhook_admin_client::WebhookAdminClient as WebhookAdminGrpc;

client_handle!(
    /// Client of the webhook dead letters, where the store is (round robin).
    WebhookAdminClient, WebhookAdmin, RemoteWebhookAdmin, "delivery"
);

struct RemoteWebhookAdmin(Arc<Pool>);

#[async_trait]
impl WebhookAdmin for RemoteWebhookAdmin {
    async fn dead_letters(
        &self,
        req: pb::DeadLettersRequest,
    ) -> Result<pb::DeadLettersReply, ServiceError> {
        pooled!(self, WebhookAdminGrpc::dead_letters(req))
    }
}
