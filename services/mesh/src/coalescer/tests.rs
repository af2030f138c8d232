use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::{BatchLimits, BatchSend, Coalescer, run_ordered};
use crate::error::{ErrorCode, ServiceError};

/// An item: its sender and its number among that sender's items.
type Item = (u32, u32);

/// One batch as the peer saw it: when it was sent, to whom, what.
type Sent = (Instant, Arc<str>, Vec<Item>);

/// A peer that records every batch and answers each only when the test
/// adds a permit to `gate`; an item of sender 99 fails on its own.
struct Peer {
    sent: Arc<Mutex<Vec<Sent>>>,
    gate: Arc<Semaphore>,
    batch_sent: Arc<Notify>,
}

fn peer(limits: BatchLimits) -> (Arc<Coalescer<Item, Item>>, Peer) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(0));
    let batch_sent = Arc::new(Notify::new());
    let (s, g, n) = (sent.clone(), gate.clone(), batch_sent.clone());
    let send: BatchSend<Item, Item> = Arc::new(move |to: Arc<str>, items: Vec<Item>| {
        s.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), to, items.clone()));
        n.notify_waiters();
        let g = g.clone();
        Box::pin(async move {
            g.acquire()
                .await
                .map_err(|_| ServiceError::internal("closed"))?
                .forget();
            Ok(items
                .into_iter()
                .map(|item| {
                    if item.0 == 99 {
                        Err(ServiceError::new(
                            ErrorCode::InvalidRecipient,
                            "no such user",
                        ))
                    } else {
                        Ok(item)
                    }
                })
                .collect())
        })
    });
    (
        Coalescer::new(limits, send),
        Peer {
            sent,
            gate,
            batch_sent,
        },
    )
}

impl Peer {
    fn batches(&self) -> Vec<Sent> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits for `n` batches (parked, so that paused time moves on to
    /// the next timer, a linger's end).
    async fn wait_for(&self, n: usize) -> Vec<Sent> {
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let sent = self.batch_sent.notified();
                tokio::pin!(sent);
                sent.as_mut().enable();
                let batches = self.batches();
                if batches.len() >= n {
                    return batches;
                }
                sent.await;
            }
        })
        .await;
        match waited {
            Ok(batches) => batches,
            Err(_) => panic!("{n} batches were not sent: {:?}", self.batches()),
        }
    }
}

fn call(
    c: &Arc<Coalescer<Item, Item>>,
    item: Item,
) -> tokio::task::JoinHandle<Result<Item, ServiceError>> {
    let c = c.clone();
    tokio::spawn(async move { c.call("peer-a", &item.0.to_be_bytes(), 100, item).await })
}

