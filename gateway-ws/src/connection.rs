//! One client connection: a reader that speaks the protocol and a writer that
//! drains the connection's bounded send queue to the socket.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use switchboard_mesh::{ErrorCode, ServiceError, pb};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, error::CapacityError};
use tokio_util::sync::CancellationToken;

use crate::GatewayInner;
use crate::counters::Counters;
use crate::frames::{self, ClientFrame, FrameError};
use crate::ratelimit::RateLimiter;
use crate::registry::{CloseReason, ConnHandle, ConnShared, Outbound};
use crate::seen::SeqWindow;

/// Longest wait for another role before a frame is answered with UNAVAILABLE.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection closed by a server shutdown waits for the client's
/// close frame.
const SHUTDOWN_CLOSE_GRACE: Duration = Duration::from_millis(200);
/// A pause without refused frames this long forgives earlier refusals.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);
/// Frames read at once when they are already there (routed together).
const READ_BATCH: usize = 64;
/// Frames written per flush.
const WRITE_BATCH: usize = 64;
/// Longest a socket write may block (the client does not read) before the
/// connection is closed as a slow consumer: what is queued for it must not
/// be held forever.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// How long a closing connection may take to flush what is queued.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The authenticated user of a connection.
struct Identity {
    app_id: String,
    app_name: String,
    user_id: String,
    acks: bool,
}

/// Messages written in ack mode and not acknowledged yet: id → seq.
type Unacked = Mutex<HashMap<String, u64>>;

