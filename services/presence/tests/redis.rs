//! The presence contract against a real Redis (`SWITCHBOARD_TEST_REDIS`,
//! started by `scripts/test.sh`), plus gateway expiry.

use std::time::Duration;

use switchboard_presence::{Presence, RedisPresence, contract};

/// The Redis under test, or `None` (a recorded skip) outside CI.
fn redis_url() -> Option<String> {
    switchboard_testenv::service(switchboard_testenv::REDIS)
}

/// A presence in its own key prefix, with g1 and g2 alive.
async fn presence(ttl: Duration) -> Option<RedisPresence> {
    let url = redis_url()?;
    let prefix = format!("sbtest:{}:", switchboard_testenv::unique());
    let p = RedisPresence::connect(&url, &prefix, ttl)
        .await
        .expect("connect to redis");
    p.heartbeat("g1").await.expect("heartbeat");
    p.heartbeat("g2").await.expect("heartbeat");
    Some(p)
}

#[tokio::test]
async fn first_and_last_connection_across_gateways() {
    let Some(p) = presence(Duration::from_secs(30)).await else {
        return;
    };
    contract::first_and_last_connection_across_gateways(&p).await;
}

#[tokio::test]
async fn stray_disconnect_changes_nothing() {
    let Some(p) = presence(Duration::from_secs(30)).await else {
        return;
    };
    contract::stray_disconnect_changes_nothing(&p).await;
}

#[tokio::test]
async fn batch_lookup_matches_single_lookups() {
    let Some(p) = presence(Duration::from_secs(30)).await else {
        return;
    };
    contract::batch_lookup_matches_single_lookups(&p).await;
}

#[tokio::test]
async fn changes_are_announced_once_per_transition() {
    let Some(p) = presence(Duration::from_secs(30)).await else {
        return;
    };
    contract::changes_are_announced_once_per_transition(&p).await;
}

#[tokio::test]
async fn user_list_is_sorted_and_capped() {
    let Some(p) = presence(Duration::from_secs(30)).await else {
        return;
    };
    contract::user_list_is_sorted_and_capped(&p).await;
}

/// A user whose only gateway died is not listed, although no disconnect
/// removed them.
#[tokio::test]
async fn the_user_list_leaves_out_users_of_dead_gateways() {
    let Some(p) = presence(Duration::from_millis(400)).await else {
        return;
    };
    let beat = p.spawn_heartbeat("g1".to_owned());
    p.connect("a", "a-1", "g1").await.expect("c");
    p.connect("a", "a-2", "g2").await.expect("c");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        p.online_users("a", 10).await.expect("list"),
        (vec!["a-1".to_owned()], false)
    );
    beat.abort();
}

#[tokio::test]
async fn a_dead_gateway_disappears_after_its_ttl() {
    let Some(p) = presence(Duration::from_millis(400)).await else {
        return;
    };
    // g1 keeps beating; g2 dies (no more heartbeats).
    let beat = p.spawn_heartbeat("g1".to_owned());
    assert!(p.connect("a", "a-1", "g2").await.expect("c").user_changed);
    assert!(!p.connect("a", "a-1", "g1").await.expect("c").user_changed);
    assert_eq!(p.gateways("a", "a-1").await.expect("g").len(), 2);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        p.gateways("a", "a-1").await.expect("g"),
        vec![("g1".to_owned(), 1)],
        "the dead gateway is no longer listed"
    );
    assert_eq!(
        p.gateways_batch("a", &["a-1"]).await.expect("b"),
        vec![vec![("g1".to_owned(), 1)]],
        "nor by the batch lookup"
    );
    // The user's last live connection closing makes them offline, although
    // the dead gateway never said goodbye.
    assert!(
        p.disconnect("a", "a-1", "g1")
            .await
            .expect("d")
            .user_changed
    );
    // A graceful stop retires a gateway at once.
    assert!(p.connect("a", "a-2", "g1").await.expect("c").user_changed);
    beat.abort();
    p.retire("g1").await.expect("retire");
    assert!(p.gateways("a", "a-2").await.expect("g").is_empty());
}
