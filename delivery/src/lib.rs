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

mod presence_batch;
pub use presence_batch::BatchedPresence;

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use async_trait::async_trait;
use switchboard_mesh::{AuthClient, GatewayDirectory, ServiceError, pb};
use switchboard_presence::Presence;
use switchboard_store::{Appended, InboxKey, MessageHeader, Store, StoreError};

mod disk;
mod quota;
pub use disk::{DiskFloor, DiskGuard};
pub use quota::InboxQuota;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Presence(#[from] switchboard_presence::PresenceError),
    /// The store's disk is below its free-space floor.
    #[error(
        "the server is low on disk space: RELIABLE messages are refused for now; try again later"
    )]
    LowDisk,
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
    /// Where messages for users of other domains go (federation); set once
    /// the router's federation exists.
    onward: std::sync::OnceLock<Arc<dyn Onward>>,
    /// Told about RELIABLE messages stored for users with nobody connected
    /// (push webhooks); set once.
    offline: std::sync::OnceLock<Arc<dyn Offline>>,
    /// Messages and bytes per inbox, against the inbox quota.
    counters: quota::InboxCounters,
    /// The store's free-space floor; none for stores on other machines.
    disk: Option<Arc<DiskGuard>>,
}

/// Messages stored for users with nobody connected (push webhooks).
#[async_trait]
pub trait Offline: Send + Sync + 'static {
    /// `messages` (with their seqs) of `app_id` were stored and found no
    /// connection of their recipient; durable when this returns.
    async fn offline(&self, app_id: &str, messages: &[pb::InboxMessage]) -> Result<(), String>;
}

/// A persistent group's copy for a member homed in another domain.
fn is_remote_copy(onward: &dyn Onward, e: &pb::Envelope) -> bool {
    e.kind() == pb::MessageKind::Group
        && !e.group.is_empty()
        && e.to.len() == 1
        && onward.is_remote(&e.app_id, &e.to[0])
}

/// Users of other domains, for messages this role creates itself (sender
/// confirmations): the federation's side of delivery.
#[async_trait]
pub trait Onward: Send + Sync + 'static {
    /// Whether `user_id` of `app_id` lives in another domain.
    fn is_remote(&self, app_id: &str, user_id: &str) -> bool;
    /// Hands the envelopes on toward their home domains; durable (in a link
    /// outbox) when it returns.
    async fn forward(&self, envelopes: Vec<pb::Envelope>) -> Result<(), ServiceError>;
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
    /// Whether its recipient's inbox was full; empty when none was.
    inbox_full: Vec<bool>,
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

/// Deliveries recently done, by (app, sender, message id, recipient), with the seq
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

