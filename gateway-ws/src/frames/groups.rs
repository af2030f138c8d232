//! Frames of persistent groups: the request types, their parsing into a
//! [`GroupCommand`], and the replies.

use serde::Serialize;
use switchboard_mesh::pb;

use super::{ClientFrame, FrameError, render};
use crate::commands::GroupCommand;

use pb::GroupOp as Op;

/// The group operation a frame type names.
pub(super) fn op_of(name: &str) -> Option<Op> {
    Some(match name {
        "GROUP_CREATE" => Op::Create,
        "GROUP_ADD_MEMBERS" => Op::AddMembers,
        "GROUP_REMOVE_MEMBERS" => Op::RemoveMembers,
        "GROUP_RENAME" => Op::Rename,
        "GROUP_LEAVE" => Op::Leave,
        "GROUP_DELETE" => Op::Delete,
        "GROUP_INFO" => Op::Info,
        "GROUPS_LIST" => Op::List,
        _ => return None,
    })
}

/// The frame type of a group operation.
pub(super) fn type_name(op: Op) -> &'static str {
    match op {
        Op::Create => "GROUP_CREATE",
        Op::AddMembers => "GROUP_ADD_MEMBERS",
        Op::RemoveMembers => "GROUP_REMOVE_MEMBERS",
        Op::Rename => "GROUP_RENAME",
        Op::Leave => "GROUP_LEAVE",
        Op::Delete => "GROUP_DELETE",
        Op::Info => "GROUP_INFO",
        Op::List => "GROUPS_LIST",
    }
}

impl ClientFrame {
    /// A group request's fields, moved out; which are required is the
    /// session's rule, only their JSON types are checked here.
    pub(super) fn group_command(&mut self, op: Op) -> Result<GroupCommand, FrameError> {
        Ok(GroupCommand {
            op,
            group: self.take_optional_string("group")?,
            name: self.take_optional_string("name")?,
            members: self.take_string_list("members")?,
        })
    }
}

#[derive(Serialize)]
struct GroupData<'a> {
    group: &'a str,
    name: &'a str,
    owner: &'a str,
    members: &'a [String],
}

#[derive(Serialize)]
struct GroupRef<'a> {
    group: &'a str,
}

#[derive(Serialize)]
struct Summary<'a> {
    group: &'a str,
    name: &'a str,
    owner: &'a str,
}

#[derive(Serialize)]
struct GroupList<'a> {
    groups: Vec<Summary<'a>>,
}

/// The reply to a group request: `(frame type, text)`.
pub fn group_reply(
    op: Op,
    reply: &pb::GroupCommandReply,
    reference: Option<&str>,
) -> (&'static str, String) {
    let empty = pb::GroupRecord::default();
    let group = reply.group.as_ref().unwrap_or(&empty);
    let whole = || GroupData {
        group: &group.group,
        name: &group.name,
        owner: &group.owner,
        members: &group.members,
    };
    match op {
        Op::Create => ("GROUP_CREATED", render("GROUP_CREATED", whole(), reference)),
        Op::Info => ("GROUP_INFO", render("GROUP_INFO", whole(), reference)),
        Op::List => {
            let groups = reply
                .groups
                .iter()
                .map(|g| Summary {
                    group: &g.group,
                    name: &g.name,
                    owner: &g.owner,
                })
                .collect();
            (
                "GROUPS_LIST",
                render("GROUPS_LIST", GroupList { groups }, reference),
            )
        }
        Op::AddMembers | Op::RemoveMembers | Op::Rename | Op::Leave | Op::Delete => (
            "GROUP_UPDATED",
            render(
                "GROUP_UPDATED",
                GroupRef {
                    group: &group.group,
                },
                reference,
            ),
        ),
    }
}

