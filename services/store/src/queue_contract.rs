//! The queue contract: behaviour every [`Queue`] engine must show, crash
//! included. Run it against an engine with
//! [`queue_contract_tests!`](crate::queue_contract_tests).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::StoreError;
use crate::queue::{MAX_PAYLOAD_BYTES, MAX_TAKE, Queue, QueueDepth};

/// Opens the engine's queues on a data dir.
pub type OpenQueues = fn(&Path) -> Arc<dyn Queue>;

/// Where the queues of an engine on a server live (a keyspace, a schema),
/// for [`queue_contract_tests!(harness = H)`](crate::queue_contract_tests).
#[allow(async_fn_in_trait)]
pub trait QueueHarness: Sized {
    /// Whether the server is there; `false` records a skip and every test
    /// passes without running.
    fn available() -> bool {
        true
    }

    /// A new, empty place for queues.
    async fn create() -> Self;

    /// Opens the queues kept here (again, after the last handle went).
    async fn open(&self) -> Arc<dyn Queue>;
}

fn payloads(range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    range.map(|n| n.to_be_bytes().to_vec()).collect()
}

fn number(payload: &[u8]) -> u64 {
    let bytes: [u8; 8] = payload.try_into().expect("an 8-byte payload");
    u64::from_be_bytes(bytes)
}

const LONG: Duration = Duration::from_secs(60);

pub async fn items_come_out_in_enqueue_order(q: &dyn Queue) {
    let a = q.enqueue("link-a", payloads(0..5)).await.expect("enqueue");
    let b = q.enqueue("link-a", payloads(5..12)).await.expect("enqueue");
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert!(a.last() < b.first(), "ids increase across batches");
    let items = q.take("link-a", 100, LONG).await.expect("take");
    let numbers: Vec<u64> = items.iter().map(|i| number(&i.payload)).collect();
    assert_eq!(numbers, (0..12).collect::<Vec<_>>());
    let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
    assert_eq!(ids, [a, b].concat());
    assert!(
        items
            .iter()
            .all(|i| i.attempts == 1 && i.enqueued_at_ms > 0)
    );
}

pub async fn taken_items_come_back_after_the_lease_in_order(q: &dyn Queue) {
    q.enqueue("hooks", payloads(0..6)).await.expect("enqueue");
    let lease = Duration::from_millis(300);
    let first = q.take("hooks", 2, lease).await.expect("take");
    let second = q.take("hooks", 2, lease).await.expect("take");
    let n =
        |items: &[crate::QueueItem]| items.iter().map(|i| number(&i.payload)).collect::<Vec<_>>();
    assert_eq!(n(&first), [0, 1]);
    assert_eq!(
        n(&second),
        [2, 3],
        "leased items are invisible to other takers"
    );
    q.ack("hooks", &[second[0].id, second[1].id])
        .await
        .expect("ack");
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let again = q.take("hooks", 10, LONG).await.expect("take");
    assert_eq!(
        n(&again),
        [0, 1, 4, 5],
        "the unacked batch again, first, in order"
    );
    assert_eq!(again[0].attempts, 2);
    assert_eq!(again[2].attempts, 1);
}

