//! Sessions driven directly, with no socket and no JSON, as a REST or gRPC
//! adapter would, over test doubles of the other roles
//! ([`crate::test_doubles`]).

use switchboard_config::Limits;
use switchboard_mesh::{ErrorCode, pb};

use super::*;
use crate::GatewayRole;
use crate::commands::{Ack, Auth, Fetch, GroupMessage, Message};
use crate::test_doubles::gateway;

async fn signed_in(gateway: &GatewayRole, user: &str, acks: bool) -> Session {
    let mut session = gateway.session();
    let outcome = session
        .authenticate(Auth {
            app_id: "demo".into(),
            user_id: user.into(),
            token: String::new(),
            acks,
            device: None,
        })
        .await
        .expect("auth role answers");
    assert!(matches!(outcome, AuthOutcome::Accepted), "{outcome:?}");
    session
}

fn message(to: &str, content: &str, id: Option<&str>, feature: pb::Feature) -> Message {
    Message {
        to: to.into(),
        content: content.into(),
        id: id.map(str::to_owned),
        feature,
    }
}

fn meta(reference: &str) -> RequestMeta {
    RequestMeta {
        reference: Some(reference.into()),
        traceparent: None,
    }
}

#[tokio::test]
async fn a_session_authenticates_sends_and_fetches_without_a_socket() {
    let (gateway, inboxes) = gateway(Limits::default());

    // Nothing but AUTH_CLIENT before authentication; a refused credential
    // is an outcome with its reason.
    let mut stranger = gateway.session();
    let err = stranger
        .admit(Some(CommandKind::Message))
        .expect_err("not authenticated");
    assert_eq!(err.code, ErrorCode::NotAuthenticated);
    stranger
        .admit(Some(CommandKind::Auth))
        .expect("auth is admitted");
    let refused = stranger
        .authenticate(Auth {
            app_id: "demo".into(),
            user_id: "demo-eve".into(),
            token: "bad".into(),
            acks: false,
            device: None,
        })
        .await
        .expect("auth role answers");
    assert!(
        matches!(&refused, AuthOutcome::Refused { reason, .. } if reason == "refused"),
        "{refused:?}"
    );
    assert!(!stranger.is_authenticated());

    // The whole rule set in one call, as a transport with typed requests
    // uses it.
    let mut early = gateway.session();
    let refused = early
        .execute(
            ClientCommand::Fetch(Fetch { count: None }),
            &RequestMeta::default(),
        )
        .await
        .expect_err("not authenticated");
    assert_eq!(refused.code, ErrorCode::NotAuthenticated);
    let outcome = early
        .execute(
            ClientCommand::Auth(Auth {
                app_id: "demo".into(),
                user_id: "demo-dan".into(),
                token: String::new(),
                acks: false,
                device: None,
            }),
            &RequestMeta::default(),
        )
        .await
        .expect("auth role answers");
    assert!(matches!(outcome, Outcome::Auth(AuthOutcome::Accepted)));
    assert_eq!(
        early.identity().map(|i| i.user_id.as_str()),
        Some("demo-dan")
    );
    let sent = early
        .execute(
            ClientCommand::Message(message(
                "demo-bob",
                "via execute",
                Some("dan-1"),
                pb::Feature::Fast,
            )),
            &meta("e1"),
        )
        .await
        .expect("accepted");
    assert!(
        matches!(&sent, Outcome::Accepted(a) if a.id == "dan-1" && !a.reliable),
        "{sent:?}"
    );

    let mut ann = signed_in(&gateway, "demo-ann", false).await;
    assert_eq!(
        ann.admit(Some(CommandKind::Auth))
            .expect_err("second auth")
            .message,
        "already authenticated"
    );
    let sent = ann
        .send_direct(
            message("demo-bob", "hello", None, pb::Feature::Reliable),
            &meta("r1"),
        )
        .await
        .expect("accepted");
    assert!(sent.reliable && !sent.repeated);
    // A server-assigned id is a UUIDv7; without ack mode nothing answers it.
    assert_eq!(
        uuid::Uuid::parse_str(&sent.id).map(|u| u.get_version_num()),
        Ok(7)
    );
    assert!(!ann.answers_accepted(&sent));
    let group = ann
        .send_group(
            GroupMessage {
                to: Some(vec!["demo-bob".into(), "demo-cy".into()]),
                group: None,
                content: "hi all".into(),
                id: Some("g-1".into()),
                feature: pb::Feature::Reliable,
            },
            &meta("r2"),
        )
        .await
        .expect("accepted");
    assert_eq!(group.id, "g-1");

    // The envelopes carry who, what, the reference and this session's
    // connection as origin.
    let all = inboxes.routed();
    assert_eq!(all.len(), 3);
    assert_eq!(
        (all[0].id.as_str(), all[0].from.as_str()),
        ("dan-1", "demo-dan")
    );
    // Each session is its own connection (MESSAGE_SENT copies skip it).
    assert_ne!(all[0].origin, all[1].origin);
    let routed = &all[1..];
    assert_eq!(
        (
            routed[0].from.as_str(),
            routed[0].to.as_slice(),
            routed[0].reference.as_str()
        ),
        ("demo-ann", &["demo-bob".to_owned()][..], "r1")
    );
    assert!(!routed[0].client_id && routed[1].client_id);
    assert_eq!(routed[1].kind(), pb::MessageKind::Group);
    assert_eq!(
        routed[0].origin.as_ref().map(|o| o.gateway_id.as_str()),
        Some("gw-test")
    );

    // Bob fetches in pages, each after the last.
    let mut bob = signed_in(&gateway, "demo-bob", false).await;
    let first = bob.fetch(Fetch { count: Some(1) }).await.expect("fetched");
    assert_eq!(first.messages.len(), 1);
    assert_eq!(
        (first.messages[0].content.as_str(), first.left),
        ("hello", 1)
    );
    let rest = bob.fetch(Fetch { count: None }).await.expect("fetched");
    let contents: Vec<&str> = rest.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!((contents, rest.left), (vec!["hi all"], 0));
    assert!(
        bob.fetch(Fetch { count: None })
            .await
            .expect("fetched")
            .messages
            .is_empty()
    );
}

