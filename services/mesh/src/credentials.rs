//! Mesh credentials: every mesh call carries the mesh secret, and the mesh
//! port refuses calls without it.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

const HEADER: &str = "authorization";

/// Refusals log one line per peer address per interval, with the count of
/// those left unlogged since: an outsider calling in a loop costs a line
/// every 10 s, not one per call.
pub const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Peers remembered for rate-limited logging; past it, the oldest entries
/// are forgotten (a forgotten peer is logged again at once).
const REFUSAL_PEERS: usize = 1024;

/// Per peer address: when its last refusal was logged, and how many were
/// refused since without a line.
#[derive(Default)]
struct RefusalLog {
    peers: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
    /// Lines logged in the current interval, over all peers (start, count):
    /// callers from many addresses share [`REFUSAL_LINES`].
    lines: std::sync::Mutex<(u64, u32)>,
}

/// Refusal lines per interval over all peers; past it refusals are only
/// counted (in the metric, and in each peer's next line).
const REFUSAL_LINES: u32 = 20;

impl RefusalLog {
    /// Whether to log a refusal of `peer` now, and how many of its
    /// refusals went unlogged before it.
    fn should_log(&self, peer: &str) -> Option<u64> {
        let now = crate::now_ms().max(0) as u64;
        let interval = REFUSAL_LOG_INTERVAL.as_millis() as u64;
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers.len() >= REFUSAL_PEERS && !peers.contains_key(peer) {
            peers.retain(|_, (last, _)| now.saturating_sub(*last) < interval);
            if peers.len() >= REFUSAL_PEERS {
                peers.clear();
            }
        }
        let entry = peers.entry(peer.to_owned()).or_insert((0, 0));
        if entry.0 != 0 && now.saturating_sub(entry.0) < interval {
            entry.1 += 1;
            return None;
        }
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_sub(lines.0) >= interval {
            *lines = (now, 0);
        }
        if lines.1 >= REFUSAL_LINES {
            entry.1 += 1;
            return None;
        }
        lines.1 += 1;
        let unlogged = entry.1;
        *entry = (now, 0);
        Some(unlogged)
    }
}

/// The caller's IP address (ports change with every connection).
fn peer_ip(req: &Request<()>) -> String {
    req.remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Client side: adds `authorization: Bearer <secret>` to every call.
#[derive(Clone, Default)]
pub struct MeshCredentials {
    header: Option<MetadataValue<Ascii>>,
}

impl MeshCredentials {
    /// Credentials for `secret`; an empty secret sends none. Fails on a
    /// secret that cannot be an HTTP header value.
    pub fn new(secret: &str) -> Result<Self, InvalidSecret> {
        if secret.is_empty() {
            return Ok(MeshCredentials { header: None });
        }
        let header = format!("Bearer {secret}")
            .parse()
            .map_err(|_| InvalidSecret)?;
        Ok(MeshCredentials {
            header: Some(header),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the mesh secret must be printable ASCII without spaces at its ends")]
pub struct InvalidSecret;

impl Interceptor for MeshCredentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert(HEADER, h.clone());
        }
        // The caller's trace continues in the callee (W3C trace context).
        for (key, value) in switchboard_telemetry::current_trace_headers() {
            if let Ok(v) = value.parse() {
                req.metadata_mut().insert(key, v);
            }
        }
        Ok(req)
    }
}

/// Server side: refuses (UNAUTHENTICATED, counted, logged once per peer per
/// [`REFUSAL_LOG_INTERVAL`]) every call whose secret is missing or wrong. With an empty secret, every call is let in.
#[derive(Clone)]
pub struct MeshGuard {
    expected: Option<Arc<[u8]>>,
    log: Arc<RefusalLog>,
}

impl MeshGuard {
    pub fn new(secret: &str) -> Self {
        MeshGuard {
            expected: (!secret.is_empty())
                .then(|| Arc::from(format!("Bearer {secret}").as_bytes())),
            log: Arc::default(),
        }
    }
}

impl Interceptor for MeshGuard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get(HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected) {
            return Ok(req);
        }
        metrics::counter!("switchboard_mesh_refused_total").increment(1);
        let peer = peer_ip(&req);
        if let Some(unlogged) = self.log.should_log(&peer) {
            tracing::warn!(
                %peer,
                unlogged,
                "mesh call refused: missing or wrong mesh secret (this peer's next refusals in 10 s are only counted: switchboard_mesh_refused_total)"
            );
        }
        Err(Status::unauthenticated("missing or wrong mesh secret"))
    }
}

