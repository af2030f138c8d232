//! The store contract: behaviour every [`Store`] engine must show. Run it
//! against an engine with [`store_contract_tests!`](crate::store_contract_tests),
//! given a [`Harness`] that creates an empty store and opens it again.

use std::time::Duration;

use crate::{Appended, InboxKey, InboxMessage, MessageHeader, Store};

/// Where a store under test keeps its data (a temp dir, a keyspace, a
/// schema): the suite opens it, closes it and opens it again over the same
/// data, with the id window it chooses.
#[allow(async_fn_in_trait)]
pub trait Harness: Sized {
    type Store: Store;

    /// A new, empty place for a store.
    async fn create() -> Self;

    /// Opens the store kept here (again, after a close).
    async fn open(&self, id_window: Duration) -> Self::Store;
}

/// The id window of the tests that do not test it.
pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Appends messages without client ids and returns their sequence numbers.
pub async fn stored(store: &impl Store, app_id: &str, messages: &[InboxMessage]) -> Vec<u64> {
    store
        .append(app_id, messages, &[])
        .await
        .expect("append")
        .into_iter()
        .map(|a| {
            a.seq()
                .expect("a message without a client id is never a repeat")
        })
        .collect()
}

/// A message for `to`, for tests.
pub fn message(to: &str, content: &str) -> InboxMessage {
    InboxMessage {
        id: format!("id-{content}"),
        from: "a-sender".into(),
        to: to.into(),
        content: content.into(),
        ts: 1,
        ..Default::default()
    }
}

pub async fn append_assigns_increasing_seqs_per_inbox(store: &impl Store) {
    let seqs = stored(
        store,
        "app",
        &[
            message("app-1", "a"),
            message("app-2", "b"),
            message("app-1", "c"),
        ],
    )
    .await;
    // Increasing per inbox, in the order given; gaps are allowed.
    assert!(seqs[0] < seqs[2], "{seqs:?}");
    assert!(seqs.iter().all(|&s| s > 0));
    let more = stored(store, "app", &[message("app-1", "d")]).await;
    assert!(more[0] > seqs[2], "{more:?} after {seqs:?}");
}

pub async fn fetch_pages_oldest_first(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let msgs: Vec<_> = (0..25).map(|i| message("app-1", &format!("{i}"))).collect();
    stored(store, "app", &msgs).await;
    let first = store.fetch(&inbox, 0, 10).await.expect("fetch");
    assert_eq!(first.messages.len(), 10);
    assert_eq!(first.left, 15);
    assert_eq!(first.messages[0].content, "0");
    assert_eq!(first.messages[9].content, "9");
    let last_seq = first.messages[9].seq;
    let second = store.fetch(&inbox, last_seq, 10).await.expect("fetch");
    assert_eq!(second.messages[0].content, "10");
    assert_eq!(second.left, 5);
    let rest = store.fetch(&inbox, 0, 100).await.expect("fetch");
    assert_eq!(rest.messages.len(), 25);
    assert_eq!(rest.left, 0);
    assert_eq!(store.count(&inbox).await.expect("count"), 25);
}

pub async fn inboxes_are_isolated(store: &impl Store) {
    stored(
        store,
        "app",
        &[message("app-1", "x"), message("app-10", "y")],
    )
    .await;
    stored(store, "other", &[message("app-1", "z")]).await;
    let page = store
        .fetch(&InboxKey::new("app", "app-1"), 0, 100)
        .await
        .expect("fetch");
    let contents: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["x"]);
}

pub async fn remove_returns_each_message_once(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let seqs = stored(
        store,
        "app",
        &[message("app-1", "a"), message("app-1", "b")],
    )
    .await;
    let removed = store
        .remove(&inbox, &seqs[..1], None)
        .await
        .expect("remove")
        .removed;
    assert_eq!(removed, vec![seqs[0]], "the message that was there");
    let again = store
        .remove(&inbox, &seqs[..1], None)
        .await
        .expect("remove");
    assert!(again.removed.is_empty());
    let page = store.fetch(&inbox, 0, 10).await.expect("fetch");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].content, "b");
}

pub async fn seqs_are_not_reused_after_emptying(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let seqs = stored(store, "app", &[message("app-1", "a")]).await;
    store.remove(&inbox, &seqs, None).await.expect("remove");
    let next = stored(store, "app", &[message("app-1", "b")]).await;
    assert!(next[0] > seqs[0]);
}

fn confirm(msg: &MessageHeader<'_>) -> Option<InboxMessage> {
    (!msg.reference.is_empty()).then(|| InboxMessage {
        id: msg.id.to_owned(),
        from: msg.to.to_owned(),
        to: msg.from.to_owned(),
        reference: msg.reference.to_owned(),
        ..Default::default()
    })
}

