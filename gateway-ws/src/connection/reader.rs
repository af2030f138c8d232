//! Reading from a client: the socket read loop (timeouts, backpressure from
//! the gateway's backlog, frame size and type limits), refusals, and the
//! gathering of frames that arrived together so that a run of direct
//! messages is routed as one batch.

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use switchboard_mesh::{ErrorCode, ServiceError};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, error::CapacityError};

use super::{Connection, Flow};
use crate::commands::{CommandKind, RequestMeta};
use crate::frames::{self, ClientFrame, FrameError, FrameKind};
use crate::session::{Accepted, CheckedDirect};

/// A pause without refused frames this long forgives earlier refusals.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);
/// Frames read at once when they are already there (routed together).
const READ_BATCH: usize = 64;

/// What one frame among several read together turned out to be. Lives for
/// one loop turn, on the stack: boxing the envelope would cost an allocation
/// per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Step {
    Direct(CheckedDirect, RequestMeta),
    Other(ClientFrame),
    Refused(FrameError),
}

impl Connection {
    pub(super) async fn read_loop<R>(&mut self, stream: &mut R)
    where
        R: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        // Two durations, not a clone of the limits: this future lives as
        // long as the connection.
        let auth_deadline = Instant::now() + Duration::from_secs(self.gw.limits.auth_timeout_secs);
        let idle = Duration::from_secs(self.gw.limits.idle_timeout_secs.max(1));
        // What the stream gave after a batch of text frames, handled next.
        let mut held: Option<Box<Option<Result<Message, WsError>>>> = None;
        loop {
            // An anonymous room member counts as authenticated here: it is
            // not closed for want of AUTH_CLIENT.
            let authenticated = self.session.is_admitted();
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
                // RFC 6455 §8.1: a text frame that is not UTF-8 fails the
                // connection with 1007.
                Ok(Some(Err(WsError::Utf8(_)))) => {
                    metrics::counter!("switchboard_refusals_total", "code" => "INVALID_UTF8")
                        .increment(1);
                    return self.close(1007, "text frame is not valid UTF-8");
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
    pub(super) fn refuse(&mut self, err: FrameError) -> Flow {
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
        self.gw.registry.counters.frames_in(frame.kind.label(), 1);
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
        let mut batch: Vec<(CheckedDirect, RequestMeta)> = Vec::new();
        for text in &texts {
            let step = match self.parse_text(text.as_str()) {
                Ok(frame) => self.step(frame),
                Err(e) => Step::Refused(e),
            };
            if let Step::Direct(envelope, meta) = step {
                batch.push((envelope, meta));
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
        if frame.kind != FrameKind::Command(CommandKind::Message)
            || !self.session.is_authenticated()
        {
            return Step::Other(frame);
        }
        let envelope = self
            .session
            .admit(Some(CommandKind::Message))
            .map_err(|e| FrameError::refused(e, &frame.meta))
            .and_then(|()| frame.message())
            .and_then(|msg| {
                self.session
                    .check_direct(msg, &frame.meta)
                    .map_err(|e| FrameError::refused(e, &frame.meta))
            });
        match envelope {
            Ok(envelope) => Step::Direct(envelope, frame.meta),
            Err(e) => Step::Refused(e),
        }
    }

    /// Routes direct messages that arrived together: one router call for the
    /// lot; each frame gets its own answer.
    async fn route_all(&mut self, mut batch: Vec<(CheckedDirect, RequestMeta)>) -> Flow {
        if batch.len() <= 1 {
            let Some((envelope, meta)) = batch.pop() else {
                return Flow::Continue;
            };
            return match self.session.route_direct(envelope, &meta).await {
                Ok(accepted) => {
                    self.answer_accepted(&accepted, &meta);
                    Flow::Continue
                }
                Err(e) => self.refuse(FrameError::refused(e, &meta)),
            };
        }
        let mut envelopes = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for (envelope, meta) in batch {
            answers.push((envelope.id().to_owned(), envelope.reliable(), meta));
            envelopes.push(envelope);
        }
        match self.session.route_batch(envelopes, &answers[0].2).await {
            Ok(routed) => {
                for (position, (id, reliable, meta)) in answers.into_iter().enumerate() {
                    if routed.is_inbox_full(position) {
                        let e = ServiceError::new(
                            ErrorCode::InboxFull,
                            "the recipient's inbox is full: the message was not stored",
                        );
                        if let Flow::Stop = self.refuse(FrameError::refused(e, &meta)) {
                            return Flow::Stop;
                        }
                        continue;
                    }
                    let accepted = Accepted {
                        id,
                        reliable,
                        repeated: routed.is_repeated(position),
                        inbox_full: Vec::new(),
                    };
                    self.answer_accepted(&accepted, &meta);
                }
                Flow::Continue
            }
            Err(e) => {
                for (_, _, meta) in answers {
                    if let Flow::Stop = self.refuse(FrameError::refused(e.clone(), &meta)) {
                        return Flow::Stop;
                    }
                }
                Flow::Continue
            }
        }
    }
}
