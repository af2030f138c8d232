//! JSON Web Key Sets of apps (`jwks_url`): fetched with reqwest when first
//! needed, kept per URL, fetched again when a token names a `kid` the set
//! does not have (at most once per [`JWKS_MIN_REFETCH`]) and when the set is
//! older than [`JWKS_REFRESH`]. A set that cannot be fetched is
//! UNAVAILABLE to the client (retry), never a refusal; a stale set that has
//! the key keeps serving while its URL is down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use switchboard_mesh::ServiceError;

/// How long one fetch of a key set may take.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(3);
/// A set older than this is fetched again at its next use.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Unknown `kid`s fetch the set again at most this often per URL: tokens
/// with made-up `kid`s must not turn into a stream of fetches.
pub const JWKS_MIN_REFETCH: Duration = Duration::from_secs(1);
/// Most keys kept from one set.
const MAX_KEYS: usize = 64;
/// Largest key set body read.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// One usable key of a set.
#[derive(Clone)]
struct SetKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

struct Fetched {
    keys: Vec<SetKey>,
    at: Instant,
}

#[derive(Default)]
struct Entry {
    fetched: Mutex<Option<Arc<Fetched>>>,
    /// When the last fetch (successful or not) began: the rate limit.
    last_attempt: Mutex<Option<Instant>>,
    /// One fetch at a time per URL; waiters use its result.
    fetching: tokio::sync::Mutex<()>,
}

/// The key sets of every app, by URL.
#[derive(Default)]
pub(crate) struct Jwks {
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
    sets: Mutex<HashMap<String, Arc<Entry>>>,
}

/// The outcome of looking a token's key up: a key, or why the token is
/// refused.
pub(crate) type Lookup = Result<DecodingKey, String>;

impl Jwks {
    fn client(&self) -> Result<&reqwest::Client, ServiceError> {
        self.client
            .get_or_init(|| {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .timeout(JWKS_TIMEOUT)
                    .connect_timeout(JWKS_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ServiceError::unavailable(format!("no HTTP client for key sets: {e}")))
    }

    fn entry(&self, url: &str) -> Arc<Entry> {
        let mut sets = self
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sets.entry(url.to_owned()).or_default().clone()
    }

    /// The key of `url`'s set for a token of `alg` naming `kid`.
    pub(crate) async fn key(
        &self,
        url: &str,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Lookup, ServiceError> {
        let entry = self.entry(url);
        let current = lock(&entry.fetched).clone();
        if let Some(set) = &current
            && set.at.elapsed() < JWKS_REFRESH
        {
            if let Some(key) = find(set, kid, alg) {
                return Ok(Ok(key));
            }
            if !may_refetch(&entry) {
                return Ok(Err(unknown(kid)));
            }
        }
        // Fetch (once for all who wait), then look again.
        let asked = Instant::now();
        let _one = entry.fetching.lock().await;
        let newer = lock(&entry.fetched).clone();
        let fetched_meanwhile = match (&current, &newer) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        let failed_meanwhile =
            !fetched_meanwhile && lock(&entry.last_attempt).is_some_and(|at| at > asked);
        let set = if fetched_meanwhile {
            newer
        } else if failed_meanwhile {
            // The fetch this call waited for failed: so does this one.
            if let Some(key) = newer.as_deref().and_then(|s| find(s, kid, alg)) {
                return Ok(Ok(key));
            }
            return Err(ServiceError::unavailable(
                "the app's key set cannot be fetched; retry",
            ));
        } else {
            *lock(&entry.last_attempt) = Some(Instant::now());
            match self.fetch(url).await {
                Ok(set) => {
                    let set = Arc::new(set);
                    *lock(&entry.fetched) = Some(set.clone());
                    Some(set)
                }
                Err(e) => {
                    // A stale set that has the key keeps serving.
                    if let Some(key) = newer.as_deref().and_then(|s| find(s, kid, alg)) {
                        tracing::warn!(%url, error = %e, "key set not refreshed; using the one held");
                        return Ok(Ok(key));
                    }
                    return Err(e);
                }
            }
        };
        Ok(set
            .as_deref()
            .and_then(|s| find(s, kid, alg))
            .ok_or_else(|| unknown(kid)))
    }

    async fn fetch(&self, url: &str) -> Result<Fetched, ServiceError> {
        let started = Instant::now();
        let unavailable = |why: String| {
            metrics::counter!("switchboard_auth_jwks_fetches_total", "outcome" => "unavailable")
                .increment(1);
            tracing::warn!(%url, %why, "cannot fetch the app's key set");
            ServiceError::unavailable(format!(
                "the app's key set cannot be fetched ({why}); retry"
            ))
        };
        let response = self.client()?.get(url).send().await.map_err(|e| {
            unavailable(if e.is_timeout() {
                format!("no answer within {JWKS_TIMEOUT:?}")
            } else {
                "cannot reach it".to_owned()
            })
        })?;
        if !response.status().is_success() {
            return Err(unavailable(format!("it answered {}", response.status())));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(unavailable("the set is too large".to_owned()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|_| unavailable("the answer broke off".to_owned()))?;
        if body.len() > MAX_BODY_BYTES {
            return Err(unavailable("the set is too large".to_owned()));
        }
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("not a JSON Web Key Set: {e}")))?;
        let keys: Vec<SetKey> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let alg = algorithm_of(jwk)?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some(SetKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                })
            })
            .take(MAX_KEYS)
            .collect();
        metrics::counter!("switchboard_auth_jwks_fetches_total", "outcome" => "fetched")
            .increment(1);
        metrics::histogram!("switchboard_auth_jwks_fetch_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(%url, keys = keys.len(), "app key set fetched");
        Ok(Fetched {
            keys,
            at: Instant::now(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn may_refetch(entry: &Entry) -> bool {
    lock(&entry.last_attempt).is_none_or(|at| at.elapsed() >= JWKS_MIN_REFETCH)
}

fn unknown(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!("token key id {kid:?} is not in the app's key set"),
        None => "no key of the app's key set fits the token".to_owned(),
    }
}

/// The key for `kid` (or, without one, the only key of the algorithm),
/// when its algorithm is the token's.
fn find(set: &Fetched, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    let mut fitting = set.keys.iter().filter(|k| k.alg == alg);
    match kid {
        Some(kid) => fitting
            .find(|k| k.kid.as_deref() == Some(kid))
            .map(|k| k.key.clone()),
        None => {
            let first = fitting.next()?;
            fitting.next().is_none().then(|| first.key.clone())
        }
    }
}

/// The signing algorithm a key is for: its `alg`, or what its type implies
/// (RSA: RS256, P-256: ES256, Ed25519: EdDSA). Only RS256, ES256 and EdDSA
/// are accepted.
fn algorithm_of(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(KeyAlgorithm::EdDSA) if implied == Algorithm::EdDSA => Some(implied),
        Some(_) => None,
    }
}
