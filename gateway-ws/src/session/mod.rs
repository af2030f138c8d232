//! What a client may do, whatever carries its requests: authenticate, send
//! direct and group messages, fetch and acknowledge stored ones. A session
//! holds the client's identity and rate limit, applies the protocol's rules
//! (recipients, sizes, message ids), builds the envelopes and calls the
//! other roles; it returns typed outcomes that a transport renders. It knows
//! nothing of sockets or JSON: the WebSocket connection is one adapter over
//! it, and a REST or gRPC one can drive it the same way (see the tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchboard_mesh::{ErrorCode, ServiceError, pb};
use tokio::time::timeout;

use crate::GatewayInner;
use crate::commands::{
    Ack, Auth, ClientCommand, CommandKind, Fetch, GroupMessage, Message, RequestMeta,
    check_message_id, check_user_id,
};
use crate::ratelimit::RateLimiter;

mod groups;
use crate::registry::Stored;
pub use groups::GroupOutcome;

mod channels;

pub use channels::ChannelOutcome;

/// Longest wait for another role before a request is answered with
/// UNAVAILABLE.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Page size of a fetch that names none.
const DEFAULT_FETCH_COUNT: u32 = 100;

/// The authenticated user of a session.
#[derive(Debug)]
pub struct Identity {
    pub app_id: String,
    pub app_name: String,
    pub user_id: String,
    /// Acknowledged mode: stored messages wait for the client's ACK.
    pub acks: bool,
}

/// Stored messages handed to the client in ack mode and not acknowledged
/// yet. Filled by whatever writes them to the client, emptied by
/// [`Session::ack`].
#[derive(Default)]
pub struct Unacked(Mutex<UnackedMap>);

#[derive(Default)]
struct UnackedMap {
    /// Keys of the digests: random per connection, so no sender can choose
    /// an id whose digest is another message's.
    keys: std::hash::RandomState,
    /// Digest of the id → seq. Up to `max_unacked` entries per connection
    /// (a reader far behind, or one that never acknowledges): 16 bytes
    /// each instead of a copy of the id (~70 with its allocation).
    by_id: HashMap<u64, u64>,
    /// Further messages whose id is already tracked: client ids are unique
    /// per sender only, so two senders may pick the same one. Each
    /// occurrence of the id in an ACK acknowledges one of them, the oldest
    /// first: an ACK of one message never takes another that the client
    /// may not have read yet.
    shared_ids: Vec<(u64, u64)>,
}

impl UnackedMap {
    fn digest(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(id)
    }
}

impl Unacked {
    /// Tracks messages about to be written; past `limit` tracked ones a
    /// message is not tracked (it stays stored and comes again on the next
    /// connection).
    pub(crate) fn track<'a>(&self, limit: usize, stored: impl Iterator<Item = &'a Stored>) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for stored in stored {
            if map.by_id.len() + map.shared_ids.len() >= limit {
                break;
            }
            let id = map.digest(&stored.id);
            match map.by_id.get(&id) {
                None => {
                    map.by_id.insert(id, stored.seq);
                }
                Some(&seq)
                    if seq != stored.seq
                        && !map
                            .shared_ids
                            .iter()
                            .any(|(shared, seq)| *seq == stored.seq && *shared == id) =>
                {
                    map.shared_ids.push((id, stored.seq));
                }
                Some(_) => {}
            }
        }
    }

    /// The sequence numbers of the tracked messages among `ids`, no longer
    /// tracked (ids not tracked are ignored): one message per occurrence of
    /// an id, the oldest first.
    fn take(&self, ids: &[String]) -> Vec<u64> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seqs = Vec::with_capacity(ids.len());
        for id in ids {
            let id = map.digest(id);
            let Some(seq) = map.by_id.remove(&id) else {
                continue;
            };
            seqs.push(seq);
            // Another sender's message with this id takes its place, for
            // the id's next occurrence.
            let next = map
                .shared_ids
                .iter()
                .enumerate()
                .filter(|(_, (shared, _))| *shared == id)
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(at, _)| at);
            if let Some(at) = next {
                let (id, seq) = map.shared_ids.swap_remove(at);
                map.by_id.insert(id, seq);
            }
        }
        seqs
    }
}

