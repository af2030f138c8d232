//! The presence contract: behaviour every [`Presence`] backend must show.
//! Backends with gateway liveness (Redis) must have gateways `g1` and `g2`
//! alive before these run.

use crate::Presence;

pub async fn first_and_last_connection_across_gateways(p: &impl Presence) {
    assert!(p.connect("a", "a-1", "g1").await.expect("c").user_changed);
    assert!(!p.connect("a", "a-1", "g1").await.expect("c").user_changed);
    assert!(!p.connect("a", "a-1", "g2").await.expect("c").user_changed);
    let mut gws = p.gateways("a", "a-1").await.expect("g");
    gws.sort();
    assert_eq!(gws, vec![("g1".to_owned(), 2), ("g2".to_owned(), 1)]);
    // Another user and another app are separate.
    assert!(p.gateways("a", "a-2").await.expect("g").is_empty());
    assert!(p.gateways("b", "a-1").await.expect("g").is_empty());
    assert!(
        !p.disconnect("a", "a-1", "g1")
            .await
            .expect("d")
            .user_changed
    );
    assert!(
        !p.disconnect("a", "a-1", "g2")
            .await
            .expect("d")
            .user_changed
    );
    assert_eq!(
        p.gateways("a", "a-1").await.expect("g"),
        vec![("g1".to_owned(), 1)]
    );
    assert!(
        p.disconnect("a", "a-1", "g1")
            .await
            .expect("d")
            .user_changed
    );
    assert!(p.gateways("a", "a-1").await.expect("g").is_empty());
}

pub async fn stray_disconnect_changes_nothing(p: &impl Presence) {
    assert!(
        !p.disconnect("a", "a-9", "g1")
            .await
            .expect("d")
            .user_changed
    );
    assert!(p.connect("a", "a-9", "g1").await.expect("c").user_changed);
    // A disconnect from a gateway that holds no connection of the user.
    assert!(
        !p.disconnect("a", "a-9", "g2")
            .await
            .expect("d")
            .user_changed
    );
    assert_eq!(
        p.gateways("a", "a-9").await.expect("g"),
        vec![("g1".to_owned(), 1)]
    );
}

/// The batch lookup gives, user by user and in order, what single lookups
/// give: repeats, unknown users and another app's users included, and
/// across more than one round trip's worth of users.
pub async fn batch_lookup_matches_single_lookups(p: &impl Presence) {
    assert!(p.gateways_batch("a", &[]).await.expect("b").is_empty());
    p.connect("a", "a-b1", "g1").await.expect("c");
    p.connect("a", "a-b1", "g2").await.expect("c");
    p.connect("a", "a-b1", "g2").await.expect("c");
    p.connect("a", "a-b2", "g2").await.expect("c");
    p.connect("b", "a-b3", "g1").await.expect("c");
    let users = ["a-b1", "a-none", "a-b2", "a-b3", "a-b1"];
    let mut got = p.gateways_batch("a", &users).await.expect("batch");
    for g in &mut got {
        g.sort();
    }
    let g = |list: &[(&str, u32)]| -> Vec<(String, u32)> {
        list.iter().map(|(gw, n)| ((*gw).to_owned(), *n)).collect()
    };
    assert_eq!(
        got,
        vec![
            g(&[("g1", 1), ("g2", 2)]),
            g(&[]),
            g(&[("g2", 1)]),
            g(&[]), // a user of another app
            g(&[("g1", 1), ("g2", 2)]),
        ]
    );
    // More users than one round trip takes: still in order.
    let many: Vec<String> = (0..crate::MAX_BATCH + 5)
        .map(|i| format!("a-m{i}"))
        .collect();
    p.connect("a", &many[crate::MAX_BATCH + 2], "g1")
        .await
        .expect("c");
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let got = p.gateways_batch("a", &refs).await.expect("batch");
    assert_eq!(got.len(), many.len());
    for (i, gws) in got.iter().enumerate() {
        if i == crate::MAX_BATCH + 2 {
            assert_eq!(gws, &g(&[("g1", 1)]));
        } else {
            assert!(gws.is_empty(), "{i}: {gws:?}");
        }
    }
}

/// The change stream: a user's first connection and last disconnection,
/// once each, whichever gateways they are on; nothing in between.
pub async fn changes_are_announced_once_per_transition(p: &impl Presence) {
    use crate::PresenceChange;
    let mut changes = p.changes();
    // A backend whose stream starts listening in the background (Redis
    // pub/sub) is warmed up first: a probe user comes and goes until a
    // change of theirs is seen.
    let mut seen = false;
    for _ in 0..100 {
        p.connect("c", "c-probe", "g1").await.expect("c");
        p.disconnect("c", "c-probe", "g1").await.expect("d");
        if let Ok(Ok(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), changes.recv()).await
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the change stream never delivered");
    p.connect("c", "c-1", "g1").await.expect("c");
    p.connect("c", "c-1", "g2").await.expect("c");
    p.disconnect("c", "c-1", "g1").await.expect("d");
    p.disconnect("c", "c-1", "g2").await.expect("d");
    p.connect("c", "c-sentinel", "g1").await.expect("c");
    let mut got = Vec::new();
    loop {
        let change = tokio::time::timeout(std::time::Duration::from_secs(15), changes.recv())
            .await
            .expect("a change in time")
            .expect("stream open");
        if change.user_id == "c-probe" {
            continue; // the warm-up's tail
        }
        if change.user_id == "c-sentinel" {
            break;
        }
        got.push(change);
    }
    let change = |online| PresenceChange {
        app_id: "c".into(),
        user_id: "c-1".into(),
        online,
    };
    assert_eq!(got, vec![change(true), change(false)]);
}

/// The online users of an app: sorted, capped, and only that app's.
pub async fn user_list_is_sorted_and_capped(p: &impl Presence) {
    assert_eq!(
        p.online_users("u", 10).await.expect("list"),
        (vec![], false)
    );
    for (user, gw) in [("u-3", "g1"), ("u-1", "g2"), ("u-2", "g1"), ("u-1", "g1")] {
        p.connect("u", user, gw).await.expect("c");
    }
    p.connect("v", "u-0", "g1").await.expect("c");
    let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        p.online_users("u", 10).await.expect("list"),
        (names(&["u-1", "u-2", "u-3"]), false)
    );
    assert_eq!(
        p.online_users("u", 3).await.expect("list"),
        (names(&["u-1", "u-2", "u-3"]), false)
    );
    assert_eq!(
        p.online_users("u", 2).await.expect("list"),
        (names(&["u-1", "u-2"]), true)
    );
    // Online while any connection is.
    p.disconnect("u", "u-1", "g1").await.expect("d");
    assert_eq!(
        p.online_users("u", 2).await.expect("list").0,
        names(&["u-1", "u-2"])
    );
    p.disconnect("u", "u-1", "g2").await.expect("d");
    assert_eq!(
        p.online_users("u", 2).await.expect("list"),
        (names(&["u-2", "u-3"]), false)
    );
}