#[tokio::test]
async fn a_client_id_is_the_message_id_and_a_resend_is_answered_not_stored() {
    let (gateway, inboxes) = gateway(Limits::default());
    let mut ann = signed_in(&gateway, "demo-ann", false).await;
    let first = ann
        .send_direct(
            message("demo-bob", "once", Some("ann-0001"), pb::Feature::Reliable),
            &meta("r"),
        )
        .await
        .expect("accepted");
    assert_eq!((first.id.as_str(), first.repeated), ("ann-0001", false));
    let again = ann
        .send_direct(
            message("demo-bob", "once", Some("ann-0001"), pb::Feature::Reliable),
            &meta("r"),
        )
        .await
        .expect("accepted");
    assert_eq!((again.id.as_str(), again.repeated), ("ann-0001", true));
    // The resend is answered even without ack mode: it is what the
    // client waits for.
    assert!(!ann.answers_accepted(&first));
    assert!(ann.answers_accepted(&again));

    // Batched, the repeat is found by its position.
    let envelopes = ["ann-0002", "ann-0001", "ann-0003"]
        .into_iter()
        .map(|id| {
            ann.check_direct(
                message("demo-bob", id, Some(id), pb::Feature::Fast),
                &meta(id),
            )
            .expect("valid")
        })
        .collect();
    let routed = ann
        .route_batch(envelopes, &meta("ann-0002"))
        .await
        .expect("routed");
    assert_eq!(
        (0..3).map(|i| routed.is_repeated(i)).collect::<Vec<_>>(),
        [false, true, false]
    );

    let mut bob = signed_in(&gateway, "demo-bob", false).await;
    let page = bob.fetch(Fetch { count: None }).await.expect("fetched");
    let ids: Vec<&str> = page.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["ann-0001"], "stored once");
    assert_eq!(inboxes.routed().len(), 3);
}

