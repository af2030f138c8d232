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
