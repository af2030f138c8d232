use std::time::Instant;

/// Token bucket: `per_second` sustained, bursts up to one second's worth.
pub struct RateLimiter {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        RateLimiter {
            per_second,
            tokens: per_second,
            last: Instant::now(),
        }
    }

    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    /// Whether a whole unit is left, without spending it (see [`charge`]).
    ///
    /// [`charge`]: RateLimiter::charge
    pub fn has_room(&mut self) -> bool {
        self.refill(Instant::now());
        self.tokens >= 1.0
    }

    /// Spends `units` after the fact, possibly into debt: a request whose
    /// cost is known only once it ran then waits out what it overspent.
    pub fn charge(&mut self, units: usize) {
        self.refill(Instant::now());
        self.tokens -= units as f64;
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let start = Instant::now();
        let mut r = RateLimiter::new(10);
        r.last = start;
        let allowed = (0..20).filter(|_| r.allow_at(start)).count();
        assert_eq!(allowed, 10);
        assert!(r.allow_at(start + Duration::from_millis(100)));
        assert!(!r.allow_at(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(10);
        let allowed = (0..20).filter(|_| r.allow_at(later)).count();
        assert_eq!(allowed, 10, "the bucket never holds more than one second");
    }
}
