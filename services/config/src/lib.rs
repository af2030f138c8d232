//! Configuration of a Switchboard node.
//!
//! Sources, later ones winning: defaults in code, one TOML file, environment
//! variables `SWITCHBOARD_KEY` / `SWITCHBOARD_SECTION__KEY`, then CLI flags
//! (applied by the binary). The environment is passed in as a map so tests
//! never touch the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod quotas;
pub use quotas::{AppQuotas, QuotasConfig};

pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// The domain of a deployment that names none.
pub const DEFAULT_DOMAIN: &str = "local";

/// Checks a domain name: 1–63 characters of `a-z 0-9 -` (one DNS label, so
/// it can name hosts and key prefixes of the domain as it is).
pub fn validate_domain(domain: &str) -> Result<(), ConfigError> {
    let ok = (1..=63).contains(&domain.len())
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "domain {domain:?} must be 1 to 63 characters of a-z, 0-9 and -"
        )))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid value {value:?} for {var}: expected {expected}")]
    EnvValue {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This deployment's domain name: in traces (`switchboard.domain`), in
    /// the hops of forwarded envelopes, and later the name other domains
    /// know it by. 1–63 characters of `a-z 0-9 -`.
    pub domain: String,
    /// Client port: WebSocket `/ws`, health, metrics.
    pub client_addr: SocketAddr,
    /// Mesh port: gRPC between roles.
    pub mesh_addr: SocketAddr,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// This node's id in the mesh (gateway id in presence). Empty: generated.
    pub node_id: String,
    /// Redis for presence (`redis://host:port`). Empty: in-memory presence,
    /// which is right for one process.
    pub redis: String,
    /// Roles this process runs. Default: all five (one process is a whole
    /// deployment).
    pub roles: Vec<Role>,
    /// etcd endpoints for discovery (`http://127.0.0.1:2379`). Empty: no
    /// discovery; every role must then run in this process.
    pub etcd: Vec<String>,
    /// Secret every mesh call carries; calls without it are refused. Must be
    /// the same on every process of a deployment. Empty: the mesh port is
    /// open (acceptable on loopback only).
    pub mesh_secret: String,
    /// Open the mesh port even where nothing needs it (every role in this
    /// process and no etcd): for tools and tests that call the roles over
    /// gRPC. Elsewhere it is always open.
    pub mesh_listen: bool,
    /// Run a mesh port with neither `mesh_secret` nor `mesh_tls`: anyone who
    /// reaches it may call every role. Refused without this; warned about
    /// at start and every hour with it.
    pub insecure_mesh: bool,
    /// The mesh address other processes dial (`host:port`). Empty: the mesh
    /// address, which then must not be a wildcard when `etcd` is set.
    pub advertise_addr: String,
    pub discovery: DiscoveryConfig,
    pub mesh_tls: MeshTlsConfig,
    pub tls: ClientTlsConfig,
    pub mesh_batch: MeshBatchConfig,
    /// OTLP/gRPC endpoint for traces (`http://127.0.0.1:4317`). Empty:
    /// tracing off.
    pub otlp_endpoint: String,
    /// Fraction of traces kept when tracing is on (parent-based: a trace is
    /// kept or dropped whole).
    pub trace_sampling: f64,
    /// Extra listener for `/metrics` (`host:port`); the client port serves
    /// `/metrics` too. Empty: none.
    pub metrics_addr: String,
    pub limits: Limits,
    pub store: StoreConfig,
    pub presence: PresenceConfig,
    pub federation: FederationConfig,
    pub webhooks: WebhooksConfig,
    pub channels: ChannelsConfig,
    pub ui: UiConfig,
    pub quotas: QuotasConfig,
    /// Client apps. Empty: the built-in development app `demo`.
    pub apps: Vec<AppConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: DEFAULT_DOMAIN.into(),
            client_addr: SocketAddr::from(([127, 0, 0, 1], 8088)),
            mesh_addr: SocketAddr::from(([127, 0, 0, 1], 9089)),
            data_dir: PathBuf::from("./data"),
            node_id: String::new(),
            redis: String::new(),
            roles: Role::ALL.to_vec(),
            etcd: Vec::new(),
            mesh_secret: String::new(),
            mesh_listen: false,
            insecure_mesh: false,
            advertise_addr: String::new(),
            discovery: DiscoveryConfig::default(),
            mesh_tls: MeshTlsConfig::default(),
            tls: ClientTlsConfig::default(),
            mesh_batch: MeshBatchConfig::default(),
            otlp_endpoint: String::new(),
            trace_sampling: 1.0,
            metrics_addr: String::new(),
            limits: Limits::default(),
            store: StoreConfig::default(),
            presence: PresenceConfig::default(),
            federation: FederationConfig::default(),
            webhooks: WebhooksConfig::default(),
            channels: ChannelsConfig::default(),
            ui: UiConfig::default(),
            quotas: QuotasConfig::default(),
            apps: Vec::new(),
        }
    }
}

/// A role a process can run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Router,
    Groups,
    Delivery,
    Auth,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Gateway,
        Role::Router,
        Role::Groups,
        Role::Delivery,
        Role::Auth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Router => "router",
            Role::Groups => "groups",
            Role::Delivery => "delivery",
            Role::Auth => "auth",
        }
    }

    /// Parses a comma-separated list (`gateway,router` or `all`).
    pub fn parse_list(text: &str) -> Result<Vec<Role>, ConfigError> {
        let mut roles = Vec::new();
        for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                roles.extend(Role::ALL);
                continue;
            }
            let role = Role::ALL
                .into_iter()
                .find(|r| r.as_str() == name)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "unknown role {name:?}: expected gateway, router, groups, delivery, auth or all"
                    ))
                })?;
            roles.push(role);
        }
        roles.sort_unstable();
        roles.dedup();
        Ok(roles)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Discovery in etcd (used when `etcd` is set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Prefix of every key: one per deployment sharing an etcd. Empty (the
    /// default): derived from the domain, `/switchboard/` for the domain
    /// `local` and `/switchboard-domain/<domain>/` for any other, so that the
    /// domains of a federation can share one etcd
    /// ([`Config::discovery_prefix`]).
    pub key_prefix: String,
    /// Seconds a process stays registered after its last keep-alive: how long
    /// a crashed process is still called (calls to it fail over at once).
    pub lease_ttl_secs: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            key_prefix: String::new(),
            lease_ttl_secs: 5,
        }
    }
}

/// Federation: this domain linked with others (docs/federation.md). Off
/// unless `addr` is set; then `etcd` is required (the topology is there).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Listen address of the federation port (`host:port`), where
    /// neighbouring domains call this one. Never the mesh port. Empty:
    /// federation off.
    pub addr: String,
    /// The credential of every link without one of its own in `peers`:
    /// sent on this domain's calls and required on calls to it.
    pub secret: String,
    /// Per-neighbour credentials, by domain name (both directions of the
    /// link use it).
    pub peers: BTreeMap<String, String>,
    /// The etcd prefix every domain of the federation shares (the topology
    /// and link states). Empty: `/switchboard-federation/`.
    pub prefix: String,
    /// Domains an envelope may pass through before it is dropped. 0: 8.
    pub hop_limit: u32,
    /// Mutual TLS on the federation port and on calls to neighbours (all
    /// three set) or none. Each domain's certificate names the domain (a
    /// DNS subject alternative name equal to its name); a neighbour's
    /// certificate must name the domain it calls as, and the topology's
    /// federation URLs are then `https://`.
    pub tls: MeshTlsConfig,
}

