//! Push webhooks for users with nobody connected.
//!
//! When a RELIABLE message (direct, group, confirmation) lands in the inbox
//! of a user with no open connection, delivery hands it to [`Webhooks`]
//! (its [`switchboard_delivery`-side `Offline` hook](Webhooks::offline)): an
//! event `message.offline` goes into the app's durable outbox (a queue
//! `webhook/<app id>` of the store, written before the call returns), and a
//! worker per app POSTs the events in order, signed as the Standard
//! Webhooks specification says (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`). A failure (no answer within the timeout, a status
//! other than 2xx) is retried with exponential backoff and jitter; an event
//! still failing after `retry_for` moves to the app's dead letters
//! (`webhook-dead/<app id>`). At least once: the event id (`webhook-id`,
//! the same on every attempt) is the receiver's de-duplication key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use switchboard_config::{AppWebhook, WebhooksConfig};
use switchboard_mesh::{now_ms, pb};
use switchboard_store::Queue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The outbox queue of an app.
pub fn outbox(app_id: &str) -> String {
    format!("webhook/{app_id}")
}

/// The dead letters of an app.
pub fn dead_letters(app_id: &str) -> String {
    format!("webhook-dead/{app_id}")
}

/// The longest pause between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook of app {app}: {reason}")]
    Config { app: String, reason: String },
    #[error("webhook outbox: {0}")]
    Store(#[from] switchboard_store::StoreError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// What the outbox holds per event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    /// `webhook-id`: the same on every attempt.
    pub id: String,
    /// The W3C traceparent of the delivery that produced it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    /// The JSON body, as POSTed.
    pub body: String,
}

/// The body of a `message.offline` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 in UTC would need a date library; milliseconds since the
    /// Unix epoch say the same.
    pub timestamp_ms: i64,
    pub data: EventData,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventData {
    pub app_id: String,
    /// The recipient with nobody connected.
    pub user_id: String,
    pub message_id: String,
    pub from: String,
    /// `direct`, `group` or `confirmation`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The message's sequence number in the recipient's inbox.
    pub seq: u64,
    /// The first `preview_chars` characters of the content (absent when 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

struct Hook {
    url: String,
    signer: standardwebhooks::Webhook,
    preview_chars: usize,
    wake: Arc<Notify>,
}

/// The webhooks of a delivery process.
pub struct Webhooks {
    queues: Arc<dyn Queue>,
    hooks: HashMap<String, Hook>,
    client: reqwest::Client,
    options: WebhooksConfig,
    stop: CancellationToken,
    /// Outbox depth per app, for the gauge (kept from enqueues and acks).
    depths: Mutex<HashMap<String, u64>>,
}

impl Webhooks {
    /// Checks the apps' webhooks and starts a worker per app (also for an
    /// app whose outbox holds events from before and has no webhook now:
    /// those wait until one is configured).
    pub async fn start(
        queues: Arc<dyn Queue>,
        options: WebhooksConfig,
    ) -> Result<Arc<Webhooks>, WebhookError> {
        // reqwest's rustls needs a process-wide crypto provider; another
        // part of the process may have installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut hooks = HashMap::new();
        for app in &options.apps {
            hooks.insert(app.app_id.clone(), hook(app)?);
        }
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let webhooks = Arc::new(Webhooks {
            queues,
            hooks,
            client,
            options,
            stop: CancellationToken::new(),
            depths: Mutex::new(HashMap::new()),
        });
        for (app, hook) in &webhooks.hooks {
            let depth = webhooks.queues.depth(&outbox(app)).await?;
            if depth > 0 {
                tracing::info!(
                    app,
                    depth,
                    "webhook outbox holds events from before; sending"
                );
            }
            webhooks.set_depth(app, depth);
            tokio::spawn(run(webhooks.clone(), app.clone(), hook.wake.clone()));
        }
        Ok(webhooks)
    }

    /// Stops the workers (what is in the outboxes stays there).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    fn set_depth(&self, app: &str, depth: u64) {
        self.depths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(app.to_owned(), depth);
        metrics::gauge!("switchboard_webhooks_outbox_depth", "app" => app.to_owned())
            .set(depth as f64);
    }

    /// Events for messages that landed in the inboxes of users with nobody
    /// connected; durable when this returns. Apps without a webhook are
    /// skipped.
    pub async fn offline(
        &self,
        app_id: &str,
        messages: &[pb::InboxMessage],
    ) -> Result<(), WebhookError> {
        let Some(hook) = self.hooks.get(app_id) else {
            return Ok(());
        };
        let traceparent = switchboard_telemetry::current_traceparent().unwrap_or_default();
        let now = now_ms();
        let mut payloads = Vec::with_capacity(messages.len());
        for m in messages {
            let kind = match m.kind() {
                pb::MessageKind::Direct => "direct",
                pb::MessageKind::Group => "group",
                pb::MessageKind::Confirmation => "confirmation",
                pb::MessageKind::Undelivered => "undelivered",
                _ => continue,
            };
            if m.feature() != pb::Feature::Reliable {
                continue;
            }
            let event = Event {
                kind: "message.offline".into(),
                timestamp_ms: now,
                data: EventData {
                    app_id: app_id.to_owned(),
                    user_id: m.to.clone(),
                    message_id: m.id.clone(),
                    from: m.from.clone(),
                    kind: kind.into(),
                    group: m.group.clone(),
                    seq: m.seq,
                    // A notice's content is its JSON, not a user's words.
                    preview: (hook.preview_chars > 0 && m.kind() != pb::MessageKind::Undelivered)
                        .then(|| m.content.chars().take(hook.preview_chars).collect()),
                },
            };
            let stored = Stored {
                id: event_id(kind, &m.id, &m.to),
                traceparent: traceparent.clone(),
                body: serde_json::to_string(&event).unwrap_or_default(),
            };
            payloads.push(serde_json::to_vec(&stored).unwrap_or_default());
        }
        if payloads.is_empty() {
            return Ok(());
        }
        let n = payloads.len() as u64;
        self.queues.enqueue(&outbox(app_id), payloads).await?;
        metrics::counter!("switchboard_webhooks_enqueued_total", "app" => app_id.to_owned())
            .increment(n);
        let depth = self
            .depths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app_id)
            .copied()
            .unwrap_or(0)
            + n;
        self.set_depth(app_id, depth);
        hook.wake.notify_one();
        Ok(())
    }
}

