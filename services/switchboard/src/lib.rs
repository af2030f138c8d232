//! Assembly of a Switchboard node: which roles run in this process and how
//! they reach each other. The binary (`main.rs`) only parses arguments, loads
//! the config and calls [`serve`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_auth::AuthRole;
use switchboard_config::{Config, Role, StoreEngine};
use switchboard_delivery::{DeliveryRole, MeshDelivery};
use switchboard_discovery::{Discovery, DiscoveryOptions, Member};
use switchboard_gateway::{Check, GatewayDeps, GatewayRole, Readiness};
use switchboard_groups::{
    ChannelSettings, ChannelsRole, GroupLimits, GroupsRole, PersistentGroups, Records, StoredGroups,
};
use switchboard_mesh::{
    AuthClient, AuthService, ChannelsClient, ChannelsService, DeliveryClient, DeliveryService,
    FederationGuard, FederationService, GatewayClient, GatewayService, GatewayTable, GroupsClient,
    GroupsService, MeshConnector, MeshCredentials, MeshGuard, MeshTls, Pool, RouterClient,
    RouterService,
};
use switchboard_mesh::{
    GroupAdminClient, GroupAdminService, GroupRecordsClient, GroupRecordsService,
};
use switchboard_metadata::TopologyView;
use switchboard_metadata::{EtcdMetadata, Kind as MetadataKind, StaticMetadata};
use switchboard_presence::{InMemoryPresence, Presence, RedisPresence};
use switchboard_router::{Federation, FederationOptions, RouterRole};
use switchboard_store::{
    FjallStore, FjallStoreOptions, GroupStore, PostgresOptions, PostgresStore, Queue, Store,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod cluster;
mod console;
mod ownership;
mod scylla;

/// Already-bound listeners (tests bind port 0).
pub struct Listeners {
    /// The client port; only processes running the gateway role have one.
    pub client: Option<TcpListener>,
    /// The mesh port, when [`Config::listens_on_mesh`].
    pub mesh: Option<TcpListener>,
    /// The federation port, when federation is on.
    pub federation: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let client = if config.runs(Role::Gateway) {
            Some(
                TcpListener::bind(config.client_addr)
                    .await
                    .with_context(|| {
                        format!("cannot listen on client address {}", config.client_addr)
                    })?,
            )
        } else {
            None
        };
        let mesh =
            match config.listens_on_mesh() {
                true => Some(TcpListener::bind(config.mesh_addr).await.with_context(|| {
                    format!("cannot listen on mesh address {}", config.mesh_addr)
                })?),
                false => None,
            };
        let federation = match config.federation.enabled() {
            true => Some(
                TcpListener::bind(&config.federation.addr)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on federation address {}",
                            config.federation.addr
                        )
                    })?,
            ),
            false => None,
        };
        Ok(Listeners {
            client,
            mesh,
            federation,
        })
    }

    /// The client port's address, when this process has one.
    pub fn client_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.client
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
    }

    /// The mesh port's address, when this process has one.
    pub fn mesh_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.mesh.as_ref().map(TcpListener::local_addr).transpose()
    }

    /// The federation port's address, when federation is on.
    pub fn federation_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.federation
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
    }
}

/// Clients that replace the in-process role: a role reached over gRPC on
/// another node instead of the local implementation.
#[derive(Default, Clone)]
pub struct RemoteRoles {
    pub auth: Option<AuthClient>,
    pub router: Option<RouterClient>,
}

