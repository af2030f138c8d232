//! Topics and rooms at their owner (the groups instance rendezvous hashing
//! picks for the app and name). Everything lives in memory: a topic keeps
//! its last publications, a room its last messages and members. The owner
//! knows which gateways have subscribers or members, and pushes each
//! publication or room event once per gateway; gateways fan out locally.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchboard_mesh::{GatewayDirectory, ServiceError, pb};

/// What the owner keeps, per deployment's config.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// Publications a topic keeps for recovery.
    pub topic_history: usize,
    /// Messages a room keeps for late joiners.
    pub room_history: usize,
    /// How long an empty room (or a topic without subscribers) is kept after
    /// its last activity.
    pub idle: Duration,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            topic_history: 100,
            room_history: 1000,
            idle: Duration::from_secs(3600),
        }
    }
}

type Key = (String, String);

/// The channels part of the groups role.
#[derive(Clone)]
pub struct ChannelsRole {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ChannelSettings,
    gateways: Arc<dyn GatewayDirectory>,
    /// This instance's id in room and topic replies: a gateway that sees it
    /// change knows the room's previous owner was lost.
    epoch: String,
    topics: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Topic>>>>,
    rooms: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Room>>>>,
}

#[derive(Default)]
struct Topic {
    offset: u64,
    kept: VecDeque<pb::Publication>,
    gateways: Vec<String>,
    last_active: Option<Instant>,
    /// Removed from the map: a caller holding it must look again.
    gone: bool,
}

#[derive(Default)]
struct Room {
    name: String,
    seq: u64,
    history: VecDeque<pb::RoomMessage>,
    /// user → that user's member connections.
    members: HashMap<String, Vec<Member>>,
    last_active: Option<Instant>,
    gone: bool,
}

#[derive(Clone, PartialEq, Eq)]
struct Member {
    gateway_id: String,
    conn_id: u64,
    nick: String,
}

