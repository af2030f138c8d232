//! TLS on the client port: `wss://`, `https://` and gRPC over TLS against
//! a real node, certificates replaced on disk while it runs, slow or
//! silent TLS clients closed after the header timeout, and a start-up
//! refused on bad files. Certificates are made here with rcgen.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use support::{TestNode, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A CA and a server certificate it signed for 127.0.0.1, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(ca_name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn leaf_der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .expect("leaf")
            .to_vec()
    }
}

/// Replaces a file as an editor or a secret mount does: a whole new file
/// renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn write_pair(dir: &Path, pki: &Pki) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    replace(&cert, &pki.cert_pem);
    replace(&key, &pki.key_pem);
    (cert, key)
}

fn client_config(trusted: &[&Pki], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for pki in trusted {
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("ca"))
            .expect("add root");
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the node trusting only `trusted`'s CAs.
async fn tls_connect(
    addr: SocketAddr,
    trusted: &[&Pki],
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(client_config(trusted, alpn))
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
fn presented(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a certificate")
        .to_vec()
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A `wss://` connection signed in as `user` of the demo app.
async fn wss_login(addr: SocketAddr, trusted: &[&Pki], user: &str) -> Wss {
    let tls = tls_connect(addr, trusted, &[b"http/1.1"])
        .await
        .expect("TLS handshake");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/ws"), tls)
        .await
        .expect("websocket upgrade over TLS");
    send(
        &mut ws,
        json!({"type": "AUTH_CLIENT", "data": {"appId": "demo", "userId": user, "token": ""}}),
    )
    .await;
    let reply = recv_type(&mut ws, "AUTH_CLIENT_REPLY").await;
    assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
    ws
}

async fn send(ws: &mut Wss, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send frame");
}

async fn recv_type(ws: &mut Wss, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} within {WAIT:?}"));
        match next {
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                if f["type"] == kind {
                    return f;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("connection ended waiting for {kind}: {other:?}"),
        }
    }
}

/// `from` sends `to` a message and `to` receives it.
async fn round_trip(from: &mut Wss, to: &mut Wss, to_user: &str, content: &str) {
    send(
        from,
        json!({"type": "MESSAGE", "data": {"to": to_user, "content": content}, "feature": "FAST", "reference": content}),
    )
    .await;
    let got = recv_type(to, "MESSAGE").await;
    assert_eq!(got["data"]["content"], content, "{got}");
}

fn https_client(trusted: &Pki) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(trusted.ca_pem.as_bytes()).expect("ca")])
        .build()
        .expect("https client")
}

/// The value of `switchboard_tls_reloads_total{result}` on the node.
async fn reloads(http: &reqwest::Client, addr: SocketAddr, result: &str) -> f64 {
    let text = http
        .get(format!("https://{addr}/metrics"))
        .send()
        .await
        .expect("metrics over https")
        .text()
        .await
        .expect("metrics text");
    let wanted = format!("switchboard_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn tls_node(
    dir: &Path,
    pki: &Pki,
    edit: impl FnOnce(&mut switchboard_config::Config),
) -> TestNode {
    let (cert, key) = write_pair(dir, pki);
    TestNode::start_with(
        |c| {
            c.tls.cert = cert;
            c.tls.key = key;
            c.tls.reload_interval = Duration::from_millis(200);
            edit(c);
        },
        Default::default(),
    )
    .await
}

/// Over TLS: two `wss://` clients exchange a message, `/healthz` answers
/// over HTTPS (HTTP/2 by ALPN, and HTTP/1.1), the gRPC API answers over
/// TLS. Then the files are replaced with a pair of another CA: new
/// connections get it while the open ones keep working; a pair whose key
/// is not the certificate's is refused and the one in use kept.
#[tokio::test]
async fn wss_https_and_grpc_over_tls_and_certificates_reloaded_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Pki::new("first CA");
    let node = tls_node(dir.path(), &first, |_| {}).await;
    let addr = node.client_addr;

    let mut ann = wss_login(addr, &[&first], "demo-ann").await;
    let mut bob = wss_login(addr, &[&first], "demo-bob").await;
    round_trip(&mut ann, &mut bob, "demo-bob", "over wss").await;

    let http = https_client(&first);
    let res = http
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .expect("healthz over https");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http1 = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(first.ca_pem.as_bytes()).expect("ca")])
        .http1_only()
        .build()
        .expect("client");
    let res = http1
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .expect("healthz over https/1.1");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    // Plain HTTP on the TLS port gets no answer.
    assert!(support::http_get(addr, "/healthz").await.is_none());

    grpc_over_tls(addr, &first).await;

    // A new pair, from another CA, replaces the files.
    let second = Pki::new("second CA");
    write_pair(dir.path(), &second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(tls) = tls_connect(addr, &[&second], &[b"http/1.1"]).await {
            assert_eq!(presented(&tls), second.leaf_der());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tls_connect(addr, &[&first], &[b"http/1.1"]).await.is_err(),
        "the old certificate is no longer served"
    );
    // The connections opened under the first certificate go on.
    round_trip(&mut bob, &mut ann, "demo-ann", "still here").await;
    let mut cid = wss_login(addr, &[&second], "demo-cid").await;
    round_trip(&mut cid, &mut ann, "demo-ann", "new connection").await;

    // A certificate whose key is not in the key file: refused, counted,
    // and the second pair stays in use.
    let http = https_client(&second);
    let refused_before = reloads(&http, addr, "error").await;
    let third = Pki::new("third CA");
    replace(&dir.path().join("server.crt"), &third.cert_pem);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reloads(&http, addr, "error").await <= refused_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mismatched pair was not refused within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tls = tls_connect(addr, &[&second, &third], &[b"http/1.1"])
        .await
        .expect("the second pair is still served");
    assert_eq!(presented(&tls), second.leaf_der());
    drop(tls);
    node.shutdown().await;
}