/// Runs this process's roles until `shutdown` resolves, then stops in order:
/// stop accepting, close client sockets with 1001, leave discovery (the lease
/// is revoked, so others stop calling at once), stop the mesh, finish
/// in-flight store writes, close the store.
pub async fn serve(
    mut config: Config,
    listeners: Listeners,
    remote: RemoteRoles,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node_id = if config.node_id.is_empty() {
        format!("node-{}", &switchboard_mesh::new_message_id()[24..])
    } else {
        config.node_id.clone()
    };
    config.roles.sort_unstable();
    config.roles.dedup();
    // The metrics recorder first, so that nothing recorded at start-up is lost.
    let _ = switchboard_telemetry::metrics_handle();
    let credentials = MeshCredentials::new(&config.mesh_secret).context("invalid mesh_secret")?;
    let tls = load_mesh_tls(&config)?;
    // The client port's certificate, checked before anything else starts:
    // a missing file or a key that is not the certificate's refuses the start.
    let client_tls = match listeners.client.is_some() && config.tls.enabled() {
        true => Some(switchboard_gateway::tls::ClientTls::load(&config.tls)?),
        false => None,
    };
    let connector = MeshConnector::new(credentials, tls.clone());
    // Cancelled when this node stops: ends its background tasks.
    let stop = CancellationToken::new();
    if listeners.mesh.is_some() && config.mesh_secret.is_empty() && tls.is_none() {
        // Allowed only with insecure_mesh (Config::validate): said at start
        // and every hour, so that it is not forgotten.
        let addr = config.mesh_addr;
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = every.tick() => {}
                }
                tracing::warn!(
                    %addr,
                    "insecure mesh: no mesh_secret and no mesh_tls, the mesh port accepts calls \
                     from anyone who reaches it (set mesh_secret on every process)"
                );
            }
        });
    }

    // Discovery first: a second delivery process is refused before it
    // touches anything.
    let discovery = match config.etcd.is_empty() {
        true => None,
        false => Some(join_discovery(&config, &node_id, &listeners).await?),
    };
    // The federation's topology, followed by every process with etcd: the
    // router routes by it, the gateway redirects by it, auth serves its apps.
    let topology = match config.etcd.is_empty() {
        true => None,
        false => Some(follow_federation_topology(&config).await?),
    };
    let pools = cluster::Pools::new(&config, &connector);
    let gateways = Arc::new(GatewayTable::default());
    if let Some(d) = &discovery {
        cluster::follow(
            d.members(),
            node_id.clone(),
            switchboard_mesh::secret_tag(&config.mesh_secret),
            pools.clone(),
            gateways.clone(),
            connector.clone(),
        );
    }
    // Batch calls to other processes only when `[mesh_batch] enabled` (off
    // by default until a stall seen once under load with it is explained);
    // otherwise one unary call per call.
    let batching = config.mesh_batch.enabled;
    let batch_limits = switchboard_mesh::BatchLimits {
        max_items: config.mesh_batch.max_items,
        max_bytes: config.mesh_batch.max_bytes,
        linger: Duration::from_micros(config.mesh_batch.linger_us),
        lanes: config.mesh_batch.lanes,
    };
    let remote_or_pool = |role: Role| -> anyhow::Result<Arc<Pool>> {
        pools.get(role).with_context(|| {
            format!(
                "the {role} role is not in this process's roles and there is no etcd to find it: \
                 set etcd, or run every role here"
            )
        })
    };

    let (store, queues, group_store) = match config.runs(Role::Delivery) {
        true => {
            let opened = open_store(&config).await?;
            (Some(opened.inbox), Some(opened.queues), Some(opened.groups))
        }
        false => (None, None, None),
    };
    // The durable queues, for the roles that send later (federation links,
    // webhooks); none yet. A backlog left from before is worth a line.
    if let Some(queues) = &queues {
        for queue in queues.list().await.context("reading the durable queues")? {
            if queue.depth > 0 {
                tracing::info!(queue = %queue.name, depth = queue.depth, "durable queue holds items");
            }
        }
    }
    let node_presence = NodePresence::open(&config, &node_id).await?;
    let presence = node_presence.presence.clone();

    let local_auth = match config.runs(Role::Auth) {
        true => {
            let role = open_auth(&config).await?;
            if let Some(view) = &topology {
                follow_federated_apps(role.clone(), view.clone(), config.domain.clone());
            }
            Some(AuthClient::from_local(role))
        }
        false => None,
    };
    let auth = match (&remote.auth, &local_auth) {
        (Some(r), _) => r.clone(),
        (None, Some(l)) => l.clone(),
        (None, None) => AuthClient::from_pool(remote_or_pool(Role::Auth)?),
    };
    // With batching, Redis lookups of concurrent deliveries share round trips.
    let delivery_presence: Arc<dyn Presence> = match &node_presence.redis {
        Some(_) if batching => {
            Arc::new(switchboard_delivery::BatchedPresence::new(presence.clone()))
        }
        _ => presence.clone(),
    };
    let delivery_role = store.as_ref().map(|store| {
        let role = DeliveryRole::new(
            store.clone(),
            delivery_presence.clone(),
            gateways.clone(),
            auth.clone(),
        )
        .with_inbox_quotas(
            inbox_quota(&config.quotas),
            per_app_quotas(&config, inbox_quota),
        );
        Arc::new(match disk_guard(&config, &stop) {
            Some(guard) => role.with_disk_guard(guard),
            None => role,
        })
    });
    // Push webhooks for users with nobody connected: sent from the
    // delivery process's durable outboxes.
    let webhooks = match (&delivery_role, &queues, config.webhooks.apps.is_empty()) {
        (Some(delivery), Some(queues), false) => {
            let webhooks =
                switchboard_webhooks::Webhooks::start(queues.clone(), config.webhooks.clone())
                    .await
                    .context("cannot start the webhooks")?;
            delivery.set_offline(Arc::new(WebhookOffline(webhooks.clone())));
            Some(webhooks)
        }
        _ => None,
    };
    // Sharded delivery (a shared store with discovery): this process serves
    // the inboxes it owns, and every caller here, its own roles included,
    // reaches each inbox's owner through the pool.
    let ownership = match (&discovery, &delivery_role) {
        (Some(d), Some(role)) if config.store.engine.is_shared() => {
            let role = role.clone();
            Some(ownership::Ownership::follow(
                node_id.clone(),
                switchboard_mesh::secret_tag(&config.mesh_secret),
                d.members(),
                d.publisher(),
                &config.discovery_prefix(),
                gateways.clone(),
                // Inbox counts follow ownership: those of gained inboxes
                // are read from the store again.
                Box::new(move || role.forget_inbox_counts()),
            ))
        }
        _ => None,
    };
    let delivery = match (&delivery_role, &ownership) {
        (Some(role), None) => DeliveryClient::from_local(role.clone()),
        _ if batching => {
            DeliveryClient::from_pool_batched(remote_or_pool(Role::Delivery)?, batch_limits)
        }
        _ => DeliveryClient::from_pool(remote_or_pool(Role::Delivery)?),
    };
    // The webhook dead letters, where the store is.
    let webhook_admin = match &queues {
        Some(queues) => switchboard_mesh::WebhookAdminClient::from_local(Arc::new(
            switchboard_webhooks::DeadLetters::new(queues.clone(), webhooks.clone()),
        )),
        None => switchboard_mesh::WebhookAdminClient::from_pool(remote_or_pool(Role::Delivery)?),
    };
    // Persistent groups: their records where the store is, their owners
    // among the groups instances.
    let group_records = group_store
        .as_ref()
        .map(|s| GroupRecordsClient::from_local(Arc::new(StoredGroups::new(s.clone()))));
    let persistent = match config.runs(Role::Groups) {
        true => {
            let records = match &group_records {
                Some(local) => local.clone(),
                None => GroupRecordsClient::from_pool(remote_or_pool(Role::Delivery)?),
            };
            Some(Arc::new(PersistentGroups::new(
                Records::new(records),
                delivery.clone(),
                GroupLimits {
                    max_members: config.limits.max_group_members,
                    max_groups_per_user: config.limits.max_groups_per_user,
                    fanout_batch: config.limits.group_fanout_batch,
                },
            )))
        }
        false => None,
    };
    let group_admin = match &persistent {
        Some(p) => GroupAdminClient::from_local(p.clone()),
        None => GroupAdminClient::from_pool(remote_or_pool(Role::Groups)?),
    };
    let groups = match &persistent {
        Some(p) => GroupsClient::from_local(Arc::new(
            GroupsRole::new(delivery.clone()).with_persistent(p.clone()),
        )),
        None => GroupsClient::from_pool(remote_or_pool(Role::Groups)?),
    };
    // Topics and rooms live at the groups role too, each at its owner: with
    // discovery every call goes to the owner (this process's own instance
    // included, over its mesh port); without, this process has the only one.
    let local_channels = config.runs(Role::Groups).then(|| {
        ChannelsClient::from_local(Arc::new(ChannelsRole::new(
            ChannelSettings {
                topic_history: config.channels.topic_history,
                room_history: config.channels.room_history,
                idle: config.channels.idle,
            },
            gateways.clone(),
        )))
    });
    let channels = match (pools.get(Role::Groups), &local_channels) {
        (Some(pool), _) => ChannelsClient::from_pool(pool),
        (None, Some(local)) => local.clone(),
        (None, None) => ChannelsClient::from_pool(remote_or_pool(Role::Groups)?),
    };
    let router_role = config.runs(Role::Router).then(|| {
        Arc::new(RouterRole::new(
            config.domain.clone(),
            delivery.clone(),
            groups.clone(),
        ))
    });
    let local_router = router_role
        .as_ref()
        .map(|r| RouterClient::from_local(r.clone()));
    let federation_tls = load_tls(&config.federation.tls, "federation.tls")?;
    let federation = match (
        &router_role,
        &queues,
        &topology,
        config.federation.enabled(),
    ) {
        (Some(router), Some(queues), Some(view), true) => {
            let federation = Federation::start(
                FederationOptions {
                    domain: config.domain.clone(),
                    prefix: config.federation_prefix(),
                    secret: config.federation.secret.clone(),
                    peers: config.federation.peers.clone(),
                    hop_limit: match config.federation.hop_limit {
                        0 => switchboard_mesh::DEFAULT_HOP_LIMIT,
                        n => n,
                    },
                    tls: federation_tls.clone(),
                },
                view.clone(),
                router.local(),
                queues.clone(),
                discovery.as_ref().map(Discovery::publisher),
            )
            .await
            .context("cannot start the federation")?;
            router.set_federation(federation.clone());
            if let Some(delivery) = &delivery_role {
                delivery.set_onward(Arc::new(FederationOnward(federation.clone())));
            }
            Some(federation)
        }
        _ => None,
    };
    let router = match (&remote.router, &local_router) {
        (Some(r), _) => r.clone(),
        (None, Some(l)) => l.clone(),
        (None, None) if batching => {
            RouterClient::from_pool_batched(remote_or_pool(Role::Router)?, batch_limits)
        }
        (None, None) => RouterClient::from_pool(remote_or_pool(Role::Router)?),
    };
    // What /readyz checks, on the client port or the metrics listener.
    let readiness: Arc<dyn Readiness> = Arc::new(NodeReadiness {
        store: store.clone(),
        presence: presence.clone(),
        discovery: discovery.as_ref().map(Discovery::checker),
        pools: pools.clone(),
        federation: topology
            .as_ref()
            .filter(|_| config.federation.enabled())
            .map(|view| (config.domain.clone(), view.clone())),
    });
    let gateway = match config.runs(Role::Gateway) {
        true => {
            let gateway = GatewayRole::new(
                node_id.clone(),
                config.limits.clone(),
                GatewayDeps {
                    domain: config.domain.clone(),
                    auth: auth.clone(),
                    router,
                    delivery: delivery.clone(),
                    groups: group_admin.clone(),
                    channels: channels.clone(),
                    webhook_admin: webhook_admin.clone(),
                    presence: presence.clone(),
                    homes: topology.as_ref().map(|view| {
                        Arc::new(TopologyHomes {
                            domain: config.domain.clone(),
                            view: view.clone(),
                        }) as Arc<dyn switchboard_gateway::Homes>
                    }),
                    readiness: readiness.clone(),
                },
            );
            gateway.set_quotas_per_app(
                gateway_quotas(&config.quotas),
                per_app_quotas(&config, gateway_quotas),
            );
            // With the router in another process, FAST messages between
            // users connected only here stay here (the router is told
            // afterwards). In one process the routed path is already a few
            // direct calls: nothing to gain.
            if local_router.is_none() {
                let observer = match &remote.router {
                    Some(r) => r.clone(),
                    None => RouterClient::from_pool(remote_or_pool(Role::Router)?),
                };
                gateway.deliver_same_gateway_fast(observer);
            }
            gateways.insert(
                node_id.clone(),
                GatewayClient::from_local(Arc::new(gateway.clone())),
            );
            Some(gateway)
        }
        false => None,
    };

    let mesh_stop = stop.clone();
    let mut mesh = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        mesh = mesh
            .tls_config(tls.server_config())
            .context("invalid mesh_tls certificate or key")?;
    }
    let mut mesh = mesh
        .layer(tonic::service::InterceptorLayer::new(MeshGuard::new(
            &config.mesh_secret,
        )))
        .add_optional_service(
            local_auth
                .as_ref()
                .map(|a| AuthService::new(arc_of(a)).into_server()),
        )
        .add_optional_service(
            local_router
                .as_ref()
                .map(|r| RouterService::new(arc_of(r)).into_server()),
        )
        .add_optional_service(
            config
                .runs(Role::Groups)
                .then(|| GroupsService::new(arc_of(&groups)).into_server()),
        )
        .add_optional_service(
            persistent
                .as_ref()
                .map(|p| GroupAdminService::new(p.clone()).into_server()),
        )
        .add_optional_service(
            group_records
                .as_ref()
                .map(|r| GroupRecordsService::new(arc_of(r)).into_server()),
        )
        .add_optional_service(queues.is_some().then(|| {
            switchboard_mesh::WebhookAdminService::new(arc_of(&webhook_admin)).into_server()
        }))
        .add_optional_service(
            local_channels
                .as_ref()
                .map(|c| ChannelsService::new(arc_of(c)).into_server()),
        )
        .add_optional_service(store.is_some().then(|| {
            // Over the mesh a Deliver can come twice (a caller's
            // failover); local calls cannot, and skip that memory.
            let local: Arc<dyn switchboard_mesh::Delivery> = match (&delivery_role, &ownership) {
                (Some(role), Some(ownership)) => Arc::new(ownership::OwnedDelivery {
                    inner: role.clone(),
                    ownership: ownership.clone(),
                }),
                (Some(role), None) => role.clone(),
                (None, _) => arc_of(&delivery),
            };
            let mesh_delivery = MeshDelivery::new(local);
            DeliveryService::new(Arc::new(mesh_delivery)).into_server()
        }));
    if let Some(g) = &gateway {
        mesh =
            mesh.add_service(GatewayService::new(Arc::new(g.clone()), stop.clone()).into_server());
    }
    // All-in-one without etcd opens no mesh port: its roles call each
    // other in-process.
    let mesh = listeners.mesh.map(|listener| {
        tokio::spawn(mesh.serve_with_incoming_shutdown(
            // Nagle off on accepted mesh connections: small replies must not
            // wait for the peer's delayed ACK (40 ms per call otherwise).
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    if let Ok(tcp) = &conn
                        && let Err(e) = tcp.set_nodelay(true)
                    {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a mesh connection");
                    }
                    conn
                },
            ),
            async move { mesh_stop.cancelled().await },
        ))
    });

    // The federation port: its own listener and credential check, never
    // the mesh's.
    let federation_server = match (&federation, listeners.federation) {
        (Some(federation), Some(listener)) => {
            let mut guard = FederationGuard::new(
                &config.federation.secret,
                config
                    .federation
                    .peers
                    .iter()
                    .map(|(d, s)| (d.as_str(), s.as_str())),
            );
            if federation_tls.is_none() && config.federation.peers.is_empty() {
                tracing::warn!(
                    "federation with one shared secret and no TLS: every domain holding the secret can call this one under any neighbour's name; use [federation.peers] or [federation.tls] between operators"
                );
            }
            // Bounded: one neighbour cannot hold every task of this process.
            let mut server = tonic::transport::Server::builder()
                .concurrency_limit_per_connection(64)
                .timeout(Duration::from_secs(30));
            if let Some(tls) = &federation_tls {
                server = server
                    .tls_config(tls.server_config())
                    .context("invalid federation.tls certificate or key")?;
                guard = guard.with_names_in_certificates();
            }
            let server = server
                .layer(tonic::service::InterceptorLayer::new(guard))
                .add_service(FederationService::new(federation.clone()).into_server());
            let fed_stop = stop.clone();
            Some(tokio::spawn(server.serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { fed_stop.cancelled().await },
            )))
        }
        _ => None,
    };

    // The console's view of the cluster and the federation, when it is on.
    let console = match config.ui.console {
        true => Some(
            console::NodeConsole::open(
                &config,
                &node_id,
                discovery.as_ref().map(Discovery::members),
                topology.clone(),
            )
            .await,
        ),
        false => None,
    };
    let client = match (&gateway, listeners.client) {
        (Some(gateway), Some(listener)) => {
            let client_stop = stop.clone();
            let ui = switchboard_gateway::ui::UiOptions {
                config: config.ui.clone(),
                roles: config.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                source: console.clone(),
            };
            Some(tokio::spawn(switchboard_gateway::serve_client_port(
                listener,
                gateway.clone(),
                ui,
                client_tls,
                async move {
                    client_stop.cancelled().await;
                },
            )))
        }
        _ => None,
    };

    let metrics_server = if config.metrics_addr.is_empty() {
        None
    } else {
        let listener = TcpListener::bind(&config.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on metrics address {}", config.metrics_addr))?;
        let metrics_stop = stop.clone();
        Some(tokio::spawn(
            switchboard_gateway::serve_metrics_with_readiness(
                listener,
                readiness.clone(),
                async move { metrics_stop.cancelled().await },
            ),
        ))
    };

    let roles: Vec<&str> = config.roles.iter().map(|r| r.as_str()).collect();
    tracing::info!(node = %node_id, roles = %roles.join(","), "switchboard is running");
    shutdown.await;
    tracing::info!("shutting down");
    // Sharded delivery hands its inboxes over in order: nothing served and
    // every push on its gateway before the lease goes.
    if let Some(o) = &ownership
        && tokio::time::timeout(Duration::from_secs(5), o.leave())
            .await
            .is_err()
    {
        tracing::warn!("delivery calls still running 5 s into the stop");
    }
    stop.cancel();
    if let Some(client) = client {
        match tokio::time::timeout(Duration::from_secs(10), client).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "client port stopped with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("client port did not stop within 10 s"),
        }
    }
    if let Some(f) = &federation {
        f.stop();
    }
    if let Some(w) = &webhooks {
        w.stop();
    }
    if let Some(server) = federation_server {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    if let Some(d) = discovery {
        d.shutdown().await;
    }
    if let Some(m) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), m).await;
    }
    if let Some(mesh) = mesh {
        match tokio::time::timeout(Duration::from_secs(5), mesh).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "mesh port stopped with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("mesh port did not stop within 5 s"),
        }
    }
    if gateway.is_some() {
        node_presence.retire(&node_id).await;
    }
    if let Some(store) = store {
        store.close().await.context("closing the store")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The auth role over this node's apps: the config file's when standalone;
/// with etcd, the deployment's apps in etcd, which the config file's
/// `[[apps]]` seed once (the first time a process with apps in its config
/// starts against that etcd prefix). Afterwards etcd is the truth, changed
/// with `switchboard apps`, and followed without a restart.
async fn open_auth(config: &Config) -> anyhow::Result<Arc<AuthRole>> {
    if config.etcd.is_empty() {
        let metadata =
            Arc::new(StaticMetadata::with_apps(&config.apps).context("invalid app configuration")?);
        return AuthRole::follow(metadata, true)
            .await
            .context("invalid app configuration");
    }
    let metadata = EtcdMetadata::connect(&config.etcd, &config.discovery_prefix())
        .await
        .context("cannot read the apps from etcd")?;
    if !config.apps.is_empty() {
        let seed = config
            .apps
            .iter()
            .map(|app| Ok((app.app_id.clone(), serde_json::to_vec(app)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        if metadata
            .seed_once(MetadataKind::Apps, &seed)
            .await
            .context("cannot seed etcd with the config file's apps")?
        {
            tracing::info!(apps = seed.len(), "etcd seeded with the config file's apps");
        } else {
            tracing::info!(
                "apps are read from etcd; the config file's [[apps]] seeded it before and are not read again"
            );
        }
    }
    AuthRole::follow(Arc::new(metadata), false)
        .await
        .context("cannot read the apps from etcd")
}

/// The federation's topology in etcd, followed (kept through an etcd
/// outage).
async fn follow_federation_topology(config: &Config) -> anyhow::Result<TopologyView> {
    let prefix = config.federation_prefix();
    let metadata = EtcdMetadata::connect_kinds(&config.etcd, &prefix, &[MetadataKind::Topology])
        .await
        .with_context(|| format!("cannot follow the federation topology in etcd ({prefix})"))?;
    Ok(switchboard_metadata::follow_topology(Arc::new(metadata)).await)
}

/// The topology's client apps, served by the auth role beside this
/// deployment's own — when the topology names this domain (a deployment
/// that shares an etcd with a federation it is not part of serves none).
fn follow_federated_apps(auth: Arc<AuthRole>, mut view: TopologyView, domain: String) {
    tokio::spawn(async move {
        loop {
            let apps = view
                .borrow_and_update()
                .as_ref()
                .filter(|t| t.network.domain(&domain).is_some())
                .map(|t| {
                    t.topology
                        .client_apps
                        .iter()
                        .map(|a| switchboard_config::AppConfig {
                            name: a.app_name.clone(),
                            app_id: a.app_id.clone(),
                            master_user_id: a.master_user_id.clone(),
                            auth: if a.auth_enabled {
                                switchboard_config::AuthMode::Jwt
                            } else {
                                switchboard_config::AuthMode::None
                            },
                            jwt_secret: None,
                            jwt_public_key_pem: None,
                            jwt_public_key_file: None,
                            jwt_audience: None,
                            auth_url: None,
                            jwks_url: None,
                            api_keys: Vec::new(),
                            topic_publish: switchboard_config::TopicPublish::Any,
                            anonymous_rooms: false,
                            allowed_origins: Vec::new(),
                            quotas: Default::default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            auth.set_federated_apps(apps);
            if view.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Users' home domains for the gateway's redirects.
struct TopologyHomes {
    domain: String,
    view: TopologyView,
}

impl switchboard_gateway::Homes for TopologyHomes {
    fn redirect(&self, app_id: &str, user_id: &str) -> Option<String> {
        let current = self.view.borrow();
        let t = current.as_ref()?;
        t.network.domain(&self.domain)?;
        let home = t.network.home_domain(app_id, user_id)?;
        (home != self.domain)
            .then(|| t.network.domain(home).map(|d| d.client.clone()))
            .flatten()
    }
}

/// Webhook events for messages stored for users with nobody connected.
struct WebhookOffline(Arc<switchboard_webhooks::Webhooks>);

#[async_trait::async_trait]
impl switchboard_delivery::Offline for WebhookOffline {
    async fn offline(
        &self,
        app_id: &str,
        messages: &[switchboard_mesh::pb::InboxMessage],
    ) -> Result<(), String> {
        self.0
            .offline(app_id, messages)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Sender confirmations for users of other domains, through the federation.
struct FederationOnward(Arc<Federation>);

#[async_trait::async_trait]
impl switchboard_delivery::Onward for FederationOnward {
    fn is_remote(&self, app_id: &str, user_id: &str) -> bool {
        self.0.is_remote(app_id, user_id)
    }

    async fn forward(
        &self,
        envelopes: Vec<switchboard_mesh::pb::Envelope>,
    ) -> Result<(), switchboard_mesh::ServiceError> {
        self.0.forward_from_here(envelopes).await
    }
}

/// The mesh's mutual-TLS material, when configured.
fn load_mesh_tls(config: &Config) -> anyhow::Result<Option<MeshTls>> {
    load_tls(&config.mesh_tls, "mesh_tls")
}

/// Mutual-TLS material (`section` names the config section in errors).
fn load_tls(
    tls: &switchboard_config::MeshTlsConfig,
    section: &str,
) -> anyhow::Result<Option<MeshTls>> {
    if !tls.enabled() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read {section}.{what} {}", path.display()))
    };
    Ok(Some(MeshTls {
        cert_pem: read(&tls.cert, "cert")?,
        key_pem: read(&tls.key, "key")?,
        ca_pem: read(&tls.ca, "ca")?,
    }))
}

/// How long a starting process waits for etcd.
const ETCD_START_WAIT: Duration = Duration::from_secs(15);

/// Registers this process in etcd and, for the delivery role on the
/// embedded engine, claims the single store of the deployment.
async fn join_discovery(
    config: &Config,
    node_id: &str,
    listeners: &Listeners,
) -> anyhow::Result<Discovery> {
    let mut advertised = config.advertised_mesh_url()?;
    if config.advertise_addr.is_empty() && config.mesh_addr.port() == 0 {
        // Port 0 (tests): advertise the port actually bound.
        let scheme = if config.mesh_tls.enabled() {
            "https"
        } else {
            "http"
        };
        let addr = listeners
            .mesh_addr()?
            .context("a process in etcd listens on the mesh")?;
        advertised = format!("{scheme}://{addr}");
    }
    let me = Member {
        id: node_id.to_owned(),
        roles: config.roles.iter().map(|r| r.as_str().to_owned()).collect(),
        addr: advertised,
        tag: switchboard_mesh::secret_tag(&config.mesh_secret),
    };
    let options = DiscoveryOptions {
        endpoints: config.etcd.clone(),
        key_prefix: config.discovery_prefix(),
        lease_ttl: Duration::from_secs(config.discovery.lease_ttl_secs),
    };
    // etcd may be starting at the same time as we are: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + ETCD_START_WAIT;
    let discovery = loop {
        match Discovery::start(options.clone(), me.clone()).await {
            Ok(d) => break d,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "etcd not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot join discovery in etcd within {ETCD_START_WAIT:?}"
                )));
            }
        }
    };
    // The embedded store lives in one process's data dir: one delivery
    // process per deployment. A shared engine takes any number.
    if config.runs(Role::Delivery) && !config.store.engine.is_shared() {
        discovery
            .claim_exclusive("delivery-store", node_id)
            .await
            .with_context(|| {
                format!(
                    "refusing to start a second delivery process: the embedded store ({:?}) keeps \
                     inboxes in one process's data dir and cannot be shared between delivery \
                     processes. Run exactly one delivery process per deployment (several need a \
                     shared store: store.engine = \"postgres\")",
                    config.store.engine
                )
            })?;
    }
    Ok(discovery)
}

/// The free-space floor of the embedded store's disk, read every
/// `quotas.disk_check_interval` until the node stops. None for stores on
/// other machines, or with both floors at 0.
fn disk_guard(
    config: &Config,
    stop: &CancellationToken,
) -> Option<Arc<switchboard_delivery::DiskGuard>> {
    let q = &config.quotas;
    if config.store.engine != StoreEngine::Fjall
        || (q.disk_min_free_bytes == 0 && q.disk_min_free_percent <= 0.0)
    {
        return None;
    }
    let guard = Arc::new(switchboard_delivery::DiskGuard::new(
        &config.data_dir,
        switchboard_delivery::DiskFloor {
            min_free_bytes: q.disk_min_free_bytes,
            min_free_percent: q.disk_min_free_percent,
        },
    ));
    let stopped = stop.clone();
    tokio::spawn(guard.clone().watch(
        q.disk_check_interval,
        async move { stopped.cancelled().await },
    ));
    Some(guard)
}

/// `/readyz` of a node: its store and its presence backend answer.
struct NodeReadiness {
    store: Option<Arc<dyn Store>>,
    presence: Arc<dyn Presence>,
    discovery: Option<switchboard_discovery::Checker>,
    /// Roles reached over the mesh: each needs at least one known instance.
    pools: cluster::Pools,
    /// With federation: the topology in force, which must name this domain.
    federation: Option<(String, TopologyView)>,
}

const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait::async_trait]
impl Readiness for NodeReadiness {
    async fn check(&self) -> Vec<Check> {
        let mut checks = Vec::with_capacity(3);
        if let Some(store) = &self.store {
            let probe = switchboard_store::InboxKey::new("", "readyz");
            let error = match tokio::time::timeout(READINESS_TIMEOUT, store.count(&probe)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            };
            checks.push(Check {
                name: "store",
                error,
            });
        }
        let presence = match tokio::time::timeout(READINESS_TIMEOUT, self.presence.check()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_owned()),
        };
        checks.push(Check {
            name: "presence",
            error: presence,
        });
        if let Some(discovery) = &self.discovery {
            let error = match tokio::time::timeout(READINESS_TIMEOUT, discovery.check()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            };
            checks.push(Check {
                name: "etcd",
                error,
            });
            if let Some((domain, view)) = &self.federation {
                let error = match view.borrow().as_ref() {
                    None => Some("no federation topology has been read from etcd yet".to_owned()),
                    Some(t) if t.network.domain(domain).is_none() => Some(format!(
                        "the federation topology does not name the domain {domain}"
                    )),
                    Some(_) => None,
                };
                checks.push(Check {
                    name: "federation",
                    error,
                });
            }
            let missing = self.pools.without_instances();
            checks.push(Check {
                name: "mesh",
                error: (!missing.is_empty())
                    .then(|| format!("no instance of {} is known", missing.join(", "))),
            });
        }
        checks
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

fn inbox_quota(q: &switchboard_config::QuotasConfig) -> switchboard_delivery::InboxQuota {
    switchboard_delivery::InboxQuota {
        max_messages: q.inbox_max_messages,
        max_bytes: q.inbox_max_bytes,
        app_max_inboxes: q.app_max_inboxes,
    }
}

fn gateway_quotas(q: &switchboard_config::QuotasConfig) -> switchboard_gateway::GatewayQuotas {
    switchboard_gateway::GatewayQuotas {
        sender_bytes_per_second: q.sender_bytes_per_second,
        sender_burst_bytes: q.sender_burst_bytes,
        app_max_connections: q.app_max_connections,
    }
}

/// The quotas of the configured apps that have their own (`[[apps]]`
/// `quotas`), by app id, as `make` builds them from `[quotas]` with the
/// app's values.
fn per_app_quotas<T>(
    config: &Config,
    make: impl Fn(&switchboard_config::QuotasConfig) -> T,
) -> std::collections::HashMap<String, T> {
    config
        .apps
        .iter()
        .filter(|app| !app.quotas.is_empty())
        .map(|app| (app.app_id.clone(), make(&app.quotas.over(&config.quotas))))
        .collect()
}

/// What a delivery process opens in its data dir.
struct OpenedStore {
    inbox: Arc<dyn Store>,
    /// The durable queues, in the same database as the inboxes.
    queues: Arc<dyn Queue>,
    /// Persistent groups, in the same database.
    groups: Arc<dyn GroupStore>,
}

async fn open_store(config: &Config) -> anyhow::Result<OpenedStore> {
    Ok(match config.store.engine {
        StoreEngine::Fjall => {
            let cache_bytes = config.store.cache_mib.saturating_mul(1024 * 1024);
            let store = FjallStore::open(
                &config.data_dir,
                FjallStoreOptions {
                    max_batch: config.store.max_batch,
                    sync_interval: Duration::from_micros(config.store.sync_interval_us),
                    cache_bytes: u64::try_from(cache_bytes).unwrap_or(u64::MAX),
                    hot_bytes: config.store.hot_mib.saturating_mul(1024 * 1024),
                    recover: config.store.recover,
                    id_window: config.store.id_window,
                    ..FjallStoreOptions::default()
                },
            )
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
            OpenedStore {
                queues: store.queues(),
                groups: store.groups(),
                inbox: Arc::new(store),
            }
        }
        StoreEngine::Postgres => {
            // Its error names the address (never the password).
            let store = PostgresStore::connect(PostgresOptions {
                url: config.store.url.clone(),
                pool_size: config.store.pool_size,
                id_window: config.store.id_window,
                ..PostgresOptions::default()
            })
            .await
            .context("cannot open the PostgreSQL store (store.url)")?;
            OpenedStore {
                queues: store.queues(),
                groups: store.groups(),
                inbox: Arc::new(store),
            }
        }
        StoreEngine::Scylla => scylla::open(&config.store)
            .await
            .context("cannot open the ScyllaDB store (store.url)")?,
    })
}

/// The shared implementation behind a client handle, for the mesh adapters.
fn arc_of<T: ?Sized, C>(client: &C) -> Arc<T>
where
    C: Clone + Into<Arc<T>>,
{
    client.clone().into()
}
