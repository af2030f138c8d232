//! The public REST API (`/v1` on the client port), end to end: real
//! servers, a real HTTP client, real WebSocket recipients. What a REST
//! sender produces must be exactly what a WebSocket sender would have.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, TestNode};
use switchboard_config::{ApiKeyConfig, ApiScope, AppConfig, Config};

const SEND_KEY: &str = "sbk_test_send_0123456789";
const PRESENCE_KEY: &str = "sbk_test_presence_0123456789";
const ADMIN_KEY: &str = "sbk_test_admin_0123456789";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key(name: &str, secret: &str, scopes: &[ApiScope]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        sha256: sha256_hex(secret),
        scopes: scopes.to_vec(),
    }
}

/// The demo app (auth none, master user demo-0) with one key per scope.
fn with_keys(c: &mut Config) {
    c.apps = vec![AppConfig {
        api_keys: vec![
            key("sender", SEND_KEY, &[ApiScope::Send]),
            key("watcher", PRESENCE_KEY, &[ApiScope::Presence]),
            key("ops", ADMIN_KEY, &[ApiScope::Admin]),
        ],
        ..AppConfig::demo()
    }];
}

/// An HTTP client of one server's REST API.
struct Api {
    base: String,
    http: reqwest::Client,
}

struct Answer {
    status: u16,
    body: Value,
}

impl Api {
    /// From a client URL (`ws://host:port/ws`).
    fn new(ws_url: &str) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let host = ws_url
            .trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .to_owned();
        Api {
            base: format!("http://{host}"),
            http: reqwest::Client::new(),
        }
    }

    async fn request(&self, req: reqwest::RequestBuilder) -> Answer {
        let res = req.send().await.expect("the server answers");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("answer {status} is not JSON ({e}): {text:?}"));
        Answer { status, body }
    }

    async fn send(&self, key: Option<&str>, body: Value) -> Answer {
        self.send_raw("demo", key, "application/json", body.to_string())
            .await
    }

    async fn send_raw(
        &self,
        app: &str,
        key: Option<&str>,
        content_type: &str,
        body: String,
    ) -> Answer {
        let mut req = self
            .http
            .post(format!("{}/v1/apps/{app}/messages", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        self.request(req).await
    }

    /// Any call: `body` as JSON when given.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.request(req).await
    }

    async fn get(&self, path: &str, key: &str) -> Answer {
        self.request(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(key),
        )
        .await
    }
}

/// A RELIABLE direct message sent through REST reaches the WebSocket
/// recipient as the same message from a WebSocket sender does: the same
/// fields, the given id, a confirmation and MESSAGE_SENT copies to the
/// sender's connections.
#[tokio::test]
async fn rest_send_is_what_a_websocket_sender_produces() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut ann_phone = Client::login(&node.url(), "demo-ann").await;

    // The same message over WebSocket, for comparison.
    ann.send(json!({"type": "MESSAGE", "data": {"to": "demo-bob", "content": "hello", "id": "ws-1"}, "feature": "RELIABLE", "reference": "ref-ws"}))
        .await;
    let by_ws = bob.recv_type("MESSAGE").await;
    ann_phone.recv_type("MESSAGE_SENT").await;

    let answer = api
        .send(
            Some(SEND_KEY),
            json!({"to": "demo-bob", "from": "demo-ann", "content": "hello", "feature": "RELIABLE", "id": "rest-1", "reference": "ref-rest"}),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body, json!({"id": "rest-1"}));
    let by_rest = bob.recv_type("MESSAGE").await;

    let shape = |f: &Value| -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = f.as_object().expect("frame").keys().cloned().collect();
        keys.extend(
            f["data"]
                .as_object()
                .expect("data")
                .keys()
                .map(|k| format!("data.{k}")),
        );
        keys
    };
    assert_eq!(shape(&by_rest), shape(&by_ws), "{by_rest} vs {by_ws}");
    assert_eq!(by_rest["data"]["from"], "demo-ann");
    assert_eq!(by_rest["data"]["content"], "hello");
    assert_eq!(by_rest["data"]["id"], "rest-1");
    assert_eq!(by_rest["reference"], "ref-rest");
    assert!(
        by_rest["data"]["seq"].as_u64() > by_ws["data"]["seq"].as_u64(),
        "stored after the first: {by_rest}"
    );

    // Every connection of the sender shows the message, as a copy from
    // another device; once delivered, the sender is confirmed, as over
    // WebSocket.
    for conn in [&mut ann, &mut ann_phone] {
        let (mut sent, mut confirmed) = (None, None);
        while sent.is_none() || confirmed.is_none() {
            let f = conn.recv().await;
            match f["type"].as_str() {
                Some("MESSAGE_SENT") if f["data"]["id"] == "rest-1" => sent = Some(f),
                Some("MESSAGE_CONFIRMATION") if f["data"]["id"] == "rest-1" => confirmed = Some(f),
                _ => {}
            }
        }
        let (sent, confirmed) = (sent.unwrap_or_default(), confirmed.unwrap_or_default());
        assert_eq!(sent["data"]["to"], "demo-bob", "{sent}");
        assert_eq!(sent["data"]["content"], "hello", "{sent}");
        assert_eq!(sent["reference"], "ref-rest", "{sent}");
        assert_eq!(confirmed["data"]["reference"], "ref-rest", "{confirmed}");
    }
    node.shutdown().await;
}

