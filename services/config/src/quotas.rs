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
