//! The test sandbox: Switchboard nodes (in-process or as real processes) on
//! ephemeral ports, and a WebSocket client speaking protocol v1.

#![allow(dead_code)]

pub mod cluster;
pub mod otlp;
pub mod postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::{Listeners, RemoteRoles};
use switchboard_config::Config;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

/// A node running in this test process.
pub struct TestNode {
    pub client_addr: SocketAddr,
    /// The mesh port, when the node opens one (see [`TestNode::mesh_addr`]).
    pub mesh: Option<SocketAddr>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}, RemoteRoles::default()).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config), remote: RemoteRoles) -> TestNode {
        init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            client_addr: "127.0.0.1:0".parse().expect("addr"),
            mesh_addr: "127.0.0.1:0".parse().expect("addr"),
            ..Config::default()
        };
        edit(&mut config);
        let listeners = Listeners::bind(&config).await.expect("bind");
        let client_addr = listeners
            .client_addr()
            .expect("addr")
            .expect("a gateway has a client port");
        let mesh = listeners.mesh_addr().expect("addr");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(switchboard::serve(config, listeners, remote, async move {
            token.cancelled().await
        }));
        TestNode {
            client_addr,
            mesh,
            stop,
            task: Some(task),
            _dir: Some(dir),
        }
    }

    /// The mesh port of a node started with [`open_mesh`].
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh
            .expect("this node has no mesh port: start it with support::open_mesh")
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.client_addr)
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("node stops in time")
                .expect("node task")
                .expect("node ran cleanly");
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where a test's clients connect: one in-process node, or a multi-process
/// cluster whose gateways take turns.
pub enum Deployment {
    Single(TestNode),
    Cluster(Box<cluster::Cluster>),
}

impl Deployment {
    pub async fn single(edit: impl FnOnce(&mut Config)) -> Deployment {
        Deployment::Single(TestNode::start_with(edit, RemoteRoles::default()).await)
    }

    /// The protocol-test cluster shape; `None` when etcd/Redis are not
    /// available outside CI (the reason is printed). With
    /// `SWITCHBOARD_TEST_SHARDED=1`, three delivery processes on a fresh
    /// PostgreSQL database instead of one on the embedded store.
    pub async fn cluster(edit: impl FnOnce(&mut Config)) -> Option<Deployment> {
        let infra = cluster::Infra::from_env()?;
        if std::env::var("SWITCHBOARD_TEST_SHARDED").is_ok_and(|v| v == "1") {
            let url = postgres::fresh_database(&postgres::server()?).await;
            let sharded = cluster::Cluster::start(infra, cluster::SHARDED_SHAPE, |c| {
                c.store.engine = switchboard_config::StoreEngine::Postgres;
                c.store.url = url;
                edit(c);
            })
            .await;
            return Some(Deployment::Cluster(Box::new(sharded)));
        }
        Some(Deployment::Cluster(Box::new(
            cluster::Cluster::start(infra, cluster::PROTOCOL_SHAPE, edit).await,
        )))
    }

    /// A client URL; on a cluster, the next gateway's.
    pub fn url(&self) -> String {
        match self {
            Deployment::Single(node) => node.url(),
            Deployment::Cluster(cluster) => cluster.url(),
        }
    }

    pub async fn shutdown(self) {
        match self {
            Deployment::Single(node) => node.shutdown().await,
            Deployment::Cluster(cluster) => cluster.shutdown().await,
        }
    }
}

