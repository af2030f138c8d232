//! Persistent groups in ScyllaDB: the three tables of the group data model
//! (groups.rs) as they are. Creating a group, renaming it and deleting it
//! are lightweight transactions on its head row (exactly one creator; a
//! rename never brings a deleted group back); a membership is its row in
//! `group_members` and its mirror in `user_groups`, written together in a
//! logged batch. The groups role serializes the writes of one group, so no
//! transaction spans groups.

use std::sync::Arc;

use ::scylla::statement::batch::{Batch, BatchType};
use ::scylla::statement::prepared::PreparedStatement;
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};

use crate::StoreError;
use crate::groups::{
    GroupChange, GroupRecord, GroupStore, MAX_FIELD_BYTES, MAX_GROUP_MEMBERS, MAX_GROUPS_OF,
    check_field,
};
use crate::scylla_store::{Shared, applied, at_most, backend};

/// Memberships per logged batch (two rows each).
const MEMBERS_PER_BATCH: usize = 50;
const PARALLEL: usize = 16;

struct GroupStatements {
    create: PreparedStatement,
    head: PreparedStatement,
    rename: PreparedStatement,
    delete: PreparedStatement,
    members: PreparedStatement,
    add_member: PreparedStatement,
    add_user_group: PreparedStatement,
    remove_member: PreparedStatement,
    remove_user_group: PreparedStatement,
    user_groups: PreparedStatement,
    count: PreparedStatement,
}

/// The groups of the ScyllaDB engine.
#[derive(Clone)]
pub struct ScyllaGroups {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    st: GroupStatements,
}

impl ScyllaGroups {
    pub(crate) async fn new(shared: Arc<Shared>) -> Result<Self, StoreError> {
        let st = GroupStatements {
            create: shared
                .prepare(
                    "INSERT INTO {ks}.groups (app_id, group_id, name, owner, created_ms) \
                     VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
                )
                .await?,
            head: shared
                .prepare(
                    "SELECT name, owner, created_ms FROM {ks}.groups WHERE app_id = ? \
                     AND group_id = ?",
                )
                .await?,
            rename: shared
                .prepare(
                    "UPDATE {ks}.groups SET name = ? WHERE app_id = ? AND group_id = ? IF EXISTS",
                )
                .await?,
            delete: shared
                .prepare("DELETE FROM {ks}.groups WHERE app_id = ? AND group_id = ? IF EXISTS")
                .await?,
            members: shared
                .prepare("SELECT user_id FROM {ks}.group_members WHERE app_id = ? AND group_id = ?")
                .await?,
            add_member: shared
                .prepare(
                    "INSERT INTO {ks}.group_members (app_id, group_id, user_id) VALUES (?, ?, ?)",
                )
                .await?,
            add_user_group: shared
                .prepare(
                    "INSERT INTO {ks}.user_groups (app_id, user_id, group_id) VALUES (?, ?, ?)",
                )
                .await?,
            remove_member: shared
                .prepare(
                    "DELETE FROM {ks}.group_members WHERE app_id = ? AND group_id = ? \
                     AND user_id = ?",
                )
                .await?,
            remove_user_group: shared
                .prepare(
                    "DELETE FROM {ks}.user_groups WHERE app_id = ? AND user_id = ? \
                     AND group_id = ?",
                )
                .await?,
            user_groups: shared
                .prepare("SELECT group_id FROM {ks}.user_groups WHERE app_id = ? AND user_id = ?")
                .await?,
            count: shared
                .prepare("SELECT COUNT(*) FROM {ks}.user_groups WHERE app_id = ? AND user_id = ?")
                .await?,
        };
        Ok(ScyllaGroups {
            inner: Arc::new(Inner { shared, st }),
        })
    }
}

impl Inner {
    async fn head(&self, app: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let result = self
            .shared
            .session
            .execute_unpaged(&self.st.head, (app, group))
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?;
        let row = result
            .maybe_first_row::<(Option<String>, Option<String>, Option<i64>)>()
            .map_err(backend)?;
        Ok(row.map(|(name, owner, created_ms)| GroupRecord {
            app_id: app.to_owned(),
            group: group.to_owned(),
            name: name.unwrap_or_default(),
            owner: owner.unwrap_or_default(),
            members: Vec::new(),
            created_ms: created_ms.unwrap_or(0),
        }))
    }

    /// The members, sorted (the clustering order), at most
    /// [`MAX_GROUP_MEMBERS`]; paged.
    async fn members(&self, app: &str, group: &str) -> Result<Vec<String>, StoreError> {
        self.shared
            .session
            .execute_iter(self.st.members.clone(), (app, group))
            .await
            .map_err(backend)?
            .rows_stream::<(String,)>()
            .map_err(backend)?
            .take(MAX_GROUP_MEMBERS)
            .map_ok(|(user,)| user)
            .map_err(backend)
            .try_collect()
            .await
    }

    async fn full(&self, app: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let Some(mut record) = self.head(app, group).await? else {
            return Ok(None);
        };
        record.members = self.members(app, group).await?;
        Ok(Some(record))
    }

