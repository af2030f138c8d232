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
