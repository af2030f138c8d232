//! The console's counters, read from this process's own Prometheus
//! metrics (the text `/metrics` serves), so the console shows exactly what
//! a scrape would. Rates are left to the page: it samples twice.

use serde::Serialize;

/// A summary of this process's metrics.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    /// Open client connections on this gateway.
    pub connections: f64,
    /// Messages accepted since start, by kind and feature
    /// (`switchboard_messages_total`).
    pub messages: Vec<MessageCount>,
    /// Refused frames and calls since start, by error code.
    pub refusals: Vec<CodeCount>,
    /// Time from a message's acceptance to its write to a recipient's
    /// socket, estimated from the histogram's buckets (seconds).
    pub delivery_latency: Latency,
    /// This domain's federation links as this process sees them.
    pub links: Vec<LinkGauge>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MessageCount {
    pub kind: String,
    pub feature: String,
    pub total: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CodeCount {
    pub code: String,
    pub total: f64,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Latency {
    /// Messages measured.
    pub count: f64,
    /// Upper bound of the bucket holding the median; `null` before any.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkGauge {
    pub peer: String,
    pub up: bool,
    /// Envelopes waiting in the link's outbox.
    pub outbox_depth: f64,
}

/// Summarises a Prometheus text exposition.
pub fn summarise(text: &str) -> NodeStats {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let Ok(scrape) = prometheus_parse::Scrape::parse(lines) else {
        return NodeStats::default();
    };
    let mut stats = NodeStats::default();
    let mut links: std::collections::BTreeMap<String, LinkGauge> = Default::default();
    for s in &scrape.samples {
        let label = |name: &str| s.labels.get(name).unwrap_or_default().to_owned();
        match (s.metric.as_str(), &s.value) {
            ("switchboard_connections", v) => stats.connections += scalar(v),
            ("switchboard_messages_total", v) => stats.messages.push(MessageCount {
                kind: label("kind"),
                feature: label("feature"),
                total: scalar(v),
            }),
            ("switchboard_refusals_total", v) => stats.refusals.push(CodeCount {
                code: label("code"),
                total: scalar(v),
            }),
            (
                "switchboard_delivery_latency_seconds",
                prometheus_parse::Value::Histogram(buckets),
            ) => {
                let mut buckets: Vec<(f64, f64)> =
                    buckets.iter().map(|b| (b.less_than, b.count)).collect();
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                let count = buckets.last().map(|b| b.1).unwrap_or(0.0);
                stats.delivery_latency = Latency {
                    count,
                    p50: quantile(&buckets, count, 0.5),
                    p99: quantile(&buckets, count, 0.99),
                };
            }
            ("switchboard_federation_link_up", v) => {
                let peer = label("peer");
                links
                    .entry(peer.clone())
                    .or_insert_with(|| LinkGauge {
                        peer,
                        up: false,
                        outbox_depth: 0.0,
                    })
                    .up = scalar(v) > 0.0;
            }
            ("switchboard_federation_outbox_depth", v) => {
                let peer = label("peer");
                links
                    .entry(peer.clone())
                    .or_insert_with(|| LinkGauge {
                        peer,
                        up: false,
                        outbox_depth: 0.0,
                    })
                    .outbox_depth = scalar(v);
            }
            _ => {}
        }
    }
    stats.links = links.into_values().collect();
    stats
}

fn scalar(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        _ => 0.0,
    }
}

/// The upper bound of the first cumulative bucket holding `q` of `count`.
fn quantile(buckets: &[(f64, f64)], count: f64, q: f64) -> Option<f64> {
    if count <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * count)
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_counters_histograms_and_links() {
        let text = "\
# TYPE switchboard_connections gauge
switchboard_connections 3
# TYPE switchboard_messages_total counter
switchboard_messages_total{kind=\"direct\",feature=\"RELIABLE\"} 7
# TYPE switchboard_refusals_total counter
switchboard_refusals_total{code=\"FORBIDDEN\"} 2
# TYPE switchboard_delivery_latency_seconds histogram
switchboard_delivery_latency_seconds_bucket{le=\"0.001\"} 50
switchboard_delivery_latency_seconds_bucket{le=\"0.01\"} 99
switchboard_delivery_latency_seconds_bucket{le=\"0.1\"} 100
switchboard_delivery_latency_seconds_bucket{le=\"+Inf\"} 100
switchboard_delivery_latency_seconds_sum 0.2
switchboard_delivery_latency_seconds_count 100
# TYPE switchboard_federation_link_up gauge
switchboard_federation_link_up{peer=\"west\"} 1
# TYPE switchboard_federation_outbox_depth gauge
switchboard_federation_outbox_depth{peer=\"west\"} 4
";
        let s = summarise(text);
        assert_eq!(s.connections, 3.0);
        assert_eq!(s.messages.len(), 1);
        assert_eq!(
            (s.messages[0].kind.as_str(), s.messages[0].total),
            ("direct", 7.0)
        );
        assert_eq!(s.refusals[0].code, "FORBIDDEN");
        assert_eq!(s.delivery_latency.count, 100.0);
        assert_eq!(s.delivery_latency.p50, Some(0.001));
        assert_eq!(s.delivery_latency.p99, Some(0.01));
        assert_eq!(s.links.len(), 1);
        assert!(s.links[0].up);
        assert_eq!(s.links[0].outbox_depth, 4.0);
    }
}
