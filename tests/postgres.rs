//! The PostgreSQL store engine in the real binary: start-up against a bad
//! address or credential, and messages kept across a kill -9.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::postgres::{fresh_database, server};
use support::{Client, ProcessNode, free_port};

/// Runs `switchboard run` with a PostgreSQL store at `url`, expecting it to
/// exit by itself; its stderr.
async fn refused_start(url: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "run",
            "--client-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--mesh-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD_STORE__ENGINE", "postgres")
        .env("SWITCHBOARD_STORE__URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard kept running against {url}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(!status.success(), "{stderr}");
    stderr
}

#[tokio::test]
async fn a_wrong_address_fails_the_start_naming_it() {
    // Nothing listens there (bound and released).
    let port = free_port();
    let stderr = refused_start(&format!("postgres://sb:secret-pw@127.0.0.1:{port}/sb")).await;
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}/sb")),
        "names the address: {stderr}"
    );
    assert!(
        !stderr.contains("secret-pw"),
        "never the password: {stderr}"
    );
}

#[tokio::test]
async fn a_wrong_credential_fails_the_start_naming_it() {
    let Some(server) = server() else {
        return;
    };
    let url = fresh_database(&server).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host_and_db = rest.split_once('@').map_or(rest, |(_, r)| r);
    let stderr = refused_start(&format!("{scheme}://no-such-role@{host_and_db}")).await;
    assert!(stderr.contains(host_and_db), "names the address: {stderr}");
    assert!(
        stderr.contains("no-such-role"),
        "says what the server refused: {stderr}"
    );
}

#[tokio::test]
async fn stored_messages_survive_a_kill_9_on_postgres() {
    let Some(server) = server() else {
        return;
    };
    let url = fresh_database(&server).await;
    let env = [
        ("SWITCHBOARD_STORE__ENGINE", "postgres"),
        ("SWITCHBOARD_STORE__URL", url.as_str()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ProcessNode::start_with_env(dir.path(), &env).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    for i in 0..20 {
        ann.send_accepted("demo-bob", &format!("m{i}"), &format!("r{i}"))
            .await;
    }
    node.kill9();
    // Another data dir: nothing of the inboxes is kept in the process's.
    let other = tempfile::tempdir().expect("tempdir");
    let node = ProcessNode::start_with_env(other.path(), &env).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(7).await;
    let contents: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .filter_map(|f| f["data"]["content"].as_str())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, want, "every accepted message, in order");
}
