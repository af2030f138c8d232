//! Persistent groups end to end: real WebSocket clients against a node in
//! this process, and against a multi-process cluster (two gateways, two
//! groups processes, real etcd and Redis) including kill -9 of the groups
//! process that owns the group.

#[path = "support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::cluster::{Cluster, FULL_SHAPE, Infra};
use support::{Client, Deployment};
use switchboard_mesh::{MeshConnector, MeshCredentials, Pool};

/// Sends a request with `reference` and returns its answer: the next frame
/// carrying that reference (the reply, or an ERROR).
async fn ask(c: &mut Client, kind: &str, data: Value, reference: &str) -> Value {
    c.send(json!({"type": kind, "data": data, "reference": reference}))
        .await;
    loop {
        let f = c.recv().await;
        if f["reference"] == reference {
            return f;
        }
    }
}

fn assert_error(frame: &Value, code: &str) {
    assert_eq!(frame["type"], "ERROR", "{frame}");
    assert_eq!(frame["data"]["code"], code, "{frame}");
}

/// The next GROUP_EVENT of `event` (earlier events are skipped).
async fn event(c: &mut Client, event: &str) -> Value {
    loop {
        let f = c.recv_type("GROUP_EVENT").await;
        if f["data"]["event"] == event {
            return f;
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &switchboard_mesh::new_message_id()[24..])
}

/// The whole life of a group; `a` and `b` are two gateways (the same one
/// all-in-one).
async fn group_lifecycle(a: &str, b: &str) {
    let mut ann1 = Client::login(a, "demo-ann").await;
    let mut ann2 = Client::login(b, "demo-ann").await;
    let mut bob = Client::login(b, "demo-bob").await;
    let mut cat = Client::login(a, "demo-cat").await;
    let mut dan = Client::login(a, "demo-dan").await;
    let g = unique("g");

    // Create: the creator owns it and is a member; members are told.
    let created = ask(
        &mut ann1,
        "GROUP_CREATE",
        json!({"group": g, "name": "Team", "members": ["demo-bob", "demo-cat", "demo-eve"]}),
        "c1",
    )
    .await;
    assert_eq!(created["type"], "GROUP_CREATED", "{created}");
    assert_eq!(created["data"]["group"], g.as_str());
    assert_eq!(created["data"]["name"], "Team");
    assert_eq!(created["data"]["owner"], "demo-ann");
    assert_eq!(
        created["data"]["members"],
        json!(["demo-ann", "demo-bob", "demo-cat", "demo-eve"])
    );
    for c in [&mut bob, &mut cat] {
        let e = event(c, "members_added").await;
        assert_eq!(e["data"]["group"], g.as_str());
        assert_eq!(e["data"]["by"], "demo-ann");
    }
    // The same create again by its owner is answered with the group; by
    // anyone else it is refused.
    let again = ask(&mut ann1, "GROUP_CREATE", json!({"group": g}), "c2").await;
    assert_eq!(again["type"], "GROUP_CREATED", "{again}");
    assert_eq!(again["data"]["name"], "Team");
    let taken = ask(&mut dan, "GROUP_CREATE", json!({"group": g}), "c3").await;
    assert_error(&taken, "FORBIDDEN");

    // Members may not do what only the owner does.
    for (kind, data) in [
        (
            "GROUP_ADD_MEMBERS",
            json!({"group": g, "members": ["demo-dan"]}),
        ),
        (
            "GROUP_REMOVE_MEMBERS",
            json!({"group": g, "members": ["demo-cat"]}),
        ),
        ("GROUP_RENAME", json!({"group": g, "name": "Mine"})),
        ("GROUP_DELETE", json!({"group": g})),
    ] {
        let refused = ask(&mut bob, kind, data, "b1").await;
        assert_error(&refused, "FORBIDDEN");
    }
    // Non-members can neither post nor look; unknown groups are unknown.
    let refused = ask(
        &mut dan,
        "GROUP_MESSAGE",
        json!({"group": g, "content": "let me in"}),
        "d1",
    )
    .await;
    assert_error(&refused, "NOT_A_MEMBER");
    let refused = ask(&mut dan, "GROUP_INFO", json!({"group": g}), "d2").await;
    assert_error(&refused, "NOT_A_MEMBER");
    let unknown = ask(
        &mut dan,
        "GROUP_INFO",
        json!({"group": unique("nope")}),
        "d3",
    )
    .await;
    assert_error(&unknown, "INVALID_RECIPIENT");
    let unknown = ask(
        &mut dan,
        "GROUP_MESSAGE",
        json!({"group": unique("nope"), "content": "x"}),
        "d4",
    )
    .await;
    assert_error(&unknown, "INVALID_RECIPIENT");

    // A message reaches every member with data.group, the sender's other
    // device as MESSAGE_SENT; eve, offline, finds it stored.
    ann1.send(json!({"type": "GROUP_MESSAGE", "data": {"group": g, "content": "hi all"}, "reference": "r8"}))
        .await;
    for c in [&mut bob, &mut cat] {
        let m = c.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["from"], "demo-ann");
        assert_eq!(m["data"]["content"], "hi all");
        assert_eq!(m["data"]["group"], g.as_str());
        assert_eq!(m["reference"], "r8");
    }
    let sent = ann2.recv_type("MESSAGE_SENT").await;
    assert_eq!(sent["data"]["content"], "hi all");
    assert_eq!(sent["data"]["group"], g.as_str());
    let mut eve = Client::login(b, "demo-eve").await;
    let (stored, _) = eve.fetch_all(100).await;
    let stored: Vec<&Value> = stored.iter().filter(|f| f["type"] == "MESSAGE").collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["data"]["content"], "hi all");
    assert_eq!(stored[0]["data"]["group"], g.as_str());
    assert_eq!(stored[0]["data"]["from"], "demo-ann");

    // A removed member is told and gets no more messages.
    let removed = ask(
        &mut ann1,
        "GROUP_REMOVE_MEMBERS",
        json!({"group": g, "members": ["demo-cat"]}),
        "x1",
    )
    .await;
    assert_eq!(removed["type"], "GROUP_UPDATED", "{removed}");
    assert_eq!(removed["data"]["group"], g.as_str());
    for c in [&mut cat, &mut bob] {
        let e = event(c, "members_removed").await;
        assert_eq!(e["data"]["members"], json!(["demo-cat"]));
    }
    ann1.send(json!({"type": "GROUP_MESSAGE", "data": {"group": g, "content": "second"}}))
        .await;
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["content"], "second");
    // The group message was fanned out before this direct one was read
    // (a connection's group message is handled alone): cat's next message
    // is this one.
    ann1.message("demo-cat", "marker", "RELIABLE", "m1").await;
    assert_eq!(cat.recv_type("MESSAGE").await["data"]["content"], "marker");

    // Members see the group and their groups.
    let info = ask(&mut bob, "GROUP_INFO", json!({"group": g}), "i1").await;
    assert_eq!(info["type"], "GROUP_INFO", "{info}");
    assert_eq!(info["data"]["owner"], "demo-ann");
    assert_eq!(
        info["data"]["members"],
        json!(["demo-ann", "demo-bob", "demo-eve"])
    );
    let list = ask(&mut bob, "GROUPS_LIST", json!({}), "l1").await;
    assert_eq!(list["type"], "GROUPS_LIST", "{list}");
    assert_eq!(
        list["data"]["groups"],
        json!([{"group": g, "name": "Team", "owner": "demo-ann"}])
    );
    let list = ask(&mut cat, "GROUPS_LIST", json!({}), "l2").await;
    assert_eq!(list["data"]["groups"], json!([]));

    // Rename: members are told the new name.
    let renamed = ask(
        &mut ann1,
        "GROUP_RENAME",
        json!({"group": g, "name": "Team 2"}),
        "n1",
    )
    .await;
    assert_eq!(renamed["type"], "GROUP_UPDATED", "{renamed}");
    assert_eq!(event(&mut bob, "renamed").await["data"]["name"], "Team 2");

    // Leave: any member but the owner.
    let left = ask(&mut bob, "GROUP_LEAVE", json!({"group": g}), "v1").await;
    assert_eq!(left["type"], "GROUP_UPDATED", "{left}");
    let e = event(&mut ann2, "left").await;
    assert_eq!(e["data"]["members"], json!(["demo-bob"]));
    assert_eq!(e["data"]["by"], "demo-bob");
    let list = ask(&mut bob, "GROUPS_LIST", json!({}), "l3").await;
    assert_eq!(list["data"]["groups"], json!([]));
    let refused = ask(
        &mut bob,
        "GROUP_MESSAGE",
        json!({"group": g, "content": "still here?"}),
        "v2",
    )
    .await;
    assert_error(&refused, "NOT_A_MEMBER");
    let refused = ask(&mut ann1, "GROUP_LEAVE", json!({"group": g}), "v3").await;
    assert_error(&refused, "FORBIDDEN");

    // Delete: members are told; the group is gone.
    let deleted = ask(&mut ann1, "GROUP_DELETE", json!({"group": g}), "z1").await;
    assert_eq!(deleted["type"], "GROUP_UPDATED", "{deleted}");
    assert_eq!(
        event(&mut eve, "deleted").await["data"]["group"],
        g.as_str()
    );
    let gone = ask(&mut ann1, "GROUP_INFO", json!({"group": g}), "z2").await;
    assert_error(&gone, "INVALID_RECIPIENT");
    let list = ask(&mut eve, "GROUPS_LIST", json!({}), "z3").await;
    assert_eq!(list["data"]["groups"], json!([]));
}