pub(crate) async fn run<S>(gw: Arc<GatewayInner>, ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = gw.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(ConnShared::new(conn_id, gw.shutdown.child_token()));
    let (tx, rx) = mpsc::channel(gw.limits.send_queue_frames);
    let handle = ConnHandle {
        shared: shared.clone(),
        tx,
    };
    let (sink, mut stream) = ws.split();
    let identity: Arc<std::sync::OnceLock<Identity>> = Arc::default();
    let unacked: Arc<Unacked> = Arc::default();

    let writer = tokio::spawn(write_loop(
        gw.clone(),
        sink,
        rx,
        shared.clone(),
        identity.clone(),
        unacked.clone(),
    ));
    let mut conn = Connection {
        gw: gw.clone(),
        handle,
        identity: identity.clone(),
        unacked,
        limiter: RateLimiter::new(gw.limits.messages_per_second),
        refusals: 0,
        last_refusal: Instant::now(),
        fetch_cursor: 0,
    };
    conn.read_loop(&mut stream).await;
    // The reader stopped on its own (client closed, socket failed): nothing
    // more to send. When it stopped because of a close request, the writer
    // sends that close frame.
    if !shared.cancel.is_cancelled() {
        shared.close(CloseReason::Client);
    }
    let _ = writer.await;
    // Nothing can be written any more: stop routing pushes here.
    if let Some(id) = identity.get() {
        gw.registry.remove(&id.app_id, &id.user_id, conn_id);
        match gw
            .deps
            .presence
            .disconnect(&id.app_id, &id.user_id, &gw.id)
            .await
        {
            Ok(t) if t.user_changed => {
                let change = pb::PresenceChangeRequest {
                    app_id: id.app_id.clone(),
                    user_id: id.user_id.clone(),
                    online: false,
                };
                if let Err(e) = gw.deps.delivery.presence_changed(change).await {
                    tracing::warn!(error = %e, "user disconnected event failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "presence disconnect failed"),
        }
    }
    let handshake = match shared.reason() {
        Some(CloseReason::Server(..)) => Some(CLOSE_GRACE),
        // Server shutdown: every connection closes at once; keep it short.
        None => Some(SHUTDOWN_CLOSE_GRACE),
        Some(CloseReason::Client) => None,
    };
    if let Some(grace) = handshake {
        // Closing handshake: read (and drop) what the client still sends
        // until it answers the close frame. Dropping a socket with unread
        // input makes the kernel send a reset, which can destroy the close
        // frame (and its reason) before the client reads it.
        let _ = timeout(grace, async {
            while let Some(Ok(msg)) = stream.next().await {
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}

async fn write_loop<W>(
    gw: Arc<GatewayInner>,
    mut sink: W,
    mut rx: mpsc::Receiver<Outbound>,
    shared: Arc<ConnShared>,
    identity: Arc<std::sync::OnceLock<Identity>>,
    unacked: Arc<Unacked>,
) where
    W: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let ping_every = Duration::from_secs(gw.limits.ping_interval_secs.max(1));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    // Grown on demand (up to WRITE_BATCH): an idle connection keeps a few
    // slots, not 64 (3 KiB).
    let mut batch = Vec::new();
    let mut sent = SeqWindow::default();
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    break;
                }
                drop_repeats(&mut sent, &mut batch);
                // Tracked before the write: an ACK may come back before the
                // write call returns.
                track_unacked(&gw, &identity, &unacked, &batch);
                match write_or_stall(&mut sink, &mut batch, &gw.registry.counters, &shared.cancel).await {
                    Written::Done => {}
                    Written::Failed => {
                        shared.close(CloseReason::Client);
                        return;
                    }
                    Written::Stalled => {
                        if shared.close(CloseReason::Server(1008, "slow consumer: write stalled".into())) {
                            metrics::counter!("switchboard_slow_consumer_disconnects_total").increment(1);
                        }
                        break;
                    }
                    Written::Cancelled => break,
                }
                report_delivered(&gw, &identity, &mut batch).await;
            }
            _ = shared.cancel.cancelled() => break,
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    shared.close(CloseReason::Client);
                    return;
                }
            }
        }
    }
    let reason = shared.reason();
    if matches!(reason, Some(CloseReason::Client)) {
        return;
    }
    let (code, text) = match reason {
        Some(CloseReason::Server(code, text)) => (code, text),
        _ => (1001, "server shutting down".to_owned()),
    };
    // Flush what is already queued (an auth reply, an error), then close.
    let _ = timeout(CLOSE_GRACE, async {
        // `batch` holds what an interrupted write had not yet handed to the
        // socket (already checked for repeats and tracked); frames queued
        // since are checked now.
        let mut queued = Vec::new();
        while let Ok(out) = rx.try_recv() {
            queued.push(out);
        }
        drop_repeats(&mut sent, &mut queued);
        track_unacked(&gw, &identity, &unacked, &queued);
        batch.append(&mut queued);
        if write_batch(&mut sink, &mut batch, &gw.registry.counters)
            .await
            .is_ok()
        {
            report_delivered(&gw, &identity, &mut batch).await;
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(text),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.close().await;
    })
    .await;
}

/// How a batch's write ended.
enum Written {
    Done,
    /// The socket failed: the client is gone.
    Failed,
    /// A write blocked for `WRITE_STALL` (the client does not read).
    Stalled,
    /// The connection is closing (slow consumer, shutdown).
    Cancelled,
}

/// Writes a batch; a client that stops reading blocks the write, and a close
/// request must still get through. When the write is interrupted (stalled,
/// cancelled) the frames already handed to the socket leave `batch`: what
/// is left was never written, and the close path may still write it once.
async fn write_or_stall<W>(
    sink: &mut W,
    batch: &mut Vec<Outbound>,
    counters: &Counters,
    cancel: &CancellationToken,
) -> Written
where
    W: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let done = |r: Result<(), WsError>| {
        if r.is_ok() {
            Written::Done
        } else {
            Written::Failed
        }
    };
    let mut fed = 0;
    let written = {
        // Boxed, like frame handling: only a writing connection holds this
        // state.
        let mut write = Box::pin(write_batch_counted(sink, batch, counters, &mut fed));
        // Nearly every write completes at once (the socket has room): the
        // stall timer is armed only for one that waits.
        if let Poll::Ready(r) =
            std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
        {
            return done(r);
        }
        tokio::select! {
            r = timeout(WRITE_STALL, write) => r.map_or(Written::Stalled, done),
            _ = cancel.cancelled() => Written::Cancelled,
        }
    };
    if matches!(written, Written::Stalled | Written::Cancelled) {
        batch.drain(..fed);
    }
    written
}

async fn write_batch<W>(
    sink: &mut W,
    batch: &mut [Outbound],
    counters: &Counters,
) -> Result<(), WsError>
where
    W: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    let mut fed = 0;
    write_batch_counted(sink, batch, counters, &mut fed).await
}

