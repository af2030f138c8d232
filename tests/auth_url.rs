//! `auth = "url"`: the app's own service decides at AUTH_CLIENT. A service
//! inside the test accepts, refuses, answers slowly or is down.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, TestNode};
use switchboard_config::{AppConfig, AuthMode};

async fn decide(
    axum::extract::State(calls): axum::extract::State<Arc<AtomicUsize>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    calls.fetch_add(1, Ordering::SeqCst);
    match body["token"].as_str().unwrap_or_default() {
        "good" => axum::Json(
            json!({"appId": body["appId"], "userId": body["userId"], "isAuthenticated": true}),
        )
        .into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(6)).await;
            axum::Json(json!({"isAuthenticated": true})).into_response()
        }
        "broken" => http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        _ => axum::Json(json!({"isAuthenticated": false})).into_response(),
    }
}

fn app(name: &str, id: &str, url: String) -> AppConfig {
    AppConfig {
        auth: AuthMode::Url,
        auth_url: Some(url),
        name: name.into(),
        app_id: id.into(),
        master_user_id: String::new(),
        ..AppConfig::demo()
    }
}

async fn auth(url: &str, app: &str, user: &str, token: &str) -> (Client, Value) {
    let mut c = Client::connect(url).await;
    c.send(json!({"type": "AUTH_CLIENT", "data": {"appId": app, "userId": user, "token": token}}))
        .await;
    let f = c.recv().await;
    (c, f)
}

#[tokio::test]
async fn the_apps_auth_service_accepts_refuses_or_is_unavailable() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = axum::Router::new()
        .route("/auth", axum::routing::post(decide))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let at = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, service).await;
    });
    let down = support::free_port();
    let node = TestNode::start_with(
        |c| {
            c.apps = vec![
                app("ANZ", "anz", format!("http://{at}/auth")),
                app("DOWN", "down", format!("http://127.0.0.1:{down}/auth")),
            ];
        },
        Default::default(),
    )
    .await;
    let url = node.url();

    // Accepted: signed in; the answer is remembered (no second call).
    let (_c, f) = auth(&url, "anz", "ANZ-1", "good").await;
    assert_eq!(f["data"]["isAuthenticated"], true, "{f}");
    let before = calls.load(Ordering::SeqCst);
    let (_c2, f) = auth(&url, "anz", "ANZ-1", "good").await;
    assert_eq!(f["data"]["isAuthenticated"], true, "{f}");
    assert_eq!(calls.load(Ordering::SeqCst), before, "answered from memory");

    // Refused: a refusal with a reason, and the socket closes (1008).
    let (mut c, f) = auth(&url, "anz", "ANZ-2", "wrong").await;
    assert_eq!(f["type"], "AUTH_CLIENT_REPLY", "{f}");
    assert_eq!(f["data"]["isAuthenticated"], false, "{f}");
    assert!(
        f["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused")),
        "{f}"
    );
    assert_eq!(support::close_code(&c.closed().await), Some(1008));

    // Slow, broken or down: UNAVAILABLE, and the client may try again on
    // the same connection.
    for (app_id, user, token) in [
        ("anz", "ANZ-3", "slow"),
        ("anz", "ANZ-4", "broken"),
        ("down", "DOWN-1", "good"),
    ] {
        let (mut c, f) = auth(&url, app_id, user, token).await;
        assert_eq!(f["type"], "ERROR", "{token}: {f}");
        assert_eq!(f["data"]["code"], "UNAVAILABLE", "{token}: {f}");
        if app_id == "anz" {
            c.send(json!({"type": "AUTH_CLIENT", "data": {"appId": "anz", "userId": user, "token": "good"}}))
                .await;
            let f = c.recv_type("AUTH_CLIENT_REPLY").await;
            assert_eq!(f["data"]["isAuthenticated"], true, "retry: {f}");
        }
    }
    node.shutdown().await;
}
