//! The public gRPC API (`switchboard.api.v1.Messaging` on the client port),
//! end to end: a real server, a tonic client over HTTP/2 to the same port
//! WebSocket clients use, real WebSocket recipients. What a gRPC caller
//! produces must be exactly what a WebSocket sender would have.

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::{Client, TestNode};
use switchboard_config::{ApiKeyConfig, ApiScope, AppConfig, Config};
use switchboard_proto::api::v1 as api;
use tonic::transport::Channel;

use api::messaging_client::MessagingClient;
use api::send_message_request::Target;

const SEND_KEY: &str = "sbk_grpc_send_0123456789";
const PRESENCE_KEY: &str = "sbk_grpc_presence_0123456789";
const GROUPS_KEY: &str = "sbk_grpc_groups_0123456789";
const ADMIN_KEY: &str = "sbk_grpc_admin_0123456789";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key(name: &str, secret: &str, scopes: &[ApiScope]) -> ApiKeyConfig {
    ApiKeyConfig {
        name: name.into(),
        sha256: sha256_hex(secret),
        scopes: scopes.to_vec(),
    }
}

fn with_keys(c: &mut Config) {
    c.apps = vec![AppConfig {
        api_keys: vec![
            key("sender", SEND_KEY, &[ApiScope::Send]),
            key("watcher", PRESENCE_KEY, &[ApiScope::Presence]),
            key("organiser", GROUPS_KEY, &[ApiScope::Groups]),
            key("ops", ADMIN_KEY, &[ApiScope::Admin]),
        ],
        ..AppConfig::demo()
    }];
}

/// A channel to the node's client port (the WebSocket URL's host).
async fn channel(node: &TestNode) -> Channel {
    let host = node
        .url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    tonic::transport::Endpoint::from_shared(format!("http://{host}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the client port over HTTP/2")
}

/// A request carrying `key` as `authorization: Bearer <key>`.
fn with_key<T>(key: &str, body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("metadata"),
    );
    req
}

fn send(from: &str, target: Target, content: &str) -> api::SendMessageRequest {
    api::SendMessageRequest {
        app_id: "demo".into(),
        from: from.into(),
        target: Some(target),
        content: content.into(),
        ..Default::default()
    }
}

fn shape(f: &Value) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = f.as_object().expect("frame").keys().cloned().collect();
    keys.extend(
        f["data"]
            .as_object()
            .expect("data")
            .keys()
            .map(|k| format!("data.{k}")),
    );
    keys
}