impl FederationConfig {
    pub fn enabled(&self) -> bool {
        !self.addr.is_empty()
    }

    /// The secret of the link to `peer`.
    pub fn secret_for(&self, peer: &str) -> &str {
        self.peers
            .get(peer)
            .map(String::as_str)
            .unwrap_or(&self.secret)
    }
}

/// Push webhooks: an event POSTed, signed as the Standard Webhooks
/// specification says, when a RELIABLE message lands in the inbox of a
/// user with no open connection. Sent by the delivery process from a
/// durable outbox per app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// How long an event is retried before it goes to the dead letters.
    #[serde(with = "humantime_duration")]
    pub retry_for: Duration,
    /// One POST may take this long.
    #[serde(with = "humantime_duration")]
    pub timeout: Duration,
    /// The first pause after a failure; it doubles (with jitter) up to a
    /// minute.
    #[serde(with = "humantime_duration")]
    pub backoff_min: Duration,
    /// The apps that have a webhook.
    pub apps: Vec<AppWebhook>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            retry_for: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            apps: Vec::new(),
        }
    }
}

/// One app's webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppWebhook {
    pub app_id: String,
    /// `http(s)://…`, where events are POSTed.
    pub url: String,
    /// `whsec_` + base64 (as Standard Webhooks libraries give it).
    pub secret: String,
    /// The event types to send; empty: all (`message.offline`).
    #[serde(default)]
    pub events: Vec<String>,
    /// Characters of the message content in the event; 0 (default): none.
    #[serde(default)]
    pub preview_chars: usize,
}

/// Mutual TLS on the mesh port (all three set) or none (all empty). Every
/// process presents `cert` when serving and when calling, and accepts only
/// peers whose certificate `ca` signed. Certificates need the advertised
/// host (IP or DNS name) as a subject alternative name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshTlsConfig {
    /// This process's certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA certificate that signs every mesh certificate, PEM.
    pub ca: PathBuf,
}

impl MeshTlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

/// TLS on the client port (`wss://`, `https://`, gRPC over TLS): `cert`
/// and `key` both set, or neither (plain `ws://` and `http://`). The files
/// are read again every `reload_interval`; a changed pair that loads
/// replaces the old one for new connections, one that does not is logged
/// and the old one kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for a change (humantime: `"5s"`).
    #[serde(with = "humantime_duration")]
    pub reload_interval: Duration,
}

impl Default for ClientTlsConfig {
    fn default() -> Self {
        ClientTlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl ClientTlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

/// Per-connection protocol limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest text frame accepted, bytes. Larger frames get
    /// `ERROR PAYLOAD_TOO_LARGE`; frames over 4× this close the socket (1009).
    pub max_frame_bytes: usize,
    /// Largest message content, bytes.
    pub max_content_bytes: usize,
    /// Sustained messages per second per connection (the burst is the same).
    pub messages_per_second: u32,
    /// Refused frames (without a one-second pause) after which a flooding
    /// connection is closed.
    pub max_refusals: u32,
    /// Recipients of one ad-hoc GROUP_MESSAGE.
    pub max_group_recipients: usize,
    /// Members of one persistent group, the owner included.
    pub max_group_members: usize,
    /// Persistent groups one user may belong to.
    pub max_groups_per_user: usize,
    /// Recipients per delivery call (one store write) when a message to a
    /// persistent group is fanned out.
    pub group_fanout_batch: usize,
    /// Seconds a new connection has to send AUTH_CLIENT.
    pub auth_timeout_secs: u64,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub send_queue_frames: usize,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client before it is dropped.
    pub idle_timeout_secs: u64,
    /// Largest `count` of one FETCH_MISSING_MESSAGES_REQUEST.
    pub max_fetch_count: u32,
    /// Unacknowledged messages tracked per connection in ack mode.
    pub max_unacked: usize,
    /// WebSocket read buffer per connection, bytes: the largest fixed cost of
    /// an idle connection (see docs/benchmarks.md).
    pub read_buffer_bytes: usize,
    /// Socket reads smaller than this are made this large and served from
    /// memory (one `recv` for many frames under load). The chunk is held only
    /// while it has unread bytes: idle connections keep none. 0 reads
    /// straight into the read buffer.
    pub read_ahead_bytes: usize,
    /// Frames written to a connection are gathered up to this many bytes
    /// before a socket write (a batch is always flushed at its end): fewer
    /// write calls under load, no added latency. 0 writes every frame at
    /// once. A connection that was sent a batch keeps a buffer of about this
    /// size; idle ones do not.
    pub write_buffer_bytes: usize,
    /// Frames pushed to this gateway's connections and not yet written,
    /// past which connections' readers wait before taking more messages
    /// (ingestion slows to what the sockets drain; senders feel TCP
    /// backpressure). 0 turns the gate off.
    pub backlog_frames: usize,
    /// Topics one connection may be subscribed to.
    pub max_topics_per_connection: usize,
    /// Rooms one connection may be in.
    pub max_rooms_per_connection: usize,
    /// Users one connection may watch with PRESENCE_SUBSCRIBE.
    pub max_presence_subscriptions: usize,
    /// Users in one USER_LIST (past it the list says `truncated`).
    pub max_user_list: usize,
    /// Longest user id, in characters (signing in, recipients, members).
    pub max_user_id_chars: usize,
    /// Sustained ACK frames per second per connection (their own limit:
    /// ACKs do not count against `messages_per_second`).
    pub acks_per_second: u32,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// (beside `send_queue_frames`).
    pub send_queue_bytes: usize,
    /// Seconds a client has to send a whole HTTP request head (the
    /// WebSocket upgrade included) on the client port; also how long an
    /// idle keep-alive HTTP connection stays open.
    pub http_header_timeout_secs: u64,
    /// Open client-port connections per process (HTTP and WebSocket); past
    /// it new ones get 503. 0: the open-files limit less a reserve of 256,
    /// so that health checks, the mesh and the store keep working.
    pub max_connections: usize,
    /// Open client-port connections from one IP address; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// Seconds an HTTP/2 connection (the gRPC API) may go without a
    /// request in progress before it is closed (GOAWAY); its pings do not
    /// count.
    pub http2_idle_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_content_bytes: 16 * 1024,
            messages_per_second: 200,
            max_refusals: 200,
            max_group_recipients: 1000,
            max_group_members: 10_000,
            max_groups_per_user: 1_000,
            group_fanout_batch: 1_000,
            auth_timeout_secs: 10,
            send_queue_frames: 4096,
            ping_interval_secs: 25,
            idle_timeout_secs: 75,
            max_fetch_count: 1000,
            max_unacked: 10_000,
            read_buffer_bytes: 512,
            read_ahead_bytes: 16 * 1024,
            write_buffer_bytes: 16 * 1024,
            backlog_frames: 16_384,
            max_topics_per_connection: 100,
            max_rooms_per_connection: 20,
            max_presence_subscriptions: 1000,
            max_user_list: 1000,
            max_user_id_chars: 128,
            acks_per_second: 1000,
            send_queue_bytes: 8 * 1024 * 1024,
            http_header_timeout_secs: 10,
            max_connections: 0,
            max_connections_per_ip: 0,
            http2_idle_timeout_secs: 300,
        }
    }
}