pub async fn ack_removes_once(q: &dyn Queue) {
    q.enqueue("out", payloads(0..4)).await.expect("enqueue");
    let items = q
        .take("out", 4, Duration::from_millis(100))
        .await
        .expect("take");
    let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
    assert_eq!(q.ack("out", &ids[..3]).await.expect("ack"), 3);
    assert_eq!(
        q.ack("out", &ids[..3]).await.expect("ack"),
        0,
        "already gone"
    );
    assert_eq!(q.depth("out").await.expect("depth"), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = q.take("out", 10, LONG).await.expect("take");
    assert_eq!(left.len(), 1);
    assert_eq!(number(&left[0].payload), 3);
    assert_eq!(
        q.ack("other", &[left[0].id]).await.expect("ack"),
        0,
        "per queue"
    );
    // An id repeated in one ack counts once: the rest stay and are taken.
    q.enqueue("twice", payloads(0..2)).await.expect("enqueue");
    let items = q.take("twice", 1, LONG).await.expect("take");
    assert_eq!(
        q.ack("twice", &[items[0].id, items[0].id])
            .await
            .expect("ack"),
        1
    );
    assert_eq!(q.depth("twice").await.expect("depth"), 1);
    let rest = q.take("twice", 10, LONG).await.expect("take");
    assert_eq!(rest.len(), 1, "the other item is still handed out");
    assert_eq!(number(&rest[0].payload), 1);
}

pub async fn depth_and_list_count_every_queue(q: &dyn Queue) {
    assert_eq!(q.depth("never").await.expect("depth"), 0);
    assert!(q.list().await.expect("list").is_empty());
    q.enqueue("b-link", payloads(0..3)).await.expect("enqueue");
    q.enqueue("a-hooks", payloads(0..2)).await.expect("enqueue");
    let taken = q.take("b-link", 1, LONG).await.expect("take");
    assert_eq!(
        q.depth("b-link").await.expect("depth"),
        3,
        "taken is not acked"
    );
    q.ack("b-link", &[taken[0].id]).await.expect("ack");
    let list = q.list().await.expect("list");
    let want = |name: &str, depth| QueueDepth {
        name: name.into(),
        depth,
    };
    assert_eq!(list, [want("a-hooks", 2), want("b-link", 2)]);
}

pub async fn bounds_are_enforced(q: &dyn Queue) {
    let invalid = |r: Result<Vec<u64>, StoreError>| matches!(r, Err(StoreError::Invalid(_)));
    assert!(invalid(q.enqueue("", payloads(0..1)).await));
    assert!(invalid(q.enqueue(&"n".repeat(300), payloads(0..1)).await));
    assert!(invalid(
        q.enqueue("big", vec![vec![0; MAX_PAYLOAD_BYTES + 1]]).await
    ));
    assert_eq!(
        q.depth("big").await.expect("depth"),
        0,
        "nothing of it written"
    );
    q.enqueue("many", payloads(0..1_000))
        .await
        .expect("enqueue");
    q.enqueue("many", payloads(1_000..1_500))
        .await
        .expect("enqueue");
    let items = q.take("many", 10_000, LONG).await.expect("take");
    assert_eq!(items.len(), MAX_TAKE);
    assert!(q.take("many", 0, LONG).await.expect("take").is_empty());
    // A lease past any clock's range is cut, not a panic.
    q.enqueue("forever", payloads(0..1)).await.expect("enqueue");
    let held = q.take("forever", 1, Duration::MAX).await.expect("take");
    assert_eq!(held.len(), 1);
    assert!(q.take("forever", 1, LONG).await.expect("take").is_empty());
}

pub async fn concurrent_enqueues_all_land_whole_and_in_order(q: &dyn Queue) {
    // 50 callers at once (they share syncs): each batch stays contiguous
    // and in order, and the queue's order is the order of the ids.
    let calls: Vec<_> = (0..50u64)
        .map(|b| q.enqueue("fan-in", payloads(b * 4..b * 4 + 4)))
        .collect();
    let results = futures_util::future::join_all(calls).await;
    for ids in results {
        let ids = ids.expect("enqueue");
        assert!(ids.windows(2).all(|w| w[0] + 1 == w[1]), "{ids:?}");
    }
    let items = q.take("fan-in", MAX_TAKE, LONG).await.expect("take");
    assert_eq!(items.len(), 200);
    assert!(items.windows(2).all(|w| w[0].id < w[1].id));
    for batch in items.chunks(4) {
        let first = number(&batch[0].payload);
        assert_eq!(first % 4, 0);
        let numbers: Vec<u64> = batch.iter().map(|i| number(&i.payload)).collect();
        assert_eq!(numbers, (first..first + 4).collect::<Vec<_>>());
    }
}

pub async fn items_and_ids_survive_reopening(open: OpenQueues, dir: &Path) {
    items_and_ids_survive_reopening_by(async || open(dir)).await;
}

/// [`items_and_ids_survive_reopening`] with any way of opening.
pub async fn items_and_ids_survive_reopening_by(open: impl AsyncFn() -> Arc<dyn Queue>) {
    {
        let q = open().await;
        let ids = q.enqueue("link", payloads(0..3)).await.expect("enqueue");
        let taken = q.take("link", 1, LONG).await.expect("take");
        q.ack("link", &[taken[0].id]).await.expect("ack");
        q.enqueue("drained", payloads(0..1)).await.expect("enqueue");
        let last = q.take("drained", 1, LONG).await.expect("take");
        q.ack("drained", &[last[0].id]).await.expect("ack");
        assert_eq!(ids.len(), 3);
    }
    // Fjall's writer lets go of the database shortly after its handle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let q = open().await;
    // Leases do not survive a restart: everything unacked is visible.
    let items = q.take("link", 10, LONG).await.expect("take");
    let numbers: Vec<u64> = items.iter().map(|i| number(&i.payload)).collect();
    assert_eq!(numbers, [1, 2]);
    let list = q.list().await.expect("list");
    assert_eq!(list.len(), 2, "{list:?}");
    // An emptied queue does not give its ids again.
    let again = q
        .enqueue("drained", payloads(9..10))
        .await
        .expect("enqueue");
    assert!(again[0] >= 1, "id {} reused", again[0]);
}

/// The environment variable that makes the test binary the child of
/// [`enqueued_items_survive_kill_9`]: the data dir.
pub const CRASH_CHILD: &str = "SWITCHBOARD_QUEUE_CRASH_CHILD";

/// The child: enqueues numbered items in batches and acks some, printing
/// what each call returned, until it is killed.
fn crash_child(open: OpenQueues, dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let q = open(dir);
        let mut next = 0u64;
        for round in 0..100_000u64 {
            q.enqueue("link", payloads(next..next + 20))
                .await
                .expect("enqueue");
            println!("enqueued {next} {}", next + 19);
            next += 20;
            if round % 3 == 2 {
                let items = q.take("link", 15, LONG).await.expect("take");
                let ids: Vec<u64> = items.iter().map(|i| i.id).collect();
                let numbers: Vec<String> = items
                    .iter()
                    .map(|i| number(&i.payload).to_string())
                    .collect();
                // Said before the call: once it is made, the items may be
                // gone whether or not the kill lets it return.
                println!("acking {}", numbers.join(" "));
                q.ack("link", &ids).await.expect("ack");
                println!("acked {}", numbers.join(" "));
            }
        }
    });
}

