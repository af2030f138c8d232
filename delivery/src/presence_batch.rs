//! Presence lookups of concurrent deliveries gathered into one backend
//! call: with a DeliverMany batch, every item asks where its users are at
//! once, and a Redis round trip each would cost more than the item.

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_mesh::{BatchLimits, BatchSend, Coalescer, ServiceError};
use switchboard_presence::{Presence, PresenceChange, PresenceError, Transition};

/// One lookup: an app and its users.
type Lookup = (String, Vec<String>);
/// Per user of a lookup, its gateways with their connection counts.
type Located = Vec<Vec<(String, u32)>>;

/// A [`Presence`] whose lookups go to the backend in batches: one lookup
/// in flight at a time, the ones asked meanwhile gathered into the next
/// (never older than the moment they were asked). Everything else goes
/// straight through.
pub struct BatchedPresence {
    inner: Arc<dyn Presence>,
    lookups: Arc<Coalescer<Lookup, Located>>,
}

impl BatchedPresence {
    pub fn new(inner: Arc<dyn Presence>) -> Self {
        let backend = inner.clone();
        let send: BatchSend<Lookup, Located> = Arc::new(move |_peer, lookups: Vec<Lookup>| {
            let backend = backend.clone();
            Box::pin(async move { lookup_all(backend.as_ref(), lookups).await })
        });
        let limits = BatchLimits {
            // Users, not bytes, bound a lookup; one lane keeps one round
            // trip in flight.
            max_items: 256,
            max_bytes: usize::MAX,
            lanes: 1,
            ..BatchLimits::default()
        };
        BatchedPresence {
            inner,
            lookups: Coalescer::new(limits, send),
        }
    }
}

/// The lookups of one batch: one backend call per app (one in practice).
async fn lookup_all(
    backend: &dyn Presence,
    lookups: Vec<Lookup>,
) -> Result<Vec<Result<Located, ServiceError>>, ServiceError> {
    let mut apps: Vec<&str> = Vec::new();
    for (app, _) in &lookups {
        if !apps.contains(&app.as_str()) {
            apps.push(app);
        }
    }
    let mut results: Vec<Option<Located>> = vec![None; lookups.len()];
    for app in apps {
        let users: Vec<&str> = lookups
            .iter()
            .filter(|(a, _)| a == app)
            .flat_map(|(_, users)| users.iter().map(String::as_str))
            .collect();
        let found = backend
            .gateways_batch(app, &users)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        if found.len() != users.len() {
            return Err(ServiceError::unavailable(format!(
                "presence answered {} users of {}",
                found.len(),
                users.len()
            )));
        }
        let mut found = found.into_iter();
        for (slot, (a, users)) in results.iter_mut().zip(&lookups) {
            if a == app {
                *slot = Some(found.by_ref().take(users.len()).collect());
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.ok_or_else(|| ServiceError::internal("a lookup was left out")))
        .collect())
}

#[async_trait]
impl Presence for BatchedPresence {
    async fn connect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        self.inner.connect(app_id, user_id, gateway_id).await
    }

    async fn disconnect(
        &self,
        app_id: &str,
        user_id: &str,
        gateway_id: &str,
    ) -> Result<Transition, PresenceError> {
        self.inner.disconnect(app_id, user_id, gateway_id).await
    }

    async fn check(&self) -> Result<(), PresenceError> {
        self.inner.check().await
    }

    async fn gateways(
        &self,
        app_id: &str,
        user_id: &str,
    ) -> Result<Vec<(String, u32)>, PresenceError> {
        let mut found = self.gateways_batch(app_id, &[user_id]).await?;
        Ok(found.pop().unwrap_or_default())
    }

    async fn gateways_batch(
        &self,
        app_id: &str,
        user_ids: &[&str],
    ) -> Result<Vec<Vec<(String, u32)>>, PresenceError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let lookup = (
            app_id.to_owned(),
            user_ids.iter().map(|u| (*u).to_owned()).collect(),
        );
        self.lookups
            .call("", &[], 0, lookup)
            .await
            .map_err(|e| PresenceError::Unavailable(e.message))
    }

    async fn online_users(
        &self,
        app_id: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), PresenceError> {
        self.inner.online_users(app_id, limit).await
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<PresenceChange> {
        self.inner.changes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_presence::InMemoryPresence;

    #[tokio::test]
    async fn batched_lookups_answer_as_the_backend_does() {
        let backend = Arc::new(InMemoryPresence::default());
        backend.connect("a", "ann", "gw1").await.expect("connect");
        backend.connect("a", "ann", "gw2").await.expect("connect");
        backend.connect("b", "bob", "gw1").await.expect("connect");
        let batched = Arc::new(BatchedPresence::new(backend.clone()));
        let asks = [
            ("a", vec!["ann", "bob"]),
            ("b", vec!["bob"]),
            ("a", vec!["cid", "ann"]),
        ];
        let answers = futures_util::future::join_all(asks.iter().map(|(app, users)| {
            let batched = batched.clone();
            async move { batched.gateways_batch(app, users).await }
        }))
        .await;
        for ((app, users), answer) in asks.iter().zip(answers) {
            let mut expected = backend.gateways_batch(app, users).await.expect("backend");
            let mut answer = answer.expect("batched");
            for list in expected.iter_mut().chain(answer.iter_mut()) {
                list.sort();
            }
            assert_eq!(answer, expected, "{app} {users:?}");
        }
        assert_eq!(
            batched.gateways("a", "ann").await.expect("one").len(),
            2,
            "ann is on two gateways"
        );
    }
}
