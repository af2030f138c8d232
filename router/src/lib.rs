//! The router role: decides where an envelope goes — local delivery
//! (direct messages, confirmations), the groups role (group messages), or,
//! with federation, the next domain on the shortest path to the
//! recipient's home ([`federation`]).
//!
//! A reply names the envelopes whose client id the sender already had
//! accepted (`RouteReply.repeated`), as delivery or groups reported them.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use switchboard_mesh::{DeliveryClient, GroupsClient, ServiceError, pb};

pub mod federation;
mod local;
mod observe;

pub use federation::{Federation, FederationOptions, RouteTable};
pub use local::{BatchRouted, Local, LocalRouted};

pub struct RouterRole {
    domain: String,
    local: Local,
    /// Set once federation starts (after the roles exist).
    federation: OnceLock<Arc<Federation>>,
}

impl RouterRole {
    pub fn new(domain: impl Into<String>, delivery: DeliveryClient, groups: GroupsClient) -> Self {
        RouterRole {
            domain: domain.into(),
            local: Local { delivery, groups },
            federation: OnceLock::new(),
        }
    }

    /// The roles local envelopes go to (for the federation).
    pub fn local(&self) -> Local {
        self.local.clone()
    }

    /// Routes through `federation` from now on. Set once.
    pub fn set_federation(&self, federation: Arc<Federation>) {
        let _ = self.federation.set(federation);
    }

    async fn route_one(&self, envelope: pb::Envelope) -> Result<LocalRouted, ServiceError> {
        match self.federation.get() {
            Some(f) => f.route(envelope).await,
            None => self.local.route(envelope).await,
        }
    }
}

#[async_trait]
impl switchboard_mesh::Router for RouterRole {
    #[tracing::instrument(
        name = "router.route",
        skip_all,
        fields(
            message.id = req.envelope.as_ref().map(|e| e.id.as_str()).unwrap_or_default(),
            message.kind = req.envelope.as_ref().map(|e| e.kind().as_str_name()).unwrap_or_default(),
            domain = %self.domain,
        )
    )]
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        let envelope = req
            .envelope
            .ok_or_else(|| ServiceError::invalid("route request without an envelope"))?;
        let routed = self.route_one(envelope).await?;
        Ok(pb::RouteReply {
            recipients: routed.recipients,
            repeated: if routed.repeated { vec![0] } else { Vec::new() },
            inbox_full: Vec::new(),
            inbox_full_recipients: routed.inbox_full,
        })
    }

    #[tracing::instrument(
        name = "router.route",
        skip_all,
        fields(
            count = req.envelopes.len(),
            message.id = req.envelopes.first().map(|e| e.id.as_str()).unwrap_or_default(),
            domain = %self.domain,
        )
    )]
    async fn route_batch(
        &self,
        req: pb::RouteBatchRequest,
    ) -> Result<pb::RouteReply, ServiceError> {
        let envelopes = req.envelopes;
        if let Some(bad) = envelopes
            .iter()
            .find(|e| e.kind() != pb::MessageKind::Direct || e.to.len() != 1)
        {
            return Err(ServiceError::invalid(format!(
                "a batch holds direct messages with one recipient each; {} is not one",
                bad.id
            )));
        }
        let recipients = u32::try_from(envelopes.len()).unwrap_or(u32::MAX);
        // One delivery call for what stays here: RELIABLE ones share one
        // store write, and they keep the order they were sent in.
        let routed = match self.federation.get() {
            Some(f) => f.route_batch(envelopes).await?,
            None => self.local.deliver_batch(envelopes).await?,
        };
        let positions = |flags: &[bool]| -> Vec<u32> {
            (0u32..)
                .zip(flags)
                .filter(|(_, r)| **r)
                .map(|(i, _)| i)
                .collect()
        };
        Ok(pb::RouteReply {
            recipients,
            repeated: positions(&routed.repeated),
            inbox_full: positions(&routed.inbox_full),
            inbox_full_recipients: Vec::new(),
        })
    }

    async fn observe(&self, req: pb::ObserveRequest) -> Result<pb::ObserveReply, ServiceError> {
        observe::record(&self.domain, &req);
        Ok(pb::ObserveReply {})
    }
}
