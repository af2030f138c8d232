//! Crash safety of the real binary: kill -9 and restart on the same data dir.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;

use support::{Client, ProcessNode, close_code};

#[tokio::test]
async fn accepted_messages_survive_kill_9_fjall() {
    accepted_messages_survive_kill_9("fjall").await;
}

async fn accepted_messages_survive_kill_9(engine: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    // The sends below are pipelined, faster than the default rate limit.
    let env = [
        ("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "100000"),
        ("SWITCHBOARD_STORE__ENGINE", engine),
    ];
    let mut node = ProcessNode::start_with_env(dir.path(), &env).await;

    // Pipeline the sends, then count the acceptances.
    const N: usize = 1000;
    let sender = tokio::spawn({
        let url = node.url();
        async move {
            let mut pipe = Client::login_with(&url, "demo-ann", true).await;
            for i in 0..N {
                pipe.message(
                    "demo-bob",
                    &format!("crash-{i}"),
                    "RELIABLE",
                    &format!("c{i}"),
                )
                .await;
            }
            let mut accepted = HashSet::new();
            while accepted.len() < N {
                let f = pipe.recv_type("MESSAGE_ACCEPTED").await;
                accepted.insert(f["data"]["id"].as_str().expect("id").to_owned());
            }
            accepted
        }
    });
    let accepted = sender.await.expect("sender");
    assert_eq!(accepted.len(), N);
    // Right after the last acceptance: no graceful anything.
    node.kill9();

    let node = ProcessNode::start_with_env(dir.path(), &env).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, lefts) = bob.fetch_all(300).await;
    assert_eq!(lefts.last(), Some(&0));
    let fetched: HashSet<String> = frames
        .iter()
        .map(|f| f["data"]["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        fetched.len(),
        N,
        "every accepted message is fetched after the crash"
    );
    assert_eq!(fetched, accepted);
    // In order of sending.
    let contents: Vec<String> = frames
        .iter()
        .map(|f| f["data"]["content"].as_str().expect("content").to_owned())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| format!("crash-{i}")).collect();
    assert_eq!(contents, expected);
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ProcessNode::start(dir.path()).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.send_accepted("demo-bob", "before stop", "s1").await;
    let pid = node.child.id();
    let status = tokio::task::spawn_blocking(move || {
        let s = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        s.map(|s| s.success())
    });
    let closed = ann.closed().await;
    assert_eq!(close_code(&closed), Some(1001), "{closed:?}");
    assert!(status.await.expect("kill").expect("kill ran"));
    let exit = node.child.wait().expect("wait");
    assert!(exit.success(), "switchboard exited with {exit}");

    // The message stored before the stop is still there.
    let node = ProcessNode::start(dir.path()).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, _) = bob.fetch_all(10).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["data"]["content"], "before stop");
}

/// A child process killed (SIGKILL) when dropped, also when a test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `text` without ANSI colour sequences (the log is coloured).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts the binary on `data_dir` with extra arguments, stderr to a file;
/// returns the child and its client address once it serves (its port is
/// bound before the store opens: /healthz answers after), or its exit
/// status and stderr if it exits first.
async fn start_or_exit(
    data_dir: &std::path::Path,
    extra: &[&str],
) -> Result<(Killed, std::net::SocketAddr, std::path::PathBuf), (std::process::ExitStatus, String)>
{
    let client = format!("127.0.0.1:{}", support::free_port());
    let mesh = format!("127.0.0.1:{}", support::free_port());
    let log = data_dir.with_extension(format!("{}.stderr", support::free_port()));
    let stderr = std::fs::File::create(&log).expect("stderr file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "run",
            "--client-addr",
            &client,
            "--mesh-addr",
            &mesh,
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "100000")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn switchboard");
    let addr: std::net::SocketAddr = client.parse().expect("addr");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err((status, std::fs::read_to_string(&log).unwrap_or_default()));
        }
        if let Some((200, _, _)) = support::http_get_text(addr, "/healthz").await {
            return Ok((Killed(child), addr, log));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("switchboard neither listened nor exited");
}