/// gRPC (HTTP/2 over TLS) to the public API: reflection lists its service.
async fn grpc_over_tls(addr: SocketAddr, pki: &Pki) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pki.ca_pem))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("gRPC over TLS");
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection over TLS")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("not the end");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "switchboard.api.v1.Messaging"),
        "{:?}",
        list.service
    );
}

/// Reads until the peer closes; `false` when it is still open after `limit`.
async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// On the TLS port, a TCP client that says nothing, one that sends half a
/// ClientHello, and one that finishes the handshake and then sends nothing
/// are all closed after the header timeout; HTTPS answers all along.
#[tokio::test]
async fn slow_and_silent_tls_clients_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("slowloris CA");
    let node = tls_node(dir.path(), &pki, |c| c.limits.http_header_timeout_secs = 1).await;
    let addr = node.client_addr;

    // Each connection's timeout starts after it is accepted, so none can
    // close sooner than the timeout after this instant.
    let opened = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut half_hello = TcpStream::connect(addr).await.expect("connect");
    // A TLS record header announcing a 512-byte handshake, and 5 of them.
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
        .await
        .expect("write");
    let mut quiet_tls = tls_connect(addr, &[&pki], &[b"http/1.1"])
        .await
        .expect("handshake");
    let mut quiet_h2 = tls_connect(addr, &[&pki], &[b"h2"])
        .await
        .expect("handshake");

    let res = https_client(&pki)
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .expect("healthz answers beside them");
    assert_eq!(res.status(), 200);

    assert!(
        closed_within(&mut silent, WAIT).await,
        "silent TCP left open"
    );
    assert!(
        closed_within(&mut half_hello, WAIT).await,
        "half a ClientHello left open"
    );
    assert!(
        closed_within(&mut quiet_tls, WAIT).await,
        "a quiet TLS client left open"
    );
    assert!(
        closed_within(&mut quiet_h2, WAIT).await,
        "a quiet h2 client left open"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        opened.elapsed()
    );
    node.shutdown().await;
}

/// Runs `switchboard run` with the given TLS files; returns its exit status
/// and what it wrote to stderr.
fn run_with_tls(cert: &Path, key: &Path) -> (bool, String) {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--client-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard kept running with bad TLS files");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A missing file, or a key that is not the certificate's, refuses the
/// start with a message that names the problem.
#[test]
fn start_up_is_refused_with_missing_or_mismatched_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Pki::new("a");
    let b = Pki::new("b");
    let (cert, _) = write_pair(dir.path(), &a);
    let missing = dir.path().join("absent.key");
    let (ok, stderr) = run_with_tls(&cert, &missing);
    assert!(!ok, "started without its key file");
    assert!(
        stderr.contains("cannot read tls.key") && stderr.contains("absent.key"),
        "{stderr}"
    );
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &b.key_pem).expect("write");
    let (ok, stderr) = run_with_tls(&cert, &other_key);
    assert!(!ok, "started with a key that is not the certificate's");
    assert!(
        stderr.contains("the key does not match the certificate"),
        "{stderr}"
    );
}
