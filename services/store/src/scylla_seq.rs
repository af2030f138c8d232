//! Sequence numbers and queue ids of the ScyllaDB engine, given out
//! without a round trip and without a lightweight transaction.
//!
//! A sequence number is `micros * 1024 + writer`: `micros` a logical clock
//! in microseconds since the Unix epoch, `writer` (10 bits) the number this
//! process claimed at start-up (an incarnation counter, claimed once with a
//! lightweight transaction, taken modulo 1024). The logical clock of one
//! process is `max(wall clock, last + 1)`, so:
//!
//! - **increasing within a process**, for every inbox at once: every
//!   number is above every number the process gave out before, whatever
//!   the wall clock does (a step back only slows the clock to one tick per
//!   number until the wall clock passes it again);
//! - **unique across processes**: two live processes have different
//!   writer bits unless 1,024 processes started while one of them ran, so
//!   two appends never write the same row;
//! - **increasing across processes and restarts**, up to clock skew: a
//!   message appended after another's append returned was numbered later
//!   in real time, so its number is higher unless the two writers' clocks
//!   differ by more than the time between the two appends. The fetch
//!   horizon ([`Horizon`]) is what keeps a reader from paging past a lower
//!   number still being written by a writer whose clock is behind.
//!
//! The numbers stay below 2^63 (they are CQL `bigint`s) until the year 2255.
//!
//! Queue ids must also be contiguous within one enqueue (the queue
//! contract): an id is `slot * 1024 + index`, where `index` < 1024 is the
//! position in the enqueue and `slot` a logical microsecond this process
//! owns: one congruent to its writer number modulo 1024. Two processes
//! never share a slot; one process uses up to 977 slots a second before
//! its queue clock runs ahead of the wall clock (harmless: ids only need
//! to increase).

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Writer numbers: 10 bits.
pub const WRITERS: u64 = 1024;
/// Most items one enqueue may number (the queue contract allows 1,000).
pub const MAX_QUEUE_BATCH: u64 = 1024;

/// Microseconds since the Unix epoch by the wall clock.
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The logical microsecond a sequence number was given out at.
pub fn micros_of(seq: u64) -> u64 {
    seq / WRITERS
}

/// Gives out the sequence numbers and queue ids of one process.
#[derive(Debug)]
pub struct SeqClock {
    writer: u64,
    state: Mutex<Clocks>,
}

#[derive(Debug, Default)]
struct Clocks {
    /// The last logical microsecond of a sequence number.
    seq: u64,
    /// The last queue slot.
    slot: u64,
}

impl SeqClock {
    /// The clock of writer `writer` (taken modulo [`WRITERS`]).
    pub fn new(writer: u64) -> Self {
        SeqClock {
            writer: writer % WRITERS,
            state: Mutex::new(Clocks::default()),
        }
    }

    #[cfg(test)]
    pub fn writer(&self) -> u64 {
        self.writer
    }

    /// `n` sequence numbers, increasing, each above every number given out
    /// before by this clock.
    pub fn next_seqs(&self, n: usize) -> Vec<u64> {
        self.next_seqs_at(n, wall_micros())
    }

    fn next_seqs_at(&self, n: usize, now: u64) -> Vec<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            state.seq = now.max(state.seq + 1);
            out.push(state.seq * WRITERS + self.writer);
        }
        out
    }

    /// The first of `n` (at most [`MAX_QUEUE_BATCH`]) contiguous queue ids,
    /// above every id given out before by this clock.
    pub fn next_queue_ids(&self, n: usize) -> u64 {
        self.next_queue_ids_at(n, wall_micros())
    }

    fn next_queue_ids_at(&self, n: usize, now: u64) -> u64 {
        debug_assert!(n as u64 <= MAX_QUEUE_BATCH);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let from = now.max(state.slot + 1);
        // The first slot at or after `from` that is this writer's.
        let slot = from + (self.writer + WRITERS - from % WRITERS) % WRITERS;
        state.slot = slot;
        slot * MAX_QUEUE_BATCH
    }
}

/// Where a fetch may stop: rows numbered at or above the horizon may still
/// have lower-numbered neighbours being written by another process, so a
/// fetch does not show them until the horizon passes them.
///
/// A write is given up (and its append fails) when it has not been
/// acknowledged within `write_deadline` of its numbers being given out;
/// a writer's clock is at most `clock_skew` behind ours. So once our clock
/// reads `micros_of(seq) + write_deadline + clock_skew`, every append
/// numbered below `seq` that will ever be acknowledged has been, and a
/// reader at quorum sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    settle: Duration,
}