/// How a process gathers its calls to other processes into batch calls
/// (gateway → router, router and groups → delivery).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshBatchConfig {
    /// Batch calls at all. Off by default until a stall seen once under
    /// load with batching is explained: each call to another process is
    /// then its own unary call (`Route`, `Deliver`) and the other keys are
    /// unused.
    pub enabled: bool,
    /// Calls per batch.
    pub max_items: usize,
    /// Encoded bytes per batch (a larger call goes alone).
    pub max_bytes: usize,
    /// Microseconds a busy peer's next batch waits for more calls. 0: none;
    /// an idle peer never waits, and what arrives while a batch is in
    /// flight already forms the next one. Tokio's timers tick in
    /// milliseconds, so small values round up to one.
    pub linger_us: u64,
    /// Batches in flight to one peer at once (calls of one sender always
    /// share one, in order).
    pub lanes: usize,
}

impl Default for MeshBatchConfig {
    fn default() -> Self {
        MeshBatchConfig {
            enabled: false,
            max_items: 512,
            max_bytes: 4 * 1024 * 1024,
            linger_us: 0,
            lanes: 4,
        }
    }
}

/// Presence in Redis (used when `redis` is set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Prefix of every presence key: one per deployment sharing a Redis.
    pub key_prefix: String,
    /// Seconds a gateway counts as alive after its last heartbeat; its users'
    /// entries are ignored after that.
    pub gateway_ttl_secs: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            key_prefix: "switchboard:".into(),
            gateway_ttl_secs: 5,
        }
    }
}

/// Topics and rooms, kept in memory by their owning groups instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsConfig {
    /// Publications a topic keeps for recovery (`SUBSCRIBE` with `since`).
    pub topic_history: usize,
    /// Messages a room keeps for the `history` of `ROOM_JOINED`.
    pub room_history: usize,
    /// How long an empty room, or a topic without subscribers, is kept
    /// after its last activity (humantime: `"1h"`, `"30s"`).
    #[serde(with = "humantime_duration")]
    pub idle: Duration,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        ChannelsConfig {
            topic_history: 100,
            room_history: 1000,
            idle: Duration::from_secs(3600),
        }
    }
}

/// The web UI on the client port (docs/ui.md): the chat client at `/`
/// and the operator console at `/console` with its `/v1/admin` API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Serve the chat client at `/` (on by default: it only speaks the
    /// public protocol).
    pub chat: bool,
    /// Serve the operator console at `/console` and the `/v1/admin` API.
    /// Off by default; needs `console_app`.
    pub console: bool,
    /// The app whose API keys with the `admin` scope open the console.
    pub console_app: String,
    /// Jaeger's UI (`http://jaeger:16686`): the console links a message id
    /// to a search for its trace. Empty: no links.
    pub jaeger_url: String,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            chat: true,
            console: false,
            console_app: String::new(),
            jaeger_url: String::new(),
        }
    }
}

/// Who may publish to an app's topics.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TopicPublish {
    /// Every authenticated user of the app.
    #[default]
    Any,
    /// Only the app's master user (and the server API).
    Master,
}

impl TopicPublish {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicPublish::Any => "any",
            TopicPublish::Master => "master",
        }
    }
}

/// Engine of the store: the embedded one, or a shared database.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    /// The inbox log in front of fjall, an LSM tree, in the data dir.
    Fjall,
    /// A ScyllaDB cluster (`url`, `keyspace`, `replication_factor`,
    /// `consistency`), shared by any number of delivery processes.
    Scylla,
    /// A PostgreSQL database (`store.url`) shared by every delivery
    /// process of the deployment.
    Postgres,
}

impl StoreEngine {
    /// A database several delivery processes share (sharded delivery);
    /// the embedded engine is one process's.
    pub fn is_shared(self) -> bool {
        self != StoreEngine::Fjall
    }
}

/// The store: the embedded engine in the data dir, or a shared database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `fjall`, the embedded engine (the default), or `postgres`.
    pub engine: StoreEngine,
    /// Most messages (appended or removed) committed, and fsync'd, together.
    pub max_batch: usize,
    /// Shortest time from one sync to the next, microseconds: appends that
    /// arrive sooner wait (at most this long) and share the next sync. 0:
    /// sync as often as the disk allows.
    pub sync_interval_us: u64,
    /// Page cache, MiB.
    pub cache_mib: usize,
    /// fjall only: undelivered messages kept in memory (and in the inbox
    /// log) before the oldest are moved into the LSM tree, MiB.
    pub hot_mib: usize,
    /// fjall only: start even when the inbox log is damaged, keeping every
    /// intact record and logging (error level) what was lost; sequence
    /// numbers continue above all given out before. Without it a damaged
    /// log refuses the start with the file and byte offset. For one start
    /// after damage, not as a standing setting (`run --store-recover`).
    pub recover: bool,
    /// How long a client-given message id is remembered per sender: a
    /// resend within it is answered as accepted and not stored again
    /// (humantime: `"24h"`, `"90m"`).
    #[serde(with = "humantime_duration")]
    pub id_window: Duration,
    /// A shared engine's address; postgres:
    /// `postgres://user:password@host:5432/database`; scylla: contact
    /// points, `host:9042,host2:9042`.
    pub url: String,
    /// scylla: the keyspace, created (with the schema) at start-up when
    /// missing.
    pub keyspace: String,
    /// scylla: replicas of every partition in each datacenter, when the
    /// keyspace is created (1 for a single development node).
    pub replication_factor: u32,
    /// scylla: consistency level of every read and write: `local_quorum`
    /// (the default), `quorum`, `all`, `one`, `local_one`, …
    /// (docs/operations.md, "ScyllaDB store").
    pub consistency: String,
    /// Shared engines: most connections one process holds.
    pub pool_size: usize,
}

/// A duration written as humantime text (`"24h"`, `"1s"`).
#[doc(hidden)]
pub mod fuzzing;

