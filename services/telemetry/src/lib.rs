//! Telemetry of a Switchboard process: logs, OpenTelemetry traces exported
//! over OTLP/gRPC, W3C trace-context propagation helpers, and Prometheus
//! metrics.
//!
//! Tracing is off unless an OTLP endpoint is configured; then every
//! `tracing` span also becomes an OpenTelemetry span, sampled parent-based
//! (a trace is kept or dropped whole). When off, no OpenTelemetry layer is
//! installed and spans cost what `tracing` spans cost.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("trace sampling ratio must be within 0.0..=1.0, not {0}")]
    Sampling(f64),
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

/// What the process tells the tracing backend about itself.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// `http://host:4317`; empty: tracing off.
    pub otlp_endpoint: String,
    /// Fraction of traces kept, decided at the root.
    pub sampling: f64,
    /// `service.name`, e.g. `switchboard-gateway`.
    pub service_name: String,
    /// `service.instance.id`: the node id.
    pub instance_id: String,
    /// The deployment's domain.
    pub domain: String,
}

/// Installed telemetry; [`Telemetry::shutdown`] flushes queued spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs logging to stderr filtered by `log_filter`, plus the
    /// OpenTelemetry layer when an endpoint is set.
    pub fn init(log_filter: &str, traces: &TraceSettings) -> Result<Telemetry, TelemetryError> {
        // The log filter applies to the log only: spans are exported at info
        // level whatever the log shows.
        let filter = tracing_subscriber::EnvFilter::try_new(log_filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter);
        let provider = if traces.otlp_endpoint.is_empty() {
            None
        } else {
            Some(tracer_provider(traces)?)
        };
        // Only the layers in use: an absent layer would count as interested
        // in every span, and spans the log filters out would still be built.
        let mut layers: Vec<Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>> =
            vec![fmt.boxed()];
        if let Some(p) = &provider {
            layers.push(
                // Per-span extras off: source location and thread
                // attributes, and busy/idle timing (a clock read on every
                // poll of an instrumented future).
                tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("switchboard"))
                    .with_location(false)
                    .with_threads(false)
                    .with_tracked_inactivity(false)
                    .with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_targets([("switchboard", tracing::Level::INFO)]),
                    )
                    .boxed(),
            );
        }
        tracing_subscriber::registry()
            .with(layers)
            .try_init()
            .map_err(|_| TelemetryError::AlreadyInstalled)?;
        TRACING_ON.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
        Ok(Telemetry { provider })
    }

    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued (bounded), then stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("trace export did not finish: {e}");
        }
    }
}

fn tracer_provider(traces: &TraceSettings) -> Result<SdkTracerProvider, TelemetryError> {
    if !(0.0..=1.0).contains(&traces.sampling) {
        return Err(TelemetryError::Sampling(traces.sampling));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(traces.otlp_endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: traces.otlp_endpoint.clone(),
            reason: e.to_string(),
        })?;
    // OTEL_BSP_* variables still apply (read by the default config).
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().build())
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(traces.service_name.clone())
        .with_attributes([
            KeyValue::new("service.instance.id", traces.instance_id.clone()),
            KeyValue::new("switchboard.domain", traces.domain.clone()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sampling,
        ))))
        .with_resource(resource)
        .build())
}

/// Whether spans are exported: without it, propagation has nothing to carry
/// and the helpers below return at once.
static TRACING_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn tracing_on() -> bool {
    TRACING_ON.load(std::sync::atomic::Ordering::Relaxed)
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// The W3C headers (`traceparent`, `tracestate`) of the current span, for
/// an outgoing call. Empty when tracing is off or the trace is not sampled.
pub fn current_trace_headers() -> Vec<(&'static str, String)> {
    if !tracing_on() {
        return Vec::new();
    }
    let cx = tracing::Span::current().context();
    let mut out = Headers(Vec::new());
    propagator().inject_context(&cx, &mut out);
    out.0
}

/// The `traceparent` of the current span, if any.
pub fn current_traceparent() -> Option<String> {
    current_trace_headers()
        .into_iter()
        .find(|(k, _)| *k == "traceparent")
        .map(|(_, v)| v)
}

/// Makes `span` continue the trace described by the headers `get` returns
/// (`traceparent`, `tracestate`). Does nothing without a valid traceparent.
pub fn continue_trace(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    if !tracing_on() {
        return;
    }
    let carrier: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| get(k).map(|v| (k.to_owned(), v)))
        .collect();
    let cx = propagator().extract(&carrier);
    if has_remote_parent(&cx) {
        let _ = span.set_parent(cx);
    }
}