pub async fn removal_appends_follow_ups_once(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let mut with_ref = message("app-1", "a");
    with_ref.reference = "r1".into();
    with_ref.from = "app-2".into();
    let id = with_ref.id.clone();
    let seqs = stored(store, "app", &[with_ref, message("app-1", "b")]).await;
    let removal = store
        .remove(&inbox, &seqs, Some(confirm))
        .await
        .expect("remove");
    assert_eq!(removal.removed, seqs);
    assert_eq!(
        removal.appended.len(),
        1,
        "only the message with a reference"
    );
    // Built from the removed message's header.
    assert_eq!(removal.appended[0].to, "app-2");
    assert_eq!(removal.appended[0].from, "app-1");
    assert_eq!(removal.appended[0].reference, "r1");
    assert_eq!(removal.appended[0].id, id);
    assert!(removal.appended[0].seq > 0);
    let again = store
        .remove(&inbox, &seqs, Some(confirm))
        .await
        .expect("remove");
    assert!(
        again.appended.is_empty(),
        "a second removal confirms nothing"
    );
    let sender = store
        .fetch(&InboxKey::new("app", "app-2"), 0, 10)
        .await
        .expect("fetch");
    assert_eq!(sender.messages.len(), 1);
    assert_eq!(sender.messages[0].reference, "r1");
    assert_eq!(sender.messages[0].seq, removal.appended[0].seq);
}

/// Would confirm any message: the store must not ask it about one without
/// a reference.
pub fn confirm_any(msg: &MessageHeader<'_>) -> Option<InboxMessage> {
    Some(InboxMessage {
        id: msg.id.to_owned(),
        from: msg.to.to_owned(),
        to: msg.from.to_owned(),
        ..Default::default()
    })
}

pub async fn follow_ups_are_asked_only_about_referenced_messages(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let mut with_ref = message("app-1", "a");
    with_ref.reference = "r1".into();
    with_ref.from = "app-2".into();
    let mut plain = message("app-1", "b");
    plain.from = "app-3".into();
    let seqs = stored(store, "app", &[plain, with_ref]).await;
    let removal = store
        .remove(&inbox, &seqs, Some(confirm_any))
        .await
        .expect("remove");
    assert_eq!(removal.removed, seqs);
    let to: Vec<&str> = removal.appended.iter().map(|m| m.to.as_str()).collect();
    assert_eq!(
        to,
        ["app-2"],
        "only the message with a reference is followed up"
    );
    let plain_sender = store
        .fetch(&InboxKey::new("app", "app-3"), 0, 10)
        .await
        .expect("fetch");
    assert!(plain_sender.messages.is_empty());
}

pub async fn content_round_trips_exactly(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let content = "héllo \"quoted\" \\ \u{0} \u{1f} 👋 \n\t end";
    let mut msg = message("app-1", content);
    msg.reference = "ref-1".into();
    msg.group = "g".into();
    stored(store, "app", &[msg.clone()]).await;
    let page = store.fetch(&inbox, 0, 1).await.expect("fetch");
    let got = &page.messages[0];
    assert_eq!(got.content, content);
    assert_eq!(got.reference, "ref-1");
    assert_eq!(got.group, "g");
    assert_eq!(got.id, msg.id);
}

pub async fn concurrent_appends_all_land(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let msgs: Vec<_> = (0..200)
        .map(|i| [message("app-1", &format!("{i}"))])
        .collect();
    let mut tasks = Vec::new();
    for one in &msgs {
        tasks.push(stored(store, "app", one));
    }
    let results = futures_util::future::join_all(tasks).await;
    let mut seqs: Vec<u64> = results.into_iter().map(|r| r[0]).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    assert_eq!(store.count(&inbox).await.expect("count"), 200);
}

