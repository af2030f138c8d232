//! The binary on the ScyllaDB engine, where no ScyllaDB runs: a start that
//! cannot reach the configured nodes, or is given settings the engine
//! cannot use, fails with a message naming them. (The engine's contract
//! suites run in switchboard-store against `SWITCHBOARD_TEST_SCYLLA`.)

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Runs `switchboard run` with `env` until it exits; its status and stderr.
fn run_until_exit(env: &[(&str, String)]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr");
    let stderr = std::fs::File::create(&log).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "run",
            "--client-addr",
            "127.0.0.1:0",
            "--mesh-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn switchboard");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return (status, std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "switchboard kept running: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn an_unreachable_cluster_fails_the_start_naming_its_nodes() {
    let (one, two) = (closed_port(), closed_port());
    let url = format!("127.0.0.1:{one},127.0.0.1:{two}");
    let (status, stderr) = run_until_exit(&[
        ("SWITCHBOARD_STORE__ENGINE", "scylla".into()),
        ("SWITCHBOARD_STORE__URL", url.clone()),
    ]);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains(&format!("cannot connect to ScyllaDB at {url}")),
        "{stderr}"
    );
}

#[test]
fn settings_the_engine_cannot_use_fail_the_start_naming_them() {
    let node = format!("127.0.0.1:{}", closed_port());
    for (key, value, named) in [
        (
            "SWITCHBOARD_STORE__CONSISTENCY",
            "serial",
            "store.consistency \"serial\"",
        ),
        (
            "SWITCHBOARD_STORE__KEYSPACE",
            "chat-prod",
            "store.keyspace \"chat-prod\"",
        ),
        (
            "SWITCHBOARD_STORE__URL",
            "scylla-1",
            "store.url: \"scylla-1\" is not host:port",
        ),
    ] {
        let mut env = vec![
            ("SWITCHBOARD_STORE__ENGINE", "scylla".to_owned()),
            ("SWITCHBOARD_STORE__URL", node.clone()),
        ];
        env.push((key, value.to_owned()));
        let (status, stderr) = run_until_exit(&env);
        assert!(!status.success(), "{key}={value}: exit status {status}");
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
}
