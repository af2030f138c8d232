//! Requests about persistent groups: checked for form here (ids, names,
//! members of the sender's app, sizes), decided by the groups instance that
//! owns the group (rights, membership, limits).

use switchboard_mesh::{ErrorCode, ServiceError, pb};

use super::{Session, call, check_recipient};
use crate::commands::GroupCommand;

use pb::GroupOp as Op;

/// Longest group id, in characters (as client message ids).
pub const MAX_GROUP_ID_CHARS: usize = 64;
/// Longest group name, bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 256;

/// What a group request came to.
#[derive(Debug)]
pub struct GroupOutcome {
    pub op: Op,
    pub reply: pb::GroupCommandReply,
}

/// A group id: 1–64 characters of `A-Z a-z 0-9 _ -` (as message ids).
fn check_group_id(id: &str) -> Result<(), ServiceError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_GROUP_ID_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(format!(
            "data.group must be 1 to {MAX_GROUP_ID_CHARS} characters of A-Z a-z 0-9 _ -"
        )))
    }
}

impl Session {
    /// A request about a persistent group, answered by its owner.
    pub async fn group_command(&self, cmd: GroupCommand) -> Result<GroupOutcome, ServiceError> {
        let id = self.user()?;
        let op = cmd.op;
        let group = match (op, cmd.group) {
            (Op::List, _) => String::new(),
            (Op::Create, None) => String::new(),
            (_, Some(group)) => {
                check_group_id(&group)?;
                group
            }
            (_, None) => return Err(ServiceError::invalid("missing field data.group")),
        };
        let name = match (op, cmd.name) {
            (Op::Rename, None) => return Err(ServiceError::invalid("missing field data.name")),
            (Op::Create | Op::Rename, Some(name)) => {
                if name.len() > MAX_GROUP_NAME_BYTES {
                    return Err(ServiceError::invalid(format!(
                        "data.name is longer than {MAX_GROUP_NAME_BYTES} bytes"
                    )));
                }
                name
            }
            _ => String::new(),
        };
        let members = match (op, cmd.members) {
            (Op::AddMembers | Op::RemoveMembers, None) => {
                return Err(ServiceError::invalid("missing field data.members"));
            }
            (Op::AddMembers | Op::RemoveMembers, Some(m)) if m.is_empty() => {
                return Err(ServiceError::invalid("data.members is empty"));
            }
            (Op::Create | Op::AddMembers | Op::RemoveMembers, Some(members)) => {
                let max = self.gw.limits.max_group_members;
                if members.len() > max {
                    return Err(ServiceError::invalid(format!(
                        "{} members exceed the limit of {max} per group",
                        members.len()
                    )));
                }
                for user in &members {
                    check_recipient(id, user, self.gw.limits.max_user_id_chars)?;
                }
                members
            }
            _ => Vec::new(),
        };
        let req = pb::GroupCommandRequest {
            app_id: id.app_id.clone(),
            user_id: id.user_id.clone(),
            op: op.into(),
            group,
            name,
            members,
            origin: None,
        };
        let reply = call(self.gw.deps.groups.command(req)).await?;
        if op != Op::List && reply.group.is_none() {
            return Err(ServiceError::new(
                ErrorCode::Internal,
                "the groups role answered without the group",
            ));
        }
        Ok(GroupOutcome { op, reply })
    }
}
