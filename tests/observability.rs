//! Traces across processes (an OTLP receiver inside the test) and the
//! Prometheus `/metrics` endpoint of a running process.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::json;
use support::cluster::{Cluster, Infra, PROTOCOL_SHAPE};
use support::otlp::{Receiver, Span};
use support::{Client, ProcessNode};

/// The spans of the trace that contains the span named `name` whose
/// `message.id` is `id`.
fn trace_of(spans: &[Span], name: &str, id: &str) -> Vec<Span> {
    let root = spans
        .iter()
        .find(|s| s.name == name && s.attributes.get("message.id").map(String::as_str) == Some(id))
        .unwrap_or_else(|| {
            let names: BTreeSet<_> = spans.iter().map(|s| s.name.as_str()).collect();
            panic!("no {name} span for message {id}; span names seen: {names:?}")
        });
    spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .cloned()
        .collect()
}

/// The names from `span` up to the root, nearest first.
fn ancestry(trace: &[Span], span: &Span) -> Vec<String> {
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut names = Vec::new();
    let mut current = span;
    while let Some(parent) = by_id.get(current.parent_span_id.as_str()) {
        names.push(parent.name.clone());
        current = parent;
    }
    names
}

/// Whether `needles` appear in `haystack` in this order.
fn in_order(haystack: &[String], needles: &[&str]) -> bool {
    let mut it = haystack.iter();
    needles.iter().all(|n| it.any(|h| h == n))
}

/// Waits until the receiver holds spans named `name` (exporters flush at
/// shutdown, but batches may already have arrived).
async fn wait_for(receiver: &Receiver, name: &str, count: usize) {
    for _ in 0..100 {
        if receiver.spans().iter().filter(|s| s.name == name).count() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_trace_follows_a_direct_message_across_processes() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let receiver = Receiver::start().await;
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.otlp_endpoint = receiver.endpoint();
        c.trace_sampling = 1.0;
    })
    .await;
    let mut ann = Client::login_with(&cluster.proc("gw1").url(), "demo-ann", true).await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let id = ann.send_accepted("demo-bob", "traced", "r1").await;
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["id"], id.as_str());

    // A client that brings its own trace: the message joins it.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    ann.send(json!({
        "type": "MESSAGE",
        "data": {"to": "demo-bob", "content": "joined"},
        "feature": "FAST",
        "reference": "r2",
        "traceparent": format!("00-{client_trace}-{client_span}-01"),
    }))
    .await;
    let joined = bob.recv_type("MESSAGE").await;
    let joined_id = joined["data"]["id"].as_str().expect("id").to_owned();
    cluster.shutdown().await; // every process flushes its spans
    wait_for(&receiver, "gateway.push", 2).await;

    let spans = receiver.spans();
    let trace = trace_of(&spans, "gateway.receive", &id);
    let push = trace
        .iter()
        .find(|s| s.name == "gateway.push")
        .unwrap_or_else(|| panic!("no gateway.push in the trace: {trace:#?}"));
    let chain = ancestry(&trace, push);
    assert!(
        in_order(
            &chain,
            &["delivery.deliver", "router.route", "gateway.receive"]
        ),
        "gateway.push ← delivery.deliver ← router.route ← gateway.receive, got {chain:?}"
    );
    for name in [
        "gateway.receive",
        "router.route",
        "delivery.deliver",
        "gateway.push",
    ] {
        let span = trace
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            span.attributes.get("message.id"),
            Some(&id),
            "{name} carries the message id"
        );
    }
    let processes: BTreeSet<&str> = trace.iter().map(|s| s.instance.as_str()).collect();
    assert!(
        processes.len() >= 3,
        "spans from at least three processes: {processes:?}"
    );
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert!(services.contains("switchboard-gateway"), "{services:?}");
    assert!(services.contains("switchboard-delivery"), "{services:?}");

    let receive = spans
        .iter()
        .find(|s| {
            s.name == "gateway.receive"
                && s.attributes.get("message.id").map(String::as_str) == Some(joined_id.as_str())
        })
        .expect("gateway.receive of the joined message");
    assert_eq!(receive.trace_id, client_trace);
    assert_eq!(receive.parent_span_id, client_span);
}

