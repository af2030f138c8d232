//! Topics, rooms and presence subscriptions through real WebSocket
//! connections: against one in-process node, and against a multi-process
//! cluster (two gateways, groups with router and auth, delivery; real etcd
//! and Redis) with clients spread over both gateways.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Deployment};
use switchboard_config::{AppConfig, Config, TopicPublish};

macro_rules! channel_tests {
    ($($name:ident $(=> $edit:expr)?;)*) => {
        mod single {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let node = Deployment::single(|_c: &mut Config| { $( ($edit)(_c); )? }).await;
                    super::$name(node).await;
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(node) = Deployment::cluster(|_c: &mut Config| { $( ($edit)(_c); )? }).await else {
                        return;
                    };
                    super::$name(node).await;
                }
            )*
        }
    };
}

channel_tests! {
    every_subscriber_on_every_gateway_gets_each_publication_once;
    a_resubscribe_with_since_recovers_what_was_missed_or_says_it_cannot => |c: &mut Config| {
        c.channels.topic_history = 5;
    };
    publishing_where_the_app_allows_only_the_master_is_refused => |c: &mut Config| {
        c.apps = vec![AppConfig::demo(), master_only_app()];
    };
    topic_requests_are_checked => |c: &mut Config| c.limits.max_topics_per_connection = 2;
    a_late_joiner_gets_the_last_messages_oldest_first_and_members_see_joins_and_leaves => |c: &mut Config| {
        c.channels.room_history = 3;
    };
    anonymous_members_join_where_the_app_allows_it_and_are_refused_where_not => |c: &mut Config| {
        c.apps = vec![AppConfig::demo(), open_app()];
    };
    an_idle_room_vanishes => |c: &mut Config| c.channels.idle = Duration::from_millis(500);
    presence_subscriptions_fire_once_per_change_across_gateways;
    the_user_list_is_sorted_and_capped => |c: &mut Config| c.limits.max_user_list = 3;
}

fn master_only_app() -> AppConfig {
    AppConfig {
        name: "LK".into(),
        app_id: "locked".into(),
        master_user_id: "LK-0".into(),
        topic_publish: TopicPublish::Master,
        ..AppConfig::demo()
    }
}

fn open_app() -> AppConfig {
    AppConfig {
        name: "OPEN".into(),
        app_id: "open".into(),
        master_user_id: "OPEN-0".into(),
        anonymous_rooms: true,
        ..AppConfig::demo()
    }
}

const QUIET: Duration = Duration::from_millis(300);

async fn login_app(url: &str, app_id: &str, user: &str) -> Client {
    let mut c = Client::connect(url).await;
    let reply = c
        .auth(json!({"appId": app_id, "userId": user, "token": ""}))
        .await;
    assert_eq!(reply["data"]["isAuthenticated"], true, "{reply}");
    c.user = user.to_owned();
    c
}

async fn subscribe(c: &mut Client, topic: &str, since: Option<u64>) -> Value {
    let mut data = json!({"topic": topic});
    if let Some(since) = since {
        data["since"] = json!(since);
    }
    c.send(json!({"type": "SUBSCRIBE", "data": data, "reference": "sub"}))
        .await;
    let f = c.recv().await;
    assert_eq!(f["type"], "SUBSCRIBED", "{f}");
    assert_eq!(f["data"]["topic"], topic);
    assert_eq!(f["reference"], "sub");
    f
}

async fn publish(c: &mut Client, topic: &str, content: &str) -> u64 {
    c.send(json!({"type": "PUBLISH", "data": {"topic": topic, "content": content}, "reference": content}))
        .await;
    loop {
        let f = c.recv().await;
        if f["type"] == "PUBLISHED" && f["reference"] == content {
            assert_eq!(f["data"]["topic"], topic);
            assert!(f["data"]["id"].is_string(), "{f}");
            return f["data"]["offset"].as_u64().expect("offset");
        }
        // Its own PUBLICATION when subscribed; USER_CONNECTED when it is
        // the app's master user.
        assert_ne!(f["type"], "ERROR", "{f}");
    }
}