#[tokio::test]
async fn bad_sends_are_refused_with_the_protocol_codes() {
    let limits = Limits {
        max_content_bytes: 10,
        max_group_recipients: 2,
        ..Limits::default()
    };
    let (gateway, inboxes) = gateway(limits);
    let mut ann = signed_in(&gateway, "demo-ann", false).await;
    for (msg, code, text) in [
        (
            message("demo-bob", "x", Some(""), pb::Feature::Reliable),
            ErrorCode::InvalidFrame,
            "it is empty",
        ),
        (
            message("demo-bob", "x", Some("a b"), pb::Feature::Reliable),
            ErrorCode::InvalidFrame,
            "it contains ' '",
        ),
        (
            message("other-bob", "x", None, pb::Feature::Reliable),
            ErrorCode::InvalidRecipient,
            "recipient \"other-bob\" is not a user of app demo",
        ),
        (
            message("demo-", "x", None, pb::Feature::Reliable),
            ErrorCode::InvalidRecipient,
            "recipient \"demo-\" is not a user of app demo",
        ),
        (
            message("demo-bob", &"y".repeat(11), None, pb::Feature::Fast),
            ErrorCode::PayloadTooLarge,
            "content of 11 bytes exceeds the limit of 10",
        ),
    ] {
        let err = ann.send_direct(msg, &meta("r")).await.expect_err("refused");
        assert_eq!(err.code, code, "{err}");
        assert!(err.message.ends_with(text), "{err}");
    }
    let group = |to: Option<Vec<&str>>, group: Option<&str>, id: Option<&str>| GroupMessage {
        to: to.map(|t| t.into_iter().map(str::to_owned).collect()),
        group: group.map(str::to_owned),
        content: "x".into(),
        id: id.map(str::to_owned),
        feature: pb::Feature::Reliable,
    };
    for (msg, code, text) in [
        (
            group(Some(vec![]), None, None),
            ErrorCode::InvalidFrame,
            "data.to is empty",
        ),
        (
            group(Some(vec!["demo-1", "demo-2", "demo-3"]), None, None),
            ErrorCode::InvalidFrame,
            "3 recipients exceed the limit of 2",
        ),
        (
            group(Some(vec!["demo-1"]), Some("g"), None),
            ErrorCode::InvalidFrame,
            "GROUP_MESSAGE needs either data.to (a list of users) or data.group",
        ),
        (
            group(Some(vec!["demo-1"]), None, Some(&"i".repeat(65))),
            ErrorCode::InvalidFrame,
            "it has 65 characters",
        ),
    ] {
        let err = ann.send_group(msg, &meta("r")).await.expect_err("refused");
        assert_eq!(err.code, code, "{err}");
        assert!(err.message.ends_with(text), "{err}");
    }
    assert!(inboxes.routed().is_empty(), "nothing refused was routed");
}

#[tokio::test]
async fn ack_mode_replays_until_acknowledged_and_the_rate_limit_spares_acks() {
    let limits = Limits {
        messages_per_second: 2,
        ..Limits::default()
    };
    let (gateway, inboxes) = gateway(limits);
    let mut ann = signed_in(&gateway, "demo-ann", false).await;
    for content in ["one", "two"] {
        ann.admit(Some(CommandKind::Message))
            .expect("under the limit");
        ann.send_direct(
            message("demo-bob", content, None, pb::Feature::Reliable),
            &meta("r"),
        )
        .await
        .expect("accepted");
    }
    let limited = ann
        .admit(Some(CommandKind::Message))
        .expect_err("past the limit");
    assert_eq!(limited.code, ErrorCode::RateLimited);
    ann.admit(Some(CommandKind::Ack)).expect("ACK is exempt");

    let mut bob = signed_in(&gateway, "demo-bob", true).await;
    let replayed = bob.replay().await.expect("replayed");
    assert_eq!(replayed.messages.len(), 2);
    // What a transport does once it wrote them in ack mode.
    let stored: Vec<Stored> = replayed
        .messages
        .iter()
        .map(|m| Stored {
            seq: m.seq,
            id: m.id.clone(),
        })
        .collect();
    bob.unacked().track(100, stored.iter());
    bob.ack(Ack {
        ids: vec![replayed.messages[0].id.clone(), "unknown".into()],
    })
    .await
    .expect("acked");
    // The report reaches delivery in the background.
    let mut left = usize::MAX;
    for _ in 0..500 {
        left = inboxes.inbox_len("demo-bob");
        if left == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(left, 1, "the acknowledged message left the inbox");
    let mut again = signed_in(&gateway, "demo-bob", true).await;
    let page = again.replay().await.expect("replayed");
    let contents: Vec<&str> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["two"]);
    // Without ack mode there is no replay.
    let mut plain = signed_in(&gateway, "demo-bob", false).await;
    assert!(plain.replay().await.expect("replay").messages.is_empty());
}

