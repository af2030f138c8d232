//! Persistent groups at the groups instance that owns them (rendezvous
//! hashing on the group id picks it): the requests about a group (create,
//! members, rename, leave, delete, info, list), the membership events to its
//! members, and the fan-out of a message to every member.
//!
//! The store holds every group; the owner caches what it read or wrote, for
//! [`CACHE_TTL`] at most, so a group whose owner changed (an instance joined
//! or left) is read again soon. Changes of one group are serialized here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchboard_mesh::{DeliveryClient, ErrorCode, GroupAdmin, ServiceError, pb};
use switchboard_store::GroupChange;

use crate::records::Records;
use pb::GroupOp as Op;

/// How long a cached group is used before it is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Members (summed over groups) the cache holds at most.
const CACHE_MEMBERS: usize = 1_000_000;
/// Locks that serialize changes, by group hash.
const LOCK_SHARDS: usize = 64;

/// The configured limits of persistent groups.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    /// Members of one group, the owner included.
    pub max_members: usize,
    /// Groups one user belongs to.
    pub max_groups_per_user: usize,
    /// Recipients per delivery call of a fan-out (one store write each).
    pub fanout_batch: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            max_members: 10_000,
            max_groups_per_user: 1_000,
            fanout_batch: 1_000,
        }
    }
}

struct Cached {
    group: Arc<pb::GroupRecord>,
    at: Instant,
}

#[derive(Default)]
struct Cache {
    groups: HashMap<(String, String), Cached>,
    members: usize,
    /// Counts writes of changed groups: a store read that a change
    /// overtook must not put the older group back.
    changes: u64,
}

impl Cache {
    fn get(&self, app_id: &str, group: &str) -> Option<Arc<pb::GroupRecord>> {
        // The key is owned: a lookup allocates, which is small next to a
        // fan-out.
        let cached = self.groups.get(&(app_id.to_owned(), group.to_owned()))?;
        (cached.at.elapsed() < CACHE_TTL).then(|| cached.group.clone())
    }

    /// A group as a change left it.
    fn put(&mut self, group: Arc<pb::GroupRecord>) {
        self.changes += 1;
        self.insert(group);
    }

    /// A group read from the store when the cache had seen `changes`
    /// changes: kept only when no change happened since.
    fn put_read(&mut self, group: Arc<pb::GroupRecord>, changes: u64) {
        if self.changes == changes {
            self.insert(group);
        }
    }

    fn insert(&mut self, group: Arc<pb::GroupRecord>) {
        let key = (group.app_id.clone(), group.group.clone());
        self.evict(&key.0, &key.1);
        if self.members + group.members.len() > CACHE_MEMBERS {
            self.groups.retain(|_, c| c.at.elapsed() < CACHE_TTL);
            self.members = self.groups.values().map(|c| c.group.members.len()).sum();
        }
        while self.members + group.members.len() > CACHE_MEMBERS {
            let Some(victim) = self.groups.keys().next().cloned() else {
                break;
            };
            self.evict(&victim.0, &victim.1);
        }
        self.members += group.members.len();
        self.groups.insert(
            key,
            Cached {
                group,
                at: Instant::now(),
            },
        );
        metrics::gauge!("switchboard_groups_cached").set(self.groups.len() as f64);
    }

    /// Forgets a group that is changing or gone.
    fn remove(&mut self, app_id: &str, group: &str) {
        self.changes += 1;
        self.evict(app_id, group);
    }

    fn evict(&mut self, app_id: &str, group: &str) {
        if let Some(old) = self.groups.remove(&(app_id.to_owned(), group.to_owned())) {
            self.members -= old.group.members.len();
        }
    }
}

/// Persistent groups at their owner; see the module documentation.
pub struct PersistentGroups {
    records: Records,
    delivery: DeliveryClient,
    limits: GroupLimits,
    cache: Mutex<Cache>,
    locks: Vec<tokio::sync::Mutex<()>>,
}

fn unknown(group: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::InvalidRecipient,
        format!("unknown group {group:?}"),
    )
}

fn not_a_member(group: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NotAMember,
        format!("not a member of group {group:?}"),
    )
}

fn owner_only(group: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::Forbidden,
        format!("only the owner of group {group:?} may do that"),
    )
}

fn is_member(group: &pb::GroupRecord, user: &str) -> bool {
    group
        .members
        .binary_search_by(|m| m.as_str().cmp(user))
        .is_ok()
}