/// [`continue_trace`] from a bare `traceparent` value.
pub fn continue_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    continue_trace(span, |k| {
        (k == "traceparent").then(|| traceparent.to_owned())
    });
}

fn has_remote_parent(cx: &Context) -> bool {
    use opentelemetry::trace::TraceContextExt;
    cx.span().span_context().is_valid()
}

struct Headers(Vec<(&'static str, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// Prometheus metrics: one recorder per process, installed on first use.
/// Latency histograms get fixed buckets (seconds).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .map(PrometheusBuilder::build_recorder);
        match recorder {
            Ok(recorder) => {
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!("a metrics recorder was already installed");
                }
                describe();
                let upkeep = handle.clone();
                std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        }
                    })
                    .ok();
                handle
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                PrometheusBuilder::new().build_recorder().handle()
            }
        }
    })
}

/// HELP texts of every Switchboard metric.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "switchboard_connections",
        "Open authenticated client connections."
    );
    describe_gauge!(
        "switchboard_mesh_instances",
        "Instances of each role this process knows from discovery and may call."
    );
    describe_counter!(
        "switchboard_frames_in_total",
        "Client frames received, by type."
    );
    describe_counter!(
        "switchboard_frames_out_total",
        "Frames queued to clients, by type."
    );
    describe_counter!(
        "switchboard_messages_total",
        "Messages accepted from clients, by kind and feature."
    );
    describe_histogram!(
        "switchboard_delivery_latency_seconds",
        Unit::Seconds,
        "From acceptance by the sender's gateway to the write to the recipient's socket."
    );
    describe_histogram!(
        "switchboard_mesh_server_duration_seconds",
        Unit::Seconds,
        "Mesh calls served, by method and status."
    );
    describe_histogram!(
        "switchboard_mesh_client_duration_seconds",
        Unit::Seconds,
        "Mesh calls made (with failover), by callee role and status."
    );
    describe_histogram!(
        "switchboard_store_op_duration_seconds",
        Unit::Seconds,
        "Store operations, by op."
    );
    describe_counter!(
        "switchboard_inbox_appended_total",
        "Messages appended to inboxes."
    );
    describe_counter!(
        "switchboard_inbox_removed_total",
        "Messages removed from inboxes once delivered."
    );
    describe_counter!(
        "switchboard_fast_dropped_total",
        "FAST messages nobody could receive, by reason."
    );
    describe_counter!(
        "switchboard_push_dropped_total",
        "Pushes dropped because a gateway's queue was full."
    );
    describe_counter!(
        "switchboard_refusals_total",
        "Client frames refused with an ERROR, by code."
    );
    describe_counter!(
        "switchboard_deliveries_repeated_total",
        "Deliveries asked for again (a caller's retry after a failover) and answered without storing or pushing twice."
    );
    describe_counter!(
        "switchboard_sends_repeated_total",
        "RELIABLE messages whose client id the sender already had accepted within the id window: not stored or pushed again."
    );
    describe_counter!(
        "switchboard_slow_consumer_disconnects_total",
        "Connections closed because their send queue was full."
    );
    // Present from the first scrape, before any traffic.
    metrics::gauge!("switchboard_connections").set(0.0);
    metrics::counter!("switchboard_inbox_appended_total").increment(0);
    metrics::counter!("switchboard_inbox_removed_total").increment(0);
    metrics::counter!("switchboard_slow_consumer_disconnects_total").increment(0);
}