/// The next `n` frames, each a PUBLICATION of `topic`: (offset, content).
async fn publications(c: &mut Client, topic: &str, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let f = c.recv().await;
        assert_eq!(f["type"], "PUBLICATION", "{}: {f}", c.user);
        assert_eq!(f["data"]["topic"], topic);
        assert!(
            f["data"]["id"].is_string() && f["data"]["ts"].is_i64(),
            "{f}"
        );
        out.push((
            f["data"]["offset"].as_u64().expect("offset"),
            f["data"]["content"].as_str().expect("content").to_owned(),
        ));
    }
    out
}

/// Publications `p<i>` for i in `range`, at offsets `base + i` (a topic's
/// offsets start from a time-based value where it is created).
fn numbered(base: u64, range: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    range.map(|i| (base + i, format!("p{i}"))).collect()
}

async fn every_subscriber_on_every_gateway_gets_each_publication_once(node: Deployment) {
    // On a cluster, consecutive URLs are the two gateways.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut ann2 = Client::login(&node.url(), "demo-ann").await;
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let mut bases = Vec::new();
    for c in [&mut ann, &mut bob, &mut ann2] {
        let f = subscribe(c, "prices", None).await;
        bases.push(f["data"]["offset"].as_u64().expect("offset"));
        assert!(f["data"].get("recovered").is_none(), "{f}");
    }
    let base = bases[0];
    assert!(
        bases.iter().all(|b| *b == base) && base > 0,
        "a new topic has published nothing: one offset for all, time-based: {bases:?}"
    );
    for i in 1..=5u64 {
        assert_eq!(
            publish(&mut carl, "prices", &format!("p{i}")).await,
            base + i
        );
    }
    for c in [&mut ann, &mut bob, &mut ann2] {
        assert_eq!(publications(c, "prices", 5).await, numbered(base, 1..=5));
        let f = c.try_recv(QUIET).await;
        assert!(f.is_none(), "{}: a publication came twice: {f:?}", c.user);
    }
    // The publisher is not subscribed: only its PUBLISHED answers.
    carl.expect_silence(QUIET).await;
    let from = {
        publish(&mut carl, "prices", "p6").await;
        ann.recv_type("PUBLICATION").await
    };
    assert_eq!(from["data"]["from"], "demo-carl");
    // Another app's topic of the same name, or another topic, is another
    // stream; an unsubscribed client gets nothing more.
    bob.send(json!({"type": "UNSUBSCRIBE", "data": {"topic": "prices"}}))
        .await;
    assert_eq!(
        bob.recv_type("PUBLICATION").await["data"]["offset"],
        base + 6
    );
    assert_eq!(bob.recv().await["type"], "UNSUBSCRIBED");
    publish(&mut carl, "prices", "p7").await;
    assert_eq!(ann.recv().await["data"]["offset"], base + 7);
    assert_eq!(
        ann2.recv_type("PUBLICATION").await["data"]["offset"],
        base + 6
    );
    assert_eq!(ann2.recv().await["data"]["offset"], base + 7);
    bob.expect_silence(QUIET).await;
    publish(&mut carl, "other", "x").await;
    ann.expect_silence(QUIET).await;
    // A subscribed publisher: PUBLISHED first, then its own PUBLICATION.
    ann.send(json!({"type": "PUBLISH", "data": {"topic": "prices", "content": "mine"}, "reference": "m"}))
        .await;
    let f = ann.recv().await;
    assert_eq!(f["type"], "PUBLISHED", "{f}");
    assert_eq!(f["reference"], "m");
    assert_eq!(f["data"]["offset"], base + 8);
    let f = ann.recv().await;
    assert_eq!(f["type"], "PUBLICATION", "{f}");
    assert_eq!(
        (&f["data"]["offset"], &f["data"]["content"]),
        (&json!(base + 8), &json!("mine"))
    );
    assert_eq!(
        ann2.recv_type("PUBLICATION").await["data"]["offset"],
        base + 8
    );
    node.shutdown().await;
}