mod humantime_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            engine: StoreEngine::Fjall,
            max_batch: 8192,
            sync_interval_us: 1000,
            cache_mib: 64,
            hot_mib: 64,
            recover: false,
            id_window: Duration::from_secs(24 * 60 * 60),
            url: String::new(),
            keyspace: "switchboard".into(),
            replication_factor: 3,
            consistency: "local_quorum".into(),
            pool_size: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Any token is accepted. Development only.
    None,
    /// A JWT signed with HS256 or RS256; `sub` must equal the user id.
    Jwt,
    /// The app's own service decides: `{appId, userId, token}` is POSTed
    /// to `auth_url`, which answers `{"isAuthenticated": true|false}`.
    Url,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The user id prefix: user ids are `NAME-<id>`.
    pub name: String,
    pub app_id: String,
    /// Receives USER_CONNECTED / USER_DISCONNECTED.
    #[serde(default)]
    pub master_user_id: String,
    pub auth: AuthMode,
    /// HS256 shared secret.
    #[serde(default)]
    pub jwt_secret: Option<String>,
    /// RS256 public key, PEM text.
    #[serde(default)]
    pub jwt_public_key_pem: Option<String>,
    /// RS256 public key, path of a PEM file.
    #[serde(default)]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` of tokens; when unset, `aud` is not checked.
    #[serde(default)]
    pub jwt_audience: Option<String>,
    /// `auth = "url"`: where `{appId, userId, token}` is POSTed; a 2xx
    /// answer `{"isAuthenticated": true}` (optionally `"expiresAt"`, Unix
    /// milliseconds) lets the user in, and is remembered for up to a
    /// minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_url: Option<String>,
    /// `auth = "jwt"`: a JSON Web Key Set (http:// or https://) whose keys
    /// (RS256, ES256, EdDSA) check tokens by their `kid`; fetched when
    /// first needed, again on an unknown `kid` (at most once a second) and
    /// when older than five minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Who may PUBLISH to topics: `any` (default) or `master`.
    #[serde(default)]
    pub topic_publish: TopicPublish,
    /// Connections may join rooms without AUTH_CLIENT (given a generated
    /// user id).
    #[serde(default)]
    pub anonymous_rooms: bool,
    /// Server-side credentials of the REST API (`Authorization: Bearer
    /// <key>`), stored as hashes only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Web origins (`https://chat.example.com`, scheme://host[:port]) whose
    /// pages may open WebSocket connections for this app: a browser
    /// connection sent from another origin is refused at AUTH_CLIENT (or an
    /// anonymous ROOM_JOIN). Empty: any origin. Connections without an
    /// `Origin` header (not from a browser) are not affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// This app's own quotas, over `[quotas]` (absent keys keep it).
    #[serde(default, skip_serializing_if = "AppQuotas::is_empty")]
    pub quotas: AppQuotas,
}

/// One API key of an app: `{ name = "backend", sha256 = "<hex>", scopes = ["send"] }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// For logs and operators; not secret.
    pub name: String,
    /// Lowercase hex SHA-256 of the key (64 characters): the key itself is
    /// never stored (`switchboard apps new-key` prints both).
    pub sha256: String,
    pub scopes: Vec<ApiScope>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ApiScope {
    /// Send messages.
    Send,
    /// Manage persistent groups.
    Groups,
    /// Read presence.
    Presence,
    /// Everything, including reading inbox depths.
    Admin,
}