/// A resend of an accepted id is accepted again and stored once; the
/// inbox depth and the recipient's fetch both show one message.
#[tokio::test]
async fn rest_resend_of_an_id_is_stored_once() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let body = json!({"to": "demo-bob", "from": "demo-ann", "content": "once", "id": "order-7"});
    for _ in 0..3 {
        let answer = api.send(Some(SEND_KEY), body.clone()).await;
        assert_eq!(
            (answer.status, answer.body),
            (202, json!({"id": "order-7"}))
        );
    }
    let depth = api
        .get("/v1/apps/demo/users/demo-bob/inbox", ADMIN_KEY)
        .await;
    assert_eq!(
        (depth.status, depth.body),
        (200, json!({"userId": "demo-bob", "depth": 1}))
    );

    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let (messages, _) = bob.fetch_all(100).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["data"]["id"], "order-7");
    assert_eq!(messages[0]["data"]["content"], "once");
    node.shutdown().await;
}

/// Without `from` the app's master user sends; `to` as a list is an ad-hoc
/// group message; without `id` the server assigns one; FAST is not stored.
#[tokio::test]
async fn rest_send_defaults_lists_and_fast() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;

    let answer = api
        .send(
            Some(SEND_KEY),
            json!({"to": ["demo-bob", "demo-cat"], "content": "all hands"}),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.body["id"].as_str().expect("an id").to_owned();
    assert!(uuid_v7(&id), "server-assigned ids are UUIDv7: {id}");
    for conn in [&mut bob, &mut cat] {
        let m = conn.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["from"], "demo-0", "{m}");
        assert_eq!(m["data"]["content"], "all hands");
        assert_eq!(m["data"]["id"], id.as_str());
    }

    let answer = api
        .send(
            Some(SEND_KEY),
            json!({"to": "demo-dan", "content": "gone", "feature": "FAST"}),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let depth = api
        .get("/v1/apps/demo/users/demo-dan/inbox", ADMIN_KEY)
        .await;
    assert_eq!(depth.body["depth"], 0, "FAST messages are not stored");
    node.shutdown().await;
}

