//! Discovery in etcd.
//!
//! Each process registers itself (`id`, roles, mesh address) under
//! `<prefix>members/<id>` with a lease it keeps alive; a process that dies
//! disappears when its lease expires, and a graceful stop revokes the lease at
//! once. Every process watches `<prefix>members/` and publishes the member
//! list on a [`tokio::sync::watch`] channel.
//!
//! etcd being away is survivable: the last known member list stays in force
//! (traffic between known instances keeps flowing), the keep-alive and the
//! watch are re-established when etcd is back, and a registration whose lease
//! expired in the meantime is granted anew and written again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}")]
    Exclusive(String),
}

/// One registered process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Role names (`gateway`, `router`, `groups`, `delivery`, `auth`).
    pub roles: Vec<String>,
    /// Mesh address others dial, `http://host:port`.
    pub addr: String,
    /// A digest of the mesh secret: members whose tag differs from ours are
    /// ignored (they could neither call us nor answer our calls).
    pub tag: String,
}

impl Member {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Members by id.
pub type Members = BTreeMap<String, Member>;

#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    pub endpoints: Vec<String>,
    /// Prefix of every key, e.g. `/switchboard/`.
    pub key_prefix: String,
    /// Lease TTL: how long a dead process stays listed.
    pub lease_ttl: Duration,
}

/// A registration and the watched member list. Dropping it stops the
/// background tasks; [`Discovery::shutdown`] also revokes the lease.
pub struct Discovery {
    opts: DiscoveryOptions,
    client: Client,
    lease: Arc<Mutex<i64>>,
    /// Exclusive claims held: (key, holder), written again under a new lease.
    claims: Claims,
    /// Keys published under the lease (absolute key → value), written
    /// again under a new lease.
    published: Published,
    members: watch::Receiver<Arc<Members>>,
    stop: CancellationToken,
}

type Claims = Arc<Mutex<Vec<(String, String)>>>;
type Published = Arc<Mutex<std::collections::BTreeMap<String, String>>>;

/// How long one etcd call may take before the caller gives up on it. Short:
/// while etcd is away every retry waits this long, and a keep-alive must
/// get through again within the lease TTL once etcd is back.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause between attempts while etcd is away.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

