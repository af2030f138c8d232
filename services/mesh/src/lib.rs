//! The Switchboard mesh: each role's API as a domain trait, a client that wraps
//! either the local implementation (a direct call) or a tonic client (remote),
//! and the tonic server adapters that expose a local implementation on the mesh
//! port.
//!
//! The trait methods take and return the generated protobuf messages, so the
//! local and remote paths carry exactly the same data and no conversion layer
//! sits between them.

mod adapters;
mod batched;
mod channels;
mod clients;
mod coalescer;
mod connector;
mod credentials;
mod error;
mod gateway_link;
mod ids;
mod pool;
mod services;

pub use adapters::{
    AuthService, DeliveryService, FederationService, GatewayService, GroupsService, RouterService,
};
pub use channels::{Channels, ChannelsClient, ChannelsService, channel_key};
pub use clients::{
    AuthClient, DeliveryClient, GatewayClient, GatewayDirectory, GatewayTable, GroupsClient,
    RouterClient, routing_keys,
};
pub use coalescer::{BatchFuture, BatchLimits, BatchSend, Coalescer, run_ordered};
pub use connector::{ConnectError, MeshConnector, MeshTls};
pub use credentials::{
    DOMAIN_HEADER, FederationCredentials, FederationGuard, InvalidSecret, MeshCredentials,
    MeshGuard, PeerDomain, secret_tag,
};
pub use error::{ErrorCode, ServiceError};
pub use ids::{new_message_id, now_ms};
pub use pool::{MeshChannel, Pool, RETRY_BUDGET, inbox_key, owner_among};
pub use services::{Auth, Delivery, Federation, Gateway, Groups, Router};
// Persistent groups.
pub use adapters::WebhookAdminService;
pub use adapters::{GroupAdminService, GroupRecordsService};
pub use clients::WebhookAdminClient;
pub use clients::{GroupAdminClient, GroupRecordsClient};
pub use services::WebhookAdmin;
pub use services::{GroupAdmin, GroupRecords};
pub use switchboard_proto::mesh as pb;

/// Largest mesh message, either way. A group fan-out carries one envelope
/// per recipient (up to `max_group_recipients` × `max_content_bytes`), so
/// tonic's 4 MiB default is too small.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Domains an envelope may pass through before it is dropped (loop guard).
pub const DEFAULT_HOP_LIMIT: u32 = 8;