/// A topic publication through REST reaches subscribers as the PUBLISH
/// frame of its sender would: the same fields, the id and offset the 202
/// gave; the online list names the connected users.
#[tokio::test]
async fn rest_publishes_to_topics_and_lists_online_users() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;
    bob.send(json!({"type": "SUBSCRIBE", "data": {"topic": "prices"}}))
        .await;
    bob.recv_type("SUBSCRIBED").await;

    // The same publication over WebSocket, for comparison.
    cat.send(json!({"type": "PUBLISH", "data": {"topic": "prices", "content": "7"}}))
        .await;
    cat.recv_type("PUBLISHED").await;
    let by_ws = bob.recv_type("PUBLICATION").await;

    let a = api
        .send(
            Some(SEND_KEY),
            json!({"topic": "prices", "from": "demo-ann", "content": "8"}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let by_rest = bob.recv_type("PUBLICATION").await;
    let keys = |f: &Value| -> BTreeSet<String> {
        f["data"]
            .as_object()
            .expect("data")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&by_rest), keys(&by_ws), "{by_rest} vs {by_ws}");
    assert_eq!(by_rest["data"]["from"], "demo-ann");
    assert_eq!(by_rest["data"]["content"], "8");
    assert_eq!(by_rest["data"]["id"], a.body["id"]);
    assert_eq!(by_rest["data"]["offset"], a.body["offset"]);
    assert_eq!(
        by_rest["data"]["offset"].as_u64(),
        by_ws["data"]["offset"].as_u64().map(|o| o + 1)
    );

    // Users count as online once their login went round (AUTH_CLIENT_REPLY
    // comes before registration): bob and cat each had a round trip since.
    let online = api.get("/v1/apps/demo/online", PRESENCE_KEY).await;
    assert_eq!(online.status, 200, "{}", online.body);
    assert_eq!(
        online.body,
        json!({"users": ["demo-bob", "demo-cat"], "truncated": false})
    );
    let forbidden = api.get("/v1/apps/demo/online", SEND_KEY).await;
    assert_eq!(
        (forbidden.status, forbidden.body["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    node.shutdown().await;
}

/// A send to a persistent group goes through the groups role as the
/// GROUP_MESSAGE frame does: members get it with `data.group`; a sender
/// who is not a member gets NOT_A_MEMBER.
#[tokio::test]
async fn rest_sends_to_a_persistent_group() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    ann.send(json!({"type": "GROUP_CREATE", "data": {"name": "Team", "members": ["demo-bob"], "group": "g-team"}}))
        .await;
    ann.recv_type("GROUP_CREATED").await;
    let a = api
        .send(
            Some(SEND_KEY),
            json!({"group": "g-team", "from": "demo-ann", "content": "standup", "id": "team-1"}),
        )
        .await;
    assert_eq!((a.status, a.body.clone()), (202, json!({"id": "team-1"})));
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["group"], "g-team", "{m}");
    assert_eq!(m["data"]["from"], "demo-ann");
    assert_eq!(m["data"]["id"], "team-1");
    let outsider = api
        .send(
            Some(SEND_KEY),
            json!({"group": "g-team", "from": "demo-cat", "content": "hi"}),
        )
        .await;
    assert_eq!(outsider.status, 403, "{}", outsider.body);
    assert_eq!(outsider.body["code"], "NOT_A_MEMBER");
    node.shutdown().await;
}

fn uuid_v7(id: &str) -> bool {
    id.len() == 36 && id.as_bytes()[14] == b'7'
}

#[tokio::test]
async fn rest_presence_of_a_user() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let bob = Client::login(&node.url(), "demo-bob").await;
    let online = api
        .get("/v1/apps/demo/users/demo-bob/presence", PRESENCE_KEY)
        .await;
    assert_eq!(
        (online.status, online.body),
        (200, json!({"userId": "demo-bob", "online": true}))
    );
    let offline = api
        .get("/v1/apps/demo/users/demo-cat/presence", PRESENCE_KEY)
        .await;
    assert_eq!(offline.body, json!({"userId": "demo-cat", "online": false}));
    bob.close().await;
    // The last connection closed: offline (presence is updated as the
    // socket goes; poll briefly, this is not a timing assertion).
    let mut last = Value::Null;
    for _ in 0..100 {
        last = api
            .get("/v1/apps/demo/users/demo-bob/presence", PRESENCE_KEY)
            .await
            .body;
        if last["online"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last["online"], false, "{last}");
    let bad = api
        .get("/v1/apps/demo/users/other-1/presence", PRESENCE_KEY)
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    node.shutdown().await;
}

/// Wrong or missing keys are 401, keys without the scope 403; nothing is
/// sent.
#[tokio::test]
async fn rest_keys_and_scopes_are_checked() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let body = json!({"to": "demo-bob", "content": "x"});
    let cases: [(Option<&str>, &str, u16, &str); 6] = [
        (None, "demo", 401, "NOT_AUTHENTICATED"),
        (Some("sbk_wrong"), "demo", 401, "NOT_AUTHENTICATED"),
        (
            Some(&SEND_KEY[..SEND_KEY.len() - 1]),
            "demo",
            401,
            "NOT_AUTHENTICATED",
        ),
        (Some(SEND_KEY), "no-such-app", 401, "NOT_AUTHENTICATED"),
        (Some(PRESENCE_KEY), "demo", 403, "FORBIDDEN"),
        // admin grants every scope
        (Some(ADMIN_KEY), "demo", 202, ""),
    ];
    for (key, app, status, code) in cases {
        let a = api
            .send_raw(app, key, "application/json", body.to_string())
            .await;
        assert_eq!(a.status, status, "{key:?} {app}: {}", a.body);
        if status != 202 {
            assert_eq!(a.body["code"], code, "{}", a.body);
            assert!(a.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    let a = api
        .get("/v1/apps/demo/users/demo-bob/inbox", SEND_KEY)
        .await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    let a = api
        .get("/v1/apps/demo/users/demo-bob/presence", SEND_KEY)
        .await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    let a = api
        .get("/v1/apps/demo/users/demo-bob/presence", "nope")
        .await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (401, json!("NOT_AUTHENTICATED"))
    );
    // Only the admin key's message was stored.
    let depth = api
        .get("/v1/apps/demo/users/demo-bob/inbox", ADMIN_KEY)
        .await;
    assert_eq!(depth.body["depth"], 1);
    // Requests are counted by operation and status (the registry is per
    // process: other tests of this binary add to it, so at least these).
    let (_, _, metrics) = support::http_get_text(node.client_addr, "/metrics")
        .await
        .expect("metrics");
    for (operation, status) in [
        ("send_message", "401"),
        ("send_message", "403"),
        ("send_message", "202"),
        ("inbox_depth", "200"),
    ] {
        let counted = metrics.lines().any(|l| {
            l.starts_with("switchboard_rest_requests_total{")
                && l.contains(&format!("operation=\"{operation}\""))
                && l.contains(&format!("status=\"{status}\""))
        });
        assert!(counted, "{operation} {status} counted:\n{metrics}");
    }
    node.shutdown().await;
}

/// Each bad field, bad JSON, a wrong content type and oversized bodies get
/// the documented status and code, with a message naming the problem.
#[tokio::test]
async fn rest_bad_bodies_get_the_documented_errors() {
    let node = TestNode::start_with(
        |c| {
            with_keys(c);
            c.limits.max_frame_bytes = 4096;
            c.limits.max_content_bytes = 1024;
        },
        Default::default(),
    )
    .await;
    let api = Api::new(&node.url());
    let ok = |extra: Value| {
        let mut body = json!({"to": "demo-bob", "content": "x"});
        for (k, v) in extra.as_object().expect("object") {
            if v.is_null() {
                body.as_object_mut().expect("object").remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body.to_string()
    };
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{\"to\": ".into(), 400, "INVALID_JSON", "invalid JSON"),
        (
            "[1,2]".into(),
            400,
            "INVALID_FRAME",
            "must be a JSON object",
        ),
        (
            ok(json!({"content": null})),
            400,
            "INVALID_FRAME",
            "content",
        ),
        (ok(json!({"content": 5})), 400, "INVALID_FRAME", "string"),
        (ok(json!({"colour": "red"})), 400, "INVALID_FRAME", "colour"),
        (ok(json!({"to": 7})), 400, "INVALID_FRAME", "to must be"),
        (
            ok(json!({"to": null})),
            400,
            "INVALID_FRAME",
            "exactly one of",
        ),
        (
            ok(json!({"group": "g-1"})),
            400,
            "INVALID_FRAME",
            "exactly one of",
        ),
        (
            ok(json!({"feature": "SLOW"})),
            400,
            "INVALID_FRAME",
            "feature must be RELIABLE or FAST, not SLOW",
        ),
        (
            ok(json!({"id": "has space"})),
            400,
            "INVALID_FRAME",
            "data.id must be",
        ),
        (
            ok(json!({"id": ""})),
            400,
            "INVALID_FRAME",
            "data.id must be",
        ),
        (
            ok(json!({"reference": 3})),
            400,
            "INVALID_FRAME",
            "reference must be a string",
        ),
        (
            ok(json!({"from": "other-1"})),
            400,
            "INVALID_FRAME",
            "not a user of app",
        ),
        (
            ok(json!({"to": "other-1"})),
            400,
            "INVALID_RECIPIENT",
            "not a user of app",
        ),
        (
            ok(json!({"to": ["demo-a", "x"]})),
            400,
            "INVALID_RECIPIENT",
            "not a user of app",
        ),
        (ok(json!({"to": []})), 400, "INVALID_FRAME", "empty"),
        (
            ok(json!({"to": null, "topic": "prices", "id": "p-1"})),
            400,
            "INVALID_FRAME",
            "do not apply to a topic",
        ),
        (
            ok(json!({"to": null, "room": "kitchen"})),
            400,
            "UNKNOWN_TYPE",
            "not available through REST",
        ),
        (
            ok(json!({"content": "c".repeat(1025)})),
            413,
            "PAYLOAD_TOO_LARGE",
            "content",
        ),
        (
            ok(json!({"content": "c".repeat(5000)})),
            413,
            "PAYLOAD_TOO_LARGE",
            "size limit",
        ),
    ];
    for (body, status, code, says) in cases {
        let a = api
            .send_raw("demo", Some(SEND_KEY), "application/json", body.clone())
            .await;
        let shown: String = body.chars().take(80).collect();
        assert_eq!(a.status, status, "{shown}: {}", a.body);
        assert_eq!(a.body["code"], code, "{shown}: {}", a.body);
        let message = a.body["message"].as_str().expect("message");
        assert!(
            message.contains(says),
            "{shown}: {message:?} should say {says:?}"
        );
        // In our words: no Rust type names, serde's backticks or positions.
        if code == "INVALID_FRAME" {
            for leak in ["`", "struct ", " at line ", "variant", "u32", "usize"] {
                assert!(
                    !message.contains(leak),
                    "{shown}: {message:?} says {leak:?}"
                );
            }
        }
    }
    let a = api
        .send_raw("demo", Some(SEND_KEY), "text/plain", ok(json!({})))
        .await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (415, json!("INVALID_FRAME"))
    );
    // A persistent group this server does not know is refused as the
    // GROUP_MESSAGE frame is.
    let a = api
        .send(Some(SEND_KEY), json!({"group": "g-404", "content": "x"}))
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["code"], "INVALID_RECIPIENT", "{}", a.body);
    // Unknown operations are JSON errors too.
    let a = api.get("/v1/apps/demo/nothing", SEND_KEY).await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (404, json!("UNKNOWN_TYPE"))
    );
    let a = api
        .request(
            api.http
                .delete(format!("{}/v1/apps/demo/messages", api.base)),
        )
        .await;
    assert_eq!(
        (a.status, a.body["code"].clone()),
        (405, json!("UNKNOWN_TYPE"))
    );
    // Nothing above was stored.
    let depth = api
        .get("/v1/apps/demo/users/demo-bob/inbox", ADMIN_KEY)
        .await;
    assert_eq!(depth.body["depth"], 0);
    node.shutdown().await;
}

