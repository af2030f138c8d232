//! Delivery → remote gateway: one long-lived `PushStream` per gateway, fed
//! from a bounded queue in batches. A push only enqueues, so a slow or dead
//! gateway delays nobody else: when its queue is full, its pushes fail at once
//! (RELIABLE messages stay in their inboxes and are fetched later).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_proto::mesh as pb;
use tokio::sync::mpsc;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::credentials::MeshCredentials;
use crate::error::ServiceError;
use crate::services::Gateway;

/// Items queued for one gateway.
const LINK_QUEUE: usize = 16_384;
/// Items taken from the queue at once.
const LINK_BATCH: usize = 512;
/// Largest stream message, bytes (a batch is split above this).
const LINK_MESSAGE_BYTES: usize = 1024 * 1024;
const MAX_PAUSE: Duration = Duration::from_secs(2);

pub(crate) struct GatewayLink {
    tx: mpsc::Sender<pb::PushItem>,
    /// Items ever queued.
    queued: AtomicU64,
    /// Items ever settled: answered by the gateway (handed to its
    /// connections), or lost with a stream that broke.
    settled: Arc<tokio::sync::watch::Sender<u64>>,
}

impl GatewayLink {
    /// Starts the stream task; it ends when the link is dropped.
    pub(crate) fn start(channel: Channel, credentials: MeshCredentials) -> Self {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let settled = Arc::new(tokio::sync::watch::Sender::new(0));
        tokio::spawn(run_link(channel, credentials, rx, settled.clone()));
        GatewayLink {
            tx,
            queued: AtomicU64::new(0),
            settled,
        }
    }

    /// Waits until every item queued before the call has reached the
    /// gateway's connections (or was lost with a broken stream). A
    /// delivery process giving an inbox up calls this before the new
    /// owner may push to it, so that pushes of one inbox from two
    /// processes cannot overtake each other on their way to a gateway.
    pub(crate) async fn flush(&self) {
        let target = self.queued.load(Ordering::Acquire);
        let mut settled = self.settled.subscribe();
        let _ = settled.wait_for(|&n| n >= target).await;
    }
}

#[async_trait]
impl Gateway for GatewayLink {
    async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
        let mut dropped = 0usize;
        for item in req.items {
            match self.tx.try_send(item) {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::AcqRel);
                }
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(ServiceError::unavailable("gateway link closed"));
                }
            }
        }
        if dropped > 0 {
            metrics::counter!("switchboard_push_dropped_total", "reason" => "gateway_queue_full")
                .increment(dropped as u64);
            return Err(ServiceError::unavailable(format!(
                "gateway push queue full: {dropped} items dropped"
            )));
        }
        // Connection counts are not reported back over the stream.
        Ok(pb::PushReply::default())
    }
}

