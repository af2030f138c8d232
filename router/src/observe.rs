//! FAST messages a gateway delivered itself (sender and recipient connected
//! only there): the gateway reports them afterwards, in batches, so that
//! the router's metrics and traces count every message, routed or not.

use switchboard_mesh::pb;

/// Counts the reported messages (`switchboard_router_messages_total` with
/// `path="same_gateway"`, and the reports the gateway dropped) and records
/// a `router.route` span for each traced one, in its trace.
pub(crate) fn record(domain: &str, req: &pb::ObserveRequest) {
    metrics::counter!("switchboard_router_messages_total", "path" => "same_gateway")
        .increment(req.messages.len() as u64);
    if req.dropped > 0 {
        metrics::counter!("switchboard_router_observations_dropped_total").increment(req.dropped);
    }
    for msg in req.messages.iter().filter(|m| !m.traceparent.is_empty()) {
        let span = tracing::info_span!(
            "router.route",
            message.id = %msg.id,
            message.kind = "DIRECT",
            message.feature = "fast",
            app = %msg.app_id,
            gateway = %req.gateway_id,
            same_gateway = true,
            domain,
        );
        switchboard_telemetry::continue_traceparent(&span, &msg.traceparent);
    }
}
