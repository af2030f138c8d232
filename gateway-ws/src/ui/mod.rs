//! The web UI on the client port (docs/ui.md): the chat client at `/`, the
//! operator console at `/console` and its `/v1/admin` API. The pages are
//! plain ES modules embedded in the binary (`gateway-ws/ui/`); they speak
//! the public protocol over `/ws` like any other client, and the console
//! reads the admin API with a key it keeps in memory only.

mod admin;
mod stats;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use switchboard_config::UiConfig;

use crate::GatewayRole;

pub use admin::{
    AdminDoc, ClusterMember, ClusterView, ConsoleSource, DomainInfo, FederationView, LinkInfo,
};

/// The files of the UI, compiled in (`gateway-ws/ui/`).
#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Assets;

/// What the UI serves, and what the console reads from the rest of the
/// process.
#[derive(Clone, Default)]
pub struct UiOptions {
    pub config: UiConfig,
    /// The roles this process runs (shown by the console).
    pub roles: Vec<String>,
    /// Cluster and federation state for the console; `None` shows this
    /// process alone.
    pub source: Option<Arc<dyn ConsoleSource>>,
}

/// Every page: scripts and styles from this origin only, never inline;
/// sockets to this origin; no framing.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self'; \
                   object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// The UI's routes, for the client port's router.
pub fn router(options: UiOptions) -> Router<GatewayRole> {
    let mut app = Router::new();
    if options.config.chat {
        app = app.route("/", get(|| asset_response("index.html", None)));
    }
    if options.config.console {
        app = app
            .route("/console", get(|| asset_response("console.html", None)))
            .merge(admin::router(Arc::new(options.clone())));
    }
    if options.config.chat || options.config.console {
        app = app.route("/ui/{*path}", get(ui_file));
    }
    app
}

async fn ui_file(Path(path): Path<String>, req: Request) -> Response {
    asset_response(&path, req.headers().get(header::IF_NONE_MATCH).cloned()).await
}

async fn asset_response(path: &str, if_none_match: Option<HeaderValue>) -> Response {
    let Some(file) = Assets::get(path) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()[..12]));
    let mut headers = security_headers();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    // Revalidated on every load: a new binary serves new files at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if if_none_match.is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    (headers, file.data.into_owned()).into_response()
}

fn security_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_and_its_modules_are_embedded() {
        for page in ["index.html", "console.html"] {
            let file = Assets::get(page).expect(page);
            let text = String::from_utf8_lossy(&file.data);
            // Strict CSP: no inline script or style in any page.
            assert!(!text.contains("<script>"), "{page} has an inline script");
            assert!(!text.contains("<style"), "{page} has an inline style");
            assert!(!text.contains(" style="), "{page} has an inline style");
            for src in text.split("src=\"/ui/").skip(1) {
                let name = &src[..src.find('"').expect("quoted")];
                assert!(
                    Assets::get(name).is_some(),
                    "{page} names {name}, not embedded"
                );
            }
        }
    }
}
