//! The delivery role: per-user inboxes, push to the gateways holding the
//! recipient's connections, removal once delivered, sender confirmations.
//!
//! RELIABLE: appended to the recipient's inbox (durable) before the call
//! returns, then pushed. A gateway reports it delivered once written to a
//! socket (or acknowledged in ack mode); then it leaves the inbox and, when the
//! sender gave a reference, a MESSAGE_CONFIRMATION (itself RELIABLE) goes back.
//! FAST: pushed to whoever is connected, never stored.
//!
//! Idempotent sends: a RELIABLE envelope whose id the client gave
//! (`client_id`) is appended with its flag set; the store answers a resend
//! within its id window as a repeat, which is neither stored nor pushed (nor
//! copied to the sender) again and is reported in `DeliverReply.repeated`.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_mesh::{AuthClient, GatewayDirectory, ServiceError, pb};
use switchboard_presence::Presence;
use switchboard_store::{Appended, InboxKey, MessageHeader, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Presence(#[from] switchboard_presence::PresenceError),
}

impl From<DeliveryError> for ServiceError {
    fn from(err: DeliveryError) -> Self {
        // The caller may retry: a RELIABLE message was not accepted.
        ServiceError::unavailable(err.to_string())
    }
}

pub struct DeliveryRole {
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    gateways: Arc<dyn GatewayDirectory>,
    auth: AuthClient,
    metrics: Metrics,
    /// Test only: abort the process right after a store append returns.
    abort_after_append: bool,
}

/// The environment variable naming a failpoint, and the value that makes
/// the delivery role abort the process (as a kill -9 would) between a store
/// append and its reply: for the crash tests of idempotent sends.
pub const FAILPOINT_ENV: &str = "SWITCHBOARD_FAILPOINT";
pub const FAILPOINT_AFTER_APPEND: &str = "delivery-after-append";

/// What the delivery of a call's envelopes did, per envelope.
struct Delivered {
    /// The inbox sequence number (RELIABLE) or 0 (FAST, or a repeat).
    seqs: Vec<u64>,
    /// Whether its client id was a repeat; empty when none was.
    repeated: Vec<bool>,
}

/// Handles of the metrics recorded per store call, registered once (the
/// labelled macros build and hash their key on every call).
struct Metrics {
    append_seconds: metrics::Histogram,
    fetch_seconds: metrics::Histogram,
    remove_seconds: metrics::Histogram,
    appended: metrics::Counter,
    removed: metrics::Counter,
    fast_dropped_offline: metrics::Counter,
}

impl Metrics {
    fn new() -> Self {
        let op = |op: &'static str| metrics::histogram!("switchboard_store_op_duration_seconds", "op" => op);
        Metrics {
            append_seconds: op("append"),
            fetch_seconds: op("fetch"),
            remove_seconds: op("remove"),
            appended: metrics::counter!("switchboard_inbox_appended_total"),
            removed: metrics::counter!("switchboard_inbox_removed_total"),
            fast_dropped_offline: metrics::counter!("switchboard_fast_dropped_total", "reason" => "offline"),
        }
    }
}

/// Deliveries recently done, by (app, message id, recipient), with the seq
/// each got: a Deliver call repeated after a caller's failover (the first
/// one did the work, its answer was lost) is answered from here instead of
/// storing and pushing the message a second time. Bounded, oldest first
/// out; it lives as long as the process.
struct RecentDeliveries {
    seqs: HashMap<DeliveryKey, u64>,
    order: std::collections::VecDeque<DeliveryKey>,
}

/// A 64-bit digest of (app, sender, message id, recipient): nothing to
/// allocate per delivery on the hot path, and a collision among the
/// remembered 65,536 is out of reach (~10⁻¹⁰). The sender is part of it:
/// client-given ids are unique per sender only.
type DeliveryKey = u64;

fn digest(app_id: &str, from: &str, id: &str, to: &str) -> DeliveryKey {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [app_id, from, id, to] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    h.digest()
}

/// Deliveries remembered for de-duplication.
const RECENT_DELIVERIES: usize = 65_536;

impl RecentDeliveries {
    fn new() -> Self {
        RecentDeliveries {
            seqs: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }

    fn get(&self, key: &DeliveryKey) -> Option<u64> {
        self.seqs.get(key).copied()
    }

    fn insert(&mut self, key: DeliveryKey, seq: u64) {
        if self.seqs.insert(key, seq).is_none() {
            self.order.push_back(key);
            while self.order.len() > RECENT_DELIVERIES {
                if let Some(old) = self.order.pop_front() {
                    self.seqs.remove(&old);
                }
            }
        }
    }
}

fn delivery_key(envelope: &pb::Envelope) -> Option<DeliveryKey> {
    let to = envelope.to.first()?;
    if envelope.id.is_empty() {
        return None;
    }
    Some(digest(&envelope.app_id, &envelope.from, &envelope.id, to))
}

/// A push of a stored or fresh message to its recipient's connections.
fn push_to_recipient(app_id: String, msg: pb::InboxMessage) -> pb::PushItem {
    pb::PushItem {
        app_id,
        user_id: msg.to.clone(),
        message: Some(msg),
        exclude: None,
        sent_copy: false,
        to: Vec::new(),
        traceparent: String::new(),
    }
}

fn inbox_message(envelope: &pb::Envelope, to: &str) -> pb::InboxMessage {
    pb::InboxMessage {
        id: envelope.id.clone(),
        kind: envelope.kind,
        from: envelope.from.clone(),
        to: to.to_owned(),
        group: envelope.group.clone(),
        content: envelope.content.clone(),
        reference: envelope.reference.clone(),
        ts: envelope.ts,
        seq: 0,
        feature: envelope.feature,
    }
}

/// The message of an envelope for one recipient (its first `to`), with the
/// envelope's app; the fields move.
fn into_inbox_message(envelope: pb::Envelope) -> Option<(String, pb::InboxMessage)> {
    let to = envelope.to.into_iter().next()?;
    let msg = pb::InboxMessage {
        id: envelope.id,
        kind: envelope.kind,
        from: envelope.from,
        to,
        group: envelope.group,
        content: envelope.content,
        reference: envelope.reference,
        ts: envelope.ts,
        seq: 0,
        feature: envelope.feature,
    };
    Some((envelope.app_id, msg))
}

/// The sender confirmation of a delivered message: RELIABLE, for direct
/// messages that carry a reference. Its id is the original message's id.
fn confirmation_of(msg: &MessageHeader<'_>) -> Option<pb::InboxMessage> {
    if msg.kind() != pb::MessageKind::Direct || msg.reference.is_empty() {
        return None;
    }
    Some(pb::InboxMessage {
        id: msg.id.to_owned(),
        kind: pb::MessageKind::Confirmation.into(),
        from: msg.to.to_owned(),
        to: msg.from.to_owned(),
        reference: msg.reference.to_owned(),
        ts: switchboard_mesh::now_ms(),
        feature: pb::Feature::Reliable.into(),
        ..Default::default()
    })
}

impl DeliveryRole {
    pub fn new(
        store: Arc<dyn Store>,
        presence: Arc<dyn Presence>,
        gateways: Arc<dyn GatewayDirectory>,
        auth: AuthClient,
    ) -> Self {
        DeliveryRole {
            store,
            presence,
            gateways,
            auth,
            metrics: Metrics::new(),
            // Read once here, not per message.
            abort_after_append: std::env::var(FAILPOINT_ENV)
                .is_ok_and(|v| v == FAILPOINT_AFTER_APPEND),
        }
    }

    /// Persists the RELIABLE envelopes, then pushes everything but repeats.
    async fn deliver_envelopes(
        &self,
        envelopes: Vec<pb::Envelope>,
        sent_copies: Vec<pb::Envelope>,
        copy_to_sender: bool,
    ) -> Result<Delivered, DeliveryError> {
        // Envelopes whose id the client gave: indexed by the store. Empty
        // (nothing allocated) when none is.
        let client_ids: Vec<bool> = if envelopes.iter().any(|e| e.client_id) {
            envelopes.iter().map(|e| e.client_id).collect()
        } else {
            Vec::new()
        };
        // MESSAGE_SENT copies, built only when the sender has a connection
        // besides the one that sent; each with the envelope it copies (None:
        // a group message's, which goes unless its send was a repeat).
        let mut copies = Vec::new();
        let direct_copies = envelopes
            .iter()
            .enumerate()
            .filter(|_| copy_to_sender)
            .map(|(i, e)| (Some(i), e));
        let group_copies = sent_copies.iter().map(|e| (None, e));
        for (source, original) in group_copies.chain(direct_copies) {
            if self.has_other_connections(original).await? {
                let mut msg = inbox_message(original, "");
                msg.to = original.from.clone();
                let copy = pb::PushItem {
                    app_id: original.app_id.clone(),
                    user_id: original.from.clone(),
                    message: Some(msg),
                    exclude: original.origin.clone(),
                    sent_copy: true,
                    to: original.to.clone(),
                    traceparent: String::new(),
                };
                copies.push((source, copy));
            }
        }
        // The envelopes' fields move into the messages: a 1000-character
        // content is not copied on its way to the socket.
        let mut apps: Vec<String> = Vec::with_capacity(envelopes.len());
        let mut messages: Vec<pb::InboxMessage> = Vec::with_capacity(envelopes.len());
        let mut flags: Vec<bool> = Vec::with_capacity(client_ids.len());
        // Envelopes without a recipient have no message (none in practice:
        // nothing allocated then).
        let mut dropped: Vec<usize> = Vec::new();
        for (i, envelope) in envelopes.into_iter().enumerate() {
            if let Some((app, msg)) = into_inbox_message(envelope) {
                apps.push(app);
                messages.push(msg);
                if let Some(&flag) = client_ids.get(i) {
                    flags.push(flag);
                }
            } else {
                dropped.push(i);
            }
        }
        let message_of = |envelope: usize| {
            (!dropped.contains(&envelope))
                .then(|| envelope - dropped.iter().filter(|&&d| d < envelope).count())
        };

        // Append RELIABLE messages: one store call per run of one app (one
        // in practice: a route call carries messages of one app).
        let mut seqs = vec![0u64; messages.len()];
        let mut repeated: Vec<bool> = Vec::new();
        let reliable = |m: &pb::InboxMessage| m.feature() == pb::Feature::Reliable;
        let mut start = 0;
        while start < messages.len() {
            if !reliable(&messages[start]) {
                start += 1;
                continue;
            }
            // A run of RELIABLE messages of one app: one append, in order.
            let app = &apps[start];
            let end = start
                + messages[start..]
                    .iter()
                    .zip(&apps[start..])
                    .take_while(|(m, a)| reliable(m) && *a == app)
                    .count();
            let run = &messages[start..end];
            let run_flags = flags.get(start..end).unwrap_or_default();
            let started = std::time::Instant::now();
            let appended = tracing::Instrument::instrument(
                self.store.append(app, run, run_flags),
                tracing::info_span!("store.append", count = run.len()),
            )
            .await?;
            if self.abort_after_append {
                tracing::error!("failpoint delivery-after-append: aborting");
                std::process::abort();
            }
            self.metrics
                .append_seconds
                .record(started.elapsed().as_secs_f64());
            let mut stored = 0;
            for (i, outcome) in (start..end).zip(appended) {
                match outcome {
                    Appended::Stored(seq) => {
                        seqs[i] = seq;
                        stored += 1;
                    }
                    Appended::Repeat => {
                        if repeated.is_empty() {
                            repeated = vec![false; messages.len()];
                        }
                        repeated[i] = true;
                    }
                }
            }
            self.metrics.appended.increment(stored);
            start = end;
        }
        if !repeated.is_empty() {
            let count = repeated.iter().filter(|r| **r).count();
            metrics::counter!("switchboard_sends_repeated_total").increment(count as u64);
            tracing::debug!(count, "repeated client ids: not stored or pushed again");
        }
        let is_repeat = |i: usize| repeated.get(i).copied().unwrap_or(false);
        let mut pushes = Vec::with_capacity(messages.len() + copies.len());
        for (i, ((app, mut msg), seq)) in apps
            .into_iter()
            .zip(messages)
            .zip(seqs.iter().copied())
            .enumerate()
        {
            if is_repeat(i) {
                continue;
            }
            msg.seq = seq;
            pushes.push(push_to_recipient(app, msg));
        }
        // A group message's copy goes unless its send was a repeat (all its
        // envelopes are one send).
        let group_repeat = repeated.iter().any(|r| *r);
        for (source, copy) in copies {
            let skip = match source {
                Some(i) => message_of(i).is_some_and(is_repeat),
                None => group_repeat,
            };
            if !skip {
                pushes.push(copy);
            }
        }
        self.push(pushes).await?;
        Ok(Delivered { seqs, repeated })
    }

    /// Whether the sender of `original` has a connection other than the one
    /// it was sent from.
    async fn has_other_connections(&self, original: &pb::Envelope) -> Result<bool, DeliveryError> {
        let gateways = self
            .presence
            .gateways(&original.app_id, &original.from)
            .await?;
        let mut total: u32 = gateways.iter().map(|(_, n)| *n).sum();
        if let Some(origin) = &original.origin
            && gateways.iter().any(|(gw, _)| *gw == origin.gateway_id)
        {
            total = total.saturating_sub(1);
        }
        Ok(total > 0)
    }

    /// Pushes items to the gateways that hold the users' connections, one
    /// call per gateway. A failing gateway only delays its own users: RELIABLE
    /// messages stay in the inbox until fetched.
    async fn push(&self, items: Vec<pb::PushItem>) -> Result<(), DeliveryError> {
        let traceparent = switchboard_telemetry::current_traceparent().unwrap_or_default();
        let mut by_gateway: HashMap<String, Vec<pb::PushItem>> = HashMap::new();
        for mut item in items {
            item.traceparent.clone_from(&traceparent);
            let gateways = self.presence.gateways(&item.app_id, &item.user_id).await?;
            match gateways.as_slice() {
                [] => {
                    let fast = item
                        .message
                        .as_ref()
                        .is_some_and(|m| m.feature() == pb::Feature::Fast);
                    if fast && !item.sent_copy {
                        // Nobody to hand it to: a FAST message is gone.
                        self.metrics.fast_dropped_offline.increment(1);
                    }
                }
                [(only, _)] => by_gateway.entry(only.clone()).or_default().push(item),
                many => {
                    for (gw, _) in many {
                        by_gateway.entry(gw.clone()).or_default().push(item.clone());
                    }
                }
            }
        }
        for (gateway_id, items) in by_gateway {
            let Some(gateway) = self.gateways.gateway_when_known(&gateway_id).await else {
                tracing::warn!(gateway = %gateway_id, "push to an unknown gateway skipped");
                continue;
            };
            if let Err(e) = gateway.push(pb::PushRequest { items }).await {
                tracing::warn!(gateway = %gateway_id, error = %e, "push failed");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl switchboard_mesh::Delivery for DeliveryRole {
    #[tracing::instrument(
        name = "delivery.deliver",
        skip_all,
        fields(
            count = req.envelopes.len(),
            message.id = req.envelopes.first().map(|e| e.id.as_str()).unwrap_or_default(),
        )
    )]
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        let delivered = self
            .deliver_envelopes(req.envelopes, req.sent_copies, req.copy_to_sender)
            .await?;
        Ok(pb::DeliverReply {
            seqs: delivered.seqs,
            repeated: delivered.repeated,
        })
    }

    #[tracing::instrument(name = "store.fetch", skip_all)]
    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        let inbox = InboxKey::new(req.app_id, req.user_id);
        let started = std::time::Instant::now();
        let page = self
            .store
            .fetch(&inbox, req.after_seq, req.count as usize)
            .await
            .map_err(DeliveryError::from)?;
        self.metrics
            .fetch_seconds
            .record(started.elapsed().as_secs_f64());
        Ok(pb::FetchReply {
            messages: page.messages,
            left: page.left,
        })
    }

    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        let mut by_inbox: HashMap<InboxKey, Vec<u64>> = HashMap::new();
        for item in req.items {
            by_inbox
                .entry(InboxKey::new(item.app_id, item.user_id))
                .or_default()
                .push(item.seq);
        }
        let mut pushes = Vec::new();
        // All inboxes in one store write. The store keeps each sender
        // confirmation once, whatever the number of removals, and never
        // loses it once its message is gone (see `Store::remove`).
        let started = std::time::Instant::now();
        let by_inbox: Vec<(InboxKey, Vec<u64>)> = by_inbox.into_iter().collect();
        let apps: Vec<String> = by_inbox.iter().map(|(k, _)| k.app_id.clone()).collect();
        let removals = self
            .store
            .remove_many(by_inbox, Some(confirmation_of))
            .await
            .map_err(DeliveryError::from)?;
        self.metrics
            .remove_seconds
            .record(started.elapsed().as_secs_f64());
        let mut removed_total = 0u64;
        for (app_id, removal) in apps.into_iter().zip(removals) {
            removed_total += removal.removed.len() as u64;
            for msg in removal.appended {
                pushes.push(push_to_recipient(app_id.clone(), msg));
            }
        }
        self.metrics.removed.increment(removed_total);
        // Sender confirmations, stored with the removals.
        self.metrics.appended.increment(pushes.len() as u64);
        let removed = u32::try_from(removed_total).unwrap_or(u32::MAX);
        if !pushes.is_empty() {
            self.push(pushes).await?;
        }
        Ok(pb::DeliveredReply { removed })
    }

    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        let app = self
            .auth
            .get_app(pb::GetAppRequest {
                app_id: req.app_id.clone(),
            })
            .await?;
        if app.master_user_id.is_empty() || app.master_user_id == req.user_id {
            return Ok(pb::PresenceChangeReply {});
        }
        let kind = if req.online {
            pb::MessageKind::UserConnected
        } else {
            pb::MessageKind::UserDisconnected
        };
        let envelope = pb::Envelope {
            id: switchboard_mesh::new_message_id(),
            app_id: req.app_id,
            from: req.user_id,
            to: vec![app.master_user_id],
            feature: pb::Feature::Fast.into(),
            kind: kind.into(),
            ts: switchboard_mesh::now_ms(),
            ..Default::default()
        };
        self.deliver_envelopes(vec![envelope], Vec::new(), false)
            .await?;
        Ok(pb::PresenceChangeReply {})
    }
}