    /// Adds (or removes) the memberships of `users`: each a member row and
    /// its mirror, in logged batches, which the cluster applies whole.
    async fn memberships(
        &self,
        app: &str,
        group: &str,
        users: &[String],
        add: bool,
    ) -> Result<(), StoreError> {
        let session = &self.shared.session;
        let (member, mirror) = if add {
            (&self.st.add_member, &self.st.add_user_group)
        } else {
            (&self.st.remove_member, &self.st.remove_user_group)
        };
        let mut writes = Vec::new();
        for chunk in users.chunks(MEMBERS_PER_BATCH) {
            let mut batch = Batch::new(BatchType::Logged);
            let mut values = Vec::with_capacity(chunk.len() * 2);
            for user in chunk {
                batch.append_statement(member.clone());
                values.push((app, group, user.as_str()));
                batch.append_statement(mirror.clone());
                values.push((app, user.as_str(), group));
            }
            writes.push(async move { session.batch(&batch, values).await.map_err(backend) });
        }
        at_most(PARALLEL, writes).await?;
        Ok(())
    }
}

#[async_trait]
impl GroupStore for ScyllaGroups {
    async fn create_group(&self, record: &GroupRecord) -> Result<Option<GroupRecord>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
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
        let (app, group) = (record.app_id.as_str(), record.group.as_str());
        let created = applied(
            inner
                .shared
                .session
                .execute_unpaged(
                    &inner.st.create,
                    (app, group, &record.name, &record.owner, record.created_ms),
                )
                .await
                .map_err(backend)?,
        )?;
        if !created {
            return inner.full(app, group).await;
        }
        inner.memberships(app, group, &record.members, true).await?;
        Ok(None)
    }

    async fn group(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        self.inner.shared.check_open()?;
        self.inner.full(app_id, group).await
    }

    async fn update_group(
        &self,
        app_id: &str,
        group: &str,
        change: &GroupChange,
    ) -> Result<Option<GroupRecord>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        for user in change.add.iter().chain(&change.remove) {
            check_field("member", user)?;
        }
        if let Some(name) = &change.name
            && name.len() > MAX_FIELD_BYTES
        {
            check_field("name", name)?;
        }
        let Some(mut head) = inner.head(app_id, group).await? else {
            return Ok(None);
        };
        if let Some(name) = &change.name {
            let renamed = applied(
                inner
                    .shared
                    .session
                    .execute_unpaged(&inner.st.rename, (name, app_id, group))
                    .await
                    .map_err(backend)?,
            )?;
            if !renamed {
                // Deleted since it was read.
                return Ok(None);
            }
            head.name = name.clone();
        }
        let add: Vec<String> = change
            .add
            .iter()
            .filter(|u| !change.remove.contains(u))
            .cloned()
            .collect();
        inner.memberships(app_id, group, &add, true).await?;
        inner
            .memberships(app_id, group, &change.remove, false)
            .await?;
        head.members = inner.members(app_id, group).await?;
        Ok(Some(head))
    }

    async fn delete_group(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<GroupRecord>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        let Some(record) = inner.full(app_id, group).await? else {
            return Ok(None);
        };
        // The memberships first: a crash half-way leaves the group with
        // fewer members, and deleting it again finishes the job.
        inner
            .memberships(app_id, group, &record.members, false)
            .await?;
        let deleted = applied(
            inner
                .shared
                .session
                .execute_unpaged(&inner.st.delete, (app_id, group))
                .await
                .map_err(backend)?,
        )?;
        Ok(deleted.then_some(record))
    }

    async fn groups_of(&self, app_id: &str, user: &str) -> Result<Vec<GroupRecord>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        let ids: Vec<String> = inner
            .shared
            .session
            .execute_iter(inner.st.user_groups.clone(), (app_id, user))
            .await
            .map_err(backend)?
            .rows_stream::<(String,)>()
            .map_err(backend)?
            .take(MAX_GROUPS_OF)
            .map_ok(|(group,)| group)
            .map_err(backend)
            .try_collect()
            .await?;
        // In clustering order, that is by group id; a membership whose
        // group is gone (a delete that stopped half-way) is skipped.
        let mut reads = Vec::with_capacity(ids.len());
        for group in &ids {
            reads.push(inner.head(app_id, group));
        }
        let heads = at_most(PARALLEL, reads).await?;
        Ok(heads.into_iter().flatten().collect())
    }

    async fn count_groups(&self, app_id: &str, users: &[String]) -> Result<Vec<u64>, StoreError> {
        let inner = &*self.inner;
        inner.shared.check_open()?;
        let mut counts = Vec::with_capacity(users.len());
        for user in users {
            counts.push(async move {
                let (n,) = inner
                    .shared
                    .session
                    .execute_unpaged(&inner.st.count, (app_id, user))
                    .await
                    .map_err(backend)?
                    .into_rows_result()
                    .map_err(backend)?
                    .first_row::<(i64,)>()
                    .map_err(backend)?;
                Ok::<_, StoreError>(u64::try_from(n).unwrap_or(0))
            });
        }
        at_most(PARALLEL, counts).await
    }
}