/// Writes a batch, counting in `fed` the frames the sink has taken (a feed
/// that is interrupted has not taken its frame). Each frame's text moves
/// into the sink: what stays in the batch (the push, for the delivered
/// report) does not need it, and a clone would share the buffer (an
/// allocation and two atomic operations per frame).
async fn write_batch_counted<W>(
    sink: &mut W,
    batch: &mut [Outbound],
    counters: &Counters,
    fed: &mut usize,
) -> Result<(), WsError>
where
    W: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    use futures_util::SinkExt;
    for out in batch.iter_mut() {
        // `feed`, with the text taken only once the sink is ready: an
        // interrupted wait leaves the frame in the batch.
        std::future::poll_fn(|cx| sink.poll_ready_unpin(cx)).await?;
        sink.start_send_unpin(Message::Text(std::mem::take(&mut out.text)))?;
        *fed += 1;
    }
    sink.flush().await?;
    // End-to-end latency: accepted by the sender's gateway → written here.
    let now = switchboard_mesh::now_ms();
    for accepted_ms in batch
        .iter()
        .filter_map(|o| o.push.as_ref().map(|p| p.accepted_ms))
        .filter(|&ms| ms > 0)
    {
        let ms = u32::try_from(now.saturating_sub(accepted_ms)).unwrap_or(u32::MAX);
        counters.delivery_latency(f64::from(ms) / 1000.0);
    }
    Ok(())
}

/// Drops the stored messages already written on this connection: a message
/// can reach a connection twice — pushed live while the same connection
/// fetches it, or replayed in ack mode as it is pushed — and is written once
/// (within the last [`crate::seen::WINDOW`] numbers of the user's inbox; see
/// [`SeqWindow`]).
fn drop_repeats(sent: &mut SeqWindow, batch: &mut Vec<Outbound>) {
    batch.retain(|out| out.stored().is_none_or(|stored| sent.insert(stored.seq)));
}

/// Ack mode: stored messages about to be written wait for the client's ACK.
fn track_unacked(
    gw: &GatewayInner,
    identity: &std::sync::OnceLock<Identity>,
    unacked: &Unacked,
    batch: &[Outbound],
) {
    if !identity.get().is_some_and(|id| id.acks) {
        return;
    }
    let mut map = unacked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for stored in batch.iter().filter_map(Outbound::stored) {
        // Past the cap a message is not tracked: it stays stored and comes
        // again on the next connection.
        if map.len() >= gw.limits.max_unacked {
            break;
        }
        map.insert(stored.id.clone(), stored.seq);
    }
}