#[tokio::test]
async fn a_group_lives_and_dies_all_in_one() {
    let node = Deployment::single(|_| {}).await;
    let url = node.url();
    group_lifecycle(&url, &url).await;
    node.shutdown().await;
}

#[tokio::test]
async fn group_frames_are_checked_and_limits_hold() {
    let node = Deployment::single(|c| {
        c.limits.max_group_members = 3;
        c.limits.max_groups_per_user = 2;
    })
    .await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    for (kind, data, code) in [
        ("GROUP_INFO", json!({}), "INVALID_FRAME"),
        ("GROUP_INFO", json!({"group": "has space"}), "INVALID_FRAME"),
        (
            "GROUP_ADD_MEMBERS",
            json!({"group": "g-1"}),
            "INVALID_FRAME",
        ),
        (
            "GROUP_ADD_MEMBERS",
            json!({"group": "g-1", "members": []}),
            "INVALID_FRAME",
        ),
        ("GROUP_RENAME", json!({"group": "g-1"}), "INVALID_FRAME"),
        (
            "GROUP_CREATE",
            json!({"members": "demo-bob"}),
            "INVALID_FRAME",
        ),
        (
            "GROUP_CREATE",
            json!({"members": ["other-bob"]}),
            "INVALID_RECIPIENT",
        ),
        (
            "GROUP_CREATE",
            json!({"members": ["demo-b", "demo-c", "demo-d"]}),
            "INVALID_FRAME",
        ),
    ] {
        let refused = ask(&mut ann, kind, data.clone(), "e").await;
        assert_error(&refused, code);
        assert!(
            refused["data"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{kind} {data}: {refused}"
        );
    }
    // Without an id the server picks one.
    let first = ask(&mut ann, "GROUP_CREATE", json!({"name": "One"}), "g1").await;
    assert_eq!(first["type"], "GROUP_CREATED", "{first}");
    let id = first["data"]["group"].as_str().expect("an id");
    assert!(!id.is_empty());
    assert_eq!(first["data"]["members"], json!(["demo-ann"]));
    ask(&mut ann, "GROUP_CREATE", json!({"name": "Two"}), "g2").await;
    let third = ask(&mut ann, "GROUP_CREATE", json!({"name": "Three"}), "g3").await;
    assert_error(&third, "FORBIDDEN");
    // Adding past the member limit is refused, whole.
    let added = ask(
        &mut ann,
        "GROUP_ADD_MEMBERS",
        json!({"group": id, "members": ["demo-b", "demo-c", "demo-d"]}),
        "g4",
    )
    .await;
    assert_error(&added, "INVALID_FRAME");
    let info = ask(&mut ann, "GROUP_INFO", json!({"group": id}), "g5").await;
    assert_eq!(info["data"]["members"], json!(["demo-ann"]));
    node.shutdown().await;
}

/// The id a cluster process registers under (see `Cluster::write_config`).
fn node_id(cluster: &Cluster, name: &str) -> String {
    format!("{name}-{}", &cluster.etcd_prefix[8..16])
}

#[tokio::test]
async fn a_group_lives_and_dies_across_two_gateways_and_two_groups_processes() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let cluster = Cluster::start(infra, FULL_SHAPE, |_| {}).await;
    let (gw1, gw2) = (cluster.proc("gw1").url(), cluster.proc("gw2").url());
    group_lifecycle(&gw1, &gw2).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_survivor_serves_a_group_after_its_owner_is_killed() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let mut cluster = Cluster::start(infra, FULL_SHAPE, |_| {}).await;
    let mut ann = Client::login(&cluster.proc("gw1").url(), "demo-ann").await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let g = unique("g-kill");
    let created = ask(
        &mut ann,
        "GROUP_CREATE",
        json!({"group": g, "name": "Kill", "members": ["demo-bob", "demo-cat"]}),
        "c",
    )
    .await;
    assert_eq!(created["type"], "GROUP_CREATED", "{created}");
    ann.send(json!({"type": "GROUP_MESSAGE", "data": {"group": g, "content": "before"}}))
        .await;
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["content"], "before");

    // The owner, as every process computes it.
    let pool = Pool::new(
        "groups",
        MeshConnector::new(MeshCredentials::default(), None),
    );
    let instances: Vec<(String, String)> = ["groups1", "groups2"]
        .iter()
        .map(|name| {
            let addr = format!("http://{}", cluster.proc(name).mesh_addr);
            (node_id(&cluster, name), addr)
        })
        .collect();
    pool.update(&instances);
    let owner = pool.owner(g.as_bytes()).expect("an owner");
    let owner_name = if owner == node_id(&cluster, "groups1") {
        "groups1"
    } else {
        "groups2"
    };
    cluster.kill9(owner_name);

    // Membership is in the store: the survivor knows it, and fans out.
    ann.send(json!({"type": "GROUP_MESSAGE", "data": {"group": g, "content": "after"}, "reference": "a1"}))
        .await;
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["content"], "after");
    let mut cat = Client::login(&cluster.proc("gw1").url(), "demo-cat").await;
    let (stored, _) = cat.fetch_all(100).await;
    let contents: Vec<&str> = stored
        .iter()
        .filter(|f| f["type"] == "MESSAGE")
        .filter_map(|f| f["data"]["content"].as_str())
        .collect();
    assert_eq!(contents, ["before", "after"]);
    let info = ask(&mut bob, "GROUP_INFO", json!({"group": g}), "i").await;
    assert_eq!(
        info["data"]["members"],
        json!(["demo-ann", "demo-bob", "demo-cat"]),
        "{info}"
    );
    // Changes go on at the survivor.
    let removed = ask(
        &mut ann,
        "GROUP_REMOVE_MEMBERS",
        json!({"group": g, "members": ["demo-cat"]}),
        "r",
    )
    .await;
    assert_eq!(removed["type"], "GROUP_UPDATED", "{removed}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_persistent_fanout_is_traced_with_its_size() {
    let Some(infra) = Infra::from_env() else {
        return;
    };
    let receiver = support::otlp::Receiver::start().await;
    let cluster = Cluster::start(infra, support::cluster::PROTOCOL_SHAPE, |c| {
        c.otlp_endpoint = receiver.endpoint();
    })
    .await;
    let mut ann = Client::login_with(&cluster.proc("gw1").url(), "demo-ann", true).await;
    let mut bob = Client::login(&cluster.proc("gw2").url(), "demo-bob").await;
    let g = unique("g-trace");
    let created = ask(
        &mut ann,
        "GROUP_CREATE",
        json!({"group": g, "members": ["demo-bob", "demo-cat", "demo-dan"]}),
        "c",
    )
    .await;
    assert_eq!(created["type"], "GROUP_CREATED", "{created}");
    let accepted = ask(
        &mut ann,
        "GROUP_MESSAGE",
        json!({"group": g, "content": "traced"}),
        "t",
    )
    .await;
    assert_eq!(accepted["type"], "MESSAGE_ACCEPTED", "{accepted}");
    let id = accepted["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["id"], id.as_str());
    cluster.shutdown().await;
    let mut fanout = None;
    for _ in 0..100 {
        fanout = receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "groups.fanout" && s.attributes.get("message.id") == Some(&id));
        if fanout.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let fanout = fanout.expect("a groups.fanout span for the message");
    assert_eq!(
        fanout.attributes.get("fanout.size").map(String::as_str),
        Some("3"),
        "{fanout:#?}"
    );
}

#[tokio::test]
async fn metrics_count_group_requests_and_fanouts() {
    let node = support::TestNode::start().await;
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let g = unique("g-metrics");
    ask(
        &mut ann,
        "GROUP_CREATE",
        json!({"group": g, "members": ["demo-bob", "demo-cat"]}),
        "c",
    )
    .await;
    ann.send(json!({"type": "GROUP_MESSAGE", "data": {"group": g, "content": "counted"}}))
        .await;
    // GROUP_INFO is answered after the message was fanned out (a
    // connection's group frames are handled in order).
    ask(&mut ann, "GROUP_INFO", json!({"group": g}), "i").await;
    let (status, _, text) = support::http_get_text(node.client_addr, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    for needle in [
        r#"switchboard_groups_requests_total{op="create",status="ok"}"#,
        r#"switchboard_groups_requests_total{op="info",status="ok"}"#,
        r#"switchboard_groups_fanout_recipients_count{kind="persistent"}"#,
        r#"switchboard_groups_fanout_duration_seconds_count{kind="persistent"}"#,
        "switchboard_groups_created_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    node.shutdown().await;
}