/// What a change told the members.
struct Event<'a> {
    kind: &'a str,
    by: &'a str,
    /// The users it is about (added, removed, the one who left).
    members: Option<&'a [String]>,
}

impl PersistentGroups {
    pub fn new(records: Records, delivery: DeliveryClient, limits: GroupLimits) -> Self {
        PersistentGroups {
            records,
            delivery,
            limits: GroupLimits {
                fanout_batch: limits.fanout_batch.max(1),
                ..limits
            },
            cache: Mutex::default(),
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_of(&self, app_id: &str, group: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (app_id, group).hash(&mut h);
        &self.locks[(h.finish() % LOCK_SHARDS as u64) as usize]
    }

    /// The group, from the cache or the store.
    async fn group(
        &self,
        app_id: &str,
        group: &str,
    ) -> Result<Option<Arc<pb::GroupRecord>>, ServiceError> {
        let changes = {
            let cache = self.cache();
            if let Some(cached) = cache.get(app_id, group) {
                return Ok(Some(cached));
            }
            cache.changes
        };
        let Some(stored) = self.records.get(app_id, group).await? else {
            return Ok(None);
        };
        let stored = Arc::new(stored);
        self.cache().put_read(stored.clone(), changes);
        Ok(Some(stored))
    }

    /// The group read fresh from the store (changes start from the truth,
    /// not from a cache another owner may have outdated).
    async fn fresh(&self, app_id: &str, group: &str) -> Result<pb::GroupRecord, ServiceError> {
        self.cache().remove(app_id, group);
        self.records
            .get(app_id, group)
            .await?
            .ok_or_else(|| unknown(group))
    }

    fn remember(&self, group: &pb::GroupRecord) {
        self.cache().put(Arc::new(group.clone()));
    }

    /// Users among `users` already in as many groups as they may be.
    async fn check_groups_per_user(
        &self,
        app_id: &str,
        users: &[String],
    ) -> Result<(), ServiceError> {
        if users.is_empty() {
            return Ok(());
        }
        let counts = self.records.count_groups(app_id, users).await?;
        let max = self.limits.max_groups_per_user;
        if let Some((user, n)) = users.iter().zip(counts).find(|(_, n)| *n as usize >= max) {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                format!("{user} is in {n} groups, the limit is {max}"),
            ));
        }
        Ok(())
    }

    fn check_size(&self, members: usize) -> Result<(), ServiceError> {
        let max = self.limits.max_members;
        if members > max {
            return Err(ServiceError::invalid(format!(
                "{members} members exceed the limit of {max} per group"
            )));
        }
        Ok(())
    }

    /// Tells `to` of a change (FAST: live connections only; a member who is
    /// offline reads the group with GROUP_INFO / GROUPS_LIST). A failure is
    /// logged: the change itself is stored.
    async fn announce(&self, group: &pb::GroupRecord, event: Event<'_>, to: &[String]) {
        let mut data = serde_json::Map::new();
        data.insert("group".into(), group.group.clone().into());
        data.insert("event".into(), event.kind.into());
        data.insert("by".into(), event.by.into());
        if let Some(members) = event.members {
            data.insert("members".into(), members.to_vec().into());
        }
        data.insert("name".into(), group.name.clone().into());
        let content = serde_json::Value::Object(data).to_string();
        let id = switchboard_mesh::new_message_id();
        let ts = switchboard_mesh::now_ms();
        for chunk in to.chunks(self.limits.fanout_batch) {
            let envelopes = chunk
                .iter()
                .map(|user| pb::Envelope {
                    id: id.clone(),
                    app_id: group.app_id.clone(),
                    from: event.by.to_owned(),
                    to: vec![user.clone()],
                    group: group.group.clone(),
                    content: content.clone(),
                    feature: pb::Feature::Fast.into(),
                    kind: pb::MessageKind::GroupEvent.into(),
                    ts,
                    ..Default::default()
                })
                .collect();
            let req = pb::DeliverRequest {
                envelopes,
                sent_copies: Vec::new(),
                copy_to_sender: false,
            };
            if let Err(e) = self.delivery.deliver(req).await {
                tracing::warn!(error = %e, group = %group.group, event = event.kind, "group event not delivered");
                return;
            }
        }
    }

