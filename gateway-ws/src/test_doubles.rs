//! Test doubles of the roles a gateway calls: an app `demo` whose users are
//! `demo-<id>` (token `bad` is refused), and an in-memory inbox per user
//! that remembers each sender's client ids, as the store's id index does,
//! answering a resend as `repeated`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use switchboard_config::Limits;
use switchboard_mesh::{
    AuthClient, DeliveryClient, GroupAdminClient, RouterClient, ServiceError, pb,
};
use switchboard_presence::InMemoryPresence;

use crate::{Check, GatewayDeps, GatewayRole, Readiness};

struct DemoAuth;

#[async_trait]
impl switchboard_mesh::Auth for DemoAuth {
    async fn verify_client(
        &self,
        req: pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError> {
        let ok = req.app_id == "demo" && req.user_id.starts_with("demo-") && req.token != "bad";
        Ok(pb::VerifyClientReply {
            authenticated: ok,
            reason: if ok { String::new() } else { "refused".into() },
            app_name: "demo".into(),
            master_user_id: String::new(),
            allowed_origins: Vec::new(),
        })
    }

    async fn get_app(&self, _: pb::GetAppRequest) -> Result<pb::App, ServiceError> {
        Err(ServiceError::internal("not used"))
    }

    /// API keys of `demo`: `k-send` (scope send) and `k-admin` (admin).
    async fn verify_api_key(
        &self,
        req: pb::VerifyApiKeyRequest,
    ) -> Result<pb::VerifyApiKeyReply, ServiceError> {
        let scope = match (req.app_id.as_str(), req.key.as_str()) {
            ("demo", "k-send") => "send",
            ("demo", "k-admin") => "admin",
            _ => return Ok(pb::VerifyApiKeyReply::default()),
        };
        Ok(pb::VerifyApiKeyReply {
            valid: true,
            app_name: "demo".into(),
            master_user_id: "demo-0".into(),
            key_name: req.key,
            scopes: vec![scope.into()],
        })
    }
}

/// Inboxes and the id index: what router, groups and delivery do, in memory.
#[derive(Default)]
pub(crate) struct Inboxes {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    inboxes: HashMap<String, Vec<pb::InboxMessage>>,
    next_seq: u64,
    /// (sender, client id) already accepted.
    client_ids: HashSet<(String, String)>,
    /// Envelopes routed, in order (repeats not included).
    routed: Vec<pb::Envelope>,
}

impl Inboxes {
    pub(crate) fn inbox_len(&self, user: &str) -> usize {
        self.state
            .lock()
            .expect("lock")
            .inboxes
            .get(user)
            .map_or(0, Vec::len)
    }

    /// Routes envelopes; the positions of repeats.
    fn route(&self, envelopes: Vec<pb::Envelope>) -> Vec<u32> {
        let mut state = self.state.lock().expect("lock");
        let mut repeated = Vec::new();
        for (position, envelope) in envelopes.into_iter().enumerate() {
            if envelope.client_id
                && !state
                    .client_ids
                    .insert((envelope.from.clone(), envelope.id.clone()))
            {
                repeated.push(position as u32);
                continue;
            }
            if envelope.feature() == pb::Feature::Reliable {
                for to in &envelope.to {
                    state.next_seq += 1;
                    let message = pb::InboxMessage {
                        id: envelope.id.clone(),
                        kind: envelope.kind,
                        from: envelope.from.clone(),
                        to: to.clone(),
                        content: envelope.content.clone(),
                        reference: envelope.reference.clone(),
                        ts: envelope.ts,
                        seq: state.next_seq,
                        feature: envelope.feature,
                        ..Default::default()
                    };
                    state.inboxes.entry(to.clone()).or_default().push(message);
                }
            }
            state.routed.push(envelope);
        }
        repeated
    }

