//! Quotas a gateway enforces: each sender's fan-out budget (recipient-bytes
//! per second, a token bucket per app and user on this gateway) and each
//! app's connections on this gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_mesh::{ErrorCode, ServiceError};

/// Senders whose budgets are kept before the full (idle) ones are dropped.
const MAX_SENDERS: usize = 100_000;

/// The settings (0: that quota is off).
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayQuotas {
    /// Recipient-bytes per second per sender.
    pub sender_bytes_per_second: u64,
    /// The most a sender may spend at once.
    pub sender_burst_bytes: u64,
    /// Authenticated connections of one app on this gateway.
    pub app_max_connections: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by app, then user: a sender seen before is found with borrowed
/// keys, so a send costs no allocation.
#[derive(Default)]
struct Budgets {
    by_app: HashMap<String, HashMap<String, Bucket>>,
    senders: usize,
}

pub(crate) struct Quotas {
    settings: GatewayQuotas,
    /// Apps with their own quotas (`[[apps]]` `quotas`), by app id.
    per_app: HashMap<String, GatewayQuotas>,
    budgets: Mutex<Budgets>,
    apps: Arc<Mutex<HashMap<String, u64>>>,
}

/// One connection's place in its app's count; given back on drop.
pub(crate) struct AppSlot {
    app: String,
    apps: Arc<Mutex<HashMap<String, u64>>>,
}

impl Drop for AppSlot {
    fn drop(&mut self) {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = apps.get_mut(&self.app) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                apps.remove(&self.app);
            }
        }
    }
}

fn refused(cost: u64, settings: &GatewayQuotas) -> ServiceError {
    metrics::counter!("switchboard_quota_refusals_total", "quota" => "sender").increment(1);
    ServiceError::new(
        ErrorCode::RateLimited,
        format!(
            "this send costs {cost} recipient-bytes and the sender's budget ({} per second, {} at \
             once) is spent; try again later",
            settings.sender_bytes_per_second, settings.sender_burst_bytes
        ),
    )
}

impl Quotas {
    pub(crate) fn new(settings: GatewayQuotas) -> Self {
        Self::with_apps(settings, HashMap::new())
    }

    /// `settings` for every app but those in `per_app`, which have their own.
    pub(crate) fn with_apps(
        settings: GatewayQuotas,
        per_app: HashMap<String, GatewayQuotas>,
    ) -> Self {
        Quotas {
            settings,
            per_app,
            budgets: Mutex::default(),
            apps: Arc::default(),
        }
    }

    /// The quotas of `app`.
    fn settings(&self, app: &str) -> &GatewayQuotas {
        self.per_app.get(app).unwrap_or(&self.settings)
    }

    fn budgets_on(&self, app: &str) -> bool {
        self.settings(app).sender_bytes_per_second > 0
    }

    /// Runs `f` on the sender's bucket, refilled to now.
    fn with_bucket<T>(&self, app: &str, user: &str, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let settings = self.settings(app);
        let burst = settings.sender_burst_bytes as f64;
        let rate = settings.sender_bytes_per_second as f64;
        let now = Instant::now();
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Budgets { by_app, senders } = &mut *budgets;
        if *senders >= MAX_SENDERS {
            *senders = 0;
            for (app, users) in by_app.iter_mut() {
                let s = self.settings(app);
                let (rate, burst) = (
                    s.sender_bytes_per_second as f64,
                    s.sender_burst_bytes as f64,
                );
                users.retain(|_, b| {
                    b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst
                });
                *senders += users.len();
            }
            by_app.retain(|_, users| !users.is_empty());
        }
        if !by_app.contains_key(app) {
            by_app.insert(app.to_owned(), HashMap::new());
        }
        let users = by_app.get_mut(app).expect("inserted above");
        if !users.contains_key(user) {
            users.insert(
                user.to_owned(),
                Bucket {
                    tokens: burst,
                    at: now,
                },
            );
            *senders += 1;
        }
        let bucket = users.get_mut(user).expect("inserted above");
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        f(bucket)
    }

    /// Takes `cost` recipient-bytes from the sender's budget, or refuses
    /// (`RATE_LIMITED`) and takes nothing.
    pub(crate) fn charge(&self, app: &str, user: &str, cost: u64) -> Result<(), ServiceError> {
        if !self.budgets_on(app) {
            return Ok(());
        }
        let ok = self.with_bucket(app, user, |b| {
            if b.tokens >= cost as f64 {
                b.tokens -= cost as f64;
                true
            } else {
                false
            }
        });
        if ok {
            Ok(())
        } else {
            Err(refused(cost, self.settings(app)))
        }
    }

    /// Refuses a send whose cost is known only once it is routed (a
    /// persistent group's members) while the budget is spent.
    pub(crate) fn check(&self, app: &str, user: &str) -> Result<(), ServiceError> {
        if !self.budgets_on(app) {
            return Ok(());
        }
        if self.with_bucket(app, user, |b| b.tokens > 0.0) {
            Ok(())
        } else {
            Err(refused(0, self.settings(app)))
        }
    }

    /// Takes the cost of a send already made (it may leave the budget in
    /// debt, which later sends wait out).
    pub(crate) fn charge_after(&self, app: &str, user: &str, cost: u64) {
        if self.budgets_on(app) {
            self.with_bucket(app, user, |b| b.tokens -= cost as f64);
        }
    }

    /// A place for one more connection of `app`, or why not.
    pub(crate) fn join_app(&self, app: &str) -> Result<Option<AppSlot>, String> {
        let max = self.settings(app).app_max_connections;
        if max == 0 {
            return Ok(None);
        }
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = apps.entry(app.to_owned()).or_default();
        if *n >= max {
            metrics::counter!("switchboard_quota_refusals_total", "quota" => "app_connections")
                .increment(1);
            return Err(format!(
                "the app has its maximum of {max} connections on this server; try again later"
            ));
        }
        *n += 1;
        Ok(Some(AppSlot {
            app: app.to_owned(),
            apps: self.apps.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_spent_by_recipient_bytes_and_refills() {
        let q = Quotas::new(GatewayQuotas {
            sender_bytes_per_second: 1,
            sender_burst_bytes: 16_000,
            app_max_connections: 0,
        });
        // A group message of 1,000 bytes to 10 users costs 10,000.
        q.charge("app", "ann", 10_000).expect("within the burst");
        let refused = q.charge("app", "ann", 10_000).expect_err("spent");
        assert_eq!(refused.code, ErrorCode::RateLimited);
        // Others have their own budget.
        q.charge("app", "bob", 10_000).expect("bob's own");
        q.check("app", "ann").expect("6,000 left");
        q.charge_after("app", "ann", 7_000);
        assert!(q.check("app", "ann").is_err(), "in debt");
    }

    #[test]
    fn an_app_holds_its_maximum_of_connections() {
        let q = Quotas::new(GatewayQuotas {
            app_max_connections: 2,
            ..Default::default()
        });
        let a = q.join_app("demo").expect("first");
        let _b = q.join_app("demo").expect("second");
        assert!(q.join_app("demo").is_err());
        assert!(q.join_app("other").is_ok());
        drop(a);
        assert!(q.join_app("demo").is_ok(), "a closed one makes room");
    }
}
