//! Persistent groups and their memberships: what a group is called, who
//! owns it, who belongs to it, and which groups a user belongs to.
//!
//! The data model is three tables a shared database keeps as they are:
//! `groups (app, group) → name, owner, created`, `group_members (app, group,
//! user)` and its mirror `user_groups (app, user, group)`. Every write is
//! keyed, so repeating one (a retried call) changes nothing. The groups role
//! serializes the writes of one group at its owner; the store needs no
//! transaction across groups.

use std::sync::Arc;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;
pub use switchboard_proto::mesh::GroupRecord;

use crate::StoreError;

/// Most members one group may hold in any engine (the configured limit is
/// lower); bounds every read of a group.
pub const MAX_GROUP_MEMBERS: usize = 100_000;
/// Most groups [`GroupStore::groups_of`] returns.
pub const MAX_GROUPS_OF: usize = 100_000;
/// Longest group id, name or user id, bytes.
pub const MAX_FIELD_BYTES: usize = 1024;

/// A change of a group's members and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupChange {
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub name: Option<String>,
}

/// Persistent groups; see the module documentation.
#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    /// Stores `record` (members included) unless a group with its app and id
    /// exists. `Ok(None)`: created, durable when it returns;
    /// `Ok(Some(existing))`: nothing was written.
    async fn create_group(&self, record: &GroupRecord) -> Result<Option<GroupRecord>, StoreError>;

    /// The group with its members (sorted), or `None`.
    async fn group(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError>;

    /// Adds and removes members (a user in both is removed) and renames:
    /// durable when it returns. Adding a member or removing a non-member
    /// changes nothing. The group after the change, or `None` when there
    /// is no such group (nothing is written).
    async fn update_group(
        &self,
        app_id: &str,
        group: &str,
        change: &GroupChange,
    ) -> Result<Option<GroupRecord>, StoreError>;

    /// Deletes the group and every membership in it; durable when it
    /// returns. The group as it was, or `None` when there was none.
    async fn delete_group(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<GroupRecord>, StoreError>;

    /// The groups `user` belongs to, by group id, without their members (up
    /// to [`MAX_GROUPS_OF`]).
    async fn groups_of(&self, app_id: &str, user: &str) -> Result<Vec<GroupRecord>, StoreError>;

    /// How many groups each user belongs to, in order.
    async fn count_groups(&self, app_id: &str, users: &[String]) -> Result<Vec<u64>, StoreError>;
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("groups: {e}"))
}

pub(crate) fn check_field(what: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_FIELD_BYTES {
        return Err(StoreError::Invalid(format!(
            "a group's {what} is 1 to {MAX_FIELD_BYTES} bytes, not {}",
            value.len()
        )));
    }
    Ok(())
}

/// `len u16 BE | bytes` for each part: no two tuples share an encoding.
fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum());
    for part in parts {
        // Parts are checked to be at most MAX_FIELD_BYTES.
        k.extend_from_slice(&(part.len().min(u16::MAX as usize) as u16).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k
}

/// The last length-prefixed part of a key.
fn last_part(key: &[u8], prefix_len: usize) -> Result<String, StoreError> {
    let rest = key
        .get(prefix_len..)
        .ok_or(StoreError::Malformed("a group key shorter than its prefix"))?;
    let (len, part) = rest
        .split_first_chunk::<2>()
        .ok_or(StoreError::Malformed("a group key without a last part"))?;
    if usize::from(u16::from_be_bytes(*len)) != part.len() {
        return Err(StoreError::Malformed("a group key of the wrong length"));
    }
    String::from_utf8(part.to_vec()).map_err(|_| StoreError::Malformed("a group key not UTF-8"))
}

struct Inner {
    db: Database,
    /// `(app, group)` → the record without members.
    groups: Keyspace,
    /// `(app, group, user)` → nothing.
    members: Keyspace,
    /// `(app, user, group)` → nothing.
    user_groups: Keyspace,
}

impl Inner {
    fn head(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        match self.groups.get(key(&[app_id, group])).map_err(backend)? {
            Some(bytes) => Ok(Some(GroupRecord::decode(bytes.as_ref())?)),
            None => Ok(None),
        }
    }

    fn members(&self, app_id: &str, group: &str) -> Result<Vec<String>, StoreError> {
        let prefix = key(&[app_id, group]);
        let mut out = Vec::new();
        for guard in self.members.prefix(&prefix) {
            let k = guard.key().map_err(backend)?;
            out.push(last_part(&k, prefix.len())?);
            if out.len() >= MAX_GROUP_MEMBERS {
                break;
            }
        }
        // Keys order by length first: the contract promises sorted ids.
        out.sort_unstable();
        Ok(out)
    }

    fn full(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let Some(mut record) = self.head(app_id, group)? else {
            return Ok(None);
        };
        record.members = self.members(app_id, group)?;
        Ok(Some(record))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncData).map_err(backend)
    }
}

/// The groups of the fjall store: three keyspaces in its database
/// (checksummed by fjall), synced on every write.
#[derive(Clone)]
pub struct FjallGroups {
    inner: Arc<Inner>,
}