impl ApiScope {
    pub const ALL: [ApiScope; 4] = [
        ApiScope::Send,
        ApiScope::Groups,
        ApiScope::Presence,
        ApiScope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiScope::Send => "send",
            ApiScope::Groups => "groups",
            ApiScope::Presence => "presence",
            ApiScope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<ApiScope> {
        ApiScope::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl AppConfig {
    /// The built-in development app.
    pub fn demo() -> Self {
        AppConfig {
            name: "demo".into(),
            app_id: "demo".into(),
            master_user_id: "demo-0".into(),
            auth: AuthMode::None,
            jwt_secret: None,
            jwt_public_key_pem: None,
            jwt_public_key_file: None,
            jwt_audience: None,
            auth_url: None,
            jwks_url: None,
            topic_publish: TopicPublish::Any,
            anonymous_rooms: false,
            api_keys: Vec::new(),
            allowed_origins: Vec::new(),
            quotas: AppQuotas::default(),
        }
    }
}

impl Config {
    /// Loads the config: the TOML file (when given), then the `SWITCHBOARD_*`
    /// variables of `env`. Variables that name no config key are ignored
    /// (they may belong to tools or tests).
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, env)
    }

    pub fn from_toml_and_env(
        text: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let Some(default) = lookup(&defaults, &path) else {
                continue;
            };
            let parsed = typed_like(default, var, value)?;
            insert(&mut table, &path, parsed);
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Every environment variable the loader reads a key from
    /// (`SWITCHBOARD_CLIENT_ADDR`, `SWITCHBOARD_LIMITS__MAX_FRAME_BYTES`, …),
    /// sorted: what deploy files may set.
    pub fn env_var_names() -> Vec<String> {
        fn walk(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (key, value) in table {
                let name = format!("{prefix}{}", key.to_ascii_uppercase());
                match value {
                    toml::Value::Table(inner) => walk(inner, &format!("{name}__"), out),
                    _ => out.push(name),
                }
            }
        }
        let mut out = Vec::new();
        if let Ok(defaults) = toml::Table::try_from(Config::default()) {
            walk(&defaults, ENV_PREFIX, &mut out);
        }
        out.sort();
        out
    }

    /// Whether this process opens the mesh port: when other processes may
    /// call it (it does not run every role, or it is in etcd), or when
    /// `mesh_listen` asks. One process running everything with no etcd —
    /// `switchboard run` — opens none: its roles call each other in-process.
    pub fn listens_on_mesh(&self) -> bool {
        self.mesh_listen || !self.etcd.is_empty() || !Role::ALL.iter().all(|r| self.runs(*r))
    }

    /// The configured apps, or the built-in development app when none are.
    pub fn effective_apps(&self) -> Vec<AppConfig> {
        if self.apps.is_empty() {
            vec![AppConfig::demo()]
        } else {
            self.apps.clone()
        }
    }

    /// The etcd key prefix of this deployment's own keys (discovery, apps):
    /// `discovery.key_prefix`, or derived from the domain when empty.
    pub fn discovery_prefix(&self) -> String {
        if !self.discovery.key_prefix.is_empty() {
            return self.discovery.key_prefix.clone();
        }
        // Beside `/switchboard/`, not under it: no domain's keys fall
        // among the `local` deployment's.
        if self.domain == DEFAULT_DOMAIN {
            "/switchboard/".to_owned()
        } else {
            format!("/switchboard-domain/{}/", self.domain)
        }
    }

    /// The etcd prefix the domains of a federation share.
    pub fn federation_prefix(&self) -> String {
        if self.federation.prefix.is_empty() {
            "/switchboard-federation/".to_owned()
        } else {
            self.federation.prefix.clone()
        }
    }

    /// Whether this process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The mesh address other processes dial, as a URL.
    pub fn advertised_mesh_url(&self) -> Result<String, ConfigError> {
        let addr = if self.advertise_addr.is_empty() {
            if self.mesh_addr.ip().is_unspecified() {
                return Err(ConfigError::Invalid(format!(
                    "mesh_addr {} is a wildcard address: set advertise_addr to the address other processes dial",
                    self.mesh_addr
                )));
            }
            self.mesh_addr.to_string()
        } else {
            self.advertise_addr.clone()
        };
        let scheme = if self.mesh_tls.enabled() {
            "https"
        } else {
            "http"
        };
        Ok(if addr.contains("://") {
            addr
        } else {
            format!("{scheme}://{addr}")
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_domain(&self.domain)?;
        self.quotas.validate().map_err(ConfigError::Invalid)?;
        for app in &self.apps {
            app.quotas
                .over(&self.quotas)
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("app {}: {e}", app.app_id)))?;
        }
        if self.roles.is_empty() {
            return Err(ConfigError::Invalid(
                "roles is empty: name at least one of gateway, router, groups, delivery, auth"
                    .into(),
            ));
        }
        // One process running every role is a whole deployment: it may use
        // etcd (a federation's topology) with presence in memory.
        let all_roles = Role::ALL.iter().all(|r| self.runs(*r));
        if !self.etcd.is_empty() && self.redis.is_empty() && !all_roles {
            return Err(ConfigError::Invalid(
                "etcd is set but redis is not: processes of one deployment share presence in Redis"
                    .into(),
            ));
        }
        if self.listens_on_mesh()
            && self.mesh_secret.is_empty()
            && !self.mesh_tls.enabled()
            && !self.insecure_mesh
        {
            return Err(ConfigError::Invalid(format!(
                "the mesh port {} would accept calls from anyone who reaches it: set mesh_secret \
                 (the same on every process of the deployment) or mesh_tls, or run it open with \
                 --insecure-mesh (insecure_mesh = true)",
                self.mesh_addr
            )));
        }
        for hook in &self.webhooks.apps {
            if !(hook.url.starts_with("http://") || hook.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "webhooks.apps {}: url {:?} is not http(s)://…",
                    hook.app_id, hook.url
                )));
            }
            if !hook.secret.starts_with("whsec_") || hook.secret.len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "webhooks.apps {}: secret must be whsec_ followed by base64 (at least 10 characters of it)",
                    hook.app_id
                )));
            }
            if let Some(bad) = hook.events.iter().find(|e| *e != "message.offline") {
                return Err(ConfigError::Invalid(format!(
                    "webhooks.apps {}: unknown event {bad:?} (known: message.offline)",
                    hook.app_id
                )));
            }
        }
        if self.webhooks.timeout.is_zero() || self.webhooks.backoff_min.is_zero() {
            return Err(ConfigError::Invalid(
                "webhooks.timeout and webhooks.backoff_min must be above zero".into(),
            ));
        }
        let fed = &self.federation;
        if fed.enabled() {
            if fed.addr.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "federation.addr {:?} is not host:port",
                    fed.addr
                )));
            }
            if self.etcd.is_empty() {
                return Err(ConfigError::Invalid(
                    "federation.addr is set but etcd is not: the federation's topology is in etcd"
                        .into(),
                ));
            }
            if !self.runs(Role::Router) || !self.runs(Role::Delivery) {
                return Err(ConfigError::Invalid(
                    "federation needs the router and delivery roles in this process: the link \
                     outboxes are durable queues in the delivery store"
                        .into(),
                ));
            }
            if fed.addr.parse::<SocketAddr>().ok() == Some(self.mesh_addr) {
                return Err(ConfigError::Invalid(
                    "federation.addr must not be the mesh address: the mesh never faces another domain"
                        .into(),
                ));
            }
            if fed.secret.is_empty() && fed.peers.is_empty() {
                return Err(ConfigError::Invalid(
                    "federation.addr is set but no federation secret is: every link between \
                     domains carries a credential (--federation-secret or [federation.peers])"
                        .into(),
                ));
            }
            let set = [&fed.tls.cert, &fed.tls.key, &fed.tls.ca]
                .iter()
                .filter(|p| !p.as_os_str().is_empty())
                .count();
            if set != 0 && set != 3 {
                return Err(ConfigError::Invalid(
                    "federation.tls needs all of cert, key and ca (or none)".into(),
                ));
            }
            for (peer, secret) in &fed.peers {
                validate_domain(peer)?;
                if secret.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "federation.peers.{peer} is empty"
                    )));
                }
            }
        }
        let tls = &self.mesh_tls;
        let set = [&tls.cert, &tls.key, &tls.ca]
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .count();
        if set != 0 && set != 3 {
            return Err(ConfigError::Invalid(
                "mesh_tls needs all of cert, key and ca (or none)".into(),
            ));
        }
        if self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "tls needs both cert and key (or neither, for a plain client port)".into(),
            ));
        }
        if self.tls.reload_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "tls.reload_interval must be above zero".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.trace_sampling) {
            return Err(ConfigError::Invalid(format!(
                "trace_sampling must be within 0.0 and 1.0, not {}",
                self.trace_sampling
            )));
        }
        if !self.metrics_addr.is_empty() && self.metrics_addr.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "metrics_addr {:?} is not host:port",
                self.metrics_addr
            )));
        }
        if self.discovery.lease_ttl_secs == 0 {
            return Err(ConfigError::Invalid(
                "discovery.lease_ttl_secs must be > 0".into(),
            ));
        }
        if self.store.engine == StoreEngine::Postgres && self.store.url.is_empty() {
            return Err(ConfigError::Invalid(
                "store.engine is postgres but store.url is empty: set it to postgres://user@host:port/database"
                    .into(),
            ));
        }
        if self.store.pool_size == 0 {
            return Err(ConfigError::Invalid(
                "store.pool_size must be at least 1".into(),
            ));
        }
        if self.store.hot_mib == 0 {
            return Err(ConfigError::Invalid(
                "store.hot_mib must be at least 1 (MiB of undelivered messages kept in the inbox log)"
                    .into(),
            ));
        }
        if self.store.engine == StoreEngine::Scylla && self.store.url.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "store.url must name the ScyllaDB nodes (host:9042,host2:9042) with engine = \"scylla\""
                    .into(),
            ));
        }
        if self.store.sync_interval_us > 100_000 {
            return Err(ConfigError::Invalid(
                "store.sync_interval_us must be at most 100000 (every durable write may wait that long)"
                    .into(),
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 256 || l.max_content_bytes == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_frame_bytes must be >= 256 and limits.max_content_bytes > 0".into(),
            ));
        }
        if l.read_buffer_bytes < 256 {
            return Err(ConfigError::Invalid(
                "limits.read_buffer_bytes must be >= 256".into(),
            ));
        }
        if l.read_ahead_bytes > 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "limits.read_ahead_bytes must be at most 1048576 (held by every connection that is reading)"
                    .into(),
            ));
        }
        if l.max_user_id_chars == 0
            || l.acks_per_second == 0
            || l.send_queue_bytes < 64 * 1024
            || l.http_header_timeout_secs == 0
        {
            return Err(ConfigError::Invalid(
                "limits.max_user_id_chars, acks_per_second and http_header_timeout_secs must be > 0, \
                 and limits.send_queue_bytes at least 65536"
                    .into(),
            ));
        }
        if l.http2_idle_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "limits.http2_idle_timeout_secs must be > 0".into(),
            ));
        }
        if l.messages_per_second == 0 || l.send_queue_frames == 0 || l.max_group_recipients == 0 {
            return Err(ConfigError::Invalid(
                "limits.messages_per_second, send_queue_frames and max_group_recipients must be > 0"
                    .into(),
            ));
        }
        if l.max_group_members == 0
            || l.max_group_members > 100_000
            || l.max_groups_per_user == 0
            || l.group_fanout_batch == 0
            || l.group_fanout_batch > 10_000
        {
            return Err(ConfigError::Invalid(
                "limits.max_group_members must be 1 to 100000, limits.max_groups_per_user > 0, \
                 and limits.group_fanout_batch 1 to 10000"
                    .into(),
            ));
        }
        if self.ui.console && self.ui.console_app.is_empty() {
            return Err(ConfigError::Invalid(
                "ui.console is on but ui.console_app is empty: name the app whose admin API keys open the console"
                    .into(),
            ));
        }
        let jaeger = &self.ui.jaeger_url;
        let is_http = jaeger.starts_with("http://") || jaeger.starts_with("https://");
        if !jaeger.is_empty() && !is_http {
            return Err(ConfigError::Invalid(format!(
                "ui.jaeger_url {jaeger:?} is not http(s)://…"
            )));
        }
        let mut ids = std::collections::BTreeSet::new();
        for app in &self.apps {
            app.validate()?;
            if !ids.insert(app.app_id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "app_id {:?} is defined twice",
                    app.app_id
                )));
            }
        }
        Ok(())
    }
}

