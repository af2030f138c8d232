//! This gateway's side of topics, rooms and presence subscriptions: which
//! local connections are subscribed to which topic, are in which room, or
//! watch which user. The owner of a topic or room pushes each publication
//! or event once to this gateway; it is rendered once and queued on every
//! local connection concerned.
//!
//! A new subscriber (or room member) is *pending* until its reply
//! (`SUBSCRIBED`, `ROOM_JOINED`) and recovered history are queued: live
//! events that arrive meanwhile wait, and are then queued after the history
//! without repeats (by offset, or room event number).

use std::collections::HashMap;
use std::sync::Mutex;

use switchboard_mesh::pb;
use switchboard_presence::PresenceChange;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frames;
use crate::registry::{ConnHandle, Outbound};

/// Live events held for one pending subscriber at most (a pending one
/// waits for one owner call).
const PENDING_MAX: usize = 10_000;

type Key = (String, String);

fn key(app_id: &str, name: &str) -> Key {
    (app_id.to_owned(), name.to_owned())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn send(conn: &ConnHandle, kind: &'static str, text: Utf8Bytes) -> bool {
    count(kind, 1);
    queue(conn, text)
}

/// Queues without counting (a fan-out counts its frames once).
fn queue(conn: &ConnHandle, text: Utf8Bytes) -> bool {
    conn.send(Outbound::reply(text))
}

fn count(kind: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("switchboard_frames_out_total", "type" => kind).increment(n);
    }
}

/// One subscriber: events above `floor` are new to it.
struct Sub<E> {
    conn: ConnHandle,
    pending: Option<Vec<E>>,
    floor: u64,
}

impl<E> Sub<E> {
    fn new(conn: ConnHandle) -> Self {
        Sub {
            conn,
            pending: Some(Vec::new()),
            floor: 0,
        }
    }

    fn id(&self) -> u64 {
        self.conn.shared.id
    }
}

#[derive(Default)]
struct LocalTopic {
    epoch: String,
    subs: Vec<Sub<pb::Publication>>,
}

struct RoomSub {
    sub: Sub<pb::RoomEvent>,
    user_id: String,
    nick: String,
}

#[derive(Default)]
struct LocalRoom {
    epoch: String,
    members: Vec<RoomSub>,
}

impl LocalRoom {
    /// Takes note of the owner's epoch; when it changed, the room was lost
    /// with its owner: active members are told (ROOM_RESET) and event
    /// numbers start again.
    fn observe_epoch(&mut self, room: &str, epoch: &str) {
        if self.epoch == epoch {
            return;
        }
        let lost = !self.epoch.is_empty();
        self.epoch = epoch.to_owned();
        if !lost {
            return;
        }
        let text = Utf8Bytes::from(frames::room_reset(room));
        for m in &mut self.members {
            m.sub.floor = 0;
            if m.sub.pending.is_none() {
                send(&m.sub.conn, "ROOM_RESET", text.clone());
            }
        }
        metrics::counter!("switchboard_room_resets_total").increment(1);
    }
}

/// A connection watching a user's presence; `last` is what it was told.
struct Watcher {
    conn: ConnHandle,
    last: Option<bool>,
}

/// The watchers of one user, and how many changes of theirs were seen (a
/// periodic lookup applies only when none came since it was made).
#[derive(Default)]
struct Watched {
    changes: u64,
    list: Vec<Watcher>,
}

/// A room member as the owner knows it, for the periodic sync.
pub(crate) struct SyncMember {
    pub conn_id: u64,
    pub user_id: String,
    pub nick: String,
}

#[derive(Default)]
pub(crate) struct ChannelRegistry {
    /// This gateway's id: room events name the connection they exclude by
    /// gateway and connection id.
    gateway_id: String,
    topics: Mutex<HashMap<Key, LocalTopic>>,
    rooms: Mutex<HashMap<Key, LocalRoom>>,
    watchers: Mutex<HashMap<Key, Watched>>,
}

impl ChannelRegistry {
    pub fn new(gateway_id: &str) -> Self {
        ChannelRegistry {
            gateway_id: gateway_id.to_owned(),
            ..Default::default()
        }
    }

    // ------------------------------------------------------------ topics

