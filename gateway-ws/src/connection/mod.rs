//! One client's WebSocket connection: a thin adapter over its [`Session`].
//! The reader (`reader`) turns frames into typed commands and gathers
//! direct messages into route batches; this module hands each command to
//! the session and renders its outcome as frames; the writer (`writer`)
//! drains the connection's send queue to the socket.

mod channels;
mod reader;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use switchboard_mesh::pb;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::GatewayInner;
use crate::commands::{ClientCommand, RequestMeta};
use crate::frames::{self, ClientFrame, FrameError};
use crate::registry::{CloseReason, ConnHandle, ConnShared, Outbound, Push, Stored};
use crate::session::{Accepted, AuthOutcome, Fetched, Outcome, Session};

/// How long a connection closed by a server shutdown waits for the client's
/// close frame.
const SHUTDOWN_CLOSE_GRACE: Duration = Duration::from_millis(200);
/// How long a closing connection may take to flush what is queued.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs one client connection; `origin` is the `Origin` header of its
/// upgrade request (browsers send one).
///
/// `ws` comes boxed: an async fn keeps its arguments for its whole life,
/// and the stream is split (moved) at once.
pub(crate) async fn run<S>(
    gw: Arc<GatewayInner>,
    ws: Box<WebSocketStream<S>>,
    origin: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = gw.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(ConnShared::new(
        conn_id,
        gw.shutdown.child_token(),
        gw.limits.send_queue_frames,
        gw.limits.send_queue_bytes,
    ));
    // Built in blocks: a local moved out of (the session, the sink) would
    // otherwise keep its bytes in this future, which lives as long as the
    // connection, beside the value it moved into.
    let mut conn = {
        let handle = ConnHandle {
            shared: shared.clone(),
        };
        let mut session = Session::new(gw.clone(), conn_id);
        session.set_web_origin(origin);
        session.attach(handle.clone());
        Connection {
            gw: gw.clone(),
            handle,
            session,
            refusals: 0,
            last_refusal: Instant::now(),
        }
    };
    let identity = conn.session.identity_cell();
    let (writer, mut stream) = {
        let (sink, stream) = (*ws).split();
        let writer = tokio::spawn(writer::write_loop(
            gw.clone(),
            sink,
            shared.clone(),
            identity.clone(),
            conn.session.unacked(),
        ));
        (writer, stream)
    };
    conn.read_loop(&mut stream).await;
    // The reader stopped on its own (client closed, socket failed): nothing
    // more to send. When it stopped because of a close request, the writer
    // sends that close frame.
    if !shared.cancel.is_cancelled() {
        shared.close(CloseReason::Client);
    }
    let _ = writer.await;
    // The writer closed the queue as it ended; again here in case its task
    // never ran (a runtime shutting down).
    shared.close_queue();
    // Nothing can be written any more: stop routing pushes here.
    // What runs once, at the end, is boxed: inline, its state would
    // enlarge the future every idle connection holds.
    if let Some(id) = identity.get() {
        gw.registry.remove(&id.app_id, &id.user_id, conn_id);
        Box::pin(conn.session.offline()).await;
    }
    Box::pin(conn.session.close_channels()).await;
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
        let _ = Box::pin(timeout(grace, async {
            while let Some(Ok(msg)) = stream.next().await {
                if msg.is_close() {
                    break;
                }
            }
        }))
        .await;
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Connection {
    gw: Arc<GatewayInner>,
    handle: ConnHandle,
    session: Session,
    /// Refused frames since the last pause of a second without refusals.
    refusals: u32,
    last_refusal: Instant,
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

    /// One frame, handled on its own: admitted by the session, read as its
    /// typed command, done, answered.
    async fn on_frame(&mut self, mut frame: ClientFrame) -> Flow {
        let result = match self.session.admit(frame.kind.command()) {
            Ok(()) => match frame.command() {
                Ok(command) => self.on_command(command, &frame.meta).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(FrameError::refused(e, &frame.meta)),
        };
        match result {
            Ok(flow) => flow,
            Err(e) => self.refuse(e),
        }
    }

    /// Runs an admitted command in the session and renders its outcome.
    async fn on_command(
        &mut self,
        command: ClientCommand,
        meta: &RequestMeta,
    ) -> Result<Flow, FrameError> {
        let outcome = self
            .session
            .run(command, meta)
            .await
            .map_err(|e| FrameError::refused(e, meta))?;
        match outcome {
            Outcome::Auth(auth) => self.on_auth(auth, meta).await,
            Outcome::Accepted(accepted) => {
                self.answer_accepted(&accepted, meta);
                Ok(Flow::Continue)
            }
            Outcome::Fetched(page) => {
                let left = page.left + self.send_page(page);
                self.send_text(
                    "FETCH_MISSING_MESSAGES_COMPLETE",
                    frames::fetch_complete(left),
                );
                Ok(Flow::Continue)
            }
            Outcome::Acked => Ok(Flow::Continue),
            Outcome::Group(group) => {
                let (kind, text) =
                    frames::group_reply(group.op, &group.reply, meta.reference.as_deref());
                self.send_text(kind, text);
                Ok(Flow::Continue)
            }
            Outcome::Channel(outcome) => Ok(self.on_channel(outcome, meta)),
        }
    }

    /// After AUTH_CLIENT: the reply, and on success the connection joins
    /// the registry and presence, and ack mode's replay follows.
    async fn on_auth(
        &mut self,
        outcome: AuthOutcome,
        meta: &RequestMeta,
    ) -> Result<Flow, FrameError> {
        if let AuthOutcome::Refused {
            app_id,
            user_id,
            reason,
            redirect,
        } = outcome
        {
            self.send_text(
                "AUTH_CLIENT_REPLY",
                frames::auth_reply(&app_id, &user_id, false, Some(&reason), redirect.as_deref()),
            );
            self.close(1008, "authentication failed");
            return Ok(Flow::Stop);
        }
        let Some(id) = self.session.identity() else {
            return Ok(Flow::Continue);
        };
        // The reply is queued before the connection is registered, so it is
        // the first frame the client reads.
        self.send_text(
            "AUTH_CLIENT_REPLY",
            frames::auth_reply(&id.app_id, &id.user_id, true, None, None),
        );
        self.gw
            .registry
            .add(&id.app_id, &id.user_id, self.handle.clone());
        self.session.online().await;
        // Ack mode: unacknowledged messages come again on a new connection.
        let page = self
            .session
            .replay()
            .await
            .map_err(|e| FrameError::refused(e, meta))?;
        self.send_page(page);
        Ok(Flow::Continue)
    }

    /// Queues stored messages as pushes (tracked by the writer like live
    /// ones: written once, reported delivered or awaiting ACK). A page
    /// stops at half the send queue's byte bound (its first message always
    /// goes): a page of large messages would otherwise overflow the queue,
    /// close the connection as a slow consumer and drop the page's tail.
    /// Returns how many messages were left for the next page.
    fn send_page(&mut self, page: Fetched) -> u64 {
        let item = pb::PushItem::default();
        let budget = self.gw.limits.send_queue_bytes / 2;
        let mut queued = 0usize;
        let mut last_sent = None;
        let total = page.messages.len();
        for (i, msg) in page.messages.into_iter().enumerate() {
            let text = frames::render_push(&item, &msg);
            queued = queued.saturating_add(text.len());
            if let Some(last) = last_sent
                && queued > budget
            {
                // The next FETCH starts with this one.
                self.session.fetch_sent_up_to(last);
                return (total - i) as u64;
            }
            last_sent = Some(msg.seq);
            metrics::counter!("switchboard_frames_out_total", "type" => frames::push_type(&msg))
                .increment(1);
            let sent = self.handle.send(Outbound {
                text: Utf8Bytes::from(text),
                push: Some(Push {
                    stored: Some(Stored {
                        seq: msg.seq,
                        id: msg.id,
                    }),
                    accepted_ms: 0,
                    _backlog: None,
                }),
            });
            if !sent {
                // The queue is full or gone: the connection is closing.
                break;
            }
        }
        0
    }

    /// MESSAGE_ACCEPTED, when the session says the client is told.
    fn answer_accepted(&self, accepted: &Accepted, meta: &RequestMeta) {
        if !accepted.inbox_full.is_empty() {
            // Accepted for the others; the sender learns who did not get it.
            self.send_text(
                "ERROR",
                frames::inbox_full(
                    meta.reference.as_deref(),
                    &accepted.id,
                    &accepted.inbox_full,
                ),
            );
        }
        if self.session.answers_accepted(accepted) {
            self.send_text(
                "MESSAGE_ACCEPTED",
                frames::accepted(meta.reference.as_deref(), &accepted.id),
            );
        }
    }
}

#[cfg(test)]
mod tests;