async fn a_resubscribe_with_since_recovers_what_was_missed_or_says_it_cannot(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut pub_ = Client::login(&node.url(), "demo-pub").await;
    let base = subscribe(&mut ann, "news", None).await["data"]["offset"]
        .as_u64()
        .expect("offset");
    for i in 1..=2 {
        publish(&mut pub_, "news", &format!("p{i}")).await;
    }
    assert_eq!(
        publications(&mut ann, "news", 2).await,
        numbered(base, 1..=2)
    );
    ann.close().await;
    for i in 3..=5 {
        publish(&mut pub_, "news", &format!("p{i}")).await;
    }
    // Back, with the last offset seen: the missed ones first, then live.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let f = subscribe(&mut ann, "news", Some(base + 2)).await;
    assert_eq!(f["data"]["recovered"], true, "{f}");
    assert_eq!(f["data"]["offset"], base + 5);
    assert_eq!(
        publications(&mut ann, "news", 3).await,
        numbered(base, 3..=5)
    );
    publish(&mut pub_, "news", "p6").await;
    assert_eq!(
        publications(&mut ann, "news", 1).await,
        numbered(base, 6..=6)
    );
    // Up to date: nothing to recover, and recovered.
    let mut ann2 = Client::login(&node.url(), "demo-ann").await;
    let f = subscribe(&mut ann2, "news", Some(base + 6)).await;
    assert_eq!(f["data"]["recovered"], true, "{f}");
    ann2.expect_silence(QUIET).await;
    // The topic keeps its last 5: from offset 2, 3..=6 would be needed but
    // 3 is gone (7..=11 kept). The kept ones come, and recovered is false.
    for i in 7..=11 {
        publish(&mut pub_, "news", &format!("p{i}")).await;
    }
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let f = subscribe(&mut bob, "news", Some(base + 2)).await;
    assert_eq!(f["data"]["recovered"], false, "{f}");
    assert_eq!(f["data"]["offset"], base + 11);
    assert_eq!(
        publications(&mut bob, "news", 5).await,
        numbered(base, 7..=11)
    );
    // From 6, exactly what is kept is missed: recovered.
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let f = subscribe(&mut carl, "news", Some(base + 6)).await;
    assert_eq!(f["data"]["recovered"], true, "{f}");
    assert_eq!(
        publications(&mut carl, "news", 5).await,
        numbered(base, 7..=11)
    );
    // An offset of an earlier life of the topic (below where this one
    // started): the kept ones, and recovered false.
    let mut dan = Client::login(&node.url(), "demo-dan").await;
    let f = subscribe(&mut dan, "news", Some(base - 1)).await;
    assert_eq!(f["data"]["recovered"], false, "{f}");
    node.shutdown().await;
}

