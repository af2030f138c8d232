//! Assembly of a Switchboard node: which roles run in this process and how
//! they reach each other. The binary (`main.rs`) only parses arguments, loads
//! the config and calls [`serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_auth::AuthRole;
use switchboard_config::{Config, StoreEngine};
use switchboard_delivery::DeliveryRole;
use switchboard_gateway::{Check, GatewayDeps, GatewayRole, Readiness};
use switchboard_groups::GroupsRole;
use switchboard_mesh::{
    AuthClient, AuthService, DeliveryClient, DeliveryService, FederationService, GatewayClient,
    GatewayService, GroupsClient, GroupsService, RouterClient, RouterService,
    StaticGatewayDirectory,
};
use switchboard_presence::{InMemoryPresence, Presence, RedisPresence};
use switchboard_router::RouterRole;
use switchboard_store::{FjallStore, FjallStoreOptions, RedbStore, RedbStoreOptions, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The domain name of a deployment without federation.
pub const LOCAL_DOMAIN: &str = "local";

/// Already-bound listeners (tests bind port 0).
pub struct Listeners {
    pub client: TcpListener,
    pub mesh: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let client = TcpListener::bind(config.client_addr)
            .await
            .with_context(|| format!("cannot listen on client address {}", config.client_addr))?;
        let mesh = TcpListener::bind(config.mesh_addr)
            .await
            .with_context(|| format!("cannot listen on mesh address {}", config.mesh_addr))?;
        Ok(Listeners { client, mesh })
    }

    pub fn client_addr(&self) -> std::io::Result<SocketAddr> {
        self.client.local_addr()
    }

    pub fn mesh_addr(&self) -> std::io::Result<SocketAddr> {
        self.mesh.local_addr()
    }
}

/// Clients that replace the in-process role: a role reached over gRPC on
/// another node instead of the local implementation.
#[derive(Default, Clone)]
pub struct RemoteRoles {
    pub auth: Option<AuthClient>,
    pub router: Option<RouterClient>,
}

/// Runs all roles until `shutdown` resolves, then stops in order: stop
/// accepting, close client sockets with 1001, stop the mesh, finish in-flight
/// store writes, close the store.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    remote: RemoteRoles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node_id = if config.node_id.is_empty() {
        format!("node-{}", &switchboard_mesh::new_message_id()[24..])
    } else {
        config.node_id.clone()
    };

    let store = open_store(&config)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let node_presence = NodePresence::open(&config, &node_id).await?;
    let presence = node_presence.presence.clone();
    let gateways = Arc::new(StaticGatewayDirectory::default());

    let local_auth = AuthClient::from_local(Arc::new(
        AuthRole::new(config.effective_apps()).context("invalid app configuration")?,
    ));
    let auth = remote.auth.clone().unwrap_or_else(|| local_auth.clone());
    let delivery = DeliveryClient::from_local(Arc::new(DeliveryRole::new(
        store.clone(),
        presence.clone(),
        gateways.clone(),
        auth.clone(),
    )));
    let groups = GroupsClient::from_local(Arc::new(GroupsRole::new(delivery.clone())));
    let local_router = RouterClient::from_local(Arc::new(RouterRole::new(
        LOCAL_DOMAIN,
        delivery.clone(),
        groups.clone(),
    )));
    let router = remote
        .router
        .clone()
        .unwrap_or_else(|| local_router.clone());
    let gateway = GatewayRole::new(
        node_id.clone(),
        config.limits.clone(),
        GatewayDeps {
            auth: auth.clone(),
            router,
            delivery: delivery.clone(),
            presence: presence.clone(),
            readiness: Arc::new(NodeReadiness {
                store: store.clone(),
                presence,
            }),
        },
    );
    gateways.insert(
        node_id.clone(),
        GatewayClient::from_local(Arc::new(gateway.clone())),
    );

    let stop = CancellationToken::new();
    let mesh_stop = stop.clone();
    let mesh = tonic::transport::Server::builder()
        .add_service(AuthService::new(arc_of(&local_auth)).into_server())
        .add_service(RouterService::new(arc_of(&local_router)).into_server())
        .add_service(FederationService::new(arc_of(&local_router)).into_server())
        .add_service(GroupsService::new(arc_of(&groups)).into_server())
        .add_service(DeliveryService::new(arc_of(&delivery)).into_server())
        .add_service(GatewayService::new(Arc::new(gateway.clone())).into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listeners.mesh),
            async move { mesh_stop.cancelled().await },
        );
    let mesh = tokio::spawn(mesh);

    let client_stop = stop.clone();
    let client = switchboard_gateway::serve(listeners.client, gateway.clone(), async move {
        client_stop.cancelled().await;
    });
    let client = tokio::spawn(client);

    tracing::info!(node = %node_id, "switchboard is running");
    shutdown.await;
    tracing::info!("shutting down");
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), client).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "client port stopped with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!("client port did not stop within 10 s"),
    }
    match tokio::time::timeout(Duration::from_secs(5), mesh).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "mesh port stopped with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!("mesh port did not stop within 5 s"),
    }
    node_presence.retire(&node_id).await;
    store.close().await.context("closing the store")?;
    tracing::info!("stopped");
    Ok(())
}