    async fn create(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        let group_id = if req.group.is_empty() {
            format!("g-{}", switchboard_mesh::new_message_id())
        } else {
            req.group.clone()
        };
        let app = req.app_id.as_str();
        let mut members = req.members.clone();
        members.push(req.user_id.clone());
        members.sort_unstable();
        members.dedup();
        self.check_size(members.len())?;
        let _serial = self.lock_of(app, &group_id).lock().await;
        self.cache().remove(app, &group_id);
        // A repeated create by the same owner (a client retrying) is
        // answered with the group as it is.
        let taken = |existing: pb::GroupRecord| {
            if existing.owner == req.user_id {
                Ok(reply_with(existing))
            } else {
                Err(ServiceError::new(
                    ErrorCode::Forbidden,
                    format!("group {:?} exists", existing.group),
                ))
            }
        };
        if let Some(existing) = self.records.get(app, &group_id).await? {
            return taken(existing);
        }
        self.check_groups_per_user(app, &members).await?;
        let record = pb::GroupRecord {
            app_id: req.app_id.clone(),
            group: group_id,
            name: req.name.clone(),
            owner: req.user_id.clone(),
            members,
            created_ms: switchboard_mesh::now_ms(),
        };
        if let Some(existing) = self.records.create(record.clone()).await? {
            return taken(existing);
        }
        metrics::counter!("switchboard_groups_created_total").increment(1);
        self.remember(&record);
        let event = Event {
            kind: "members_added",
            by: &req.user_id,
            members: Some(&record.members),
        };
        self.announce(&record, event, &record.members).await;
        Ok(reply_with(record))
    }

    async fn change(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        let (app, user, group_id) = (
            req.app_id.as_str(),
            req.user_id.as_str(),
            req.group.as_str(),
        );
        let _serial = self.lock_of(app, group_id).lock().await;
        let before = self.fresh(app, group_id).await?;
        if !is_member(&before, user) {
            return Err(not_a_member(group_id));
        }
        let owner = before.owner == user;
        let op = req.op();
        if matches!(
            op,
            Op::AddMembers | Op::RemoveMembers | Op::Rename | Op::Delete
        ) && !owner
        {
            return Err(owner_only(group_id));
        }
        let unchanged = || Ok(reply_with(before.clone()));
        match op {
            Op::AddMembers => {
                let mut added: Vec<String> = req
                    .members
                    .iter()
                    .filter(|m| !is_member(&before, m))
                    .cloned()
                    .collect();
                added.sort_unstable();
                added.dedup();
                if added.is_empty() {
                    return unchanged();
                }
                self.check_size(before.members.len() + added.len())?;
                self.check_groups_per_user(app, &added).await?;
                let change = GroupChange {
                    add: added.clone(),
                    ..Default::default()
                };
                let after = self.update(app, group_id, change).await?;
                let event = Event {
                    kind: "members_added",
                    by: user,
                    members: Some(&added),
                };
                self.announce(&after, event, &after.members).await;
                Ok(reply_with(after))
            }
            Op::RemoveMembers | Op::Leave => {
                let mut removed: Vec<String> = if op == Op::Leave {
                    vec![user.to_owned()]
                } else {
                    req.members
                        .iter()
                        .filter(|m| is_member(&before, m))
                        .cloned()
                        .collect()
                };
                if removed.contains(&before.owner) {
                    return Err(ServiceError::new(
                        ErrorCode::Forbidden,
                        "the owner cannot leave or be removed; GROUP_DELETE deletes the group",
                    ));
                }
                removed.sort_unstable();
                removed.dedup();
                if removed.is_empty() {
                    return unchanged();
                }
                let change = GroupChange {
                    remove: removed.clone(),
                    ..Default::default()
                };
                let after = self.update(app, group_id, change).await?;
                let kind = if op == Op::Leave {
                    "left"
                } else {
                    "members_removed"
                };
                let event = Event {
                    kind,
                    by: user,
                    members: Some(&removed),
                };
                let mut to = after.members.clone();
                to.extend(removed.iter().cloned());
                self.announce(&after, event, &to).await;
                Ok(reply_with(after))
            }
            Op::Rename => {
                let change = GroupChange {
                    name: Some(req.name.clone()),
                    ..Default::default()
                };
                let after = self.update(app, group_id, change).await?;
                let event = Event {
                    kind: "renamed",
                    by: user,
                    members: None,
                };
                self.announce(&after, event, &after.members).await;
                Ok(reply_with(after))
            }
            Op::Delete => {
                let deleted = self
                    .records
                    .delete(app, group_id)
                    .await?
                    .ok_or_else(|| unknown(group_id))?;
                self.cache().remove(app, group_id);
                metrics::counter!("switchboard_groups_deleted_total").increment(1);
                let event = Event {
                    kind: "deleted",
                    by: user,
                    members: None,
                };
                self.announce(&deleted, event, &deleted.members).await;
                Ok(reply_with(pb::GroupRecord {
                    members: Vec::new(),
                    ..deleted
                }))
            }
            _ => Err(ServiceError::internal("not a change of a group")),
        }
    }