async fn publishing_where_the_app_allows_only_the_master_is_refused(node: Deployment) {
    let mut reader = login_app(&node.url(), "locked", "LK-7").await;
    let mut user = login_app(&node.url(), "locked", "LK-1").await;
    let mut master = login_app(&node.url(), "locked", "LK-0").await;
    let base = subscribe(&mut reader, "alerts", None).await["data"]["offset"]
        .as_u64()
        .expect("offset");
    user.send(
        json!({"type": "PUBLISH", "data": {"topic": "alerts", "content": "no"}, "reference": "r1"}),
    )
    .await;
    let e = user.recv().await;
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["data"]["code"], "FORBIDDEN");
    assert_eq!(e["reference"], "r1");
    assert_eq!(publish(&mut master, "alerts", "yes").await, base + 1);
    let p = reader.recv().await;
    assert_eq!(
        p["data"]["content"], "yes",
        "only the master's publication: {p}"
    );
    // The default app lets anyone publish.
    // (another app's topic of the same name: its own offsets)
    let mut anyone = Client::login(&node.url(), "demo-x").await;
    assert!(publish(&mut anyone, "alerts", "demo").await > 1);
    reader.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn topic_requests_are_checked(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    for (frame, code) in [
        (json!({"type": "SUBSCRIBE", "data": {}}), "INVALID_FRAME"),
        (
            json!({"type": "SUBSCRIBE", "data": {"topic": ""}}),
            "INVALID_FRAME",
        ),
        (
            json!({"type": "SUBSCRIBE", "data": {"topic": "t", "since": -1}}),
            "INVALID_FRAME",
        ),
        (
            json!({"type": "PUBLISH", "data": {"topic": "t"}}),
            "INVALID_FRAME",
        ),
        (
            json!({"type": "PRESENCE_SUBSCRIBE", "data": {"users": "demo-1"}}),
            "INVALID_FRAME",
        ),
        (
            json!({"type": "PRESENCE_SUBSCRIBE", "data": {"users": ["other-1"]}}),
            "INVALID_RECIPIENT",
        ),
        (
            json!({"type": "ROOM_MESSAGE", "data": {"room": "r", "content": "x"}}),
            "NOT_A_MEMBER",
        ),
    ] {
        ann.send(frame.clone()).await;
        let e = ann.recv().await;
        assert_eq!(e["type"], "ERROR", "{frame}: {e}");
        assert_eq!(e["data"]["code"], code, "{frame}: {e}");
    }
    // At most two topics on one connection.
    subscribe(&mut ann, "t1", None).await;
    subscribe(&mut ann, "t2", None).await;
    ann.send(json!({"type": "SUBSCRIBE", "data": {"topic": "t3"}}))
        .await;
    let e = ann.recv().await;
    assert_eq!(e["data"]["code"], "INVALID_FRAME", "{e}");
    // Subscribing again to one it has is not one more.
    subscribe(&mut ann, "t2", None).await;
    // Before AUTH_CLIENT: not authenticated.
    let mut anon = Client::connect(&node.url()).await;
    anon.send(json!({"type": "SUBSCRIBE", "data": {"topic": "t1"}}))
        .await;
    assert_eq!(anon.recv().await["data"]["code"], "NOT_AUTHENTICATED");
    node.shutdown().await;
}

async fn join(c: &mut Client, room: &str, nick: &str) -> Value {
    c.send(json!({"type": "ROOM_JOIN", "data": {"room": room, "nick": nick}, "reference": "j"}))
        .await;
    let f = c.recv().await;
    assert_eq!(f["type"], "ROOM_JOINED", "{f}");
    assert_eq!(f["data"]["room"], room);
    f
}

async fn say(c: &mut Client, room: &str, content: &str) {
    c.send(json!({"type": "ROOM_MESSAGE", "data": {"room": room, "content": content}}))
        .await;
}

async fn room_message(c: &mut Client) -> Value {
    let f = c.recv().await;
    assert_eq!(f["type"], "ROOM_MESSAGE", "{}: {f}", c.user);
    f
}

async fn room_event(c: &mut Client, event: &str) -> Value {
    let f = c.recv().await;
    assert_eq!(f["type"], "ROOM_EVENT", "{}: {f}", c.user);
    assert_eq!(f["data"]["event"], event, "{f}");
    f
}