    /// Adds a pending subscriber (replacing the connection's earlier one);
    /// true when it is the gateway's first for the topic.
    pub fn topic_add(&self, app_id: &str, topic: &str, conn: ConnHandle) -> bool {
        let mut topics = lock(&self.topics);
        let local = topics.entry(key(app_id, topic)).or_default();
        let first = local.subs.is_empty();
        let before = local.subs.len();
        local.subs.retain(|s| s.id() != conn.shared.id);
        if local.subs.len() == before {
            metrics::gauge!("switchboard_topic_subscriptions").increment(1.0);
        }
        local.subs.push(Sub::new(conn));
        first
    }

    /// The subscriber's reply and history are queued, up to offset
    /// `floor`: live publications go on from there.
    pub fn topic_activate(&self, app_id: &str, topic: &str, conn_id: u64, epoch: &str, floor: u64) {
        let mut topics = lock(&self.topics);
        let Some(local) = topics.get_mut(&key(app_id, topic)) else {
            return;
        };
        if local.epoch.is_empty() {
            local.epoch = epoch.to_owned();
        }
        let Some(sub) = local.subs.iter_mut().find(|s| s.id() == conn_id) else {
            return;
        };
        sub.floor = floor;
        for p in sub.pending.take().unwrap_or_default() {
            if p.offset > sub.floor {
                sub.floor = p.offset;
                send(
                    &sub.conn,
                    "PUBLICATION",
                    Utf8Bytes::from(frames::publication(&p)),
                );
            }
        }
    }

    /// Holds a subscriber's live publications (its own PUBLISH is under
    /// way: its `PUBLISHED` goes first); false when it is not subscribed
    /// or already held.
    pub fn topic_hold(&self, app_id: &str, topic: &str, conn_id: u64) -> bool {
        let mut topics = lock(&self.topics);
        match topics
            .get_mut(&key(app_id, topic))
            .and_then(|local| local.subs.iter_mut().find(|s| s.id() == conn_id))
        {
            Some(sub) if sub.pending.is_none() => {
                sub.pending = Some(Vec::new());
                true
            }
            _ => false,
        }
    }

    /// Lets held publications go (see [`ChannelRegistry::topic_hold`]).
    pub fn topic_release(&self, app_id: &str, topic: &str, conn_id: u64) {
        let mut topics = lock(&self.topics);
        let Some(local) = topics.get_mut(&key(app_id, topic)) else {
            return;
        };
        let floor = local
            .subs
            .iter()
            .find(|s| s.id() == conn_id)
            .map_or(0, |s| s.floor);
        drop(topics);
        let epoch = self.topic_epoch(app_id, topic);
        self.topic_activate(app_id, topic, conn_id, &epoch, floor);
    }

    fn topic_epoch(&self, app_id: &str, topic: &str) -> String {
        lock(&self.topics)
            .get(&key(app_id, topic))
            .map(|local| local.epoch.clone())
            .unwrap_or_default()
    }

    /// Removes a subscriber; true when it was the gateway's last.
    pub fn topic_remove(&self, app_id: &str, topic: &str, conn_id: u64) -> bool {
        let mut topics = lock(&self.topics);
        let k = key(app_id, topic);
        let Some(local) = topics.get_mut(&k) else {
            return false;
        };
        let before = local.subs.len();
        local.subs.retain(|s| s.id() != conn_id);
        if local.subs.len() < before {
            metrics::gauge!("switchboard_topic_subscriptions").decrement(1.0);
        }
        if local.subs.is_empty() {
            topics.remove(&k);
            return before > 0;
        }
        false
    }

    /// Topics with local subscribers, and the owner epoch each was last seen with.
    pub fn topics(&self) -> Vec<(String, String, String)> {
        lock(&self.topics)
            .iter()
            .map(|((app, topic), local)| (app.clone(), topic.clone(), local.epoch.clone()))
            .collect()
    }