    async fn update(
        &self,
        app: &str,
        group_id: &str,
        change: GroupChange,
    ) -> Result<pb::GroupRecord, ServiceError> {
        let after = self
            .records
            .update(app, group_id, change)
            .await?
            .ok_or_else(|| unknown(group_id))?;
        self.remember(&after);
        Ok(after)
    }

    /// The group as a member sees it.
    async fn info(
        &self,
        req: &pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        let group = self
            .group(&req.app_id, &req.group)
            .await?
            .ok_or_else(|| unknown(&req.group))?;
        if !is_member(&group, &req.user_id) {
            return Err(not_a_member(&req.group));
        }
        Ok(reply_with(group.as_ref().clone()))
    }

    /// A message to a persistent group: into every member's inbox but the
    /// sender's (RELIABLE) or to their connections (FAST), in delivery calls
    /// of at most `fanout_batch` recipients, one store write each.
    pub async fn fanout(&self, envelope: pb::Envelope) -> Result<pb::FanoutReply, ServiceError> {
        let started = Instant::now();
        let group = self
            .group(&envelope.app_id, &envelope.group)
            .await?
            .ok_or_else(|| unknown(&envelope.group))?;
        if !is_member(&group, &envelope.from) {
            return Err(not_a_member(&envelope.group));
        }
        let recipients: Vec<&String> = group
            .members
            .iter()
            .filter(|m| **m != envelope.from)
            .collect();
        tracing::Span::current().record("fanout.size", recipients.len());
        let mut sent_copy = envelope.origin.is_some().then(|| envelope.clone());
        let mut repeated = false;
        let mut inbox_full = Vec::new();
        for (i, chunk) in recipients.chunks(self.limits.fanout_batch).enumerate() {
            let envelopes = chunk
                .iter()
                .map(|user| pb::Envelope {
                    to: vec![(*user).clone()],
                    origin: None,
                    // The first call indexes the client id for every copy;
                    // the others must not find it there.
                    client_id: envelope.client_id && i == 0,
                    ..envelope.clone()
                })
                .collect();
            let reply = self
                .delivery
                .deliver(pb::DeliverRequest {
                    envelopes,
                    sent_copies: sent_copy.take().into_iter().collect(),
                    copy_to_sender: false,
                })
                .await?;
            if i == 0 && reply.repeated.iter().any(|r| *r) {
                // A resend of a message already fanned out: its copies are
                // all stored (or were, by the first attempt).
                repeated = true;
                break;
            }
            inbox_full.extend(crate::full_recipients(chunk, &reply.inbox_full));
        }
        if recipients.is_empty() && sent_copy.is_some() {
            // Alone in the group: only the sender's other devices see it.
            self.delivery
                .deliver(pb::DeliverRequest {
                    envelopes: Vec::new(),
                    sent_copies: sent_copy.take().into_iter().collect(),
                    copy_to_sender: false,
                })
                .await?;
        }
        metrics::histogram!("switchboard_groups_fanout_recipients", "kind" => "persistent")
            .record(recipients.len() as f64);
        metrics::histogram!("switchboard_groups_fanout_duration_seconds", "kind" => "persistent")
            .record(started.elapsed().as_secs_f64());
        Ok(pb::FanoutReply {
            recipients: u32::try_from(recipients.len()).unwrap_or(u32::MAX),
            repeated,
            inbox_full,
        })
    }
}

fn reply_with(group: pb::GroupRecord) -> pb::GroupCommandReply {
    pb::GroupCommandReply {
        group: Some(group),
        groups: Vec::new(),
    }
}

