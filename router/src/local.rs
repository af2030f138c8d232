//! Routing inside this domain: direct messages and confirmations to
//! delivery, group messages to the groups role.

use switchboard_mesh::{DeliveryClient, ErrorCode, GroupsClient, ServiceError, pb};

/// The roles an envelope for a local recipient is handed to.
#[derive(Clone)]
pub struct Local {
    pub delivery: DeliveryClient,
    pub groups: GroupsClient,
}

impl Local {
    /// Routes one envelope here: how many recipients it was handed to, and
    /// whether its client id was a repeat.
    pub async fn route(&self, envelope: pb::Envelope) -> Result<(u32, bool), ServiceError> {
        match envelope.kind() {
            // A persistent group's copy for one member (fanned out in the
            // domain that holds the group) is delivered like a direct one.
            pb::MessageKind::Group if envelope.group.is_empty() || envelope.to.len() != 1 => {
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

    /// Direct envelopes in one delivery call (one store write), in order;
    /// the positions of repeats.
    pub async fn deliver_batch(
        &self,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<Vec<bool>, ServiceError> {
        let Some(first) = envelopes.first() else {
            return Ok(Vec::new());
        };
        let copy_to_sender = first.origin.is_some();
        let n = envelopes.len();
        let reply = self
            .delivery
            .deliver(pb::DeliverRequest {
                envelopes,
                sent_copies: Vec::new(),
                copy_to_sender,
            })
            .await?;
        let mut repeated = reply.repeated;
        repeated.resize(n, false);
        Ok(repeated)
    }

    /// The MESSAGE_SENT copies of messages that left this domain: the
    /// sender's other connections are here.
    pub async fn sent_copies(&self, originals: Vec<pb::Envelope>) -> Result<(), ServiceError> {
        if originals.is_empty() {
            return Ok(());
        }
        self.delivery
            .deliver(pb::DeliverRequest {
                envelopes: Vec::new(),
                sent_copies: originals,
                copy_to_sender: false,
            })
            .await
            .map(|_| ())
    }
}