/// The served OpenAPI document is valid OpenAPI 3.1 and is the one checked
/// in as docs/openapi.json.
#[tokio::test]
async fn openapi_document_is_valid_and_checked_in() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let served = api
        .http
        .get(format!("{}/v1/openapi.json", api.base))
        .send()
        .await
        .expect("served");
    assert_eq!(served.status().as_u16(), 200);
    let served = served.text().await.expect("text");
    let spec = oas3::from_json(&served).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3.1"), "{}", spec.openapi);
    let paths = spec.paths.as_ref().expect("paths");
    for path in [
        "/v1/apps/{appId}/messages",
        "/v1/apps/{appId}/users/{userId}/presence",
        "/v1/apps/{appId}/users/{userId}/inbox",
        "/v1/apps/{appId}/online",
    ] {
        assert!(paths.contains_key(path), "{path} is documented");
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("SWITCHBOARD_BLESS").is_some() {
        std::fs::write(&file, format!("{served}\n")).expect("write docs/openapi.json");
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    assert!(
        parse(&checked_in) == parse(&served),
        "docs/openapi.json differs from the document the server generates: regenerate it with \
         `SWITCHBOARD_BLESS=1 cargo test -p switchboard --test api openapi` and commit it"
    );
    node.shutdown().await;
}

/// schemathesis (PyPI) fuzzes every operation from the served OpenAPI
/// document, with a key that may do everything: no answer is a 5xx, and
/// every status, content type and body is one the document declares.
/// Bounded: 50 examples per operation, a fixed seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_every_answer_matches_the_schema() {
    let Some(schemathesis) = switchboard_testenv::service(switchboard_testenv::SCHEMATHESIS) else {
        return;
    };
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Every operation is tried in the app the key belongs to (random app
    // ids would only ever be 401).
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        "[parameters]\n\"path.appId\" = \"demo\"\n",
    )
    .expect("write config");
    let out = tokio::process::Command::new(schemathesis)
        .current_dir(dir.path())
        .args(["--config-file", "schemathesis.toml", "run"])
        .arg(format!("http://{}/v1/openapi.json", node.client_addr))
        .args(["-H", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args(["--max-examples", "50", "--seed", "1", "--workers", "1"])
        .args(["--generation-database", "none", "--no-color"])
        // The document cannot say which user ids are the app's (the prefix
        // is per app): schema-valid requests may be refused with 400, so
        // the check that they are accepted is left out.
        .args([
            "-c",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .output()
        .await
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    assert!(text.contains("passed"), "{text}");
    node.shutdown().await;
}

/// `apps new-key` prints a key and the config line with its hash; a server
/// configured with that line takes the key, and `switchboard send` sends
/// with it (and fails with the error code on a wrong one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_new_key_and_send() {
    let (ok, out) = support::switchboard_cli(&[
        "apps",
        "new-key",
        "--app",
        "demo",
        "--scopes",
        "send,presence",
    ]);
    assert!(ok, "{out}");
    let mut lines = out.lines();
    let secret = lines.next().expect("the key").to_owned();
    assert!(secret.starts_with("sbk_") && secret.len() == 68, "{secret}");
    let line = lines.next().expect("the config line");
    let table: toml::Table = toml::from_str(line).expect("the line is TOML");
    let keys: Vec<ApiKeyConfig> = table["api_keys"].clone().try_into().expect("api_keys");
    assert_eq!(keys[0].sha256, sha256_hex(&secret));
    assert_eq!(keys[0].scopes, vec![ApiScope::Send, ApiScope::Presence]);
    let (_, again) =
        support::switchboard_cli(&["apps", "new-key", "--app", "demo", "--scopes", "send"]);
    assert_ne!(
        again.lines().next(),
        Some(secret.as_str()),
        "a fresh key each time"
    );
    let (ok, bad) =
        support::switchboard_cli(&["apps", "new-key", "--app", "demo", "--scopes", "root"]);
    assert!(!ok && bad.contains("unknown scope"), "{bad}");

    let node = TestNode::start_with(
        move |c| {
            c.apps = vec![AppConfig {
                api_keys: keys,
                ..AppConfig::demo()
            }]
        },
        Default::default(),
    )
    .await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let url = format!("http://{}", node.client_addr);
    let args = |key: &str| {
        vec![
            "send".to_owned(),
            "--url".into(),
            url.clone(),
            "--key".into(),
            key.to_owned(),
            "--app".into(),
            "demo".into(),
            "--to".into(),
            "demo-bob".into(),
            "--from".into(),
            "demo-ann".into(),
            "--content".into(),
            "from a script".into(),
            "--id".into(),
            "cli-1".into(),
            "--reference".into(),
            "ref-cli".into(),
        ]
    };
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::switchboard_cli(&args)
        })
    };
    let (ok, out) = run(args(&secret)).await.expect("cli");
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "cli-1");
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["content"], "from a script");
    assert_eq!(m["data"]["from"], "demo-ann");
    assert_eq!(m["reference"], "ref-cli");

    let (ok, out) = run(args("sbk_wrong")).await.expect("cli");
    assert!(!ok, "{out}");
    assert!(
        out.contains("401") && out.contains("NOT_AUTHENTICATED"),
        "{out}"
    );
    bob.expect_silence(Duration::from_millis(200)).await;
    node.shutdown().await;
}