pub async fn remove_many_spans_inboxes(store: &impl Store) {
    let mut with_ref = message("app-1", "a");
    with_ref.reference = "r1".into();
    with_ref.from = "app-3".into();
    let seqs = stored(
        store,
        "app",
        &[with_ref, message("app-1", "b"), message("app-2", "c")],
    )
    .await;
    let (one, two) = (InboxKey::new("app", "app-1"), InboxKey::new("app", "app-2"));
    let removals = store
        .remove_many(
            vec![
                (one.clone(), vec![seqs[0]]),
                (two.clone(), vec![seqs[2], 99]),
            ],
            Some(confirm),
        )
        .await
        .expect("remove_many");
    assert_eq!(removals.len(), 2, "one result per inbox, in order");
    assert_eq!(removals[0].removed, vec![seqs[0]]);
    assert_eq!(removals[0].appended.len(), 1, "the confirmation of a");
    assert_eq!(
        removals[1].removed,
        vec![seqs[2]],
        "an unknown seq removes nothing"
    );
    assert!(removals[1].appended.is_empty());
    let again = store
        .remove_many(vec![(one.clone(), vec![seqs[0]])], Some(confirm))
        .await
        .expect("remove_many");
    assert!(again[0].removed.is_empty() && again[0].appended.is_empty());
    assert_eq!(store.count(&one).await.expect("count"), 1);
    assert_eq!(store.count(&two).await.expect("count"), 0);
    let sender = store
        .fetch(&InboxKey::new("app", "app-3"), 0, 10)
        .await
        .expect("fetch");
    assert_eq!(sender.messages.len(), 1);
    assert_eq!(sender.messages[0].reference, "r1");
}

/// A message from `from` with a client-given id.
fn sent(from: &str, id: &str, to: &str) -> InboxMessage {
    InboxMessage {
        id: id.into(),
        from: from.into(),
        to: to.into(),
        content: format!("{id} to {to}"),
        ts: 1,
        ..Default::default()
    }
}

/// Appends one send with a client id (its copies: one per recipient).
async fn send(store: &impl Store, copies: &[InboxMessage]) -> Vec<Appended> {
    store
        .append("app", copies, &vec![true; copies.len()])
        .await
        .expect("append")
}

pub async fn a_client_id_is_stored_once_per_sender(store: &impl Store) {
    let first = send(store, &[sent("app-ann", "m-1", "app-bob")]).await;
    assert!(matches!(first[..], [Appended::Stored(_)]), "{first:?}");
    let again = send(store, &[sent("app-ann", "m-1", "app-bob")]).await;
    assert_eq!(again, [Appended::Repeat]);
    // The index is per sender (and per app); a server-assigned id is not
    // indexed at all.
    let other = send(store, &[sent("app-cid", "m-1", "app-bob")]).await;
    assert!(matches!(other[..], [Appended::Stored(_)]), "{other:?}");
    let other_app = store
        .append("other", &[sent("app-ann", "m-1", "app-bob")], &[true])
        .await
        .expect("append");
    assert!(matches!(other_app[..], [Appended::Stored(_)]));
    let plain = [sent("app-ann", "m-1", "app-bob")];
    stored(store, "app", &plain).await;
    let inbox = InboxKey::new("app", "app-bob");
    assert_eq!(store.count(&inbox).await.expect("count"), 3);
}

pub async fn a_group_send_is_one_index_entry(store: &impl Store) {
    let copies = [
        sent("app-ann", "g-1", "app-bob"),
        sent("app-ann", "g-1", "app-cid"),
    ];
    let first = send(store, &copies).await;
    assert!(
        first.iter().all(|a| matches!(a, Appended::Stored(_))),
        "every copy of a new send: {first:?}"
    );
    assert_eq!(send(store, &copies).await, [Appended::Repeat; 2]);
    // A second copy for the same recipient in one call is a repeat; a mixed
    // call answers each message.
    let mixed = [
        sent("app-ann", "d-1", "app-bob"),
        sent("app-ann", "d-1", "app-bob"),
        sent("app-ann", "g-1", "app-dan"),
    ];
    let answers = send(store, &mixed).await;
    assert!(matches!(answers[0], Appended::Stored(_)), "{answers:?}");
    assert_eq!(answers[1..], [Appended::Repeat, Appended::Repeat]);
    for (user, want) in [("app-bob", 2), ("app-cid", 1), ("app-dan", 0)] {
        let count = store
            .count(&InboxKey::new("app", user))
            .await
            .expect("count");
        assert_eq!(count, want, "{user}");
    }
}

pub async fn concurrent_appends_of_one_client_id_store_it_once(store: &impl Store) {
    let one = [sent("app-ann", "race", "app-bob")];
    let tasks: Vec<_> = (0..20).map(|_| send(store, &one)).collect();
    let answers: Vec<Appended> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let stored = answers
        .iter()
        .filter(|a| matches!(a, Appended::Stored(_)))
        .count();
    assert_eq!(stored, 1, "{answers:?}");
    let inbox = InboxKey::new("app", "app-bob");
    assert_eq!(store.count(&inbox).await.expect("count"), 1);
}

