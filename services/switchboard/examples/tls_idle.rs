//! What an idle signed-in connection costs the server, over `ws://` and
//! over `wss://`: starts the binary twice (plain, then TLS with a
//! certificate made here), opens N connections that sign in and stay idle,
//! and prints the server's RSS growth per connection.
//!
//!   cargo build --release -p switchboard --bin switchboard --example tls_idle
//!   ./target/release/examples/tls_idle 2000

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn sign_in<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, user: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let auth = serde_json::json!({"type": "AUTH_CLIENT", "data": {"appId": "demo", "userId": user, "token": ""}});
    ws.send(Message::Text(auth.to_string().into()))
        .await
        .expect("send");
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg
            && t.contains("AUTH_CLIENT_REPLY")
        {
            return;
        }
    }
    panic!("no AUTH_CLIENT_REPLY");
}

/// Lets the server settle, then reads its RSS.
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid)
}

struct Pki {
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    connector: TlsConnector,
}

/// Starts the binary (over TLS with `pki`), opens `n` idle signed-in
/// connections, returns (RSS before, RSS after) in KiB.
async fn measure(n: usize, dir: &std::path::Path, pki: Option<&Pki>) -> (u64, u64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let bin = std::env::current_exe()
        .expect("exe")
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("switchboard");
    let mut command = std::process::Command::new(bin);
    command
        .args(["run", "--client-addr", &addr, "--data-dir"])
        .arg(dir.join(format!("data-{}", pki.is_some())))
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(std::process::Stdio::null());
    if let Some(pki) = pki {
        command
            .arg("--tls-cert")
            .arg(&pki.cert_path)
            .arg("--tls-key")
            .arg(&pki.key_path);
    }
    let mut server = command
        .spawn()
        .expect("start switchboard (build it first: cargo build -p switchboard)");
    let pid = server.id();
    for _ in 0..200 {
        if TcpStream::connect(&addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = settled_rss(pid).await;
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    for i in 0..n {
        let tcp = TcpStream::connect(&addr).await.expect("connect");
        let user = format!("demo-s{i}");
        match pki {
            Some(pki) => {
                let stream = pki
                    .connector
                    .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
                    .await
                    .expect("handshake");
                let (mut ws, _) =
                    tokio_tungstenite::client_async(format!("wss://{addr}/ws"), stream)
                        .await
                        .expect("upgrade");
                sign_in(&mut ws, &user).await;
                tls.push(ws);
            }
            None => {
                let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
                    .await
                    .expect("upgrade");
                sign_in(&mut ws, &user).await;
                plain.push(ws);
            }
        }
    }
    let after = settled_rss(pid).await;
    drop((plain, tls));
    let _ = server.kill();
    let _ = server.wait();
    (base, after)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert.pem().as_bytes()).expect("ca"))
        .expect("root");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let pki = Pki {
        cert_path,
        key_path,
        connector: TlsConnector::from(Arc::new(config)),
    };
    for (name, pki) in [("ws", None), ("wss", Some(&pki))] {
        let (base, after) = measure(n, dir.path(), pki).await;
        println!(
            "{n} idle {name} connections: server RSS {base} KiB -> {after} KiB, {:.1} KiB per connection",
            after.saturating_sub(base) as f64 / n as f64
        );
    }
}
