//! `switchboard`: run a node, or tools around it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard::{Listeners, RemoteRoles};
use switchboard_config::Config;

/// mimalloc instead of the system allocator: messages are allocated on one
/// thread and freed on another (a runtime worker and the store writer), where
/// glibc's per-thread arenas spend much of the store writer's time. Version 2
/// without transparent huge pages (workspace features): version 3 and huge
/// pages cost ~0.6–1.2 KB more RSS per idle connection (docs/benchmarks.md,
/// "Allocator").
/// The `system-alloc` feature leaves the system allocator in place for heap
/// profilers that follow malloc (heaptrack).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Real-time messaging backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: with no arguments, every role in this process with the
    /// embedded store in ./data and client port 127.0.0.1:8088 (WebSocket
    /// /ws, the web UI at /, REST /v1, /healthz); no mesh port (its roles
    /// call each other in-process; --mesh-listen opens one).
    ///
    /// Every setting is also a key in the TOML file given by --config and an
    /// environment variable (SWITCHBOARD_KEY, or SWITCHBOARD_SECTION__KEY for
    /// keys in a section, e.g. SWITCHBOARD_LIMITS__MAX_FRAME_BYTES). Flags win
    /// over the environment, which wins over the file. See
    /// deploy/switchboard.example.toml for every key.
    Run(RunArgs),
    /// Load generator: N WebSocket connections sending to themselves or to a
    /// partner at a fixed rate; reports latency percentiles, loss, duplicates
    /// and throughput per rate step.
    Bench(switchboard_bench::BenchArgs),
    /// A mixed workload held for a long time (direct FAST and RELIABLE,
    /// group messages, users coming and going, slow consumers, offline
    /// fetches): reports the server's memory and open files (--pid), what
    /// is stored and undelivered, and loss; exits 1 when a stored message
    /// was lost. scripts/soak.sh runs it against a fresh node.
    Soak(switchboard_bench::soak::SoakArgs),
    /// The client apps of a cluster, in etcd (docs/operations.md, "Apps"):
    /// list them, put (add or replace) the apps of a TOML file, delete.
    /// Running auth processes follow the change within a second.
    Apps(AppsArgs),
    /// The federation topology in etcd (docs/federation.md): apply a YAML
    /// file (checked first: an invalid file writes nothing), show the
    /// domains, links and the route from each domain to every other.
    Topology(TopologyArgs),
    /// Sends one message through the REST API (POST /v1/apps/APP/messages)
    /// and prints its id; on an error prints the error code and message
    /// and exits with status 1.
    Send(SendArgs),
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct SendArgs {
    /// The server's client port [env: SWITCHBOARD_URL]
    #[arg(long, env = "SWITCHBOARD_URL", default_value = "http://127.0.0.1:8088")]
    url: String,
    /// An API key of the app with the `send` scope [env: SWITCHBOARD_API_KEY]
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    key: String,
    /// The app's id [env: SWITCHBOARD_APP]
    #[arg(long, env = "SWITCHBOARD_APP")]
    app: String,
    /// Recipient user; several (repeated or comma-separated) make an ad-hoc
    /// group message
    #[arg(long, value_delimiter = ',')]
    to: Vec<String>,
    /// A persistent group's id, instead of --to
    #[arg(long)]
    group: Option<String>,
    /// A topic, instead of --to
    #[arg(long)]
    topic: Option<String>,
    /// The sending user; default: the app's master user
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    content: String,
    /// RELIABLE (default) or FAST
    #[arg(long)]
    feature: Option<String>,
    /// The message's own id, for safe resends
    #[arg(long)]
    id: Option<String>,
    /// A correlation string; a RELIABLE direct message with one is confirmed
    /// to the sender
    #[arg(long)]
    reference: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file [env: SWITCHBOARD_CONFIG]
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Client port address (WebSocket /ws, /healthz) [env: SWITCHBOARD_CLIENT_ADDR]
    #[arg(long)]
    client_addr: Option<SocketAddr>,
    /// Mesh port address (gRPC between roles) [env: SWITCHBOARD_MESH_ADDR]
    #[arg(long)]
    mesh_addr: Option<SocketAddr>,
    /// Directory of the embedded store [env: SWITCHBOARD_DATA_DIR]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This node's id in the mesh; generated when empty [env: SWITCHBOARD_NODE_ID]
    #[arg(long)]
    node_id: Option<String>,
    /// Redis for presence, e.g. redis://127.0.0.1:6379; without it presence
    /// is in memory [env: SWITCHBOARD_REDIS]
    #[arg(long)]
    redis: Option<String>,
    /// Roles this process runs, comma-separated or repeated: gateway, router,
    /// groups, delivery, auth, or all (default) [env: SWITCHBOARD_ROLES]
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// etcd endpoints for discovery, comma-separated, e.g.
    /// http://127.0.0.1:2379; without it this process finds no other
    /// [env: SWITCHBOARD_ETCD]
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Secret every mesh call carries; the same on every process
    /// [env: SWITCHBOARD_MESH_SECRET]
    #[arg(long)]
    mesh_secret: Option<String>,
    /// Open the mesh port although every role runs here and there is no etcd
    /// (for tools that call the roles over gRPC) [env: SWITCHBOARD_MESH_LISTEN]
    #[arg(long)]
    mesh_listen: bool,
    /// Run the mesh port with neither a mesh secret nor mesh TLS: anyone who
    /// reaches it may call every role (warned at start and every hour)
    /// [env: SWITCHBOARD_INSECURE_MESH]
    #[arg(long)]
    insecure_mesh: bool,
    /// Mesh address other processes dial (host:port); default: --mesh-addr
    /// [env: SWITCHBOARD_ADVERTISE_ADDR]
    #[arg(long)]
    advertise_addr: Option<String>,
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317; tracing is
    /// off without it [env: SWITCHBOARD_OTLP_ENDPOINT]
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Fraction of traces kept, 0.0..=1.0 (default 1.0)
    /// [env: SWITCHBOARD_TRACE_SAMPLING]
    #[arg(long)]
    trace_sampling: Option<f64>,
    /// Extra listener for /metrics (host:port), for processes without a
    /// client port [env: SWITCHBOARD_METRICS_ADDR]
    #[arg(long)]
    metrics_addr: Option<String>,
    /// This deployment's domain name, 1-63 characters of a-z 0-9 -
    /// (default local) [env: SWITCHBOARD_DOMAIN]
    #[arg(long)]
    domain: Option<String>,
    /// Federation port (host:port): neighbouring domains call this domain
    /// here; needs --etcd (the topology) [env: SWITCHBOARD_FEDERATION__ADDR]
    #[arg(long)]
    federation_addr: Option<String>,
    /// The credential of every federation link without its own
    /// (federation.peers in TOML) [env: SWITCHBOARD_FEDERATION__SECRET]
    #[arg(long)]
    federation_secret: Option<String>,
    /// Certificate chain (PEM) of the client port: with --tls-key it serves
    /// wss:// and https://, reloading the files when they change
    /// [env: SWITCHBOARD_TLS__CERT]
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert [env: SWITCHBOARD_TLS__KEY]
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Start even if the store is damaged: keep every intact record, log
    /// what was lost, continue sequence numbers above all given out
    /// before. Without it a damaged store refuses to start
    /// [env: SWITCHBOARD_STORE__RECOVER]
    #[arg(long)]
    store_recover: bool,
}

