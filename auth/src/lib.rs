//! The auth role: the registry of client apps and credential checks.
//!
//! Apps come from the control-plane metadata ([`AuthRole::follow`]): the
//! config file's when standalone, etcd's in a cluster. The registry follows
//! their changes while the process runs: a connection authenticates against
//! the apps as they are when it sends AUTH_CLIENT.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use switchboard_config::{ApiKeyConfig, AppConfig, AuthMode};
use switchboard_mesh::{ErrorCode, ServiceError, pb};
use switchboard_metadata::{Kind, Metadata, MetadataError, MetadataExt};
use tokio::sync::broadcast::error::RecvError;

mod jwks;

pub use jwks::{JWKS_MIN_REFETCH, JWKS_REFRESH, JWKS_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("app {app:?}: cannot read JWT public key {path}: {source}")]
    KeyFile {
        app: String,
        path: String,
        source: std::io::Error,
    },
    #[error("app {app:?}: invalid JWT key: {source}")]
    Key {
        app: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("cannot read the apps: {0}")]
    Metadata(#[from] MetadataError),
}

#[derive(Clone)]
struct RegisteredApp {
    config: AppConfig,
    hs256: Option<DecodingKey>,
    /// The configured public key and the algorithm its kind signs with
    /// (RSA: RS256, P-256: ES256, Ed25519: EdDSA).
    public: Option<(Algorithm, DecodingKey)>,
}

type Registry = HashMap<String, RegisteredApp>;

/// The apps of this deployment and how their clients authenticate.
pub struct AuthRole {
    /// Replaced whole when the apps change; a check holds the one it began
    /// with.
    apps: RwLock<Arc<Registry>>,
    /// The apps of the federation's topology (every domain serves them);
    /// an app of this deployment's own with the same id wins.
    federated: RwLock<Arc<Registry>>,
    /// Calls to apps' auth URLs, and their positive answers remembered.
    url_auth: UrlAuth,
    /// Apps' JSON Web Key Sets, fetched and kept.
    jwks: jwks::Jwks,
    /// Dropped with the role: the task following the apps (if any) ends.
    _followed: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Pause between attempts to read the apps again after a change, while the
/// metadata backend does not answer.
const RELOAD_RETRY: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
struct Claims {
    #[allow(dead_code)]
    sub: String,
}

impl AuthRole {
    /// A fixed set of apps; any invalid one is an error.
    pub fn new(apps: Vec<AppConfig>) -> Result<Self, AuthError> {
        Ok(AuthRole {
            apps: RwLock::new(Arc::new(build(apps, true)?)),
            federated: RwLock::default(),
            url_auth: UrlAuth::default(),
            jwks: jwks::Jwks::default(),
            _followed: None,
        })
    }