impl AppConfig {
    /// What every app needs, from the config file or from etcd.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.app_id.is_empty() {
            return Err(ConfigError::Invalid(
                "every app needs a name and an app_id".into(),
            ));
        }
        if self.app_id.contains('/') {
            return Err(ConfigError::Invalid(format!(
                "app_id {:?} must not contain '/'",
                self.app_id
            )));
        }
        for origin in &self.allowed_origins {
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                (scheme == "http" || scheme == "https")
                    && !rest.is_empty()
                    && !rest.contains(['/', '?', '#', ' '])
            });
            if !valid || origin.ends_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "app {:?}: allowed_origins entry {origin:?} must be scheme://host[:port] \
                     (http or https, no path), as browsers send it",
                    self.name
                )));
            }
        }
        if self.auth == AuthMode::Url {
            match &self.auth_url {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {}
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "app {:?} uses url auth but has no auth_url (http:// or https://)",
                        self.name
                    )));
                }
            }
        }
        if self.auth == AuthMode::Jwt
            && self.jwt_secret.is_none()
            && self.jwt_public_key_pem.is_none()
            && self.jwt_public_key_file.is_none()
            && self.jwks_url.is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "app {:?} uses jwt auth but has no jwt_secret, jwt_public_key_pem, jwt_public_key_file or jwks_url",
                self.name
            )));
        }
        if let Some(url) = &self.jwks_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "app {:?}: jwks_url must be http:// or https://",
                self.name
            )));
        }
        for key in &self.api_keys {
            let hex = key.sha256.len() == 64
                && key
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if key.name.is_empty() || !hex || key.scopes.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "app {:?}: api key {:?} needs a name, sha256 as 64 lowercase hex digits and at least one scope",
                    self.name, key.name
                )));
            }
        }
        Ok(())
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    lookup(value.as_table()?, rest)
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return;
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let Some(inner) = entry.as_table_mut() {
        insert(inner, rest, value);
    }
}