#[derive(clap::Args)]
struct AppsArgs {
    #[command(subcommand)]
    action: AppsAction,
    /// etcd endpoints, comma-separated; default: the config file's
    /// [env: SWITCHBOARD_ETCD]
    #[arg(long, global = true, env = "SWITCHBOARD_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The deployment's key prefix (discovery.key_prefix); default: the
    /// config file's, else /switchboard/ [env: SWITCHBOARD_DISCOVERY__KEY_PREFIX]
    #[arg(long, global = true, env = "SWITCHBOARD_DISCOVERY__KEY_PREFIX")]
    key_prefix: Option<String>,
    /// A node's TOML config file, for etcd and the key prefix
    /// [env: SWITCHBOARD_CONFIG]
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AppsAction {
    /// One line per app: app id, name, auth mode, master user, API key names.
    List,
    /// Adds or replaces every app of FILE: `[[apps]]` tables with the keys
    /// of the config file's `[[apps]]`.
    Put { file: PathBuf },
    /// Deletes apps by app id.
    Delete {
        #[arg(required = true)]
        app_ids: Vec<String>,
    },
    /// Prints a fresh random API key (once: only its hash is stored) and
    /// the `api_keys` line that holds its hash, for the app's `[[apps]]`
    /// entry. Needs no etcd.
    NewKey {
        /// The app's name (for the printed hint)
        #[arg(long)]
        app: String,
        /// Comma-separated: send, groups, presence, admin
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// The key's name in the config, for logs
        #[arg(long, default_value = "backend")]
        name: String,
    },
    /// An app's push webhooks, through a running server's REST API.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
}

#[derive(Subcommand)]
enum WebhooksAction {
    /// Lists the app's dead letters (events that failed for their whole
    /// retry period), one line each: id, webhook-id, dead-lettered at (Unix
    /// ms), the event; with --replay moves them back to the outbox to be
    /// sent again (signed, in order, same webhook-id). Needs no etcd.
    DeadLetters {
        /// The server's client port [env: SWITCHBOARD_URL]
        #[arg(long, env = "SWITCHBOARD_URL", default_value = "http://127.0.0.1:8088")]
        url: String,
        /// An API key of the app with the `admin` scope [env: SWITCHBOARD_API_KEY]
        #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
        key: String,
        /// The app's id [env: SWITCHBOARD_APP]
        #[arg(long, env = "SWITCHBOARD_APP")]
        app: String,
        /// Replay them instead of only listing
        #[arg(long)]
        replay: bool,
    },
}

#[derive(clap::Args)]
struct TopologyArgs {
    #[command(subcommand)]
    action: TopologyAction,
    /// etcd endpoints, comma-separated, e.g. http://127.0.0.1:2379
    /// [env: SWITCHBOARD_ETCD]
    #[arg(long, global = true, env = "SWITCHBOARD_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// The key prefix every domain of the federation shares
    #[arg(long, global = true, default_value = switchboard_topology::DEFAULT_PREFIX)]
    prefix: String,
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Checks FILE (YAML: domains, domainLinks, clientApps) and, when it
    /// has no problem, replaces the stored topology with it. Every problem
    /// is listed and nothing is written otherwise.
    Apply { file: PathBuf },
    /// Domains, links with their weight and state, apps, and the route
    /// from each domain to every other (next hop, path, cost).
    Show,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("switchboard {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Soak(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let report = runtime.block_on(switchboard_bench::soak::run(args))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.lost_reliable > 0 {
                anyhow::bail!(
                    "{} stored RELIABLE copies were never received",
                    report.lost_reliable
                );
            }
            Ok(())
        }
        Command::Bench(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let json = args.json;
            let report = runtime.block_on(switchboard_bench::run(args, !json))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for step in &report.steps {
                    println!("{}", switchboard_bench::format_step(step));
                }
                if report.server_errors > 0 {
                    println!("server sent {} ERROR frames", report.server_errors);
                }
                for (why, n) in &report.server_closes {
                    println!("server closed {n} connections: {why}");
                }
            }
            Ok(())
        }
        Command::Send(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(send(args))
        }
        Command::Apps(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(apps(args))
        }
        Command::Topology(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(topology(args))
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(run(args))
        }
    }
}

