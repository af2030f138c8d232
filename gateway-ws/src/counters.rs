//! Handles of the counters on the per-message path, registered once: the
//! `metrics::counter!` macro with labels builds and hashes its key on every
//! call (~4 % of the server's CPU at 100,000 msgs/s, docs/benchmarks.md).
//! Labels outside the known sets fall back to the macro.

use metrics::{Counter, Histogram};

use crate::frames;

pub(crate) struct Counters {
    frames_in: Vec<(&'static str, Counter)>,
    frames_out: Vec<(&'static str, Counter)>,
    /// direct/fast, direct/reliable, group/fast, group/reliable.
    messages: [Counter; 4],
    backlog_waits: Counter,
    delivery_latency: Histogram,
}

/// Frame types sent per message (the rest are rare).
const HOT_FRAMES_OUT: [&str; 5] = [
    "MESSAGE",
    "MESSAGE_SENT",
    "MESSAGE_CONFIRMATION",
    "MESSAGE_ACCEPTED",
    "ERROR",
];

impl Counters {
    pub(crate) fn new() -> Self {
        let frames_in = frames::KNOWN_TYPES
            .iter()
            .chain(std::iter::once(&"unknown"))
            .map(|&t| {
                (
                    t,
                    metrics::counter!("switchboard_frames_in_total", "type" => t),
                )
            })
            .collect();
        let frames_out = HOT_FRAMES_OUT
            .iter()
            .map(|&t| {
                (
                    t,
                    metrics::counter!("switchboard_frames_out_total", "type" => t),
                )
            })
            .collect();
        let message = |kind: &'static str, feature: &'static str| metrics::counter!("switchboard_messages_total", "kind" => kind, "feature" => feature);
        Counters {
            frames_in,
            frames_out,
            messages: [
                message("direct", "fast"),
                message("direct", "reliable"),
                message("group", "fast"),
                message("group", "reliable"),
            ],
            backlog_waits: metrics::counter!("switchboard_backlog_waits_total"),
            delivery_latency: metrics::histogram!("switchboard_delivery_latency_seconds"),
        }
    }

    /// Counts `n` client frames of a type.
    pub(crate) fn frames_in(&self, kind: &'static str, n: u64) {
        match self.frames_in.iter().find(|(t, _)| *t == kind) {
            Some((_, c)) => c.increment(n),
            None => metrics::counter!("switchboard_frames_in_total", "type" => kind).increment(n),
        }
    }

    /// Counts `n` frames of a type queued to clients.
    pub(crate) fn frames_out(&self, kind: &'static str, n: u64) {
        match self.frames_out.iter().find(|(t, _)| *t == kind) {
            Some((_, c)) => c.increment(n),
            None => metrics::counter!("switchboard_frames_out_total", "type" => kind).increment(n),
        }
    }

    /// A message's time from its sender's gateway to this socket.
    pub(crate) fn delivery_latency(&self, seconds: f64) {
        self.delivery_latency.record(seconds);
    }

    /// A connection's reader waited for the gateway's backlog to drain.
    pub(crate) fn backlog_wait(&self) {
        self.backlog_waits.increment(1);
    }

    pub(crate) fn message(&self, group: bool, reliable: bool) -> &Counter {
        &self.messages[usize::from(group) * 2 + usize::from(reliable)]
    }
}
