//! Persistent groups in PostgreSQL: `groups` and `group_members` (with an
//! index by user for "the groups of a user"). A write is one transaction.

use async_trait::async_trait;

use crate::StoreError;
use crate::groups::{
    GroupChange, GroupRecord, GroupStore, MAX_FIELD_BYTES, MAX_GROUP_MEMBERS, MAX_GROUPS_OF,
    check_field,
};
use crate::postgres::{Db, pg_error};

const HEAD: &str = "SELECT name, owner, created_ms FROM groups WHERE app = $1 AND grp = $2";
const HEAD_FOR_UPDATE: &str =
    "SELECT name, owner, created_ms FROM groups WHERE app = $1 AND grp = $2 FOR UPDATE";
const MEMBERS: &str =
    "SELECT user_id FROM group_members WHERE app = $1 AND grp = $2 ORDER BY user_id LIMIT $3";
const CREATE: &str = "
INSERT INTO groups (app, grp, name, owner, created_ms) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (app, grp) DO NOTHING";
const ADD: &str = "
INSERT INTO group_members (app, grp, user_id)
SELECT $1, $2, u FROM unnest($3::text[]) AS u ORDER BY u
ON CONFLICT DO NOTHING";
const REMOVE: &str =
    "DELETE FROM group_members WHERE app = $1 AND grp = $2 AND user_id = ANY($3::text[])";
const RENAME: &str = "UPDATE groups SET name = $3 WHERE app = $1 AND grp = $2";
const DELETE: &str = "DELETE FROM groups WHERE app = $1 AND grp = $2";
const GROUPS_OF: &str = "
SELECT g.grp, g.name, g.owner, g.created_ms
FROM group_members m JOIN groups g ON g.app = m.app AND g.grp = m.grp
WHERE m.app = $1 AND m.user_id = $2
ORDER BY g.grp LIMIT $3";
const COUNT_GROUPS: &str = "
SELECT u.ord, count(m.grp)
FROM unnest($2::text[]) WITH ORDINALITY AS u(user_id, ord)
LEFT JOIN group_members m ON m.app = $1 AND m.user_id = u.user_id
GROUP BY u.ord ORDER BY u.ord";

/// The groups of the PostgreSQL engine.
pub(crate) struct PostgresGroups {
    db: Db,
}

impl PostgresGroups {
    pub(crate) fn new(db: Db) -> Self {
        PostgresGroups { db }
    }
}

fn head(app: &str, group: &str, row: &tokio_postgres::Row) -> GroupRecord {
    GroupRecord {
        app_id: app.to_owned(),
        group: group.to_owned(),
        name: row.get(0),
        owner: row.get(1),
        created_ms: row.get(2),
        members: Vec::new(),
    }
}

const MAX_MEMBERS: i64 = MAX_GROUP_MEMBERS as i64;

async fn members(
    client: &impl deadpool_postgres::GenericClient,
    app: &str,
    group: &str,
) -> Result<Vec<String>, StoreError> {
    let statement = client.prepare_cached(MEMBERS).await.map_err(pg_error)?;
    Ok(client
        .query(&statement, &[&app, &group, &MAX_MEMBERS])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Runs one prepared statement in a transaction or on a client.
async fn run(
    client: &impl deadpool_postgres::GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
    client.execute(&statement, params).await.map_err(pg_error)
}

async fn rows(
    client: &impl deadpool_postgres::GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(pg_error)?;
    client.query(&statement, params).await.map_err(pg_error)
}

#[async_trait]
impl GroupStore for PostgresGroups {
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
        let (app, group) = (record.app_id.as_str(), record.group.as_str());
        let mut client = self.db.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let created = run(
            &tx,
            CREATE,
            &[
                &app,
                &group,
                &record.name,
                &record.owner,
                &record.created_ms,
            ],
        )
        .await?;
        if created == 0 {
            // It exists: the one there is returned, nothing written.
            let existing = rows(&tx, HEAD, &[&app, &group]).await?;
            let mut out = existing.first().map(|r| head(app, group, r));
            if let Some(g) = &mut out {
                g.members = members(&tx, app, group).await?;
            }
            tx.commit().await.map_err(pg_error)?;
            return Ok(out);
        }
        run(&tx, ADD, &[&app, &group, &record.members]).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(None)
    }

    async fn group(&self, app_id: &str, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let mut client = self.db.client().await?;
        // One snapshot for the head and its members.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_error)?;
        let found = rows(&tx, HEAD, &[&app_id, &group]).await?;
        let Some(row) = found.first() else {
            return Ok(None);
        };
        let mut record = head(app_id, group, row);
        record.members = members(&tx, app_id, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(record))
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
        let mut client = self.db.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let found = rows(&tx, HEAD_FOR_UPDATE, &[&app_id, &group]).await?;
        let Some(row) = found.first() else {
            return Ok(None);
        };
        let mut record = head(app_id, group, row);
        if let Some(name) = &change.name {
            run(&tx, RENAME, &[&app_id, &group, name]).await?;
            record.name = name.clone();
        }
        // A user both added and removed is removed.
        let add: Vec<&String> = change
            .add
            .iter()
            .filter(|u| !change.remove.contains(u))
            .collect();
        if !add.is_empty() {
            run(&tx, ADD, &[&app_id, &group, &add]).await?;
        }
        if !change.remove.is_empty() {
            run(&tx, REMOVE, &[&app_id, &group, &change.remove]).await?;
        }
        record.members = members(&tx, app_id, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(record))
    }

    async fn delete_group(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<GroupRecord>, StoreError> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let found = rows(&tx, HEAD_FOR_UPDATE, &[&app_id, &group]).await?;
        let Some(row) = found.first() else {
            return Ok(None);
        };
        let mut record = head(app_id, group, row);
        record.members = members(&tx, app_id, group).await?;
        // Memberships go with it (ON DELETE CASCADE).
        run(&tx, DELETE, &[&app_id, &group]).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(Some(record))
    }

    async fn groups_of(&self, app_id: &str, user: &str) -> Result<Vec<GroupRecord>, StoreError> {
        let limit = MAX_GROUPS_OF as i64;
        let found = self.db.query(GROUPS_OF, &[&app_id, &user, &limit]).await?;
        Ok(found
            .iter()
            .map(|row| GroupRecord {
                app_id: app_id.to_owned(),
                group: row.get(0),
                name: row.get(1),
                owner: row.get(2),
                created_ms: row.get(3),
                members: Vec::new(),
            })
            .collect())
    }

    async fn count_groups(&self, app_id: &str, users: &[String]) -> Result<Vec<u64>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.db.query(COUNT_GROUPS, &[&app_id, &users]).await?;
        Ok(found
            .iter()
            .map(|row| u64::try_from(row.get::<_, i64>(1)).unwrap_or(0))
            .collect())
    }
}