/// Logs to stderr (`SWITCHBOARD_LOG` filter) and, with an OTLP endpoint,
/// traces. Resource: `service.name` = `switchboard-<roles>`, instance id =
/// node id, domain.
fn init_telemetry(config: &Config) -> anyhow::Result<switchboard_telemetry::Telemetry> {
    // The storage engine's own info lines (one per keyspace it opens) say
    // nothing an operator acts on.
    let filter = std::env::var("SWITCHBOARD_LOG")
        .unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".to_owned());
    let roles: Vec<&str> = config.roles.iter().map(|r| r.as_str()).collect();
    let service_name = if config.roles.len() == switchboard_config::Role::ALL.len() {
        "switchboard-all".to_owned()
    } else {
        format!("switchboard-{}", roles.join("+"))
    };
    let telemetry = switchboard_telemetry::Telemetry::init(
        &filter,
        &switchboard_telemetry::TraceSettings {
            otlp_endpoint: config.otlp_endpoint.clone(),
            sampling: config.trace_sampling,
            service_name,
            instance_id: config.node_id.clone(),
            domain: config.domain.clone(),
        },
    )?;
    Ok(telemetry)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Client connections are file descriptors: take what the hard limit
    // allows (limits.max_connections derives from it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(error = %e, "cannot raise the open-files limit");
    }
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut config = Config::load(args.config.as_deref(), &env)?;
    if let Some(addr) = args.client_addr {
        config.client_addr = addr;
    }
    if let Some(addr) = args.mesh_addr {
        config.mesh_addr = addr;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if let Some(url) = args.redis {
        config.redis = url;
    }
    if !args.roles.is_empty() {
        config.roles = switchboard_config::Role::parse_list(&args.roles.join(","))?;
    }
    if !args.etcd.is_empty() {
        config.etcd = args.etcd;
    }
    if let Some(secret) = args.mesh_secret {
        config.mesh_secret = secret;
    }
    if args.mesh_listen {
        config.mesh_listen = true;
    }
    if args.insecure_mesh {
        config.insecure_mesh = true;
    }
    if let Some(addr) = args.advertise_addr {
        config.advertise_addr = addr;
    }
    if let Some(endpoint) = args.otlp_endpoint {
        config.otlp_endpoint = endpoint;
    }
    if let Some(ratio) = args.trace_sampling {
        config.trace_sampling = ratio;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = addr;
    }
    if let Some(domain) = args.domain {
        config.domain = domain;
    }
    if args.store_recover {
        config.store.recover = true;
    }
    if let Some(addr) = args.federation_addr {
        config.federation.addr = addr;
    }
    if let Some(secret) = args.federation_secret {
        config.federation.secret = secret;
    }
    if let Some(cert) = args.tls_cert {
        config.tls.cert = cert;
    }
    if let Some(key) = args.tls_key {
        config.tls.key = key;
    }
    config.validate()?;
    if config.node_id.is_empty() {
        config.node_id = format!("node-{}", &switchboard_mesh::new_message_id()[24..]);
    }
    let telemetry = init_telemetry(&config)?;

    let listeners = Listeners::bind(&config).await?;
    let client = listeners.client_addr()?;
    let mesh = listeners.mesh_addr()?;
    println!("switchboard {}", env!("CARGO_PKG_VERSION"));
    let roles: Vec<&str> = config.roles.iter().map(|r| r.as_str()).collect();
    println!("  domain       {}", config.domain);
    println!("  roles        {}", roles.join(","));
    if let Some(client) = client {
        let (ws, http) = match config.tls.enabled() {
            true => ("wss", "https"),
            false => ("ws", "http"),
        };
        println!("  client port  {ws}://{client}/ws   (health: {http}://{client}/healthz)");
    }
    match mesh {
        Some(mesh) => println!("  mesh port    grpc://{mesh}"),
        None => println!("  mesh port    none (every role runs here; --mesh-listen opens one)"),
    }
    if config.runs(switchboard_config::Role::Delivery) {
        println!("  data dir     {}", config.data_dir.display());
    }
    if !config.etcd.is_empty() {
        println!(
            "  discovery    etcd {} (prefix {})",
            config.etcd.join(","),
            config.discovery_prefix()
        );
    }
    if let Some(federation) = listeners.federation_addr()? {
        println!(
            "  federation   grpc://{federation}   (topology in etcd {})",
            config.federation_prefix()
        );
    }
    if config.redis.is_empty() {
        println!("  presence     in memory");
    } else {
        println!("  presence     {}", config.redis);
    }
    if !config.etcd.is_empty() {
        println!(
            "  apps         from etcd ({}apps/); the config file's [[apps]] seed it once",
            config.discovery_prefix()
        );
    } else if config.apps.is_empty() {
        println!(
            "  WARNING: no apps configured; using the built-in development app \
             (name \"demo\", appId \"demo\", master user \"demo-0\", auth \"none\": \
             any token is accepted). Do not use it in production."
        );
    } else {
        for app in &config.apps {
            println!(
                "  app          {} (appId {}, auth {:?})",
                app.name, app.app_id, app.auth
            );
        }
    }
    if telemetry.tracing_enabled() {
        println!(
            "  traces       {} (sampling {})",
            config.otlp_endpoint, config.trace_sampling
        );
    }
    let served =
        switchboard::serve(config, listeners, RemoteRoles::default(), shutdown_signal()).await;
    // Flushing blocks: off the runtime's threads, which drive the exporter.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    served
}