/// Messages of a connected recipient's inbox searched for the stored copy
/// of a repeated send, to push it again.
const REPEAT_LOOKUP: usize = 256;

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
    // A client-given id is the store's to judge (RELIABLE, within its id
    // window); a FAST message with one is never a repeat, whatever id a
    // client reuses.
    if envelope.id.is_empty() || envelope.client_id {
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
        channel: None,
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
        hops: Vec::new(),
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
        hops: envelope.hops,
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

/// Hands confirmations on until a route takes them (backoff up to 30 s),
/// then removes them from the inbox here.
async fn retry_onward(
    onward: Arc<dyn Onward>,
    store: Arc<dyn Store>,
    app_id: String,
    messages: Vec<pb::InboxMessage>,
    envelopes: Vec<pb::Envelope>,
) {
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        tokio::time::sleep(pause).await;
        match onward.forward(envelopes.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::debug!(error = %e, "confirmations for another domain still wait");
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
    remove_handed_on(store.as_ref(), &app_id, &messages).await;
}

/// Removes messages handed on to another domain from the inboxes here.
async fn remove_handed_on(store: &dyn Store, app_id: &str, messages: &[pb::InboxMessage]) {
    for m in messages {
        let inbox = InboxKey::new(app_id, m.to.as_str());
        if let Err(e) = store.remove(&inbox, &[m.seq], None).await {
            tracing::warn!(error = %e, id = %m.id, "a confirmation sent to another domain stays in the inbox here too");
        }
    }
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
            onward: std::sync::OnceLock::new(),
            offline: std::sync::OnceLock::new(),
            counters: quota::InboxCounters::new(InboxQuota::default()),
            disk: None,
        }
    }

    /// Refuses RELIABLE messages to inboxes past `quota` (`INBOX_FULL`).
    pub fn with_inbox_quota(mut self, quota: InboxQuota) -> Self {
        self.counters = quota::InboxCounters::new(quota);
        self
    }

    /// As [`DeliveryRole::with_inbox_quota`], with the apps (by id) that
    /// have their own.
    pub fn with_inbox_quotas(
        mut self,
        quota: InboxQuota,
        per_app: std::collections::HashMap<String, InboxQuota>,
    ) -> Self {
        self.counters = quota::InboxCounters::with_apps(quota, per_app);
        self
    }

    /// Refuses RELIABLE messages (`UNAVAILABLE`) while `disk` is low.
    pub fn with_disk_guard(mut self, disk: Arc<DiskGuard>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Forgets the inbox counts: each is read from the store again when
    /// next touched. Called when the inboxes this process serves change.
    pub fn forget_inbox_counts(&self) {
        self.counters.forget();
    }

    /// Tells `offline` about RELIABLE messages stored for users with nobody
    /// connected. Set once; later calls are ignored.
    pub fn set_offline(&self, offline: Arc<dyn Offline>) {
        let _ = self.offline.set(offline);
    }

    /// Sends sender confirmations of users homed in other domains there
    /// (federation). Set once; later calls are ignored.
    pub fn set_onward(&self, onward: Arc<dyn Onward>) {
        let _ = self.onward.set(onward);
    }

    /// Of follow-up messages just stored here, hands those whose recipient
    /// lives in another domain on, and then removes them from the inbox
    /// here (they were stored first, so none is lost if handing on fails:
    /// it stays here, logged). Returns the ones to push here.
    async fn send_onward(
        &self,
        app_id: &str,
        messages: Vec<pb::InboxMessage>,
    ) -> Vec<pb::InboxMessage> {
        let Some(onward) = self.onward.get() else {
            return messages;
        };
        let (remote, local): (Vec<_>, Vec<_>) = messages
            .into_iter()
            .partition(|m| onward.is_remote(app_id, &m.to));
        if remote.is_empty() {
            return local;
        }
        let envelopes: Vec<pb::Envelope> = remote
            .iter()
            .map(|m| pb::Envelope {
                id: m.id.clone(),
                app_id: app_id.to_owned(),
                from: m.from.clone(),
                to: vec![m.to.clone()],
                group: m.group.clone(),
                content: m.content.clone(),
                reference: m.reference.clone(),
                feature: m.feature,
                kind: m.kind,
                ts: m.ts,
                ..Default::default()
            })
            .collect();
        match onward.forward(envelopes.clone()).await {
            Ok(()) => remove_handed_on(self.store.as_ref(), app_id, &remote).await,
            Err(e) => {
                // Stored here already: nothing is lost, and they are
                // handed on as soon as a route takes them.
                tracing::warn!(error = %e, count = remote.len(), "cannot hand confirmations to another domain on now; retrying");
                let (onward, store, app) = (onward.clone(), self.store.clone(), app_id.to_owned());
                tokio::spawn(retry_onward(onward, store, app, remote, envelopes));
            }
        }
        local
    }

    /// Persists the RELIABLE envelopes, then pushes everything but repeats.
    async fn deliver_envelopes(
        &self,
        envelopes: Vec<pb::Envelope>,
        sent_copies: Vec<pb::Envelope>,
        copy_to_sender: bool,
    ) -> Result<Delivered, DeliveryError> {
        // Below the disk floor nothing RELIABLE is taken, so nothing is
        // accepted and then lost; FAST messages flow on.
        if let Some(disk) = &self.disk
            && disk.is_low()
            && envelopes
                .iter()
                .any(|e| e.feature() == pb::Feature::Reliable)
        {
            metrics::counter!("switchboard_quota_refusals_total", "quota" => "disk").increment(1);
            return Err(DeliveryError::LowDisk);
        }
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
        let originals: Vec<(Option<usize>, &pb::Envelope)> =
            group_copies.chain(direct_copies).collect();
        let senders: Vec<&pb::Envelope> = originals.iter().map(|(_, e)| *e).collect();
        let others = self.has_other_connections(&senders).await?;
        for ((source, original), other) in originals.into_iter().zip(others) {
            if other {
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
                    channel: None,
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
        let mut inbox_full: Vec<bool> = Vec::new();
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
            let charges = self.counters.admit(self.store.as_ref(), app, run).await?;
            // The positions (in the run) that go to the store: all of them
            // unless an inbox is full, which is rare (its messages then are
            // copied out of the run).
            let (kept, kept_at): (std::borrow::Cow<'_, [pb::InboxMessage]>, Vec<usize>) =
                if charges.refused.is_empty() {
                    (run.into(), (0..run.len()).collect())
                } else {
                    let at: Vec<usize> = (0..run.len()).filter(|&k| !charges.refused[k]).collect();
                    if inbox_full.is_empty() {
                        inbox_full = vec![false; messages.len()];
                    }
                    for (k, &r) in charges.refused.iter().enumerate() {
                        inbox_full[start + k] = r;
                    }
                    metrics::counter!("switchboard_quota_refusals_total", "quota" => "inbox")
                        .increment((run.len() - at.len()) as u64);
                    (at.iter().map(|&k| run[k].clone()).collect(), at)
                };
            let kept_flags: std::borrow::Cow<'_, [bool]> =
                if charges.refused.is_empty() || run_flags.is_empty() {
                    run_flags.into()
                } else {
                    kept_at.iter().map(|&k| run_flags[k]).collect()
                };
            let started = std::time::Instant::now();
            let appended = if kept.is_empty() {
                Vec::new()
            } else {
                let appended = tracing::Instrument::instrument(
                    self.store.append(app, &kept, &kept_flags),
                    tracing::info_span!("store.append", count = kept.len()),
                )
                .await;
                match appended {
                    Ok(appended) => appended,
                    Err(e) => {
                        self.counters.release(app, kept.iter());
                        if let Some(disk) = &self.disk {
                            disk.write_failed(&e);
                        }
                        return Err(e.into());
                    }
                }
            };
            if self.abort_after_append {
                tracing::error!("failpoint delivery-after-append: aborting");
                std::process::abort();
            }
            self.metrics
                .append_seconds
                .record(started.elapsed().as_secs_f64());
            let mut stored = 0;
            for (k, outcome) in kept_at.iter().zip(appended) {
                let i = start + k;
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
                        self.counters.release(app, std::iter::once(&messages[i]));
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
        let is_full = |i: usize| inbox_full.get(i).copied().unwrap_or(false);
        let mut pushes = Vec::with_capacity(messages.len() + copies.len());
        for (i, ((app, mut msg), seq)) in apps
            .into_iter()
            .zip(messages)
            .zip(seqs.iter().copied())
            .enumerate()
        {
            if is_full(i) {
                // Refused to its sender: neither stored nor shown.
                continue;
            }
            if is_repeat(i) {
                // Still in the inbox (its first push may never have gone
                // out: a crash between store and reply): pushed again, under
                // its stored seq, which a connection that wrote it already
                // drops.
                if let Some(stored) = self.still_stored(&app, &msg).await {
                    pushes.push(push_to_recipient(app, stored));
                }
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
                Some(i) => message_of(i).is_some_and(|m| is_repeat(m) || is_full(m)),
                None => group_repeat,
            };
            if !skip {
                pushes.push(copy);
            }
        }
        self.push(pushes).await?;
        Ok(Delivered {
            seqs,
            repeated,
            inbox_full,
        })
    }

    /// The stored copy of a repeated send in its recipient's inbox, when the
    /// recipient is connected and the message is among the inbox's first
    /// [`REPEAT_LOOKUP`] (an inbox that long belongs to a user who is not
    /// reading it live). Repeats are rare: a resend after a lost answer.
    async fn still_stored(&self, app: &str, msg: &pb::InboxMessage) -> Option<pb::InboxMessage> {
        let online = self.presence.gateways(app, &msg.to).await.ok()?;
        if online.is_empty() {
            return None;
        }
        let page = self
            .store
            .fetch(&InboxKey::new(app, msg.to.clone()), 0, REPEAT_LOOKUP)
            .await
            .ok()?;
        page.messages
            .into_iter()
            .find(|m| m.id == msg.id && m.from == msg.from)
    }

    /// For each original, whether its sender has a connection other than
    /// the one it was sent from: one presence lookup for them all.
    async fn has_other_connections(
        &self,
        originals: &[&pb::Envelope],
    ) -> Result<Vec<bool>, DeliveryError> {
        let who: Vec<(&str, &str)> = originals
            .iter()
            .map(|o| (o.app_id.as_str(), o.from.as_str()))
            .collect();
        let found = self.locate(&who).await?;
        Ok(originals
            .iter()
            .zip(found)
            .map(|(original, gateways)| {
                let mut total: u32 = gateways.iter().map(|(_, n)| *n).sum();
                if let Some(origin) = &original.origin
                    && gateways.iter().any(|(gw, _)| *gw == origin.gateway_id)
                {
                    total = total.saturating_sub(1);
                }
                total > 0
            })
            .collect())
    }

    /// The gateways of each (app, user), in order: one batch presence call
    /// per app (one in practice), each user asked once.
    async fn locate(&self, who: &[(&str, &str)]) -> Result<Vec<Vec<(String, u32)>>, DeliveryError> {
        let Some(&(first_app, _)) = who.first() else {
            return Ok(Vec::new());
        };
        // The usual case, every user of one app (a route call carries one
        // app's messages): one batch call, nothing to index. A user listed
        // twice is looked up twice, in the same call.
        if who.iter().all(|(app, _)| *app == first_app) {
            let users: Vec<&str> = who.iter().map(|(_, user)| *user).collect();
            return Ok(self.presence.gateways_batch(first_app, &users).await?);
        }
        let mut found = vec![Vec::new(); who.len()];
        // app → (distinct users, the slot of each position's user).
        let mut by_app: HashMap<&str, (Vec<&str>, HashMap<&str, usize>)> = HashMap::new();
        for (app, user) in who {
            let (users, slots) = by_app.entry(app).or_default();
            slots.entry(user).or_insert_with(|| {
                users.push(user);
                users.len() - 1
            });
        }
        for (app, (users, slots)) in &by_app {
            let gateways = self.presence.gateways_batch(app, users).await?;
            for (i, (a, user)) in who.iter().enumerate() {
                if a == app
                    && let Some(g) = slots.get(user).and_then(|&slot| gateways.get(slot))
                {
                    found[i] = g.clone();
                }
            }
        }
        Ok(found)
    }

    /// Pushes items to the gateways that hold the users' connections: one
    /// presence lookup for all items, one call per gateway, up to
    /// [`CONCURRENT_PUSHES`] gateways at once. A slow or failing gateway
    /// only delays its own users: RELIABLE messages stay in the inbox until
    /// fetched.
    async fn push(&self, items: Vec<pb::PushItem>) -> Result<(), DeliveryError> {
        let traceparent = switchboard_telemetry::current_traceparent().unwrap_or_default();
        let who: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.app_id.as_str(), i.user_id.as_str()))
            .collect();
        let located = self.locate(&who).await?;
        drop(who);
        let mut by_gateway: HashMap<String, Vec<pb::PushItem>> = HashMap::new();
        // Stored for users with nobody connected, by app (webhooks).
        let mut offline: HashMap<String, Vec<pb::InboxMessage>> = HashMap::new();
        for (mut item, gateways) in items.into_iter().zip(located) {
            item.traceparent.clone_from(&traceparent);
            match gateways.as_slice() {
                [] => {
                    let fast = item
                        .message
                        .as_ref()
                        .is_some_and(|m| m.feature() == pb::Feature::Fast);
                    if fast && !item.sent_copy {
                        // Nobody to hand it to: a FAST message is gone.
                        self.metrics.fast_dropped_offline.increment(1);
                    } else if !item.sent_copy
                        && self.offline.get().is_some()
                        && let Some(msg) = item.message
                    {
                        offline.entry(item.app_id).or_default().push(msg);
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
        if let Some(hook) = self.offline.get() {
            for (app, messages) in offline {
                if let Err(e) = hook.offline(&app, &messages).await {
                    tracing::error!(app = %app, error = %e, count = messages.len(), "cannot write webhook events for offline users");
                }
            }
        }
        futures_util::StreamExt::for_each_concurrent(
            futures_util::stream::iter(by_gateway),
            CONCURRENT_PUSHES,
            |(gateway_id, items)| async move {
                let Some(gateway) = self.gateways.gateway_when_known(&gateway_id).await else {
                    tracing::warn!(gateway = %gateway_id, "push to an unknown gateway skipped");
                    return;
                };
                if let Err(e) = gateway.push(pb::PushRequest { items }).await {
                    tracing::warn!(gateway = %gateway_id, error = %e, "push failed");
                }
            },
        )
        .await;
        Ok(())
    }
}

/// Gateways one push call sends to at once (a fan-out to a large group
/// reaches many); bounded so that one call cannot open a call to every
/// gateway of a big deployment at the same moment.
const CONCURRENT_PUSHES: usize = 16;

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
        // Copies for users homed in other domains (a persistent group's
        // members there) go on through the federation, not into an inbox
        // here. Routers never send such envelopes here otherwise.
        if let Some(onward) = self.onward.get()
            && req
                .envelopes
                .iter()
                .any(|e| is_remote_copy(onward.as_ref(), e))
        {
            let n = req.envelopes.len();
            let (mut local, mut local_at, mut remote) = (Vec::new(), Vec::new(), Vec::new());
            for (i, e) in req.envelopes.into_iter().enumerate() {
                if is_remote_copy(onward.as_ref(), &e) {
                    remote.push(pb::Envelope { origin: None, ..e });
                } else {
                    local.push(e);
                    local_at.push(i);
                }
            }
            onward.forward(remote).await?;
            let delivered = self
                .deliver_envelopes(local, req.sent_copies, req.copy_to_sender)
                .await?;
            let mut seqs = vec![0u64; n];
            let mut repeated = if delivered.repeated.is_empty() {
                Vec::new()
            } else {
                vec![false; n]
            };
            let mut inbox_full = Vec::new();
            for (k, at) in local_at.into_iter().enumerate() {
                seqs[at] = delivered.seqs.get(k).copied().unwrap_or(0);
                if let Some(r) = delivered.repeated.get(k) {
                    repeated[at] = *r;
                }
                if delivered.inbox_full.get(k).copied().unwrap_or(false) {
                    inbox_full.resize(n, false);
                    inbox_full[at] = true;
                }
            }
            return Ok(pb::DeliverReply {
                seqs,
                repeated,
                inbox_full,
            });
        }
        let delivered = self
            .deliver_envelopes(req.envelopes, req.sent_copies, req.copy_to_sender)
            .await?;
        Ok(pb::DeliverReply {
            seqs: delivered.seqs,
            repeated: delivered.repeated,
            inbox_full: delivered.inbox_full,
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
        let inboxes: Vec<InboxKey> = by_inbox.iter().map(|(k, _)| k.clone()).collect();
        let removals = self
            .store
            .remove_many(by_inbox, Some(confirmation_of))
            .await
            .map_err(DeliveryError::from)?;
        self.metrics
            .remove_seconds
            .record(started.elapsed().as_secs_f64());
        let mut removed_total = 0u64;
        for (inbox, removal) in inboxes.into_iter().zip(removals) {
            removed_total += removal.removed.len() as u64;
            self.counters.removed(&inbox, removal.removed.len() as u64);
            let app_id = inbox.app_id;
            let local = self.send_onward(&app_id, removal.appended).await;
            self.counters.appended(&app_id, &local);
            for msg in local {
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
                ..Default::default()
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
        let mut inbox_full = Vec::new();
        for (n, (&i, seq)) in positions.iter().zip(reply.seqs).enumerate() {
            seqs[i] = seq;
            if reply.repeated.get(n).copied().unwrap_or(false) {
                repeats[i] = true;
            }
            if reply.inbox_full.get(n).copied().unwrap_or(false) {
                // Refused, not delivered: a retry is judged afresh.
                inbox_full.resize(seqs.len(), false);
                inbox_full[i] = true;
                continue;
            }
            if let Some(key) = keys[i] {
                recent.insert(key, seq);
            }
        }
        Ok(pb::DeliverReply {
            seqs,
            repeated: repeats,
            inbox_full,
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use switchboard_mesh::{GatewayClient, GatewayTable};
    use switchboard_presence::{InMemoryPresence, PresenceError, Transition};
    use tokio::sync::{Notify, mpsc};

    /// In-memory presence that counts lookups.
    #[derive(Default)]
    struct Counted {
        inner: InMemoryPresence,
        single: AtomicUsize,
        batches: AtomicUsize,
    }

    #[async_trait]
    impl Presence for Counted {
        async fn connect(&self, a: &str, u: &str, g: &str) -> Result<Transition, PresenceError> {
            self.inner.connect(a, u, g).await
        }
        async fn disconnect(&self, a: &str, u: &str, g: &str) -> Result<Transition, PresenceError> {
            self.inner.disconnect(a, u, g).await
        }
        async fn gateways(&self, a: &str, u: &str) -> Result<Vec<(String, u32)>, PresenceError> {
            self.single.fetch_add(1, Ordering::Relaxed);
            self.inner.gateways(a, u).await
        }
        async fn gateways_batch(
            &self,
            a: &str,
            users: &[&str],
        ) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.inner.gateways_batch(a, users).await
        }
        async fn online_users(
            &self,
            a: &str,
            limit: usize,
        ) -> Result<(Vec<String>, bool), PresenceError> {
            self.inner.online_users(a, limit).await
        }
        fn changes(
            &self,
        ) -> tokio::sync::broadcast::Receiver<switchboard_presence::PresenceChange> {
            self.inner.changes()
        }
    }

    /// A gateway that passes what it is pushed on, after `gate` (if any)
    /// lets it.
    struct TestGateway {
        pushed: mpsc::UnboundedSender<Vec<String>>,
        gate: Option<Arc<Notify>>,
    }

    #[async_trait]
    impl switchboard_mesh::Gateway for TestGateway {
        async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
            if let Some(gate) = &self.gate {
                gate.notified().await;
            }
            let users = req.items.into_iter().map(|i| i.user_id).collect();
            let _ = self.pushed.send(users);
            Ok(pb::PushReply::default())
        }
    }

    struct NoAuth;

    #[async_trait]
    impl switchboard_mesh::Auth for NoAuth {
        async fn verify_client(
            &self,
            _: pb::VerifyClientRequest,
        ) -> Result<pb::VerifyClientReply, ServiceError> {
            Err(ServiceError::unavailable("not in this test"))
        }
        async fn get_app(&self, _: pb::GetAppRequest) -> Result<pb::App, ServiceError> {
            Err(ServiceError::unavailable("not in this test"))
        }
    }

    fn fast(to: &str) -> pb::Envelope {
        pb::Envelope {
            id: switchboard_mesh::new_message_id(),
            app_id: "app".into(),
            from: "app-sender".into(),
            to: vec![to.into()],
            feature: pb::Feature::Fast.into(),
            kind: pb::MessageKind::Direct.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn one_lookup_per_push_and_a_stuck_gateway_holds_up_only_its_users() {
        use switchboard_mesh::Delivery;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            switchboard_store::FjallStore::open(dir.path(), Default::default()).expect("store"),
        );
        let presence = Arc::new(Counted::default());
        for (user, gw) in [
            ("app-a", "gw-stuck"),
            ("app-b", "gw-ok"),
            ("app-c", "gw-ok"),
        ] {
            presence.connect("app", user, gw).await.expect("connect");
        }
        let gateways = Arc::new(GatewayTable::default());
        let (stuck_tx, mut stuck_rx) = mpsc::unbounded_channel();
        let (ok_tx, mut ok_rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Notify::new());
        gateways.insert(
            "gw-stuck",
            GatewayClient::from_local(Arc::new(TestGateway {
                pushed: stuck_tx,
                gate: Some(gate.clone()),
            })),
        );
        gateways.insert(
            "gw-ok",
            GatewayClient::from_local(Arc::new(TestGateway {
                pushed: ok_tx,
                gate: None,
            })),
        );
        let role = Arc::new(DeliveryRole::new(
            store,
            presence.clone(),
            gateways,
            AuthClient::from_local(Arc::new(NoAuth)),
        ));
        let call = {
            let role = role.clone();
            tokio::spawn(async move {
                role.deliver(pb::DeliverRequest {
                    envelopes: vec![fast("app-a"), fast("app-b"), fast("app-c"), fast("app-b")],
                    ..Default::default()
                })
                .await
            })
        };
        // gw-ok gets its users' messages while gw-stuck has not answered.
        let pushed = tokio::time::timeout(Duration::from_secs(10), ok_rx.recv())
            .await
            .expect("the other gateway is not held up")
            .expect("pushed");
        assert_eq!(pushed, vec!["app-b", "app-c", "app-b"]);
        assert!(!call.is_finished());
        assert!(stuck_rx.try_recv().is_err());
        gate.notify_one();
        let stuck = tokio::time::timeout(Duration::from_secs(10), stuck_rx.recv())
            .await
            .expect("released")
            .expect("pushed");
        assert_eq!(stuck, vec!["app-a"]);
        call.await.expect("task").expect("deliver");
        assert_eq!(presence.batches.load(Ordering::Relaxed), 1);
        assert_eq!(presence.single.load(Ordering::Relaxed), 0);
    }

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

#[cfg(test)]
mod client_id_tests {
    use super::*;

    #[test]
    fn client_ids_are_left_to_the_store_not_the_retry_memory() {
        let envelope = |client_id, feature: pb::Feature| pb::Envelope {
            id: "typing".into(),
            client_id,
            app_id: "demo".into(),
            from: "demo-ann".into(),
            to: vec!["demo-bob".into()],
            feature: feature.into(),
            ..Default::default()
        };
        // Server-assigned ids: a repeat can only be a mesh retry.
        assert!(delivery_key(&envelope(false, pb::Feature::Fast)).is_some());
        // A client's id: the store's id index decides for RELIABLE, and a
        // FAST message that reuses an id is delivered each time.
        assert!(delivery_key(&envelope(true, pb::Feature::Fast)).is_none());
        assert!(delivery_key(&envelope(true, pb::Feature::Reliable)).is_none());
    }
}