#[tokio::test]
async fn a_group_message_is_one_trace_with_a_push_per_recipient_gateway() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let receiver = Receiver::start().await;
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.otlp_endpoint = receiver.endpoint();
    })
    .await;
    let mut ann = Client::login_with(&cluster.proc("gw1").url(), "demo-ann", true).await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let mut cat = Client::login(&cluster.proc("gw1").url(), "demo-cat").await;
    ann.send(json!({"type":"GROUP_MESSAGE","data":{"to":["demo-bob","demo-cat"],"content":"hi"},"feature":"RELIABLE","reference":"g1"}))
        .await;
    let accepted = ann.recv_type("MESSAGE_ACCEPTED").await;
    let id = accepted["data"]["id"].as_str().expect("id").to_owned();
    for c in [&mut bob, &mut cat] {
        assert_eq!(c.recv_type("MESSAGE").await["data"]["id"], id.as_str());
    }
    cluster.shutdown().await;
    wait_for(&receiver, "gateway.push", 2).await;

    let trace = trace_of(&receiver.spans(), "gateway.receive", &id);
    assert!(
        trace.iter().any(|s| s.name == "groups.fanout"),
        "{trace:#?}"
    );
    let pushes: Vec<&Span> = trace
        .iter()
        .filter(|s| s.name == "gateway.push" && s.attributes.get("message.id") == Some(&id))
        .collect();
    let gateways: BTreeSet<&str> = pushes.iter().map(|s| s.instance.as_str()).collect();
    assert_eq!(
        gateways.len(),
        2,
        "a push span on each recipient gateway: {pushes:#?}"
    );
    for push in pushes {
        assert!(
            in_order(
                &ancestry(&trace, push),
                &[
                    "delivery.deliver",
                    "groups.fanout",
                    "router.route",
                    "gateway.receive"
                ]
            ),
            "{:?}",
            ancestry(&trace, push)
        );
    }
}

#[tokio::test]
async fn topic_and_room_fanouts_are_spans_with_their_size() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let receiver = Receiver::start().await;
    let cluster = Cluster::start(infra, PROTOCOL_SHAPE, |c| {
        c.otlp_endpoint = receiver.endpoint();
    })
    .await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    for c in [&mut ann, &mut bob] {
        c.send(json!({"type":"SUBSCRIBE","data":{"topic":"t"}}))
            .await;
        c.recv_type("SUBSCRIBED").await;
        c.send(json!({"type":"ROOM_JOIN","data":{"room":"r"}}))
            .await;
        c.recv_type("ROOM_JOINED").await;
    }
    ann.send(json!({"type":"PUBLISH","data":{"topic":"t","content":"x"}}))
        .await;
    let publication = ann.recv_type("PUBLICATION").await;
    let publication_id = publication["data"]["id"].as_str().expect("id").to_owned();
    ann.send(json!({"type":"ROOM_MESSAGE","data":{"room":"r","content":"y"}}))
        .await;
    let message = bob.recv_type("ROOM_MESSAGE").await;
    let message_id = message["data"]["id"].as_str().expect("id").to_owned();
    cluster.shutdown().await;
    wait_for(&receiver, "groups.fanout", 2).await;
    let spans = receiver.spans();
    for (id, kind) in [(&publication_id, "topic"), (&message_id, "room")] {
        let fanout = trace_of(&spans, "groups.fanout", id)
            .into_iter()
            .find(|s| s.name == "groups.fanout")
            .expect("a fan-out span");
        assert_eq!(
            fanout.attributes.get("channel.kind").map(String::as_str),
            Some(kind)
        );
        // One push per gateway with subscribers or members: both.
        assert_eq!(
            fanout.attributes.get("fanout.size").map(String::as_str),
            Some("2"),
            "{fanout:#?}"
        );
    }
}

/// One sample of a metric with exactly these labels (0 when absent).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let (status, head, body) = support::http_get_text(addr, "/metrics")
        .await
        .expect("HTTP response");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text exposition")
}

