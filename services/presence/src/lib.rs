//! Presence: which gateways hold a user's connections, with counts.
//!
//! Gateways report each connection opened and closed; delivery asks where a
//! user is connected. The in-memory implementation serves one process; a
//! Redis implementation (multi-process) sits behind the same trait.

use foldhash::{HashMap, HashMapExt};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::RwLock;

use async_trait::async_trait;

pub mod contract;
mod redis_presence;

pub use redis_presence::RedisPresence;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
}

/// What a connect or disconnect changed for the user as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The user went from no connections to one (on connect) or from one to
    /// none (on disconnect), across all gateways.
    pub user_changed: bool,
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// One more connection of `user_id` on `gateway_id`.
    async fn connect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError>;
    /// One connection fewer.
    async fn disconnect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError>;
    /// Whether the backend answers (readiness).
    async fn check(&self) -> Result<(), PresenceError> {
        Ok(())
    }

    /// The gateways holding at least one connection of the user, with the
    /// number of connections on each.
    async fn gateways(
        &self,
        app_id: &str,
        user_id: &str,
    ) -> Result<Vec<(String, u32)>, PresenceError>;

    /// [`Presence::gateways`] of many users of one app, in the order of
    /// `user_ids`, in one call: one Redis round trip (per
    /// [`MAX_BATCH`] users), one lock per shard in memory. This default
    /// asks one user at a time, for backends (test doubles) that have
    /// nothing better.
    async fn gateways_batch(
        &self,
        app_id: &str,
        user_ids: &[&str],
    ) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
        one_by_one(self, app_id, user_ids).await
    }

    /// The app's online users, sorted, at most `limit`; true when there
    /// were more.
    async fn online_users(
        &self,
        app_id: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), PresenceError>;

    /// Every user's first connection and last disconnection, from every
    /// gateway sharing this presence, as they happen.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<PresenceChange>;
}

/// A user came online (first connection) or went offline (last one closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub app_id: String,
    pub user_id: String,
    pub online: bool,
}

/// Changes buffered per listener before a slow one misses some.
pub const CHANGES_BUFFER: usize = 16_384;

/// [`Presence::gateways`] of each user in turn.
async fn one_by_one<P: Presence + ?Sized>(
    presence: &P,
    app_id: &str,
    user_ids: &[&str],
) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
    let mut out = Vec::with_capacity(user_ids.len());
    for user_id in user_ids {
        out.push(presence.gateways(app_id, user_id).await?);
    }
    Ok(out)
}

/// Users looked up in one round trip by [`Presence::gateways_batch`]; a
/// larger batch takes one per this many.
pub const MAX_BATCH: usize = 1024;

/// Connections per gateway of one user.
type Gateways = HashMap<String, u32>;
/// app → user → gateways: looked up by `&str` at each level, so a lookup on
/// the delivery hot path allocates nothing.
type Shard = RwLock<HashMap<String, HashMap<String, Gateways>>>;

/// Presence of a single process. Sharded so that lookups on the delivery hot
/// path rarely contend.
pub struct InMemoryPresence {
    shards: Vec<Shard>,
    hasher: foldhash::fast::RandomState,
    changes: tokio::sync::broadcast::Sender<PresenceChange>,
}

const SHARDS: usize = 32;
/// Up to this many users, a batch lookup takes each user's shard lock in
/// turn instead of grouping them by shard first.
const FEW_USERS: usize = 8;

impl Default for InMemoryPresence {
    fn default() -> Self {
        InMemoryPresence {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: foldhash::fast::RandomState::default(),
            changes: tokio::sync::broadcast::channel(CHANGES_BUFFER).0,
        }
    }
}

impl InMemoryPresence {
    fn changed(&self, app_id: &str, user_id: &str, online: bool) {
        // No listener (no gateway subscribed) is not an error.
        let _ = self.changes.send(PresenceChange {
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            online,
        });
    }

    fn shard(&self, app_id: &str, user_id: &str) -> &Shard {
        &self.shards[self.shard_index(app_id, user_id)]
    }

    fn shard_index(&self, app_id: &str, user_id: &str) -> usize {
        let mut h = self.hasher.build_hasher();
        app_id.hash(&mut h);
        user_id.hash(&mut h);
        // The modulo keeps the index in range; truncation of the hash is fine.
        (h.finish() as usize) % SHARDS
    }
}