#[test]
fn an_ack_of_an_id_two_senders_chose_acknowledges_one_message_per_occurrence() {
    let unacked = Unacked::default();
    let stored = |seq: u64, id: &str| Stored {
        seq,
        id: id.to_owned(),
    };
    let written = [stored(1, "same"), stored(2, "other"), stored(3, "same")];
    unacked.track(10, written.iter());
    // Written again (a replay): still tracked once.
    unacked.track(10, written.iter());
    // The client read the first "same" and acknowledges it: the second,
    // perhaps not read yet, stays until its own ACK.
    assert_eq!(unacked.take(&["same".to_owned()]), [1]);
    assert_eq!(unacked.take(&["same".to_owned()]), [3]);
    assert!(unacked.take(&["same".to_owned()]).is_empty());
    assert_eq!(unacked.take(&["other".to_owned()]), [2]);
    // Listed twice in one ACK: both, oldest first.
    unacked.track(10, written.iter());
    assert_eq!(
        unacked.take(&["same".to_owned(), "same".to_owned(), "other".to_owned()]),
        [1, 3, 2]
    );
    // The limit counts every tracked message.
    unacked.track(2, written.iter());
    let mut seqs = unacked.take(&["same".to_owned(), "other".to_owned()]);
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test]
async fn group_requests_are_checked_by_the_session_then_decided_by_the_groups_role() {
    use crate::commands::GroupCommand;
    use pb::GroupOp as Op;
    let (gateway, _) = gateway(Limits {
        max_group_members: 2,
        ..Limits::default()
    });
    let mut ann = signed_in(&gateway, "demo-ann", false).await;
    let cmd = |op, group: Option<&str>, name: Option<&str>, members: Option<&[&str]>| {
        ClientCommand::Group(GroupCommand {
            op,
            group: group.map(str::to_owned),
            name: name.map(str::to_owned),
            members: members.map(|m| m.iter().map(|u| (*u).to_owned()).collect()),
        })
    };
    for (command, code) in [
        (cmd(Op::Info, None, None, None), ErrorCode::InvalidFrame),
        (
            cmd(Op::Delete, Some(""), None, None),
            ErrorCode::InvalidFrame,
        ),
        (
            cmd(Op::Leave, Some("g/1"), None, None),
            ErrorCode::InvalidFrame,
        ),
        (
            cmd(Op::Rename, Some("g-1"), None, None),
            ErrorCode::InvalidFrame,
        ),
        (
            cmd(Op::Rename, Some("g-1"), Some(&"x".repeat(257)), None),
            ErrorCode::InvalidFrame,
        ),
        (
            cmd(Op::AddMembers, Some("g-1"), None, Some(&[])),
            ErrorCode::InvalidFrame,
        ),
        (
            cmd(Op::AddMembers, Some("g-1"), None, Some(&["other-bob"])),
            ErrorCode::InvalidRecipient,
        ),
        (
            cmd(
                Op::Create,
                None,
                None,
                Some(&["demo-b", "demo-c", "demo-d"]),
            ),
            ErrorCode::InvalidFrame,
        ),
    ] {
        let err = ann
            .execute(command, &meta("g"))
            .await
            .expect_err("refused by the session");
        assert_eq!(err.code, code, "{err}");
    }
    // A well-formed request reaches the groups role as this user.
    let outcome = ann
        .execute(
            cmd(Op::AddMembers, Some("g-1"), None, Some(&["demo-bob"])),
            &meta("g"),
        )
        .await
        .expect("answered");
    let Outcome::Group(group) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(group.op, Op::AddMembers);
    let record = group.reply.group.expect("the group");
    assert_eq!(
        (
            record.app_id.as_str(),
            record.owner.as_str(),
            record.group.as_str()
        ),
        ("demo", "demo-ann", "g-1")
    );
    assert_eq!(record.members, ["demo-bob"]);
}