#[tokio::test]
async fn a_damaged_store_refuses_to_start_and_store_recover_keeps_every_intact_message() {
    // The case of issue 14: 2,000 accepted messages, kill -9, one flipped
    // byte in the middle of the live log.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let env = [("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "100000")];
    let mut node = ProcessNode::start_with_env(&data, &env).await;
    const N: usize = 2000;
    let body = "p".repeat(200);
    let mut pipe = Client::login_with(&node.url(), "demo-ann", true).await;
    for i in 0..N {
        pipe.message(
            "demo-bob",
            &format!("{i:05}{body}"),
            "RELIABLE",
            &format!("d{i}"),
        )
        .await;
    }
    let mut accepted = HashSet::new();
    while accepted.len() < N {
        let f = pipe.recv_type("MESSAGE_ACCEPTED").await;
        accepted.insert(f["data"]["id"].as_str().expect("id").to_owned());
    }
    node.kill9();

    // The live segment: the newest log file with frames; they end where
    // its preallocated zeros begin.
    let log_dir = data.join("inbox.log");
    let mut segments: Vec<_> = std::fs::read_dir(&log_dir)
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let (live, mut bytes) = segments
        .iter()
        .rev()
        .find_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            bytes.iter().any(|&b| b != 0).then(|| (p.clone(), bytes))
        })
        .expect("a segment with frames");
    let end = bytes.iter().rposition(|&b| b != 0).expect("frames") + 1;
    let flip = end / 2;
    bytes[flip] ^= 0x20;
    std::fs::write(&live, &bytes).expect("flip a byte");

    let (status, stderr) = match start_or_exit(&data, &[]).await {
        Err(exited) => exited,
        Ok(_running) => {
            panic!("a damaged store was opened ({live:?}, byte {flip} of {end})");
        }
    };
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains(&live.display().to_string()), "{stderr}");
    assert!(stderr.contains("at byte"), "{stderr}");
    assert!(stderr.contains("--store-recover"), "{stderr}");
    assert!(
        stderr.contains("--store-recover keeps every intact record"),
        "{stderr}"
    );

    let Ok((_node, addr, log)) = start_or_exit(&data, &["--store-recover"]).await else {
        panic!("--store-recover did not start");
    };
    let url = format!("ws://{addr}/ws");
    let mut bob = Client::login(&url, "demo-bob").await;
    let (frames, lefts) = bob.fetch_all(500).await;
    assert_eq!(lefts.last(), Some(&0));
    let mut highest = 0;
    let mut fetched = HashSet::new();
    for f in &frames {
        let id = f["data"]["id"].as_str().expect("id").to_owned();
        assert!(accepted.contains(&id), "an unknown message {f}");
        let content = f["data"]["content"].as_str().expect("content");
        assert!(content.ends_with(&body), "content intact: {content}");
        highest = highest.max(f["data"]["seq"].as_u64().expect("seq"));
        fetched.insert(id);
    }
    let lost = N - fetched.len();
    assert!(lost > 0 && lost < N / 4, "{lost} of {N} lost");
    let stderr = without_colours(&std::fs::read_to_string(&log).expect("stderr"));
    assert!(
        stderr.contains("ERROR") && stderr.contains(&live.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("offset="), "{stderr}");
    // When the damaged frame's records still parse (the flip hit a message,
    // not the frame's structure), the log counts exactly what was lost.
    let at = stderr.find("messages=").expect("the loss is counted") + 9;
    if !stderr[at..].starts_with("\"unknown\"") {
        let n: String = stderr[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert_eq!(n.parse::<usize>().ok(), Some(lost), "{stderr}");
    }
    // Bob's inbox held 1..=N: the next message is numbered above them all.
    pipe.close().await;
    let mut ann = Client::login_with(&url, "demo-ann", true).await;
    ann.send_accepted("demo-bob", "after the recovery", "r-after")
        .await;
    let pushed = bob.recv_type("MESSAGE").await;
    assert_eq!(pushed["data"]["content"], "after the recovery");
    let seq = pushed["data"]["seq"].as_u64().expect("seq");
    assert!(seq > N as u64 && seq > highest, "seq {seq} reused");
}

/// A delivery process that dies between storing a message and replying (the
/// failpoint aborts it as a kill -9 would): the sender's resend of the same
/// client id after the restart is answered as a repeat, and the recipient's
/// inbox holds the message once.
#[tokio::test]
async fn a_resend_after_a_crash_between_store_and_reply_is_stored_once() {
    use switchboard_mesh::{DeliveryClient, RouterClient, pb};

    let dir = tempfile::tempdir().expect("tempdir");
    // The test calls the roles over the mesh, which all-in-one opens only
    // when asked.
    let open_mesh = [
        ("SWITCHBOARD_MESH_LISTEN", "true"),
        ("SWITCHBOARD_INSECURE_MESH", "true"),
    ];
    let mut failpoint = vec![("SWITCHBOARD_FAILPOINT", "delivery-after-append")];
    failpoint.extend(open_mesh);
    let mut node = ProcessNode::start_with_env(dir.path(), &failpoint).await;
    let envelope = support::client_id_envelope("client-42", "exactly once");
    let route = |mesh_addr, envelope: pb::Envelope| async move {
        RouterClient::from_channel(support::mesh_channel(mesh_addr).await)
            .route(pb::RouteRequest {
                envelope: Some(envelope),
            })
            .await
    };
    let lost = route(node.mesh_addr, envelope.clone()).await;
    assert!(lost.is_err(), "no reply from a process that died: {lost:?}");
    let exit = tokio::task::spawn_blocking(move || {
        let exit = node.child.wait().expect("wait");
        (node, exit)
    });
    let (node, exit) = tokio::time::timeout(std::time::Duration::from_secs(10), exit)
        .await
        .expect("the process dies at the failpoint")
        .expect("join");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(exit.signal(), Some(6), "aborted (SIGABRT): {exit}");
    drop(node);

    // Restarted without the failpoint: the resend is a repeat.
    let node = ProcessNode::start_with_env(dir.path(), &open_mesh).await;
    // A client that gets no answer resends, as the id lets it: on a loaded
    // machine the first call after a restart can outlast the client's 4 s
    // budget while the store warms up. Every resend is the same repeat.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let again = loop {
        match route(node.mesh_addr, envelope.clone()).await {
            Ok(reply) => break reply,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("route after the restart, resending: {error:?}");
            }
            Err(error) => panic!("route after the restart: {error:?}"),
        }
    };
    assert_eq!(again.repeated, vec![0], "answered as a repeat");
    let delivery = DeliveryClient::from_channel(support::mesh_channel(node.mesh_addr).await);
    let inbox = support::bob_inbox(&delivery).await;
    let ids: Vec<&str> = inbox.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["client-42"], "stored exactly once");
    assert_eq!(inbox[0].content, "exactly once");
    // A new client id is stored as usual.
    let next = pb::Envelope {
        id: "client-43".into(),
        ..envelope
    };
    let reply = route(node.mesh_addr, next).await.expect("route");
    assert!(reply.repeated.is_empty());
}

