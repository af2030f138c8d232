//! The instances of one role: lazily connected channels, picked round-robin
//! or by rendezvous hashing on a key, with failover to the next instance and
//! bounded retries when an instance cannot be reached.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::connector::MeshConnector;
use crate::credentials::MeshCredentials;
use crate::error::{CODE_KEY, ServiceError};

/// A channel to one instance, carrying the mesh credentials.
pub type MeshChannel = InterceptedService<Channel, MeshCredentials>;

/// How long a call keeps trying other instances (and waiting for one to
/// appear) before it fails with UNAVAILABLE.
pub const RETRY_BUDGET: Duration = Duration::from_secs(4);
/// How long one attempt on one instance may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct PoolMember {
    id: String,
    addr: String,
    /// Rendezvous weight base: the id's hash, computed once.
    id_hash: u64,
    channel: MeshChannel,
}

/// The live instances of one role.
pub struct Pool {
    role: &'static str,
    connector: MeshConnector,
    members: RwLock<Arc<Vec<PoolMember>>>,
    changed: Notify,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(role: &'static str, connector: MeshConnector) -> Arc<Self> {
        Arc::new(Pool {
            role,
            connector,
            members: RwLock::new(Arc::new(Vec::new())),
            changed: Notify::new(),
            next: AtomicUsize::new(0),
        })
    }