    /// The apps of `metadata`, followed: every change there is in force
    /// for the next AUTH_CLIENT. With no app at all, the built-in
    /// development app `demo` stands in (as with a config file without
    /// apps) — until the first app appears: from then on no app means no
    /// client gets in, never the development app. `strict`: an app that cannot be used (unreadable key file,
    /// invalid key) fails the start; otherwise it is left out with an
    /// error logged, and the other apps serve. Reloads are never strict:
    /// a bad record written while running must not take every app down.
    pub async fn follow(metadata: Arc<dyn Metadata>, strict: bool) -> Result<Arc<Self>, AuthError> {
        // Subscribed before the first read: no change falls in between.
        let mut changes = metadata.changes();
        let apps = metadata.list_records::<AppConfig>().await?;
        // Only a deployment that never had an app is served the development
        // app: once apps exist, losing them all (the last one deleted,
        // records no build can read) must not open an app without auth.
        let mut had_apps = !apps.is_empty();
        let (followed, mut role_dropped) = tokio::sync::oneshot::channel::<()>();
        let role = Arc::new(AuthRole {
            apps: RwLock::new(Arc::new(build(or_demo(apps), strict)?)),
            federated: RwLock::default(),
            url_auth: UrlAuth::default(),
            jwks: jwks::Jwks::default(),
            _followed: Some(followed),
        });
        let weak: Weak<AuthRole> = Arc::downgrade(&role);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    _ = &mut role_dropped => return,
                    change = changes.recv() => change,
                };
                match change {
                    Ok(change) if change.kind != Kind::Apps => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                // Many changes at once (an `apps put` of a file): one reload.
                while changes.try_recv().is_ok() {}
                loop {
                    let Some(role) = weak.upgrade() else { return };
                    match metadata.list_records::<AppConfig>().await {
                        Ok(apps) => {
                            had_apps |= !apps.is_empty();
                            let apps = if had_apps {
                                if apps.is_empty() {
                                    tracing::error!(
                                        "no apps left in the metadata: every client is refused until one is added"
                                    );
                                }
                                apps
                            } else {
                                or_demo(apps)
                            };
                            let registry = build(apps, false).unwrap_or_default();
                            tracing::info!(apps = registry.len(), "apps reloaded");
                            *role
                                .apps
                                .write()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                Arc::new(registry);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the changed apps; retrying");
                            drop(role);
                            tokio::time::sleep(RELOAD_RETRY).await;
                        }
                    }
                }
            }
        });
        Ok(role)
    }

    /// Whether `app` could be served (its keys load).
    pub fn check_app(app: &AppConfig) -> Result<(), AuthError> {
        register(app.clone()).map(|_| ())
    }

    fn registry(&self) -> Arc<Registry> {
        self.apps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the apps of the federation's topology. An app whose
    /// `authEnabled` is set is served with token checks only where this
    /// domain's own config gives the same app id a key.
    pub fn set_federated_apps(&self, apps: Vec<AppConfig>) {
        let registry = build(apps, false).unwrap_or_default();
        tracing::info!(
            apps = registry.len(),
            "apps of the federation topology in force"
        );
        *self
            .federated
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(registry);
    }

    /// The app `app_id`: this deployment's own, else the federation's. The
    /// built-in development app is not served once a federation has apps.
    fn app(&self, app_id: &str) -> Option<RegisteredApp> {
        let own = self.registry();
        let federated = self
            .federated
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match own.get(app_id) {
            Some(app) if federated.is_empty() || app.config != AppConfig::demo() => {
                Some(app.clone())
            }
            _ => federated.get(app_id).cloned(),
        }
    }

    /// `auth = "jwt"`: the token's signature (by its algorithm: the
    /// app's secret, its public key, or its key set's key for the token's
    /// `kid`), `exp`, `nbf`, `sub` = the user, and `aud` when the app names
    /// one (then a token without `aud` is refused). `Ok(Err(reason))`: refused;
    /// `Err`: the key set cannot be fetched (the client may retry).
    async fn check_jwt(
        &self,
        app: &RegisteredApp,
        user_id: &str,
        token: &str,
    ) -> Result<Result<(), String>, ServiceError> {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(e) => return Ok(Err(format!("invalid token: {e}"))),
        };
        let not_accepted = || {
            format!(
                "token algorithm {:?} is not accepted for this app",
                header.alg
            )
        };
        let static_key = match header.alg {
            Algorithm::HS256 => app.hs256.clone(),
            alg => app
                .public
                .as_ref()
                .filter(|(a, _)| *a == alg)
                .map(|(_, key)| key.clone()),
        };
        let from_set = matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        );
        let key = match (static_key, app.config.jwks_url.as_deref()) {
            // A token naming a key id is checked with the set's key.
            (Some(key), url) if header.kid.is_none() || url.is_none() => key,
            (_, Some(url)) if from_set => {
                match self
                    .jwks
                    .key(url, header.kid.as_deref(), header.alg)
                    .await?
                {
                    Ok(key) => key,
                    Err(reason) => return Ok(Err(reason)),
                }
            }
            _ => return Ok(Err(not_accepted())),
        };
        let mut validation = Validation::new(header.alg);
        validation.sub = Some(user_id.to_owned());
        validation.leeway = 5;
        validation.validate_nbf = true;
        match &app.config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        use jsonwebtoken::errors::ErrorKind;
        Ok(jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|_| ())
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_owned(),
                ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => "invalid token signature".to_owned(),
                ErrorKind::InvalidSubject => "token subject does not match userId".to_owned(),
                ErrorKind::InvalidAudience => "token audience is not this app's".to_owned(),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("token has no {claim:?} claim")
                }
                _ => format!("invalid token: {e}"),
            }))
    }
}