async fn run_link(
    channel: Channel,
    credentials: MeshCredentials,
    mut rx: mpsc::Receiver<pb::PushItem>,
    settled: Arc<tokio::sync::watch::Sender<u64>>,
) {
    let mut pause = Duration::from_millis(100);
    let mut buf = Vec::with_capacity(LINK_BATCH);
    // Items taken from the queue so far.
    let mut taken = 0u64;
    loop {
        // The sizes of the requests sent and not answered yet, in order:
        // the gateway answers each request once its items are handed on.
        let unanswered: Arc<Mutex<VecDeque<u64>>> = Arc::default();
        let (req_tx, req_rx) = mpsc::channel::<pb::PushRequest>(4);
        let mut client = pb::gateway_client::GatewayClient::new(InterceptedService::new(
            channel.clone(),
            credentials.clone(),
        ))
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        let (answered, on_reply) = (unanswered.clone(), settled.clone());
        let mut call = tokio::spawn(async move {
            let mut replies = client
                .push_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx))
                .await?
                .into_inner();
            while replies.message().await?.is_some() {
                let n = answered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front()
                    .unwrap_or(0);
                on_reply.send_modify(|s| *s += n);
            }
            Ok::<(), tonic::Status>(())
        });
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, LINK_BATCH) => {
                    if n == 0 {
                        // The directory dropped this gateway.
                        call.abort();
                        return;
                    }
                    taken += n as u64;
                    let mut failed = false;
                    for items in split_by_size(std::mem::take(&mut buf)) {
                        unanswered
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back(items.len() as u64);
                        if req_tx.send(pb::PushRequest { items }).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                    pause = Duration::from_millis(100);
                }
                ended = &mut call => {
                    match ended {
                        Ok(Ok(())) => tracing::debug!("gateway push stream ended"),
                        Ok(Err(status)) => tracing::debug!(error = %status, "gateway push stream failed"),
                        Err(e) => tracing::debug!(error = %e, "gateway push stream task failed"),
                    }
                    break;
                }
            }
        }
        call.abort();
        // What the broken stream did not deliver is lost (stored messages
        // stay in their inboxes): nothing of it is on its way any more.
        settled.send_modify(|s| *s = (*s).max(taken));
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Splits items into stream messages of at most [`LINK_MESSAGE_BYTES`] (a
/// single larger item travels alone).
fn split_by_size(items: Vec<pb::PushItem>) -> Vec<Vec<pb::PushItem>> {
    use prost::Message;
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for item in items {
        let len = item.encoded_len();
        if !current.is_empty() && size + len > LINK_MESSAGE_BYTES {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(item);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(content_len: usize) -> pb::PushItem {
        pb::PushItem {
            message: Some(pb::InboxMessage {
                content: "x".repeat(content_len),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A gateway that hands pushes on only when the test opens `gate`.
    struct GatedGateway {
        gate: Arc<tokio::sync::Semaphore>,
        pushed: Arc<AtomicU64>,
    }

    #[async_trait]
    impl Gateway for GatedGateway {
        async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
            self.gate
                .acquire()
                .await
                .map_err(|_| ServiceError::internal("closed"))?
                .forget();
            self.pushed
                .fetch_add(req.items.len() as u64, Ordering::SeqCst);
            Ok(pb::PushReply::default())
        }
    }

    #[tokio::test]
    async fn a_flush_waits_until_the_gateway_has_handed_every_earlier_push_on() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let pushed = Arc::new(AtomicU64::new(0));
        let gateway = GatedGateway {
            gate: gate.clone(),
            pushed: pushed.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let closing = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    crate::GatewayService::new(Arc::new(gateway), closing.clone()).into_server(),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        let link = GatewayLink::start(channel, MeshCredentials::default());
        link.push(pb::PushRequest {
            items: vec![item(10), item(10), item(10)],
        })
        .await
        .expect("queued");
        // The gateway holds them: the flush cannot end.
        let flush = link.flush();
        tokio::pin!(flush);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut flush)
                .await
                .is_err(),
            "flushed before the gateway answered"
        );
        gate.add_permits(100);
        tokio::time::timeout(Duration::from_secs(30), flush)
            .await
            .expect("flushed once answered");
        assert_eq!(pushed.load(Ordering::SeqCst), 3);
        // Nothing queued since: at once.
        tokio::time::timeout(Duration::from_secs(30), link.flush())
            .await
            .expect("nothing to wait for");
        closing.cancel();
        server.abort();
    }

    #[test]
    fn batches_stay_under_the_message_size() {
        let items: Vec<_> = (0..600).map(|_| item(8000)).collect();
        let batches = split_by_size(items);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 600);
        for b in &batches {
            let bytes: usize = b.iter().map(prost::Message::encoded_len).sum();
            assert!(bytes <= LINK_MESSAGE_BYTES, "{bytes}");
        }
        assert_eq!(split_by_size(vec![item(2 * LINK_MESSAGE_BYTES)]).len(), 1);
        assert!(split_by_size(Vec::new()).is_empty());
    }
}
