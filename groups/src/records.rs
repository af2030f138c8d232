//! The stored groups as the groups role sees them: typed calls over a
//! [`GroupRecordsClient`] (the store in this process, or the process that
//! holds it), and the server side that answers those calls from a
//! [`GroupStore`].

use std::sync::Arc;

use async_trait::async_trait;
use switchboard_mesh::{GroupRecords, GroupRecordsClient, ServiceError, pb};
use switchboard_store::{GroupChange, GroupStore, StoreError};

use pb::GroupRecordsOp as Op;

/// A store error crossing the mesh: a refused request is the caller's
/// mistake; anything else may pass (try again).
fn service_error(err: StoreError) -> ServiceError {
    match err {
        StoreError::Invalid(why) => ServiceError::invalid(why),
        other => ServiceError::unavailable(format!("group store: {other}")),
    }
}

/// Answers [`GroupRecords`] calls from a store (served where the store is).
pub struct StoredGroups(Arc<dyn GroupStore>);

impl StoredGroups {
    pub fn new(store: Arc<dyn GroupStore>) -> Self {
        StoredGroups(store)
    }
}

#[async_trait]
impl GroupRecords for StoredGroups {
    async fn call(
        &self,
        req: pb::GroupRecordsRequest,
    ) -> Result<pb::GroupRecordsReply, ServiceError> {
        let store = &self.0;
        let mut reply = pb::GroupRecordsReply::default();
        match req.op() {
            Op::Get => {
                reply.record = store
                    .group(&req.app_id, &req.group)
                    .await
                    .map_err(service_error)?;
                reply.found = reply.record.is_some();
            }
            Op::Create => {
                let record = req
                    .record
                    .ok_or_else(|| ServiceError::invalid("create without a record"))?;
                match store.create_group(&record).await.map_err(service_error)? {
                    None => {
                        reply.found = true;
                        reply.record = Some(record);
                    }
                    Some(existing) => reply.record = Some(existing),
                }
            }
            Op::Update => {
                let change = GroupChange {
                    add: req.add,
                    remove: req.remove,
                    name: req.rename.then_some(req.name),
                };
                reply.record = store
                    .update_group(&req.app_id, &req.group, &change)
                    .await
                    .map_err(service_error)?;
                reply.found = reply.record.is_some();
            }
            Op::Delete => {
                reply.record = store
                    .delete_group(&req.app_id, &req.group)
                    .await
                    .map_err(service_error)?;
                reply.found = reply.record.is_some();
            }
            Op::GroupsOf => {
                let user = req
                    .users
                    .first()
                    .ok_or_else(|| ServiceError::invalid("groups_of without a user"))?;
                reply.groups = store
                    .groups_of(&req.app_id, user)
                    .await
                    .map_err(service_error)?;
            }
            Op::CountGroups => {
                reply.counts = store
                    .count_groups(&req.app_id, &req.users)
                    .await
                    .map_err(service_error)?
                    .into_iter()
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                    .collect();
            }
        }
        Ok(reply)
    }
}

/// Typed calls to the stored groups.
#[derive(Clone)]
pub struct Records(GroupRecordsClient);

impl Records {
    pub fn new(client: GroupRecordsClient) -> Self {
        Records(client)
    }

    async fn call(
        &self,
        req: pb::GroupRecordsRequest,
    ) -> Result<pb::GroupRecordsReply, ServiceError> {
        self.0.call(req).await
    }

    pub async fn get(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<pb::GroupRecord>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::Get.into(),
                app_id: app_id.into(),
                group: group.into(),
                ..Default::default()
            })
            .await?;
        Ok(reply.record.filter(|_| reply.found))
    }

    /// `Ok(None)`: created; `Ok(Some(existing))`: the id was taken.
    pub async fn create(
        &self,
        record: pb::GroupRecord,
    ) -> Result<Option<pb::GroupRecord>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::Create.into(),
                app_id: record.app_id.clone(),
                group: record.group.clone(),
                record: Some(record),
                ..Default::default()
            })
            .await?;
        Ok(if reply.found { None } else { reply.record })
    }

    pub async fn update(
        &self,
        app_id: &str,
        group: &str,
        change: GroupChange,
    ) -> Result<Option<pb::GroupRecord>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::Update.into(),
                app_id: app_id.into(),
                group: group.into(),
                add: change.add,
                remove: change.remove,
                rename: change.name.is_some(),
                name: change.name.unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        Ok(reply.record.filter(|_| reply.found))
    }

    pub async fn delete(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<pb::GroupRecord>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::Delete.into(),
                app_id: app_id.into(),
                group: group.into(),
                ..Default::default()
            })
            .await?;
        Ok(reply.record.filter(|_| reply.found))
    }

    pub async fn groups_of(
        &self,
        app_id: &str,
        user: &str,
    ) -> Result<Vec<pb::GroupRecord>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::GroupsOf.into(),
                app_id: app_id.into(),
                users: vec![user.into()],
                ..Default::default()
            })
            .await?;
        Ok(reply.groups)
    }

    pub async fn count_groups(
        &self,
        app_id: &str,
        users: &[String],
    ) -> Result<Vec<u32>, ServiceError> {
        let reply = self
            .call(pb::GroupRecordsRequest {
                op: Op::CountGroups.into(),
                app_id: app_id.into(),
                users: users.to_vec(),
                ..Default::default()
            })
            .await?;
        if reply.counts.len() != users.len() {
            return Err(ServiceError::internal(
                "group store answered the wrong number of counts",
            ));
        }
        Ok(reply.counts)
    }
}