/// How an authentication ended (a refused credential is an outcome, not an
/// error: the client is told why).
#[derive(Debug)]
pub enum AuthOutcome {
    /// The session now acts as this user ([`Session::identity`]).
    Accepted,
    Refused {
        app_id: String,
        user_id: String,
        reason: String,
        /// The client URL of the user's home domain, when the user lives
        /// in another domain of the federation.
        redirect: Option<String>,
    },
}

/// A message the mesh accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The message's id: the client's own (`Message::id`) or one assigned.
    pub id: String,
    pub reliable: bool,
    /// A resend of a client id this sender already had accepted: nothing
    /// was stored or shown again.
    pub repeated: bool,
    /// Recipients of a group message whose inbox is full: the message was
    /// not stored for them (it was for the others).
    pub inbox_full: Vec<String>,
}

/// Messages routed together, all accepted.
#[derive(Debug)]
pub struct Routed {
    /// Positions (in the batch) of the resends of an accepted client id.
    repeated: Vec<u32>,
    /// Positions refused because their recipient's inbox is full.
    inbox_full: Vec<u32>,
}

impl Routed {
    /// Whether the message at `position` of the batch was a resend.
    pub fn is_repeated(&self, position: usize) -> bool {
        self.repeated.iter().any(|&p| p as usize == position)
    }

    /// Whether the message at `position` was refused: its recipient's inbox
    /// is full.
    pub fn is_inbox_full(&self, position: usize) -> bool {
        self.inbox_full.iter().any(|&p| p as usize == position)
    }
}

/// A direct message this session checked and built, ready to route. Only
/// a session makes one: nothing unchecked reaches the router.
#[derive(Debug)]
pub struct CheckedDirect(pb::Envelope);

impl CheckedDirect {
    /// The message's id (the client's own, or assigned).
    pub fn id(&self) -> &str {
        &self.0.id
    }

    pub fn reliable(&self) -> bool {
        self.0.feature() == pb::Feature::Reliable
    }
}

/// A page of stored messages.
#[derive(Debug)]
pub struct Fetched {
    /// Oldest first.
    pub messages: Vec<pb::InboxMessage>,
    /// Stored messages after this page.
    pub left: u64,
}

/// What a command came to (see [`Session::execute`]).
#[derive(Debug)]
pub enum Outcome {
    Auth(AuthOutcome),
    Accepted(Accepted),
    Fetched(Fetched),
    Acked,
    Group(GroupOutcome),
    /// Topics, rooms and presence subscriptions.
    Channel(ChannelOutcome),
}

/// One client's session; see the module documentation.
pub struct Session {
    gw: Arc<GatewayInner>,
    conn_id: u64,
    identity: Arc<OnceLock<Identity>>,
    unacked: Arc<Unacked>,
    limiter: RateLimiter,
    /// ACK frames have their own budget: a client acks what it receives,
    /// which its send rate does not bound. Only ids that acknowledge
    /// nothing spend it (see [`Session::ack`]).
    ack_limiter: RateLimiter,
    /// Highest sequence number a fetch (or the ack-mode replay) returned:
    /// the next page starts after it.
    fetch_cursor: u64,
    channels: channels::ChannelState,
    /// The `Origin` header of the browser page that opened the connection;
    /// `None` for other clients (and other transports).
    web_origin: Option<Box<str>>,
    /// A server-side caller of the public API ([`Session::act_for`]): it
    /// has no connection, so none of the user's is the one it sent from.
    api_caller: bool,
    /// This session's place in its app's connection count.
    _app_slot: Option<crate::quota::AppSlot>,
    /// Recipients routed the usual way (the same-gateway shortcut keeps
    /// their order).
    routed_to: same_gateway::RoutedTo,
}

impl Session {
    pub(crate) fn new(gw: Arc<GatewayInner>, conn_id: u64) -> Self {
        let limiter = RateLimiter::new(gw.limits.messages_per_second);
        let ack_limiter = RateLimiter::new(gw.limits.acks_per_second);
        Session {
            gw,
            conn_id,
            identity: Arc::default(),
            unacked: Arc::default(),
            limiter,
            ack_limiter,
            fetch_cursor: 0,
            channels: channels::ChannelState::default(),
            web_origin: None,
            api_caller: false,
            _app_slot: None,
            routed_to: same_gateway::RoutedTo::default(),
        }
    }

    /// The `Origin` the connection was opened with (WebSocket upgrade).
    pub(crate) fn set_web_origin(&mut self, origin: Option<String>) {
        self.web_origin = origin.map(String::into_boxed_str);
    }