impl FjallGroups {
    pub(crate) fn open(db: &Database) -> Result<Self, StoreError> {
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(backend)
        };
        Ok(FjallGroups {
            inner: Arc::new(Inner {
                db: db.clone(),
                groups: open("groups")?,
                members: open("group_members")?,
                user_groups: open("user_groups")?,
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(backend)?
    }
}

#[async_trait]
impl GroupStore for FjallGroups {
    async fn create_group(&self, record: &GroupRecord) -> Result<Option<GroupRecord>, StoreError> {
        check_field("app id", &record.app_id)?;
        check_field("id", &record.group)?;
        check_field("owner", &record.owner)?;
        if record.name.len() > MAX_FIELD_BYTES {
            check_field("name", &record.name)?;
        }
        for user in &record.members {
            check_field("member", user)?;
        }
        if record.members.len() > MAX_GROUP_MEMBERS {
            return Err(StoreError::Invalid(format!(
                "a group has at most {MAX_GROUP_MEMBERS} members"
            )));
        }
        let record = record.clone();
        self.blocking(move |inner| {
            let (app, group) = (record.app_id.as_str(), record.group.as_str());
            if let Some(existing) = inner.full(app, group)? {
                return Ok(Some(existing));
            }
            let head = GroupRecord {
                members: Vec::new(),
                ..record.clone()
            };
            let mut wb = inner.db.batch();
            wb.insert(&inner.groups, key(&[app, group]), head.encode_to_vec());
            for user in &record.members {
                wb.insert(&inner.members, key(&[app, group, user]), []);
                wb.insert(&inner.user_groups, key(&[app, user, group]), []);
            }
            wb.commit().map_err(backend)?;
            inner.sync()?;
            Ok(None)
        })
        .await
    }

    async fn group(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let (app, group) = (app_id.to_owned(), group.to_owned());
        self.blocking(move |inner| inner.full(&app, &group)).await
    }

    async fn update_group(
        &self,
        app_id: &str,
        group: &str,
        change: &GroupChange,
    ) -> Result<Option<GroupRecord>, StoreError> {
        for user in change.add.iter().chain(&change.remove) {
            check_field("member", user)?;
        }
        if let Some(name) = &change.name
            && name.len() > MAX_FIELD_BYTES
        {
            check_field("name", name)?;
        }
        let (app, group, change) = (app_id.to_owned(), group.to_owned(), change.clone());
        self.blocking(move |inner| {
            let Some(mut head) = inner.head(&app, &group)? else {
                return Ok(None);
            };
            let mut wb = inner.db.batch();
            if let Some(name) = &change.name {
                head.name = name.clone();
                wb.insert(&inner.groups, key(&[&app, &group]), head.encode_to_vec());
            }
            for user in change.add.iter().filter(|u| !change.remove.contains(u)) {
                wb.insert(&inner.members, key(&[&app, &group, user]), []);
                wb.insert(&inner.user_groups, key(&[&app, user, &group]), []);
            }
            for user in &change.remove {
                wb.remove(&inner.members, key(&[&app, &group, user]));
                wb.remove(&inner.user_groups, key(&[&app, user, &group]));
            }
            wb.commit().map_err(backend)?;
            inner.sync()?;
            head.members = inner.members(&app, &group)?;
            Ok(Some(head))
        })
        .await
    }

    async fn delete_group(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<GroupRecord>, StoreError> {
        let (app, group) = (app_id.to_owned(), group.to_owned());
        self.blocking(move |inner| {
            let Some(record) = inner.full(&app, &group)? else {
                return Ok(None);
            };
            let mut wb = inner.db.batch();
            for user in &record.members {
                wb.remove(&inner.members, key(&[&app, &group, user]));
                wb.remove(&inner.user_groups, key(&[&app, user, &group]));
            }
            wb.remove(&inner.groups, key(&[&app, &group]));
            wb.commit().map_err(backend)?;
            inner.sync()?;
            Ok(Some(record))
        })
        .await
    }

    async fn groups_of(&self, app_id: &str, user: &str) -> Result<Vec<GroupRecord>, StoreError> {
        let (app, user) = (app_id.to_owned(), user.to_owned());
        self.blocking(move |inner| {
            let prefix = key(&[&app, &user]);
            let mut out = Vec::new();
            for guard in inner.user_groups.prefix(&prefix) {
                let k = guard.key().map_err(backend)?;
                let group = last_part(&k, prefix.len())?;
                // A membership without its group cannot be written (one
                // batch each); skip rather than fail if an engine shows one.
                if let Some(head) = inner.head(&app, &group)? {
                    out.push(head);
                }
                if out.len() >= MAX_GROUPS_OF {
                    break;
                }
            }
            out.sort_unstable_by(|a, b| a.group.cmp(&b.group));
            Ok(out)
        })
        .await
    }

    async fn count_groups(&self, app_id: &str, users: &[String]) -> Result<Vec<u64>, StoreError> {
        let (app, users) = (app_id.to_owned(), users.to_vec());
        self.blocking(move |inner| {
            users
                .iter()
                .map(|user| {
                    let mut n = 0u64;
                    for guard in inner.user_groups.prefix(key(&[&app, user])) {
                        guard.key().map_err(backend)?;
                        n += 1;
                    }
                    Ok(n)
                })
                .collect()
        })
        .await
    }
}
