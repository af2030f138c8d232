//! The router role: decides where an envelope goes. In a single domain that is
//! local delivery (direct messages) or the groups role (group messages); the
//! federation work adds next-hop forwarding to other domains here.
//!
//! A reply names the envelopes whose client id the sender already had
//! accepted (`RouteReply.repeated`), as delivery or groups reported them.

use async_trait::async_trait;
use switchboard_mesh::{DeliveryClient, ErrorCode, GroupsClient, ServiceError, pb};

pub struct RouterRole {
    domain: String,
    delivery: DeliveryClient,
    groups: GroupsClient,
}

impl RouterRole {
    pub fn new(domain: impl Into<String>, delivery: DeliveryClient, groups: GroupsClient) -> Self {
        RouterRole {
            domain: domain.into(),
            delivery,
            groups,
        }
    }

    /// Routes one envelope: how many recipients it was handed to, and
    /// whether its client id was a repeat.
    async fn route_local(&self, envelope: pb::Envelope) -> Result<(u32, bool), ServiceError> {
        match envelope.kind() {
            pb::MessageKind::Group => {
                let reply = self
                    .groups
                    .fanout(pb::FanoutRequest {
                        envelope: Some(envelope),
                    })
                    .await?;
                Ok((reply.recipients, reply.repeated))
            }
            _ => {
                if envelope.to.len() != 1 {
                    return Err(ServiceError::new(
                        ErrorCode::InvalidRecipient,
                        "a direct message has exactly one recipient",
                    ));
                }
                let copy_to_sender = envelope.origin.is_some();
                let reply = self
                    .delivery
                    .deliver(pb::DeliverRequest {
                        envelopes: vec![envelope],
                        sent_copies: Vec::new(),
                        copy_to_sender,
                    })
                    .await?;
                Ok((1, reply.repeated.first().copied().unwrap_or(false)))
            }
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
            hop = req.envelope.as_ref().map(|e| e.hops.len()).unwrap_or_default(),
        )
    )]
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        let envelope = req
            .envelope
            .ok_or_else(|| ServiceError::invalid("route request without an envelope"))?;
        let (recipients, repeat) = self.route_local(envelope).await?;
        Ok(pb::RouteReply {
            recipients,
            repeated: if repeat { vec![0] } else { Vec::new() },
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
        let Some(first) = envelopes.first() else {
            return Ok(pb::RouteReply {
                recipients: 0,
                ..Default::default()
            });
        };
        let copy_to_sender = first.origin.is_some();
        let recipients = u32::try_from(envelopes.len()).unwrap_or(u32::MAX);
        // One delivery call: RELIABLE ones share one store write, and
        // they keep the order they were sent in.
        let reply = self
            .delivery
            .deliver(pb::DeliverRequest {
                envelopes,
                sent_copies: Vec::new(),
                copy_to_sender,
            })
            .await?;
        let repeated = (0u32..)
            .zip(&reply.repeated)
            .filter(|(_, r)| **r)
            .map(|(i, _)| i)
            .collect();
        Ok(pb::RouteReply {
            recipients,
            repeated,
        })
    }

    #[tracing::instrument(name = "federation.receive", skip_all)]
    async fn forward(&self, req: pb::ForwardRequest) -> Result<pb::ForwardReply, ServiceError> {
        let mut envelope = req
            .envelope
            .ok_or_else(|| ServiceError::invalid("forward request without an envelope"))?;
        if envelope.hops.iter().any(|h| h == &self.domain) {
            return Err(ServiceError::invalid(
                "routing loop: envelope passed here before",
            ));
        }
        if envelope.hops.len() as u32 >= envelope.hop_limit.max(1) {
            return Err(ServiceError::invalid("hop limit reached"));
        }
        envelope.hops.push(self.domain.clone());
        // Another domain's connections are not ours: no MESSAGE_SENT copies here.
        envelope.origin = None;
        let (recipients, _) = self.route_local(envelope).await?;
        Ok(pb::ForwardReply { recipients })
    }
}