async fn a_late_joiner_gets_the_last_messages_oldest_first_and_members_see_joins_and_leaves(
    node: Deployment,
) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let f = join(&mut ann, "kitchen", "ann").await;
    assert_eq!(f["data"]["members"], 1);
    assert_eq!(f["data"]["history"], json!([]));
    assert_eq!(f["reference"], "j");
    let f = join(&mut bob, "kitchen", "bob").await;
    assert_eq!(f["data"]["members"], 2);
    let e = room_event(&mut ann, "joined").await;
    assert_eq!(e["data"]["userId"], "demo-bob");
    assert_eq!(e["data"]["nick"], "bob");
    assert_eq!(e["data"]["members"], 2);
    assert_eq!(e["data"]["room"], "kitchen");
    for i in 1..=5 {
        say(&mut ann, "kitchen", &format!("m{i}")).await;
    }
    for c in [&mut ann, &mut bob] {
        for i in 1..=5 {
            let m = room_message(c).await;
            assert_eq!(m["data"]["content"], format!("m{i}"));
            assert_eq!(m["data"]["from"], "demo-ann");
            assert_eq!(m["data"]["nick"], "ann");
            assert_eq!(m["data"]["room"], "kitchen");
            assert!(
                m["data"]["id"].is_string() && m["data"]["ts"].is_i64(),
                "{m}"
            );
        }
    }
    // The late joiner: the last 3, oldest first, as ROOM_MESSAGE data.
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let f = join(&mut carl, "kitchen", "carl").await;
    assert_eq!(f["data"]["members"], 3);
    let history = f["data"]["history"].as_array().expect("history");
    let contents: Vec<&str> = history
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect();
    assert_eq!(contents, ["m3", "m4", "m5"]);
    assert_eq!(history[0]["from"], "demo-ann");
    assert_eq!(history[0]["nick"], "ann");
    assert_eq!(history[0]["room"], "kitchen");
    for c in [&mut ann, &mut bob] {
        room_event(c, "joined").await;
    }
    // A second connection of a member is not a new member.
    let mut bob2 = Client::login(&node.url(), "demo-bob").await;
    assert_eq!(
        join(&mut bob2, "kitchen", "bob").await["data"]["members"],
        3
    );
    bob2.close().await;
    bob.send(json!({"type": "ROOM_LEAVE", "data": {"room": "kitchen"}}))
        .await;
    for c in [&mut ann, &mut carl] {
        let e = room_event(c, "left").await;
        assert_eq!(e["data"]["userId"], "demo-bob");
        assert_eq!(e["data"]["members"], 2);
    }
    // A closed connection leaves too.
    carl.close().await;
    assert_eq!(room_event(&mut ann, "left").await["data"]["members"], 1);
    say(&mut ann, "kitchen", "alone").await;
    assert_eq!(room_message(&mut ann).await["data"]["content"], "alone");
    bob.expect_silence(QUIET).await;
    say(&mut bob, "kitchen", "back?").await;
    assert_eq!(bob.recv().await["data"]["code"], "NOT_A_MEMBER");
    node.shutdown().await;
}

async fn anonymous_members_join_where_the_app_allows_it_and_are_refused_where_not(
    node: Deployment,
) {
    let mut guest = Client::connect(&node.url()).await;
    guest
        .send(json!({"type": "ROOM_JOIN", "data": {"room": "lobby", "appId": "open", "nick": "guest"}}))
        .await;
    let f = guest.recv().await;
    assert_eq!(f["type"], "ROOM_JOINED", "{f}");
    let user_id = f["data"]["userId"]
        .as_str()
        .expect("generated user id")
        .to_owned();
    assert!(user_id.starts_with("OPEN-"), "{user_id}");
    let mut member = login_app(&node.url(), "open", "OPEN-1").await;
    let f = join(&mut member, "lobby", "m").await;
    assert!(f["data"].get("userId").is_none(), "{f}");
    assert_eq!(f["data"]["members"], 2);
    assert_eq!(
        room_event(&mut guest, "joined").await["data"]["userId"],
        "OPEN-1"
    );
    say(&mut guest, "lobby", "hi from a guest").await;
    for c in [&mut guest, &mut member] {
        let m = room_message(c).await;
        assert_eq!(m["data"]["from"], user_id.as_str());
        assert_eq!(m["data"]["nick"], "guest");
    }
    // Rooms only: anything else still needs AUTH_CLIENT.
    guest
        .send(json!({"type": "MESSAGE", "data": {"to": "OPEN-1", "content": "x"}}))
        .await;
    assert_eq!(guest.recv().await["data"]["code"], "NOT_AUTHENTICATED");
    // An anonymous member cannot turn into a signed-in user (of any app)
    // on the same connection; it stays in its room as it was.
    guest
        .send(json!({"type": "AUTH_CLIENT", "data": {"appId": "demo", "userId": "demo-x", "token": ""}}))
        .await;
    let e = guest.recv().await;
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["data"]["code"], "INVALID_FRAME", "{e}");
    // A nick too long: refused before anyone is admitted.
    let mut long = Client::connect(&node.url()).await;
    long.send(json!({"type": "ROOM_JOIN", "data": {"room": "lobby", "appId": "open", "nick": "n".repeat(65)}}))
        .await;
    assert_eq!(long.recv().await["data"]["code"], "INVALID_FRAME");
    long.send(json!({"type": "MESSAGE", "data": {"to": "OPEN-1", "content": "x"}}))
        .await;
    assert_eq!(long.recv().await["data"]["code"], "NOT_AUTHENTICATED");
    // Two guests are two users.
    let mut guest2 = Client::connect(&node.url()).await;
    guest2
        .send(json!({"type": "ROOM_JOIN", "data": {"room": "lobby", "appId": "open"}}))
        .await;
    let f = guest2.recv().await;
    assert_eq!(f["data"]["members"], 3, "{f}");
    assert_ne!(f["data"]["userId"], user_id.as_str());
    // An app that does not allow it, an unknown app, or no app at all.
    for data in [
        json!({"room": "lobby", "appId": "demo"}),
        json!({"room": "lobby", "appId": "nope"}),
    ] {
        let mut c = Client::connect(&node.url()).await;
        c.send(json!({"type": "ROOM_JOIN", "data": data})).await;
        let e = c.recv().await;
        assert_eq!(e["data"]["code"], "FORBIDDEN", "{data}: {e}");
    }
    let mut c = Client::connect(&node.url()).await;
    c.send(json!({"type": "ROOM_JOIN", "data": {"room": "lobby"}}))
        .await;
    assert_eq!(c.recv().await["data"]["code"], "NOT_AUTHENTICATED");
    node.shutdown().await;
}

