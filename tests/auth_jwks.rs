//! `auth = "jwt"` with a JSON Web Key Set (`jwks_url`): a key set served
//! inside the test checks ES256 and EdDSA tokens by their `kid`; a new `kid`
//! makes the server fetch the set again (key rotation); `nbf` and a named
//! audience are enforced; a key set that cannot be fetched is UNAVAILABLE
//! (the client retries), never a refusal.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Client, TestNode};
use switchboard_config::{AppConfig, AuthMode};

/// A signing key and its public JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn es256(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let raw = pair.public_key_raw();
    assert_eq!(raw.len(), 65, "an uncompressed point");
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("EC key"),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
                    "kid": kid, "alg": "ES256", "use": "sig"}),
    }
}

fn ed25519(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
    SigningKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).expect("Ed key"),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key_raw()), "kid": kid}),
    }
}

fn now() -> i64 {
    switchboard_mesh::now_ms() / 1000
}

/// A token of `key` with the usual claims, `extra` merged in.
fn token(key: &SigningKey, sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 600, "aud": "switchboard"});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &key.encoding).expect("encode")
}

/// The key set the test serves, and how often it was fetched.
#[derive(Clone, Default)]
struct KeySet {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl KeySet {
    fn set(&self, keys: &[&SigningKey]) {
        *self.keys.lock().expect("keys") = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Serves `/jwks` on `listener` until the test ends.
    fn serve(&self, listener: tokio::net::TcpListener) {
        async fn jwks(
            axum::extract::State(set): axum::extract::State<KeySet>,
        ) -> axum::Json<Value> {
            set.fetches.fetch_add(1, Ordering::SeqCst);
            let keys = set.keys.lock().expect("keys").clone();
            axum::Json(json!({ "keys": keys }))
        }
        let app = axum::Router::new()
            .route("/jwks", axum::routing::get(jwks))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
}

fn app(name: &str, id: &str, jwks_url: String) -> AppConfig {
    AppConfig {
        auth: AuthMode::Jwt,
        jwks_url: Some(jwks_url),
        jwt_audience: Some("switchboard".into()),
        name: name.into(),
        app_id: id.into(),
        master_user_id: String::new(),
        ..AppConfig::demo()
    }
}

async fn auth_on(c: &mut Client, app: &str, user: &str, token: &str) -> Value {
    c.send(json!({"type": "AUTH_CLIENT", "data": {"appId": app, "userId": user, "token": token}}))
        .await;
    c.recv().await
}

/// Signs in on a new connection: the first answer.
async fn auth(url: &str, app: &str, user: &str, token: &str) -> Value {
    let mut c = Client::connect(url).await;
    auth_on(&mut c, app, user, token).await
}

fn accepted(f: &Value) -> bool {
    f["type"] == "AUTH_CLIENT_REPLY" && f["data"]["isAuthenticated"] == true
}

fn refused_for(f: &Value, why: &str) -> bool {
    f["type"] == "AUTH_CLIENT_REPLY"
        && f["data"]["isAuthenticated"] == false
        && f["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(why))
}

#[tokio::test]
async fn es256_and_eddsa_tokens_are_checked_with_the_key_set_and_rotation_fetches_it_again() {
    let set = KeySet::default();
    let (ec1, ed1, ec2) = (es256("ec-1"), ed25519("ed-1"), es256("ec-2"));
    set.set(&[&ec1, &ed1]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let at = listener.local_addr().expect("addr");
    set.serve(listener);
    let node = TestNode::start_with(
        |c| c.apps = vec![app("ANZ", "anz", format!("http://{at}/jwks"))],
        Default::default(),
    )
    .await;
    let url = node.url();

    // ES256 and EdDSA tokens of the set's keys sign in; the set was
    // fetched once for both.
    let f = auth(&url, "anz", "ANZ-1", &token(&ec1, "ANZ-1", json!({}))).await;
    assert!(accepted(&f), "ES256: {f}");
    let f = auth(&url, "anz", "ANZ-2", &token(&ed1, "ANZ-2", json!({}))).await;
    assert!(accepted(&f), "EdDSA: {f}");
    assert_eq!(set.fetches(), 1, "the set is kept");

    // Refused: another key under a known kid, another subject, nbf in the
    // future, no aud although the app names one, a foreign aud.
    let impostor = SigningKey {
        kid: "ec-1".into(),
        ..es256("x")
    };
    for (what, t, why) in [
        (
            "signature",
            token(&impostor, "ANZ-1", json!({})),
            "signature",
        ),
        ("subject", token(&ec1, "ANZ-9", json!({})), "subject"),
        (
            "nbf",
            token(&ec1, "ANZ-1", json!({"nbf": now() + 300})),
            "nbf",
        ),
        ("no aud", token(&ed1, "ANZ-1", json!({"aud": null})), "aud"),
        (
            "foreign aud",
            token(&ed1, "ANZ-1", json!({"aud": "other"})),
            "audience",
        ),
    ] {
        let f = auth(&url, "anz", "ANZ-1", &t).await;
        assert!(refused_for(&f, why), "{what}: {f}");
    }

    // Rotation: the set gains ec-2. Its first token makes the server fetch
    // the set again (at most once per JWKS_MIN_REFETCH: a try within it is
    // refused as an unknown kid, and the next one fetches).
    set.set(&[&ec2, &ed1]);
    let before = set.fetches();
    let rotated = token(&ec2, "ANZ-3", json!({}));
    let mut f = Value::Null;
    for _ in 0..5 {
        f = auth(&url, "anz", "ANZ-3", &rotated).await;
        if accepted(&f) {
            break;
        }
        assert!(refused_for(&f, "ec-2"), "{f}");
        tokio::time::sleep(switchboard_auth::JWKS_MIN_REFETCH).await;
    }
    assert!(accepted(&f), "the new kid signs in: {f}");
    assert!(set.fetches() > before, "fetched again for the new kid");
    // The old key left the set: its tokens are refused once it was fetched.
    let f = auth(&url, "anz", "ANZ-1", &token(&ec1, "ANZ-1", json!({}))).await;
    assert!(refused_for(&f, "ec-1"), "{f}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_key_set_that_cannot_be_fetched_is_unavailable_not_a_refusal() {
    let port = support::free_port();
    let node = TestNode::start_with(
        |c| c.apps = vec![app("ANZ", "anz", format!("http://127.0.0.1:{port}/jwks"))],
        Default::default(),
    )
    .await;
    let ec1 = es256("ec-1");
    let good = token(&ec1, "ANZ-1", json!({}));
    let mut c = Client::connect(&node.url()).await;
    let f = auth_on(&mut c, "anz", "ANZ-1", &good).await;
    assert_eq!(f["type"], "ERROR", "{f}");
    assert_eq!(f["data"]["code"], "UNAVAILABLE", "{f}");

    // The key set comes up: the same connection signs in on its retry.
    let set = KeySet::default();
    set.set(&[&ec1]);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the key set's port");
    set.serve(listener);
    let f = auth_on(&mut c, "anz", "ANZ-1", &good).await;
    assert!(accepted(&f), "retry: {f}");
    node.shutdown().await;
}
