//! The embedded store's free-space floor: below it RELIABLE messages are
//! refused (`UNAVAILABLE`, the sender retries) instead of being accepted and
//! then lost to a full disk; FAST ones flow on. The free space is read every
//! interval (statvfs), and a write that failed for want of space lowers the
//! guard at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The floor (0: that measure is not checked).
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFloor {
    pub min_free_bytes: u64,
    pub min_free_percent: f64,
}

pub struct DiskGuard {
    dir: PathBuf,
    floor: DiskFloor,
    low: AtomicBool,
    free: AtomicU64,
}

impl DiskGuard {
    /// A guard of the filesystem holding `dir`, read once now.
    pub fn new(dir: impl Into<PathBuf>, floor: DiskFloor) -> Self {
        let guard = DiskGuard {
            dir: dir.into(),
            floor,
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
        };
        guard.check();
        guard
    }

    /// Whether the free space is below the floor (RELIABLE is refused).
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Free bytes at the last reading.
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Reads the free space and sets the guard from it.
    pub fn check(&self) {
        let stat = match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => stat,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the store's free disk space");
                return;
            }
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let total = stat.f_blocks.saturating_mul(stat.f_frsize);
        let percent = if total == 0 {
            100.0
        } else {
            free as f64 * 100.0 / total as f64
        };
        let low = free < self.floor.min_free_bytes || percent < self.floor.min_free_percent;
        self.free.store(free, Ordering::Relaxed);
        metrics::gauge!("switchboard_store_disk_free_bytes").set(free as f64);
        metrics::gauge!("switchboard_store_disk_low").set(if low { 1.0 } else { 0.0 });
        let was = self.low.swap(low, Ordering::Relaxed);
        if low && !was {
            tracing::warn!(
                free_bytes = free,
                free_percent = percent,
                "store disk below its free-space floor: RELIABLE messages are refused"
            );
        } else if was && !low {
            tracing::info!(
                free_bytes = free,
                "store disk above its free-space floor again: RELIABLE messages are accepted"
            );
        }
    }

    /// A store write failed: when for want of space, the guard is lowered
    /// now (the next reading raises it again once space is back).
    pub fn write_failed(&self, error: &dyn std::fmt::Display) {
        let text = error.to_string();
        if text.contains("No space left") || text.contains("Disk quota exceeded") {
            if !self.low.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %text, "store write failed for want of disk space: RELIABLE messages are refused");
            }
            metrics::gauge!("switchboard_store_disk_low").set(1.0);
        }
    }

    /// Reads the free space every `interval` until `stop` resolves.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = every.tick() => {}
            }
            let guard = self.clone();
            // statvfs is a blocking call, quick but not to be run on a
            // worker that serves sockets.
            let _ = tokio::task::spawn_blocking(move || guard.check()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_decides_and_a_full_disk_error_lowers_the_guard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = DiskGuard::new(dir.path(), DiskFloor::default());
        assert!(!open.is_low());
        assert!(open.free_bytes() > 0);
        open.write_failed(&"store backend error: something else");
        assert!(!open.is_low());
        open.write_failed(&"store backend error: No space left on device (os error 28)");
        assert!(open.is_low());
        open.check();
        assert!(!open.is_low(), "a reading with space raises it again");
        let floor = DiskGuard::new(
            dir.path(),
            DiskFloor {
                min_free_bytes: u64::MAX,
                min_free_percent: 0.0,
            },
        );
        assert!(floor.is_low());
    }
}