    fn publication(&self, app_id: &str, epoch: &str, p: &pb::Publication) -> u32 {
        let mut topics = lock(&self.topics);
        let Some(local) = topics.get_mut(&key(app_id, &p.topic)) else {
            return 0;
        };
        if local.epoch != epoch {
            // A new owner: its offsets started again.
            if !local.epoch.is_empty() {
                for s in &mut local.subs {
                    s.floor = 0;
                }
            }
            local.epoch = epoch.to_owned();
        }
        let mut text: Option<Utf8Bytes> = None;
        let mut queued = 0;
        for sub in &mut local.subs {
            if let Some(pending) = &mut sub.pending {
                if pending.len() < PENDING_MAX {
                    pending.push(p.clone());
                }
                continue;
            }
            if p.offset <= sub.floor {
                continue;
            }
            sub.floor = p.offset;
            let text = text
                .get_or_insert_with(|| Utf8Bytes::from(frames::publication(p)))
                .clone();
            if queue(&sub.conn, text) {
                queued += 1;
            }
        }
        count("PUBLICATION", u64::from(queued));
        queued
    }

    // ------------------------------------------------------------- rooms

    /// Adds a pending member connection; true when the connection was not
    /// in the room yet.
    pub fn room_add(
        &self,
        app_id: &str,
        room: &str,
        conn: ConnHandle,
        user_id: &str,
        nick: &str,
    ) -> bool {
        let mut rooms = lock(&self.rooms);
        let local = rooms.entry(key(app_id, room)).or_default();
        let new = !local.members.iter().any(|m| m.sub.id() == conn.shared.id);
        local.members.retain(|m| m.sub.id() != conn.shared.id);
        local.members.push(RoomSub {
            sub: Sub::new(conn),
            user_id: user_id.to_owned(),
            nick: nick.to_owned(),
        });
        if new {
            metrics::gauge!("switchboard_room_connections").increment(1.0);
        }
        new
    }

    /// The member's ROOM_JOINED is queued, holding events up to `seq`.
    pub fn room_activate(&self, app_id: &str, room: &str, conn_id: u64, epoch: &str, seq: u64) {
        let mut rooms = lock(&self.rooms);
        let Some(local) = rooms.get_mut(&key(app_id, room)) else {
            return;
        };
        local.observe_epoch(room, epoch);
        let Some(m) = local.members.iter_mut().find(|m| m.sub.id() == conn_id) else {
            return;
        };
        m.sub.floor = seq;
        for e in m.sub.pending.take().unwrap_or_default() {
            let mut text = None;
            if deliver_room_event(&self.gateway_id, &mut m.sub, &e, &mut text)
                && let Some((_, kind)) = text
            {
                count(kind, 1);
            }
        }
    }

    /// Removes a member connection; true when it was in the room.
    pub fn room_remove(&self, app_id: &str, room: &str, conn_id: u64) -> bool {
        let mut rooms = lock(&self.rooms);
        let k = key(app_id, room);
        let Some(local) = rooms.get_mut(&k) else {
            return false;
        };
        let before = local.members.len();
        local.members.retain(|m| m.sub.id() != conn_id);
        let removed = local.members.len() < before;
        if removed {
            metrics::gauge!("switchboard_room_connections").decrement(1.0);
        }
        if local.members.is_empty() {
            rooms.remove(&k);
        }
        removed
    }

    /// Rooms with local members: (app, room, epoch, members).
    pub fn rooms(&self) -> Vec<(String, String, String, Vec<SyncMember>)> {
        lock(&self.rooms)
            .iter()
            .map(|((app, room), local)| {
                // Pending members are being added by their own join.
                let members = local
                    .members
                    .iter()
                    .filter(|m| m.sub.pending.is_none())
                    .map(|m| SyncMember {
                        conn_id: m.sub.id(),
                        user_id: m.user_id.clone(),
                        nick: m.nick.clone(),
                    })
                    .collect();
                (app.clone(), room.clone(), local.epoch.clone(), members)
            })
            .collect()
    }

    /// The owner answered a sync: a reset (its owner was lost) is told to
    /// the members.
    pub fn room_synced(&self, app_id: &str, room: &str, epoch: &str, seq: u64) {
        let mut rooms = lock(&self.rooms);
        if let Some(local) = rooms.get_mut(&key(app_id, room)) {
            let changed = local.epoch != epoch;
            local.observe_epoch(room, epoch);
            if changed {
                for m in &mut local.members {
                    m.sub.floor = m.sub.floor.max(seq);
                }
            }
        }
    }