#[async_trait]
impl GroupAdmin for PersistentGroups {
    #[tracing::instrument(
        name = "groups.command",
        skip_all,
        fields(op = req.op().as_str_name(), group = %req.group)
    )]
    async fn command(
        &self,
        req: pb::GroupCommandRequest,
    ) -> Result<pb::GroupCommandReply, ServiceError> {
        let op = req.op();
        let label = match op {
            Op::Create => "create",
            Op::AddMembers => "add_members",
            Op::RemoveMembers => "remove_members",
            Op::Rename => "rename",
            Op::Leave => "leave",
            Op::Delete => "delete",
            Op::Info => "info",
            Op::List => "list",
        };
        let result = match op {
            Op::Create => self.create(req).await,
            Op::Info => self.info(&req).await,
            Op::List => self
                .records
                .groups_of(&req.app_id, &req.user_id)
                .await
                .map(|groups| pb::GroupCommandReply {
                    group: None,
                    groups,
                }),
            _ => self.change(req).await,
        };
        let status = match &result {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        metrics::counter!("switchboard_groups_requests_total", "op" => label, "status" => status)
            .increment(1);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::StoredGroups;
    use switchboard_mesh::{Delivery, GroupRecordsClient};
    use switchboard_store::{FjallStore, FjallStoreOptions};

    /// Delivery that records each call and answers a client id it saw before
    /// as repeated, as the store's id index does.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<pb::DeliverRequest>>,
        client_ids: Mutex<std::collections::HashSet<String>>,
    }

    #[async_trait]
    impl Delivery for Recorder {
        async fn deliver(&self, req: pb::DeliverRequest) -> Result<pb::DeliverReply, ServiceError> {
            let repeated: Vec<bool> = req
                .envelopes
                .iter()
                .map(|e| {
                    e.client_id
                        && !self
                            .client_ids
                            .lock()
                            .expect("lock")
                            .insert(format!("{}/{}", e.to[0], e.id))
                })
                .collect();
            let seqs = vec![1; req.envelopes.len()];
            self.calls.lock().expect("lock").push(req);
            Ok(pb::DeliverReply {
                seqs,
                repeated,
                ..Default::default()
            })
        }
        async fn fetch(&self, _: pb::FetchRequest) -> Result<pb::FetchReply, ServiceError> {
            Err(ServiceError::internal("not used"))
        }
        async fn delivered(
            &self,
            _: pb::DeliveredRequest,
        ) -> Result<pb::DeliveredReply, ServiceError> {
            Err(ServiceError::internal("not used"))
        }
        async fn presence_changed(
            &self,
            _: pb::PresenceChangeRequest,
        ) -> Result<pb::PresenceChangeReply, ServiceError> {
            Err(ServiceError::internal("not used"))
        }
    }

    struct Setup {
        groups: PersistentGroups,
        delivery: Arc<Recorder>,
        _store: FjallStore,
        _dir: tempfile::TempDir,
    }

    fn setup(limits: GroupLimits) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path(), FjallStoreOptions::default()).expect("store");
        let records = GroupRecordsClient::from_local(Arc::new(StoredGroups::new(store.groups())));
        let delivery = Arc::new(Recorder::default());
        let groups = PersistentGroups::new(
            Records::new(records),
            DeliveryClient::from_local(delivery.clone()),
            limits,
        );
        Setup {
            groups,
            delivery,
            _store: store,
            _dir: dir,
        }
    }

    fn request(op: Op, user: &str, group: &str, members: &[String]) -> pb::GroupCommandRequest {
        pb::GroupCommandRequest {
            app_id: "app".into(),
            user_id: user.into(),
            op: op.into(),
            group: group.into(),
            members: members.to_vec(),
            ..Default::default()
        }
    }

    fn message(from: &str, group: &str, client_id: bool) -> pb::Envelope {
        pb::Envelope {
            id: "m-1".into(),
            app_id: "app".into(),
            from: from.into(),
            group: group.into(),
            content: "hi".into(),
            kind: pb::MessageKind::Group.into(),
            client_id,
            origin: Some(pb::ConnRef {
                gateway_id: "gw".into(),
                conn_id: 1,
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_large_group_is_fanned_out_in_bounded_batches_with_one_sent_copy() {
        let s = setup(GroupLimits {
            max_members: 10_000,
            max_groups_per_user: 10,
            fanout_batch: 1_000,
        });
        let members: Vec<String> = (1..10_000).map(|i| format!("demo-{i}")).collect();
        s.groups
            .command(request(Op::Create, "demo-0", "big", &members))
            .await
            .expect("create");
        // The create's members_added event went out in batches too.
        let events = std::mem::take(&mut *s.delivery.calls.lock().expect("lock"));
        assert_eq!(events.len(), 10);
        assert!(events.iter().all(|c| c.envelopes.len() <= 1_000));
        assert!(
            events.iter().flat_map(|c| &c.envelopes).all(|e| e.kind()
                == pb::MessageKind::GroupEvent
                && e.feature() == pb::Feature::Fast)
        );

        let reply = s
            .groups
            .fanout(message("demo-0", "big", true))
            .await
            .expect("fanout");
        assert_eq!(reply.recipients, 9_999);
        assert!(!reply.repeated);
        let calls = std::mem::take(&mut *s.delivery.calls.lock().expect("lock"));
        assert_eq!(calls.len(), 10, "9,999 recipients in calls of 1,000");
        assert!(calls.iter().all(|c| c.envelopes.len() <= 1_000));
        let recipients: std::collections::BTreeSet<&str> = calls
            .iter()
            .flat_map(|c| &c.envelopes)
            .map(|e| e.to[0].as_str())
            .collect();
        assert_eq!(recipients.len(), 9_999);
        assert!(!recipients.contains("demo-0"), "not to the sender");
        assert!(
            calls
                .iter()
                .flat_map(|c| &c.envelopes)
                .all(|e| e.group == "big" && e.origin.is_none())
        );
        assert_eq!(
            calls.iter().map(|c| c.sent_copies.len()).sum::<usize>(),
            1,
            "one MESSAGE_SENT copy"
        );
        assert!(
            calls[1..]
                .iter()
                .flat_map(|c| &c.envelopes)
                .all(|e| !e.client_id),
            "only the first call indexes the client id"
        );

        // A resend of the same client id stops at the first call.
        let again = s
            .groups
            .fanout(message("demo-0", "big", true))
            .await
            .expect("fanout");
        assert!(again.repeated);
        assert_eq!(s.delivery.calls.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn rights_and_limits_are_decided_at_the_owner() {
        let s = setup(GroupLimits {
            max_members: 3,
            max_groups_per_user: 1,
            fanout_batch: 2,
        });
        let code = |r: Result<pb::GroupCommandReply, ServiceError>| r.expect_err("refused").code;
        let bob = vec!["demo-bob".to_owned()];
        s.groups
            .command(request(Op::Create, "demo-ann", "g", &bob))
            .await
            .expect("create");
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::AddMembers, "demo-bob", "g", &bob))
                    .await
            ),
            ErrorCode::Forbidden
        );
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::Info, "demo-cat", "g", &[]))
                    .await
            ),
            ErrorCode::NotAMember
        );
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::Delete, "demo-ann", "nope", &[]))
                    .await
            ),
            ErrorCode::InvalidRecipient
        );
        assert_eq!(
            s.groups
                .fanout(message("demo-cat", "g", false))
                .await
                .expect_err("refused")
                .code,
            ErrorCode::NotAMember
        );
        // bob is in one group, the limit.
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::Create, "demo-cat", "g2", &bob))
                    .await
            ),
            ErrorCode::Forbidden
        );
        let two = vec!["demo-x".to_owned(), "demo-y".to_owned()];
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::AddMembers, "demo-ann", "g", &two))
                    .await
            ),
            ErrorCode::InvalidFrame
        );
        assert_eq!(
            code(
                s.groups
                    .command(request(Op::Leave, "demo-ann", "g", &[]))
                    .await
            ),
            ErrorCode::Forbidden
        );
        // The events of a removal reach the removed member too.
        s.delivery.calls.lock().expect("lock").clear();
        s.groups
            .command(request(Op::RemoveMembers, "demo-ann", "g", &bob))
            .await
            .expect("remove");
        let told: Vec<String> = s
            .delivery
            .calls
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|c| c.envelopes.iter().map(|e| e.to[0].clone()))
            .collect();
        assert_eq!(told, ["demo-ann", "demo-bob"]);
        let info = s
            .groups
            .command(request(Op::Info, "demo-ann", "g", &[]))
            .await
            .expect("info");
        assert_eq!(info.group.expect("group").members, ["demo-ann"]);
    }
}
