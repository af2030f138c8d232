//! A short end-to-end run of the load generator against an in-process node:
//! checks the accounting (everything sent arrives once), not the speed.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use clap::Parser;
use support::TestNode;
use switchboard_bench::{BenchArgs, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(url: &str, extra: &[&str]) -> BenchArgs {
    let mut argv = vec![
        "bench",
        "--url",
        url,
        "-n",
        "20",
        "-p",
        "200",
        "--warmup",
        "300ms",
        "--duration",
        "1s",
        "--rate-steps",
        "50,20",
    ];
    argv.extend_from_slice(extra);
    Cli::parse_from(argv).args
}

#[tokio::test]
async fn pair_mode_reliable_loses_nothing() {
    let node = TestNode::start().await;
    let report = run(
        args(&node.url(), &["--mode", "pair", "--feature", "reliable"]),
        false,
    )
    .await
    .expect("bench run");
    assert_eq!(report.steps.len(), 2);
    for step in &report.steps {
        assert!(step.sent >= 20 * 15, "{step:?}");
        assert_eq!(step.received, step.sent, "{step:?}");
        assert_eq!(step.lost, 0);
        assert_eq!(step.duplicates, 0);
        assert!(step.p50_ms > 0.0 && step.p50_ms <= step.p99_ms && step.p99_ms <= step.max_ms);
    }
    assert_eq!(report.server_errors, 0);
    assert!(
        report.server_closes.is_empty(),
        "the run's own closing is not a server close: {:?}",
        report.server_closes
    );
    node.shutdown().await;
}

#[tokio::test]
async fn connections_the_server_closes_are_reported_with_their_reason() {
    // A node of its own process: its gauges count only this test's
    // connections (the tests of this binary share one metrics recorder).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = support::ProcessNode::start(dir.path()).await;
    // One step long enough to be running whenever the server stops.
    let mut bench = args(&node.url(), &["--mode", "pair", "--feature", "fast"]);
    bench.rate_steps = vec![20.0];
    bench.duration = Duration::from_secs(10);
    bench.drain = Duration::from_secs(1);
    let running = tokio::spawn(run(bench, false));
    // Stop the server once all 20 are connected and signed in (under load
    // that took more than a second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = support::http_get_text(node.client_addr, "/metrics")
            .await
            .map(|(_, _, body)| body)
            .unwrap_or_default();
        if metrics.lines().any(|l| l == "switchboard_connections 20") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the 20 bench connections never signed in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.terminate().success(), "a clean stop");
    let report = running.await.expect("bench task").expect("bench run");
    assert_eq!(
        report.server_closes.get("1001 server shutting down"),
        Some(&20),
        "{:?}",
        report.server_closes
    );
}

#[tokio::test]
async fn self_mode_fast_across_two_servers() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let mut bench = args(&a.url(), &["--mode", "self", "--feature", "fast"]);
    bench.urls.push(b.url());
    bench.drain = Duration::from_secs(2);
    let report = run(bench, false).await.expect("bench run");
    for step in &report.steps {
        assert_eq!(step.received, step.sent, "{step:?}");
        assert_eq!(step.lost, 0);
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn refuses_what_cannot_fit_the_file_limit() {
    let node = TestNode::start().await;
    let mut bench = args(&node.url(), &[]);
    bench.connections = 10_000_000;
    let err = run(bench, false).await.expect_err("too many connections");
    assert!(err.to_string().contains("open files"), "{err}");
    node.shutdown().await;
}