/// After a batch was written: without ack mode, stored messages are now
/// delivered.
async fn report_delivered(
    gw: &GatewayInner,
    identity: &std::sync::OnceLock<Identity>,
    batch: &mut Vec<Outbound>,
) {
    let Some(id) = identity.get().filter(|id| !id.acks) else {
        batch.clear();
        return;
    };
    for out in batch.drain(..) {
        let Some(stored) = out.push.and_then(|p| p.stored) else {
            continue;
        };
        let item = pb::DeliveredItem {
            app_id: id.app_id.clone(),
            user_id: id.user_id.clone(),
            seq: stored.seq,
        };
        if gw.delivered_tx.send(item).await.is_err() {
            return;
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Connection {
    gw: Arc<GatewayInner>,
    handle: ConnHandle,
    identity: Arc<std::sync::OnceLock<Identity>>,
    unacked: Arc<Unacked>,
    limiter: RateLimiter,
    /// Refused frames since the last pause of a second without refusals.
    refusals: u32,
    last_refusal: Instant,
    /// Highest sequence number sent by FETCH (or ack-mode replay) on this
    /// connection: the next page starts after it.
    fetch_cursor: u64,
}

impl Connection {
    fn shared(&self) -> &ConnShared {
        &self.handle.shared
    }

    fn close(&self, code: u16, reason: &str) {
        self.shared()
            .close(CloseReason::Server(code, reason.to_owned()));
    }

    fn send_text(&self, kind: &'static str, text: String) -> bool {
        self.gw.registry.counters.frames_out(kind, 1);
        self.handle.send(Outbound::reply(Utf8Bytes::from(text)))
    }

    async fn read_loop<R>(&mut self, stream: &mut R)
    where
        R: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let limits = self.gw.limits.clone();
        let auth_deadline = Instant::now() + Duration::from_secs(limits.auth_timeout_secs);
        let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
        // What the stream gave after a batch of text frames, handled next.
        let mut held: Option<Box<Option<Result<Message, WsError>>>> = None;
        loop {
            let authenticated = self.identity.get().is_some();
            let wait = if authenticated {
                idle
            } else {
                auth_deadline.saturating_duration_since(Instant::now())
            };
            // Checked before building the wait (a cancellation future per
            // frame otherwise): the backlog is rarely full.
            if authenticated && held.is_none() && self.gw.registry.backlog.is_full() {
                // Past the gateway's backlog of frames not yet written,
                // take no more until the sockets drain it.
                let waited = tokio::select! {
                    _ = self.shared().cancel.cancelled() => return,
                    waited = self.gw.registry.backlog.room() => waited,
                };
                if waited {
                    self.gw.registry.counters.backlog_wait();
                }
            }
            let next = match held.take() {
                Some(item) => Ok(*item),
                None => tokio::select! {
                    _ = self.shared().cancel.cancelled() => return,
                    next = timeout(wait, stream.next()) => next,
                },
            };
            let msg = match next {
                Err(_) if authenticated => return self.close(1001, "idle timeout"),
                Err(_) => return self.close(1008, "authentication timeout"),
                Ok(None) => return,
                Ok(Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. })))) => {
                    return self.close(1009, "frame too large");
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    return;
                }
                Ok(Some(Ok(msg))) => msg,
            };
            let flow = match msg {
                // Boxed: the handlers' state lives only while a frame is
                // handled, instead of enlarging every idle connection's
                // long-lived future (a small allocation per frame).
                Message::Text(text) if authenticated => {
                    // Frames that already arrived behind this one are
                    // handled together: consecutive direct messages are
                    // routed as one unit (one store write when RELIABLE).
                    let mut more = Vec::new();
                    while more.len() + 1 < READ_BATCH {
                        match stream.next().now_or_never() {
                            Some(Some(Ok(Message::Text(t)))) => more.push(t),
                            Some(other) => {
                                held = Some(Box::new(other));
                                break;
                            }
                            None => break,
                        }
                    }
                    if more.is_empty() {
                        // The usual case at low rates: nothing to gather.
                        Box::pin(self.on_text(text.as_str())).await
                    } else {
                        more.insert(0, text);
                        Box::pin(self.on_texts(more)).await
                    }
                }
                Message::Text(text) => Box::pin(self.on_text(text.as_str())).await,
                Message::Binary(_) => self.refuse(FrameError::new(
                    ErrorCode::InvalidFrame,
                    "binary frames are not part of the protocol; send JSON text frames",
                )),
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Flow::Continue,
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    /// Answers a refused frame with ERROR; closes a connection that keeps
    /// sending refused frames.
    fn refuse(&mut self, err: FrameError) -> Flow {
        metrics::counter!("switchboard_refusals_total", "code" => err.code.as_str()).increment(1);
        // A flood interleaved with a few accepted frames still adds up; a
        // second without refusals starts the count again.
        let now = Instant::now();
        if now.duration_since(self.last_refusal) > REFUSAL_WINDOW {
            self.refusals = 0;
        }
        self.last_refusal = now;
        self.refusals += 1;
        if !self.send_text("ERROR", frames::error(&err)) {
            return Flow::Stop;
        }
        if self.refusals > self.gw.limits.max_refusals {
            let reason = if err.code == ErrorCode::RateLimited {
                "rate limit exceeded"
            } else {
                "too many refused frames"
            };
            self.close(1008, reason);
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// A text frame read as a client frame (counted), or why not.
    fn parse_text(&self, text: &str) -> Result<ClientFrame, FrameError> {
        if text.len() > self.gw.limits.max_frame_bytes {
            return Err(FrameError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "frame of {} bytes exceeds the limit of {}",
                    text.len(),
                    self.gw.limits.max_frame_bytes
                ),
            ));
        }
        let frame = frames::parse(text)?;
        self.gw
            .registry
            .counters
            .frames_in(frames::known_type(&frame.kind), 1);
        Ok(frame)
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        match self.parse_text(text) {
            Ok(frame) => self.on_frame(frame).await,
            Err(e) => self.refuse(e),
        }
    }

    /// Frames that arrived together, in order. Runs of valid direct messages
    /// go to the router as one batch; anything else is handled on its own,
    /// after the messages before it were routed.
    async fn on_texts(&mut self, texts: Vec<Utf8Bytes>) -> Flow {
        let mut batch: Vec<(pb::Envelope, ClientFrame)> = Vec::new();
        for text in &texts {
            let step = match self.parse_text(text.as_str()) {
                Ok(frame) => self.step(frame),
                Err(e) => Step::Refused(e),
            };
            if let Step::Direct(envelope, frame) = step {
                batch.push((envelope, frame));
                continue;
            }
            // Anything else waits for the messages before it.
            if let Flow::Stop = self.route_all(std::mem::take(&mut batch)).await {
                return Flow::Stop;
            }
            let flow = match step {
                Step::Other(frame) => self.on_frame(frame).await,
                Step::Refused(e) => self.refuse(e),
                Step::Direct(..) => Flow::Continue,
            };
            if let Flow::Stop = flow {
                return Flow::Stop;
            }
        }
        self.route_all(batch).await
    }

    /// What a frame of a gathered run is: a valid direct message (batched),
    /// a refusal, or any other frame (handled on its own).
    fn step(&mut self, mut frame: ClientFrame) -> Step {
        if frame.kind != "MESSAGE" || self.identity.get().is_none() {
            return Step::Other(frame);
        }
        let envelope = self
            .check_rate(&frame)
            .and_then(|()| self.direct_envelope(&mut frame));
        match envelope {
            Ok(envelope) => Step::Direct(envelope, frame),
            Err(e) => Step::Refused(e),
        }
    }

    /// Routes direct messages that arrived together: one router call for the
    /// lot; each frame gets its own answer.
    async fn route_all(&mut self, mut batch: Vec<(pb::Envelope, ClientFrame)>) -> Flow {
        if batch.len() <= 1 {
            let Some((envelope, frame)) = batch.pop() else {
                return Flow::Continue;
            };
            return match self.route(envelope, &frame).await {
                Ok(flow) => flow,
                Err(e) => self.refuse(e),
            };
        }
        let span = receive_span(&self.gw.deps.domain, &batch[0].0, &batch[0].1, batch.len());
        let mut envelopes = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for (envelope, frame) in batch {
            let reliable = envelope.feature() == pb::Feature::Reliable;
            answers.push((envelope.id.clone(), reliable, frame));
            envelopes.push(envelope);
        }
        let reliable = answers.iter().filter(|(_, r, _)| *r).count();
        let counters = &self.gw.registry.counters;
        counters.message(false, true).increment(reliable as u64);
        counters
            .message(false, false)
            .increment((answers.len() - reliable) as u64);
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
        match routed {
            Ok(_) => {
                for (id, reliable, frame) in answers {
                    self.accepted(reliable, &id, &frame);
                }
                Flow::Continue
            }
            Err(e) => {
                span.record("error", tracing::field::display(&e));
                for (_, _, frame) in answers {
                    if let Flow::Stop = self.refuse(service_error(e.clone(), &frame)) {
                        return Flow::Stop;
                    }
                }
                Flow::Continue
            }
        }
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Flow {
        let result = if self.identity.get().is_none() {
            if frame.kind == "AUTH_CLIENT" {
                self.on_auth(frame).await
            } else {
                Err(
                    FrameError::new(ErrorCode::NotAuthenticated, "send AUTH_CLIENT first")
                        .with_reference(frame.reference),
                )
            }
        } else {
            self.on_authenticated(frame).await
        };
        match result {
            Ok(flow) => flow,
            Err(e) => self.refuse(e),
        }
    }

    fn check_rate(&mut self, frame: &ClientFrame) -> Result<(), FrameError> {
        if frame.kind != "ACK" && !self.limiter.allow() {
            return Err(FrameError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second",
                    self.gw.limits.messages_per_second
                ),
            )
            .with_reference(frame.reference.clone()));
        }
        Ok(())
    }

    async fn on_authenticated(&mut self, frame: ClientFrame) -> Result<Flow, FrameError> {
        self.check_rate(&frame)?;
        match frame.kind.as_str() {
            "MESSAGE" => self.on_message(frame).await,
            "GROUP_MESSAGE" => self.on_group_message(frame).await,
            "FETCH_MISSING_MESSAGES_REQUEST" => self.on_fetch(frame).await,
            "ACK" => self.on_ack(frame).await,
            "AUTH_CLIENT" => Err(
                FrameError::new(ErrorCode::InvalidFrame, "already authenticated")
                    .with_reference(frame.reference),
            ),
            other => Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type {other:?}"),
            )
            .with_reference(frame.reference)),
        }
    }

    async fn on_auth(&mut self, mut frame: ClientFrame) -> Result<Flow, FrameError> {
        let app_id = frame.take_string("appId")?;
        let user_id = frame.take_string("userId")?;
        let token = frame.take_optional_string("token")?.unwrap_or_default();
        let acks = frame.take_bool("acks")?;
        let _device = frame.take_optional_string("device")?;
        let reply = call(self.gw.deps.auth.verify_client(pb::VerifyClientRequest {
            app_id: app_id.clone(),
            user_id: user_id.clone(),
            token,
        }))
        .await
        .map_err(|e| service_error(e, &frame))?;
        if !reply.authenticated {
            self.send_text(
                "AUTH_CLIENT_REPLY",
                frames::auth_reply(&app_id, &user_id, false, Some(&reply.reason)),
            );
            self.close(1008, "authentication failed");
            return Ok(Flow::Stop);
        }
        // The reply is queued before the connection is registered, so it is
        // the first frame the client reads.
        self.send_text(
            "AUTH_CLIENT_REPLY",
            frames::auth_reply(&app_id, &user_id, true, None),
        );
        let identity = Identity {
            app_id,
            app_name: reply.app_name,
            user_id,
            acks,
        };
        let gw = self.gw.clone();
        gw.registry
            .add(&identity.app_id, &identity.user_id, self.handle.clone());
        let presence = gw
            .deps
            .presence
            .connect(&identity.app_id, &identity.user_id, &gw.id)
            .await;
        let (app_id, user_id) = (identity.app_id.clone(), identity.user_id.clone());
        // Set once: on_auth runs only while no identity is set.
        let _ = self.identity.set(identity);
        match presence {
            Ok(t) if t.user_changed => {
                let change = pb::PresenceChangeRequest {
                    app_id: app_id.clone(),
                    user_id: user_id.clone(),
                    online: true,
                };
                if let Err(e) = gw.deps.delivery.presence_changed(change).await {
                    tracing::warn!(error = %e, "user connected event failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "presence connect failed"),
        }
        if acks {
            // Unacknowledged messages come again on the next connection.
            let count = u32::try_from(self.gw.limits.max_unacked)
                .unwrap_or(u32::MAX)
                .min(self.gw.limits.max_fetch_count);
            self.send_stored(&app_id, &user_id, count, &frame).await?;
        }
        Ok(Flow::Continue)
    }

    /// Sends up to `count` stored messages after the fetch cursor; returns how
    /// many remain after them.
    async fn send_stored(
        &mut self,
        app_id: &str,
        user_id: &str,
        count: u32,
        frame: &ClientFrame,
    ) -> Result<u64, FrameError> {
        let page = call(self.gw.deps.delivery.fetch(pb::FetchRequest {
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            count,
            after_seq: self.fetch_cursor,
        }))
        .await
        .map_err(|e| service_error(e, frame))?;
        let item = pb::PushItem::default();
        for msg in &page.messages {
            let text = frames::render_push(&item, msg);
            metrics::counter!("switchboard_frames_out_total", "type" => frames::push_type(msg))
                .increment(1);
            let sent = self.handle.send(Outbound {
                text: Utf8Bytes::from(text),
                push: Some(Box::new(crate::registry::Push {
                    stored: Some(crate::registry::Stored {
                        seq: msg.seq,
                        id: msg.id.clone(),
                    }),
                    accepted_ms: 0,
                    _backlog: None,
                })),
            });
            if !sent {
                break;
            }
            self.fetch_cursor = self.fetch_cursor.max(msg.seq);
        }
        Ok(page.left)
    }

    fn identity(&self) -> Result<&Identity, FrameError> {
        self.identity
            .get()
            .ok_or_else(|| FrameError::new(ErrorCode::NotAuthenticated, "send AUTH_CLIENT first"))
    }

    fn check_recipient(
        &self,
        id: &Identity,
        to: &str,
        frame: &ClientFrame,
    ) -> Result<(), FrameError> {
        let ok = to
            .strip_prefix(id.app_name.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| !rest.is_empty());
        if ok {
            Ok(())
        } else {
            Err(FrameError::new(
                ErrorCode::InvalidRecipient,
                format!("recipient {to:?} is not a user of app {}", id.app_name),
            )
            .with_reference(frame.reference.clone()))
        }
    }

    fn check_content(&self, content: &str, frame: &ClientFrame) -> Result<(), FrameError> {
        if content.len() > self.gw.limits.max_content_bytes {
            return Err(FrameError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "content of {} bytes exceeds the limit of {}",
                    content.len(),
                    self.gw.limits.max_content_bytes
                ),
            )
            .with_reference(frame.reference.clone()));
        }
        Ok(())
    }

    fn envelope(&self, id: &Identity, frame: &ClientFrame, feature: pb::Feature) -> pb::Envelope {
        pb::Envelope {
            id: switchboard_mesh::new_message_id(),
            app_id: id.app_id.clone(),
            from: id.user_id.clone(),
            reference: frame.reference.clone().unwrap_or_default(),
            feature: feature.into(),
            ts: switchboard_mesh::now_ms(),
            origin: Some(pb::ConnRef {
                gateway_id: self.gw.id.clone(),
                conn_id: self.shared().id,
            }),
            hop_limit: switchboard_mesh::DEFAULT_HOP_LIMIT,
            ..Default::default()
        }
    }

    async fn route(&self, envelope: pb::Envelope, frame: &ClientFrame) -> Result<Flow, FrameError> {
        let id = envelope.id.clone();
        let reliable = envelope.feature() == pb::Feature::Reliable;
        let group = envelope.kind() == pb::MessageKind::Group;
        self.gw
            .registry
            .counters
            .message(group, reliable)
            .increment(1);
        let span = receive_span(&self.gw.deps.domain, &envelope, frame, 1);
        let routed = tracing::Instrument::instrument(
            call(self.gw.deps.router.route(pb::RouteRequest {
                envelope: Some(envelope),
            })),
            span.clone(),
        )
        .await;
        if let Err(e) = &routed {
            span.record("error", tracing::field::display(e));
        }
        routed.map_err(|e| service_error(e, frame))?;
        self.accepted(reliable, &id, frame);
        Ok(Flow::Continue)
    }

    /// MESSAGE_ACCEPTED for a routed RELIABLE message, in ack mode.
    fn accepted(&self, reliable: bool, id: &str, frame: &ClientFrame) {
        if reliable && self.identity.get().is_some_and(|i| i.acks) {
            self.send_text(
                "MESSAGE_ACCEPTED",
                frames::accepted(frame.reference.as_deref(), id),
            );
        }
    }

    async fn on_message(&mut self, mut frame: ClientFrame) -> Result<Flow, FrameError> {
        let envelope = self.direct_envelope(&mut frame)?;
        self.route(envelope, &frame).await
    }

    /// The envelope of a valid direct MESSAGE frame.
    fn direct_envelope(&self, frame: &mut ClientFrame) -> Result<pb::Envelope, FrameError> {
        let to = frame.take_string("to")?;
        let content = frame.take_string("content")?;
        let feature = frame.feature()?;
        let id = self.identity()?;
        self.check_recipient(id, &to, frame)?;
        self.check_content(&content, frame)?;
        let mut envelope = self.envelope(id, frame, feature);
        envelope.to = vec![to];
        envelope.content = content;
        envelope.kind = pb::MessageKind::Direct.into();
        Ok(envelope)
    }

    async fn on_group_message(&mut self, mut frame: ClientFrame) -> Result<Flow, FrameError> {
        let to = frame.take_string_list("to")?;
        let group = frame.take_optional_string("group")?;
        let content = frame.take_string("content")?;
        let feature = frame.feature()?;
        let id = self.identity()?;
        self.check_content(&content, &frame)?;
        let mut envelope = self.envelope(id, &frame, feature);
        match (to, group) {
            (Some(to), None) => {
                if to.is_empty() {
                    return Err(FrameError::new(ErrorCode::InvalidFrame, "data.to is empty")
                        .with_reference(frame.reference));
                }
                if to.len() > self.gw.limits.max_group_recipients {
                    return Err(FrameError::new(
                        ErrorCode::InvalidFrame,
                        format!(
                            "{} recipients exceed the limit of {}",
                            to.len(),
                            self.gw.limits.max_group_recipients
                        ),
                    )
                    .with_reference(frame.reference));
                }
                for user in &to {
                    self.check_recipient(id, user, &frame)?;
                }
                envelope.to = to;
            }
            (None, Some(group)) if !group.is_empty() => envelope.group = group,
            _ => {
                return Err(FrameError::new(
                    ErrorCode::InvalidFrame,
                    "GROUP_MESSAGE needs either data.to (a list of users) or data.group",
                )
                .with_reference(frame.reference));
            }
        }
        envelope.content = content;
        envelope.kind = pb::MessageKind::Group.into();
        self.route(envelope, &frame).await
    }

    async fn on_fetch(&mut self, mut frame: ClientFrame) -> Result<Flow, FrameError> {
        let count = frame
            .take_count("count", 100)?
            .min(self.gw.limits.max_fetch_count);
        let id = self.identity()?;
        let (app_id, user_id) = (id.app_id.clone(), id.user_id.clone());
        let left = self.send_stored(&app_id, &user_id, count, &frame).await?;
        self.send_text(
            "FETCH_MISSING_MESSAGES_COMPLETE",
            frames::fetch_complete(left),
        );
        Ok(Flow::Continue)
    }

    async fn on_ack(&mut self, mut frame: ClientFrame) -> Result<Flow, FrameError> {
        let ids = frame.take_string_list("ids")?.ok_or_else(|| {
            FrameError::new(ErrorCode::InvalidFrame, "missing field data.ids")
                .with_reference(frame.reference.clone())
        })?;
        let id = self.identity()?;
        let seqs: Vec<u64> = {
            let mut map = self
                .unacked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ids.iter().filter_map(|i| map.remove(i)).collect()
        };
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
        Ok(Flow::Continue)
    }
}

