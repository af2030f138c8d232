//! Roles across a real gRPC connection: a node whose gateway reaches the auth
//! and router roles of another node over the mesh port.

#[path = "support/mod.rs"]
mod support;

use support::{Client, TestNode};
use switchboard::RemoteRoles;
use switchboard_mesh::{AuthClient, ErrorCode, RouterClient, pb};

#[tokio::test]
async fn gateway_uses_auth_and_router_of_another_process_over_grpc() {
    let core = TestNode::start_with(support::open_mesh, RemoteRoles::default()).await;
    let ch = support::mesh_channel(core.mesh_addr()).await;
    let edge = TestNode::start_with(
        |_| {},
        RemoteRoles {
            auth: Some(AuthClient::from_channel(ch.clone())),
            router: Some(RouterClient::from_channel(ch)),
        },
    )
    .await;

    // bob is connected to the core node; ann to the edge node, whose router
    // is the core's: the message crosses the mesh.
    let mut bob = Client::login(&core.url(), "demo-bob").await;
    let mut ann = Client::login_with(&edge.url(), "demo-ann", true).await;
    ann.send_accepted("demo-bob", "over grpc", "g1").await;
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["content"], "over grpc");
    assert_eq!(m["data"]["from"], "demo-ann");

    // Auth refusals travel back as a reply, not an error.
    let mut eve = Client::connect(&edge.url()).await;
    let reply = eve
        .auth(serde_json::json!({"appId": "nope", "userId": "demo-1", "token": ""}))
        .await;
    assert_eq!(reply["data"]["isAuthenticated"], false);

    // Errors keep their protocol code across gRPC.
    let router = RouterClient::from_channel(support::mesh_channel(core.mesh_addr()).await);
    let err = router
        .route(pb::RouteRequest {
            envelope: Some(pb::Envelope {
                app_id: "demo".into(),
                from: "demo-ann".into(),
                kind: pb::MessageKind::Group.into(),
                group: "g-unknown".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("unknown group");
    assert_eq!(err.code, ErrorCode::InvalidRecipient);
    let err = router
        .route(pb::RouteRequest { envelope: None })
        .await
        .expect_err("no envelope");
    assert_eq!(err.code, ErrorCode::InvalidFrame);

    edge.shutdown().await;
    core.shutdown().await;
}

/// A caller that repeats a Deliver call (its first answer was lost in a
/// failover) gets the same seqs back, and the recipient gets the message
/// once.
#[tokio::test]
async fn a_repeated_deliver_call_delivers_once() {
    let node = TestNode::start_with(support::open_mesh, RemoteRoles::default()).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let delivery = switchboard_mesh::DeliveryClient::from_channel(
        support::mesh_channel(node.mesh_addr()).await,
    );
    let request = pb::DeliverRequest {
        envelopes: vec![pb::Envelope {
            id: switchboard_mesh::new_message_id(),
            app_id: "demo".into(),
            from: "demo-ann".into(),
            to: vec!["demo-bob".into()],
            content: "once".into(),
            feature: pb::Feature::Reliable.into(),
            kind: pb::MessageKind::Direct.into(),
            ts: switchboard_mesh::now_ms(),
            ..Default::default()
        }],
        sent_copies: Vec::new(),
        copy_to_sender: false,
    };
    let first = delivery.deliver(request.clone()).await.expect("deliver");
    let again = delivery.deliver(request).await.expect("deliver again");
    assert_eq!(first.seqs, again.seqs);
    assert!(first.seqs[0] > 0);
    assert_eq!(bob.recv_type("MESSAGE").await["data"]["content"], "once");
    bob.expect_silence(std::time::Duration::from_millis(300))
        .await;
    node.shutdown().await;
}

/// A resend of a client id (the client gave `data.id`) reaches the store,
/// which answers it as a repeat: the router reports it, nobody is pushed it
/// again, the sender's other connections get no second MESSAGE_SENT copy.
/// Direct, group and batched sends alike.
#[tokio::test]
async fn a_resent_client_id_is_reported_repeated_and_shown_once() {
    let node = TestNode::start_with(support::open_mesh, RemoteRoles::default()).await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;
    // The sender's connection: the envelopes below come from another one.
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let router = RouterClient::from_channel(support::mesh_channel(node.mesh_addr()).await);
    let envelope = |id: &str, kind: pb::MessageKind, to: &[&str]| pb::Envelope {
        id: id.into(),
        client_id: true,
        app_id: "demo".into(),
        from: "demo-ann".into(),
        to: to.iter().map(|t| (*t).to_owned()).collect(),
        content: format!("{id} once"),
        feature: pb::Feature::Reliable.into(),
        kind: kind.into(),
        ts: switchboard_mesh::now_ms(),
        origin: Some(pb::ConnRef {
            gateway_id: "another-gateway".into(),
            conn_id: 1,
        }),
        ..Default::default()
    };
    let route = |e: pb::Envelope| {
        let router = router.clone();
        async move {
            router
                .route(pb::RouteRequest { envelope: Some(e) })
                .await
                .expect("route")
        }
    };
    let silence = std::time::Duration::from_millis(300);

    let direct = envelope("d-1", pb::MessageKind::Direct, &["demo-bob"]);
    assert!(route(direct.clone()).await.repeated.is_empty());
    assert_eq!(
        bob.recv_type("MESSAGE").await["data"]["content"],
        "d-1 once"
    );
    assert_eq!(ann.recv_type("MESSAGE_SENT").await["data"]["id"], "d-1");
    assert_eq!(route(direct).await.repeated, vec![0]);
    bob.expect_silence(silence).await;
    ann.expect_silence(silence).await;

    let group = envelope("g-1", pb::MessageKind::Group, &["demo-bob", "demo-cat"]);
    assert!(route(group.clone()).await.repeated.is_empty());
    assert_eq!(
        bob.recv_type("MESSAGE").await["data"]["content"],
        "g-1 once"
    );
    assert_eq!(
        cat.recv_type("MESSAGE").await["data"]["content"],
        "g-1 once"
    );
    assert_eq!(ann.recv_type("MESSAGE_SENT").await["data"]["id"], "g-1");
    assert_eq!(route(group).await.repeated, vec![0]);
    bob.expect_silence(silence).await;
    cat.expect_silence(silence).await;
    ann.expect_silence(silence).await;

    // A batch: the repeat's position is reported, the new one delivered.
    let batch = router
        .route_batch(pb::RouteBatchRequest {
            envelopes: vec![
                envelope("b-1", pb::MessageKind::Direct, &["demo-cat"]),
                envelope("d-1", pb::MessageKind::Direct, &["demo-bob"]),
            ],
        })
        .await
        .expect("route batch");
    assert_eq!(batch.repeated, vec![1]);
    assert_eq!(
        cat.recv_type("MESSAGE").await["data"]["content"],
        "b-1 once"
    );
    assert_eq!(ann.recv_type("MESSAGE_SENT").await["data"]["id"], "b-1");
    bob.expect_silence(silence).await;
    ann.expect_silence(silence).await;
    node.shutdown().await;
}