    /// A pool of one fixed instance.
    pub fn fixed(role: &'static str, channel: Channel, credentials: MeshCredentials) -> Arc<Self> {
        let pool = Pool::new(role, MeshConnector::new(credentials.clone(), None));
        pool.set_members(vec![PoolMember {
            id: "fixed".into(),
            addr: String::new(),
            id_hash: hash(b"fixed"),
            channel: InterceptedService::new(channel, credentials),
        }]);
        pool
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    /// Replaces the instance list with `(id, mesh address)` pairs. Channels
    /// of instances that stay (same id and address) are kept; new ones
    /// connect on first use. Returns false when an address is malformed
    /// (that instance is skipped).
    pub fn update(&self, instances: &[(String, String)]) -> bool {
        let old = self.snapshot();
        let mut ok = true;
        let mut members = Vec::with_capacity(instances.len());
        for (id, addr) in instances {
            if let Some(kept) = old.iter().find(|m| &m.id == id && &m.addr == addr) {
                members.push(kept.clone());
                continue;
            }
            match self.connector.channel(addr) {
                Ok(channel) => {
                    members.push(PoolMember {
                        id: id.clone(),
                        addr: addr.clone(),
                        id_hash: hash(id.as_bytes()),
                        channel: InterceptedService::new(
                            channel,
                            self.connector.credentials().clone(),
                        ),
                    });
                }
                Err(e) => {
                    tracing::warn!(role = self.role, %id, error = %e, "instance skipped");
                    ok = false;
                }
            }
        }
        let changed = members.len() != old.len()
            || members
                .iter()
                .zip(old.iter())
                .any(|(a, b)| a.id != b.id || a.addr != b.addr);
        if changed {
            tracing::info!(
                role = self.role,
                instances = ?members.iter().map(|m| format!("{}@{}", m.id, m.addr)).collect::<Vec<_>>(),
                "instances changed"
            );
        }
        self.set_members(members);
        ok
    }

    fn set_members(&self, members: Vec<PoolMember>) {
        *self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(members);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Arc<Vec<PoolMember>> {
        self.members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Ids of the current instances.
    pub fn ids(&self) -> Vec<String> {
        self.snapshot().iter().map(|m| m.id.clone()).collect()
    }

    /// The order to try instances in: by rendezvous weight for `key` (the
    /// owner first, then who takes over when it is gone), or round-robin.
    fn candidates(&self, key: Option<&[u8]>) -> Vec<(String, MeshChannel)> {
        let members = self.snapshot();
        let mut order: Vec<&PoolMember> = members.iter().collect();
        match key {
            Some(key) => {
                let k = hash(key);
                order.sort_by_key(|m| std::cmp::Reverse(rendezvous_weight(k, m.id_hash)));
            }
            None if !order.is_empty() => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(start);
            }
            None => {}
        }
        order
            .into_iter()
            .map(|m| (m.id.clone(), m.channel.clone()))
            .collect()
    }

    /// The instance that owns `key` now.
    pub fn owner(&self, key: &[u8]) -> Option<String> {
        self.candidates(Some(key))
            .into_iter()
            .next()
            .map(|(id, _)| id)
    }

    /// Calls `attempt` on an instance; when the instance cannot be reached
    /// (a transport failure, not an answer), tries the next one, and waits
    /// for instances to appear, all within [`RETRY_BUDGET`]. Requests may
    /// therefore arrive twice when an instance dies after acting on one;
    /// receivers de-duplicate by message id.
    pub async fn call<T, F, Fut>(&self, key: Option<&[u8]>, attempt: F) -> Result<T, ServiceError>
    where
        F: Fn(MeshChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let result = self.call_with_failover(key, attempt).await;
        let status = match &result {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        metrics::histogram!(
            "switchboard_mesh_client_duration_seconds",
            "role" => self.role,
            "status" => status
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    async fn call_with_failover<T, F, Fut>(
        &self,
        key: Option<&[u8]>,
        attempt: F,
    ) -> Result<T, ServiceError>
    where
        F: Fn(MeshChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
        let mut pause = Duration::from_millis(50);
        let mut last_error: Option<String> = None;
        loop {
            let candidates = self.candidates(key);
            if candidates.is_empty() {
                let notified = self.changed.notified();
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(ServiceError::unavailable(format!(
                        "no {} instance is available",
                        self.role
                    )));
                }
                continue;
            }
            for (id, channel) in candidates {
                match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(channel)).await {
                    Ok(Ok(reply)) => return Ok(reply.into_inner()),
                    Ok(Err(status)) if is_transport_failure(&status) => {
                        tracing::debug!(role = self.role, %id, error = %status, "instance unreachable; trying the next");
                        last_error = Some(format!("{id}: {}", status.message()));
                    }
                    Ok(Err(status)) => return Err(ServiceError::from(status)),
                    Err(_) => {
                        tracing::debug!(role = self.role, %id, "instance timed out; trying the next");
                        last_error = Some(format!("{id}: timed out"));
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(ServiceError::unavailable(format!(
                    "no {} instance answered ({})",
                    self.role,
                    last_error.unwrap_or_default()
                )));
            }
            // Wait for a membership change or a short pause, then retry.
            let notified = self.changed.notified();
            let _ = tokio::time::timeout(pause, notified).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// A status that no instance produced as an answer: the call never reached
/// a role implementation, or its connection broke (refused, reset, an HTTP/2
/// protocol error from an instance killed mid-call: `INTERNAL` without our
/// code). Role answers always carry their code in the metadata.
fn is_transport_failure(status: &tonic::Status) -> bool {
    if status.metadata().contains_key(CODE_KEY) {
        return false;
    }
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    )
}

fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The owner of `key` among instance `ids`, as a pool of them picks it
/// (for an instance checking that it owns a key).
pub fn owner_among<'a>(ids: &'a [String], key: &[u8]) -> Option<&'a str> {
    let k = hash(key);
    ids.iter()
        .max_by_key(|id| rendezvous_weight(k, hash(id.as_bytes())))
        .map(String::as_str)
}

/// The rendezvous key of a user's inbox (sharded delivery).
pub fn inbox_key(app_id: &str, user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(app_id.len() + 1 + user_id.len());
    key.extend_from_slice(app_id.as_bytes());
    // Not in an app id: ("a", "bc") and ("ab", "c") differ.
    key.push(0);
    key.extend_from_slice(user_id.as_bytes());
    key
}

/// Highest-random-weight score of an instance for a key.
fn rendezvous_weight(key_hash: u64, id_hash: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&key_hash.to_le_bytes());
    buf[8..].copy_from_slice(&id_hash.to_le_bytes());
    hash(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(ids: &[&str]) -> Arc<Pool> {
        let pool = Pool::new("groups", MeshConnector::default());
        let instances: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ((*id).to_owned(), format!("http://127.0.0.1:{}", 10_000 + i)))
            .collect();
        assert!(pool.update(&instances));
        pool
    }

    #[tokio::test]
    async fn rendezvous_moves_only_the_keys_of_a_removed_instance() {
        let three = pool_of(&["a", "b", "c"]);
        let two = pool_of(&["a", "b"]);
        let mut moved = 0;
        let mut per_owner = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("group-{i}");
            let before = three.owner(key.as_bytes()).expect("owner");
            let after = two.owner(key.as_bytes()).expect("owner");
            *per_owner.entry(before.clone()).or_insert(0) += 1;
            if before != "c" {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            } else {
                moved += 1;
            }
        }
        // Roughly a third each.
        for (owner, n) in per_owner {
            assert!((800..1200).contains(&n), "{owner} owns {n} of 3000");
        }
        assert!(moved > 800);
    }

    #[tokio::test]
    async fn update_keeps_channels_and_reports_bad_addresses() {
        let pool = pool_of(&["a"]);
        assert!(!pool.update(&[
            ("a".into(), "http://127.0.0.1:10000".into()),
            ("b".into(), "not a uri".into()),
        ]));
        assert_eq!(pool.ids(), vec!["a".to_owned()]);
    }

    #[test]
    fn broken_connections_are_transport_failures_and_answers_are_not() {
        assert!(is_transport_failure(&tonic::Status::internal(
            "h2 protocol error: http2 error"
        )));
        assert!(is_transport_failure(&tonic::Status::unavailable(
            "connection refused"
        )));
        let answer: tonic::Status =
            ServiceError::new(crate::ErrorCode::Internal, "a role failed").into();
        assert!(!is_transport_failure(&answer), "a role's answer is final");
        assert!(!is_transport_failure(&tonic::Status::invalid_argument(
            "bad"
        )));
    }

    #[tokio::test]
    async fn an_empty_pool_fails_with_unavailable_after_the_budget() {
        tokio::time::pause();
        let pool = Pool::new("router", MeshConnector::default());
        let err = pool
            .call(None, |ch| async move {
                crate::pb::router_client::RouterClient::new(ch)
                    .route(crate::pb::RouteRequest::default())
                    .await
            })
            .await
            .expect_err("no instance");
        assert_eq!(err.code, crate::ErrorCode::Unavailable);
        assert!(
            err.message.contains("no router instance"),
            "{}",
            err.message
        );
    }
}
