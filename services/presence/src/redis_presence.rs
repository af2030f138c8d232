//! Presence in Redis, shared by every gateway of a deployment.
//!
//! - `{prefix}p:{app}:{user}`: a hash, gateway id → connections of the user
//!   on that gateway.
//! - `{prefix}gw:{gateway}`: a gateway's liveness key, refreshed by the
//!   gateway ([`RedisPresence::spawn_heartbeat`]) and expiring after the TTL
//!   when it dies. Entries of a gateway without a liveness key are ignored,
//!   and deleted the next time the user connects or disconnects, so delivery
//!   never waits on a dead gateway.
//!
//! - `{prefix}u:{app}`: a sorted set (all scores 0, so sorted by name) of
//!   the app's online users, for the user list; a user whose gateways all
//!   died stays in it until listed (and is filtered out then).
//! - `{prefix}presence`: a pub/sub channel with every user's first
//!   connection and last disconnection (`1`/`0`, app, newline, user),
//!   published by the connect and disconnect scripts themselves, so each
//!   change is announced exactly once.
//!
//! Each operation is one Lua script: atomic, one round trip. The scripts
//! touch liveness keys not named in KEYS, so they need one Redis node (or a
//! cluster with hash tags), not a plain Redis Cluster.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use std::sync::{Arc, OnceLock};

use futures_util::StreamExt;
use tokio::sync::broadcast;

use crate::{CHANGES_BUFFER, Presence, PresenceChange, PresenceError, Transition};

/// The user's connections on live gateways (the caller's own gateway counts
/// as live); entries of dead gateways are deleted on the way. Returns the
/// total. Shared tail of the connect and disconnect scripts.
macro_rules! live_total_lua {
    () => {
        r"
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local gw = fields[i]
  if gw == ARGV[1] or redis.call('EXISTS', ARGV[2] .. gw) == 1 then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], gw)
  end
end

"
    };
}

const CONNECT: &str = concat!(
    r"
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
",
    live_total_lua!(),
    r"
redis.call('ZADD', KEYS[2], 0, ARGV[3])
if total == 1 then
  redis.call('PUBLISH', ARGV[4], '1' .. ARGV[5])
end
return total
"
);

const DISCONNECT: &str = concat!(
    r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return -1
end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
",
    live_total_lua!(),
    r"
if total == 0 then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('PUBLISH', ARGV[4], '0' .. ARGV[5])
end
return total
"
);

const GATEWAYS: &str = r"
local fields = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[1] .. fields[i]) == 1 then
    table.insert(out, fields[i])
    table.insert(out, fields[i + 1])
  end
end
return out
";

/// The gateways of many users (KEYS), each as a flat `gw, n, …` list; a
/// gateway's liveness is read once per call however many users it holds.
const GATEWAYS_BATCH: &str = r"
local alive = {}
local out = {}
for k = 1, #KEYS do
  local fields = redis.call('HGETALL', KEYS[k])
  local one = {}
  for i = 1, #fields, 2 do
    local gw = fields[i]
    local live = alive[gw]
    if live == nil then
      live = redis.call('EXISTS', ARGV[1] .. gw) == 1
      alive[gw] = live
    end
    if live then
      table.insert(one, gw)
      table.insert(one, fields[i + 1])
    end
  end
  out[k] = one
end
return out
";

/// Presence kept in Redis.
#[derive(Clone)]
pub struct RedisPresence {
    client: redis::Client,
    /// The change listener, started on first use.
    changes: Arc<OnceLock<broadcast::Sender<PresenceChange>>>,
    conn: ConnectionManager,
    prefix: String,
    gateway_ttl: Duration,
    connect: redis::Script,
    disconnect: redis::Script,
    gateways: redis::Script,
    gateways_batch: redis::Script,
}

fn unavailable(e: redis::RedisError) -> PresenceError {
    PresenceError::Unavailable(e.to_string())
}

impl RedisPresence {
    /// Connects to `url` (`redis://host:port`). `prefix` namespaces every key
    /// (one deployment, or one test); `gateway_ttl` is how long a gateway
    /// counts as alive after its last heartbeat.
    pub async fn connect(
        url: &str,
        prefix: &str,
        gateway_ttl: Duration,
    ) -> Result<Self, PresenceError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let conn = ConnectionManager::new(client.clone())
            .await
            .map_err(unavailable)?;
        Ok(RedisPresence {
            client,
            changes: Arc::default(),
            conn,
            prefix: prefix.to_owned(),
            gateway_ttl,
            connect: redis::Script::new(CONNECT),
            disconnect: redis::Script::new(DISCONNECT),
            gateways: redis::Script::new(GATEWAYS),
            gateways_batch: redis::Script::new(GATEWAYS_BATCH),
        })
    }

    fn user_key(&self, app_id: &str, user_id: &str) -> String {
        format!("{}p:{}:{}", self.prefix, app_id, user_id)
    }

    fn users_key(&self, app_id: &str) -> String {
        format!("{}u:{}", self.prefix, app_id)
    }

    fn changes_channel(&self) -> String {
        format!("{}presence", self.prefix)
    }

    fn gateway_prefix(&self) -> String {
        format!("{}gw:", self.prefix)
    }

    /// Runs a connect/disconnect script: the user's connections on live
    /// gateways afterwards (-1: the gateway held none of them).
    async fn live_total(
        &self,
        script: &redis::Script,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<i64, PresenceError> {
        script
            .key(self.user_key(app_id, user_id))
            .key(self.users_key(app_id))
            .arg(gateway_id)
            .arg(self.gateway_prefix())
            .arg(user_id)
            .arg(self.changes_channel())
            .arg(format!("{app_id}\n{user_id}"))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Marks `gateway_id` alive for one TTL.
    pub async fn heartbeat(&self, gateway_id: &str) -> Result<(), PresenceError> {
        let ttl_ms = u64::try_from(self.gateway_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        redis::cmd("SET")
            .arg(format!("{}{}", self.gateway_prefix(), gateway_id))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Marks `gateway_id` dead at once (graceful shutdown).
    pub async fn retire(&self, gateway_id: &str) -> Result<(), PresenceError> {
        redis::cmd("DEL")
            .arg(format!("{}{}", self.gateway_prefix(), gateway_id))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Refreshes the gateway's liveness every third of the TTL until the
    /// returned handle is aborted or dropped with the runtime.
    pub fn spawn_heartbeat(&self, gateway_id: String) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let every = (self.gateway_ttl / 3).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.heartbeat(&gateway_id).await {
                    tracing::warn!(error = %e, gateway = %gateway_id, "presence heartbeat failed");
                }
            }
        })
    }
}

