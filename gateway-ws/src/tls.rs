//! TLS on the client port (`wss://`, `https://`, gRPC over TLS), with the
//! certificate and key read again from their files while the server runs.
//!
//! The pair is loaded at start-up (a missing file or a key that does not
//! match the certificate refuses the start). A watcher reads both files
//! every `reload_interval` and, when their bytes changed, loads the new
//! pair: new connections get it, open ones keep theirs; a pair that does
//! not load is logged (once per content) and counted, and the old one
//! kept. Reading the files, rather than waiting for change events, also
//! sees Kubernetes' symlink swaps of mounted secrets.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_config::ClientTlsConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::GatewayError;

/// The client port's TLS: the acceptor and the files it reloads from.
pub struct ClientTls {
    current: Arc<CurrentPair>,
    acceptor: TlsAcceptor,
    provider: Arc<CryptoProvider>,
    cert_path: PathBuf,
    key_path: PathBuf,
    interval: Duration,
}

/// The pair new handshakes are given.
#[derive(Debug)]
struct CurrentPair(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentPair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

impl ClientTls {
    /// Loads the pair `config` names; errors say which file and why.
    pub fn load(config: &ClientTlsConfig) -> Result<Arc<Self>, GatewayError> {
        // The ring provider, as the mesh's TLS (tonic) and reqwest use.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_pem = read(&config.cert, "tls.cert")?;
        let key_pem = read(&config.key, "tls.key")?;
        let pair = certified_key(&cert_pem, &key_pem, &provider).map_err(|why| {
            GatewayError::Tls(format!(
                "tls.cert {} and tls.key {}: {why}",
                config.cert.display(),
                config.key.display()
            ))
        })?;
        let current = Arc::new(CurrentPair(RwLock::new(pair)));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Tls(format!("no TLS protocol version: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        // HTTP/2 for the gRPC API (and clients that prefer it), HTTP/1.1
        // for the WebSocket upgrade and everything else.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(ClientTls {
            current,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            provider,
            cert_path: config.cert.clone(),
            key_path: config.key.clone(),
            interval: config.reload_interval,
        }))
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files every interval until `stop`, and installs a changed
    /// pair that loads.
    pub(crate) async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut seen = match (
            tokio::fs::read(&self.cert_path).await,
            tokio::fs::read(&self.key_path).await,
        ) {
            (Ok(cert), Ok(key)) => Some((cert, key)),
            _ => None,
        };
        // The last failure logged, so that a bad file is reported once and
        // not every interval.
        let mut last_failure = String::new();
        let mut every = tokio::time::interval(self.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let files = match (
                tokio::fs::read(&self.cert_path).await,
                tokio::fs::read(&self.key_path).await,
            ) {
                (Ok(cert), Ok(key)) => (cert, key),
                (Err(e), _) | (_, Err(e)) => {
                    let why = format!("cannot read the certificate or key: {e}");
                    self.refused(&why, &mut last_failure);
                    continue;
                }
            };
            if seen.as_ref() == Some(&files) {
                continue;
            }
            match certified_key(&files.0, &files.1, &self.provider) {
                Ok(pair) => {
                    *self
                        .current
                        .0
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = pair;
                    metrics::counter!("switchboard_tls_reloads_total", "result" => "ok")
                        .increment(1);
                    tracing::info!(cert = %self.cert_path.display(), "client port certificate reloaded");
                    last_failure.clear();
                }
                Err(why) => self.refused(&why, &mut last_failure),
            }
            seen = Some(files);
        }
    }

    fn refused(&self, why: &str, last_failure: &mut String) {
        metrics::counter!("switchboard_tls_reloads_total", "result" => "error").increment(1);
        if last_failure != why {
            tracing::warn!(
                cert = %self.cert_path.display(),
                key = %self.key_path.display(),
                reason = %why,
                "client port certificate not reloaded: keeping the one in use"
            );
            why.clone_into(last_failure);
        }
    }
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, GatewayError> {
    std::fs::read(path)
        .map_err(|e| GatewayError::Tls(format!("cannot read {key} {}: {e}", path.display())))
}

/// A certificate chain and its key from PEM; refused when the key is not
/// the certificate's.
fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no CERTIFICATE".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no private key: {e}"))?;
    let pair = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => "the key does not match the certificate".to_owned(),
        other => format!("the certificate or key cannot be used: {other}"),
    })?;
    Ok(Arc::new(pair))
}

/// A stream whose first bytes were read already (to tell HTTP/1 from
/// HTTP/2 within the header timeout) and are given back first.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let provider = rustls::crypto::ring::default_provider();
        let (cert_a, key_a) = pair("a.test");
        let (_, key_b) = pair("b.test");
        assert!(certified_key(cert_a.as_bytes(), key_a.as_bytes(), &provider).is_ok());
        let err = certified_key(cert_a.as_bytes(), key_b.as_bytes(), &provider)
            .expect_err("mismatched key");
        assert!(err.contains("does not match"), "{err}");
        let err = certified_key(b"not pem", key_a.as_bytes(), &provider).expect_err("no cert");
        assert!(err.contains("no CERTIFICATE"), "{err}");
        let err = certified_key(cert_a.as_bytes(), cert_a.as_bytes(), &provider)
            .expect_err("a certificate as key");
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn missing_files_name_the_key_and_path() {
        let config = ClientTlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ..ClientTlsConfig::default()
        };
        let err = ClientTls::load(&config).err().expect("missing files");
        let text = err.to_string();
        assert!(
            text.contains("tls.cert") && text.contains("/nonexistent/cert.pem"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn prefixed_gives_its_prefix_back_first_and_writes_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Prefixed::new(b"GET ".to_vec(), a);
        b.write_all(b"/ HTTP/1.1").await.expect("write");
        let mut got = vec![0u8; 14];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"GET / HTTP/1.1");
        s.write_all(b"ok").await.expect("write through");
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"ok");
    }
}