/// How long one call to an app's auth URL may take: past it the client is
/// told to retry (UNAVAILABLE), not refused.
pub const AUTH_URL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a positive answer of an auth URL is remembered (at most; an
/// `expiresAt` in the answer shortens it).
pub const AUTH_URL_CACHE: Duration = Duration::from_secs(60);
/// Most answers remembered; past it the expired ones are dropped, then all.
const AUTH_URL_CACHE_ENTRIES: usize = 100_000;

/// An accepted credential: app id, user id, SHA-256 of the token.
type UrlAuthKey = (String, String, [u8; 32]);

/// Calls to apps' auth URLs (`auth = "url"`).
#[derive(Default)]
struct UrlAuth {
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
    /// (app id, user id, SHA-256 of the token) → until when it is accepted.
    accepted: std::sync::Mutex<HashMap<UrlAuthKey, std::time::Instant>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct UrlAuthRequest<'a> {
    app_id: &'a str,
    user_id: &'a str,
    token: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UrlAuthAnswer {
    is_authenticated: bool,
    /// Unix milliseconds after which the answer no longer holds.
    #[serde(default)]
    expires_at: Option<i64>,
}

impl UrlAuth {
    fn client(&self) -> Result<&reqwest::Client, ServiceError> {
        self.client
            .get_or_init(|| {
                // reqwest's rustls needs the process-wide crypto provider;
                // another part of the process may have installed it.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .timeout(AUTH_URL_TIMEOUT)
                    .connect_timeout(AUTH_URL_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ServiceError::unavailable(format!("no HTTP client for auth URLs: {e}")))
    }
}

impl AuthRole {
    /// `auth = "url"`: the app's service decides. Its positive answers are
    /// remembered; an answer that does not come (down, slow, 5xx) is
    /// UNAVAILABLE to the client, who may retry — never a refusal.
    async fn check_url(
        &self,
        app: &RegisteredApp,
        req: &pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError> {
        use sha2::Digest;
        let accepted = || pb::VerifyClientReply {
            authenticated: true,
            reason: String::new(),
            app_name: app.config.name.clone(),
            master_user_id: app.config.master_user_id.clone(),
            allowed_origins: app.config.allowed_origins.clone(),
        };
        let key = (
            req.app_id.clone(),
            req.user_id.clone(),
            <[u8; 32]>::from(sha2::Sha256::digest(req.token.as_bytes())),
        );
        let now = std::time::Instant::now();
        if self
            .url_auth
            .accepted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            metrics::counter!("switchboard_auth_url_total", "outcome" => "cached").increment(1);
            return Ok(accepted());
        }
        let Some(url) = app.config.auth_url.as_deref() else {
            return Ok(refuse("this app's auth URL is not configured"));
        };
        let started = std::time::Instant::now();
        let answer = self
            .url_auth
            .client()?
            .post(url)
            .json(&UrlAuthRequest {
                app_id: &req.app_id,
                user_id: &req.user_id,
                token: &req.token,
            })
            .send()
            .await;
        metrics::histogram!("switchboard_auth_url_seconds").record(started.elapsed().as_secs_f64());
        let unavailable = |why: String| {
            metrics::counter!("switchboard_auth_url_total", "outcome" => "unavailable")
                .increment(1);
            tracing::warn!(app = %app.config.name, %why, "the app's auth URL did not answer");
            ServiceError::unavailable(format!(
                "the app's auth service did not answer ({why}); retry"
            ))
        };
        let response = answer.map_err(|e| {
            unavailable(if e.is_timeout() {
                format!("no answer within {AUTH_URL_TIMEOUT:?}")
            } else {
                "cannot reach it".to_owned()
            })
        })?;
        if !response.status().is_success() {
            return Err(unavailable(format!("it answered {}", response.status())));
        }
        let answer: UrlAuthAnswer = response
            .json()
            .await
            .map_err(|_| unavailable("its answer is not {\"isAuthenticated\": …}".to_owned()))?;
        if !answer.is_authenticated {
            metrics::counter!("switchboard_auth_url_total", "outcome" => "refused").increment(1);
            return Ok(refuse("refused by the app's auth service"));
        }
        metrics::counter!("switchboard_auth_url_total", "outcome" => "accepted").increment(1);
        let mut keep = AUTH_URL_CACHE;
        if let Some(at) = answer.expires_at {
            let left_ms = at.saturating_sub(switchboard_mesh::now_ms());
            keep = keep.min(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)));
        }
        if !keep.is_zero() {
            let mut cache = self
                .url_auth
                .accepted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cache.len() >= AUTH_URL_CACHE_ENTRIES {
                cache.retain(|_, until| *until > now);
                if cache.len() >= AUTH_URL_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, now + keep);
        }
        Ok(accepted())
    }
}

fn or_demo(apps: Vec<AppConfig>) -> Vec<AppConfig> {
    if apps.is_empty() {
        tracing::warn!(
            "no apps configured; serving the built-in development app \"demo\" (auth none)"
        );
        vec![AppConfig::demo()]
    } else {
        let open: Vec<&str> = apps
            .iter()
            .filter(|a| a.allowed_origins.is_empty())
            .map(|a| a.name.as_str())
            .collect();
        if !open.is_empty() {
            tracing::info!(
                apps = %open.join(","),
                "these apps accept WebSocket connections from web pages of any origin \
                 (set allowed_origins to limit them)"
            );
        }
        apps
    }
}

/// The registry of `apps`; with `strict`, the first app that cannot be
/// used is the error, otherwise it is logged and left out.
fn build(apps: Vec<AppConfig>, strict: bool) -> Result<Registry, AuthError> {
    let mut registered = HashMap::new();
    for app in apps {
        let id = app.app_id.clone();
        match register(app) {
            Ok(r) => {
                registered.insert(id, r);
            }
            Err(e) if strict => return Err(e),
            Err(e) => tracing::error!(app = %id, error = %e, "app left out: it cannot be used"),
        }
    }
    Ok(registered)
}

fn register(app: AppConfig) -> Result<RegisteredApp, AuthError> {
    let key_err = |source| AuthError::Key {
        app: app.name.clone(),
        source,
    };
    let hs256 = app
        .jwt_secret
        .as_ref()
        .map(|s| DecodingKey::from_secret(s.as_bytes()));
    let pem = match (&app.jwt_public_key_pem, &app.jwt_public_key_file) {
        (Some(pem), _) => Some(pem.clone().into_bytes()),
        (None, Some(path)) => Some(std::fs::read(path).map_err(|source| AuthError::KeyFile {
            app: app.name.clone(),
            path: path.display().to_string(),
            source,
        })?),
        (None, None) => None,
    };
    // The key's kind decides the algorithm it checks.
    let public = pem
        .map(|pem| match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => Ok((Algorithm::RS256, key)),
            Err(rsa) => DecodingKey::from_ec_pem(&pem)
                .map(|key| (Algorithm::ES256, key))
                .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|key| (Algorithm::EdDSA, key)))
                .map_err(|_| key_err(rsa)),
        })
        .transpose()?;
    Ok(RegisteredApp {
        config: app,
        hs256,
        public,
    })
}

