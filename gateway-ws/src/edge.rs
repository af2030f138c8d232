//! The client port's accept loop: HTTP/1.1 and HTTP/2 (h2c, or h2 over
//! TLS with `[tls]`, see `tls.rs`) with a
//! deadline for the first bytes and for each HTTP/1 request head (a client
//! that never finishes one is closed: no slowloris), and
//! caps on open connections per process and per client address, answered
//! with `503` so that the rest of the process (health checks, the mesh, the
//! store) keeps file descriptors when clients take all they can. An HTTP/2
//! connection with no request in progress for `http2_idle_timeout_secs` is
//! closed (GOAWAY): answering pings does not keep a connection slot.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::tls::{ClientTls, Prefixed};

/// File descriptors kept for everything but client connections when
/// `max_connections` is 0 (derived from the open-files limit).
const FD_RESERVE: u64 = 256;

/// Client connections the open-files limit `soft` leaves room for: all but
/// [`FD_RESERVE`] (a quarter when the limit is small), at least 16.
fn fd_cap(soft: u64) -> u64 {
    soft.saturating_sub(FD_RESERVE.min(soft / 4)).max(16)
}

/// How long a shut-down server waits for its client connections (close
/// frames to WebSockets, HTTP requests in progress) all together.
const DRAIN: Duration = Duration::from_secs(5);

/// How long an idle HTTP/2 connection told to go (GOAWAY) may take to
/// answer before it is dropped.
const GOAWAY_WAIT: Duration = Duration::from_secs(10);

/// Requests in progress on one connection (a response counts until its
/// body is done: gRPC streams included), and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(tokio::time::Instant::now()),
        })
    }

    /// When the connection became idle; `None` while a request is in
    /// progress.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        (self.in_flight.load(Ordering::Acquire) == 0).then_some(last)
    }
}

/// One request in progress; dropped when its response body is.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(PoisonError::into_inner) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress.
struct Tracked {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once the connection has had no request in progress for
/// `idle`.
async fn idle_for(activity: &Activity, idle: Duration) {
    loop {
        let wake = match activity.idle_since() {
            Some(since) if since.elapsed() >= idle => return,
            Some(since) => since + idle,
            // Checked again a full period later: a request in progress
            // ends before the connection can be idle long enough.
            None => tokio::time::Instant::now() + idle,
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// Open connections, in total and per client address.
pub(crate) struct Edge {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One open client-port connection; dropping it (the HTTP connection ends,
/// or the WebSocket it was upgraded to closes) frees its place. Requests
/// carry it in their extensions so that an upgrade keeps it.
pub(crate) struct ConnSlot {
    edge: Arc<Edge>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.edge.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
        metrics::gauge!("switchboard_client_port_connections").set(open.total as f64);
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Process,
    Address,
}

impl Edge {
    /// `max_total` 0: the open-files limit less [`FD_RESERVE`];
    /// `max_per_ip` 0: no limit per address.
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        let max_total = match max_total {
            0 => {
                let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
                    .map(|(soft, _)| soft)
                    .unwrap_or(1024);
                usize::try_from(fd_cap(soft)).unwrap_or(usize::MAX)
            }
            n => n,
        };
        Arc::new(Edge {
            max_total,
            max_per_ip: if max_per_ip == 0 {
                usize::MAX
            } else {
                max_per_ip
            },
            open: Mutex::new(Open::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<ConnSlot>, Refusal> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(Refusal::Process);
        }
        let n = open.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refusal::Address);
        }
        *n += 1;
        open.total += 1;
        metrics::gauge!("switchboard_client_port_connections").set(open.total as f64);
        Ok(Arc::new(ConnSlot {
            edge: Arc::clone(self),
            ip,
        }))
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until
/// `shutdown` resolves; then stops accepting, and runs `closing` (which
/// closes the WebSockets) while HTTP requests in progress finish, both
/// within [`DRAIN`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<C>(
    listener: TcpListener,
    app: Router,
    edge: Arc<Edge>,
    header_timeout: Duration,
    h2_idle: Duration,
    tls: Option<Arc<ClientTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    closing: impl FnOnce() -> C,
) where
    C: Future<Output = ()>,
{
    // HTTP/1.1 (REST, the WebSocket upgrade) and HTTP/2 (h2c: the gRPC
    // API) on one port, told apart by the first bytes.
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(header_timeout));
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let http = Arc::new(http);
    // Connections in progress, told to finish (after their current
    // request) at shutdown, and waited for.
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors (or a connection reset
                    // before accept): pause instead of spinning.
                    tracing::debug!(error = %e, "client port accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small frames must leave at once: no Nagle delay on client sockets.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let slot = match edge.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                refuse(tcp, refusal);
                continue;
            }
        };
        let app = app.clone();
        let http = Arc::clone(&http);
        let activity = Activity::new();
        let watched = Arc::clone(&activity);
        let service = tower::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Busy::new(&activity);
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(Arc::clone(&slot));
            let response = app.clone().oneshot(req);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| axum::body::Body::new(Tracked { inner, _busy: busy })),
                )
            }
        });
        let stop = stop.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            // The TLS handshake and the first bytes (HTTP/1 or HTTP/2?)
            // share one deadline, before either protocol's own timeouts
            // run: a client that sends nothing, or never finishes its
            // hello or a slow HTTP/2 preface, is closed here.
            match tls {
                None => {
                    let Ok(Ok(h2)) =
                        tokio::time::timeout(header_timeout, version_known(&tcp)).await
                    else {
                        return;
                    };
                    let idle = h2.then_some((watched, h2_idle));
                    serve_connection(&http, tcp, service, stop, idle).await;
                }
                Some(tls) => {
                    let opened = async {
                        let mut stream = tls.acceptor().accept(tcp).await?;
                        let first = first_bytes(&mut stream).await?;
                        let h2 = first == H2_PREFACE;
                        Ok::<_, std::io::Error>((Prefixed::new(first, stream), h2))
                    };
                    match tokio::time::timeout(header_timeout, opened).await {
                        Ok(Ok((stream, h2))) => {
                            let idle = h2.then_some((watched, h2_idle));
                            serve_connection(&http, stream, service, stop, idle).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("switchboard_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(error = %e, "client port TLS handshake failed");
                        }
                        Err(_) => {}
                    }
                }
            }
        });
    }
    // WebSockets and HTTP requests in progress are closed side by side,
    // within one deadline: one after the other, each with its own, took
    // twice as long as a stop should.
    stop.cancel();
    tracker.close();
    let drained = tokio::time::timeout(DRAIN, async {
        tokio::join!(closing(), tracker.wait());
    })
    .await;
    if drained.is_err() {
        tracing::debug!("client connections still open at shutdown");
    }
}

