//! Which sequence numbers of one inbox a connection has already been
//! written, for the recent ones: a sliding window of one bit per number
//! below the highest seen (as the anti-replay window of IPsec or DTLS).
//!
//! A connection's stored messages all come from its user's inbox, whose
//! numbers rise with every append and arrive nearly in order, so a window
//! of the last [`WINDOW`] numbers answers exactly for every repeat that
//! happens (a message pushed live while the same connection fetches it, or
//! replayed in ack mode as it is pushed), in 1 KiB and without hashing. A
//! number older than the window is not known and counts as new: written
//! again, a duplicate at-least-once delivery allows.

/// Numbers remembered below the highest seen.
pub(crate) const WINDOW: u64 = 8192;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Default)]
pub(crate) struct SeqWindow {
    /// Bit `seq % WINDOW` for each seq in `(highest - WINDOW, highest]`;
    /// allocated with the first number (an idle connection has none).
    bits: Option<Box<[u64; WORDS]>>,
    highest: u64,
}

impl SeqWindow {
    /// Records `seq`; whether it was new (not within the window already).
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
        let bits = self.bits.get_or_insert_with(|| Box::new([0; WORDS]));
        if seq > self.highest {
            if seq - self.highest >= WINDOW {
                bits.fill(0);
            } else {
                for s in self.highest + 1..seq {
                    clear(bits, s);
                }
            }
            self.highest = seq;
            set(bits, seq);
            return true;
        }
        if self.highest - seq >= WINDOW {
            return true;
        }
        !set(bits, seq)
    }
}

fn position(seq: u64) -> (usize, u64) {
    let bit = seq % WINDOW;
    ((bit / 64) as usize, 1 << (bit % 64))
}

fn clear(bits: &mut [u64; WORDS], seq: u64) {
    let (word, mask) = position(seq);
    bits[word] &= !mask;
}

/// Sets the bit; whether it was set already.
fn set(bits: &mut [u64; WORDS], seq: u64) -> bool {
    let (word, mask) = position(seq);
    let was = bits[word] & mask != 0;
    bits[word] |= mask;
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_new_once() {
        let mut w = SeqWindow::default();
        assert!(w.insert(1));
        assert!(!w.insert(1));
        assert!(w.insert(2));
        assert!(!w.insert(2));
        assert!(!w.insert(1));
    }

    #[test]
    fn numbers_out_of_order_are_known_within_the_window() {
        let mut w = SeqWindow::default();
        for seq in [10, 7, 12, 8, 11, 9] {
            assert!(w.insert(seq), "{seq} is new");
        }
        for seq in 7..=12 {
            assert!(!w.insert(seq), "{seq} was seen");
        }
        // Skipped below the highest, never seen: new.
        assert!(w.insert(5));
        assert!(w.insert(6));
    }

    #[test]
    fn a_gap_forgets_nothing_it_should_not_and_clears_reused_bits() {
        let mut w = SeqWindow::default();
        assert!(w.insert(1));
        // Same bit as 1, one window later: new, and 1 is now out of the
        // window (counts as new, not as seen through a stale bit).
        assert!(w.insert(1 + WINDOW));
        assert!(!w.insert(1 + WINDOW));
        assert!(w.insert(1));
        // Numbers skipped over by the jump are not marked seen.
        assert!(w.insert(WINDOW));
        // A jump past a whole window clears everything.
        assert!(w.insert(10 * WINDOW));
        assert!(w.insert(10 * WINDOW - 1));
        assert!(!w.insert(10 * WINDOW - 1));
    }

    #[test]
    fn the_window_slides_with_the_highest_number() {
        let mut w = SeqWindow::default();
        for seq in 1..=3 * WINDOW {
            assert!(w.insert(seq));
        }
        // The last WINDOW numbers are known, older ones are not.
        assert!(!w.insert(3 * WINDOW));
        assert!(!w.insert(2 * WINDOW + 1));
        assert!(w.insert(2 * WINDOW));
    }

    #[test]
    fn an_idle_window_holds_no_memory() {
        let w = SeqWindow::default();
        assert!(w.bits.is_none());
        assert_eq!(std::mem::size_of::<SeqWindow>(), 16);
    }
}