    fn room_event(&self, app_id: &str, epoch: &str, e: &pb::RoomEvent) -> u32 {
        let mut rooms = lock(&self.rooms);
        let Some(local) = rooms.get_mut(&key(app_id, &e.room)) else {
            return 0;
        };
        local.observe_epoch(&e.room, epoch);
        let gateway_id = &self.gateway_id;
        let mut text = None;
        let mut queued = 0;
        for m in &mut local.members {
            if let Some(pending) = &mut m.sub.pending {
                if pending.len() < PENDING_MAX {
                    pending.push(e.clone());
                }
                continue;
            }
            if deliver_room_event(gateway_id, &mut m.sub, e, &mut text) {
                queued += 1;
            }
        }
        if let Some((_, kind)) = text {
            count(kind, u64::from(queued));
        }
        queued
    }

    // ---------------------------------------------------------- presence

    /// Watches a user (without telling anything yet).
    pub fn watch(&self, app_id: &str, user_id: &str, conn: ConnHandle) {
        let mut watchers = lock(&self.watchers);
        let list = &mut watchers.entry(key(app_id, user_id)).or_default().list;
        if !list.iter().any(|w| w.conn.shared.id == conn.shared.id) {
            list.push(Watcher { conn, last: None });
            metrics::gauge!("switchboard_presence_subscriptions").increment(1.0);
        }
    }

    pub fn unwatch(&self, app_id: &str, user_id: &str, conn_id: u64) {
        let mut watchers = lock(&self.watchers);
        let k = key(app_id, user_id);
        if let Some(watched) = watchers.get_mut(&k) {
            let list = &mut watched.list;
            let before = list.len();
            list.retain(|w| w.conn.shared.id != conn_id);
            if list.len() < before {
                metrics::gauge!("switchboard_presence_subscriptions").decrement(1.0);
            }
            if list.is_empty() {
                watchers.remove(&k);
            }
        }
    }

    /// Tells a new watcher the user's state as looked up, unless a change
    /// has told it already (a change is at least as recent as the lookup,
    /// and a later one follows anyway).
    pub fn tell(&self, app_id: &str, user_id: &str, conn_id: u64, online: bool) {
        let mut watchers = lock(&self.watchers);
        if let Some(w) = watchers.get_mut(&key(app_id, user_id)).and_then(|watched| {
            watched
                .list
                .iter_mut()
                .find(|w| w.conn.shared.id == conn_id)
        }) && w.last.is_none()
        {
            w.last = Some(online);
            send(
                &w.conn,
                "PRESENCE",
                Utf8Bytes::from(frames::presence(user_id, online)),
            );
        }
    }

    /// A user's presence changed somewhere: every watcher here is told
    /// (once per change).
    pub fn presence_changed(&self, change: &PresenceChange) {
        let mut watchers = lock(&self.watchers);
        let Some(watched) = watchers.get_mut(&key(&change.app_id, &change.user_id)) else {
            return;
        };
        watched.changes += 1;
        let text = Utf8Bytes::from(frames::presence(&change.user_id, change.online));
        for w in &mut watched.list {
            if w.last != Some(change.online) {
                w.last = Some(change.online);
                send(&w.conn, "PRESENCE", text.clone());
            }
        }
    }

    /// Watched users by app, each with its count of changes seen.
    pub fn watched(&self) -> HashMap<String, Vec<(String, u64)>> {
        let mut by_app: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for ((app, user), watched) in lock(&self.watchers).iter() {
            by_app
                .entry(app.clone())
                .or_default()
                .push((user.clone(), watched.changes));
        }
        by_app
    }

    /// A periodic lookup found the user `online`: watchers told otherwise
    /// are told now, unless a change came since the lookup was made. This
    /// catches what no change announces: a gateway that died with its
    /// users' connections.
    pub fn reconcile(&self, app_id: &str, user_id: &str, changes: u64, online: bool) {
        let mut watchers = lock(&self.watchers);
        let Some(watched) = watchers.get_mut(&key(app_id, user_id)) else {
            return;
        };
        if watched.changes != changes {
            return;
        }
        for w in &mut watched.list {
            if w.last.is_some_and(|last| last != online) {
                w.last = Some(online);
                send(
                    &w.conn,
                    "PRESENCE",
                    Utf8Bytes::from(frames::presence(user_id, online)),
                );
            }
        }
    }

    // -------------------------------------------------------------- push