/// In a cluster the key is checked by a remote auth role (its apps from
/// etcd), and the message crosses gateways: sent through one gateway's
/// REST API, received on the other's WebSocket. A key added with
/// `apps put` works without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_in_a_cluster() {
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let etcd = infra.etcd.clone();
    let cluster =
        support::cluster::Cluster::start(infra, support::cluster::PROTOCOL_SHAPE, with_keys).await;
    let (rest_url, ws_url) = (cluster.url(), cluster.url());
    assert_ne!(rest_url, ws_url, "two gateways");
    let api = Api::new(&rest_url);
    let mut bob = Client::login(&ws_url, "demo-bob").await;
    let mut ann = Client::login(&ws_url, "demo-ann").await;
    let a = api
        .send(
            Some(SEND_KEY),
            json!({"to": "demo-bob", "from": "demo-ann", "content": "across", "reference": "r-x"}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["content"], "across");
    assert_eq!(m["data"]["id"], a.body["id"]);
    let sent = ann.recv_type("MESSAGE_SENT").await;
    assert_eq!(sent["data"]["id"], a.body["id"]);
    let c = ann.recv_type("MESSAGE_CONFIRMATION").await;
    assert_eq!(c["data"]["reference"], "r-x");
    let online = api
        .get("/v1/apps/demo/users/demo-bob/presence", PRESENCE_KEY)
        .await;
    assert_eq!(online.body["online"], true, "{}", online.body);
    const LATE_KEY: &str = "sbk_test_late_0123456789";
    let body = json!({"to": "demo-bob", "content": "x"});
    let wrong = api.send(Some(LATE_KEY), body.clone()).await;
    assert_eq!(wrong.status, 401);

    // A new key through the metadata seam: in force without a restart.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("apps.toml");
    std::fs::write(
        &file,
        format!(
            "[[apps]]\nname = \"demo\"\napp_id = \"demo\"\nmaster_user_id = \"demo-0\"\nauth = \"none\"\n\
             api_keys = [{{ name = \"late\", sha256 = \"{}\", scopes = [\"send\"] }}]\n",
            sha256_hex(LATE_KEY)
        ),
    )
    .expect("write apps file");
    let prefix = cluster.etcd_prefix.clone();
    let path = file.to_string_lossy().into_owned();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        support::switchboard_cli(&[
            "apps",
            "put",
            &path,
            "--etcd",
            &etcd,
            "--key-prefix",
            &prefix,
        ])
    })
    .await
    .expect("cli");
    assert!(ok, "{out}");
    let mut status = 0;
    for _ in 0..250 {
        status = api.send(Some(LATE_KEY), body.clone()).await.status;
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 202, "the new key is taken within 5 s");
    // The old keys were replaced with the app's record.
    assert_eq!(api.send(Some(SEND_KEY), body).await.status, 401);
    cluster.shutdown().await;
}

