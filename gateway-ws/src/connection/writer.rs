//! Writing to a client: a connection's write loop drains its bounded send
//! queue to the socket in batches, closes a client that stops reading (a
//! write stalled for `WRITE_STALL`), and reports what was written (delivered,
//! or waiting for ACK in ack mode).

use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use futures_util::SinkExt;
use switchboard_mesh::pb;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::CLOSE_GRACE;
use crate::GatewayInner;
use crate::counters::Counters;
use crate::registry::{CloseReason, ConnShared, Queued};
use crate::seen::SeqWindow;
use crate::session::{Identity, Unacked};

/// Frames written per flush.
const WRITE_BATCH: usize = 64;
/// Longest a socket write may block (the client does not read) before the
/// connection is closed as a slow consumer: what is queued for it must not
/// be held forever.
const WRITE_STALL: Duration = Duration::from_secs(10);

pub(super) async fn write_loop<W>(
    gw: Arc<GatewayInner>,
    mut sink: W,
    shared: Arc<ConnShared>,
    identity: Arc<OnceLock<Identity>>,
    unacked: Arc<Unacked>,
) where
    W: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    // However the writer ends (a socket failure, a stall, a cancel, a
    // panic), the connection closes and its queue with it: nothing more
    // is queued for a writer that is gone, and what was queued leaves the
    // gateway's backlog now, not when the reader notices.
    let _closing = WriterGone(&shared);
    let ping_every = Duration::from_secs(gw.limits.ping_interval_secs.max(1));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    // Grown on demand (up to WRITE_BATCH): an idle connection keeps a few
    // slots, not 64 (3 KiB).
    let mut batch = Vec::new();
    let mut sent = SeqWindow::default();
    loop {
        tokio::select! {
            biased;
            _ = shared.recv_many(&mut batch, WRITE_BATCH) => {
                shared.dequeued(batch.iter().map(|f| f.text.len()).sum());
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
                if reports_delivered(&identity, &batch) {
                    // Boxed: only a batch with stored messages to report
                    // needs this state, not every idle connection's future.
                    Box::pin(report_delivered(&gw, &identity, &mut batch)).await;
                } else {
                    batch.clear();
                }
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
    // Boxed: it runs once, and inline its state would enlarge the future
    // every idle connection holds.
    let _ = Box::pin(timeout(CLOSE_GRACE, async {
        // `batch` holds what an interrupted write had not yet handed to the
        // socket (already checked for repeats and tracked); frames queued
        // since are checked now.
        let mut queued = Vec::new();
        shared.take_queued(&mut queued);
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
    }))
    .await;
}

/// Whether a written batch has anything for [`report_delivered`]: stored
/// messages, on a connection not in ack mode.
fn reports_delivered(identity: &OnceLock<Identity>, batch: &[Queued]) -> bool {
    identity.get().is_some_and(|id| !id.acks) && batch.iter().any(|out| out.stored().is_some())
}

/// Closes the connection and its send queue when the write loop ends.
struct WriterGone<'a>(&'a ConnShared);

impl Drop for WriterGone<'_> {
    fn drop(&mut self) {
        // A connection already closing (for a reason, or by the server's
        // shutdown) keeps how it closes; a writer gone on its own (a
        // panic) takes the connection with it.
        if !self.0.cancel.is_cancelled() {
            self.0.close(CloseReason::Client);
        }
        self.0.close_queue();
    }
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
    batch: &mut Vec<Queued>,
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
    batch: &mut [Queued],
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
    batch: &mut [Queued],
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
fn drop_repeats(sent: &mut SeqWindow, batch: &mut Vec<Queued>) {
    batch.retain(|out| out.stored().is_none_or(|stored| sent.insert(stored.seq)));
}

/// Ack mode: stored messages about to be written wait for the client's ACK.
fn track_unacked(
    gw: &GatewayInner,
    identity: &OnceLock<Identity>,
    unacked: &Unacked,
    batch: &[Queued],
) {
    if !identity.get().is_some_and(|id| id.acks) {
        return;
    }
    unacked.track(
        gw.limits.max_unacked,
        batch.iter().filter_map(|out| out.stored()),
    );
}

/// After a batch was written: without ack mode, stored messages are now
/// delivered.
async fn report_delivered(
    gw: &GatewayInner,
    identity: &OnceLock<Identity>,
    batch: &mut Vec<Queued>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Outbound;
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

    fn frames(n: usize) -> Vec<Queued> {
        (0..n)
            .map(|i| Box::new(Outbound::reply(Utf8Bytes::from(format!("frame {i}")))))
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

    #[test]
    fn a_writer_gone_closes_its_connection_and_queue_but_leaves_a_shutdown_as_it_is() {
        let conn = crate::registry::ConnHandle {
            shared: Arc::new(ConnShared::new(1, CancellationToken::new(), 8, 1 << 20)),
        };
        assert!(conn.send(Outbound::reply(Utf8Bytes::from_static("queued"))));
        // A writer gone on its own (a panic): the connection closes, and
        // nothing is queued for it any more.
        drop(WriterGone(&conn.shared));
        assert!(conn.shared.cancel.is_cancelled());
        assert!(matches!(conn.shared.reason(), Some(CloseReason::Client)));
        assert_eq!(conn.shared.queued_frames(), 0, "what was queued is dropped");
        assert!(!conn.send(Outbound::reply(Utf8Bytes::from_static("late"))));

        // The server shutting down cancels from outside, with no reason:
        // the connection keeps that (it waits for the client's close).
        let stopping = ConnShared::new(2, CancellationToken::new(), 8, 1 << 20);
        stopping.cancel.cancel();
        drop(WriterGone(&stopping));
        assert!(stopping.reason().is_none());
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