pub async fn a_follow_up_written_twice_is_stored_once(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let mut with_ref = message("app-1", "a");
    with_ref.reference = "r1".into();
    with_ref.from = "app-2".into();
    let seqs = stored(store, "app", &[with_ref]).await;
    // Two removals racing, then a retried one.
    let racing = futures_util::future::join(
        store.remove(&inbox, &seqs, Some(confirm)),
        store.remove(&inbox, &seqs, Some(confirm)),
    )
    .await;
    let (one, two) = (racing.0.expect("remove"), racing.1.expect("remove"));
    assert_eq!(one.removed.len() + two.removed.len(), 1, "removed once");
    let retried = store
        .remove(&inbox, &seqs, Some(confirm))
        .await
        .expect("remove");
    assert!(retried.removed.is_empty());
    let sender = store
        .fetch(&InboxKey::new("app", "app-2"), 0, 10)
        .await
        .expect("fetch");
    assert_eq!(sender.messages.len(), 1, "one confirmation");
    assert_eq!(sender.messages[0].reference, "r1");
}

pub async fn seqs_increase_across_a_reopen<H: Harness>(place: &H) {
    let inbox = InboxKey::new("app", "app-1");
    let store = place.open(DAY).await;
    let before = stored(
        &store,
        "app",
        &[message("app-1", "a"), message("app-1", "b")],
    )
    .await;
    // An emptied inbox too.
    store.remove(&inbox, &before, None).await.expect("remove");
    store.close().await.expect("close");
    drop(store);
    let store = place.open(DAY).await;
    let after = stored(&store, "app", &[message("app-1", "c")]).await;
    assert!(after[0] > before[1], "{after:?} after {before:?}");
    store.close().await.expect("close");
}

pub async fn the_id_index_outlives_a_reopen_and_forgets_after_the_window<H: Harness>(place: &H) {
    let window = Duration::from_secs(1);
    let one = [sent("app-ann", "w-1", "app-bob")];
    let store = place.open(window).await;
    let accepted = std::time::Instant::now();
    assert!(matches!(
        send(&store, &one).await[..],
        [Appended::Stored(_)]
    ));
    store.close().await.expect("close");
    drop(store);
    let store = place.open(window).await;
    let again = send(&store, &one).await;
    // Only meaningful within the window (a stalled machine may pass it).
    if accepted.elapsed() < window {
        assert_eq!(again, [Appended::Repeat], "after a reopen");
    }
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    let later = send(&store, &one).await;
    assert!(
        matches!(later[..], [Appended::Stored(_)]),
        "forgotten after the window: {later:?}"
    );
    let inbox = InboxKey::new("app", "app-bob");
    let want = if again == [Appended::Repeat] { 2 } else { 3 };
    assert_eq!(store.count(&inbox).await.expect("count"), want);
    store.close().await.expect("close");
}

/// Generates one `#[tokio::test]` per contract function, for an engine
/// given by its [`Harness`] type: a new engine runs the whole suite with
/// one line, `store_contract_tests!(MyHarness);`.
#[macro_export]
macro_rules! store_contract_tests {
    ($harness:ty) => {
        $crate::store_contract_tests!($harness, ready = || true);
    };
    // `ready` says whether the engine's service is there (a shared
    // database named by an environment variable); a test skips when not.
    ($harness:ty, ready = $ready:expr) => {
        $crate::store_contract_tests!(@each $harness; $ready;
            store: [
                append_assigns_increasing_seqs_per_inbox,
                fetch_pages_oldest_first,
                inboxes_are_isolated,
                remove_returns_each_message_once,
                removal_appends_follow_ups_once,
                follow_ups_are_asked_only_about_referenced_messages,
                seqs_are_not_reused_after_emptying,
                content_round_trips_exactly,
                concurrent_appends_all_land,
                remove_many_spans_inboxes,
                a_client_id_is_stored_once_per_sender,
                a_group_send_is_one_index_entry,
                concurrent_appends_of_one_client_id_store_it_once,
                a_follow_up_written_twice_is_stored_once
            ],
            reopened: [
                seqs_increase_across_a_reopen,
                the_id_index_outlives_a_reopen_and_forgets_after_the_window
            ]
        );
    };
    (@each $harness:ty; $ready:expr; store: [$($name:ident),*], reopened: [$($again:ident),*]) => {
        mod contract_suite {
            #[allow(unused_imports)]
            use super::*;
            use $crate::contract::Harness as _;
            const READY: fn() -> bool = $ready;
            $(
                #[tokio::test]
                async fn $name() {
                    if !READY() {
                        return;
                    }
                    let place = <$harness>::create().await;
                    let store = place.open($crate::contract::DAY).await;
                    $crate::contract::$name(&store).await;
                    $crate::Store::close(&store).await.expect("close");
                }
            )*
            $(
                #[tokio::test]
                async fn $again() {
                    if !READY() {
                        return;
                    }
                    let place = <$harness>::create().await;
                    $crate::contract::$again(&place).await;
                }
            )*
        }
    };
}