fn hook(app: &AppWebhook) -> Result<Hook, WebhookError> {
    let signer = standardwebhooks::Webhook::new(&app.secret).map_err(|e| WebhookError::Config {
        app: app.app_id.clone(),
        reason: format!("secret: {e}"),
    })?;
    Ok(Hook {
        url: app.url.clone(),
        signer,
        preview_chars: app.preview_chars,
        wake: Arc::new(Notify::new()),
    })
}

/// A stable id per (event kind, message, recipient): the same on every
/// attempt, and distinct for each recipient of a group message.
fn event_id(kind: &str, message_id: &str, user_id: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{kind}\0{message_id}\0{user_id}").as_bytes());
    format!("evt_{h:032x}")
}

/// The pause before attempt `attempt + 1`: `min` doubled per attempt up to
/// a minute, then between half and all of it (jitter, so that many
/// failing events do not retry in step).
fn backoff(min: Duration, attempt: u32) -> Duration {
    let full = min
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let r = xxhash_rust::xxh3::xxh3_64_with_seed(&attempt.to_le_bytes(), seed);
    let half = full / 2;
    half + Duration::from_nanos(r % (half.as_nanos().max(1) as u64))
}

/// One app's worker: the oldest event first, one at a time (so events of a
/// user arrive in the order they were written), until it is delivered or
/// dead-lettered.
async fn run(hooks: Arc<Webhooks>, app: String, wake: Arc<Notify>) {
    let queue = outbox(&app);
    let lease = hooks.options.retry_for + Duration::from_secs(3600);
    loop {
        if hooks.stop.is_cancelled() {
            return;
        }
        let items = match hooks.queues.take(&queue, 1, lease).await {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(%app, error = %e, "cannot read the webhook outbox");
                sleep_or_stop(&hooks, Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(item) = items.into_iter().next() else {
            tokio::select! {
                _ = hooks.stop.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&item.payload) else {
            tracing::error!(%app, id = item.id, "damaged webhook outbox item: moved to the dead letters");
            let _ = hooks
                .queues
                .enqueue(&dead_letters(&app), vec![item.payload.clone()])
                .await;
            let _ = hooks.queues.ack(&queue, &[item.id]).await;
            continue;
        };
        let enqueued_at = UNIX_EPOCH + Duration::from_millis(item.enqueued_at_ms);
        let mut attempt = 0u32;
        loop {
            let Some(hook) = hooks.hooks.get(&app) else {
                return;
            };
            match send(&hooks, &app, hook, &stored).await {
                Ok(()) => {
                    let _ = hooks.queues.ack(&queue, &[item.id]).await;
                    break;
                }
                Err(reason) => {
                    metrics::counter!("switchboard_webhooks_failed_total", "app" => app.clone())
                        .increment(1);
                    let age = SystemTime::now()
                        .duration_since(enqueued_at)
                        .unwrap_or_default();
                    if age >= hooks.options.retry_for {
                        tracing::warn!(%app, id = %stored.id, %reason, "webhook event failed for its whole retry period: dead-lettered");
                        metrics::counter!("switchboard_webhooks_dead_lettered_total", "app" => app.clone())
                            .increment(1);
                        if hooks
                            .queues
                            .enqueue(&dead_letters(&app), vec![item.payload.clone()])
                            .await
                            .is_ok()
                        {
                            let _ = hooks.queues.ack(&queue, &[item.id]).await;
                        }
                        break;
                    }
                    tracing::debug!(%app, id = %stored.id, %reason, attempt, "webhook attempt failed; retrying");
                    metrics::counter!("switchboard_webhooks_retried_total", "app" => app.clone())
                        .increment(1);
                    let pause = backoff(hooks.options.backoff_min, attempt);
                    attempt = attempt.saturating_add(1);
                    if !sleep_or_stop(&hooks, pause).await {
                        return;
                    }
                }
            }
        }
        if let Ok(depth) = hooks.queues.depth(&queue).await {
            hooks.set_depth(&app, depth);
        }
    }
}

/// Sleeps; false when the webhooks stop meanwhile.
async fn sleep_or_stop(hooks: &Webhooks, pause: Duration) -> bool {
    tokio::select! {
        _ = hooks.stop.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// One signed POST of one event.
async fn send(hooks: &Webhooks, app: &str, hook: &Hook, stored: &Stored) -> Result<(), String> {
    let span = tracing::info_span!("webhook.send", app, webhook.id = %stored.id, http.status_code = tracing::field::Empty);
    if !stored.traceparent.is_empty() {
        switchboard_telemetry::continue_traceparent(&span, &stored.traceparent);
    }
    let started = Instant::now();
    let timestamp = now_ms() / 1000;
    let signature = hook
        .signer
        .sign(&stored.id, timestamp, stored.body.as_bytes())
        .map_err(|e| format!("cannot sign: {e}"))?;
    let request = hooks
        .client
        .post(&hook.url)
        .header("content-type", "application/json")
        .header(standardwebhooks::HEADER_WEBHOOK_ID, &stored.id)
        .header(
            standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
            timestamp.to_string(),
        )
        .header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature)
        .body(stored.body.clone());
    let result = tracing::Instrument::instrument(request.send(), span.clone()).await;
    let outcome = match result {
        Ok(response) if response.status().is_success() => {
            span.record("http.status_code", response.status().as_u16());
            Ok(())
        }
        Ok(response) => {
            span.record("http.status_code", response.status().as_u16());
            Err(format!("answered {}", response.status()))
        }
        Err(e) => Err(e.to_string()),
    };
    metrics::histogram!(
        "switchboard_webhooks_send_seconds",
        "app" => app.to_owned(),
        "status" => if outcome.is_ok() { "ok" } else { "error" }
    )
    .record(started.elapsed().as_secs_f64());
    if outcome.is_ok() {
        metrics::counter!("switchboard_webhooks_sent_total", "app" => app.to_owned()).increment(1);
    }
    outcome
}

/// The dead letters of the apps' webhooks, where the store is: listed, and
/// replayed into the outbox (sent again by the app's worker, signed, with
/// their original `webhook-id`).
pub struct DeadLetters {
    queues: Arc<dyn Queue>,
    /// The running webhooks (none when no app has one here).
    webhooks: Option<Arc<Webhooks>>,
}

/// How long a listing holds the letters it read from other readers.
const LIST_LEASE: Duration = Duration::from_millis(1);
/// How long a replay holds the letters it moves.
const REPLAY_LEASE: Duration = Duration::from_secs(60);

impl DeadLetters {
    pub fn new(queues: Arc<dyn Queue>, webhooks: Option<Arc<Webhooks>>) -> Self {
        DeadLetters { queues, webhooks }
    }
}

fn store_error(e: switchboard_store::StoreError) -> switchboard_mesh::ServiceError {
    switchboard_mesh::ServiceError::unavailable(format!("webhook dead letters: {e}"))
}

#[async_trait::async_trait]
impl switchboard_mesh::WebhookAdmin for DeadLetters {
    async fn dead_letters(
        &self,
        req: pb::DeadLettersRequest,
    ) -> Result<pb::DeadLettersReply, switchboard_mesh::ServiceError> {
        let dead = dead_letters(&req.app_id);
        let max = match req.max {
            0 => switchboard_store::queue::MAX_TAKE,
            n => (n as usize).min(switchboard_store::queue::MAX_TAKE),
        };
        let wake = self
            .webhooks
            .as_ref()
            .filter(|_| req.replay)
            .and_then(|w| Some((w, w.hooks.get(&req.app_id)?.wake.clone())));
        if req.replay && wake.is_none() {
            return Err(switchboard_mesh::ServiceError::invalid(format!(
                "app {:?} has no webhook here: configure one before replaying",
                req.app_id
            )));
        }
        let lease = if req.replay { REPLAY_LEASE } else { LIST_LEASE };
        let items = self
            .queues
            .take(&dead, max, lease)
            .await
            .map_err(store_error)?;
        let letters: Vec<pb::DeadLetter> = items
            .iter()
            .map(|item| {
                let stored = serde_json::from_slice::<Stored>(&item.payload).ok();
                pb::DeadLetter {
                    id: item.id,
                    webhook_id: stored.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
                    body: stored
                        .map(|s| s.body)
                        .unwrap_or_else(|| String::from_utf8_lossy(&item.payload).into_owned()),
                    dead_at_ms: item.enqueued_at_ms,
                }
            })
            .collect();
        if let Some((webhooks, wake)) = wake
            && !items.is_empty()
        {
            // Into the outbox first, then out of the dead letters: a crash
            // in between sends an event twice, never loses it.
            let payloads = items.iter().map(|i| i.payload.clone()).collect();
            let queue = outbox(&req.app_id);
            self.queues
                .enqueue(&queue, payloads)
                .await
                .map_err(store_error)?;
            let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
            self.queues.ack(&dead, &ids).await.map_err(store_error)?;
            if let Ok(depth) = self.queues.depth(&queue).await {
                webhooks.set_depth(&req.app_id, depth);
            }
            metrics::counter!("switchboard_webhooks_replayed_total", "app" => req.app_id.clone())
                .increment(items.len() as u64);
            tracing::info!(app = %req.app_id, events = items.len(), "webhook dead letters replayed");
            wake.notify_one();
        }
        let depth = self.queues.depth(&dead).await.map_err(store_error)?;
        Ok(pb::DeadLettersReply { letters, depth })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_distinct_per_recipient() {
        assert_eq!(
            event_id("direct", "m1", "a-1"),
            event_id("direct", "m1", "a-1")
        );
        assert_ne!(
            event_id("group", "m1", "a-1"),
            event_id("group", "m1", "a-2")
        );
        assert_ne!(
            event_id("direct", "m1", "a-1"),
            event_id("confirmation", "m1", "a-1")
        );
        assert!(event_id("direct", "m1", "ü").is_ascii());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_a_minute() {
        let min = Duration::from_millis(100);
        for attempt in 0..40 {
            let full = (min * 2u32.saturating_pow(attempt.min(20))).min(BACKOFF_MAX);
            let b = backoff(min, attempt);
            assert!(
                b >= full / 2 && b <= full,
                "attempt {attempt}: {b:?} of {full:?}"
            );
        }
    }
}
