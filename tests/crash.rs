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

/// A delivery process that dies between storing a message and replying (the
/// failpoint aborts it as a kill -9 would): the sender's resend of the same
/// client id after the restart is answered as a repeat, and the recipient's
/// inbox holds the message once.
#[tokio::test]
async fn a_resend_after_a_crash_between_store_and_reply_is_stored_once() {
    use switchboard_mesh::{DeliveryClient, RouterClient, pb};

    let dir = tempfile::tempdir().expect("tempdir");
    let failpoint = [("SWITCHBOARD_FAILPOINT", "delivery-after-append")];
    let mut node = ProcessNode::start_with_env(dir.path(), &failpoint).await;
    let envelope = pb::Envelope {
        id: "client-42".into(),
        client_id: true,
        app_id: "demo".into(),
        from: "demo-ann".into(),
        to: vec!["demo-bob".into()],
        content: "exactly once".into(),
        feature: pb::Feature::Reliable.into(),
        kind: pb::MessageKind::Direct.into(),
        ts: switchboard_mesh::now_ms(),
        ..Default::default()
    };
    let route = |mesh_addr, envelope: pb::Envelope| async move {
        RouterClient::from_channel(mesh_channel(mesh_addr).await)
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
    let node = ProcessNode::start(dir.path()).await;
    let again = route(node.mesh_addr, envelope.clone())
        .await
        .expect("route after the restart");
    assert_eq!(again.repeated, vec![0], "answered as a repeat");
    let inbox = DeliveryClient::from_channel(mesh_channel(node.mesh_addr).await)
        .fetch(pb::FetchRequest {
            app_id: "demo".into(),
            user_id: "demo-bob".into(),
            count: 100,
            after_seq: 0,
        })
        .await
        .expect("fetch");
    let ids: Vec<&str> = inbox.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["client-42"], "stored exactly once");
    assert_eq!(inbox.messages[0].content, "exactly once");
    // A new client id is stored as usual.
    let next = pb::Envelope {
        id: "client-43".into(),
        ..envelope
    };
    let reply = route(node.mesh_addr, next).await.expect("route");
    assert!(reply.repeated.is_empty());
}

async fn mesh_channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the mesh port")
}