/// A REST send is traced as a WebSocket frame is: a `traceparent` header
/// makes the message's spans (gateway.receive → router.route →
/// delivery.deliver → gateway.push, across processes) join the caller's
/// trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_send_joins_the_callers_trace() {
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let receiver = support::otlp::Receiver::start().await;
    let cluster = support::cluster::Cluster::start(infra, support::cluster::PROTOCOL_SHAPE, |c| {
        with_keys(c);
        c.otlp_endpoint = receiver.endpoint();
        c.trace_sampling = 1.0;
    })
    .await;
    let api = Api::new(&cluster.proc("gw1").url());
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let a = api
        .request(
            api.http
                .post(format!("{}/v1/apps/demo/messages", api.base))
                .bearer_auth(SEND_KEY)
                .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
                .json(&json!({"to": "demo-bob", "from": "demo-ann", "content": "traced", "id": "traced-1"})),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["id"], "traced-1");
    cluster.shutdown().await; // every process flushes its spans
    for _ in 0..100 {
        if receiver.spans().iter().any(|s| s.name == "gateway.push") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = receiver.spans();
    let of_message: Vec<_> = spans
        .iter()
        .filter(|s| s.attributes.get("message.id").map(String::as_str) == Some("traced-1"))
        .collect();
    let receive = of_message
        .iter()
        .find(|s| s.name == "gateway.receive")
        .unwrap_or_else(|| panic!("no gateway.receive for the message: {of_message:#?}"));
    assert_eq!(receive.trace_id, client_trace);
    assert_eq!(receive.parent_span_id, client_span);
    let names: BTreeSet<&str> = of_message
        .iter()
        .filter(|s| s.trace_id == client_trace)
        .map(|s| s.name.as_str())
        .collect();
    for name in ["router.route", "delivery.deliver", "gateway.push"] {
        assert!(
            names.contains(name),
            "{name} in the caller's trace: {names:?}"
        );
    }
}