/// A direct message, an ad-hoc group message, a persistent group message
/// and a topic publication sent over gRPC reach WebSocket recipients as the
/// same frames from a WebSocket sender do; presence, the online list and
/// the inbox depth read what WebSocket clients did.
#[tokio::test]
async fn grpc_sends_are_what_a_websocket_sender_produces() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let mut grpc = MessagingClient::new(channel(&node).await);
    let mut ann = Client::login(&node.url(), "demo-ann").await;
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;

    // Direct, RELIABLE, with id and reference: as over WebSocket.
    ann.send(json!({"type": "MESSAGE", "data": {"to": "demo-bob", "content": "hello", "id": "ws-1"}, "feature": "RELIABLE", "reference": "ref-ws"}))
        .await;
    let by_ws = bob.recv_type("MESSAGE").await;
    let mut req = send("demo-ann", Target::To("demo-bob".into()), "hello");
    req.id = "grpc-1".into();
    req.reference = "ref-grpc".into();
    let reply = grpc
        .send_message(with_key(SEND_KEY, req.clone()))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(reply.id, "grpc-1");
    assert_eq!(reply.offset, None);
    let by_grpc = bob.recv_type("MESSAGE").await;
    assert_eq!(shape(&by_grpc), shape(&by_ws), "{by_grpc} vs {by_ws}");
    assert_eq!(by_grpc["data"]["from"], "demo-ann");
    assert_eq!(by_grpc["data"]["content"], "hello");
    assert_eq!(by_grpc["data"]["id"], "grpc-1");
    assert_eq!(by_grpc["reference"], "ref-grpc");
    // The sender's connection shows the copy (it is not the connection
    // the message came from) and, once delivered, the confirmation.
    let (mut sent, mut confirmed) = (false, false);
    while !(sent && confirmed) {
        let f = ann.recv().await;
        match f["type"].as_str() {
            Some("MESSAGE_SENT") if f["data"]["id"] == "grpc-1" => sent = true,
            Some("MESSAGE_CONFIRMATION") if f["data"]["id"] == "grpc-1" => {
                assert_eq!(f["data"]["reference"], "ref-grpc", "{f}");
                confirmed = true;
            }
            _ => {}
        }
    }
    // A resend of the id is accepted and stored once: bob's inbox holds
    // nothing new after fetching.
    let again = grpc
        .send_message(with_key(SEND_KEY, req))
        .await
        .expect("accepted again")
        .into_inner();
    assert_eq!(again.id, "grpc-1");

    // An ad-hoc list from the master user (empty `from`), a server id.
    let users = api::UserIds {
        users: vec!["demo-bob".into(), "demo-cat".into()],
    };
    let reply = grpc
        .send_message(with_key(SEND_KEY, send("", Target::Users(users), "all")))
        .await
        .expect("accepted")
        .into_inner();
    for c in [&mut bob, &mut cat] {
        let m = c.recv_type("MESSAGE").await;
        assert_eq!(m["data"]["from"], "demo-0", "{m}");
        assert_eq!(m["data"]["content"], "all");
        assert_eq!(m["data"]["id"], reply.id.as_str());
    }

    // A persistent group: members get it with data.group.
    ann.send(json!({"type": "GROUP_CREATE", "data": {"name": "Team", "members": ["demo-bob"], "group": "g-team"}}))
        .await;
    ann.recv_type("GROUP_CREATED").await;
    let reply = grpc
        .send_message(with_key(
            SEND_KEY,
            send("demo-ann", Target::Group("g-team".into()), "standup"),
        ))
        .await
        .expect("accepted")
        .into_inner();
    let m = bob.recv_type("MESSAGE").await;
    assert_eq!(m["data"]["group"], "g-team", "{m}");
    assert_eq!(m["data"]["id"], reply.id.as_str());
    let refused = grpc
        .send_message(with_key(
            SEND_KEY,
            send("demo-cat", Target::Group("g-team".into()), "let me in"),
        ))
        .await
        .expect_err("cat is not a member");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().starts_with("NOT_A_MEMBER: "), "{refused}");

    // A topic: the publication has the id and offset of the reply.
    cat.send(json!({"type": "SUBSCRIBE", "data": {"topic": "prices"}}))
        .await;
    cat.recv_type("SUBSCRIBED").await;
    bob.send(json!({"type": "PUBLISH", "data": {"topic": "prices", "content": "7"}}))
        .await;
    let by_ws = cat.recv_type("PUBLICATION").await;
    let reply = grpc
        .send_message(with_key(
            SEND_KEY,
            send("demo-ann", Target::Topic("prices".into()), "8"),
        ))
        .await
        .expect("published")
        .into_inner();
    let by_grpc = cat.recv_type("PUBLICATION").await;
    assert_eq!(shape(&by_grpc), shape(&by_ws), "{by_grpc} vs {by_ws}");
    assert_eq!(by_grpc["data"]["from"], "demo-ann");
    assert_eq!(by_grpc["data"]["id"], reply.id.as_str());
    assert_eq!(by_grpc["data"]["offset"].as_u64(), reply.offset);

    // Presence and the online list.
    let user = |u: &str| api::UserRequest {
        app_id: "demo".into(),
        user_id: u.into(),
    };
    let p = grpc
        .get_presence(with_key(PRESENCE_KEY, user("demo-bob")))
        .await
        .expect("presence")
        .into_inner();
    assert!(p.online, "{p:?}");
    let p = grpc
        .get_presence(with_key(PRESENCE_KEY, user("demo-dan")))
        .await
        .expect("presence")
        .into_inner();
    assert!(!p.online, "{p:?}");
    let online = grpc
        .list_online(with_key(
            PRESENCE_KEY,
            api::OnlineRequest {
                app_id: "demo".into(),
            },
        ))
        .await
        .expect("online")
        .into_inner();
    assert_eq!(online.users, ["demo-ann", "demo-bob", "demo-cat"]);
    assert!(!online.truncated);

    // The inbox depth of an offline user: one stored RELIABLE message
    // (sent twice with one id), none for FAST.
    let mut req = send("demo-ann", Target::To("demo-dan".into()), "later");
    req.id = "for-dan".into();
    for _ in 0..2 {
        grpc.send_message(with_key(SEND_KEY, req.clone()))
            .await
            .expect("accepted");
    }
    let mut fast = send("demo-ann", Target::To("demo-dan".into()), "now or never");
    fast.feature = Some(api::Feature::Fast.into());
    grpc.send_message(with_key(SEND_KEY, fast))
        .await
        .expect("accepted");
    let depth = grpc
        .get_inbox_depth(with_key(ADMIN_KEY, user("demo-dan")))
        .await
        .expect("depth")
        .into_inner();
    assert_eq!((depth.user_id.as_str(), depth.depth), ("demo-dan", 1));
    node.shutdown().await;
}