async fn an_idle_room_vanishes(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    join(&mut ann, "attic", "ann").await;
    say(&mut ann, "attic", "one").await;
    room_message(&mut ann).await;
    // Kept while in use.
    let f = join(&mut bob, "attic", "bob").await;
    assert_eq!(f["data"]["history"].as_array().expect("history").len(), 1);
    for c in [&mut ann, &mut bob] {
        c.send(json!({"type": "ROOM_LEAVE", "data": {"room": "attic"}}))
            .await;
    }
    // Empty and idle past the idle time (500 ms): gone, history and all.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut carl = Client::login(&node.url(), "demo-carl").await;
    let f = join(&mut carl, "attic", "carl").await;
    assert_eq!(f["data"]["history"], json!([]), "{f}");
    assert_eq!(f["data"]["members"], 1);
    node.shutdown().await;
}

/// Logs in and makes a round trip: AUTH_CLIENT_REPLY comes before the
/// connection counts in presence; the next answer comes after.
async fn online(url: &str, user: &str) -> Client {
    let mut c = Client::login(url, user).await;
    user_list(&mut c).await;
    c
}

async fn presence(c: &mut Client) -> (String, bool) {
    let f = c.recv().await;
    assert_eq!(f["type"], "PRESENCE", "{}: {f}", c.user);
    (
        f["data"]["userId"].as_str().expect("userId").to_owned(),
        f["data"]["online"].as_bool().expect("online"),
    )
}

async fn presence_subscriptions_fire_once_per_change_across_gateways(node: Deployment) {
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let carl = online(&node.url(), "demo-carl").await;
    ann.send(json!({"type": "PRESENCE_SUBSCRIBE", "data": {"users": ["demo-bob", "demo-carl"]}}))
        .await;
    let mut now = vec![presence(&mut ann).await, presence(&mut ann).await];
    now.sort();
    assert_eq!(
        now,
        [
            ("demo-bob".to_owned(), false),
            ("demo-carl".to_owned(), true)
        ]
    );
    // Bob's first connection (on the other gateway of a cluster): once.
    let bob1 = Client::login(&node.url(), "demo-bob").await;
    assert_eq!(presence(&mut ann).await, ("demo-bob".to_owned(), true));
    let bob2 = online(&node.url(), "demo-bob").await;
    bob1.close().await;
    // Still online on one connection: nothing.
    ann.expect_silence(Duration::from_millis(500)).await;
    bob2.close().await;
    assert_eq!(presence(&mut ann).await, ("demo-bob".to_owned(), false));
    carl.close().await;
    assert_eq!(presence(&mut ann).await, ("demo-carl".to_owned(), false));
    // Unsubscribed: no more.
    ann.send(json!({"type": "PRESENCE_UNSUBSCRIBE", "data": {"users": ["demo-bob"]}}))
        .await;
    // A round trip, so the unsubscribe is done before bob comes back.
    ann.send(json!({"type": "USER_LIST_REQUEST"})).await;
    assert_eq!(ann.recv().await["type"], "USER_LIST");
    let _bob = Client::login(&node.url(), "demo-bob").await;
    let _carl = Client::login(&node.url(), "demo-carl").await;
    assert_eq!(presence(&mut ann).await, ("demo-carl".to_owned(), true));
    ann.expect_silence(QUIET).await;
    node.shutdown().await;
}

