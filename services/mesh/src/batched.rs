//! The batch calls of the hops a message takes (gateway → router, router
//! or groups → delivery): the callers' side builds them with a
//! [`Coalescer`], the servers' side runs their items as the unary calls
//! they stand for.

use std::sync::Arc;

use switchboard_proto::mesh as pb;
use tracing::Instrument;

use crate::coalescer::{
    BatchLimits, BatchSend, Coalescer, from_item_error, item_error, run_ordered,
};
use crate::error::ServiceError;
use crate::pool::Pool;
use crate::services::{Delivery, Router};

use pb::delivery_client::DeliveryClient as DeliveryGrpc;
use pb::router_client::RouterClient as RouterGrpc;

/// The order key of a sender: its items keep their order.
fn sender_key(envelope: Option<&pb::Envelope>) -> Vec<u8> {
    let Some(e) = envelope else {
        return Vec::new();
    };
    let mut key = Vec::with_capacity(e.app_id.len() + 1 + e.from.len());
    key.extend_from_slice(e.app_id.as_bytes());
    key.push(0);
    key.extend_from_slice(e.from.as_bytes());
    key
}

/// The sender of a route item.
pub(crate) fn route_order_key(item: &pb::RouteManyItem) -> Vec<u8> {
    match &item.single {
        Some(single) => sender_key(single.envelope.as_ref()),
        None => sender_key(item.batch.as_ref().and_then(|b| b.envelopes.first())),
    }
}

/// The sender of a deliver item.
pub(crate) fn deliver_order_key(req: &pb::DeliverRequest) -> Vec<u8> {
    sender_key(req.envelopes.first().or(req.sent_copies.first()))
}

fn item_span(rpc: &'static str, traceparent: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "mesh.server",
        otel.name = rpc,
        otel.kind = "server",
        rpc.method = rpc
    );
    switchboard_telemetry::continue_traceparent(&span, traceparent);
    span
}

/// Server side of `Router/RouteMany`.
pub(crate) async fn route_many(
    router: Arc<dyn Router>,
    req: pb::RouteManyRequest,
) -> pb::RouteManyReply {
    let results = run_ordered(req.items, route_order_key, |item| {
        let router = router.clone();
        async move {
            let span = item_span("Router/RouteMany", &item.traceparent);
            let result = match item.single {
                Some(single) => router.route(single).instrument(span).await,
                None => {
                    router
                        .route_batch(item.batch.unwrap_or_default())
                        .instrument(span)
                        .await
                }
            };
            pb::RouteManyResult {
                result: Some(match result {
                    Ok(reply) => pb::route_many_result::Result::Ok(reply),
                    Err(e) => pb::route_many_result::Result::Error(item_error(e)),
                }),
            }
        }
    })
    .await;
    pb::RouteManyReply { results }
}

/// Server side of `Delivery/DeliverMany`.
pub(crate) async fn deliver_many(
    delivery: Arc<dyn Delivery>,
    req: pb::DeliverManyRequest,
) -> pb::DeliverManyReply {
    let results = run_ordered(
        req.items,
        |item| {
            deliver_order_key(
                item.request
                    .as_ref()
                    .unwrap_or(&pb::DeliverRequest::default()),
            )
        },
        |item| {
            let delivery = delivery.clone();
            async move {
                let span = item_span("Delivery/DeliverMany", &item.traceparent);
                let result = delivery
                    .deliver(item.request.unwrap_or_default())
                    .instrument(span)
                    .await;
                pb::DeliverManyResult {
                    result: Some(match result {
                        Ok(reply) => pb::deliver_many_result::Result::Ok(reply),
                        Err(e) => pb::deliver_many_result::Result::Error(item_error(e)),
                    }),
                }
            }
        },
    )
    .await;
    pb::DeliverManyReply { results }
}

/// Gathers a gateway's route calls (all its connections') into
/// `RouteMany` calls to the router instances in `pool`.
pub(crate) fn router_batches(
    pool: Arc<Pool>,
    limits: BatchLimits,
) -> Arc<Coalescer<pb::RouteManyItem, pb::RouteReply>> {
    let send: BatchSend<pb::RouteManyItem, pb::RouteReply> = Arc::new(move |_peer, items| {
        let pool = pool.clone();
        Box::pin(async move {
            let req = pb::RouteManyRequest { items };
            let reply = pool
                .call(None, |channel| {
                    let req = req.clone();
                    let mut client = RouterGrpc::new(channel)
                        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
                    async move {
                        match client.route_many(req.clone()).await {
                            // A router from before RouteMany (a cluster
                            // being upgraded): the items one by one, in order.
                            Err(status) if status.code() == tonic::Code::Unimplemented => {
                                let mut results = Vec::with_capacity(req.items.len());
                                for item in req.items {
                                    let reply = route_unbatched(&mut client, item).await;
                                    results.push(pb::RouteManyResult {
                                        result: Some(match reply {
                                            Ok(r) => pb::route_many_result::Result::Ok(r),
                                            Err(s) => pb::route_many_result::Result::Error(
                                                item_error(ServiceError::from(s)),
                                            ),
                                        }),
                                    });
                                }
                                Ok(tonic::Response::new(pb::RouteManyReply { results }))
                            }
                            other => other,
                        }
                    }
                })
                .await?;
            Ok(reply
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(pb::route_many_result::Result::Ok(reply)) => Ok(reply),
                    Some(pb::route_many_result::Result::Error(e)) => Err(from_item_error(e)),
                    None => Err(ServiceError::internal("a batch result without an outcome")),
                })
                .collect())
        })
    });
    Coalescer::new(limits, send)
}