/// Parses an env value as the type the default has.
fn typed_like(default: &toml::Value, var: &str, raw: &str) -> Result<toml::Value, ConfigError> {
    let err = |expected| ConfigError::EnvValue {
        var: var.to_owned(),
        value: raw.to_owned(),
        expected,
    };
    Ok(match default {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| err("an integer"))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(raw.trim().parse().map_err(|_| err("true or false"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| err("a number"))?)
        }
        // Lists: comma-separated.
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_load_and_are_checked() {
        let app = |keys: &str| {
            format!(
                "[[apps]]\nname = \"ANZ\"\napp_id = \"a1\"\nauth = \"none\"\napi_keys = [{keys}]\n"
            )
        };
        let hash = "ab".repeat(32);
        let c = Config::from_toml_and_env(
            &app(&format!(
                "{{ name = \"backend\", sha256 = \"{hash}\", scopes = [\"send\", \"admin\"] }}"
            )),
            &BTreeMap::new(),
        )
        .expect("valid");
        assert_eq!(
            c.apps[0].api_keys[0].scopes,
            vec![ApiScope::Send, ApiScope::Admin]
        );
        for bad in [
            format!("{{ name = \"b\", sha256 = \"{hash}\", scopes = [\"root\"] }}"),
            format!(
                "{{ name = \"b\", sha256 = \"{}\", scopes = [\"send\"] }}",
                "AB".repeat(32)
            ),
            "{ name = \"b\", sha256 = \"abc\", scopes = [\"send\"] }".to_owned(),
            format!("{{ name = \"b\", sha256 = \"{hash}\", scopes = [] }}"),
            format!("{{ name = \"\", sha256 = \"{hash}\", scopes = [\"send\"] }}"),
            format!("{{ name = \"b\", sha256 = \"{hash}\", scopes = [\"send\"], key = \"x\" }}"),
        ] {
            assert!(
                Config::from_toml_and_env(&app(&bad), &BTreeMap::new()).is_err(),
                "{bad}"
            );
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_without_file_or_env() {
        let c = Config::load(None, &BTreeMap::new()).expect("load");
        assert_eq!(c, Config::default());
        assert_eq!(c.client_addr.to_string(), "127.0.0.1:8088");
        assert_eq!(c.effective_apps(), vec![AppConfig::demo()]);
    }

    #[test]
    fn env_overrides_file_and_ignores_foreign_vars() {
        let text = "client_addr = \"127.0.0.1:1000\"\n[limits]\nmax_frame_bytes = 1000\n";
        let c = Config::from_toml_and_env(
            text,
            &env(&[
                ("SWITCHBOARD_CLIENT_ADDR", "127.0.0.1:2000"),
                ("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "7"),
                ("SWITCHBOARD_TEST_ETCD", "http://x"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("load");
        assert_eq!(c.client_addr.to_string(), "127.0.0.1:2000");
        assert_eq!(c.limits.max_frame_bytes, 1000);
        assert_eq!(c.limits.messages_per_second, 7);
    }

    #[test]
    fn roles_and_etcd_from_env_lists() {
        let c = Config::from_toml_and_env(
            "",
            &env(&[
                ("SWITCHBOARD_ROLES", "gateway, auth"),
                ("SWITCHBOARD_ETCD", "http://127.0.0.1:1,http://127.0.0.1:2"),
                ("SWITCHBOARD_REDIS", "redis://127.0.0.1:3"),
                ("SWITCHBOARD_MESH_SECRET", "s"),
            ]),
        )
        .expect("load");
        assert_eq!(c.roles, vec![Role::Gateway, Role::Auth]);
        assert_eq!(c.etcd.len(), 2);
        assert!(
            Config::from_toml_and_env("", &env(&[("SWITCHBOARD_ROLES", "gateway,cache")])).is_err()
        );
        // Discovery without shared presence cannot work for split roles;
        // one process with every role is a whole deployment and may.
        let err = Config::from_toml_and_env(
            "",
            &env(&[
                ("SWITCHBOARD_ETCD", "http://x:1"),
                ("SWITCHBOARD_ROLES", "gateway,router"),
            ]),
        )
        .expect_err("etcd without redis");
        assert!(err.to_string().contains("redis"), "{err}");
        let etcd_secret = [
            ("SWITCHBOARD_ETCD", "http://x:1"),
            ("SWITCHBOARD_MESH_SECRET", "s"),
        ];
        assert!(Config::from_toml_and_env("", &env(&etcd_secret)).is_ok());
    }

    #[test]
    fn a_mesh_port_needs_a_secret_tls_or_insecure_mesh() {
        // All-in-one without etcd opens no mesh port: nothing to protect.
        let c = Config::from_toml_and_env("", &env(&[])).expect("all-in-one");
        assert!(!c.listens_on_mesh());
        for open in [
            &[("SWITCHBOARD_ROLES", "router")][..],
            &[("SWITCHBOARD_MESH_LISTEN", "true")],
            &[("SWITCHBOARD_ETCD", "http://x:1")],
        ] {
            let err = Config::from_toml_and_env("", &env(open)).expect_err("open mesh");
            assert!(
                err.to_string().contains("would accept calls from anyone"),
                "{err}"
            );
            let mut insecure = open.to_vec();
            insecure.push(("SWITCHBOARD_INSECURE_MESH", "true"));
            let c = Config::from_toml_and_env("", &env(&insecure)).expect("insecure mesh");
            assert!(c.listens_on_mesh());
            let mut secret = open.to_vec();
            secret.push(("SWITCHBOARD_MESH_SECRET", "s"));
            assert!(Config::from_toml_and_env("", &env(&secret)).is_ok());
        }
    }

    #[test]
    fn federation_settings_are_checked() {
        let ok = Config::from_toml_and_env(
            "domain = \"d1\"\netcd = [\"http://x:1\"]\nmesh_secret = \"m\"\n[federation]\naddr = \"127.0.0.1:9090\"\nsecret = \"s\"\n[federation.peers]\nd2 = \"own\"\n",
            &env(&[]),
        )
        .expect("load");
        assert_eq!(ok.federation.secret_for("d2"), "own");
        assert_eq!(ok.federation.secret_for("d3"), "s");
        assert_eq!(ok.discovery_prefix(), "/switchboard-domain/d1/");
        assert_eq!(Config::default().discovery_prefix(), "/switchboard/");
        let refused = |toml: &str, needle: &str| {
            let err = Config::from_toml_and_env(toml, &env(&[])).expect_err(toml);
            assert!(err.to_string().contains(needle), "{err}");
        };
        refused(
            "[federation]\naddr = \"127.0.0.1:9090\"\nsecret = \"s\"\n",
            "etcd",
        );
        refused(
            "etcd = [\"http://x:1\"]\n[federation]\naddr = \"127.0.0.1:9090\"\n",
            "secret",
        );
        refused(
            "etcd = [\"http://x:1\"]\nmesh_addr = \"127.0.0.1:9090\"\n[federation]\naddr = \"127.0.0.1:9090\"\nsecret = \"s\"\n",
            "mesh",
        );
    }

    #[test]
    fn the_domain_is_checked_and_set_from_env() {
        assert_eq!(Config::default().domain, "local");
        let c = Config::from_toml_and_env("domain = \"eu-1\"\n", &env(&[])).expect("load");
        assert_eq!(c.domain, "eu-1");
        let c = Config::from_toml_and_env(
            "domain = \"eu-1\"\n",
            &env(&[("SWITCHBOARD_DOMAIN", "us2")]),
        )
        .expect("load");
        assert_eq!(c.domain, "us2");
        for bad in ["", "EU", "eu.1", "eu_1", &"a".repeat(64)] {
            let err = Config::from_toml_and_env("", &env(&[("SWITCHBOARD_DOMAIN", bad)]))
                .expect_err("refused");
            assert!(err.to_string().contains("domain"), "{bad:?}: {err}");
        }
        assert!(validate_domain(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn role_lists_parse() {
        assert_eq!(Role::parse_list("all").expect("all"), Role::ALL.to_vec());
        assert_eq!(
            Role::parse_list("router,gateway,router").expect("list"),
            vec![Role::Gateway, Role::Router]
        );
        assert!(Role::parse_list("gateway,sms").is_err());
    }

    #[test]
    fn advertised_url_needs_a_dialable_address() {
        let mut c = Config::default();
        assert_eq!(
            c.advertised_mesh_url().expect("url"),
            "http://127.0.0.1:9089"
        );
        c.mesh_addr = "0.0.0.0:9089".parse().expect("addr");
        assert!(c.advertised_mesh_url().is_err());
        c.advertise_addr = "10.0.0.5:9089".into();
        assert_eq!(
            c.advertised_mesh_url().expect("url"),
            "http://10.0.0.5:9089"
        );
    }

    #[test]
    fn channel_settings_and_app_permissions_have_defaults_and_load() {
        let c = Config::from_toml_and_env("", &env(&[])).expect("defaults");
        assert_eq!(c.channels, ChannelsConfig::default());
        assert_eq!(c.channels.idle, Duration::from_secs(3600));
        let c = Config::from_toml_and_env(
            "[channels]\nroom_history = 5\n[[apps]]\nname = \"A\"\napp_id = \"a\"\nauth = \"none\"\n\
             [[apps]]\nname = \"B\"\napp_id = \"b\"\nauth = \"none\"\ntopic_publish = \"master\"\nanonymous_rooms = true\n",
            &env(&[("SWITCHBOARD_CHANNELS__IDLE", "30s")]),
        )
        .expect("load");
        assert_eq!(c.channels.room_history, 5);
        assert_eq!(c.channels.idle, Duration::from_secs(30));
        assert_eq!(
            (c.apps[0].topic_publish, c.apps[0].anonymous_rooms),
            (TopicPublish::Any, false)
        );
        assert_eq!(
            (c.apps[1].topic_publish, c.apps[1].anonymous_rooms),
            (TopicPublish::Master, true)
        );
        let err = Config::from_toml_and_env(
            "[[apps]]\nname = \"A\"\napp_id = \"a\"\nauth = \"none\"\ntopic_publish = \"everyone\"\n",
            &env(&[]),
        );
        assert!(err.is_err(), "an unknown topic_publish is refused");
    }

    #[test]
    fn store_engine_from_env() {
        let c = Config::from_toml_and_env("", &env(&[("SWITCHBOARD_STORE__ENGINE", "fjall")]))
            .expect("load");
        assert_eq!(c.store.engine, StoreEngine::Fjall);
        for gone in ["redb", "sqlite"] {
            assert!(
                Config::from_toml_and_env("", &env(&[("SWITCHBOARD_STORE__ENGINE", gone)]))
                    .is_err()
            );
        }
    }

    #[test]
    fn the_scylla_engine_takes_its_settings_from_toml_and_env() {
        let c = Config::from_toml_and_env(
            "[store]\nengine = \"scylla\"\nurl = \"10.0.0.1:9042,10.0.0.2:9042\"\nkeyspace = \"chat\"\n\
             replication_factor = 1\nconsistency = \"quorum\"\n",
            &env(&[]),
        )
        .expect("load");
        assert_eq!(c.store.engine, StoreEngine::Scylla);
        assert_eq!(c.store.url, "10.0.0.1:9042,10.0.0.2:9042");
        assert_eq!(
            (c.store.keyspace.as_str(), c.store.replication_factor),
            ("chat", 1)
        );
        assert_eq!(c.store.consistency, "quorum");
        let c = Config::from_toml_and_env(
            "",
            &env(&[
                ("SWITCHBOARD_STORE__ENGINE", "scylla"),
                ("SWITCHBOARD_STORE__URL", "scylla-1:9042"),
                ("SWITCHBOARD_STORE__REPLICATION_FACTOR", "5"),
            ]),
        )
        .expect("load");
        assert_eq!(c.store.engine, StoreEngine::Scylla);
        assert_eq!(c.store.url, "scylla-1:9042");
        assert_eq!(c.store.replication_factor, 5);
        assert_eq!(
            (c.store.keyspace.as_str(), c.store.consistency.as_str()),
            ("switchboard", "local_quorum"),
            "defaults"
        );
        let err = Config::from_toml_and_env("[store]\nengine = \"scylla\"\n", &env(&[]))
            .expect_err("no url");
        assert!(err.to_string().contains("store.url"), "{err}");
    }

    #[test]
    fn a_postgres_store_from_env_needs_its_url() {
        let c = Config::from_toml_and_env(
            "",
            &env(&[
                ("SWITCHBOARD_STORE__ENGINE", "postgres"),
                ("SWITCHBOARD_STORE__URL", "postgres://sb@db:5432/sb"),
                ("SWITCHBOARD_STORE__POOL_SIZE", "4"),
            ]),
        )
        .expect("load");
        assert_eq!(c.store.engine, StoreEngine::Postgres);
        assert_eq!(c.store.url, "postgres://sb@db:5432/sb");
        assert_eq!(c.store.pool_size, 4);
        let err = Config::from_toml_and_env("[store]\nengine = \"postgres\"\n", &env(&[]))
            .expect_err("no url");
        assert!(err.to_string().contains("store.url"), "{err}");
    }

    #[test]
    fn the_id_window_is_a_humantime_duration() {
        let c = Config::default();
        assert_eq!(c.store.id_window, Duration::from_secs(24 * 60 * 60));
        let c =
            Config::from_toml_and_env("[store]\nid_window = \"90m\"\n", &env(&[])).expect("load");
        assert_eq!(c.store.id_window, Duration::from_secs(90 * 60));
        let c = Config::from_toml_and_env("", &env(&[("SWITCHBOARD_STORE__ID_WINDOW", "1s")]))
            .expect("load");
        assert_eq!(c.store.id_window, Duration::from_secs(1));
        let err = Config::from_toml_and_env("[store]\nid_window = \"soon\"\n", &env(&[]))
            .expect_err("not a duration");
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn a_hot_tier_without_memory_is_refused() {
        let c = Config::from_toml_and_env("", &env(&[("SWITCHBOARD_STORE__RECOVER", "true")]))
            .expect("recover from the env");
        assert!(c.store.recover);
        assert!(!Config::default().store.recover, "off unless asked for");
        let err = Config::from_toml_and_env("", &env(&[("SWITCHBOARD_STORE__HOT_MIB", "0")]))
            .expect_err("0 is refused");
        assert!(err.to_string().contains("store.hot_mib"), "{err}");
        let c = Config::from_toml_and_env("[store]\nhot_mib = 256\n", &env(&[])).expect("load");
        assert_eq!(c.store.hot_mib, 256);
    }

    #[test]
    fn read_ahead_is_bounded_and_can_be_turned_off() {
        let err = Config::from_toml_and_env(
            "",
            &env(&[("SWITCHBOARD_LIMITS__READ_AHEAD_BYTES", "2000000")]),
        )
        .expect_err("2 MB per reading connection is refused");
        assert!(err.to_string().contains("limits.read_ahead_bytes"), "{err}");
        let c = Config::from_toml_and_env("[limits]\nread_ahead_bytes = 0\n", &env(&[]))
            .expect("0 turns it off");
        assert_eq!(c.limits.read_ahead_bytes, 0);
        assert_eq!(Config::default().limits.read_ahead_bytes, 16 * 1024);
    }

    #[test]
    fn the_sync_interval_is_bounded() {
        let err = Config::from_toml_and_env(
            "",
            &env(&[("SWITCHBOARD_STORE__SYNC_INTERVAL_US", "1000000")]),
        )
        .expect_err("a second is refused");
        assert!(err.to_string().contains("store.sync_interval_us"), "{err}");
        let c = Config::from_toml_and_env("[store]\nsync_interval_us = 0\n", &env(&[]))
            .expect("0 turns it off");
        assert_eq!(c.store.sync_interval_us, 0);
        assert_eq!(Config::default().store.sync_interval_us, 1000);
    }

    #[test]
    fn bad_env_value_is_a_clear_error() {
        let err = Config::from_toml_and_env(
            "",
            &env(&[("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND", "many")]),
        )
        .expect_err("must fail");
        assert!(
            err.to_string()
                .contains("SWITCHBOARD_LIMITS__MESSAGES_PER_SECOND")
        );
    }

    #[test]
    fn client_tls_from_toml_and_env_needs_both_files() {
        let config = Config::from_toml_and_env(
            "[tls]\ncert = \"/etc/sb/cert.pem\"\nreload_interval = \"2s\"\n",
            &env(&[("SWITCHBOARD_TLS__KEY", "/etc/sb/key.pem")]),
        )
        .expect("tls loads");
        assert!(config.tls.enabled());
        assert_eq!(config.tls.key, PathBuf::from("/etc/sb/key.pem"));
        assert_eq!(config.tls.reload_interval, Duration::from_secs(2));
        let err = Config::from_toml_and_env("[tls]\ncert = \"/etc/sb/cert.pem\"\n", &env(&[]))
            .expect_err("a cert without a key");
        assert!(err.to_string().contains("both cert and key"), "{err}");
        assert!(!Config::default().tls.enabled());
    }

    #[test]
    fn env_var_names_are_what_the_loader_reads() {
        let names = Config::env_var_names();
        for name in [
            "SWITCHBOARD_CLIENT_ADDR",
            "SWITCHBOARD_TLS__CERT",
            "SWITCHBOARD_LIMITS__MAX_FRAME_BYTES",
            "SWITCHBOARD_STORE__ENGINE",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
        assert!(
            !names.iter().any(|n| n == "SWITCHBOARD_TLS"),
            "sections are not keys"
        );
        // Every listed name changes what loads.
        let config =
            Config::from_toml_and_env("", &env(&[("SWITCHBOARD_LIMITS__MAX_FRAME_BYTES", "4096")]))
                .expect("loads");
        assert_eq!(config.limits.max_frame_bytes, 4096);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml_and_env("client_adr = \"x\"", &BTreeMap::new())
            .expect_err("must fail");
        assert!(err.to_string().contains("client_adr"), "{err}");
    }

    #[test]
    fn jwt_app_without_key_is_refused() {
        let text = "[[apps]]\nname = \"x\"\napp_id = \"x\"\nauth = \"jwt\"\n";
        assert!(Config::from_toml_and_env(text, &BTreeMap::new()).is_err());
    }

    #[test]
    fn example_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("deploy dir") {
            let path = entry.expect("entry").path();
            if path.to_string_lossy().ends_with(".example.toml") {
                Config::load(Some(&path), &BTreeMap::new())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen > 0, "no deploy/*.example.toml found");
    }
}