impl Room {
    fn gateways(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .members
            .values()
            .flatten()
            .map(|m| m.gateway_id.clone())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn count(&self) -> u32 {
        u32::try_from(self.members.len()).unwrap_or(u32::MAX)
    }

    /// Adds a member connection; true when it is the user's first.
    fn add(&mut self, user_id: &str, member: Member) -> bool {
        let conns = self.members.entry(user_id.to_owned()).or_default();
        let first = conns.is_empty();
        if !conns
            .iter()
            .any(|m| m.gateway_id == member.gateway_id && m.conn_id == member.conn_id)
        {
            conns.push(member);
        }
        first
    }

    fn is_member(&self, user_id: &str, conn: &pb::ConnRef) -> bool {
        self.members.get(user_id).is_some_and(|conns| {
            conns
                .iter()
                .any(|m| m.gateway_id == conn.gateway_id && m.conn_id == conn.conn_id)
        })
    }
}

fn member_of(
    member: Option<pb::RoomMember>,
) -> Result<(String, Member, pb::ConnRef), ServiceError> {
    let member = member.ok_or_else(|| ServiceError::invalid("a room request names its member"))?;
    let conn = member
        .conn
        .ok_or_else(|| ServiceError::invalid("a room member names its connection"))?;
    Ok((
        member.user_id,
        Member {
            gateway_id: conn.gateway_id.clone(),
            conn_id: conn.conn_id,
            nick: member.nick,
        },
        conn,
    ))
}

impl ChannelsRole {
    /// Starts the sweeper that drops idle rooms and topics; it ends with
    /// the runtime.
    pub fn new(settings: ChannelSettings, gateways: Arc<dyn GatewayDirectory>) -> Self {
        let inner = Arc::new(Inner {
            settings,
            gateways,
            epoch: switchboard_mesh::new_message_id(),
            topics: Mutex::default(),
            rooms: Mutex::default(),
        });
        let weak = Arc::downgrade(&inner);
        let every =
            (inner.settings.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.sweep().await;
            }
        });
        ChannelsRole { inner }
    }

    /// Rooms and topics held now (tests and measurements).
    pub fn counts(&self) -> (usize, usize) {
        (
            lock(&self.inner.topics).len(),
            lock(&self.inner.rooms).len(),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check_name(what: &str, name: &str) -> Result<(), ServiceError> {
    if name.is_empty() || name.len() > 256 {
        return Err(ServiceError::invalid(format!(
            "a {what} name is 1 to 256 bytes"
        )));
    }
    Ok(())
}

/// Where a topic's offsets start when it is created at its owner: the
/// creation time in milliseconds × 1000. A topic that starts again (its
/// owner lost, swept when idle, moved on a scale-out) starts above every
/// offset it gave out before (unless it published over 1,000 a millisecond
/// on average), so a `since` from before is below everything kept and is
/// answered `recovered: false`, never with another life's publications.
/// Below 2^53 until the year 2255: exact in JavaScript numbers.
fn first_offset() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms.saturating_mul(1000)
}

impl Inner {
    fn topic(&self, app_id: &str, topic: &str) -> Arc<tokio::sync::Mutex<Topic>> {
        let mut map = lock(&self.topics);
        let t = map
            .entry((app_id.to_owned(), topic.to_owned()))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Topic {
                    offset: first_offset(),
                    ..Topic::default()
                }))
            })
            .clone();
        metrics::gauge!("switchboard_topics").set(map.len() as f64);
        t
    }

    fn existing_topic(&self, app_id: &str, topic: &str) -> Option<Arc<tokio::sync::Mutex<Topic>>> {
        lock(&self.topics)
            .get(&(app_id.to_owned(), topic.to_owned()))
            .cloned()
    }

    fn room(&self, app_id: &str, room: &str) -> Arc<tokio::sync::Mutex<Room>> {
        let mut map = lock(&self.rooms);
        let r = map
            .entry((app_id.to_owned(), room.to_owned()))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Room {
                    name: room.to_owned(),
                    ..Room::default()
                }))
            })
            .clone();
        metrics::gauge!("switchboard_rooms").set(map.len() as f64);
        r
    }

    fn existing_room(&self, app_id: &str, room: &str) -> Option<Arc<tokio::sync::Mutex<Room>>> {
        lock(&self.rooms)
            .get(&(app_id.to_owned(), room.to_owned()))
            .cloned()
    }

    /// Pushes one channel event to each gateway; returns the gateways that
    /// are gone (their subscribers resubscribe should they come back, see
    /// the gateway's channel sync).
    async fn push(&self, gateways: &[String], push: pb::ChannelPush) -> Vec<String> {
        let mut failed = Vec::new();
        for gateway_id in gateways {
            let Some(gateway) = self.gateways.gateway_when_known(gateway_id).await else {
                failed.push(gateway_id.clone());
                continue;
            };
            let item = pb::PushItem {
                channel: Some(push.clone()),
                ..Default::default()
            };
            // A known gateway that fails (its queue is full) keeps its
            // subscribers: only a gateway gone from discovery is dropped.
            if let Err(e) = gateway.push(pb::PushRequest { items: vec![item] }).await {
                metrics::counter!("switchboard_channel_push_failures_total").increment(1);
                tracing::debug!(gateway = %gateway_id, error = %e, "channel push failed");
            }
        }
        failed
    }

    async fn sweep(&self) {
        let idle = self.settings.idle;
        let topics: Vec<(Key, Arc<tokio::sync::Mutex<Topic>>)> = lock(&self.topics)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, topic) in topics {
            let mut t = topic.lock().await;
            if t.gateways.is_empty() && t.last_active.is_none_or(|at| at.elapsed() >= idle) {
                t.gone = true;
                lock(&self.topics).remove(&key);
            }
        }
        let rooms: Vec<(Key, Arc<tokio::sync::Mutex<Room>>)> = lock(&self.rooms)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, room) in rooms {
            let mut r = room.lock().await;
            if r.members.is_empty() && r.last_active.is_none_or(|at| at.elapsed() >= idle) {
                r.gone = true;
                lock(&self.rooms).remove(&key);
                tracing::debug!(app = %key.0, room = %key.1, "idle room dropped");
            }
        }
        metrics::gauge!("switchboard_topics").set(lock(&self.topics).len() as f64);
        metrics::gauge!("switchboard_rooms").set(lock(&self.rooms).len() as f64);
    }
}

/// Takes a channel's lock, looking again when the sweeper removed it in
/// between.
macro_rules! locked {
    ($inner:expr, $get:ident, $app:expr, $name:expr) => {
        loop {
            let handle = $inner.$get($app, $name);
            let guard = handle.clone().lock_owned().await;
            if !guard.gone {
                break guard;
            }
        }
    };
}

fn fanout_span(kind: &'static str, app_id: &str, name: &str, id: &str) -> tracing::Span {
    tracing::info_span!(
        "groups.fanout",
        channel.kind = kind,
        app = %app_id,
        channel.name = %name,
        message.id = %id,
        fanout.size = tracing::field::Empty,
    )
}

