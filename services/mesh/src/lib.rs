//! The Switchboard mesh: each role's API as a domain trait, a client that wraps
//! either the local implementation (a direct call) or a tonic client (remote),
//! and the tonic server adapters that expose a local implementation on the mesh
//! port.
//!
//! The trait methods take and return the generated protobuf messages, so the
//! local and remote paths carry exactly the same data and no conversion layer
//! sits between them.

mod adapters;
mod clients;
mod error;
mod ids;
mod services;

pub use adapters::{
    AuthService, DeliveryService, FederationService, GatewayService, GroupsService, RouterService,
};
pub use clients::{
    AuthClient, DeliveryClient, GatewayClient, GatewayDirectory, GroupsClient, RouterClient,
    StaticGatewayDirectory,
};
pub use error::{ErrorCode, ServiceError};
pub use ids::{new_message_id, now_ms};
pub use services::{Auth, Delivery, Gateway, Groups, Router};
pub use switchboard_proto::mesh as pb;

/// Domains an envelope may pass through before it is dropped (loop guard).
pub const DEFAULT_HOP_LIMIT: u32 = 8;