/// Serves HTTP on one accepted connection until it ends, or finishes its
/// current request once `stop` is cancelled, or (HTTP/2, `idle`) once no
/// request was in progress for the idle time.
async fn serve_connection<I, S>(
    http: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    stop: CancellationToken,
    idle: Option<(Arc<Activity>, Duration)>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<hyper::Request<Incoming>, Response = axum::response::Response>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn =
        http.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let idle_out = async {
        match &idle {
            Some((activity, idle)) => idle_for(activity, *idle).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = idle_out => {
            metrics::counter!("switchboard_http2_idle_closes_total").increment(1);
            conn.as_mut().graceful_shutdown();
            // The GOAWAY waits for the peer's answer to a ping; one that
            // does not answer is dropped.
            match tokio::time::timeout(GOAWAY_WAIT, conn).await {
                Ok(ended) => ended,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client port connection ended with an error");
    }
}

/// Reads a TLS stream's first bytes, until they differ from the HTTP/2
/// preface or hold all of it (or the peer closed); they are given back to
/// the HTTP server through [`Prefixed`].
async fn first_bytes<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut buf = [0u8; 24];
    let mut n = 0;
    while n < buf.len() {
        let read = stream.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            break;
        }
    }
    Ok(buf[..n].to_vec())
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Returns once the first bytes tell HTTP/1 from HTTP/2 (or the peer
/// closed): they differ from the HTTP/2 preface, or hold all of it (then
/// `true`).
async fn version_known(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    loop {
        tcp.readable().await?;
        let n = match tcp.peek(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            return Ok(n == buf.len() && buf == *H2_PREFACE);
        }
        // Part of the preface: peek does not consume, so the socket stays
        // readable; clear that so the next wait is for new bytes.
        let _ = tcp.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
}

/// Answers a connection over a cap with `503` and a JSON body, then closes
/// it (in the background, bounded: a peer that does not read is dropped).
fn refuse(mut tcp: TcpStream, refusal: Refusal) {
    let (reason, message) = match refusal {
        Refusal::Process => (
            "max_connections",
            "this server holds as many connections as it allows; retry later or elsewhere",
        ),
        Refusal::Address => (
            "max_connections_per_ip",
            "too many connections from your address",
        ),
    };
    metrics::counter!("switchboard_connections_refused_total", "reason" => reason).increment(1);
    let body = serde_json::json!({"code": "UNAVAILABLE", "message": message}).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        let write = async {
            tcp.write_all(response.as_bytes()).await?;
            tcp.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_process_and_per_address_free_their_place_when_dropped() {
        let edge = Edge::new(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = edge.admit(a).expect("first from a");
        let a2 = edge.admit(a).expect("second from a");
        assert_eq!(edge.admit(a).err(), Some(Refusal::Address));
        let b1 = edge.admit(b).expect("first from b");
        assert_eq!(edge.admit(b).err(), Some(Refusal::Process));
        drop(a1);
        assert!(edge.admit(b).is_ok(), "a's place is free again");
        drop((a2, b1));
        assert_eq!(edge.lock().per_ip.get(&a), None, "no entry left for a");
    }

    #[test]
    fn zero_means_the_open_files_limit_less_the_reserve() {
        let edge = Edge::new(0, 0);
        let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(edge.max_total as u64, fd_cap(soft));
        assert_eq!(fd_cap(20_000), 19_744);
        assert_eq!(fd_cap(256), 192, "a small limit keeps a quarter");
        assert_eq!(edge.max_per_ip, usize::MAX);
    }
}
