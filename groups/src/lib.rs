//! The groups role: turns a group message into one delivery per recipient.
//! Ad-hoc groups (a list of users) are handled here; persistent groups
//! (`persistent`) at the instance that owns each, their records in the store
//! (`records`).

pub mod persistent;
pub mod records;

use std::sync::Arc;

mod channels;

pub use channels::{ChannelSettings, ChannelsRole};

use async_trait::async_trait;
use switchboard_mesh::{DeliveryClient, ErrorCode, ServiceError, pb};

pub use persistent::{GroupLimits, PersistentGroups};
pub use records::{Records, StoredGroups};

pub struct GroupsRole {
    delivery: DeliveryClient,
    persistent: Option<Arc<PersistentGroups>>,
}

impl GroupsRole {
    pub fn new(delivery: DeliveryClient) -> Self {
        GroupsRole {
            delivery,
            persistent: None,
        }
    }

    /// Serves messages to persistent groups (without: "unknown group").
    pub fn with_persistent(mut self, persistent: Arc<PersistentGroups>) -> Self {
        self.persistent = Some(persistent);
        self
    }
}

#[async_trait]
impl switchboard_mesh::Groups for GroupsRole {
    #[tracing::instrument(
        name = "groups.fanout",
        skip_all,
        fields(
            message.id = req.envelope.as_ref().map(|e| e.id.as_str()).unwrap_or_default(),
            fanout.size = tracing::field::Empty,
        )
    )]
    async fn fanout(&self, req: pb::FanoutRequest) -> Result<pb::FanoutReply, ServiceError> {
        let envelope = req
            .envelope
            .ok_or_else(|| ServiceError::invalid("fanout request without an envelope"))?;
        if !envelope.group.is_empty() {
            if let Some(persistent) = &self.persistent {
                return persistent.fanout(envelope).await;
            }
            return Err(ServiceError::new(
                ErrorCode::InvalidRecipient,
                format!("unknown group {:?}", envelope.group),
            ));
        }
        let mut recipients: Vec<&String> = envelope
            .to
            .iter()
            .filter(|user| **user != envelope.from)
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        // Owned: the envelope moves on as the sender's copy, and a full
        // inbox is reported by its recipient's name.
        let recipients: Vec<String> = recipients.into_iter().cloned().collect();
        let envelopes: Vec<pb::Envelope> = recipients
            .iter()
            .map(|user| pb::Envelope {
                to: vec![user.clone()],
                origin: None,
                ..envelope.clone()
            })
            .collect();
        let count = u32::try_from(envelopes.len()).unwrap_or(u32::MAX);
        tracing::Span::current().record("fanout.size", count);
        metrics::histogram!("switchboard_groups_fanout_recipients", "kind" => "ad_hoc")
            .record(f64::from(count));
        let sent_copies = if envelope.origin.is_some() {
            vec![envelope]
        } else {
            Vec::new()
        };
        let reply = self
            .delivery
            .deliver(pb::DeliverRequest {
                envelopes,
                sent_copies,
                copy_to_sender: false,
            })
            .await?;
        // One send, one client id: its copies are all repeats or none.
        Ok(pb::FanoutReply {
            recipients: count,
            repeated: reply.repeated.iter().any(|r| *r),
            inbox_full: full_recipients(&recipients, &reply.inbox_full),
        })
    }
}

/// The recipients (in the order of a delivery call's envelopes) whose
/// inbox was full.
pub(crate) fn full_recipients<S: AsRef<str>>(recipients: &[S], inbox_full: &[bool]) -> Vec<String> {
    recipients
        .iter()
        .zip(inbox_full)
        .filter(|(_, full)| **full)
        .map(|(user, _)| user.as_ref().to_owned())
        .collect()
}