/// The header naming the calling domain on federation calls.
pub const DOMAIN_HEADER: &str = "x-switchboard-domain";

/// Client side of a federation link: the link's credential, the calling
/// domain's name and the trace context, on every call.
#[derive(Clone)]
pub struct FederationCredentials {
    header: Option<MetadataValue<Ascii>>,
    domain: MetadataValue<Ascii>,
}

impl FederationCredentials {
    pub fn new(domain: &str, secret: &str) -> Result<Self, InvalidSecret> {
        let header = match secret.is_empty() {
            true => None,
            false => Some(
                format!("Bearer {secret}")
                    .parse()
                    .map_err(|_| InvalidSecret)?,
            ),
        };
        Ok(FederationCredentials {
            header,
            domain: domain.parse().map_err(|_| InvalidSecret)?,
        })
    }
}

impl Interceptor for FederationCredentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert(HEADER, h.clone());
        }
        req.metadata_mut()
            .insert(DOMAIN_HEADER, self.domain.clone());
        for (key, value) in switchboard_telemetry::current_trace_headers() {
            if let Ok(v) = value.parse() {
                req.metadata_mut().insert(key, v);
            }
        }
        Ok(req)
    }
}

/// The calling domain of a federation call, as its credential proved it;
/// put into the request's extensions by [`FederationGuard`].
#[derive(Clone, Debug)]
pub struct PeerDomain(pub String);

/// Server side of the federation port: a call must name its domain and
/// carry that domain's secret (its own from `peers`, else `default`). With
/// neither configured for the caller, the call is refused: the federation
/// port is never open. Refusals are counted and logged at most once per
/// peer per [`REFUSAL_LOG_INTERVAL`].
#[derive(Clone)]
pub struct FederationGuard {
    inner: Arc<GuardInner>,
}

struct GuardInner {
    default: Option<Vec<u8>>,
    peers: std::collections::HashMap<String, Vec<u8>>,
    log: RefusalLog,
    /// With mutual TLS: the client certificate must name the calling domain.
    names_in_certificates: bool,
}

impl FederationGuard {
    /// `default`: the secret of every link without its own; `peers`:
    /// per-neighbour secrets. Empty secrets are "none".
    pub fn new<'a>(default: &str, peers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let bearer = |s: &str| (!s.is_empty()).then(|| format!("Bearer {s}").into_bytes());
        FederationGuard {
            inner: Arc::new(GuardInner {
                default: bearer(default),
                peers: peers
                    .into_iter()
                    .filter_map(|(d, s)| bearer(s).map(|b| (d.to_owned(), b)))
                    .collect(),
                log: RefusalLog::default(),
                names_in_certificates: false,
            }),
        }
    }

    /// With mutual TLS on the federation port: a call is refused unless the
    /// peer's certificate (already verified against the CA by TLS) names
    /// the domain the call claims to come from.
    pub fn with_names_in_certificates(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.names_in_certificates = true;
        }
        self
    }

    fn refuse(&self, req: &Request<()>, why: &'static str) -> Status {
        metrics::counter!("switchboard_federation_refused_total", "reason" => why).increment(1);
        let peer = peer_ip(req);
        if let Some(unlogged) = self.inner.log.should_log(&peer) {
            tracing::warn!(%peer, reason = why, unlogged, "federation call refused (this peer's next refusals in 10 s are only counted: switchboard_federation_refused_total)");
        }
        Status::unauthenticated(why)
    }
}