/// `/readyz` of a node: its store and its presence backend answer.
struct NodeReadiness {
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
}

const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait::async_trait]
impl Readiness for NodeReadiness {
    async fn check(&self) -> Vec<Check> {
        let probe = switchboard_store::InboxKey::new("", "readyz");
        let store = match tokio::time::timeout(READINESS_TIMEOUT, self.store.count(&probe)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        let presence = match tokio::time::timeout(READINESS_TIMEOUT, self.presence.check()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        vec![
            Check {
                name: "store",
                error: store,
            },
            Check {
                name: "presence",
                error: presence,
            },
        ]
    }
}

/// The presence backend of this node, and its heartbeat when it is Redis.
struct NodePresence {
    presence: Arc<dyn Presence>,
    redis: Option<(RedisPresence, tokio::task::JoinHandle<()>)>,
}

impl NodePresence {
    async fn open(config: &Config, node_id: &str) -> anyhow::Result<Self> {
        if config.redis.is_empty() {
            return Ok(NodePresence {
                presence: Arc::new(InMemoryPresence::default()),
                redis: None,
            });
        }
        let redis = RedisPresence::connect(
            &config.redis,
            &config.presence.key_prefix,
            Duration::from_secs(config.presence.gateway_ttl_secs.max(1)),
        )
        .await
        .with_context(|| format!("cannot reach Redis at {}", config.redis))?;
        // Alive before the first client can connect.
        redis
            .heartbeat(node_id)
            .await
            .context("first presence heartbeat")?;
        let beat = redis.spawn_heartbeat(node_id.to_owned());
        Ok(NodePresence {
            presence: Arc::new(redis.clone()),
            redis: Some((redis, beat)),
        })
    }

    /// Graceful stop: this gateway's users are gone at once, not after the TTL.
    async fn retire(&self, node_id: &str) {
        if let Some((redis, beat)) = &self.redis {
            beat.abort();
            if let Err(e) = redis.retire(node_id).await {
                tracing::warn!(error = %e, "cannot retire this gateway from presence");
            }
        }
    }
}

fn open_store(config: &Config) -> Result<Arc<dyn Store>, switchboard_store::StoreError> {
    let cache_bytes = config.store.cache_mib.saturating_mul(1024 * 1024);
    Ok(match config.store.engine {
        StoreEngine::Fjall => Arc::new(FjallStore::open(
            &config.data_dir,
            FjallStoreOptions {
                max_batch: config.store.max_batch,
                cache_bytes: u64::try_from(cache_bytes).unwrap_or(u64::MAX),
                ..FjallStoreOptions::default()
            },
        )?),
        StoreEngine::Redb => Arc::new(RedbStore::open(
            &config.data_dir,
            RedbStoreOptions {
                max_batch: config.store.max_batch,
                cache_bytes,
                ..RedbStoreOptions::default()
            },
        )?),
    })
}

/// The shared implementation behind a client handle, for the mesh adapters.
fn arc_of<T: ?Sized, C>(client: &C) -> Arc<T>
where
    C: Clone + Into<Arc<T>>,
{
    client.clone().into()
}
