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
