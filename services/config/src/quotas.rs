//! The `[quotas]` section: what one inbox, one sender and one app may take
//! of a deployment, and the free-space floor of the embedded store.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Quotas that protect every user from one (docs/operations.md, "Quotas").
/// A zero turns a quota off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Stored (undelivered) messages one inbox holds; past it a RELIABLE
    /// message to it is refused with `INBOX_FULL`.
    pub inbox_max_messages: u64,
    /// Stored bytes (encoded messages) one inbox holds.
    pub inbox_max_bytes: u64,
    /// Recipient-bytes per second one sender (app, user) may send through
    /// one gateway: content length times recipients, so a group message to
    /// 1,000 users costs what 1,000 direct messages cost.
    pub sender_bytes_per_second: u64,
    /// Recipient-bytes a sender may spend at once (the bucket's size).
    pub sender_burst_bytes: u64,
    /// Authenticated connections of one app on one gateway process.
    pub app_max_connections: u64,
    /// Inboxes holding stored messages per app, as this delivery process
    /// counts them (see docs/operations.md).
    pub app_max_inboxes: u64,
    /// Free bytes below which the embedded store refuses RELIABLE messages
    /// (`UNAVAILABLE`); FAST ones keep flowing.
    pub disk_min_free_bytes: u64,
    /// Free space, in percent of the filesystem, below which the same.
    /// Off by default: on a large disk one percent is gigabytes that a
    /// healthy node may well be running with.
    pub disk_min_free_percent: f64,
    /// How often the free space is read (humantime: `"1s"`).
    #[serde(with = "super::humantime_duration")]
    pub disk_check_interval: Duration,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        QuotasConfig {
            inbox_max_messages: 100_000,
            inbox_max_bytes: 64 * 1024 * 1024,
            sender_bytes_per_second: 16 * 1024 * 1024,
            sender_burst_bytes: 16 * 1024 * 1024,
            app_max_connections: 0,
            app_max_inboxes: 1_000_000,
            disk_min_free_bytes: 64 * 1024 * 1024,
            disk_min_free_percent: 0.0,
            disk_check_interval: Duration::from_secs(1),
        }
    }
}

impl QuotasConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..100.0).contains(&self.disk_min_free_percent) {
            return Err(format!(
                "quotas.disk_min_free_percent must be at least 0 and below 100, not {}",
                self.disk_min_free_percent
            ));
        }
        if self.disk_check_interval.is_zero() {
            return Err("quotas.disk_check_interval must be more than 0".into());
        }
        if self.sender_bytes_per_second > 0 && self.sender_burst_bytes == 0 {
            return Err(
                "quotas.sender_burst_bytes must be more than 0 when sender_bytes_per_second is set"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One app's own quotas, in its `[[apps]]` entry (`quotas = {
/// inbox_max_messages = 1000 }`) and so in its etcd record: each key given
/// replaces the `[quotas]` value for that app; an absent key keeps it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AppQuotas {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_max_messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_bytes_per_second: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_burst_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_max_inboxes: Option<u64>,
}

impl AppQuotas {
    pub fn is_empty(&self) -> bool {
        *self == AppQuotas::default()
    }

    /// The quotas that apply to the app: `global` with this app's values.
    pub fn over(&self, global: &QuotasConfig) -> QuotasConfig {
        QuotasConfig {
            inbox_max_messages: self.inbox_max_messages.unwrap_or(global.inbox_max_messages),
            inbox_max_bytes: self.inbox_max_bytes.unwrap_or(global.inbox_max_bytes),
            sender_bytes_per_second: self
                .sender_bytes_per_second
                .unwrap_or(global.sender_bytes_per_second),
            sender_burst_bytes: self.sender_burst_bytes.unwrap_or(global.sender_burst_bytes),
            app_max_connections: self
                .app_max_connections
                .unwrap_or(global.app_max_connections),
            app_max_inboxes: self.app_max_inboxes.unwrap_or(global.app_max_inboxes),
            ..global.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;
    use std::collections::BTreeMap;

    const APPS: &str = r#"
[quotas]
inbox_max_messages = 10
sender_bytes_per_second = 1000

[[apps]]
name = "big"
app_id = "big"
auth = "none"
quotas = { inbox_max_messages = 500, app_max_connections = 3 }

[[apps]]
name = "small"
app_id = "small"
auth = "none"
"#;

    #[test]
    fn an_app_quota_replaces_only_the_keys_it_sets() {
        let c = Config::from_toml_and_env(APPS, &BTreeMap::new()).expect("load");
        let big = c.apps[0].quotas.over(&c.quotas);
        assert_eq!(big.inbox_max_messages, 500);
        assert_eq!(big.app_max_connections, 3);
        assert_eq!(big.sender_bytes_per_second, 1000, "the global value");
        assert!(c.apps[1].quotas.is_empty());
        assert_eq!(c.apps[1].quotas.over(&c.quotas), c.quotas);
    }

    #[test]
    fn an_app_quota_is_checked_as_the_global_one_and_names_its_app() {
        let bad = APPS.replace("app_max_connections = 3", "sender_burst_bytes = 0");
        let err = Config::from_toml_and_env(&bad, &BTreeMap::new()).expect_err("refused");
        assert!(err.to_string().contains("app big"), "{err}");
        let typo = APPS.replace("app_max_connections", "app_max_conections");
        assert!(Config::from_toml_and_env(&typo, &BTreeMap::new()).is_err());
    }
}