/// Re-executes this test (`test_path`, its path in the test binary) as a
/// child that enqueues and acks in `dir`, kills it with SIGKILL mid-way,
/// reopens the queue and checks that every item whose enqueue returned is
/// there unless its ack returned, in order.
pub fn enqueued_items_survive_kill_9(open: OpenQueues, test_path: &str, dir: &Path) {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        crash_child(open, Path::new(&dir));
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args([test_path, "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut enqueued = BTreeSet::new();
    // Items whose ack was asked for: after the kill they may be there or not.
    let mut acking = BTreeSet::new();
    let mut acked = 0;
    let mut batches = 0;
    let mut lines = BufReader::new(stdout).lines();
    let mut read = |line: String, batches: &mut u32| {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("enqueued") => {
                let from: u64 = words.next().and_then(|w| w.parse().ok()).expect("from");
                let to: u64 = words.next().and_then(|w| w.parse().ok()).expect("to");
                enqueued.extend(from..=to);
                *batches += 1;
            }
            Some("acking") => acking.extend(words.map(|w| w.parse::<u64>().expect("number"))),
            Some("acked") => acked += 1,
            _ => {}
        }
    };
    for line in lines.by_ref() {
        read(line.expect("child output"), &mut batches);
        if batches == 60 {
            break;
        }
    }
    // Mid-way: the child is enqueueing or acking right now.
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert_eq!(batches, 60, "the child stopped early");
    // What the child said before it died, still in the pipe: the child runs
    // ahead of this reader, so its latest acks are only known from here.
    for line in lines.map_while(Result::ok) {
        read(line, &mut batches);
    }
    assert!(acked > 0);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let q = open(dir);
        let mut found = Vec::new();
        loop {
            let items = q.take("link", MAX_TAKE, LONG).await.expect("take");
            if items.is_empty() {
                break;
            }
            found.extend(items.iter().map(|i| number(&i.payload)));
        }
        assert!(
            found.windows(2).all(|w| w[0] < w[1]),
            "order holds: {found:?}"
        );
        let found: BTreeSet<u64> = found.into_iter().collect();
        let lost: Vec<&u64> = enqueued
            .difference(&acking)
            .filter(|n| !found.contains(n))
            .collect();
        assert!(lost.is_empty(), "enqueued, never acked, lost: {lost:?}");
        assert_eq!(q.depth("link").await.expect("depth"), found.len() as u64);
    });
}