async fn user_list(c: &mut Client) -> Value {
    c.send(json!({"type": "USER_LIST_REQUEST", "reference": "ul"}))
        .await;
    let f = c.recv().await;
    assert_eq!(f["type"], "USER_LIST", "{f}");
    assert_eq!(f["reference"], "ul");
    f
}

async fn the_user_list_is_sorted_and_capped(node: Deployment) {
    let mut u2 = online(&node.url(), "demo-u2").await;
    let _u3 = online(&node.url(), "demo-u3").await;
    let _u1 = online(&node.url(), "demo-u1").await;
    // A second connection is still one user.
    let _u1_again = online(&node.url(), "demo-u1").await;
    let f = user_list(&mut u2).await;
    assert_eq!(f["data"]["users"], json!(["demo-u1", "demo-u2", "demo-u3"]));
    assert!(f["data"].get("truncated").is_none(), "{f}");
    let _u0 = online(&node.url(), "demo-u0").await;
    let _u4 = online(&node.url(), "demo-u4").await;
    let f = user_list(&mut u2).await;
    assert_eq!(f["data"]["users"], json!(["demo-u0", "demo-u1", "demo-u2"]));
    assert_eq!(f["data"]["truncated"], true);
    node.shutdown().await;
}

/// Two groups instances; the one owning a room and a topic is killed: the
/// room's members are told ROOM_RESET and the room goes on, empty, at the
/// survivor; the topic's subscribers go on getting publications; a room
/// and a topic of the survivor notice nothing.
#[tokio::test]
async fn when_the_owning_groups_instance_dies_its_rooms_reset_and_go_on_at_the_survivor() {
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let mut cluster =
        support::cluster::Cluster::start(infra, support::cluster::FULL_SHAPE, |_| {}).await;
    let groups = ["groups1", "groups2"];
    let owned_by = |owner: &str, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|name| {
                cluster.owner_of(&groups, &switchboard_mesh::channel_key("demo", name)) == owner
            })
            .expect("a name")
    };
    let (lost_room, kept_room) = (owned_by("groups1", "room"), owned_by("groups2", "room"));
    let lost_topic = owned_by("groups1", "topic");
    let (gw1, gw2) = (cluster.proc("gw1").url(), cluster.proc("gw2").url());
    let mut ann = Client::login(&gw1, "demo-ann").await;
    let mut bob = Client::login(&gw2, "demo-bob").await;
    for room in [&lost_room, &kept_room] {
        join(&mut ann, room, "ann").await;
        join(&mut bob, room, "bob").await;
        room_event(&mut ann, "joined").await;
        say(&mut ann, room, "before").await;
        for c in [&mut ann, &mut bob] {
            assert_eq!(room_message(c).await["data"]["content"], "before");
        }
    }
    subscribe(&mut ann, &lost_topic, None).await;
    subscribe(&mut bob, &lost_topic, None).await;

    cluster.kill9("groups1");
    // Each gateway tells its members once the survivor owns the room.
    for c in [&mut ann, &mut bob] {
        let reset = c.recv().await;
        assert_eq!(reset["type"], "ROOM_RESET", "{}: {reset}", c.user);
        assert_eq!(reset["data"]["room"], lost_room.as_str());
    }
    // The room goes on, empty: a message reaches both members, and a late
    // joiner's history starts after the reset.
    say(&mut ann, &lost_room, "after").await;
    for c in [&mut ann, &mut bob] {
        assert_eq!(room_message(c).await["data"]["content"], "after");
    }
    let mut carl = Client::login(&gw1, "demo-carl").await;
    let f = join(&mut carl, &lost_room, "carl").await;
    let history: Vec<&str> = f["data"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect();
    assert_eq!(history, ["after"]);
    assert_eq!(f["data"]["members"], 3);
    for c in [&mut ann, &mut bob] {
        room_event(c, "joined").await;
    }
    // The survivor's own room: no reset, history intact.
    say(&mut bob, &kept_room, "still").await;
    for c in [&mut ann, &mut bob] {
        assert_eq!(room_message(c).await["data"]["content"], "still");
    }
    let f = join(&mut carl, &kept_room, "carl").await;
    assert_eq!(f["data"]["history"].as_array().expect("history").len(), 2);
    for c in [&mut ann, &mut bob] {
        room_event(c, "joined").await;
    }
    // The topic: its subscribers were announced to the survivor.
    let mut pubr = Client::login(&gw2, "demo-pub").await;
    publish(&mut pubr, &lost_topic, "p1").await;
    for c in [&mut ann, &mut bob] {
        let p = c.recv().await;
        assert_eq!(p["type"], "PUBLICATION", "{p}");
        assert_eq!(p["data"]["content"], "p1");
    }
    ann.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;
    cluster.shutdown().await;
}