/// The key of `keys` whose hash is the SHA-256 of `presented`. Every key is
/// compared, each in constant time, so the time taken tells nothing about
/// which bytes matched.
fn find_api_key<'a>(keys: &'a [ApiKeyConfig], presented: &str) -> Option<&'a ApiKeyConfig> {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let digest = sha2::Sha256::digest(presented.as_bytes());
    let mut hex = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        hex[2 * i] = DIGITS[usize::from(b >> 4)];
        hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    let mut found = None;
    for key in keys {
        if bool::from(key.sha256.as_bytes().ct_eq(&hex)) && found.is_none() {
            found = Some(key);
        }
    }
    found
}

fn refuse(reason: impl Into<String>) -> pb::VerifyClientReply {
    pb::VerifyClientReply {
        authenticated: false,
        reason: reason.into(),
        ..Default::default()
    }
}

#[async_trait]
impl switchboard_mesh::Auth for AuthRole {
    #[tracing::instrument(name = "auth.verify", skip_all, fields(app = %req.app_id))]
    async fn verify_client(
        &self,
        req: pb::VerifyClientRequest,
    ) -> Result<pb::VerifyClientReply, ServiceError> {
        let Some(app) = self.app(&req.app_id) else {
            return Ok(refuse("unknown appId"));
        };
        let app = &app;
        let prefix_ok = req
            .user_id
            .strip_prefix(app.config.name.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|id| !id.is_empty());
        if !prefix_ok {
            return Ok(refuse(format!(
                "userId must be {}-<id> for this app",
                app.config.name
            )));
        }
        if app.config.auth == AuthMode::Url {
            return self.check_url(app, &req).await;
        }
        if app.config.auth == AuthMode::Jwt
            && app.hs256.is_none()
            && app.public.is_none()
            && app.config.jwks_url.is_none()
        {
            return Ok(refuse(
                "this app requires authentication and this domain has no key to check its tokens",
            ));
        }
        if app.config.auth == AuthMode::Jwt
            && let Err(reason) = self.check_jwt(app, &req.user_id, &req.token).await?
        {
            tracing::debug!(app = %app.config.name, %reason, "client token refused");
            return Ok(refuse(reason));
        }
        Ok(pb::VerifyClientReply {
            authenticated: true,
            reason: String::new(),
            app_name: app.config.name.clone(),
            master_user_id: app.config.master_user_id.clone(),
            allowed_origins: app.config.allowed_origins.clone(),
        })
    }

