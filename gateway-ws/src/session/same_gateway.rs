//! The same-gateway FAST shortcut, for a gateway whose router runs in
//! another process: a FAST direct message whose recipient and sender are
//! connected only to this gateway (presence says so) is pushed to the
//! recipient's connections here and never leaves the process. The router
//! hears of it afterwards (`Router/Observe`, batched, from a bounded queue
//! that drops under pressure with a counter), so its metrics and traces
//! still count every message, while a send never waits for it.
//!
//! Every rule of a routed send still holds: the session checked the
//! message (authentication, rate limit, recipient, size, quotas) before it
//! gets here; the recipient gets it on every connection (all of them are
//! here); the sender's other connections get `MESSAGE_SENT`; a recipient
//! or sender with a connection on another gateway, or a recipient homed in
//! another domain, takes the routed path. Messages of one connection to one
//! recipient keep their order: once a session routed anything to a
//! recipient (whose push may still be on its way through delivery), its
//! later messages to that recipient are routed too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_mesh::{RouterClient, pb};
use tokio::sync::mpsc;

use super::Session;
use crate::commands::RequestMeta;

/// Reports waiting for the router; past this they are dropped (counted).
const REPORT_QUEUE: usize = 65_536;
/// Reports sent in one `Observe` call.
const REPORT_BATCH: usize = 4_096;
/// Recipients a session remembers having routed to; past this many, the
/// session routes everything (a sender writing to many people).
const ORDER_MEMORY: usize = 16;

/// The gateway's side of the shortcut: where reports for the router go.
pub(crate) struct Shortcut {
    reports: mpsc::Sender<pb::ObservedMessage>,
    dropped: Arc<AtomicU64>,
}

impl Shortcut {
    /// Starts the reporter task that sends the reports to `router`.
    pub(crate) fn start(gateway_id: String, router: RouterClient) -> Self {
        let (reports, rx) = mpsc::channel(REPORT_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(report(gateway_id, router, rx, dropped.clone()));
        Shortcut { reports, dropped }
    }

    /// Queues a report; never waits: a full queue drops it (counted here
    /// and told to the router with the next call).
    fn report(&self, msg: pb::ObservedMessage) {
        if self.reports.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchboard_same_gateway_reports_dropped_total").increment(1);
        }
    }
}

async fn report(
    gateway_id: String,
    router: RouterClient,
    mut rx: mpsc::Receiver<pb::ObservedMessage>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, REPORT_BATCH).await > 0 {
        let messages = std::mem::take(&mut buf);
        let count = messages.len() as u64;
        let before = dropped.swap(0, Ordering::Relaxed);
        let req = pb::ObserveRequest {
            gateway_id: gateway_id.clone(),
            messages,
            dropped: before,
        };
        if let Err(e) = router.observe(req).await {
            // Metrics only: the messages were delivered. Counted, and told
            // to the router once a call goes through.
            dropped.fetch_add(before + count, Ordering::Relaxed);
            metrics::counter!("switchboard_same_gateway_reports_dropped_total").increment(count);
            tracing::debug!(error = %e, count, "same-gateway report to the router failed");
        }
    }
}

/// The recipients a session routed the usual way (see the module
/// documentation); nothing allocated until it routes one.
#[derive(Default)]
pub(crate) struct RoutedTo(Mutex<Option<Box<Memory>>>);

#[derive(Default)]
struct Memory {
    users: Vec<Box<str>>,
    /// Too many to remember, or a group message: route everything.
    all: bool,
}

impl RoutedTo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Memory>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers the recipients of envelopes about to be routed.
    pub(crate) fn add<'a>(&self, users: impl Iterator<Item = &'a str>) {
        let mut memory = self.lock();
        let memory = memory.get_or_insert_with(Box::default);
        if memory.all {
            return;
        }
        for user in users {
            if !memory.users.iter().any(|u| **u == *user) {
                if memory.users.len() == ORDER_MEMORY {
                    memory.all = true;
                    memory.users = Vec::new();
                    return;
                }
                memory.users.push(user.into());
            }
        }
    }

    /// From now on everything is routed (a group message went out: its
    /// members' pushes may still be on their way).
    pub(crate) fn add_all(&self) {
        let mut memory = self.lock();
        memory.get_or_insert_with(Box::default).all = true;
    }

    fn any<'a>(&self, mut users: impl Iterator<Item = &'a str>) -> bool {
        match self.lock().as_deref() {
            None => false,
            Some(m) => m.all || users.any(|u| m.users.iter().any(|r| **r == *u)),
        }
    }
}