    pub(crate) fn routed(&self) -> Vec<pb::Envelope> {
        self.state.lock().expect("lock").routed.clone()
    }
}

#[async_trait]
impl switchboard_mesh::Router for Inboxes {
    async fn route(&self, req: pb::RouteRequest) -> Result<pb::RouteReply, ServiceError> {
        let repeated = Inboxes::route(self, req.envelope.into_iter().collect());
        Ok(pb::RouteReply {
            recipients: 1,
            repeated,
            ..Default::default()
        })
    }

    async fn route_batch(
        &self,
        req: pb::RouteBatchRequest,
    ) -> Result<pb::RouteReply, ServiceError> {
        let repeated = Inboxes::route(self, req.envelopes);
        Ok(pb::RouteReply {
            recipients: 1,
            repeated,
            ..Default::default()
        })
    }
}

#[async_trait]
impl switchboard_mesh::Delivery for Inboxes {
    async fn deliver(&self, _: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        Err(ServiceError::internal("not used"))
    }

    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        let state = self.state.lock().expect("lock");
        let after: Vec<_> = state
            .inboxes
            .get(&req.user_id)
            .map(|inbox| {
                inbox
                    .iter()
                    .filter(|m| m.seq > req.after_seq)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let count = req.count as usize;
        let left = after.len().saturating_sub(count) as u64;
        Ok(pb::FetchReply {
            messages: after.into_iter().take(count).collect(),
            left,
        })
    }

    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        let mut state = self.state.lock().expect("lock");
        for item in req.items {
            if let Some(inbox) = state.inboxes.get_mut(&item.user_id) {
                inbox.retain(|m| m.seq != item.seq);
            }
        }
        Ok(pb::DeliveredReply::default())
    }

    async fn presence_changed(
        &self,
        _: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        Ok(pb::PresenceChangeReply::default())
    }
}

/// Persistent groups, as far as a session sees them: the request comes
/// back as the group (the real role is tested in groups/ and tests/groups.rs).
struct EchoGroups;

#[async_trait]
impl switchboard_mesh::GroupAdmin for EchoGroups {
    async fn command(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        Ok(pb::GroupCommandReply {
            group: Some(pb::GroupRecord {
                app_id: req.app_id,
                group: req.group,
                name: req.name,
                owner: req.user_id,
                members: req.members,
                created_ms: 0,
            }),
            groups: Vec::new(),
        })
    }
}

struct Ready;

#[async_trait]
impl Readiness for Ready {
    async fn check(&self) -> Vec<Check> {
        Vec::new()
    }
}

struct NoDeadLetters;

#[async_trait]
impl switchboard_mesh::WebhookAdmin for NoDeadLetters {
    async fn dead_letters(
        &self,
        _: pb::DeadLettersRequest,
    ) -> Result<pb::DeadLettersReply, ServiceError> {
        Ok(pb::DeadLettersReply::default())
    }
}

pub(crate) fn gateway(limits: Limits) -> (GatewayRole, Arc<Inboxes>) {
    let inboxes = Arc::new(Inboxes::default());
    let deps = GatewayDeps {
        auth: AuthClient::from_local(Arc::new(DemoAuth)),
        router: RouterClient::from_local(inboxes.clone()),
        delivery: DeliveryClient::from_local(inboxes.clone()),
        groups: GroupAdminClient::from_local(Arc::new(EchoGroups)),
        channels: switchboard_mesh::ChannelsClient::from_local(Arc::new(
            switchboard_groups::ChannelsRole::new(
                switchboard_groups::ChannelSettings::default(),
                Arc::new(switchboard_mesh::GatewayTable::default()),
            ),
        )),
        webhook_admin: switchboard_mesh::WebhookAdminClient::from_local(Arc::new(NoDeadLetters)),
        presence: Arc::new(InMemoryPresence::default()),
        readiness: Arc::new(Ready),
        domain: "local".to_owned(),
        homes: None,
    };
    (GatewayRole::new("gw-test", limits, deps), inboxes)
}