    #[tracing::instrument(name = "auth.verify_api_key", skip_all, fields(app = %req.app_id))]
    async fn verify_api_key(
        &self,
        req: pb::VerifyApiKeyRequest,
    ) -> Result<pb::VerifyApiKeyReply, ServiceError> {
        let Some(app) = self.app(&req.app_id) else {
            return Ok(pb::VerifyApiKeyReply::default());
        };
        let Some(key) = find_api_key(&app.config.api_keys, &req.key) else {
            tracing::debug!(app = %app.config.name, "api key refused");
            return Ok(pb::VerifyApiKeyReply::default());
        };
        Ok(pb::VerifyApiKeyReply {
            valid: true,
            app_name: app.config.name.clone(),
            master_user_id: app.config.master_user_id.clone(),
            key_name: key.name.clone(),
            scopes: key.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        })
    }

    async fn get_app(&self, req: pb::GetAppRequest) -> Result<pb::App, ServiceError> {
        let app = self
            .app(&req.app_id)
            .ok_or_else(|| ServiceError::new(ErrorCode::InvalidRecipient, "unknown appId"))?;
        Ok(pb::App {
            app_id: app.config.app_id.clone(),
            name: app.config.name.clone(),
            master_user_id: app.config.master_user_id.clone(),
            topic_publish: app.config.topic_publish.as_str().to_owned(),
            anonymous_rooms: app.config.anonymous_rooms,
            allowed_origins: app.config.allowed_origins.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_mesh::Auth;

    fn jwt_app() -> AppConfig {
        AppConfig {
            name: "ANZ".into(),
            app_id: "app-1".into(),
            master_user_id: "ANZ-0".into(),
            auth: AuthMode::Jwt,
            jwt_secret: Some("s3cret".into()),
            jwt_public_key_pem: None,
            jwt_public_key_file: None,
            jwt_audience: None,
            auth_url: None,
            ..AppConfig::demo()
        }
    }

    fn token(secret: &str, sub: &str, exp: i64) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": sub, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn sha256_hex(text: &str) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn api_keys_are_matched_by_hash_with_their_scopes() {
        use switchboard_config::{ApiKeyConfig, ApiScope};
        let mut app = jwt_app();
        app.api_keys = vec![
            ApiKeyConfig {
                name: "backend".into(),
                sha256: sha256_hex("key-one"),
                scopes: vec![ApiScope::Send],
            },
            ApiKeyConfig {
                name: "ops".into(),
                sha256: sha256_hex("key-two"),
                scopes: vec![ApiScope::Presence, ApiScope::Admin],
            },
        ];
        let role = AuthRole::new(vec![app]).expect("role");
        let check = |app: &str, key: &str| {
            role.verify_api_key(pb::VerifyApiKeyRequest {
                app_id: app.into(),
                key: key.into(),
            })
        };
        let one = check("app-1", "key-one").await.expect("reply");
        assert!(one.valid);
        assert_eq!(
            (one.key_name.as_str(), one.scopes.clone()),
            ("backend", vec!["send".to_owned()])
        );
        assert_eq!(
            (one.app_name.as_str(), one.master_user_id.as_str()),
            ("ANZ", "ANZ-0")
        );
        let two = check("app-1", "key-two").await.expect("reply");
        assert_eq!(two.scopes, vec!["presence".to_owned(), "admin".to_owned()]);
        for (app, key) in [
            ("app-1", "key-on"),
            ("app-1", ""),
            ("app-1", &sha256_hex("key-one")),
            ("other", "key-one"),
        ] {
            let reply = check(app, key).await.expect("reply");
            assert!(!reply.valid && reply.scopes.is_empty(), "{app} {key}");
        }
    }

    #[tokio::test]
    async fn audience_is_checked_only_when_configured() {
        let with_aud = |aud: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "ANZ-1", "exp": now() + 600, "aud": aud}),
                &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
            )
            .expect("encode")
        };
        let role = AuthRole::new(vec![jwt_app()]).expect("role");
        assert!(
            verify(&role, "app-1", "ANZ-1", &with_aud("anything"))
                .await
                .authenticated
        );
        let mut app = jwt_app();
        app.jwt_audience = Some("switchboard".into());
        let role = AuthRole::new(vec![app]).expect("role");
        assert!(
            verify(&role, "app-1", "ANZ-1", &with_aud("switchboard"))
                .await
                .authenticated
        );
        assert!(
            !verify(&role, "app-1", "ANZ-1", &with_aud("other"))
                .await
                .authenticated
        );
    }

    #[tokio::test]
    async fn a_named_audience_requires_aud_and_nbf_is_honoured() {
        let token = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
            )
            .expect("encode")
        };
        let mut app = jwt_app();
        app.jwt_audience = Some("switchboard".into());
        let role = AuthRole::new(vec![app]).expect("role");
        let no_aud = verify(
            &role,
            "app-1",
            "ANZ-1",
            &token(serde_json::json!({"sub": "ANZ-1", "exp": now() + 600})),
        )
        .await;
        assert!(!no_aud.authenticated);
        assert!(no_aud.reason.contains("aud"), "{}", no_aud.reason);

        let role = AuthRole::new(vec![jwt_app()]).expect("role");
        let later = verify(
            &role,
            "app-1",
            "ANZ-1",
            &token(serde_json::json!({"sub": "ANZ-1", "exp": now() + 600, "nbf": now() + 300})),
        )
        .await;
        assert!(!later.authenticated);
        assert!(later.reason.contains("nbf"), "{}", later.reason);
        let now_valid = verify(
            &role,
            "app-1",
            "ANZ-1",
            &token(serde_json::json!({"sub": "ANZ-1", "exp": now() + 600, "nbf": now() - 1})),
        )
        .await;
        assert!(now_valid.authenticated, "{}", now_valid.reason);
    }

    const RS_PRIVATE: &str = include_str!("../tests/fixtures/test-rs256.key.pem");
    const RS_PUBLIC: &str = include_str!("../tests/fixtures/test-rs256.pub.pem");

    #[tokio::test]
    async fn rs256_with_public_key() {
        let mut app = jwt_app();
        app.jwt_secret = None;
        app.jwt_public_key_pem = Some(RS_PUBLIC.into());
        let role = AuthRole::new(vec![app]).expect("role");
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).expect("key");
        let good = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            &serde_json::json!({"sub": "ANZ-1", "exp": now() + 600}),
            &key,
        )
        .expect("encode");
        assert!(verify(&role, "app-1", "ANZ-1", &good).await.authenticated);
        // An HS256 token is refused when the app only has an RS256 key.
        let hs = token("s3cret", "ANZ-1", now() + 600);
        assert!(!verify(&role, "app-1", "ANZ-1", &hs).await.authenticated);
    }

    async fn verify(role: &AuthRole, app: &str, user: &str, token: &str) -> pb::VerifyClientReply {
        role.verify_client(pb::VerifyClientRequest {
            app_id: app.into(),
            user_id: user.into(),
            token: token.into(),
        })
        .await
        .expect("verify")
    }

    fn now() -> i64 {
        switchboard_mesh::now_ms() / 1000
    }

    #[tokio::test]
    async fn hs256_checks_signature_subject_and_expiry() {
        let role = AuthRole::new(vec![jwt_app()]).expect("role");
        let good = token("s3cret", "ANZ-1", now() + 600);
        assert!(verify(&role, "app-1", "ANZ-1", &good).await.authenticated);
        let r = verify(&role, "app-1", "ANZ-2", &good).await;
        assert!(
            !r.authenticated && r.reason.contains("subject"),
            "{}",
            r.reason
        );
        let forged = token("other", "ANZ-1", now() + 600);
        let r = verify(&role, "app-1", "ANZ-1", &forged).await;
        assert!(
            !r.authenticated && r.reason.contains("signature"),
            "{}",
            r.reason
        );
        let expired = token("s3cret", "ANZ-1", now() - 3600);
        let r = verify(&role, "app-1", "ANZ-1", &expired).await;
        assert!(
            !r.authenticated && r.reason.contains("expired"),
            "{}",
            r.reason
        );
    }

    /// Polls until `verify` gives `want` (changes are applied by a task).
    async fn eventually(role: &AuthRole, app: &str, user: &str, want: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while verify(role, app, user, "").await.authenticated != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{app}/{user}: still not {want} after 2 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn apps_follow_the_metadata_while_running() {
        use switchboard_metadata::{MetadataExt, StaticMetadata};
        let metadata = Arc::new(StaticMetadata::default());
        let role = AuthRole::follow(metadata.clone(), true)
            .await
            .expect("role");
        // No apps at all: the development app stands in.
        assert!(verify(&role, "demo", "demo-1", "").await.authenticated);
        let late = AppConfig {
            name: "late".into(),
            app_id: "late-app".into(),
            ..AppConfig::demo()
        };
        metadata.put_record(&late).await.expect("put");
        eventually(&role, "late-app", "late-1", true).await;
        // With an app of its own, the deployment no longer has `demo`.
        assert!(!verify(&role, "demo", "demo-1", "").await.authenticated);
        // An app that cannot be used (a key file that is not there) is left
        // out; the others keep working.
        let mut broken = late.clone();
        broken.app_id = "broken".into();
        broken.auth = AuthMode::Jwt;
        broken.jwt_public_key_file = Some("/nonexistent/key.pem".into());
        metadata.put_record(&broken).await.expect("put");
        let mut renamed = late.clone();
        renamed.name = "later".into();
        metadata.put_record(&renamed).await.expect("put");
        eventually(&role, "late-app", "later-1", true).await;
        assert!(!verify(&role, "broken", "late-1", "").await.authenticated);
        metadata
            .delete_record::<AppConfig>("late-app")
            .await
            .expect("delete");
        eventually(&role, "late-app", "later-1", false).await;
        // The last app deleted: nobody gets in, least of all through the
        // development app (auth none).
        metadata
            .delete_record::<AppConfig>("broken")
            .await
            .expect("delete");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!verify(&role, "demo", "demo-1", "").await.authenticated);
        metadata.put_record(&broken).await.expect("put again");
        // Strict start: the broken app is an error.
        assert!(matches!(
            AuthRole::follow(metadata.clone(), true).await,
            Err(AuthError::KeyFile { .. })
        ));
    }

    #[tokio::test]
    async fn app_and_prefix_are_checked() {
        let role = AuthRole::new(vec![AppConfig::demo()]).expect("role");
        assert!(verify(&role, "demo", "demo-1", "").await.authenticated);
        assert!(!verify(&role, "demo", "other-1", "").await.authenticated);
        assert!(!verify(&role, "demo", "demo-", "").await.authenticated);
        assert!(!verify(&role, "demo", "demo1", "").await.authenticated);
        assert!(!verify(&role, "nope", "demo-1", "").await.authenticated);
    }
}