/// One route item to a router without `RouteMany`; to one from before
/// `RouteBatch` too, one `Route` per message, in order.
async fn route_unbatched(
    client: &mut RouterGrpc<crate::pool::MeshChannel>,
    item: pb::RouteManyItem,
) -> Result<pb::RouteReply, tonic::Status> {
    if let Some(single) = item.single {
        return client.route(single).await.map(tonic::Response::into_inner);
    }
    let batch = item.batch.unwrap_or_default();
    match client.route_batch(batch.clone()).await {
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            let mut recipients = 0u32;
            let mut repeated = Vec::new();
            let mut inbox_full = Vec::new();
            let mut inbox_full_recipients = Vec::new();
            for (at, envelope) in (0u32..).zip(batch.envelopes) {
                let reply = match client
                    .route(pb::RouteRequest {
                        envelope: Some(envelope),
                    })
                    .await
                {
                    Ok(reply) => reply.into_inner(),
                    // A direct message to a full inbox: refused alone, as
                    // RouteBatch reports it.
                    Err(status)
                        if crate::ServiceError::from(status.clone()).code
                            == crate::ErrorCode::InboxFull =>
                    {
                        inbox_full.push(at);
                        continue;
                    }
                    Err(status) => return Err(status),
                };
                recipients = recipients.saturating_add(reply.recipients);
                if !reply.repeated.is_empty() {
                    repeated.push(at);
                }
                inbox_full_recipients.extend(reply.inbox_full_recipients);
            }
            Ok(pb::RouteReply {
                recipients,
                repeated,
                inbox_full,
                inbox_full_recipients,
            })
        }
        other => other.map(tonic::Response::into_inner),
    }
}

/// A deliver item with the inbox key that picks its owner (the peer the
/// lane sends to).
pub(crate) type KeyedDeliverItem = (Vec<u8>, pb::DeliverManyItem);

/// Gathers deliver calls into `DeliverMany` calls, one lane set per owner
/// of the inboxes (the peer is the owner's id, the first item's key picks it).
pub(crate) fn delivery_batches(
    pool: Arc<Pool>,
    limits: BatchLimits,
) -> Arc<Coalescer<KeyedDeliverItem, pb::DeliverReply>> {
    let send: BatchSend<KeyedDeliverItem, pb::DeliverReply> = Arc::new(move |_peer, items| {
        let pool = pool.clone();
        Box::pin(async move {
            let key = items.first().map(|(k, _)| k.clone()).unwrap_or_default();
            let req = pb::DeliverManyRequest {
                items: items.into_iter().map(|(_, item)| item).collect(),
            };
            let reply = pool
                .call(Some(key.as_slice()), |channel| {
                    let req = req.clone();
                    let mut client = DeliveryGrpc::new(channel)
                        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
                    async move {
                        match client.deliver_many(req.clone()).await {
                            // A delivery process from before DeliverMany:
                            // the items one by one, in order.
                            Err(status) if status.code() == tonic::Code::Unimplemented => {
                                let mut results = Vec::with_capacity(req.items.len());
                                for item in req.items {
                                    let reply =
                                        client.deliver(item.request.unwrap_or_default()).await;
                                    results.push(pb::DeliverManyResult {
                                        result: Some(match reply {
                                            Ok(r) => {
                                                pb::deliver_many_result::Result::Ok(r.into_inner())
                                            }
                                            Err(s) => pb::deliver_many_result::Result::Error(
                                                item_error(ServiceError::from(s)),
                                            ),
                                        }),
                                    });
                                }
                                Ok(tonic::Response::new(pb::DeliverManyReply { results }))
                            }
                            other => other,
                        }
                    }
                })
                .await?;
            Ok(reply
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(pb::deliver_many_result::Result::Ok(reply)) => Ok(reply),
                    Some(pb::deliver_many_result::Result::Error(e)) => Err(from_item_error(e)),
                    None => Err(ServiceError::internal("a batch result without an outcome")),
                })
                .collect())
        })
    });
    Coalescer::new(limits, send)
}

/// The trace context an item carries: the caller's current span's.
pub(crate) fn current_traceparent() -> String {
    switchboard_telemetry::current_traceparent().unwrap_or_default()
}
