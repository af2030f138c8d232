//! The same-gateway FAST shortcut in a multi-process cluster: FAST messages
//! between users connected only to one gateway are delivered by it, the
//! router still counts them, and every rule of the routed path holds
//! (every device of the recipient, MESSAGE_SENT copies, per-sender order).

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::cluster::{Cluster, Infra};
use support::{Client, free_port};
use switchboard_presence::{Presence, RedisPresence};

const DEADLINE: Duration = Duration::from_secs(30);

/// Two gateways, delivery, and router + groups + auth in `core`, which has
/// a `/metrics` listener of its own.
async fn start(infra: Infra) -> Cluster {
    let mut cluster = Cluster::start(infra, &[], |c| {
        c.limits.messages_per_second = 100_000;
        c.limits.max_refusals = 100_000;
    })
    .await;
    cluster.add("gw1", "gateway", |_| {});
    cluster.add("gw2", "gateway", |_| {});
    cluster.add("delivery", "delivery", |_| {});
    cluster.add("core", "router,groups,auth", |c| {
        c.metrics_addr = format!("127.0.0.1:{}", free_port());
    });
    cluster.wait_ready().await;
    cluster
}

/// Waits until presence lists `user` on exactly `gateways` (node id,
/// connections), sorted.
async fn wait_presence(cluster: &Cluster, user: &str, gateways: &[(&str, u32)]) {
    let presence = RedisPresence::connect(
        &cluster.infra.redis,
        &cluster.redis_prefix,
        Duration::from_secs(2),
    )
    .await
    .expect("redis");
    let mut want: Vec<(String, u32)> = gateways
        .iter()
        .map(|(gw, n)| (cluster.proc(gw).node_id().to_owned(), *n))
        .collect();
    want.sort();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut got = presence.gateways("demo", user).await.expect("presence");
        got.sort();
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {user}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of the samples of `name` whose labels contain `label`.
async fn metric(addr: SocketAddr, name: &str, label: &str) -> f64 {
    let (status, _, text) = support::http_get_text(addr, "/metrics")
        .await
        .expect("metrics answer");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Direct messages the router was asked to route (any of its calls).
async fn routed_calls(addr: SocketAddr) -> f64 {
    metric(
        addr,
        "switchboard_mesh_server_duration_seconds_count",
        "method=\"Router/Route",
    )
    .await
}

fn fast(to: &str, content: String) -> Value {
    json!({"type": "MESSAGE", "data": {"to": to, "content": content}, "feature": "FAST"})
}

/// The next `n` frames of `kind` are `prefix0 .. prefix<n-1>`, in order.
async fn expect_in_order(client: &mut Client, kind: &str, prefix: &str, n: usize) {
    for i in 0..n {
        let f = client.recv_type(kind).await;
        assert_eq!(
            f["data"]["content"],
            format!("{prefix}{i}"),
            "{kind} {i} of {n} out of order: {f}"
        );
    }
}

#[tokio::test]
async fn fast_messages_on_one_gateway_stay_there_and_the_router_counts_them() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = start(infra).await;
    let router = cluster
        .proc("core")
        .metrics_addr()
        .expect("metrics listener");
    let gw1 = cluster.proc("gw1").url();
    let mut ann = Client::login(&gw1, "demo-ann").await;
    let mut bob = Client::login(&gw1, "demo-bob").await;
    wait_presence(&cluster, "demo-ann", &[("gw1", 1)]).await;
    wait_presence(&cluster, "demo-bob", &[("gw1", 1)]).await;
    let routed_before = routed_calls(router).await;

    // One at a time, then in bursts the gateway reads (and routes) together.
    const SINGLE: usize = 20;
    for i in 0..SINGLE {
        ann.send(fast("demo-bob", format!("a{i}"))).await;
    }
    expect_in_order(&mut bob, "MESSAGE", "a", SINGLE).await;
    const BURSTS: usize = 4;
    const PER_BURST: usize = 50;
    for b in 0..BURSTS {
        let frames: Vec<Value> = (0..PER_BURST)
            .map(|i| fast("demo-bob", format!("b{}", b * PER_BURST + i)))
            .collect();
        ann.send_burst(&frames).await;
    }
    expect_in_order(&mut bob, "MESSAGE", "b", BURSTS * PER_BURST).await;
    // bob answers: the other direction too.
    bob.send(fast("demo-ann", "c0".into())).await;
    expect_in_order(&mut ann, "MESSAGE", "c", 1).await;

    // The router counts them, reported after the fact; none was routed.
    let sent = (SINGLE + BURSTS * PER_BURST + 1) as f64;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let counted = metric(
            router,
            "switchboard_router_messages_total",
            "path=\"same_gateway\"",
        )
        .await;
        if counted == sent {
            break;
        }
        assert!(counted < sent, "the router counted {counted} of {sent}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router counted {counted} of {sent} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        routed_calls(router).await,
        routed_before,
        "no route call for messages delivered on their gateway"
    );

    // Without the router (and auth), they still flow between them.
    cluster.kill9("core");
    for i in 0..SINGLE {
        ann.send(fast("demo-bob", format!("d{i}"))).await;
    }
    expect_in_order(&mut bob, "MESSAGE", "d", SINGLE).await;
    bob.send(fast("demo-ann", "e0".into())).await;
    expect_in_order(&mut ann, "MESSAGE", "e", 1).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn every_device_gets_every_message_in_order_wherever_it_is() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let cluster = start(infra).await;
    let gw1 = cluster.proc("gw1").url();
    let gw2 = cluster.proc("gw2").url();
    let mut ann1 = Client::login(&gw1, "demo-ann").await;
    let mut ann2 = Client::login(&gw1, "demo-ann").await;
    let mut bob1 = Client::login(&gw1, "demo-bob").await;
    let mut bob2 = Client::login(&gw2, "demo-bob").await;
    let mut carol = Client::login(&gw1, "demo-carol").await;
    let mut dave = Client::login(&gw1, "demo-dave").await;
    wait_presence(&cluster, "demo-ann", &[("gw1", 2)]).await;
    wait_presence(&cluster, "demo-bob", &[("gw1", 1), ("gw2", 1)]).await;
    wait_presence(&cluster, "demo-carol", &[("gw1", 1)]).await;
    wait_presence(&cluster, "demo-dave", &[("gw1", 1)]).await;

    // bob has a device on each gateway: both get everything, in order, and
    // ann's other device sees each as MESSAGE_SENT.
    const N: usize = 100;
    let frames: Vec<Value> = (0..N).map(|i| fast("demo-bob", format!("b{i}"))).collect();
    ann1.send_burst(&frames[..N / 2]).await;
    for f in &frames[N / 2..] {
        ann1.send(f.clone()).await;
    }
    expect_in_order(&mut bob1, "MESSAGE", "b", N).await;
    expect_in_order(&mut bob2, "MESSAGE", "b", N).await;
    expect_in_order(&mut ann2, "MESSAGE_SENT", "b", N).await;

    // carol is only here, like both of ann's devices: ann's other device
    // still sees each message as MESSAGE_SENT.
    let frames: Vec<Value> = (0..N)
        .map(|i| fast("demo-carol", format!("c{i}")))
        .collect();
    ann1.send_burst(&frames).await;
    expect_in_order(&mut carol, "MESSAGE", "c", N).await;
    expect_in_order(&mut ann2, "MESSAGE_SENT", "c", N).await;

    // RELIABLE and FAST interleaved, one frame at a time: dave gets them in
    // the order sent, whichever path each took.
    for i in 0..N {
        let feature = if i % 3 == 0 { "RELIABLE" } else { "FAST" };
        ann1.message("demo-dave", &format!("d{i}"), feature, &format!("r{i}"))
            .await;
    }
    expect_in_order(&mut dave, "MESSAGE", "d", N).await;
    expect_in_order(&mut ann2, "MESSAGE_SENT", "d", N).await;
    // Nothing more for anyone.
    bob1.expect_silence(Duration::from_millis(300)).await;
    bob2.expect_silence(Duration::from_millis(300)).await;
    cluster.shutdown().await;
}