/// The delivery role as other processes reach it over the mesh: a Deliver
/// call repeated after a caller's failover (the first one did the work, its
/// answer was lost) is answered from memory of recent deliveries instead of
/// storing and pushing the message again. Calls inside one process cannot be
/// repeated that way and skip this memory.
pub struct MeshDelivery {
    inner: Arc<dyn switchboard_mesh::Delivery>,
    recent: std::sync::Mutex<RecentDeliveries>,
}

impl MeshDelivery {
    pub fn new(inner: Arc<dyn switchboard_mesh::Delivery>) -> Self {
        MeshDelivery {
            inner,
            recent: std::sync::Mutex::new(RecentDeliveries::new()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentDeliveries> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl switchboard_mesh::Delivery for MeshDelivery {
    async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
        let keys: Vec<Option<DeliveryKey>> = req.envelopes.iter().map(delivery_key).collect();
        let known: Vec<Option<u64>> = {
            let recent = self.recent();
            keys.iter()
                .map(|k| k.as_ref().and_then(|k| recent.get(k)))
                .collect()
        };
        let repeated = known.iter().filter(|k| k.is_some()).count();
        // A remembered envelope with a client id is a repeat of that id
        // (the store would say so too; memory answers first).
        let mut repeats: Vec<bool> = Vec::new();
        if repeated > 0 {
            metrics::counter!("switchboard_deliveries_repeated_total").increment(repeated as u64);
            tracing::debug!(repeated, "repeated deliveries answered from memory");
            repeats = req
                .envelopes
                .iter()
                .zip(&known)
                .map(|(e, k)| e.client_id && k.is_some())
                .collect();
        }
        // Only what was not delivered yet; copies for the sender only when
        // none of the message was (they went out with the first call).
        let mut fresh = Vec::with_capacity(req.envelopes.len() - repeated);
        let mut positions = Vec::with_capacity(fresh.capacity());
        for (i, envelope) in req.envelopes.into_iter().enumerate() {
            if known[i].is_none() {
                fresh.push(envelope);
                positions.push(i);
            }
        }
        let mut seqs: Vec<u64> = known.iter().map(|k| k.unwrap_or(0)).collect();
        if fresh.is_empty() && repeated > 0 {
            return Ok(pb::DeliverReply {
                seqs,
                repeated: repeats,
            });
        }
        let (sent_copies, copy_to_sender) = if repeated == 0 {
            (req.sent_copies, req.copy_to_sender)
        } else {
            (Vec::new(), false)
        };
        let reply = self
            .inner
            .deliver(pb::DeliverRequest {
                envelopes: fresh,
                sent_copies,
                copy_to_sender,
            })
            .await?;
        if !reply.repeated.is_empty() && repeats.is_empty() {
            repeats = vec![false; seqs.len()];
        }
        let mut recent = self.recent();
        for (n, (&i, seq)) in positions.iter().zip(reply.seqs).enumerate() {
            seqs[i] = seq;
            if reply.repeated.get(n).copied().unwrap_or(false) {
                repeats[i] = true;
            }
            if let Some(key) = keys[i] {
                recent.insert(key, seq);
            }
        }
        Ok(pb::DeliverReply {
            seqs,
            repeated: repeats,
        })
    }

    async fn fetch(&self, req: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
        self.inner.fetch(req).await
    }

    async fn delivered(
        &self,
        req: pb::DeliveredRequest,
    ) -> Result<pb::DeliveredReply, ServiceError> {
        self.inner.delivered(req).await
    }

    async fn presence_changed(
        &self,
        req: pb::PresenceChangeRequest,
    ) -> Result<pb::PresenceChangeReply, ServiceError> {
        self.inner.presence_changed(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_deliveries_are_bounded_oldest_first() {
        let mut recent = RecentDeliveries::new();
        let key = |i: usize| digest("app", "ann", &format!("id{i}"), "bob");
        for i in 0..RECENT_DELIVERIES + 10 {
            recent.insert(key(i), i as u64);
        }
        assert_eq!(recent.seqs.len(), RECENT_DELIVERIES);
        assert_eq!(recent.get(&key(5)), None, "the oldest are forgotten");
        assert_eq!(
            recent.get(&key(RECENT_DELIVERIES + 9)),
            Some((RECENT_DELIVERIES + 9) as u64)
        );
        // Inserting a known key again does not grow the order.
        recent.insert(key(RECENT_DELIVERIES + 9), 1);
        assert_eq!(recent.order.len(), RECENT_DELIVERIES);
    }
}
