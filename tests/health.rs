//! `/healthz` and `/readyz` over HTTP, with a real Redis that goes away and
//! comes back.

#[path = "support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{TestNode, free_port};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    support::http_get(addr, path).await.expect("HTTP answer")
}

struct Redis(Child);

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        Redis(child)
    }

    async fn wait_ready(port: u16) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not listen on {port}");
    }

    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have_redis_server() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is not installed (CI=true): run scripts/test.sh");
        }
        eprintln!("skipped: redis-server is not installed (scripts/test.sh installs it)");
    }
    found
}

#[tokio::test]
async fn healthz_and_readyz_without_redis() {
    let node = TestNode::start().await;
    let (status, body) = get(node.client_addr, "/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = get(node.client_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["store"], "ok");
    assert_eq!(body["checks"]["presence"], "ok");
    node.shutdown().await;
}

#[tokio::test]
async fn readyz_follows_redis_down_and_back() {
    if !have_redis_server() {
        return;
    }
    let port = free_port();
    let redis = Redis::start(port);
    Redis::wait_ready(port).await;
    let node = TestNode::start_with(
        |c| c.redis = format!("redis://127.0.0.1:{port}"),
        Default::default(),
    )
    .await;
    let (status, body) = get(node.client_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    redis.stop();
    let (status, body) = get(node.client_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_ne!(body["checks"]["presence"], "ok", "{body}");
    assert_eq!(body["checks"]["store"], "ok");
    // The process itself is alive.
    assert_eq!(get(node.client_addr, "/healthz").await.0, 200);

    let _redis = Redis::start(port);
    Redis::wait_ready(port).await;
    let mut last = Value::Null;
    for _ in 0..50 {
        let (status, body) = get(node.client_addr, "/readyz").await;
        if status == 200 {
            node.shutdown().await;
            return;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not ready again after Redis came back: {last}");
}