/// The next GROUP_EVENT of `event` (earlier events are skipped).
async fn group_event(c: &mut Client, event: &str) -> Value {
    loop {
        let f = c.recv_type("GROUP_EVENT").await;
        if f["data"]["event"] == event {
            return f;
        }
    }
}

/// Group management through REST acts as `?as=` (the master user when
/// absent) exactly as the GROUP_* frames from that user: members get the
/// same GROUP_EVENTs as when the owner manages the group over WebSocket,
/// only the owner changes it, only members read it.
#[tokio::test]
async fn rest_manages_groups_as_websocket_frames_do() {
    use reqwest::Method;
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let api = Api::new(&node.url());
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;

    // The same creation over WebSocket, for comparison of bob's event.
    ann.send(json!({"type": "GROUP_CREATE", "data": {"group": "g-ws", "name": "WS", "members": ["demo-bob"]}}))
        .await;
    ann.recv_type("GROUP_CREATED").await;
    let by_ws = group_event(&mut bob, "members_added").await;

    let created = api
        .call(
            Method::POST,
            "/v1/apps/demo/groups?as=demo-ann",
            ADMIN_KEY,
            Some(json!({"group": "g-rest", "name": "Team", "members": ["demo-bob"]})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["group"], "g-rest");
    assert_eq!(created.body["name"], "Team");
    assert_eq!(created.body["owner"], "demo-ann");
    assert_eq!(created.body["members"], json!(["demo-ann", "demo-bob"]));
    assert!(created.body["createdMs"].as_i64().is_some_and(|t| t > 0));
    let by_rest = group_event(&mut bob, "members_added").await;
    let keys = |f: &Value| -> BTreeSet<String> {
        f["data"]
            .as_object()
            .expect("data")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&by_rest), keys(&by_ws), "{by_rest} vs {by_ws}");
    assert_eq!(by_rest["data"]["group"], "g-rest");
    assert_eq!(by_rest["data"]["by"], "demo-ann");

    let added = api
        .call(
            Method::POST,
            "/v1/apps/demo/groups/g-rest/members?as=demo-ann",
            ADMIN_KEY,
            Some(json!({"members": ["demo-cat"]})),
        )
        .await;
    assert_eq!(added.status, 200, "{}", added.body);
    assert_eq!(
        added.body["members"],
        json!(["demo-ann", "demo-bob", "demo-cat"])
    );
    let e = group_event(&mut cat, "members_added").await;
    assert_eq!(e["data"]["members"], json!(["demo-cat"]), "{e}");

    let renamed = api
        .call(
            Method::PATCH,
            "/v1/apps/demo/groups/g-rest?as=demo-ann",
            ADMIN_KEY,
            Some(json!({"name": "Crew"})),
        )
        .await;
    assert_eq!(renamed.status, 200, "{}", renamed.body);
    assert_eq!(renamed.body["name"], "Crew");
    for c in [&mut bob, &mut cat] {
        let e = group_event(c, "renamed").await;
        assert_eq!(e["data"]["name"], "Crew", "{e}");
    }

    // A member reads it; a member may not change it; a non-member may not
    // read it; an unknown group is unknown; the key needs `groups`.
    let info = api
        .call(
            Method::GET,
            "/v1/apps/demo/groups/g-rest?as=demo-bob",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(
        (info.status, info.body["name"].clone()),
        (200, json!("Crew"))
    );
    let refused = api
        .call(
            Method::DELETE,
            "/v1/apps/demo/groups/g-rest?as=demo-bob",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(
        (refused.status, refused.body["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    let refused = api
        .call(
            Method::GET,
            "/v1/apps/demo/groups/g-rest?as=demo-dan",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(
        (refused.status, refused.body["code"].clone()),
        (403, json!("NOT_A_MEMBER"))
    );
    let unknown = api
        .call(
            Method::GET,
            "/v1/apps/demo/groups/g-nope?as=demo-ann",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.body["code"].clone()),
        (400, json!("INVALID_RECIPIENT"))
    );
    let scope = api
        .call(
            Method::GET,
            "/v1/apps/demo/groups/g-rest?as=demo-ann",
            SEND_KEY,
            None,
        )
        .await;
    assert_eq!(
        (scope.status, scope.body["code"].clone()),
        (403, json!("FORBIDDEN"))
    );
    for (what, method, path, body) in [
        (
            "bad id",
            Method::GET,
            "/v1/apps/demo/groups/no%20spaces?as=demo-ann",
            None,
        ),
        (
            "as not of the app",
            Method::GET,
            "/v1/apps/demo/groups/g-rest?as=other-1",
            None,
        ),
        (
            "unknown query",
            Method::GET,
            "/v1/apps/demo/groups/g-rest?who=demo-ann",
            None,
        ),
        (
            "members missing",
            Method::POST,
            "/v1/apps/demo/groups/g-rest/members?as=demo-ann",
            Some(json!({})),
        ),
        (
            "members empty",
            Method::POST,
            "/v1/apps/demo/groups/g-rest/members?as=demo-ann",
            Some(json!({"members": []})),
        ),
        (
            "name missing",
            Method::PATCH,
            "/v1/apps/demo/groups/g-rest?as=demo-ann",
            Some(json!({})),
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/apps/demo/groups?as=demo-ann",
            Some(json!({"owner": "demo-bob"})),
        ),
    ] {
        let bad = api.call(method, path, ADMIN_KEY, body).await;
        assert_eq!(
            (bad.status, bad.body["code"].clone()),
            (400, json!("INVALID_FRAME")),
            "{what}: {}",
            bad.body
        );
    }

    let removed = api
        .call(
            Method::POST,
            "/v1/apps/demo/groups/g-rest/members/remove?as=demo-ann",
            ADMIN_KEY,
            Some(json!({"members": ["demo-bob"]})),
        )
        .await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(removed.body["members"], json!(["demo-ann", "demo-cat"]));
    group_event(&mut bob, "members_removed").await;

    let list = api
        .call(
            Method::GET,
            "/v1/apps/demo/users/demo-cat/groups",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(list.status, 200, "{}", list.body);
    let ids: Vec<&str> = list.body["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(ids, ["g-rest"]);

    // Without `as`, the app's master user acts: it owns what it creates.
    let mine = api
        .call(
            Method::POST,
            "/v1/apps/demo/groups",
            ADMIN_KEY,
            Some(json!({"members": ["demo-cat"]})),
        )
        .await;
    assert_eq!(mine.status, 201, "{}", mine.body);
    assert_eq!(mine.body["owner"], "demo-0");
    assert!(
        mine.body["group"]
            .as_str()
            .is_some_and(|g| g.starts_with("g-"))
    );

    let deleted = api
        .call(
            Method::DELETE,
            "/v1/apps/demo/groups/g-rest?as=demo-ann",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.body["members"], json!([]));
    group_event(&mut cat, "deleted").await;
    let gone = api
        .call(
            Method::GET,
            "/v1/apps/demo/groups/g-rest?as=demo-ann",
            ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(gone.status, 400, "{}", gone.body);
    node.shutdown().await;
}