fn listed(gateways: Option<&Gateways>) -> Vec<(String, u32)> {
    gateways
        .map(|g| g.iter().map(|(gw, n)| (gw.clone(), *n)).collect())
        .unwrap_or_default()
}

#[async_trait]
impl Presence for InMemoryPresence {
    async fn connect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        let mut map = self
            .shard(app_id, user_id)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let users = match map.get_mut(app_id) {
            Some(users) => users,
            None => map.entry(app_id.to_owned()).or_default(),
        };
        let gateways = match users.get_mut(user_id) {
            Some(gateways) => gateways,
            None => users.entry(user_id.to_owned()).or_default(),
        };
        let first = gateways.is_empty();
        *gateways.entry(gateway_id.to_owned()).or_insert(0) += 1;
        // Announced under the shard's lock: a user's changes go out in the
        // order they happened.
        if first {
            self.changed(app_id, user_id, true);
        }
        Ok(Transition {
            user_changed: first,
        })
    }

    async fn disconnect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        let mut map = self
            .shard(app_id, user_id)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(users) = map.get_mut(app_id) else {
            return Ok(Transition {
                user_changed: false,
            });
        };
        let Some(gateways) = users.get_mut(user_id) else {
            return Ok(Transition {
                user_changed: false,
            });
        };
        if let Some(count) = gateways.get_mut(gateway_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                gateways.remove(gateway_id);
            }
        }
        let last = gateways.is_empty();
        if last {
            users.remove(user_id);
            if users.is_empty() {
                map.remove(app_id);
            }
        }
        if last {
            self.changed(app_id, user_id, false);
        }
        Ok(Transition { user_changed: last })
    }

    async fn online_users(
        &self,
        app_id: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), PresenceError> {
        let mut users = Vec::new();
        for shard in &self.shards {
            let map = shard
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(app) = map.get(app_id) {
                users.extend(app.keys().cloned());
            }
        }
        users.sort_unstable();
        let truncated = users.len() > limit;
        users.truncate(limit);
        Ok((users, truncated))
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<PresenceChange> {
        self.changes.subscribe()
    }

    async fn gateways(
        &self,
        app_id: &str,
        user_id: &str,
    ) -> Result<Vec<(String, u32)>, PresenceError> {
        let map = self
            .shard(app_id, user_id)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(listed(map.get(app_id).and_then(|users| users.get(user_id))))
    }

    async fn gateways_batch(
        &self,
        app_id: &str,
        user_ids: &[&str],
    ) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
        // A few users (a delivery call's usual batch): one uncontended read
        // lock each costs less than sorting them by shard.
        if user_ids.len() <= FEW_USERS {
            return one_by_one(self, app_id, user_ids).await;
        }
        let mut out = vec![Vec::new(); user_ids.len()];
        // Positions by shard: each shard's lock is taken once.
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); SHARDS];
        for (i, user_id) in user_ids.iter().enumerate() {
            by_shard[self.shard_index(app_id, user_id)].push(i);
        }
        for (shard, positions) in self.shards.iter().zip(by_shard) {
            if positions.is_empty() {
                continue;
            }
            let map = shard
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(users) = map.get(app_id) else {
                continue;
            };
            for i in positions {
                out[i] = listed(users.get(user_ids[i]));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_first_and_last_connection_across_gateways() {
        contract::first_and_last_connection_across_gateways(&InMemoryPresence::default()).await;
    }

    #[tokio::test]
    async fn in_memory_batch_lookup_matches_single_lookups() {
        contract::batch_lookup_matches_single_lookups(&InMemoryPresence::default()).await;
    }

    #[tokio::test]
    async fn in_memory_changes_are_announced_once_per_transition() {
        contract::changes_are_announced_once_per_transition(&InMemoryPresence::default()).await;
    }

    #[tokio::test]
    async fn in_memory_user_list_is_sorted_and_capped() {
        contract::user_list_is_sorted_and_capped(&InMemoryPresence::default()).await;
    }

    #[tokio::test]
    async fn in_memory_stray_disconnect_changes_nothing() {
        contract::stray_disconnect_changes_nothing(&InMemoryPresence::default()).await;
    }
}