/// Group management over gRPC acts as the given user exactly as the
/// GROUP_* frames from that user would: members get the same GROUP_EVENTs,
/// only the owner changes the group, only members read it.
#[tokio::test]
async fn grpc_manages_groups_as_websocket_frames_do() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let mut grpc = MessagingClient::new(channel(&node).await);
    let mut bob = Client::login(&node.url(), "demo-bob").await;
    let mut cat = Client::login(&node.url(), "demo-cat").await;

    let created = grpc
        .create_group(with_key(
            GROUPS_KEY,
            api::CreateGroupRequest {
                app_id: "demo".into(),
                as_user: "demo-ann".into(),
                group: "g-ops".into(),
                name: "Ops".into(),
                members: vec!["demo-bob".into()],
            },
        ))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(
        (
            created.group.as_str(),
            created.name.as_str(),
            created.owner.as_str()
        ),
        ("g-ops", "Ops", "demo-ann")
    );
    assert_eq!(created.members, ["demo-ann", "demo-bob"]);
    let e = next_event(&mut bob, "members_added").await;
    assert_eq!(e["data"]["by"], "demo-ann", "{e}");

    let group_req = |as_user: &str| api::GroupRequest {
        app_id: "demo".into(),
        as_user: as_user.into(),
        group: "g-ops".into(),
    };
    let members_req = |members: &[&str]| api::GroupMembersRequest {
        app_id: "demo".into(),
        as_user: "demo-ann".into(),
        group: "g-ops".into(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    };
    let added = grpc
        .add_members(with_key(GROUPS_KEY, members_req(&["demo-cat"])))
        .await
        .expect("added")
        .into_inner();
    assert_eq!(added.members, ["demo-ann", "demo-bob", "demo-cat"]);
    let e = next_event(&mut cat, "members_added").await;
    assert_eq!(e["data"]["members"], json!(["demo-cat"]), "{e}");
    next_event(&mut bob, "members_added").await;

    let renamed = grpc
        .rename_group(with_key(
            GROUPS_KEY,
            api::RenameGroupRequest {
                app_id: "demo".into(),
                as_user: "demo-ann".into(),
                group: "g-ops".into(),
                name: "Operations".into(),
            },
        ))
        .await
        .expect("renamed")
        .into_inner();
    assert_eq!(renamed.name, "Operations");
    for c in [&mut bob, &mut cat] {
        let e = next_event(c, "renamed").await;
        assert_eq!(e["data"]["name"], "Operations", "{e}");
    }

    // A member reads it (bob), a member may not change it.
    let info = grpc
        .get_group(with_key(GROUPS_KEY, group_req("demo-bob")))
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "Operations");
    let refused = grpc
        .delete_group(with_key(GROUPS_KEY, group_req("demo-bob")))
        .await
        .expect_err("only the owner deletes");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = grpc
        .get_group(with_key(GROUPS_KEY, group_req("demo-dan")))
        .await
        .expect_err("not a member");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let removed = grpc
        .remove_members(with_key(GROUPS_KEY, members_req(&["demo-bob"])))
        .await
        .expect("removed")
        .into_inner();
    assert_eq!(removed.members, ["demo-ann", "demo-cat"]);
    next_event(&mut bob, "members_removed").await;

    let list = grpc
        .list_groups(with_key(
            GROUPS_KEY,
            api::UserRequest {
                app_id: "demo".into(),
                user_id: "demo-cat".into(),
            },
        ))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = list.groups.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(ids, ["g-ops"]);

    let deleted = grpc
        .delete_group(with_key(GROUPS_KEY, group_req("demo-ann")))
        .await
        .expect("deleted")
        .into_inner();
    assert_eq!(deleted.group, "g-ops");
    next_event(&mut cat, "deleted").await;
    let gone = grpc
        .get_group(with_key(GROUPS_KEY, group_req("demo-ann")))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(gone.message().starts_with("INVALID_RECIPIENT: "), "{gone}");
    node.shutdown().await;
}

async fn next_event(c: &mut Client, event: &str) -> Value {
    loop {
        let f = c.recv_type("GROUP_EVENT").await;
        if f["data"]["event"] == event {
            return f;
        }
    }
}