/// Listens to the change channel until every receiver is gone, reconnecting
/// after a failure (changes published meanwhile are missed).
async fn listen(client: redis::Client, channel: String, tx: broadcast::Sender<PresenceChange>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    pause = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Some(change) = parse_change(msg.get_payload_bytes()) {
                            let _ = tx.send(change);
                        }
                    }
                    tracing::warn!("presence change channel closed; resubscribing");
                }
                Err(e) => tracing::warn!(error = %e, "presence change subscription failed"),
            },
            Err(e) => tracing::warn!(error = %e, "presence change connection failed"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// `1app\nuser` (online) or `0app\nuser` (offline).
fn parse_change(payload: &[u8]) -> Option<PresenceChange> {
    let text = std::str::from_utf8(payload).ok()?;
    let online = match text.as_bytes().first()? {
        b'1' => true,
        b'0' => false,
        _ => return None,
    };
    let (app_id, user_id) = text[1..].split_once('\n')?;
    Some(PresenceChange {
        app_id: app_id.to_owned(),
        user_id: user_id.to_owned(),
        online,
    })
}

/// Pages of the user list read before giving up on finding enough live
/// users among stale entries.
const USER_LIST_PAGES: usize = 8;

#[async_trait]
impl Presence for RedisPresence {
    async fn online_users(
        &self,
        app_id: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), PresenceError> {
        let page = limit.saturating_add(1).min(10_000);
        let mut live = Vec::new();
        let mut start = 0usize;
        // Whether the whole set was read (else the list may miss users
        // behind stale entries and says it is truncated).
        let mut read_all = false;
        for _ in 0..USER_LIST_PAGES {
            let names: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.users_key(app_id))
                .arg(start)
                .arg(start + page - 1)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            let got = names.len();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let gateways = self.gateways_batch(app_id, &refs).await?;
            live.extend(
                names
                    .iter()
                    .zip(gateways)
                    .filter(|(_, gws)| !gws.is_empty())
                    .map(|(name, _)| name.clone()),
            );
            if got < page {
                read_all = true;
                break;
            }
            if live.len() > limit {
                break;
            }
            start += page;
        }
        let truncated = live.len() > limit || !read_all;
        live.truncate(limit);
        Ok((live, truncated))
    }

    fn changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.changes
            .get_or_init(|| {
                let (tx, _) = broadcast::channel(CHANGES_BUFFER);
                tokio::spawn(listen(
                    self.client.clone(),
                    self.changes_channel(),
                    tx.clone(),
                ));
                tx
            })
            .subscribe()
    }

    async fn check(&self) -> Result<(), PresenceError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn connect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        let total = self
            .live_total(&self.connect, app_id, user_id, gateway_id)
            .await?;
        Ok(Transition {
            user_changed: total == 1,
        })
    }

    async fn disconnect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        let total = self
            .live_total(&self.disconnect, app_id, user_id, gateway_id)
            .await?;
        Ok(Transition {
            user_changed: total == 0,
        })
    }

    async fn gateways(
        &self,
        app_id: &str,
        user_id: &str,
    ) -> Result<Vec<(String, u32)>, PresenceError> {
        let flat: Vec<String> = self
            .gateways
            .key(self.user_key(app_id, user_id))
            .arg(self.gateway_prefix())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(pairs(flat))
    }

    async fn gateways_batch(
        &self,
        app_id: &str,
        user_ids: &[&str],
    ) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
        let mut out = Vec::with_capacity(user_ids.len());
        for chunk in user_ids.chunks(crate::MAX_BATCH) {
            let mut invocation = self.gateways_batch.prepare_invoke();
            for user_id in chunk {
                invocation.key(self.user_key(app_id, user_id));
            }
            let lists: Vec<Vec<String>> = invocation
                .arg(self.gateway_prefix())
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            if lists.len() != chunk.len() {
                return Err(PresenceError::Unavailable(format!(
                    "presence batch answered {} users of {}",
                    lists.len(),
                    chunk.len()
                )));
            }
            out.extend(lists.into_iter().map(pairs));
        }
        Ok(out)
    }
}

/// `gw, n, gw, n, …` as pairs; malformed counts are left out.
fn pairs(flat: Vec<String>) -> Vec<(String, u32)> {
    flat.chunks_exact(2)
        .filter_map(|pair| {
            let count = pair[1].parse::<u32>().ok()?;
            (count > 0).then(|| (pair[0].clone(), count))
        })
        .collect()
}