/// What one frame among several read together turned out to be. Lives for
/// one loop turn, on the stack: boxing the envelope would cost an allocation
/// per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Step {
    Direct(pb::Envelope, ClientFrame),
    Other(ClientFrame),
    Refused(FrameError),
}

/// The `gateway.receive` span of `count` messages routed together, named
/// after the first (its id, kind and feature); a client's `traceparent` on
/// that frame joins the client's trace.
fn receive_span(
    domain: &str,
    first: &pb::Envelope,
    frame: &ClientFrame,
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
    if let Some(traceparent) = &frame.traceparent {
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

fn service_error(err: ServiceError, frame: &ClientFrame) -> FrameError {
    FrameError::new(err.code, err.message).with_reference(frame.reference.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::Context;

    /// A socket that takes `room` frames and then blocks, as a client that
    /// stopped reading does.
    struct Blocking {
        room: usize,
        taken: Vec<String>,
        flushes: bool,
    }

    impl Blocking {
        fn new(room: usize, flushes: bool) -> Self {
            Blocking {
                room,
                taken: Vec::new(),
                flushes,
            }
        }
    }

    impl futures_util::Sink<Message> for Blocking {
        type Error = WsError;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            if self.taken.len() < self.room {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
            let text = item
                .into_text()
                .map_or_else(|_| String::new(), |t| t.to_string());
            self.get_mut().taken.push(text);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            if self.flushes {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Pending
        }
    }

    fn frames(n: usize) -> Vec<Outbound> {
        (0..n)
            .map(|i| Outbound::reply(Utf8Bytes::from(format!("frame {i}"))))
            .collect()
    }

    #[tokio::test]
    async fn an_interrupted_write_keeps_only_the_frames_the_socket_did_not_take() {
        let counters = Counters::new();
        let cancel = CancellationToken::new();
        let mut sink = Blocking::new(3, true);
        let mut batch = frames(5);
        let stopper = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stopper.cancel();
        });
        let written = write_or_stall(&mut sink, &mut batch, &counters, &cancel).await;
        assert!(matches!(written, Written::Cancelled));
        assert_eq!(sink.taken, ["frame 0", "frame 1", "frame 2"]);
        // The close path writes what is left: each frame reaches the socket
        // once (it wrote the whole batch again before: duplicates).
        let left: Vec<&str> = batch.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(left, ["frame 3", "frame 4"]);
    }

    #[tokio::test]
    async fn a_completed_write_keeps_its_batch_for_the_delivered_report() {
        let counters = Counters::new();
        let cancel = CancellationToken::new();
        let mut sink = Blocking::new(10, true);
        let mut batch = frames(2);
        let written = write_or_stall(&mut sink, &mut batch, &counters, &cancel).await;
        assert!(matches!(written, Written::Done));
        assert_eq!(sink.taken.len(), 2);
        assert_eq!(batch.len(), 2);
    }

    #[tokio::test]
    async fn a_write_cancelled_in_its_flush_leaves_nothing_to_write_again() {
        let counters = Counters::new();
        let cancel = CancellationToken::new();
        let mut sink = Blocking::new(10, false);
        let mut batch = frames(2);
        // The flush blocks (the mock never flushes): the write is cancelled
        // after every frame was taken, and nothing is left to write again.
        cancel.cancel();
        let written = write_or_stall(&mut sink, &mut batch, &counters, &cancel).await;
        assert!(matches!(written, Written::Cancelled));
        assert_eq!(sink.taken.len(), 2);
        assert!(batch.is_empty());
    }
}