impl Discovery {
    /// Connects, registers `me` and loads the member list. Fails when etcd
    /// cannot be reached within a few seconds.
    pub async fn start(opts: DiscoveryOptions, me: Member) -> Result<Self, DiscoveryError> {
        let client = connect(&opts).await?;
        let ttl = lease_ttl_secs(&opts);
        let lease = {
            let mut c = client.clone();
            let granted = bounded(&opts, c.lease_grant(ttl, None)).await?;
            granted.id()
        };
        let member_key = format!("{}members/{}", opts.key_prefix, me.id);
        let value = serde_json::to_string(&me).unwrap_or_default();
        {
            let mut c = client.clone();
            bounded(
                &opts,
                c.put(
                    member_key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
        }
        let (snapshot, revision) = load_members(&opts, &client).await?;
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let stop = CancellationToken::new();
        let lease = Arc::new(Mutex::new(lease));
        let claims: Claims = Arc::default();
        let published: Published = Arc::default();
        tokio::spawn(keep_registered(
            opts.clone(),
            client.clone(),
            lease.clone(),
            claims.clone(),
            published.clone(),
            (member_key, value),
            stop.clone(),
        ));
        tokio::spawn(watch_members(
            opts.clone(),
            client.clone(),
            tx,
            revision,
            stop.clone(),
        ));
        Ok(Discovery {
            opts,
            client,
            lease,
            claims,
            published,
            members: rx,
            stop,
        })
    }

    /// A handle for `/readyz`: whether etcd answers.
    pub fn checker(&self) -> Checker {
        Checker {
            opts: self.opts.clone(),
            client: self.client.clone(),
        }
    }

    /// The live member list; changes whenever a member comes or goes.
    pub fn members(&self) -> watch::Receiver<Arc<Members>> {
        self.members.clone()
    }

    /// Takes the exclusive claim `name` for `holder`, held by this process's
    /// lease. A claim held by the same `holder` (this process before a
    /// crash) is taken over; a claim held by another is waited for up to one
    /// lease TTL (a crashed holder's lease runs out) and then refused.
    pub async fn claim_exclusive(&self, name: &str, holder: &str) -> Result<(), DiscoveryError> {
        let key = format!("{}claims/{}", self.opts.key_prefix, name);
        let deadline = tokio::time::Instant::now() + self.opts.lease_ttl + Duration::from_secs(2);
        loop {
            let lease = *self.lease.lock().await;
            let mut c = self.client.clone();
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    holder,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let reply = bounded(&self.opts, c.txn(txn)).await?;
            if reply.succeeded() {
                self.claims.lock().await.push((key, holder.to_owned()));
                return Ok(());
            }
            let current = reply.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            match current {
                Some(other) if other == holder => {
                    // Our own claim from before a crash: take it over.
                    let mut c = self.client.clone();
                    bounded(
                        &self.opts,
                        c.put(
                            key.clone(),
                            holder,
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                    )
                    .await?;
                    return Ok(());
                }
                Some(other) if tokio::time::Instant::now() >= deadline => {
                    return Err(DiscoveryError::Exclusive(format!(
                        "{name} is held by {other:?} (etcd key {key})"
                    )));
                }
                _ => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }

    /// A handle that writes keys under this process's lease and reads
    /// prefixes (the federation's link states).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            opts: self.opts.clone(),
            client: self.client.clone(),
            lease: self.lease.clone(),
            published: self.published.clone(),
        }
    }

    /// Stops the background tasks and revokes the lease: this process's
    /// registration and claims disappear at once.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let lease = *self.lease.lock().await;
        let mut c = self.client.clone();
        if let Err(e) = bounded(&self.opts, c.lease_revoke(lease)).await {
            tracing::warn!(error = %e, "cannot revoke the discovery lease; it expires by itself");
        }
    }
}

/// Writes keys under a process's discovery lease, and reads prefixes.
#[derive(Clone)]
pub struct Publisher {
    opts: DiscoveryOptions,
    client: Client,
    lease: Arc<Mutex<i64>>,
    published: Published,
}

impl Publisher {
    /// Writes `key` (absolute, any prefix) = `value` under the process's
    /// lease: it disappears when the process stops or its lease runs out,
    /// and is written again under a new lease after an etcd outage. The
    /// last value is kept for that even when this write fails.
    pub async fn publish(&self, key: &str, value: &str) -> Result<(), DiscoveryError> {
        self.published
            .lock()
            .await
            .insert(key.to_owned(), value.to_owned());
        let lease = *self.lease.lock().await;
        let mut c = self.client.clone();
        bounded(
            &self.opts,
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map(|_| ())
    }

    /// Every key under `prefix` (absolute) with its value, as etcd has them now.
    pub async fn read_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, DiscoveryError> {
        let mut c = self.client.clone();
        let reply = bounded(
            &self.opts,
            c.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(reply
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }
}

/// Checks that etcd answers (a bounded read of the member prefix).
#[derive(Clone)]
pub struct Checker {
    opts: DiscoveryOptions,
    client: Client,
}

impl Checker {
    pub async fn check(&self) -> Result<(), DiscoveryError> {
        let mut c = self.client.clone();
        let key = format!("{}members/", self.opts.key_prefix);
        bounded(
            &self.opts,
            c.get(
                key,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(1),
                ),
            ),
        )
        .await
        .map(|_| ())
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lease_ttl_secs(opts: &DiscoveryOptions) -> i64 {
    i64::try_from(opts.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX)
}

async fn connect(opts: &DiscoveryOptions) -> Result<Client, DiscoveryError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    bounded(opts, Client::connect(&opts.endpoints, Some(options))).await
}

/// One etcd call, bounded in time.
async fn bounded<T>(
    opts: &DiscoveryOptions,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(DiscoveryError::Etcd {
            endpoints: opts.endpoints.join(","),
            source,
        }),
        Err(_) => Err(DiscoveryError::Timeout(
            opts.endpoints.join(","),
            CALL_TIMEOUT,
        )),
    }
}

/// The member list and the revision it was read at.
async fn load_members(
    opts: &DiscoveryOptions,
    client: &Client,
) -> Result<(Members, i64), DiscoveryError> {
    let prefix = format!("{}members/", opts.key_prefix);
    let mut c = client.clone();
    let reply = bounded(opts, c.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let revision = reply.header().map(|h| h.revision()).unwrap_or(0);
    let mut members = Members::new();
    for kv in reply.kvs() {
        if let Some(member) = parse_member(kv.value()) {
            members.insert(member.id.clone(), member);
        }
    }
    Ok((members, revision))
}

fn parse_member(value: &[u8]) -> Option<Member> {
    match serde_json::from_slice::<Member>(value) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed member registration");
            None
        }
    }
}

/// Keeps the lease alive; when etcd was away long enough for the lease to
/// expire, grants a new one and registers again.
async fn keep_registered(
    opts: DiscoveryOptions,
    client: Client,
    lease: Arc<Mutex<i64>>,
    claims: Claims,
    published: Published,
    (key, value): (String, String),
    stop: CancellationToken,
) {
    let interval = (opts.lease_ttl / 3).max(Duration::from_millis(300));
    let mut healthy = true;
    loop {
        let id = *lease.lock().await;
        let mut c = client.clone();
        let result: Result<(), DiscoveryError> = async {
            let (mut keeper, mut replies) = bounded(&opts, c.lease_keep_alive(id)).await?;
            loop {
                bounded(&opts, keeper.keep_alive()).await?;
                match bounded(&opts, replies.message()).await? {
                    Some(reply) if reply.ttl() > 0 => {}
                    _ => return Ok(()), // lease gone: re-register
                }
                if !healthy {
                    tracing::info!("etcd is back; registration kept alive");
                    healthy = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        }
        .await;
        if stop.is_cancelled() {
            return;
        }
        if let Err(e) = result {
            if healthy {
                tracing::warn!(error = %e, "etcd keep-alive failed; retrying");
                healthy = false;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
            continue;
        }
        // The lease expired: register again under a new one.
        let mut c = client.clone();
        let renewed: Result<(), DiscoveryError> = async {
            let granted = bounded(&opts, c.lease_grant(lease_ttl_secs(&opts), None)).await?;
            bounded(
                &opts,
                c.put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(granted.id())),
                ),
            )
            .await?;
            // Claims lapsed with the old lease: take them again unless
            // another process took them in the meantime.
            for (claim, holder) in claims.lock().await.iter() {
                let txn = Txn::new()
                    .when([Compare::create_revision(claim.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        claim.clone(),
                        holder.clone(),
                        Some(PutOptions::new().with_lease(granted.id())),
                    )]);
                let reply = bounded(&opts, c.txn(txn)).await?;
                if !reply.succeeded() {
                    tracing::error!(%claim, "an exclusive claim was taken by another process while etcd was away");
                }
            }
            for (key, value) in published.lock().await.iter() {
                bounded(
                    &opts,
                    c.put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(granted.id())),
                    ),
                )
                .await?;
            }
            *lease.lock().await = granted.id();
            Ok(())
        }
        .await;
        match renewed {
            Ok(()) => tracing::info!("registered in etcd again under a new lease"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register in etcd again; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
        }
    }
}

/// Follows `<prefix>members/`. When the watch breaks (etcd restarted), the
/// list is read again and a new watch starts after that read; until then the
/// last known list stays in force.
async fn watch_members(
    opts: DiscoveryOptions,
    client: Client,
    tx: watch::Sender<Arc<Members>>,
    mut revision: i64,
    stop: CancellationToken,
) {
    let prefix = format!("{}members/", opts.key_prefix);
    let mut members: Members = (**tx.borrow()).clone();
    let mut need_reload = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if need_reload {
            match load_members(&opts, &client).await {
                Ok((fresh, rev)) => {
                    members = fresh;
                    revision = rev;
                    tx.send_replace(Arc::new(members.clone()));
                    tracing::info!(members = members.len(), "member list reloaded from etcd");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd still away");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                    continue;
                }
            }
        }
        let mut c = client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = match bounded(&opts, c.watch(prefix.clone(), Some(options))).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the member list; retrying");
                need_reload = true;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            let reply = match message {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    tracing::warn!("member watch ended; re-creating it");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "member watch failed; re-creating it");
                    break;
                }
            };
            if reply.canceled() {
                tracing::warn!(
                    compact_revision = reply.compact_revision(),
                    "member watch cancelled; re-creating it"
                );
                break;
            }
            if let Some(h) = reply.header() {
                revision = revision.max(h.revision());
            }
            let mut changed = false;
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(id) = kv
                    .key()
                    .strip_prefix(prefix.as_bytes())
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => {
                        if let Some(member) = parse_member(kv.value()) {
                            changed |= members.insert(id, member.clone()).as_ref() != Some(&member);
                        }
                    }
                    EventType::Delete => changed |= members.remove(&id).is_some(),
                }
            }
            if changed {
                tx.send_replace(Arc::new(members.clone()));
            }
        }
        need_reload = true;
    }
}