/// A GROUP_EVENT: its `data` was rendered by the groups role.
pub(super) fn group_event(msg: &pb::InboxMessage) -> String {
    let data = if msg.content.starts_with('{') {
        msg.content.as_str()
    } else {
        "{}"
    };
    format!(r#"{{"type":"GROUP_EVENT","data":{data}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{ClientCommand, CommandKind};
    use crate::frames::{FrameKind, parse};

    #[test]
    fn every_group_type_parses_into_its_command_and_back() {
        for op in [
            Op::Create,
            Op::AddMembers,
            Op::RemoveMembers,
            Op::Rename,
            Op::Leave,
            Op::Delete,
            Op::Info,
            Op::List,
        ] {
            let name = type_name(op);
            assert_eq!(op_of(name), Some(op));
            let mut frame = parse(&format!(
                r#"{{"type":"{name}","data":{{"group":"g-1","name":"T","members":["demo-a"],"other":1}},"reference":"r"}}"#
            ))
            .expect("parse");
            assert_eq!(frame.kind, FrameKind::Command(CommandKind::Group(op)));
            let ClientCommand::Group(cmd) = frame.command().expect("command") else {
                panic!("not a group command");
            };
            assert_eq!(cmd.op, op);
            assert_eq!(cmd.group.as_deref(), Some("g-1"));
            assert_eq!(cmd.name.as_deref(), Some("T"));
            assert_eq!(cmd.members, Some(vec!["demo-a".to_owned()]));
        }
        // GROUPS_LIST needs no data at all.
        let mut frame = parse(r#"{"type":"GROUPS_LIST"}"#).expect("parse");
        assert!(matches!(frame.command(), Ok(ClientCommand::Group(_))));
    }

    #[test]
    fn members_of_the_wrong_type_are_invalid_frames() {
        let mut frame =
            parse(r#"{"type":"GROUP_CREATE","data":{"members":"demo-a"},"reference":"r"}"#)
                .expect("parse");
        let err = frame.command().expect_err("not a list");
        assert_eq!(err.code, switchboard_mesh::ErrorCode::InvalidFrame);
        assert_eq!(err.reference.as_deref(), Some("r"));
    }

    #[test]
    fn replies_and_events_render_as_the_protocol_says() {
        let group = pb::GroupRecord {
            group: "g-42".into(),
            name: "Team".into(),
            owner: "ANZ-1".into(),
            members: vec!["ANZ-1".into(), "ANZ-2".into()],
            ..Default::default()
        };
        let reply = pb::GroupCommandReply {
            group: Some(group.clone()),
            groups: vec![pb::GroupRecord {
                members: Vec::new(),
                ..group
            }],
        };
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
        let (kind, text) = group_reply(Op::Create, &reply, Some("r1"));
        assert_eq!(kind, "GROUP_CREATED");
        assert_eq!(
            json(&text),
            serde_json::json!({"type":"GROUP_CREATED","data":{"group":"g-42","name":"Team","owner":"ANZ-1","members":["ANZ-1","ANZ-2"]},"reference":"r1"})
        );
        let (_, text) = group_reply(Op::Leave, &reply, None);
        assert_eq!(
            json(&text),
            serde_json::json!({"type":"GROUP_UPDATED","data":{"group":"g-42"}})
        );
        let (_, text) = group_reply(Op::List, &reply, None);
        assert_eq!(
            json(&text),
            serde_json::json!({"type":"GROUPS_LIST","data":{"groups":[{"group":"g-42","name":"Team","owner":"ANZ-1"}]}})
        );
        let event = pb::InboxMessage {
            kind: pb::MessageKind::GroupEvent.into(),
            content:
                r#"{"group":"g-42","event":"left","by":"ANZ-2","members":["ANZ-2"],"name":"Team"}"#
                    .into(),
            ..Default::default()
        };
        assert_eq!(
            json(&crate::frames::render_push(
                &pb::PushItem::default(),
                &event
            )),
            serde_json::json!({"type":"GROUP_EVENT","data":{"group":"g-42","event":"left","by":"ANZ-2","members":["ANZ-2"],"name":"Team"}})
        );
    }
}
