//! Routing inside this domain: direct messages and confirmations to
//! delivery, group messages to the groups role.

use switchboard_mesh::{DeliveryClient, ErrorCode, GroupsClient, ServiceError, pb};

/// What routing one envelope here did.
#[derive(Debug, Default)]
pub struct LocalRouted {
    /// Recipients it was handed to.
    pub recipients: u32,
    /// Its client id was a repeat.
    pub repeated: bool,
    /// Recipients of a group message whose inbox is full (not stored for
    /// them; accepted for the others).
    pub inbox_full: Vec<String>,
}

/// What routing direct envelopes together did, by position.
#[derive(Debug, Default)]
pub struct BatchRouted {
    pub repeated: Vec<bool>,
    /// Refused: the recipient's inbox is full.
    pub inbox_full: Vec<bool>,
}

/// The refusal of a direct message to a full inbox.
pub(crate) fn inbox_full_error(to: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::InboxFull,
        format!("the inbox of {to} is full: the message was not stored"),
    )
}

/// The roles an envelope for a local recipient is handed to.
#[derive(Clone)]
pub struct Local {
    pub delivery: DeliveryClient,
    pub groups: GroupsClient,
}

impl Local {
    /// Routes one envelope here. A direct message to a full inbox is an
    /// `INBOX_FULL` error; a group message names its full recipients.
    pub async fn route(&self, envelope: pb::Envelope) -> Result<LocalRouted, ServiceError> {
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
                Ok(LocalRouted {
                    recipients: reply.recipients,
                    repeated: reply.repeated,
                    inbox_full: reply.inbox_full,
                })
            }
            _ => {
                if envelope.to.len() != 1 {
                    return Err(ServiceError::new(
                        ErrorCode::InvalidRecipient,
                        "a direct message has exactly one recipient",
                    ));
                }
                let copy_to_sender = envelope.origin.is_some();
                let to = envelope.to[0].clone();
                let reply = self
                    .delivery
                    .deliver(pb::DeliverRequest {
                        envelopes: vec![envelope],
                        sent_copies: Vec::new(),
                        copy_to_sender,
                    })
                    .await?;
                if reply.inbox_full.first().copied().unwrap_or(false) {
                    return Err(inbox_full_error(&to));
                }
                Ok(LocalRouted {
                    recipients: 1,
                    repeated: reply.repeated.first().copied().unwrap_or(false),
                    inbox_full: Vec::new(),
                })
            }
        }
    }

    /// Direct envelopes in one delivery call (one store write), in order;
    /// the positions of repeats and of refusals for a full inbox.
    pub async fn deliver_batch(
        &self,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<BatchRouted, ServiceError> {
        let Some(first) = envelopes.first() else {
            return Ok(BatchRouted::default());
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
        let mut inbox_full = reply.inbox_full;
        inbox_full.resize(n, false);
        Ok(BatchRouted {
            repeated,
            inbox_full,
        })
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
