//! When each connection sends: a fixed-rate schedule, staggered over the
//! connections so they do not all send in the same millisecond.

use std::time::Duration;

use tokio::time::Instant;

/// Sends at `start + k * interval` for k = 0, 1, 2, …
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
}

/// Most messages sent at once to catch up after a stall; beyond that the
/// schedule slips (the generator, not the server, was late).
pub const MAX_CATCH_UP: u64 = 10;

impl Schedule {
    /// The schedule of connection `index` of `count`, sending every
    /// `interval` from `base` on.
    pub fn staggered(base: Instant, interval: Duration, index: usize, count: usize) -> Self {
        let count = count.max(1) as u128;
        let offset_nanos = interval.as_nanos() * (index as u128 % count) / count;
        let offset = Duration::from_nanos(u64::try_from(offset_nanos).unwrap_or(u64::MAX));
        Schedule {
            start: base + offset,
            interval,
        }
    }

    /// How many sends are due by `now`, in total since the start.
    pub fn due(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        let elapsed = now.duration_since(self.start).as_nanos();
        let step = self.interval.as_nanos().max(1);
        u64::try_from(elapsed / step + 1).unwrap_or(u64::MAX)
    }

    /// When send number `k` (0-based) is due.
    pub fn at(&self, k: u64) -> Instant {
        let nanos = self.interval.as_nanos().saturating_mul(u128::from(k));
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Sends to make now, given `sent` so far: never more than
    /// [`MAX_CATCH_UP`] at once.
    pub fn to_send(&self, now: Instant, sent: u64) -> u64 {
        self.due(now).saturating_sub(sent).min(MAX_CATCH_UP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_counts_ticks_including_the_first() {
        let base = Instant::now();
        let s = Schedule::staggered(base, Duration::from_millis(10), 0, 1);
        assert_eq!(s.due(base), 1);
        assert_eq!(s.due(base + Duration::from_millis(9)), 1);
        assert_eq!(s.due(base + Duration::from_millis(10)), 2);
        assert_eq!(s.due(base + Duration::from_millis(1000)), 101);
        assert_eq!(s.at(3), base + Duration::from_millis(30));
    }

    #[test]
    fn connections_are_spread_over_the_interval() {
        let base = Instant::now();
        let interval = Duration::from_millis(10);
        let starts: Vec<Duration> = (0..4)
            .map(|i| Schedule::staggered(base, interval, i, 4).at(0) - base)
            .collect();
        assert_eq!(
            starts,
            vec![
                Duration::ZERO,
                Duration::from_micros(2500),
                Duration::from_micros(5000),
                Duration::from_micros(7500)
            ]
        );
        let late = Schedule::staggered(base, interval, 3, 4);
        assert_eq!(late.due(base), 0, "not started yet");
    }

    #[test]
    fn catch_up_is_bounded() {
        let base = Instant::now();
        let s = Schedule::staggered(base, Duration::from_millis(1), 0, 1);
        assert_eq!(s.to_send(base + Duration::from_secs(1), 0), MAX_CATCH_UP);
        assert_eq!(s.to_send(base + Duration::from_millis(5), 4), 2);
        assert_eq!(s.to_send(base + Duration::from_millis(5), 6), 0);
    }
}