impl Interceptor for FederationGuard {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(domain) = req
            .metadata()
            .get(DOMAIN_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
        else {
            return Err(self.refuse(&req, "the calling domain is not named"));
        };
        let Some(expected) = self
            .inner
            .peers
            .get(&domain)
            .or(self.inner.default.as_ref())
        else {
            return Err(self.refuse(
                &req,
                "no federation secret is configured for the calling domain",
            ));
        };
        let given = req
            .metadata()
            .get(HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(given, expected) {
            return Err(self.refuse(&req, "missing or wrong federation secret"));
        }
        if self.inner.names_in_certificates && !certificate_names(&req, &domain) {
            return Err(self.refuse(
                &req,
                "the client certificate does not name the calling domain",
            ));
        }
        req.extensions_mut().insert(PeerDomain(domain));
        Ok(req)
    }
}

/// Whether the peer's TLS certificate has `domain` as a DNS name.
fn certificate_names(req: &Request<()>, domain: &str) -> bool {
    let Some(certs) = req.peer_certs() else {
        return false;
    };
    let Some(leaf) = certs.first() else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(domain) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A digest of the mesh secret, published with a registration: members with
/// another tag hold another secret and are not called.
pub fn secret_tag(secret: &str) -> String {
    let digest = Sha256::digest(format!("switchboard-mesh-v1:{secret}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federation_guard_checks_the_named_domains_secret() {
        let mut guard = FederationGuard::new("shared", [("domain-02", "own")]);
        let call = |domain: &str, secret: &str| {
            let mut creds = FederationCredentials::new(domain, secret).expect("creds");
            creds.call(Request::new(())).expect("creds")
        };
        let ok = guard
            .call(call("domain-03", "shared"))
            .expect("default secret");
        assert_eq!(
            ok.extensions().get::<PeerDomain>().map(|d| d.0.as_str()),
            Some("domain-03")
        );
        assert!(guard.call(call("domain-02", "own")).is_ok());
        // domain-02 has a secret of its own: the shared one is not enough.
        let err = guard.call(call("domain-02", "shared")).expect_err("wrong");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(guard.call(call("domain-03", "")).is_err());
        // Without any secret configured, nothing is let in.
        let mut closed = FederationGuard::new("", []);
        assert!(closed.call(call("domain-03", "")).is_err());
    }

    #[test]
    fn guard_accepts_only_the_right_secret() {
        let mut creds = MeshCredentials::new("s3cret").expect("secret");
        let mut guard = MeshGuard::new("s3cret");
        let req = creds.call(Request::new(())).expect("creds");
        assert!(guard.call(req).is_ok());

        let mut wrong = MeshCredentials::new("other").expect("secret");
        let req = wrong.call(Request::new(())).expect("creds");
        let err = guard.call(req).expect_err("wrong secret");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = guard.call(Request::new(())).expect_err("no secret");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);

        assert!(MeshGuard::new("").call(Request::new(())).is_ok());
    }

    #[test]
    fn tags_differ_per_secret() {
        assert_eq!(secret_tag("a"), secret_tag("a"));
        assert_ne!(secret_tag("a"), secret_tag("b"));
        assert_eq!(secret_tag("a").len(), 16);
    }
}

#[cfg(test)]
mod refusal_log_tests {
    use super::RefusalLog;

    #[test]
    fn one_line_per_peer_per_interval_with_the_count_since() {
        let log = RefusalLog::default();
        assert_eq!(
            log.should_log("10.0.0.1"),
            Some(0),
            "the first refusal is logged"
        );
        for _ in 0..5 {
            assert_eq!(log.should_log("10.0.0.1"), None);
        }
        assert_eq!(
            log.should_log("10.0.0.2"),
            Some(0),
            "another peer has its own line"
        );
        // The interval passes for 10.0.0.1: its next line says 5 went unlogged.
        log.peers
            .lock()
            .expect("lock")
            .get_mut("10.0.0.1")
            .expect("entry")
            .0 = 1;
        assert_eq!(log.should_log("10.0.0.1"), Some(5));
    }

    #[test]
    fn many_peers_do_not_grow_the_table_without_bound() {
        let log = RefusalLog::default();
        let logged = (0..5000)
            .filter(|i| log.should_log(&format!("peer-{i}")).is_some())
            .count();
        assert!(log.peers.lock().expect("lock").len() <= super::REFUSAL_PEERS);
        assert_eq!(
            logged,
            super::REFUSAL_LINES as usize,
            "callers from many addresses share one budget of lines"
        );
    }
}