fn one_lane() -> BatchLimits {
    BatchLimits {
        lanes: 1,
        ..BatchLimits::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_lane_sends_at_once_without_lingering() {
    let (c, peer) = peer(BatchLimits {
        linger: Duration::from_millis(50),
        ..one_lane()
    });
    let started = Instant::now();
    let first = call(&c, (1, 0));
    let batches = peer.wait_for(1).await;
    assert_eq!(batches[0].0, started, "an idle lane does not linger");
    assert_eq!(&*batches[0].1, "peer-a");
    assert_eq!(batches[0].2, vec![(1, 0)]);
    peer.gate.add_permits(1);
    assert_eq!(first.await.ok().and_then(Result::ok), Some((1, 0)));
}

#[tokio::test(start_paused = true)]
async fn what_arrives_while_a_batch_is_in_flight_goes_as_one_batch_in_order() {
    let (c, peer) = peer(one_lane());
    let first = call(&c, (1, 0));
    peer.wait_for(1).await;
    let waiting: Vec<_> = (0..10).map(|i| call(&c, (i % 3, i))).collect();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        peer.batches().len(),
        1,
        "nothing more while one is in flight"
    );
    peer.gate.add_permits(2);
    let batches = peer.wait_for(2).await;
    let expected: Vec<Item> = (0..10).map(|i| (i % 3, i)).collect();
    assert_eq!(batches[1].2, expected);
    assert!(first.await.is_ok());
    for (i, w) in (0..10).zip(waiting) {
        assert_eq!(w.await.ok().and_then(Result::ok), Some((i % 3, i)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_busy_lane_lingers_at_most_its_linger_and_not_when_full() {
    let linger = Duration::from_millis(5);
    let (c, peer) = peer(BatchLimits {
        linger,
        max_items: 4,
        ..one_lane()
    });
    let _first = call(&c, (1, 0));
    peer.wait_for(1).await;
    let _a = call(&c, (1, 1));
    tokio::task::yield_now().await;
    let answered = Instant::now();
    peer.gate.add_permits(1);
    let batches = peer.wait_for(2).await;
    assert_eq!(batches[1].0, answered + linger, "sent when the linger ends");
    assert_eq!(batches[1].2, vec![(1, 1)]);

    // A full batch waiting when the one in flight is answered goes at once.
    let waiting: Vec<_> = (2..6).map(|i| call(&c, (1, i))).collect();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let answered = Instant::now();
    peer.gate.add_permits(1);
    let batches = peer.wait_for(3).await;
    assert_eq!(batches[2].0, answered, "a full batch does not linger");
    assert_eq!(batches[2].2.len(), 4);
    peer.gate.add_permits(1);
    for w in waiting {
        assert!(w.await.is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn batches_respect_the_item_and_byte_bounds() {
    let (c, peer) = peer(BatchLimits {
        max_items: 3,
        max_bytes: 250,
        ..one_lane()
    });
    let _first = call(&c, (1, 0));
    peer.wait_for(1).await;
    // 7 items of 100 bytes: at most 2 per batch by bytes.
    let waiting: Vec<_> = (1..8).map(|i| call(&c, (1, i))).collect();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    peer.gate.add_permits(100);
    for w in waiting {
        assert!(w.await.is_ok());
    }
    let sizes: Vec<usize> = peer.batches().iter().map(|b| b.2.len()).collect();
    assert_eq!(sizes, vec![1, 2, 2, 2, 1]);
}

#[tokio::test(start_paused = true)]
async fn each_sender_keeps_its_order_across_lanes_and_batches() {
    let (c, peer) = peer(BatchLimits {
        max_items: 5,
        lanes: 3,
        ..BatchLimits::default()
    });
    let mut waiting = Vec::new();
    for round in 0..40u32 {
        for sender in 0..7u32 {
            waiting.push(call(&c, (sender, round)));
        }
        if round % 4 == 0 {
            peer.gate.add_permits(2);
        }
        tokio::task::yield_now().await;
    }
    peer.gate.add_permits(10_000);
    for w in waiting {
        assert!(w.await.is_ok());
    }
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 7];
    let batches = peer.batches();
    assert!(batches.len() > 7, "items were spread over many batches");
    for (_, _, items) in batches {
        for (sender, n) in items {
            seen[sender as usize].push(n);
        }
    }
    let expected: Vec<u32> = (0..40).collect();
    for order in seen {
        assert_eq!(order, expected);
    }
}

#[tokio::test(start_paused = true)]
async fn each_caller_gets_its_own_result_and_a_failed_call_fails_every_item() {
    let (c, peer) = peer(one_lane());
    let _first = call(&c, (1, 0));
    peer.wait_for(1).await;
    let good = call(&c, (1, 1));
    let bad = call(&c, (99, 1));
    tokio::task::yield_now().await;
    peer.gate.add_permits(2);
    assert_eq!(good.await.ok().and_then(Result::ok), Some((1, 1)));
    let e = bad.await.ok().and_then(Result::err);
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::InvalidRecipient));

    // The peer goes away: the whole batch fails, each caller is told.
    let a = call(&c, (1, 2));
    let b = call(&c, (2, 2));
    peer.wait_for(3).await;
    peer.gate.close();
    for w in [a, b] {
        let e = w.await.ok().and_then(Result::err);
        assert_eq!(e.map(|e| e.code), Some(ErrorCode::Internal));
    }
}

#[tokio::test(start_paused = true)]
async fn the_server_side_runs_one_senders_items_in_order_and_others_alongside() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let items: Vec<Item> = vec![(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)];
    let results = run_ordered(
        items,
        |item| item.0.to_be_bytes().to_vec(),
        |item| {
            let log = log.clone();
            async move {
                // Sender 1's items take longer: sender 2's must not wait.
                tokio::time::sleep(Duration::from_millis(if item.0 == 1 { 10 } else { 1 })).await;
                log.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(item);
                item.1 * 10 + item.0
            }
        },
    )
    .await;
    assert_eq!(results, vec![1, 2, 11, 12, 21]);
    let log = log.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert_eq!(log, vec![(2, 0), (2, 1), (1, 0), (1, 1), (1, 2)]);
}

#[tokio::test(start_paused = true)]
async fn an_item_whose_caller_gave_up_is_never_sent_after_its_callers_next_one() {
    let (c, peer) = peer(one_lane());
    let first = call(&c, (1, 0));
    peer.wait_for(1).await;
    // Queued behind the batch in flight; its caller times out and goes on
    // with its next item.
    let gave_up = call(&c, (2, 0));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gave_up.abort();
    assert!(gave_up.await.is_err(), "aborted");
    let next = call(&c, (2, 1));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    peer.gate.add_permits(2);
    let batches = peer.wait_for(2).await;
    assert_eq!(batches[1].2, vec![(2, 1)], "only the item still awaited");
    assert!(first.await.is_ok());
    assert_eq!(next.await.ok().and_then(Result::ok), Some((2, 1)));
    // Everything given up: the lane goes idle and serves the next call.
    let again = call(&c, (3, 0));
    peer.gate.add_permits(1);
    assert_eq!(again.await.ok().and_then(Result::ok), Some((3, 0)));
}

#[tokio::test(start_paused = true)]
async fn a_send_that_panics_fails_its_callers_and_leaves_the_lane_usable() {
    let send: BatchSend<Item, Item> = Arc::new(|_to, items: Vec<Item>| {
        Box::pin(async move {
            tokio::task::yield_now().await;
            assert!(items.iter().all(|i| i.0 != 7), "a batch with sender 7");
            Ok(items.into_iter().map(Ok).collect())
        })
    });
    let c = Coalescer::new(one_lane(), send);
    let doomed = call(&c, (7, 0));
    let e = doomed.await.ok().and_then(Result::err);
    assert_eq!(
        e.map(|e| e.code),
        Some(ErrorCode::Unavailable),
        "the caller of a batch whose send panicked is answered"
    );
    // The lane is idle again: the next call starts a new batch.
    let next = call(&c, (1, 0));
    let answer = tokio::time::timeout(Duration::from_secs(5), next).await;
    assert_eq!(
        answer.ok().and_then(Result::ok).and_then(Result::ok),
        Some((1, 0))
    );
}