/// A client resends a message it gave its own id, after the server was
/// killed (-9) and restarted between the two sends: both sends are answered
/// `MESSAGE_ACCEPTED` with that id, and the recipient gets the message once.
#[tokio::test]
async fn a_client_id_resent_after_kill_9_and_restart_reaches_the_recipient_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ProcessNode::start(dir.path()).await;
    let frame = |reference: &str| serde_json::json!({"type":"MESSAGE","data":{"to":"demo-bob","content":"exactly once","id":"k9-resend"},"reference":reference});
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.send(frame("before")).await;
    let accepted = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(accepted["data"]["id"], "k9-resend");
    node.kill9();

    let node = ProcessNode::start(dir.path()).await;
    let mut ann = Client::login_with(&node.url(), "demo-ann", true).await;
    ann.send(frame("after")).await;
    let again = ann.recv_type("MESSAGE_ACCEPTED").await;
    assert_eq!(
        (&again["data"]["id"], &again["reference"]),
        (&serde_json::json!("k9-resend"), &serde_json::json!("after"))
    );
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (frames, lefts) = bob.fetch_all(100).await;
    assert_eq!(lefts.last(), Some(&0));
    let got: Vec<(&str, &str)> = frames
        .iter()
        .map(|f| {
            (
                f["data"]["id"].as_str().expect("id"),
                f["data"]["content"].as_str().expect("content"),
            )
        })
        .collect();
    assert_eq!(got, [("k9-resend", "exactly once")]);
}