impl Horizon {
    pub fn new(write_deadline: Duration, clock_skew: Duration) -> Self {
        Horizon {
            settle: write_deadline.saturating_add(clock_skew),
        }
    }

    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// The lowest sequence number not yet settled at wall time `now_micros`.
    pub fn at(&self, now_micros: u64) -> u64 {
        let settle = u64::try_from(self.settle.as_micros()).unwrap_or(u64::MAX);
        now_micros.saturating_sub(settle).saturating_mul(WRITERS)
    }

    /// How long from wall time `now_micros` until `seq` is settled.
    pub fn wait_for(&self, seq: u64, now_micros: u64) -> Duration {
        let settle = u64::try_from(self.settle.as_micros()).unwrap_or(u64::MAX);
        let settled_at = micros_of(seq).saturating_add(settle).saturating_add(1);
        Duration::from_micros(settled_at.saturating_sub(now_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000_000;

    #[test]
    fn seqs_increase_within_a_call_and_across_calls() {
        let clock = SeqClock::new(7);
        let a = clock.next_seqs_at(5, NOW);
        let b = clock.next_seqs_at(3, NOW);
        let all: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
        assert!(all.iter().all(|s| s % WRITERS == 7), "writer bits");
        assert_eq!(micros_of(a[0]), NOW);
    }

    #[test]
    fn a_clock_step_back_does_not_lower_seqs() {
        let clock = SeqClock::new(1);
        let before = clock.next_seqs_at(2, NOW);
        let after = clock.next_seqs_at(2, NOW - 5_000_000);
        assert!(after[0] > before[1], "{after:?} after {before:?}");
        // Once the wall clock is past the logical one again, it is used.
        let later = clock.next_seqs_at(1, NOW + 1_000);
        assert_eq!(micros_of(later[0]), NOW + 1_000);
    }

    #[test]
    fn a_later_start_numbers_above_an_earlier_one() {
        // A restart: a new clock (another writer number), a later time.
        let first = SeqClock::new(1023).next_seqs_at(100, NOW);
        let second = SeqClock::new(0).next_seqs_at(1, NOW + 1_000);
        assert!(second[0] > first[99]);
    }

    #[test]
    fn writers_never_share_a_seq() {
        let (a, b) = (SeqClock::new(3), SeqClock::new(4));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1_000 {
            for s in a.next_seqs_at(3, NOW + i / 7) {
                assert!(seen.insert(s));
            }
            for s in b.next_seqs_at(3, NOW + i / 5) {
                assert!(seen.insert(s));
            }
        }
        assert_eq!(SeqClock::new(WRITERS + 5).writer(), 5);
    }

    #[test]
    fn seqs_stay_below_i64_for_two_centuries() {
        let year_2250 = 8_835_000_000u64 * 1_000_000;
        let seq = SeqClock::new(WRITERS - 1).next_seqs_at(1, year_2250)[0];
        assert!(i64::try_from(seq).is_ok());
    }

    #[test]
    fn queue_ids_are_contiguous_per_batch_disjoint_per_writer_and_increasing() {
        let (a, b) = (SeqClock::new(2), SeqClock::new(900));
        let mut ranges = Vec::new();
        let mut last_a = 0;
        for i in 0..2_000 {
            // Many batches in one microsecond: the slot clock runs ahead.
            let first = a.next_queue_ids_at(1000, NOW + i / 100);
            assert!(first > last_a, "increasing");
            last_a = first;
            assert_eq!((first / MAX_QUEUE_BATCH) % WRITERS, 2, "a's slot");
            ranges.push((first, first + 1000));
            let first = b.next_queue_ids_at(1, NOW + i / 100);
            assert_eq!((first / MAX_QUEUE_BATCH) % WRITERS, 900, "b's slot");
            ranges.push((first, first + 1));
        }
        ranges.sort_unstable();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "disjoint");
        assert!(i64::try_from(ranges[ranges.len() - 1].1).is_ok());
    }

    #[test]
    fn the_horizon_trails_the_clock_by_the_settle_time() {
        let h = Horizon::new(Duration::from_secs(2), Duration::from_millis(500));
        assert_eq!(h.settle(), Duration::from_millis(2_500));
        let seq = SeqClock::new(9).next_seqs_at(1, NOW)[0];
        assert!(seq >= h.at(NOW), "a fresh seq is not settled");
        assert!(
            seq >= h.at(NOW + 2_500_000),
            "not yet at exactly the settle time"
        );
        assert!(seq < h.at(NOW + 2_500_001), "settled just after it");
        let wait = h.wait_for(seq, NOW + 1_000_000);
        assert_eq!(wait, Duration::from_micros(1_500_001));
        assert!(seq < h.at(NOW + 1_000_000 + wait.as_micros() as u64));
        assert_eq!(h.wait_for(seq, NOW + 10_000_000), Duration::ZERO);
    }
}
