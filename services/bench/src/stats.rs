//! Accounting of one measured step: latency percentiles, loss and duplicates.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Messages seen from one sender, by sequence number.
#[derive(Default, Debug, Clone)]
pub struct SeenSet {
    words: Vec<u64>,
}

impl SeenSet {
    /// Marks `seq` seen; false when it was seen before (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        let word = usize::try_from(seq / 64).unwrap_or(usize::MAX);
        if word >= self.words.len() {
            // Sequence numbers are dense per sender and step; cap growth so a
            // corrupt number cannot take all memory.
            if word > 1 << 24 {
                return false;
            }
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }
}

/// What one receiving connection saw during one step.
#[derive(Debug, Clone)]
pub struct StepCollector {
    pub step: usize,
    pub latency_us: Histogram<u64>,
    pub received: u64,
    pub duplicates: u64,
    seen: SeenSet,
}

/// Highest latency the histogram tracks (60 s); higher values are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    // Three significant digits, 1 µs .. 60 s: about 0.1 % error.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

impl StepCollector {
    pub fn new(step: usize) -> Self {
        StepCollector {
            step,
            latency_us: histogram(),
            received: 0,
            duplicates: 0,
            seen: SeenSet::default(),
        }
    }

    /// Records an arrival of message `seq` of this step.
    pub fn record(&mut self, seq: u64, latency_us: u64) {
        if self.seen.insert(seq) {
            self.received += 1;
            let _ = self.latency_us.record(latency_us.clamp(1, MAX_LATENCY_US));
        } else {
            self.duplicates += 1;
        }
    }
}

/// Result of one step, summed over all connections.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepReport {
    pub step: usize,
    /// Messages per second per connection in this step.
    pub rate_per_connection: f64,
    pub connections: usize,
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Received messages per second, all connections.
    pub msgs_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// CPU time of the generator process over the step, in % of one core.
    pub generator_cpu_pct: f64,
}

pub struct StepTotals {
    pub latency_us: Histogram<u64>,
    pub received: u64,
    pub duplicates: u64,
}

impl StepTotals {
    pub fn new() -> Self {
        StepTotals {
            latency_us: histogram(),
            received: 0,
            duplicates: 0,
        }
    }

    pub fn add(&mut self, c: &StepCollector) {
        let _ = self.latency_us.add(&c.latency_us);
        self.received += c.received;
        self.duplicates += c.duplicates;
    }

    pub fn report(
        &self,
        step: usize,
        rate_per_connection: f64,
        connections: usize,
        seconds: f64,
        sent: u64,
        generator_cpu_pct: f64,
    ) -> StepReport {
        let q = |q: f64| {
            if self.latency_us.is_empty() {
                0.0
            } else {
                self.latency_us.value_at_quantile(q) as f64 / 1000.0
            }
        };
        StepReport {
            step,
            rate_per_connection,
            connections,
            seconds,
            sent,
            received: self.received,
            lost: sent.saturating_sub(self.received),
            duplicates: self.duplicates,
            msgs_per_sec: if seconds > 0.0 {
                self.received as f64 / seconds
            } else {
                0.0
            },
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if self.latency_us.is_empty() {
                0.0
            } else {
                self.latency_us.max() as f64 / 1000.0
            },
            generator_cpu_pct,
        }
    }
}

impl Default for StepTotals {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_flags_duplicates() {
        let mut s = SeenSet::default();
        assert!(s.insert(0));
        assert!(s.insert(63));
        assert!(s.insert(64));
        assert!(s.insert(1000));
        assert!(!s.insert(64));
        assert!(!s.insert(0));
        assert!(
            !s.insert(u64::MAX),
            "absurd sequence numbers are not stored"
        );
    }

    #[test]
    fn loss_and_duplicates_are_counted() {
        let mut c = StepCollector::new(0);
        for seq in 0..90 {
            c.record(seq, 1000);
        }
        c.record(5, 1000);
        c.record(6, 1000);
        let mut t = StepTotals::new();
        t.add(&c);
        let r = t.report(0, 100.0, 1, 1.0, 100, 0.0);
        assert_eq!(r.received, 90);
        assert_eq!(r.duplicates, 2);
        assert_eq!(r.lost, 10);
        assert!((r.msgs_per_sec - 90.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles_over_merged_connections() {
        let mut a = StepCollector::new(0);
        let mut b = StepCollector::new(0);
        // 1..=1000 ms spread over two connections.
        for i in 1..=1000u64 {
            let c = if i % 2 == 0 { &mut a } else { &mut b };
            c.record(i, i * 1000);
        }
        let mut t = StepTotals::new();
        t.add(&a);
        t.add(&b);
        let r = t.report(0, 1.0, 2, 1.0, 1000, 0.0);
        let close = |x: f64, y: f64| (x - y).abs() / y < 0.01;
        assert!(close(r.p50_ms, 500.0), "{}", r.p50_ms);
        assert!(close(r.p90_ms, 900.0), "{}", r.p90_ms);
        assert!(close(r.p99_ms, 990.0), "{}", r.p99_ms);
        assert!(close(r.max_ms, 1000.0), "{}", r.max_ms);
        assert_eq!(r.lost, 0);
    }
}