/// `apps new-key`: 32 bytes of the OS CSPRNG, hex, with a prefix that
/// makes keys easy to spot in leaked text.
fn new_key(app: &str, scopes: &[String], name: &str) -> anyhow::Result<()> {
    use sha2::Digest;
    use std::fmt::Write;
    for scope in scopes {
        anyhow::ensure!(
            switchboard_config::ApiScope::parse(scope).is_some(),
            "unknown scope {scope:?}: use send, groups, presence or admin"
        );
    }
    anyhow::ensure!(
        !name.is_empty() && !name.contains('"'),
        "--name must be non-empty, without quotes"
    );
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    let mut key = String::from("sbk_");
    for b in bytes {
        let _ = write!(key, "{b:02x}");
    }
    let mut hash = String::new();
    for b in sha2::Sha256::digest(key.as_bytes()) {
        let _ = write!(hash, "{b:02x}");
    }
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    eprintln!(
        "a new API key for app {app:?}: the key (shown once, keep it secret) and the line for \
         the app's [[apps]] entry (or add the entry to api_keys there):"
    );
    println!("{key}");
    println!(
        "api_keys = [{{ name = \"{name}\", sha256 = \"{hash}\", scopes = [{}] }}]",
        scopes.join(", ")
    );
    Ok(())
}