fn record_fanout(kind: &'static str, span: &tracing::Span, gateways: usize, started: Instant) {
    span.record("fanout.size", gateways);
    metrics::histogram!("switchboard_channel_fanout_gateways", "kind" => kind)
        .record(gateways as f64);
    metrics::histogram!("switchboard_channel_fanout_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
}

#[async_trait]
impl switchboard_mesh::Channels for ChannelsRole {
    async fn subscribe(
        &self,
        req: pb::TopicSubscribeRequest,
    ) -> Result<pb::TopicSubscribeReply, ServiceError> {
        check_name("topic", &req.topic)?;
        let mut t = locked!(self.inner, topic, &req.app_id, &req.topic);
        if !t.gateways.contains(&req.gateway_id) {
            t.gateways.push(req.gateway_id.clone());
        }
        let (recovered, publications) = match req.since {
            None => (true, Vec::new()),
            // Past the latest offset: the topic started again here (its
            // owner was lost), so what the client missed is unknown.
            Some(since) if since > t.offset => (false, t.kept.iter().cloned().collect()),
            Some(since) => {
                let oldest_kept = t.kept.front().map_or(t.offset + 1, |p| p.offset);
                // Everything after `since` is here when the first missing
                // one is still kept (or nothing is missing).
                let recovered = since + 1 >= oldest_kept;
                let publications = t
                    .kept
                    .iter()
                    .filter(|p| p.offset > since)
                    .cloned()
                    .collect();
                (recovered, publications)
            }
        };
        Ok(pb::TopicSubscribeReply {
            offset: t.offset,
            recovered,
            publications,
            epoch: self.inner.epoch.clone(),
        })
    }

    async fn unsubscribe(
        &self,
        req: pb::TopicUnsubscribeRequest,
    ) -> Result<pb::TopicUnsubscribeReply, ServiceError> {
        if let Some(topic) = self.inner.existing_topic(&req.app_id, &req.topic) {
            let mut t = topic.lock().await;
            t.gateways.retain(|g| *g != req.gateway_id);
            t.last_active = Some(Instant::now());
        }
        Ok(pb::TopicUnsubscribeReply {})
    }

    async fn publish(&self, req: pb::PublishRequest) -> Result<pb::PublishReply, ServiceError> {
        let started = Instant::now();
        let mut publication = req
            .publication
            .ok_or_else(|| ServiceError::invalid("a publish request carries a publication"))?;
        check_name("topic", &publication.topic)?;
        let span = fanout_span(
            "topic",
            &publication.app_id,
            &publication.topic,
            &publication.id,
        );
        let inner = &self.inner;
        let reply = tracing::Instrument::instrument(
            async {
                let mut t = locked!(inner, topic, &publication.app_id, &publication.topic);
                t.offset += 1;
                publication.offset = t.offset;
                t.last_active = Some(Instant::now());
                t.kept.push_back(publication.clone());
                while t.kept.len() > inner.settings.topic_history {
                    t.kept.pop_front();
                }
                let gateways = t.gateways.clone();
                // Pushed under the topic's lock: every gateway gets a
                // topic's publications in offset order.
                let failed = inner
                    .push(
                        &gateways,
                        pb::ChannelPush {
                            app_id: publication.app_id.clone(),
                            event: Some(pb::channel_push::Event::Publication(publication.clone())),
                            traceparent: switchboard_telemetry::current_traceparent()
                                .unwrap_or_default(),
                            epoch: inner.epoch.clone(),
                        },
                    )
                    .await;
                t.gateways.retain(|g| !failed.contains(g));
                record_fanout("topic", &tracing::Span::current(), gateways.len(), started);
                pb::PublishReply {
                    offset: t.offset,
                    gateways: u32::try_from(gateways.len()).unwrap_or(u32::MAX),
                }
            },
            span,
        )
        .await;
        Ok(reply)
    }

    async fn room_join(&self, req: pb::RoomJoinRequest) -> Result<pb::RoomJoinReply, ServiceError> {
        check_name("room", &req.room)?;
        let (user_id, member, conn) = member_of(req.member)?;
        let nick = member.nick.clone();
        let mut r = locked!(self.inner, room, &req.app_id, &req.room);
        r.last_active = Some(Instant::now());
        if r.add(&user_id, member) {
            r.seq += 1;
            let event = pb::RoomEvent {
                room: req.room.clone(),
                kind: pb::RoomEventKind::Joined.into(),
                user_id,
                nick,
                members: r.count(),
                seq: r.seq,
                exclude: Some(conn),
                message: None,
            };
            self.room_event(&mut r, &req.app_id, event).await;
        }
        metrics::gauge!("switchboard_room_members").increment(1.0);
        Ok(pb::RoomJoinReply {
            history: r.history.iter().cloned().collect(),
            members: r.count(),
            seq: r.seq,
            epoch: self.inner.epoch.clone(),
        })
    }

    async fn room_leave(
        &self,
        req: pb::RoomLeaveRequest,
    ) -> Result<pb::RoomLeaveReply, ServiceError> {
        let (user_id, member, conn) = member_of(req.member)?;
        let Some(room) = self.inner.existing_room(&req.app_id, &req.room) else {
            return Ok(pb::RoomLeaveReply {});
        };
        let mut r = room.lock().await;
        let Some(conns) = r.members.get_mut(&user_id) else {
            return Ok(pb::RoomLeaveReply {});
        };
        let before = conns.len();
        conns.retain(|m| !(m.gateway_id == member.gateway_id && m.conn_id == member.conn_id));
        if conns.len() < before {
            metrics::gauge!("switchboard_room_members").decrement(1.0);
        }
        let nick = conns.first().map(|m| m.nick.clone());
        if conns.is_empty() {
            r.members.remove(&user_id);
            r.seq += 1;
            r.last_active = Some(Instant::now());
            let event = pb::RoomEvent {
                room: req.room.clone(),
                kind: pb::RoomEventKind::Left.into(),
                user_id,
                nick: nick.unwrap_or(member.nick),
                members: r.count(),
                seq: r.seq,
                exclude: Some(conn),
                message: None,
            };
            self.room_event(&mut r, &req.app_id, event).await;
        }
        Ok(pb::RoomLeaveReply {})
    }

    async fn room_send(&self, req: pb::RoomSendRequest) -> Result<pb::RoomSendReply, ServiceError> {
        let started = Instant::now();
        let message = req
            .message
            .ok_or_else(|| ServiceError::invalid("a room send carries a message"))?;
        let (user_id, member, conn) = member_of(req.member)?;
        let span = fanout_span("room", &req.app_id, &message.room, &message.id);
        let inner = &self.inner;
        tracing::Instrument::instrument(
            async {
                let mut r = locked!(inner, room, &req.app_id, &message.room);
                // The gateway checked membership. A member unknown here is
                // one of a room whose owner was lost: it goes on in the
                // room as this instance has it (its gateway sees the new
                // epoch and tells its members ROOM_RESET).
                if !r.is_member(&user_id, &conn) {
                    r.add(&user_id, member);
                }
                r.seq += 1;
                r.last_active = Some(Instant::now());
                r.history.push_back(message.clone());
                while r.history.len() > inner.settings.room_history {
                    r.history.pop_front();
                }
                let event = pb::RoomEvent {
                    room: message.room.clone(),
                    kind: pb::RoomEventKind::Message.into(),
                    user_id,
                    nick: message.nick.clone(),
                    members: r.count(),
                    seq: r.seq,
                    exclude: None,
                    message: Some(message),
                };
                let gateways = self.room_event(&mut r, &req.app_id, event).await;
                record_fanout("room", &tracing::Span::current(), gateways, started);
                Ok(pb::RoomSendReply { members: r.count() })
            },
            span,
        )
        .await
    }

    async fn room_sync(&self, req: pb::RoomSyncRequest) -> Result<pb::RoomSyncReply, ServiceError> {
        check_name("room", &req.room)?;
        let reset = req.epoch != self.inner.epoch;
        let mut r = locked!(self.inner, room, &req.app_id, &req.room);
        let known = r
            .members
            .values()
            .flatten()
            .any(|m| m.gateway_id == req.gateway_id);
        if reset || !known {
            // The room's previous owner was lost, or this gateway's members
            // were dropped (it was unreachable for a while): they go on in
            // the room as it is here.
            for member in req.members {
                let (user_id, member, _) = member_of(Some(member))?;
                if member.gateway_id == req.gateway_id {
                    r.add(&user_id, member);
                }
            }
            r.last_active = Some(Instant::now());
        }
        Ok(pb::RoomSyncReply {
            reset,
            epoch: self.inner.epoch.clone(),
            seq: r.seq,
        })
    }
}

impl ChannelsRole {
    /// Pushes a room event to the room's gateways; members of gateways that
    /// cannot be reached are dropped (their gateway adds them back with its
    /// next sync). Returns the number of gateways.
    async fn room_event(&self, r: &mut Room, app_id: &str, event: pb::RoomEvent) -> usize {
        let gateways = r.gateways();
        let failed = self
            .inner
            .push(
                &gateways,
                pb::ChannelPush {
                    app_id: app_id.to_owned(),
                    event: Some(pb::channel_push::Event::Room(event)),
                    traceparent: switchboard_telemetry::current_traceparent().unwrap_or_default(),
                    epoch: self.inner.epoch.clone(),
                },
            )
            .await;
        if !failed.is_empty() {
            self.drop_gateways(r, app_id, &failed).await;
        }
        gateways.len()
    }

    /// Members on gateways that are gone leave the room; the others see
    /// them leave (a gateway that fails now only loses its own members).
    async fn drop_gateways(&self, r: &mut Room, app_id: &str, gone: &[String]) {
        let mut left = Vec::new();
        for (user_id, conns) in r.members.iter_mut() {
            let nick = conns.first().map(|m| m.nick.clone()).unwrap_or_default();
            conns.retain(|m| !gone.contains(&m.gateway_id));
            if conns.is_empty() {
                left.push((user_id.clone(), nick));
            }
        }
        r.members.retain(|_, conns| !conns.is_empty());
        for (user_id, nick) in left {
            r.seq += 1;
            let event = pb::RoomEvent {
                room: r.name.clone(),
                kind: pb::RoomEventKind::Left.into(),
                user_id,
                nick,
                members: r.count(),
                seq: r.seq,
                exclude: None,
                message: None,
            };
            self.inner
                .push(
                    &r.gateways(),
                    pb::ChannelPush {
                        app_id: app_id.to_owned(),
                        event: Some(pb::channel_push::Event::Room(event)),
                        traceparent: String::new(),
                        epoch: self.inner.epoch.clone(),
                    },
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_mesh::{Channels, GatewayClient, GatewayTable};

    /// A gateway that records what it is pushed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<pb::ChannelPush>>);

    #[async_trait]
    impl switchboard_mesh::Gateway for Recorder {
        async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ServiceError> {
            lock(&self.0).extend(req.items.into_iter().filter_map(|i| i.channel));
            Ok(pb::PushReply::default())
        }
    }

    fn role(topic_history: usize, room_history: usize) -> (ChannelsRole, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let table = Arc::new(GatewayTable::default());
        table.insert("gw1", GatewayClient::from_local(recorder.clone()));
        let settings = ChannelSettings {
            topic_history,
            room_history,
            ..ChannelSettings::default()
        };
        (ChannelsRole::new(settings, table), recorder)
    }

    async fn publish(role: &ChannelsRole, content: &str) -> u64 {
        role.publish(pb::PublishRequest {
            publication: Some(pb::Publication {
                app_id: "a".into(),
                topic: "t".into(),
                content: content.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("published")
        .offset
    }

    async fn since(role: &ChannelsRole, since: u64) -> (bool, Vec<u64>) {
        let reply = role
            .subscribe(pb::TopicSubscribeRequest {
                app_id: "a".into(),
                topic: "t".into(),
                gateway_id: "gw2".into(),
                since: Some(since),
            })
            .await
            .expect("subscribed");
        (
            reply.recovered,
            reply.publications.iter().map(|p| p.offset).collect(),
        )
    }

    #[tokio::test]
    async fn recovery_is_complete_only_while_the_first_missed_publication_is_kept() {
        let (role, recorder) = role(3, 10);
        let b = role
            .subscribe(pb::TopicSubscribeRequest {
                app_id: "a".into(),
                topic: "t".into(),
                gateway_id: "gw1".into(),
                since: None,
            })
            .await
            .expect("subscribed")
            .offset;
        // A new topic's offsets start from a time-based value.
        assert!(b > 1_700_000_000_000_000, "{b}");
        for i in 1..=7 {
            assert_eq!(publish(&role, &format!("p{i}")).await, b + i);
        }
        // Pushed once each, in offset order, to the subscribed gateway.
        let offsets: Vec<u64> = lock(&recorder.0)
            .iter()
            .filter_map(|p| match &p.event {
                Some(pb::channel_push::Event::Publication(p)) => Some(p.offset),
                _ => None,
            })
            .collect();
        assert_eq!(offsets, (1..=7).map(|i| b + i).collect::<Vec<_>>());
        let kept = vec![b + 5, b + 6, b + 7];
        assert_eq!(since(&role, b + 7).await, (true, vec![]));
        assert_eq!(since(&role, b + 4).await, (true, kept.clone()));
        assert_eq!(since(&role, b + 3).await, (false, kept.clone()));
        assert_eq!(since(&role, 0).await, (false, kept.clone()));
        // Offsets of an earlier life of the topic, at another owner (below
        // this one's start), or past the latest: never recovered.
        assert_eq!(since(&role, b - 5).await, (false, kept.clone()));
        assert_eq!(since(&role, b + 1207).await, (false, kept));
    }

    fn member(user: &str, conn_id: u64) -> Option<pb::RoomMember> {
        Some(pb::RoomMember {
            user_id: user.into(),
            nick: user.into(),
            conn: Some(pb::ConnRef {
                gateway_id: "gw1".into(),
                conn_id,
            }),
        })
    }

    async fn join(role: &ChannelsRole, user: &str, conn_id: u64) -> pb::RoomJoinReply {
        role.room_join(pb::RoomJoinRequest {
            app_id: "a".into(),
            room: "r".into(),
            member: member(user, conn_id),
        })
        .await
        .expect("joined")
    }

    #[tokio::test]
    async fn a_room_keeps_its_last_messages_and_counts_users_not_connections() {
        let (role, recorder) = role(3, 2);
        assert_eq!(join(&role, "a-1", 1).await.members, 1);
        assert_eq!(join(&role, "a-2", 2).await.members, 2);
        assert_eq!(
            join(&role, "a-2", 3).await.members,
            2,
            "a second connection"
        );
        for i in 1..=3 {
            role.room_send(pb::RoomSendRequest {
                app_id: "a".into(),
                message: Some(pb::RoomMessage {
                    room: "r".into(),
                    content: format!("m{i}"),
                    ..Default::default()
                }),
                member: member("a-1", 1),
            })
            .await
            .expect("sent");
        }
        let reply = join(&role, "a-3", 4).await;
        let history: Vec<&str> = reply.history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(history, ["m2", "m3"]);
        assert_eq!(reply.members, 3);
        role.room_leave(pb::RoomLeaveRequest {
            app_id: "a".into(),
            room: "r".into(),
            member: member("a-2", 2),
        })
        .await
        .expect("left");
        role.room_leave(pb::RoomLeaveRequest {
            app_id: "a".into(),
            room: "r".into(),
            member: member("a-2", 3),
        })
        .await
        .expect("left");
        // Events: joined ×3 (users), messages ×3, left once (the user's
        // last connection); numbered in order.
        let events: Vec<(i32, u64, u32)> = lock(&recorder.0)
            .iter()
            .filter_map(|p| match &p.event {
                Some(pb::channel_push::Event::Room(e)) => Some((e.kind, e.seq, e.members)),
                _ => None,
            })
            .collect();
        let (joined, message, left) = (
            pb::RoomEventKind::Joined as i32,
            pb::RoomEventKind::Message as i32,
            pb::RoomEventKind::Left as i32,
        );
        assert_eq!(
            events,
            [
                (joined, 1, 1),
                (joined, 2, 2),
                (message, 3, 2),
                (message, 4, 2),
                (message, 5, 2),
                (joined, 6, 3),
                (left, 7, 2),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn members_on_a_gateway_that_is_gone_leave_and_the_others_are_told() {
        let (role, recorder) = role(3, 10);
        join(&role, "a-1", 1).await;
        role.room_join(pb::RoomJoinRequest {
            app_id: "a".into(),
            room: "r".into(),
            member: Some(pb::RoomMember {
                user_id: "a-2".into(),
                nick: "two".into(),
                conn: Some(pb::ConnRef {
                    gateway_id: "gw-gone".into(),
                    conn_id: 1,
                }),
            }),
        })
        .await
        .expect("joined");
        // Its gateway is not (or no longer) known: the push of the next
        // event finds it gone, and a-2 leaves.
        let last = lock(&recorder.0)
            .iter()
            .rev()
            .find_map(|p| match &p.event {
                Some(pb::channel_push::Event::Room(e)) => Some(e.clone()),
                _ => None,
            })
            .expect("an event");
        assert_eq!(last.kind(), pb::RoomEventKind::Left);
        assert_eq!((last.user_id.as_str(), last.nick.as_str()), ("a-2", "two"));
        assert_eq!((last.room.as_str(), last.members), ("r", 1));
        assert_eq!(join(&role, "a-3", 3).await.members, 2);
    }
}
