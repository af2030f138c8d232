//! Delivery → remote gateway: one long-lived `PushStream` per gateway, fed
//! from a bounded queue in batches. A push only enqueues, so a slow or dead
//! gateway delays nobody else: when its queue is full, its pushes fail at once
//! (RELIABLE messages stay in their inboxes and are fetched later).

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
}

impl GatewayLink {
    /// Starts the stream task; it ends when the link is dropped.
    pub(crate) fn start(channel: Channel, credentials: MeshCredentials) -> Self {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        tokio::spawn(run_link(channel, credentials, rx));
        GatewayLink { tx }
    }
}

#[async_trait]
impl Gateway for GatewayLink {
    async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
        let mut dropped = 0usize;
        for item in req.items {
            match self.tx.try_send(item) {
                Ok(()) => {}
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
) {
    let mut pause = Duration::from_millis(100);
    let mut buf = Vec::with_capacity(LINK_BATCH);
    loop {
        let (req_tx, req_rx) = mpsc::channel::<pb::PushRequest>(4);
        let mut client = pb::gateway_client::GatewayClient::new(InterceptedService::new(
            channel.clone(),
            credentials.clone(),
        ))
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        let mut call = tokio::spawn(async move {
            let mut replies = client
                .push_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx))
                .await?
                .into_inner();
            while replies.message().await?.is_some() {}
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
                    let mut failed = false;
                    for items in split_by_size(std::mem::take(&mut buf)) {
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