/// `send`: one message through the REST API.
async fn send(args: SendArgs) -> anyhow::Result<()> {
    // reqwest's rustls has no provider of its own (no C builds): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut body = serde_json::Map::new();
    match args.to.len() {
        0 => {}
        1 => {
            body.insert("to".into(), args.to[0].clone().into());
        }
        _ => {
            body.insert("to".into(), args.to.clone().into());
        }
    }
    let optional = [
        ("group", args.group),
        ("topic", args.topic),
        ("from", args.from),
        ("feature", args.feature),
        ("id", args.id),
        ("reference", args.reference),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            body.insert(field.into(), value.into());
        }
    }
    body.insert("content".into(), args.content.into());
    let url = format!(
        "{}/v1/apps/{}/messages",
        args.url.trim_end_matches('/'),
        args.app
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let response = client
        .post(&url)
        .bearer_auth(&args.key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if status == reqwest::StatusCode::ACCEPTED
        && let Some(id) = json.get("id").and_then(|v| v.as_str())
    {
        println!("{id}");
        return Ok(());
    }
    match (
        json.get("code").and_then(|v| v.as_str()),
        json.get("message").and_then(|v| v.as_str()),
    ) {
        (Some(code), Some(message)) => anyhow::bail!("HTTP {status}: {code}: {message}"),
        _ => anyhow::bail!("HTTP {status}: {text}"),
    }
}

/// `apps webhooks dead-letters`: lists (or replays) an app's webhook dead
/// letters through the REST API.
async fn dead_letters(url: &str, key: &str, app: &str, replay: bool) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = format!(
        "{}/v1/apps/{app}/webhooks/dead-letters",
        url.trim_end_matches('/')
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let request = if replay {
        client.post(format!("{base}/replay"))
    } else {
        client.get(&base)
    };
    let response = request
        .bearer_auth(key)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if !status.is_success() {
        match (
            json.get("code").and_then(|v| v.as_str()),
            json.get("message").and_then(|v| v.as_str()),
        ) {
            (Some(code), Some(message)) => anyhow::bail!("HTTP {status}: {code}: {message}"),
            _ => anyhow::bail!("HTTP {status}: {text}"),
        }
    }
    let letters = json
        .get("deadLetters")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    for letter in &letters {
        println!(
            "{}\t{}\t{}\t{}",
            letter["id"],
            letter["webhookId"].as_str().unwrap_or_default(),
            letter["deadAtMs"],
            letter["event"]
        );
    }
    let left = json.get("depth").and_then(|v| v.as_u64()).unwrap_or(0);
    if replay {
        println!("replayed {}; {left} dead letters left", letters.len());
    } else {
        println!("{} listed; {left} dead letters", letters.len());
    }
    Ok(())
}

async fn apps(args: AppsArgs) -> anyhow::Result<()> {
    use switchboard_config::AppConfig;
    use switchboard_metadata::{EtcdMetadata, MetadataExt};

    if let AppsAction::NewKey { app, scopes, name } = &args.action {
        return new_key(app, scopes, name);
    }
    if let AppsAction::Webhooks {
        action:
            WebhooksAction::DeadLetters {
                url,
                key,
                app,
                replay,
            },
    } = &args.action
    {
        return dead_letters(url, key, app, *replay).await;
    }
    let file = match &args.config {
        Some(path) => Config::load(Some(path), &BTreeMap::new())?,
        None => Config::default(),
    };
    let etcd = if args.etcd.is_empty() {
        file.etcd.clone()
    } else {
        args.etcd.clone()
    };
    anyhow::ensure!(
        !etcd.is_empty(),
        "no etcd: give --etcd URLS (or a --config with etcd); a standalone node's apps are its \
         config file's [[apps]]"
    );
    let prefix = args
        .key_prefix
        .clone()
        .unwrap_or_else(|| file.discovery_prefix());
    let metadata = EtcdMetadata::connect(&etcd, &prefix)
        .await
        .with_context(|| format!("cannot reach etcd at {}", etcd.join(",")))?;
    match args.action {
        AppsAction::List => {
            let mut apps: Vec<AppConfig> = metadata.list_records().await?;
            apps.sort_by(|a, b| a.app_id.cmp(&b.app_id));
            if apps.is_empty() {
                println!(
                    "no apps under {prefix}apps/ (auth processes serve the development app \"demo\")"
                );
            }
            for app in apps {
                let auth = match app.auth {
                    switchboard_config::AuthMode::None => "none",
                    switchboard_config::AuthMode::Jwt => "jwt",
                    switchboard_config::AuthMode::Url => "url",
                };
                let keys: Vec<&str> = app.api_keys.iter().map(|k| k.name.as_str()).collect();
                println!(
                    "{}\tname={}\tauth={auth}\tmaster_user_id={}\tapi_keys={}",
                    app.app_id,
                    app.name,
                    app.master_user_id,
                    keys.join(",")
                );
            }
        }
        AppsAction::Put { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut table: toml::Table =
                toml::from_str(&text).with_context(|| format!("{} is not TOML", file.display()))?;
            let list = table
                .remove("apps")
                .with_context(|| format!("{} has no [[apps]]", file.display()))?;
            anyhow::ensure!(
                table.is_empty(),
                "{}: only [[apps]] tables are read here, not {:?}",
                file.display(),
                table.keys().collect::<Vec<_>>()
            );
            let apps: Vec<AppConfig> = list
                .try_into()
                .with_context(|| format!("invalid [[apps]] in {}", file.display()))?;
            // Every app checked before any is written.
            for app in &apps {
                app.validate()?;
                // A key file is read by the auth processes, on their machines.
                if app.jwt_public_key_file.is_none() {
                    switchboard_auth::AuthRole::check_app(app)?;
                }
            }
            for app in &apps {
                metadata.put_record(app).await?;
                println!("put {}", app.app_id);
            }
        }
        // Answered above, without etcd.
        AppsAction::NewKey { .. } | AppsAction::Webhooks { .. } => {}
        AppsAction::Delete { app_ids } => {
            let mut missing = Vec::new();
            for id in &app_ids {
                if metadata.delete_record::<AppConfig>(id).await? {
                    println!("deleted {id}");
                } else {
                    missing.push(id.as_str());
                }
            }
            anyhow::ensure!(missing.is_empty(), "no such app: {}", missing.join(", "));
        }
    }
    Ok(())
}

async fn topology(args: TopologyArgs) -> anyhow::Result<()> {
    use switchboard_metadata::{EtcdMetadata, Kind, MetadataExt, TOPOLOGY_KEY};
    use switchboard_topology::Topology;

    anyhow::ensure!(
        !args.etcd.is_empty(),
        "no etcd: give --etcd URLS (or SWITCHBOARD_ETCD); the topology lives there"
    );
    let prefix = &args.prefix;
    anyhow::ensure!(
        prefix.starts_with('/') && prefix.ends_with('/') && prefix.len() > 1,
        "--prefix {prefix:?} must start and end with '/', e.g. {}",
        switchboard_topology::DEFAULT_PREFIX
    );
    let at = format!("{prefix}{}/{TOPOLOGY_KEY}", Kind::Topology);
    match args.action {
        TopologyAction::Apply { file } => {
            // Checked before etcd is dialled: a bad file is reported the
            // same with etcd down.
            // The record must fit one etcd request (1.5 MiB by default).
            const MAX_FILE: u64 = 1024 * 1024;
            let size = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            anyhow::ensure!(
                size <= MAX_FILE,
                "{} is {size} bytes; a topology file is at most {MAX_FILE} (it is stored as one etcd record)",
                file.display()
            );
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let (topology, network) =
                Topology::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let metadata = EtcdMetadata::connect_kinds(&args.etcd, prefix, &[])
                .await
                .with_context(|| format!("cannot reach etcd at {}", args.etcd.join(",")))?;
            let before: Option<Topology> = metadata.get_record(TOPOLOGY_KEY).await.ok().flatten();
            if before.as_ref() == Some(&topology) {
                println!("unchanged: {at} already holds this topology");
                return Ok(());
            }
            metadata
                .put_record(&topology)
                .await
                .with_context(|| format!("cannot write {at}"))?;
            println!(
                "applied {} to {at}: domains={} links={} apps={}",
                file.display(),
                network.domains().len(),
                network.links().count(),
                topology.client_apps.len()
            );
        }
        TopologyAction::Show => {
            let metadata = EtcdMetadata::connect_kinds(&args.etcd, prefix, &[])
                .await
                .with_context(|| format!("cannot reach etcd at {}", args.etcd.join(",")))?;
            let stored = metadata
                .get_record::<Topology>(TOPOLOGY_KEY)
                .await
                .with_context(|| format!("cannot read {at}"))?;
            let Some(topology) = stored else {
                println!(
                    "no topology at {at}: write one with `switchboard topology apply --etcd URLS FILE.yaml`"
                );
                return Ok(());
            };
            let network = topology.check().map_err(|problems| {
                anyhow::anyhow!("the topology at {at} cannot be used: {problems}")
            })?;
            // What each domain publishes about its links: (reporter, peer) → up.
            let reports: BTreeMap<(String, String), bool> = metadata
                .list_under("links/")
                .await
                .with_context(|| format!("cannot read the link states under {prefix}links/"))?
                .into_iter()
                .filter_map(|(key, value)| {
                    let (reporter, peer) = key.split_once('/')?;
                    let up = serde_json::from_slice::<serde_json::Value>(&value)
                        .ok()?
                        .get("up")?
                        .as_bool()?;
                    Some(((reporter.to_owned(), peer.to_owned()), up))
                })
                .collect();
            print!("{}", show(&topology, &network, &reports));
        }
    }
    Ok(())
}

/// What `topology show` prints: each link's state as its two domains
/// publish it (`unknown` when neither does: not running, or not
/// federating), and the routes over the links that are not down.
fn show(
    topology: &switchboard_topology::Topology,
    network: &switchboard_topology::Network,
    reports: &BTreeMap<(String, String), bool>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let domains = network.domains();
    let width = domains.iter().map(|d| d.name.len()).max().unwrap_or(0);
    let _ = writeln!(out, "domains ({})", domains.len());
    for d in domains {
        let _ = writeln!(
            out,
            "  {:width$}  federation={}  client={}",
            d.name, d.federation, d.client
        );
    }
    let _ = writeln!(out, "links ({})", network.links().count());
    let mut up = switchboard_topology::LinkState::all_up();
    for (a, b, weight) in network.links() {
        let seen_by = |x: &str, y: &str| reports.get(&(x.to_owned(), y.to_owned())).copied();
        let state = match (seen_by(a, b), seen_by(b, a)) {
            (None, None) => "unknown".to_owned(),
            (Some(false), _) | (_, Some(false)) => {
                up.set_down(a, b);
                let by: Vec<&str> = [(a, seen_by(a, b)), (b, seen_by(b, a))]
                    .into_iter()
                    .filter(|(_, s)| *s == Some(false))
                    .map(|(d, _)| d)
                    .collect();
                format!("down (seen by {})", by.join(", "))
            }
            _ => "up".to_owned(),
        };
        let _ = writeln!(out, "  {a} - {b}  weight={weight}  state={state}");
    }
    let _ = writeln!(out, "apps ({})", topology.client_apps.len());
    for app in &topology.client_apps {
        let mut rules: Vec<String> = app
            .user_distributions
            .iter()
            .map(|r| match r.to {
                Some(to) => format!("{}:{}-{to}", r.domain_name, r.from),
                None => format!("{}:{}-", r.domain_name, r.from),
            })
            .collect();
        if !app.users.is_empty() {
            rules.push(format!("{} listed one by one", app.users.len()));
        }
        if !app.hash_domains.is_empty() {
            rules.push(format!("others hashed over {}", app.hash_domains.join(",")));
        }
        let _ = writeln!(
            out,
            "  {}  appId={}  auth={}  users: {}",
            app.app_name,
            app.app_id,
            if app.auth_enabled { "on" } else { "off" },
            rules.join(", ")
        );
    }
    let _ = writeln!(out, "routes (over the links not down)");
    for from in domains {
        let table = network.routes_from(&from.name, &up).unwrap_or_default();
        for to in domains.iter().filter(|d| d.name != from.name) {
            match table.get(&to.name) {
                Some(r) => {
                    let _ = writeln!(
                        out,
                        "  {:width$} -> {:width$}  next={}  path={}  cost={}",
                        from.name,
                        to.name,
                        r.next,
                        r.path.join(">"),
                        r.cost
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  {:width$} -> {:width$}  unreachable",
                        from.name, to.name
                    );
                }
            }
        }
    }
    out
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
