//! Round trips to Redis, counted by Redis itself (`INFO commandstats`).
//! A test binary of its own with one test: cargo runs test binaries one at
//! a time, so nothing else sends commands to the Redis under test while
//! this one counts.

use std::time::Duration;

use switchboard_presence::{Presence, RedisPresence};

/// Commands clients sent to Redis: every command counted by `INFO
/// commandstats` but `INFO` itself and the reads the presence scripts make
/// inside Redis (`HGETALL`, `EXISTS`; Redis counts those too, and the
/// presence client never sends them itself). Each command a client sends
/// is one round trip (the client does not pipeline presence calls).
async fn commands(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter(|l| {
            !["cmdstat_info:", "cmdstat_hgetall:", "cmdstat_exists:"]
                .iter()
                .any(|inner| l.starts_with(inner))
        })
        .filter_map(|l| {
            let calls = l.split("calls=").nth(1)?;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test]
async fn a_batch_lookup_is_one_round_trip() {
    let Some(url) = switchboard_testenv::service(switchboard_testenv::REDIS) else {
        return;
    };
    let prefix = format!("sbtest:rt{}:", switchboard_testenv::unique());
    let p = RedisPresence::connect(&url, &prefix, Duration::from_secs(30))
        .await
        .expect("connect");
    p.heartbeat("g1").await.expect("heartbeat");
    p.heartbeat("g2").await.expect("heartbeat");
    let users: Vec<String> = (0..200).map(|i| format!("a-{i}")).collect();
    for (i, user) in users.iter().enumerate() {
        let gw = if i % 2 == 0 { "g1" } else { "g2" };
        p.connect("a", user, gw).await.expect("connect");
    }
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    // Once before counting: the first call of a script loads it.
    p.gateways_batch("a", &refs[..1]).await.expect("batch");
    p.gateways("a", refs[0]).await.expect("single");

    let client = redis::Client::open(url.as_str()).expect("url");
    let mut counter = client
        .get_multiplexed_async_connection()
        .await
        .expect("counting connection");
    let before = commands(&mut counter).await;
    let found = p.gateways_batch("a", &refs).await.expect("batch");
    let batch = commands(&mut counter).await - before;
    assert_eq!(found.len(), 200);
    assert!(
        found.iter().all(|g| g.len() == 1),
        "every user is on one gateway"
    );
    assert_eq!(batch, 1, "200 users looked up in one Redis command");

    // The same users one by one: one round trip each.
    let before = commands(&mut counter).await;
    for user in &refs {
        p.gateways("a", user).await.expect("single");
    }
    let single = commands(&mut counter).await - before;
    assert_eq!(single, 200);
}