/// Generates the queue contract tests for an engine. `$open` is a
/// `fn(&Path) -> Arc<dyn Queue>` (a closure without captures) opening the
/// engine's queues on a data dir. An engine on a server gives a
/// [`QueueHarness`] instead: `queue_contract_tests!(harness = H)` runs the
/// same tests in a fresh place each (the kill -9 test is the embedded
/// engine's: a server's durability does not depend on the client process).
#[macro_export]
macro_rules! queue_contract_tests {
    (harness = $harness:ty) => {
        $crate::queue_contract_tests!(@names harness $harness);
    };
    (@names $how:ident $arg:tt) => {
        $crate::queue_contract_tests!(@$how $arg;
            items_come_out_in_enqueue_order,
            taken_items_come_back_after_the_lease_in_order,
            ack_removes_once,
            depth_and_list_count_every_queue,
            bounds_are_enforced,
            concurrent_enqueues_all_land_whole_and_in_order
        );
    };
    (@harness $harness:ty; $($name:ident),*) => {
        mod queue_contract_suite {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[tokio::test]
                async fn $name() {
                    if !<$harness as $crate::queue_contract::QueueHarness>::available() {
                        return;
                    }
                    let place = <$harness as $crate::queue_contract::QueueHarness>::create().await;
                    let queues = $crate::queue_contract::QueueHarness::open(&place).await;
                    $crate::queue_contract::$name(&*queues).await;
                }
            )*

            #[tokio::test]
            async fn items_and_ids_survive_reopening() {
                if !<$harness as $crate::queue_contract::QueueHarness>::available() {
                    return;
                }
                let place = <$harness as $crate::queue_contract::QueueHarness>::create().await;
                $crate::queue_contract::items_and_ids_survive_reopening_by(async || {
                    $crate::queue_contract::QueueHarness::open(&place).await
                })
                .await;
            }
        }
    };
    ($open:expr) => {
        $crate::queue_contract_tests!(@names each $open);
    };
    (@each $open:expr; $($name:ident),*) => {
        mod queue_contract_suite {
            #[allow(unused_imports)]
            use super::*;

            const OPEN: $crate::queue_contract::OpenQueues = $open;

            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let queues = OPEN(dir.path());
                    $crate::queue_contract::$name(&*queues).await;
                }
            )*

            #[tokio::test]
            async fn items_and_ids_survive_reopening() {
                let dir = tempfile::tempdir().expect("tempdir");
                $crate::queue_contract::items_and_ids_survive_reopening(OPEN, dir.path()).await;
            }

            #[test]
            fn enqueued_items_survive_kill_9() {
                // This test's path in the test binary, for the child.
                let module = module_path!();
                let path = module.split_once("::").map_or(module, |(_, rest)| rest);
                let dir = tempfile::tempdir().expect("tempdir");
                $crate::queue_contract::enqueued_items_survive_kill_9(
                    OPEN,
                    &format!("{path}::enqueued_items_survive_kill_9"),
                    dir.path(),
                );
            }
        }
    };
}