/// Logs of in-process nodes, when `SWITCHBOARD_TEST_LOG` names a filter
/// (e.g. `warn` or `switchboard_delivery=debug`).
fn init_test_logging() {
    if let Ok(filter) = std::env::var("SWITCHBOARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// `GET path` over plain HTTP/1.0 → (status, head, body); `None` when the
/// port does not answer.
pub async fn http_get_text(addr: SocketAddr, path: &str) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Some((status, head.to_owned(), body.to_owned()))
}

/// `GET path` → (status, JSON body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, Value)> {
    let (status, _, body) = http_get_text(addr, path).await?;
    Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// The Redis under test, or `None` when a developer runs plain `cargo test`
/// without one (a recorded skip, see `switchboard_testenv`). Under `CI=true`
/// a missing Redis fails.
pub fn test_redis() -> Option<String> {
    switchboard_testenv::service(switchboard_testenv::REDIS)
}

/// A loopback port that is free now, for a process a test starts (which
/// binds it itself).
///
/// Taken from just below the kernel's ephemeral range, never twice in one
/// test binary: nothing the kernel hands out (a bind to port 0, the local
/// end of an outgoing connection) is ever one of these, so a port a test
/// frees for a while — an etcd it stops and starts again on the same
/// address — stays its own. (Probing with a bind to port 0 could hand such
/// a port to a process of a test running alongside: the likely cause of a
/// rare failure of two cluster tests at once.)
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let &(start, len) = RANGE.get_or_init(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768);
        let start = ephemeral_low.saturating_sub(20_000).max(1024);
        // Test binaries run one after another; the process id spreads
        // them over the range anyway.
        NEXT.store(std::process::id() % 4096, Ordering::Relaxed);
        (start, ephemeral_low.saturating_sub(start).max(1))
    });
    for _ in 0..len {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % len;
        let Ok(port) = u16::try_from(start + offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {start}..{}", start + len);
}

/// The real `switchboard` binary as a child process.
pub struct ProcessNode {
    pub child: Child,
    pub client_addr: SocketAddr,
    /// Where its roles answer gRPC (no mesh secret set).
    pub mesh_addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl ProcessNode {
    pub async fn start(data_dir: &Path) -> ProcessNode {
        Self::start_with_env(data_dir, &[]).await
    }

    /// Starts the binary with extra `SWITCHBOARD_*` settings. Ports come
    /// from free_port(): when another process takes one before the node
    /// binds it, the node exits at once and is started on other ports.
    pub async fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> ProcessNode {
        for _ in 0..5 {
            let client_port = free_port();
            let mesh_port = free_port();
            let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args([
                    "run",
                    "--client-addr",
                    &format!("127.0.0.1:{client_port}"),
                    "--mesh-addr",
                    &format!("127.0.0.1:{mesh_port}"),
                    "--data-dir",
                ])
                .arg(data_dir)
                .env("SWITCHBOARD_LOG", "warn")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn switchboard");
            let mut node = ProcessNode {
                child,
                client_addr: format!("127.0.0.1:{client_port}").parse().expect("addr"),
                mesh_addr: format!("127.0.0.1:{mesh_port}").parse().expect("addr"),
                data_dir: data_dir.to_owned(),
            };
            if node.wait_ready().await {
                return node;
            }
            eprintln!("switchboard exited at start-up; starting it on other ports");
        }
        panic!("switchboard did not start in five attempts");
    }

    /// Whether the node listens (false: it exited at start-up).
    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect(self.client_addr).await.is_ok() {
                // Ours, not another process's that took the port.
                return !matches!(self.child.try_wait(), Ok(Some(_)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("switchboard did not listen on {}", self.client_addr);
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.client_addr)
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol v1 client.
pub struct Client {
    ws: Ws,
    pub user: String,
    /// How the connection ended, once seen.
    end: Option<Closed>,
}

/// What the server did with the connection.
#[derive(Debug)]
pub enum Closed {
    Frame(Option<CloseFrame>),
    Eof,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        Client {
            ws,
            user: String::new(),
            end: None,
        }
    }

    /// Connects as a browser page of `origin` would (an `Origin` header).
    pub async fn connect_from(url: &str, origin: &str) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("request");
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header value"));
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connect");
        Client {
            ws,
            user: String::new(),
            end: None,
        }
    }

    /// Connects and authenticates as `user` of the demo app.
    pub async fn login(url: &str, user: &str) -> Client {
        Self::login_with(url, user, false).await
    }

    pub async fn login_with(url: &str, user: &str, acks: bool) -> Client {
        let mut c = Self::connect(url).await;
        let reply = c
            .auth(json!({"appId": "demo", "userId": user, "token": "", "acks": acks}))
            .await;
        assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
        c.user = user.to_owned();
        c
    }

    pub async fn auth(&mut self, data: Value) -> Value {
        self.send(json!({"type": "AUTH_CLIENT", "data": data}))
            .await;
        self.recv_type("AUTH_CLIENT_REPLY").await
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends any WebSocket message, raw frames included.
    pub async fn send_message(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send message");
    }

    /// Sends frames back to back and flushes once: they reach the server
    /// together, as from a client that pipelines.
    pub async fn send_burst(&mut self, frames: &[Value]) {
        for frame in frames {
            self.ws
                .feed(Message::Text(frame.to_string().into()))
                .await
                .expect("send frame");
        }
        self.ws.flush().await.expect("flush frames");
    }

    pub async fn message(&mut self, to: &str, content: &str, feature: &str, reference: &str) {
        self.send(json!({
            "type": "MESSAGE",
            "data": {"to": to, "content": content},
            "feature": feature,
            "reference": reference,
        }))
        .await;
    }

    /// Sends a RELIABLE message from an ack-mode connection and waits until
    /// the server has stored it (MESSAGE_ACCEPTED); returns the message id.
    pub async fn send_accepted(&mut self, to: &str, content: &str, reference: &str) -> String {
        self.message(to, content, "RELIABLE", reference).await;
        loop {
            let f = self.recv_type("MESSAGE_ACCEPTED").await;
            if f["data"]["reference"] == reference {
                return f["data"]["id"].as_str().expect("id").to_owned();
            }
        }
    }

    /// The next JSON frame, or `None` on close/timeout (a close is kept for
    /// [`Client::closed`]).
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        if self.end.is_some() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server sent JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.end = Some(Closed::Frame(frame));
                    return None;
                }
                None | Some(Err(_)) => {
                    self.end = Some(Closed::Eof);
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.try_recv(WAIT)
            .await
            .unwrap_or_else(|| panic!("{}: no frame within {WAIT:?}", self.user))
    }

    /// The next frame of `kind`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// Asserts that no frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(f) = self.try_recv(wait).await {
            panic!("{}: unexpected frame {f}", self.user);
        }
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Closed {
        if let Some(end) = self.end.take() {
            return end;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("{}: connection not closed within {WAIT:?}", self.user),
                Ok(None) | Ok(Some(Err(_))) => return Closed::Eof,
                Ok(Some(Ok(Message::Close(frame)))) => return Closed::Frame(frame),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Fetches everything stored, page by page; returns the frames (MESSAGE,
    /// MESSAGE_CONFIRMATION, ...) and the leftMissingCount of each page.
    pub async fn fetch_all(&mut self, page: u32) -> (Vec<Value>, Vec<u64>) {
        let mut messages = Vec::new();
        let mut lefts = Vec::new();
        loop {
            self.send(json!({"type": "FETCH_MISSING_MESSAGES_REQUEST", "data": {"count": page}}))
                .await;
            loop {
                let f = self.recv().await;
                match f["type"].as_str() {
                    Some("FETCH_MISSING_MESSAGES_COMPLETE") => {
                        let left = f["data"]["leftMissingCount"].as_u64().expect("count");
                        lefts.push(left);
                        break;
                    }
                    _ => messages.push(f),
                }
            }
            if lefts.last() == Some(&0) {
                return (messages, lefts);
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server acknowledges the close.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

pub fn close_code(closed: &Closed) -> Option<u16> {
    match closed {
        Closed::Frame(Some(f)) => Some(u16::from(f.code)),
        _ => None,
    }
}

/// Opens the mesh port of an all-in-one test node, without a secret (tests
/// call it with [`mesh_channel`]).
pub fn open_mesh(config: &mut Config) {
    config.mesh_listen = true;
    config.insecure_mesh = true;
}

/// A channel to a node's mesh port (plaintext, as the test nodes serve it).
pub async fn mesh_channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the mesh port")
}

/// A RELIABLE direct message from demo-ann to demo-bob whose id the client
/// gave (`data.id`): indexed for idempotent resends.
pub fn client_id_envelope(id: &str, content: &str) -> switchboard_mesh::pb::Envelope {
    use switchboard_mesh::pb;
    pb::Envelope {
        id: id.into(),
        client_id: true,
        app_id: "demo".into(),
        from: "demo-ann".into(),
        to: vec!["demo-bob".into()],
        content: content.into(),
        feature: pb::Feature::Reliable.into(),
        kind: pb::MessageKind::Direct.into(),
        ts: switchboard_mesh::now_ms(),
        ..Default::default()
    }
}

/// Runs the `switchboard` binary with `args` (an operator's command such as
/// `apps list` or `topology show`): success, and stdout + stderr.
pub fn switchboard_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .env("SWITCHBOARD_LOG", "warn")
        .output()
        .expect("run switchboard");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// demo-bob's stored messages, oldest first (up to 100), read from a
/// delivery role over the mesh.
pub async fn bob_inbox(
    delivery: &switchboard_mesh::DeliveryClient,
) -> Vec<switchboard_mesh::pb::InboxMessage> {
    delivery
        .fetch(switchboard_mesh::pb::FetchRequest {
            app_id: "demo".into(),
            user_id: "demo-bob".into(),
            count: 100,
            after_seq: 0,
        })
        .await
        .expect("fetch")
        .messages
}