    /// A publication or room event from its owner; returns the local
    /// connections it was queued on.
    pub fn push(&self, push: &pb::ChannelPush) -> u32 {
        let started = std::time::Instant::now();
        let (kind, queued) = match &push.event {
            Some(pb::channel_push::Event::Publication(p)) => {
                ("topic", self.publication(&push.app_id, &push.epoch, p))
            }
            Some(pb::channel_push::Event::Room(e)) => {
                ("room", self.room_event(&push.app_id, &push.epoch, e))
            }
            None => return 0,
        };
        metrics::histogram!("switchboard_channel_fanout_connections", "kind" => kind)
            .record(f64::from(queued));
        metrics::histogram!("switchboard_channel_gateway_fanout_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        queued
    }
}

/// Queues a room event on an active member (unless it is the member's own
/// join or leave, or one it already has); the text is rendered once.
fn deliver_room_event(
    gateway_id: &str,
    sub: &mut Sub<pb::RoomEvent>,
    e: &pb::RoomEvent,
    text: &mut Option<(Utf8Bytes, &'static str)>,
) -> bool {
    if e.seq <= sub.floor {
        return false;
    }
    sub.floor = e.seq;
    if e.exclude
        .as_ref()
        .is_some_and(|c| c.conn_id == sub.id() && c.gateway_id == gateway_id)
    {
        return false;
    }
    let (text, _) = text
        .get_or_insert_with(|| match (&e.message, e.kind()) {
            (Some(m), pb::RoomEventKind::Message) => {
                (Utf8Bytes::from(frames::room_message(m)), "ROOM_MESSAGE")
            }
            _ => (Utf8Bytes::from(frames::room_event(e)), "ROOM_EVENT"),
        })
        .clone();
    queue(&sub.conn, text)
}

/// Tells local watchers of every presence change, until the registry is gone.
pub(crate) async fn follow_presence(
    mut changes: tokio::sync::broadcast::Receiver<PresenceChange>,
    registry: std::sync::Weak<ChannelRegistry>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match changes.recv().await {
            Ok(change) => match registry.upgrade() {
                Some(registry) => registry.presence_changed(&change),
                None => return,
            },
            Err(RecvError::Lagged(missed)) => {
                metrics::counter!("switchboard_presence_changes_missed_total").increment(missed);
                tracing::warn!(missed, "presence changes missed");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// How often a gateway tells the owners of its topics and rooms what it
/// holds: an owner that restarted, or took over from a lost one, learns
/// the gateway's subscribers and members again (and rooms are reset).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the periodic sync until the gateway is gone.
pub(crate) async fn sync_with_owners(gw: std::sync::Weak<crate::GatewayInner>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(gw) = gw.upgrade() else {
            return;
        };
        if gw.shutdown.is_cancelled() {
            return;
        }
        for (app_id, topic, _) in gw.channels.topics() {
            let req = pb::TopicSubscribeRequest {
                app_id,
                topic,
                gateway_id: gw.id.clone(),
                since: None,
            };
            if let Err(e) = gw.deps.channels.subscribe(req).await {
                tracing::debug!(error = %e, "topic sync failed");
            }
        }
        for (app_id, users) in gw.channels.watched() {
            for chunk in users.chunks(switchboard_presence::MAX_BATCH) {
                let names: Vec<&str> = chunk.iter().map(|(u, _)| u.as_str()).collect();
                match gw.deps.presence.gateways_batch(&app_id, &names).await {
                    Ok(found) => {
                        for ((user, changes), gateways) in chunk.iter().zip(found) {
                            gw.channels
                                .reconcile(&app_id, user, *changes, !gateways.is_empty());
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "presence reconcile failed"),
                }
            }
        }
        for (app_id, room, epoch, members) in gw.channels.rooms() {
            let req = pb::RoomSyncRequest {
                app_id: app_id.clone(),
                room: room.clone(),
                epoch,
                gateway_id: gw.id.clone(),
                members: members
                    .into_iter()
                    .map(|m| pb::RoomMember {
                        user_id: m.user_id,
                        nick: m.nick,
                        conn: Some(pb::ConnRef {
                            gateway_id: gw.id.clone(),
                            conn_id: m.conn_id,
                        }),
                    })
                    .collect(),
            };
            match gw.deps.channels.room_sync(req).await {
                Ok(reply) => gw
                    .channels
                    .room_synced(&app_id, &room, &reply.epoch, reply.seq),
                Err(e) => tracing::debug!(error = %e, "room sync failed"),
            }
        }
    }
}
