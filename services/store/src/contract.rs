//! The store contract: behaviour every [`Store`] backend must show. Run it
//! against a backend with [`store_contract_tests!`](crate::store_contract_tests).

use crate::{InboxKey, InboxMessage, MessageHeader, Store};

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
    let seqs = store
        .append(
            "app",
            &[
                message("app-1", "a"),
                message("app-2", "b"),
                message("app-1", "c"),
            ],
        )
        .await
        .expect("append");
    assert_eq!(seqs, vec![1, 1, 2]);
    let more = store
        .append("app", &[message("app-1", "d")])
        .await
        .expect("append");
    assert_eq!(more, vec![3]);
}

pub async fn fetch_pages_oldest_first(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let msgs: Vec<_> = (0..25).map(|i| message("app-1", &format!("{i}"))).collect();
    store.append("app", &msgs).await.expect("append");
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
    store
        .append("app", &[message("app-1", "x"), message("app-10", "y")])
        .await
        .expect("append");
    store
        .append("other", &[message("app-1", "z")])
        .await
        .expect("append");
    let page = store
        .fetch(&InboxKey::new("app", "app-1"), 0, 100)
        .await
        .expect("fetch");
    let contents: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["x"]);
}

pub async fn remove_returns_each_message_once(store: &impl Store) {
    let inbox = InboxKey::new("app", "app-1");
    let seqs = store
        .append("app", &[message("app-1", "a"), message("app-1", "b")])
        .await
        .expect("append");
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
    let seqs = store
        .append("app", &[message("app-1", "a")])
        .await
        .expect("append");
    store.remove(&inbox, &seqs, None).await.expect("remove");
    let next = store
        .append("app", &[message("app-1", "b")])
        .await
        .expect("append");
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
    let seqs = store
        .append("app", &[with_ref, message("app-1", "b")])
        .await
        .expect("append");
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
    let seqs = store
        .append("app", &[plain, with_ref])
        .await
        .expect("append");
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
    store.append("app", &[msg.clone()]).await.expect("append");
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
        tasks.push(store.append("app", one));
    }
    let results = futures_util::future::join_all(tasks).await;
    let mut seqs: Vec<u64> = results.into_iter().map(|r| r.expect("append")[0]).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    assert_eq!(store.count(&inbox).await.expect("count"), 200);
}

pub async fn remove_many_spans_inboxes(store: &impl Store) {
    let mut with_ref = message("app-1", "a");
    with_ref.reference = "r1".into();
    with_ref.from = "app-3".into();
    let seqs = store
        .append(
            "app",
            &[with_ref, message("app-1", "b"), message("app-2", "c")],
        )
        .await
        .expect("append");
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

/// Generates one `#[tokio::test]` per contract function. `$make` is an async
/// block expression yielding `(store, guard)`; the guard (a temp dir, a
/// keyspace) lives until the test ends.
#[macro_export]
macro_rules! store_contract_tests {
    ($make:expr) => {
        $crate::store_contract_tests!(@each $make;
            append_assigns_increasing_seqs_per_inbox,
            fetch_pages_oldest_first,
            inboxes_are_isolated,
            remove_returns_each_message_once,
            removal_appends_follow_ups_once,
            follow_ups_are_asked_only_about_referenced_messages,
            seqs_are_not_reused_after_emptying,
            content_round_trips_exactly,
            concurrent_appends_all_land,
            remove_many_spans_inboxes
        );
    };
    (@each $make:expr; $($name:ident),*) => {
        mod contract_suite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _guard) = $make;
                    $crate::contract::$name(&store).await;
                    $crate::Store::close(&store).await.expect("close");
                }
            )*
        }
    };
}
