//! Channels to other processes of the mesh: plain HTTP/2, or mutual TLS
//! when the deployment configures certificates.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::credentials::MeshCredentials;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// PEM material for mutual TLS on the mesh: this process's certificate and
/// key (served, and presented when calling), and the CA every peer's
/// certificate must be signed by.
#[derive(Clone)]
pub struct MeshTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
}

impl MeshTls {
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: present this certificate, accept a server whose
    /// certificate the CA signed for `host` (a DNS name or IP address).
    pub fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad mesh address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
}

/// Builds lazily connected channels to mesh addresses, and holds the
/// credentials every call carries.
#[derive(Clone, Default)]
pub struct MeshConnector {
    credentials: MeshCredentials,
    tls: Option<MeshTls>,
}

impl MeshConnector {
    pub fn new(credentials: MeshCredentials, tls: Option<MeshTls>) -> Self {
        MeshConnector { credentials, tls }
    }

    pub fn credentials(&self) -> &MeshCredentials {
        &self.credentials
    }

    /// Whether addresses are `https://` (mutual TLS).
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// A channel to `addr` (`http://host:port` or `https://host:port`); it
    /// connects on first use and reconnects after failures.
    pub fn channel(&self, addr: &str) -> Result<Channel, ConnectError> {
        let bad = |reason: String| ConnectError::Address {
            addr: addr.to_owned(),
            reason,
        };
        let mut endpoint =
            Endpoint::from_shared(addr.to_owned()).map_err(|e| bad(e.to_string()))?;
        if let Some(tls) = &self.tls {
            let host = endpoint
                .uri()
                .host()
                .ok_or_else(|| bad("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            endpoint = endpoint
                .tls_config(tls.client_config(&host))
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy())
    }
}