impl Session {
    /// Delivers `envelopes` here when every one qualifies (see the module
    /// documentation); otherwise hands them back, untouched, to be routed.
    /// All or none, like a routed batch.
    pub(super) async fn deliver_here(
        &self,
        envelopes: Vec<pb::Envelope>,
        meta: &RequestMeta,
    ) -> Result<(), Vec<pb::Envelope>> {
        let Some(shortcut) = self.gw.same_gateway.get() else {
            return Err(envelopes);
        };
        if !self.qualifies(&envelopes) || !self.all_here(&envelopes).await {
            self.routed_to.add(
                envelopes
                    .iter()
                    .filter_map(|e| e.to.first())
                    .map(String::as_str),
            );
            return Err(envelopes);
        }
        // The receive span only for messages delivered here: a routed one
        // gets its own when it is routed (one per message id).
        let span = super::receive_span(
            &self.gw.deps.domain,
            &envelopes[0],
            meta.traceparent.as_deref(),
            envelopes.len(),
        );
        let _entered = span.enter();
        let counters = &self.gw.registry.counters;
        counters
            .message(false, false)
            .increment(envelopes.len() as u64);
        let traceparent = switchboard_telemetry::current_traceparent().unwrap_or_default();
        for envelope in envelopes {
            let report = pb::ObservedMessage {
                id: envelope.id.clone(),
                app_id: envelope.app_id.clone(),
                traceparent: traceparent.clone(),
            };
            self.push_here(envelope);
            shortcut.report(report);
        }
        Ok(())
    }

    /// What needs no lookup: FAST direct messages from a connection, to
    /// recipients connected here, at home in this domain, that this session
    /// has not routed to before.
    fn qualifies(&self, envelopes: &[pb::Envelope]) -> bool {
        if self.api_caller || envelopes.is_empty() {
            return false;
        }
        let fast_direct = envelopes.iter().all(|e| {
            e.feature() == pb::Feature::Fast
                && e.kind() == pb::MessageKind::Direct
                && e.to.len() == 1
        });
        if !fast_direct {
            return false;
        }
        let recipients = || {
            envelopes
                .iter()
                .map(|e| (e.app_id.as_str(), e.to[0].as_str()))
        };
        if self.routed_to.any(recipients().map(|(_, to)| to)) {
            return false;
        }
        recipients().all(|(app, to)| {
            self.gw.registry.connections_of(app, to) > 0
                && self
                    .gw
                    .deps
                    .homes
                    .as_ref()
                    .is_none_or(|homes| homes.redirect(app, to).is_none())
        })
    }

    /// Whether presence has every connection of the recipients and of the
    /// sender on this gateway: one lookup for the lot.
    async fn all_here(&self, envelopes: &[pb::Envelope]) -> bool {
        let Some(first) = envelopes.first() else {
            return false;
        };
        let app = first.app_id.as_str();
        if envelopes.iter().any(|e| e.app_id != app) {
            return false;
        }
        let mut users: Vec<&str> = Vec::with_capacity(envelopes.len() + 1);
        users.push(first.from.as_str());
        for e in envelopes {
            if !users.contains(&e.to[0].as_str()) {
                users.push(e.to[0].as_str());
            }
        }
        let found = match self.gw.deps.presence.gateways_batch(app, &users).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, "presence lookup failed: routing instead");
                return false;
            }
        };
        let here = |gateways: &Vec<(String, u32)>| gateways.iter().all(|(gw, _)| *gw == self.gw.id);
        // The sender (first) may not be listed yet (it just connected);
        // each recipient must be, here only.
        found.len() == users.len()
            && here(&found[0])
            && found[1..].iter().all(|g| !g.is_empty() && here(g))
    }

    /// Pushes one message to its recipient's connections here and its
    /// `MESSAGE_SENT` copy to the sender's other connections here, as
    /// delivery would have.
    fn push_here(&self, envelope: pb::Envelope) {
        let registry = &self.gw.registry;
        let sender_has_others = registry.connections_of(&envelope.app_id, &envelope.from) > 1;
        let copy = sender_has_others.then(|| pb::PushItem {
            app_id: envelope.app_id.clone(),
            user_id: envelope.from.clone(),
            message: Some(pb::InboxMessage {
                id: envelope.id.clone(),
                kind: envelope.kind,
                from: envelope.from.clone(),
                to: envelope.from.clone(),
                group: String::new(),
                content: envelope.content.clone(),
                reference: envelope.reference.clone(),
                ts: envelope.ts,
                seq: 0,
                feature: envelope.feature,
                ..Default::default()
            }),
            exclude: envelope.origin.clone(),
            sent_copy: true,
            to: envelope.to.clone(),
            ..Default::default()
        });
        let pb::Envelope {
            id,
            kind,
            app_id,
            from,
            to,
            content,
            reference,
            ts,
            feature,
            ..
        } = envelope;
        let Some(to) = to.into_iter().next() else {
            return;
        };
        let item = pb::PushItem {
            app_id,
            user_id: to.clone(),
            message: Some(pb::InboxMessage {
                id,
                kind,
                from,
                to,
                group: String::new(),
                content,
                reference,
                ts,
                seq: 0,
                feature,
                ..Default::default()
            }),
            exclude: None,
            sent_copy: false,
            ..Default::default()
        };
        if registry.push(&self.gw.id, &item) == 0 {
            // Gone since the lookup: a FAST message for nobody is dropped,
            // as delivery drops it.
            metrics::counter!("switchboard_fast_dropped_total", "reason" => "offline").increment(1);
        }
        if let Some(copy) = copy {
            registry.push(&self.gw.id, &copy);
        }
    }
}