#[tokio::test]
async fn metrics_count_exactly_the_messages_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start(dir.path()).await;
    let before = scrape(node.client_addr).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    for i in 0..5 {
        ann.message("demo-bob", &format!("f{i}"), "FAST", "").await;
        bob.recv_type("MESSAGE").await;
    }
    for i in 0..3 {
        ann.send_accepted("demo-bob", &format!("r{i}"), &format!("r{i}"))
            .await;
        bob.recv_type("MESSAGE").await;
    }
    // FAST to nobody: counted as dropped.
    ann.message("demo-nobody", "lost", "FAST", "").await;
    // A refused frame.
    ann.send(json!({"type":"MESSAGE","data":{"to":"demo-bob"}}))
        .await;
    ann.recv_type("ERROR").await;
    // Delivered reports (and the sender confirmations they store) are
    // asynchronous: wait until the three confirmations are counted.
    let mut after = scrape(node.client_addr).await;
    for _ in 0..50 {
        let appended = sample(&after, "switchboard_inbox_appended_total", &[])
            - sample(&before, "switchboard_inbox_appended_total", &[]);
        if appended >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(node.client_addr).await;
    }

    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(
        delta(
            "switchboard_messages_total",
            &[("kind", "direct"), ("feature", "fast")]
        ),
        6.0
    );
    assert_eq!(
        delta(
            "switchboard_messages_total",
            &[("kind", "direct"), ("feature", "reliable")]
        ),
        3.0
    );
    // 9 valid MESSAGE frames and the refused one.
    assert_eq!(
        delta("switchboard_frames_in_total", &[("type", "MESSAGE")]),
        10.0
    );
    assert_eq!(
        delta("switchboard_frames_in_total", &[("type", "AUTH_CLIENT")]),
        2.0
    );
    assert_eq!(
        delta(
            "switchboard_frames_out_total",
            &[("type", "MESSAGE_ACCEPTED")]
        ),
        3.0
    );
    assert_eq!(
        delta("switchboard_frames_out_total", &[("type", "ERROR")]),
        1.0
    );
    assert_eq!(
        delta("switchboard_refusals_total", &[("code", "INVALID_FRAME")]),
        1.0
    );
    // The FAST message to nobody, and the two USER_CONNECTED events for the
    // master user demo-0, who is offline.
    assert_eq!(
        delta("switchboard_fast_dropped_total", &[("reason", "offline")]),
        3.0
    );
    // Three RELIABLE messages and their three sender confirmations.
    assert_eq!(delta("switchboard_inbox_appended_total", &[]), 6.0);
    assert_eq!(sample(&after, "switchboard_connections", &[]), 2.0);
    // Histograms: every pushed message was timed end to end.
    assert!(
        delta("switchboard_delivery_latency_seconds_count", &[]) >= 8.0,
        "{:?}",
        after
            .samples
            .iter()
            .filter(|s| s.metric.starts_with("switchboard_delivery"))
            .collect::<Vec<_>>()
    );
    assert!(
        sample(
            &after,
            "switchboard_store_op_duration_seconds_count",
            &[("op", "append")]
        ) >= 3.0
    );
    // The inbox log: one segment at least, and nothing spilled at this size.
    assert!(sample(&after, "switchboard_store_log_segments", &[]) >= 1.0);
    assert_eq!(delta("switchboard_store_spilled_total", &[]), 0.0);
}

// Multi-threaded: the node's exporter flushes into the receiver while this
// test waits for the node to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_configured_domain() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = receiver.endpoint();
    let mut node = ProcessNode::start_with_env(
        dir.path(),
        &[
            ("SWITCHBOARD_OTLP_ENDPOINT", endpoint.as_str()),
            ("SWITCHBOARD_DOMAIN", "eu-1"),
        ],
    )
    .await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    ann.message("demo-bob", "hello", "FAST", "r1").await;
    let id = bob.recv_type("MESSAGE").await["data"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(node.terminate().success(), "clean stop");
    wait_for(&receiver, "router.route", 1).await;
    let trace = trace_of(&receiver.spans(), "gateway.receive", &id);
    for name in ["gateway.receive", "router.route"] {
        let span = trace
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} missing: {trace:#?}"));
        assert_eq!(
            span.attributes.get("domain").map(String::as_str),
            Some("eu-1"),
            "{name}"
        );
    }
}