/// Missing and wrong keys, missing scopes and bad fields are refused with
/// the documented status and the shared error code.
#[tokio::test]
async fn grpc_refuses_bad_keys_scopes_and_fields() {
    let node = TestNode::start_with(with_keys, Default::default()).await;
    let mut grpc = MessagingClient::new(channel(&node).await);
    let hello = || send("demo-ann", Target::To("demo-bob".into()), "hello");

    let missing = grpc
        .send_message(tonic::Request::new(hello()))
        .await
        .expect_err("no key");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    assert!(
        missing.message().starts_with("NOT_AUTHENTICATED: "),
        "{missing}"
    );
    assert_eq!(
        missing
            .metadata()
            .get("x-switchboard-error")
            .and_then(|v| v.to_str().ok()),
        Some("NOT_AUTHENTICATED")
    );
    let wrong = grpc
        .send_message(with_key("sbk_not_a_key", hello()))
        .await
        .expect_err("wrong key");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let other_app = grpc
        .send_message(with_key(
            SEND_KEY,
            api::SendMessageRequest {
                app_id: "nope".into(),
                ..hello()
            },
        ))
        .await
        .expect_err("a key of another app");
    assert_eq!(other_app.code(), tonic::Code::Unauthenticated);
    for scoped in [PRESENCE_KEY, GROUPS_KEY] {
        let forbidden = grpc
            .send_message(with_key(scoped, hello()))
            .await
            .expect_err("no send scope");
        assert_eq!(forbidden.code(), tonic::Code::PermissionDenied, "{scoped}");
        assert!(forbidden.message().starts_with("FORBIDDEN: "));
    }
    let forbidden = grpc
        .get_inbox_depth(with_key(
            SEND_KEY,
            api::UserRequest {
                app_id: "demo".into(),
                user_id: "demo-bob".into(),
            },
        ))
        .await
        .expect_err("no admin scope");
    assert_eq!(forbidden.code(), tonic::Code::PermissionDenied);

    // Each bad field.
    let big = "x".repeat(switchboard_config::Limits::default().max_content_bytes + 1);
    let bad: Vec<(&str, api::SendMessageRequest, tonic::Code, &str)> = vec![
        (
            "no target",
            api::SendMessageRequest {
                target: None,
                ..hello()
            },
            tonic::Code::InvalidArgument,
            "INVALID_FRAME",
        ),
        (
            "sender of another app",
            api::SendMessageRequest {
                from: "other-1".into(),
                ..hello()
            },
            tonic::Code::InvalidArgument,
            "INVALID_FRAME",
        ),
        (
            "recipient of another app",
            send("demo-ann", Target::To("other-1".into()), "x"),
            tonic::Code::NotFound,
            "INVALID_RECIPIENT",
        ),
        (
            "bad id",
            api::SendMessageRequest {
                id: "not ok!".into(),
                ..hello()
            },
            tonic::Code::InvalidArgument,
            "INVALID_FRAME",
        ),
        (
            "unknown feature",
            api::SendMessageRequest {
                feature: Some(7),
                ..hello()
            },
            tonic::Code::InvalidArgument,
            "INVALID_FRAME",
        ),
        (
            "id on a topic",
            api::SendMessageRequest {
                id: "t-1".into(),
                ..send("demo-ann", Target::Topic("prices".into()), "x")
            },
            tonic::Code::InvalidArgument,
            "INVALID_FRAME",
        ),
        (
            "content over the limit",
            send("demo-ann", Target::To("demo-bob".into()), &big),
            tonic::Code::OutOfRange,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (what, req, code, shared) in bad {
        let refused = grpc
            .send_message(with_key(SEND_KEY, req))
            .await
            .expect_err(what);
        assert_eq!(refused.code(), code, "{what}: {refused}");
        assert!(
            refused.message().starts_with(&format!("{shared}: ")),
            "{what}: {refused}"
        );
    }
    let refused = grpc
        .create_group(with_key(
            GROUPS_KEY,
            api::CreateGroupRequest {
                app_id: "demo".into(),
                group: "no spaces".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("bad group id");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    node.shutdown().await;
}

/// Server reflection lists the Messaging service and describes it, so
/// grpcurl needs no .proto file.
#[tokio::test]
async fn grpc_reflection_lists_the_messaging_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let node = TestNode::start_with(with_keys, Default::default()).await;
    let mut reflection = ServerReflectionClient::new(channel(&node).await);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "switchboard.api.v1.Messaging".into(),
        )),
    ];
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let mut next = async || -> ServerReflectionResponse {
        answers
            .message()
            .await
            .expect("an answer")
            .expect("not the end")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = next().await.message_response else {
        panic!("not a service list");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("switchboard.api.v1.Messaging"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("switchboard.mesh")),
        "the mesh is not public: {names:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) = next().await.message_response else {
        panic!("not a file descriptor");
    };
    let described = files
        .file_descriptor_proto
        .iter()
        .any(|f| String::from_utf8_lossy(f).contains("SendMessage"));
    assert!(described, "the descriptor names the service's methods");
    node.shutdown().await;
}