/// Gateways that run the groups role too: a topic's and a room's calls
/// still go to their one owner, so both gateways' clients share them.
#[tokio::test]
async fn gateways_that_run_groups_too_share_one_owner_per_topic_and_room() {
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let shape = [
        ("gw1", "gateway,groups"),
        ("gw2", "gateway,groups"),
        ("core", "router,auth"),
        ("delivery", "delivery"),
    ];
    let cluster = support::cluster::Cluster::start(infra, &shape, |_| {}).await;
    let (gw1, gw2) = (cluster.proc("gw1").url(), cluster.proc("gw2").url());
    let mut ann = Client::login(&gw1, "demo-ann").await;
    let mut bob = Client::login(&gw2, "demo-bob").await;
    let mut carl = Client::login(&gw2, "demo-carl").await;
    for i in 0..4 {
        let topic = format!("t{i}");
        let base = subscribe(&mut ann, &topic, None).await["data"]["offset"]
            .as_u64()
            .expect("offset");
        subscribe(&mut bob, &topic, None).await;
        assert_eq!(publish(&mut carl, &topic, "p1").await, base + 1);
        for c in [&mut ann, &mut bob] {
            assert_eq!(publications(c, &topic, 1).await, numbered(base, 1..=1));
        }
        let room = format!("r{i}");
        join(&mut ann, &room, "ann").await;
        assert_eq!(join(&mut bob, &room, "bob").await["data"]["members"], 2);
        room_event(&mut ann, "joined").await;
    }
    ann.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;
    cluster.shutdown().await;
}

/// A gateway killed with its users' connections: their watchers elsewhere
/// are told they went offline (no change announces it; the watchers'
/// gateway finds it by looking again).
#[tokio::test]
async fn watchers_are_told_when_a_users_gateway_dies() {
    let Some(infra) = support::cluster::Infra::from_env() else {
        return;
    };
    let mut cluster =
        support::cluster::Cluster::start(infra, support::cluster::PROTOCOL_SHAPE, |_| {}).await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let _bob = online(&cluster.proc("gw2").url(), "demo-bob").await;
    ann.send(json!({"type": "PRESENCE_SUBSCRIBE", "data": {"users": ["demo-bob"]}}))
        .await;
    assert_eq!(presence(&mut ann).await, ("demo-bob".to_owned(), true));
    cluster.kill9("gw2");
    assert_eq!(presence(&mut ann).await, ("demo-bob".to_owned(), false));
    ann.expect_silence(Duration::from_secs(3)).await;
    cluster.shutdown().await;
}