    /// Refuses a browser connection from an origin the app does not list
    /// (an empty list allows any).
    fn check_origin(&self, allowed: &[String]) -> Result<(), String> {
        match &self.web_origin {
            Some(origin)
                if !allowed.is_empty()
                    && !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) =>
            {
                Err(format!(
                    "connections from web pages of {origin} are not allowed for this app"
                ))
            }
            _ => Ok(()),
        }
    }

    /// The identity, shared with what writes to the client (it needs the
    /// user and the ack mode).
    pub(crate) fn identity_cell(&self) -> Arc<OnceLock<Identity>> {
        self.identity.clone()
    }

    pub(crate) fn unacked(&self) -> Arc<Unacked> {
        self.unacked.clone()
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    pub fn is_authenticated(&self) -> bool {
        self.identity.get().is_some()
    }

    fn user(&self) -> Result<&Identity, ServiceError> {
        self.identity
            .get()
            .ok_or_else(|| ServiceError::new(ErrorCode::NotAuthenticated, "send AUTH_CLIENT first"))
    }

    /// Whether a request of `kind` (`None`: one the server does not know)
    /// may go on, checked before its fields are read: only AUTH_CLIENT
    /// before authentication, and after it the rate limits (ACK has its
    /// own) and no second AUTH_CLIENT.
    pub fn admit(&mut self, kind: Option<CommandKind>) -> Result<(), ServiceError> {
        if !self.is_authenticated() {
            return match kind {
                Some(CommandKind::Auth) => Ok(()),
                Some(kind) if self.admits_anonymous(kind) => self.within_rate(),
                _ => Err(ServiceError::new(
                    ErrorCode::NotAuthenticated,
                    "send AUTH_CLIENT first",
                )),
            };
        }
        if kind == Some(CommandKind::Ack) {
            // Spent by `ack` once the frame's ids are known.
            if !self.ack_limiter.has_room() {
                return Err(ServiceError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} ACK frames per second",
                        self.gw.limits.acks_per_second
                    ),
                ));
            }
        } else {
            self.within_rate()?;
        }
        if kind == Some(CommandKind::Auth) {
            return Err(ServiceError::invalid("already authenticated"));
        }
        Ok(())
    }

    fn within_rate(&mut self) -> Result<(), ServiceError> {
        if self.limiter.allow() {
            return Ok(());
        }
        Err(ServiceError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} messages per second",
                self.gw.limits.messages_per_second
            ),
        ))
    }

    /// Admits and runs a command: the whole rule set for a transport whose
    /// requests are typed from the start.
    pub async fn execute(
        &mut self,
        command: ClientCommand,
        meta: &RequestMeta,
    ) -> Result<Outcome, ServiceError> {
        self.admit(Some(command.kind()))?;
        self.run(command, meta).await
    }

    /// Runs an admitted command ([`Session::admit`]; a transport that reads
    /// a request's fields only once it is admitted calls the two apart).
    pub async fn run(
        &mut self,
        command: ClientCommand,
        meta: &RequestMeta,
    ) -> Result<Outcome, ServiceError> {
        Ok(match command {
            ClientCommand::Auth(auth) => Outcome::Auth(self.authenticate(auth).await?),
            ClientCommand::Message(msg) => Outcome::Accepted(self.send_direct(msg, meta).await?),
            ClientCommand::GroupMessage(msg) => {
                Outcome::Accepted(self.send_group(msg, meta).await?)
            }
            ClientCommand::Fetch(fetch) => Outcome::Fetched(self.fetch(fetch).await?),
            ClientCommand::Ack(ack) => {
                self.ack(ack).await?;
                Outcome::Acked
            }
            ClientCommand::Group(cmd) => Outcome::Group(self.group_command(cmd).await?),
            other => Outcome::Channel(self.run_channel(other, meta).await?),
        })
    }

    /// Checks the credential; on success the session acts as that user.
    pub async fn authenticate(&mut self, auth: Auth) -> Result<AuthOutcome, ServiceError> {
        if self.is_authenticated() {
            return Err(ServiceError::invalid("already authenticated"));
        }
        // An anonymous room member's rooms belong to its app and generated
        // user: signing in as someone (of any app) would mix them.
        if self.is_admitted() {
            return Err(ServiceError::invalid(
                "this connection is an anonymous room member; sign in on a new connection",
            ));
        }
        check_user_id(
            "data.userId",
            &auth.user_id,
            self.gw.limits.max_user_id_chars,
        )?;
        let reply = call(self.gw.deps.auth.verify_client(pb::VerifyClientRequest {
            app_id: auth.app_id.clone(),
            user_id: auth.user_id.clone(),
            token: auth.token,
        }))
        .await?;
        if !reply.authenticated {
            return Ok(AuthOutcome::Refused {
                app_id: auth.app_id,
                user_id: auth.user_id,
                reason: reply.reason,
                redirect: None,
            });
        }
        if let Err(reason) = self.check_origin(&reply.allowed_origins) {
            metrics::counter!("switchboard_origin_refusals_total").increment(1);
            return Ok(AuthOutcome::Refused {
                app_id: auth.app_id,
                user_id: auth.user_id,
                reason,
                redirect: None,
            });
        }
        // A user of another domain signs in there (the master user is
        // served in every domain: its presence events are per domain).
        if auth.user_id != reply.master_user_id
            && let Some(url) = self
                .gw
                .deps
                .homes
                .as_ref()
                .and_then(|h| h.redirect(&auth.app_id, &auth.user_id))
        {
            metrics::counter!("switchboard_auth_redirects_total").increment(1);
            return Ok(AuthOutcome::Refused {
                app_id: auth.app_id,
                user_id: auth.user_id,
                reason: "the user's home is another domain: connect there".to_owned(),
                redirect: Some(url),
            });
        }
        if let Some(quotas) = self.gw.quotas.get() {
            match quotas.join_app(&auth.app_id) {
                Ok(slot) => self._app_slot = slot,
                Err(reason) => {
                    return Ok(AuthOutcome::Refused {
                        app_id: auth.app_id,
                        user_id: auth.user_id,
                        reason,
                        redirect: None,
                    });
                }
            }
        }
        // Set once: checked above, and only this method sets it.
        let _ = self.identity.set(Identity {
            app_id: auth.app_id,
            app_name: reply.app_name,
            user_id: auth.user_id,
            acks: auth.acks,
        });
        Ok(AuthOutcome::Accepted)
    }

    /// The user is reachable through this session: presence is recorded and,
    /// on the user's first connection, the app's master user is told.
    /// For transports that hold a live connection.
    pub async fn online(&self) {
        self.presence(true).await;
    }

    /// The session's connection is gone (see [`Session::online`]).
    pub async fn offline(&self) {
        self.presence(false).await;
    }

    async fn presence(&self, online: bool) {
        let Some(id) = self.identity.get() else {
            return;
        };
        let gw = &self.gw;
        let changed = if online {
            gw.deps
                .presence
                .connect(&id.app_id, &id.user_id, &gw.id)
                .await
        } else {
            gw.deps
                .presence
                .disconnect(&id.app_id, &id.user_id, &gw.id)
                .await
        };
        match changed {
            Ok(t) if t.user_changed => {
                let change = pb::PresenceChangeRequest {
                    app_id: id.app_id.clone(),
                    user_id: id.user_id.clone(),
                    online,
                };
                if let Err(e) = gw.deps.delivery.presence_changed(change).await {
                    tracing::warn!(error = %e, online, "user presence event failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, online, "presence update failed"),
        }
    }

    /// A direct message: checked, routed, accepted.
    pub async fn send_direct(
        &mut self,
        msg: Message,
        meta: &RequestMeta,
    ) -> Result<Accepted, ServiceError> {
        let checked = self.check_direct(msg, meta)?;
        self.route_direct(checked, meta).await
    }

    /// A direct message checked and built, not routed yet: a transport that
    /// reads several at once routes them together ([`Session::route_batch`]),
    /// or one alone ([`Session::route_direct`]).
    pub fn check_direct(
        &self,
        msg: Message,
        meta: &RequestMeta,
    ) -> Result<CheckedDirect, ServiceError> {
        let id = self.user()?;
        if let Some(client_id) = &msg.id {
            check_message_id(client_id)?;
        }
        check_recipient(id, &msg.to, self.gw.limits.max_user_id_chars)?;
        self.check_content(&msg.content)?;
        if let Some(quotas) = self.gw.quotas.get() {
            quotas.charge(&id.app_id, &id.user_id, msg.content.len() as u64)?;
        }
        let mut envelope = self.envelope(id, msg.id, meta, msg.feature);
        envelope.to = vec![msg.to];
        envelope.content = msg.content;
        envelope.kind = pb::MessageKind::Direct.into();
        Ok(CheckedDirect(envelope))
    }

    /// A message to an ad-hoc list of users or a persistent group.
    pub async fn send_group(
        &mut self,
        msg: GroupMessage,
        meta: &RequestMeta,
    ) -> Result<Accepted, ServiceError> {
        let id = self.user()?;
        if let Some(client_id) = &msg.id {
            check_message_id(client_id)?;
        }
        self.check_content(&msg.content)?;
        let mut envelope = self.envelope(id, msg.id, meta, msg.feature);
        match (msg.to, msg.group) {
            (Some(to), None) => {
                if to.is_empty() {
                    return Err(ServiceError::invalid("data.to is empty"));
                }
                let max = self.gw.limits.max_group_recipients;
                if to.len() > max {
                    return Err(ServiceError::invalid(format!(
                        "{} recipients exceed the limit of {max}",
                        to.len()
                    )));
                }
                for user in &to {
                    check_recipient(id, user, self.gw.limits.max_user_id_chars)?;
                }
                // Every recipient costs the content: one message to 1,000
                // users is 1,000 messages' worth of storage and pushes.
                if let Some(quotas) = self.gw.quotas.get() {
                    let cost = (msg.content.len() as u64).saturating_mul(to.len() as u64);
                    quotas.charge(&id.app_id, &id.user_id, cost)?;
                }
                envelope.to = to;
            }
            (None, Some(group)) if !group.is_empty() => {
                // Its members are known once routed: charged then.
                if let Some(quotas) = self.gw.quotas.get() {
                    quotas.check(&id.app_id, &id.user_id)?;
                }
                envelope.group = group;
            }
            _ => {
                return Err(ServiceError::invalid(
                    "GROUP_MESSAGE needs either data.to (a list of users) or data.group",
                ));
            }
        }
        // Its pushes may still be on their way when a later direct message
        // would take the same-gateway shortcut: route those too.
        self.routed_to.add_all();
        let persistent = !envelope.group.is_empty();
        let content_bytes = msg.content.len() as u64;
        envelope.content = msg.content;
        envelope.kind = pb::MessageKind::Group.into();
        let (accepted, recipients) = self.route_counted(envelope, meta).await?;
        if persistent && let Some(quotas) = self.gw.quotas.get() {
            quotas.charge_after(
                &id.app_id,
                &id.user_id,
                content_bytes.saturating_mul(u64::from(recipients)),
            );
        }
        Ok(accepted)
    }

    fn check_content(&self, content: &str) -> Result<(), ServiceError> {
        let max = self.gw.limits.max_content_bytes;
        if content.len() > max {
            return Err(ServiceError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "content of {} bytes exceeds the limit of {max}",
                    content.len()
                ),
            ));
        }
        Ok(())
    }

    fn envelope(
        &self,
        id: &Identity,
        client_id: Option<String>,
        meta: &RequestMeta,
        feature: pb::Feature,
    ) -> pb::Envelope {
        let (message_id, client_id) = match client_id {
            Some(given) => (given, true),
            None => (switchboard_mesh::new_message_id(), false),
        };
        pb::Envelope {
            id: message_id,
            client_id,
            app_id: id.app_id.clone(),
            from: id.user_id.clone(),
            reference: meta.reference.clone().unwrap_or_default(),
            feature: feature.into(),
            ts: switchboard_mesh::now_ms(),
            // An API caller's origin names no gateway: every connection of
            // the sender counts as another device (MESSAGE_SENT copies).
            origin: Some(pb::ConnRef {
                gateway_id: if self.api_caller {
                    String::new()
                } else {
                    self.gw.id.clone()
                },
                conn_id: self.conn_id,
            }),
            hop_limit: switchboard_mesh::DEFAULT_HOP_LIMIT,
            ..Default::default()
        }
    }

    /// Routes one checked direct message.
    pub async fn route_direct(
        &self,
        msg: CheckedDirect,
        meta: &RequestMeta,
    ) -> Result<Accepted, ServiceError> {
        if self.gw.same_gateway.get().is_some() {
            let id = msg.0.id.clone();
            return match self.deliver_here(vec![msg.0], meta).await {
                Ok(()) => Ok(Accepted {
                    id,
                    reliable: false,
                    repeated: false,
                    inbox_full: Vec::new(),
                }),
                Err(mut back) => match back.pop() {
                    Some(envelope) => self.route(envelope, meta).await,
                    None => Err(ServiceError::invalid("nothing to route")),
                },
            };
        }
        self.route(msg.0, meta).await
    }

    /// Routes one envelope built by this session.
    async fn route(
        &self,
        envelope: pb::Envelope,
        meta: &RequestMeta,
    ) -> Result<Accepted, ServiceError> {
        Ok(self.route_counted(envelope, meta).await?.0)
    }

    /// Routes one envelope built by this session; also how many recipients
    /// it was handed to.
    async fn route_counted(
        &self,
        envelope: pb::Envelope,
        meta: &RequestMeta,
    ) -> Result<(Accepted, u32), ServiceError> {
        let id = envelope.id.clone();
        let reliable = envelope.feature() == pb::Feature::Reliable;
        let group = envelope.kind() == pb::MessageKind::Group;
        self.gw
            .registry
            .counters
            .message(group, reliable)
            .increment(1);
        let span = receive_span(
            &self.gw.deps.domain,
            &envelope,
            meta.traceparent.as_deref(),
            1,
        );
        let routed = tracing::Instrument::instrument(
            call(self.gw.deps.router.route(pb::RouteRequest {
                envelope: Some(envelope),
            })),
            span.clone(),
        )
        .await;
        let reply = routed.inspect_err(|e| {
            span.record("error", tracing::field::display(e));
        })?;
        Ok((
            Accepted {
                id,
                reliable,
                repeated: reply.repeated.contains(&0),
                inbox_full: reply.inbox_full_recipients,
            },
            reply.recipients,
        ))
    }

    /// Routes checked direct messages as one unit (one store write for the
    /// RELIABLE ones): all are accepted or none. `meta` is the first
    /// message's (the batch joins its trace).
    pub async fn route_batch(
        &self,
        messages: Vec<CheckedDirect>,
        meta: &RequestMeta,
    ) -> Result<Routed, ServiceError> {
        // Same layout: the vector is reused in place, not reallocated.
        let mut envelopes: Vec<pb::Envelope> = messages.into_iter().map(|m| m.0).collect();
        if self.gw.same_gateway.get().is_some() && !envelopes.is_empty() {
            match self.deliver_here(envelopes, meta).await {
                Ok(()) => {
                    return Ok(Routed {
                        repeated: Vec::new(),
                        inbox_full: Vec::new(),
                    });
                }
                Err(back) => envelopes = back,
            }
        }
        let Some(first) = envelopes.first() else {
            return Ok(Routed {
                repeated: Vec::new(),
                inbox_full: Vec::new(),
            });
        };
        let span = receive_span(
            &self.gw.deps.domain,
            first,
            meta.traceparent.as_deref(),
            envelopes.len(),
        );
        let reliable = envelopes
            .iter()
            .filter(|e| e.feature() == pb::Feature::Reliable)
            .count();
        let counters = &self.gw.registry.counters;
        counters.message(false, true).increment(reliable as u64);
        counters
            .message(false, false)
            .increment((envelopes.len() - reliable) as u64);
        let routed = tracing::Instrument::instrument(
            call(
                self.gw
                    .deps
                    .router
                    .route_batch(pb::RouteBatchRequest { envelopes }),
            ),
            span.clone(),
        )
        .await;
        let reply = routed.inspect_err(|e| {
            span.record("error", tracing::field::display(e));
        })?;
        Ok(Routed {
            repeated: reply.repeated,
            inbox_full: reply.inbox_full,
        })
    }

    /// Whether the client is told `MESSAGE_ACCEPTED` for a message: in ack
    /// mode for every RELIABLE one, and always for a resend (it is the
    /// answer the resend waits for).
    pub fn answers_accepted(&self, accepted: &Accepted) -> bool {
        accepted.repeated || (accepted.reliable && self.identity.get().is_some_and(|i| i.acks))
    }

    /// The next page of stored messages (after those this session already
    /// returned), up to `count` (default 100, capped by `max_fetch_count`).
    pub async fn fetch(&mut self, fetch: Fetch) -> Result<Fetched, ServiceError> {
        let count = fetch
            .count
            .unwrap_or(DEFAULT_FETCH_COUNT)
            .min(self.gw.limits.max_fetch_count);
        self.fetch_page(count).await
    }

    /// Ack mode, right after authentication: the stored messages not
    /// acknowledged yet come again (none without ack mode).
    pub async fn replay(&mut self) -> Result<Fetched, ServiceError> {
        if !self.identity.get().is_some_and(|i| i.acks) {
            return Ok(Fetched {
                messages: Vec::new(),
                left: 0,
            });
        }
        let count = u32::try_from(self.gw.limits.max_unacked)
            .unwrap_or(u32::MAX)
            .min(self.gw.limits.max_fetch_count);
        self.fetch_page(count).await
    }

    async fn fetch_page(&mut self, count: u32) -> Result<Fetched, ServiceError> {
        let id = self.user()?;
        let page = call(self.gw.deps.delivery.fetch(pb::FetchRequest {
            app_id: id.app_id.clone(),
            user_id: id.user_id.clone(),
            count,
            after_seq: self.fetch_cursor,
        }))
        .await?;
        if let Some(last) = page.messages.iter().map(|m| m.seq).max() {
            self.fetch_cursor = self.fetch_cursor.max(last);
        }
        Ok(Fetched {
            messages: page.messages,
            left: page.left,
        })
    }

    /// The transport handed out the last page only up to `seq` (the rest
    /// did not fit its send queue): the next page starts after `seq`.
    pub fn fetch_sent_up_to(&mut self, seq: u64) {
        self.fetch_cursor = seq;
    }

    /// Acknowledges stored messages handed out in ack mode: they count as
    /// delivered. Ids not handed out (or already acknowledged) are ignored.
    ///
    /// An id that acknowledges a message handed to this session costs
    /// nothing, however many frames carry them: a client catching up on a
    /// backlog may ack one message per frame. Every other id (unknown,
    /// already acknowledged, repeated) spends one unit of the ACK budget,
    /// and a frame that acknowledges nothing at least one, so a flood of
    /// ACKs of nothing, in small frames or large ones, is refused.
    pub async fn ack(&mut self, ack: Ack) -> Result<(), ServiceError> {
        self.user()?;
        let seqs = self.unacked.take(&ack.ids);
        let wasted = if seqs.is_empty() {
            ack.ids.len().max(1)
        } else {
            ack.ids.len() - seqs.len()
        };
        if wasted > 0 {
            self.ack_limiter.charge(wasted);
        }
        let id = self.user()?;
        for seq in seqs {
            let item = pb::DeliveredItem {
                app_id: id.app_id.clone(),
                user_id: id.user_id.clone(),
                seq,
            };
            if self.gw.delivered_tx.send(item).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// `to` is a user of the sender's app (`<app name>-<rest>`) and a valid
/// user id ([`check_user_id`]).
fn check_recipient(id: &Identity, to: &str, max_chars: usize) -> Result<(), ServiceError> {
    check_user_id("recipient", to, max_chars)?;
    let ok = to
        .strip_prefix(id.app_name.as_str())
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|rest| !rest.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ServiceError::new(
            ErrorCode::InvalidRecipient,
            format!("recipient {to:?} is not a user of app {}", id.app_name),
        ))
    }
}

/// The `gateway.receive` span of `count` messages routed together, named
/// after the first (its id, kind and feature); a client's `traceparent`
/// joins the client's trace.
fn receive_span(
    domain: &str,
    first: &pb::Envelope,
    traceparent: Option<&str>,
    count: usize,
) -> tracing::Span {
    let kind = match first.kind() {
        pb::MessageKind::Group => "group",
        _ => "direct",
    };
    let feature = match first.feature() {
        pb::Feature::Reliable => "reliable",
        _ => "fast",
    };
    let span = tracing::info_span!(
        "gateway.receive",
        message.id = %first.id,
        message.kind = kind,
        message.feature = feature,
        count,
        app = %first.app_id,
        domain,
        error = tracing::field::Empty,
    );
    if let Some(traceparent) = traceparent {
        switchboard_telemetry::continue_traceparent(&span, traceparent);
    }
    span
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| ServiceError::unavailable("timed out; try again"))?
}

mod api;
pub(crate) mod same_gateway;
#[cfg(test)]
mod tests;

pub use api::{ApiGrant, KeyCheck};
