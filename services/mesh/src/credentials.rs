//! Mesh credentials: every mesh call carries the mesh secret, and the mesh
//! port refuses calls without it.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

const HEADER: &str = "authorization";

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

/// Server side: refuses (UNAUTHENTICATED, logged) every call whose secret is
/// missing or wrong. With an empty secret, every call is let in.
#[derive(Clone)]
pub struct MeshGuard {
    expected: Option<Arc<[u8]>>,
}

impl MeshGuard {
    pub fn new(secret: &str) -> Self {
        MeshGuard {
            expected: (!secret.is_empty())
                .then(|| Arc::from(format!("Bearer {secret}").as_bytes())),
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
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".to_owned());
        tracing::warn!(%peer, "mesh call refused: missing or wrong mesh secret");
        Err(Status::unauthenticated("missing or wrong mesh secret"))
    }
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
