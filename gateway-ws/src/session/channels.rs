//! Topics, rooms and presence subscriptions of one session: the rules
//! (names, sizes, per-connection limits, who may publish, anonymous room
//! members), the calls to the owning groups instance, and this gateway's
//! local subscriber lists.

use std::collections::{BTreeMap, BTreeSet};

use switchboard_mesh::{ErrorCode, ServiceError, pb};

use super::{Identity, Session, call};
use crate::commands::{
    ClientCommand, PresenceUsers, Publish, RequestMeta, RoomJoin, RoomLeave, RoomMessage,
    Subscribe, Unsubscribe,
};
use crate::registry::ConnHandle;

/// Longest topic or room name, bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest nick, characters.
pub const MAX_NICK_CHARS: usize = 64;

/// What a session holds of topics, rooms and presence.
#[derive(Default)]
pub(crate) struct ChannelState {
    /// Where pushes to this session go (none for a transport without a
    /// live connection: it subscribes to nothing).
    conn: Option<ConnHandle>,
    /// The user of an anonymous room member (no AUTH_CLIENT).
    /// Boxed, like `app`: most connections never have one, and this state
    /// lives as long as the connection.
    anon: Option<Box<Identity>>,
    /// The app's settings, read once (who may publish).
    app: Option<Box<pb::App>>,
    topics: BTreeSet<String>,
    /// room → (user, nick) this connection joined as.
    rooms: BTreeMap<String, (String, String)>,
    watching: BTreeSet<String>,
}

/// What a topic, room or presence request came to.
#[derive(Debug)]
pub enum ChannelOutcome {
    Subscribed {
        topic: String,
        offset: u64,
        /// Only when the client asked with `since`.
        recovered: Option<bool>,
        /// Kept publications after `since`, oldest first.
        publications: Vec<pb::Publication>,
        epoch: String,
    },
    Unsubscribed {
        topic: String,
    },
    Published {
        topic: String,
        id: String,
        offset: u64,
        /// The publisher is subscribed: its own PUBLICATION waits until
        /// `PUBLISHED` is queued ([`Session::publish_answered`]).
        held: bool,
    },
    RoomJoined {
        room: String,
        history: Vec<pb::RoomMessage>,
        members: u32,
        /// The generated id of an anonymous member.
        user_id: Option<String>,
        seq: u64,
        epoch: String,
    },
    /// Nothing to answer (ROOM_MESSAGE, ROOM_LEAVE, presence requests).
    Done,
    UserList {
        users: Vec<String>,
        truncated: bool,
    },
}

fn check_name(what: &str, name: &str) -> Result<(), ServiceError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ServiceError::invalid(format!(
            "data.{what} must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

impl Session {
    /// Where pushes to this session's subscriptions go.
    pub(crate) fn attach(&mut self, conn: ConnHandle) {
        self.channels.conn = Some(conn);
    }

    /// Whether an anonymous room member may send `kind` (before, or
    /// without, AUTH_CLIENT).
    pub(crate) fn admits_anonymous(&self, kind: crate::commands::CommandKind) -> bool {
        use crate::commands::CommandKind;
        match kind {
            CommandKind::RoomJoin => true,
            CommandKind::RoomMessage | CommandKind::RoomLeave => self.channels.anon.is_some(),
            _ => false,
        }
    }

    /// Authenticated, or an anonymous room member: the connection is not
    /// closed for want of AUTH_CLIENT.
    pub fn is_admitted(&self) -> bool {
        self.is_authenticated() || self.channels.anon.is_some()
    }

    /// The user a room request acts as.
    fn room_user(&self) -> Result<&Identity, ServiceError> {
        match (self.identity.get(), &self.channels.anon) {
            (Some(id), _) => Ok(id),
            (None, Some(anon)) => Ok(anon),
            (None, None) => Err(ServiceError::new(
                ErrorCode::NotAuthenticated,
                "send AUTH_CLIENT first",
            )),
        }
    }

    fn conn(&self) -> Result<ConnHandle, ServiceError> {
        self.channels.conn.clone().ok_or_else(|| {
            ServiceError::invalid("subscriptions need a live connection (WebSocket)")
        })
    }

    fn conn_ref(&self) -> pb::ConnRef {
        pb::ConnRef {
            gateway_id: self.gw.id.clone(),
            conn_id: self.conn_id,
        }
    }

    pub(super) async fn run_channel(
        &mut self,
        command: ClientCommand,
        _meta: &RequestMeta,
    ) -> Result<ChannelOutcome, ServiceError> {
        match command {
            ClientCommand::Subscribe(c) => self.subscribe(c).await,
            ClientCommand::Unsubscribe(c) => self.unsubscribe(c).await,
            ClientCommand::Publish(c) => self.publish(c).await,
            ClientCommand::RoomJoin(c) => self.room_join(c).await,
            ClientCommand::RoomMessage(c) => self.room_message(c).await,
            ClientCommand::RoomLeave(c) => self.room_leave(c).await,
            ClientCommand::PresenceSubscribe(c) => self.presence_subscribe(c).await,
            ClientCommand::PresenceUnsubscribe(c) => self.presence_unsubscribe(c),
            ClientCommand::UserList => self.user_list().await,
            _ => Err(ServiceError::internal("not a channel request")),
        }
    }

    // ------------------------------------------------------------ topics

    pub async fn subscribe(&mut self, req: Subscribe) -> Result<ChannelOutcome, ServiceError> {
        let id = self.user()?;
        check_name("topic", &req.topic)?;
        let app_id = id.app_id.clone();
        let max = self.gw.limits.max_topics_per_connection;
        if !self.channels.topics.contains(&req.topic) && self.channels.topics.len() >= max {
            return Err(ServiceError::invalid(format!(
                "more than {max} topics on one connection"
            )));
        }
        let conn = self.conn()?;
        // Registered (pending) before the owner is asked: nothing published
        // after the owner's answer is missed.
        self.gw.channels.topic_add(&app_id, &req.topic, conn);
        let reply = call(self.gw.deps.channels.subscribe(pb::TopicSubscribeRequest {
            app_id: app_id.clone(),
            topic: req.topic.clone(),
            gateway_id: self.gw.id.clone(),
            since: req.since,
        }))
        .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                self.gw
                    .channels
                    .topic_remove(&app_id, &req.topic, self.conn_id);
                return Err(e);
            }
        };
        self.channels.topics.insert(req.topic.clone());
        Ok(ChannelOutcome::Subscribed {
            topic: req.topic,
            offset: reply.offset,
            recovered: req.since.map(|_| reply.recovered),
            publications: reply.publications,
            epoch: reply.epoch,
        })
    }

    /// The SUBSCRIBED reply and recovered publications are queued: live
    /// ones follow (after `floor`).
    pub(crate) fn topic_ready(&self, topic: &str, epoch: &str, floor: u64) {
        if let Some(id) = self.identity.get() {
            self.gw
                .channels
                .topic_activate(&id.app_id, topic, self.conn_id, epoch, floor);
        }
    }

    pub async fn unsubscribe(&mut self, req: Unsubscribe) -> Result<ChannelOutcome, ServiceError> {
        let app_id = self.user()?.app_id.clone();
        check_name("topic", &req.topic)?;
        if self.channels.topics.remove(&req.topic) {
            self.leave_topic(&app_id, &req.topic).await;
        }
        Ok(ChannelOutcome::Unsubscribed { topic: req.topic })
    }

    async fn leave_topic(&self, app_id: &str, topic: &str) {
        if self.gw.channels.topic_remove(app_id, topic, self.conn_id) {
            let req = pb::TopicUnsubscribeRequest {
                app_id: app_id.to_owned(),
                topic: topic.to_owned(),
                gateway_id: self.gw.id.clone(),
            };
            if let Err(e) = call(self.gw.deps.channels.unsubscribe(req)).await {
                tracing::debug!(error = %e, "topic unsubscribe failed");
            }
        }
    }

    pub async fn publish(&mut self, req: Publish) -> Result<ChannelOutcome, ServiceError> {
        let id = self.user()?;
        check_name("topic", &req.topic)?;
        self.check_content(&req.content)?;
        let (app_id, user_id) = (id.app_id.clone(), id.user_id.clone());
        let app = match &self.channels.app {
            Some(app) => pb::App::clone(app),
            None => {
                let app = call(self.gw.deps.auth.get_app(pb::GetAppRequest {
                    app_id: app_id.clone(),
                }))
                .await?;
                self.channels.app = Some(Box::new(app.clone()));
                app
            }
        };
        if app.topic_publish == "master" && app.master_user_id != user_id {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                "only the app's master user may publish to its topics",
            ));
        }
        let message_id = switchboard_mesh::new_message_id();
        let held = self.channels.topics.contains(&req.topic)
            && self
                .gw
                .channels
                .topic_hold(&app_id, &req.topic, self.conn_id);
        let reply = call(self.gw.deps.channels.publish(pb::PublishRequest {
            publication: Some(pb::Publication {
                app_id: app_id.clone(),
                topic: req.topic.clone(),
                from: user_id,
                content: req.content,
                id: message_id.clone(),
                ts: switchboard_mesh::now_ms(),
                offset: 0,
            }),
        }))
        .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                if held {
                    self.gw
                        .channels
                        .topic_release(&app_id, &req.topic, self.conn_id);
                }
                return Err(e);
            }
        };
        Ok(ChannelOutcome::Published {
            topic: req.topic,
            id: message_id,
            offset: reply.offset,
            held,
        })
    }

    // ------------------------------------------------------------- rooms

    pub async fn room_join(&mut self, req: RoomJoin) -> Result<ChannelOutcome, ServiceError> {
        check_name("room", &req.room)?;
        // Checked before an anonymous member is admitted: a refused join
        // leaves the connection as it was (under the auth timeout).
        if req
            .nick
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NICK_CHARS)
        {
            return Err(ServiceError::invalid(format!(
                "data.nick must be at most {MAX_NICK_CHARS} characters"
            )));
        }
        let mut generated = None;
        if !self.is_admitted() {
            generated = Some(self.join_anonymously(req.app_id.as_deref()).await?);
        }
        let id = self.room_user()?;
        let (app_id, user_id) = (id.app_id.clone(), id.user_id.clone());
        let nick = match req.nick {
            Some(nick) if nick.chars().count() > MAX_NICK_CHARS => {
                return Err(ServiceError::invalid(format!(
                    "data.nick must be at most {MAX_NICK_CHARS} characters"
                )));
            }
            Some(nick) if !nick.is_empty() => nick,
            _ => user_id.clone(),
        };
        let max = self.gw.limits.max_rooms_per_connection;
        if !self.channels.rooms.contains_key(&req.room) && self.channels.rooms.len() >= max {
            return Err(ServiceError::invalid(format!(
                "more than {max} rooms on one connection"
            )));
        }
        let conn = self.conn()?;
        self.gw
            .channels
            .room_add(&app_id, &req.room, conn, &user_id, &nick);
        let reply = call(self.gw.deps.channels.room_join(pb::RoomJoinRequest {
            app_id: app_id.clone(),
            room: req.room.clone(),
            member: Some(pb::RoomMember {
                user_id: user_id.clone(),
                nick: nick.clone(),
                conn: Some(self.conn_ref()),
            }),
        }))
        .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                if !self.channels.rooms.contains_key(&req.room) {
                    self.gw
                        .channels
                        .room_remove(&app_id, &req.room, self.conn_id);
                }
                return Err(e);
            }
        };
        self.channels
            .rooms
            .insert(req.room.clone(), (user_id, nick));
        Ok(ChannelOutcome::RoomJoined {
            room: req.room,
            history: reply.history,
            members: reply.members,
            user_id: generated,
            seq: reply.seq,
            epoch: reply.epoch,
        })
    }

    /// `PUBLISHED` is queued: the publisher's held publications follow.
    pub(crate) fn publish_answered(&self, topic: &str) {
        if let Some(id) = self.identity.get() {
            self.gw
                .channels
                .topic_release(&id.app_id, topic, self.conn_id);
        }
    }

    /// ROOM_JOINED is queued: the room's live events follow (after `seq`).
    pub(crate) fn room_ready(&self, room: &str, epoch: &str, seq: u64) {
        if let Ok(id) = self.room_user() {
            self.gw
                .channels
                .room_activate(&id.app_id, room, self.conn_id, epoch, seq);
        }
    }

    /// An anonymous member of an app that allows it: a generated user id.
    async fn join_anonymously(&mut self, app_id: Option<&str>) -> Result<String, ServiceError> {
        let Some(app_id) = app_id.filter(|a| !a.is_empty()) else {
            return Err(ServiceError::new(
                ErrorCode::NotAuthenticated,
                "send AUTH_CLIENT first, or name the app (data.appId) to join anonymously",
            ));
        };
        let app = call(self.gw.deps.auth.get_app(pb::GetAppRequest {
            app_id: app_id.to_owned(),
        }))
        .await
        .map_err(|e| match e.code {
            ErrorCode::InvalidRecipient => {
                ServiceError::new(ErrorCode::Forbidden, format!("unknown app {app_id:?}"))
            }
            _ => e,
        })?;
        if !app.anonymous_rooms {
            return Err(ServiceError::new(
                ErrorCode::Forbidden,
                "this app does not allow anonymous room members; send AUTH_CLIENT first",
            ));
        }
        if let Err(reason) = self.check_origin(&app.allowed_origins) {
            metrics::counter!("switchboard_origin_refusals_total").increment(1);
            return Err(ServiceError::new(ErrorCode::Forbidden, reason));
        }
        let suffix = switchboard_mesh::new_message_id().replace('-', "");
        let user_id = format!("{}-anon-{}", app.name, &suffix[suffix.len() - 12..]);
        self.channels.anon = Some(Box::new(Identity {
            app_id: app.app_id.clone(),
            app_name: app.name.clone(),
            user_id: user_id.clone(),
            acks: false,
        }));
        self.channels.app = Some(Box::new(app));
        metrics::counter!("switchboard_anonymous_room_members_total").increment(1);
        Ok(user_id)
    }

    pub async fn room_message(&mut self, req: RoomMessage) -> Result<ChannelOutcome, ServiceError> {
        let id = self.room_user()?;
        check_name("room", &req.room)?;
        self.check_content(&req.content)?;
        let Some((user_id, nick)) = self.channels.rooms.get(&req.room) else {
            return Err(ServiceError::new(
                ErrorCode::NotAMember,
                format!("join room {:?} first", req.room),
            ));
        };
        let app_id = id.app_id.clone();
        call(self.gw.deps.channels.room_send(pb::RoomSendRequest {
            app_id,
            message: Some(pb::RoomMessage {
                room: req.room,
                from: user_id.clone(),
                nick: nick.clone(),
                content: req.content,
                id: switchboard_mesh::new_message_id(),
                ts: switchboard_mesh::now_ms(),
            }),
            member: Some(pb::RoomMember {
                user_id: user_id.clone(),
                nick: nick.clone(),
                conn: Some(self.conn_ref()),
            }),
        }))
        .await?;
        Ok(ChannelOutcome::Done)
    }

    pub async fn room_leave(&mut self, req: RoomLeave) -> Result<ChannelOutcome, ServiceError> {
        let app_id = self.room_user()?.app_id.clone();
        check_name("room", &req.room)?;
        if let Some((user_id, nick)) = self.channels.rooms.remove(&req.room) {
            self.leave_room(&app_id, &req.room, user_id, nick).await;
        }
        Ok(ChannelOutcome::Done)
    }

    async fn leave_room(&self, app_id: &str, room: &str, user_id: String, nick: String) {
        self.gw.channels.room_remove(app_id, room, self.conn_id);
        let req = pb::RoomLeaveRequest {
            app_id: app_id.to_owned(),
            room: room.to_owned(),
            member: Some(pb::RoomMember {
                user_id,
                nick,
                conn: Some(self.conn_ref()),
            }),
        };
        if let Err(e) = call(self.gw.deps.channels.room_leave(req)).await {
            tracing::debug!(error = %e, "room leave failed");
        }
    }

    // ---------------------------------------------------------- presence

    pub async fn presence_subscribe(
        &mut self,
        req: PresenceUsers,
    ) -> Result<ChannelOutcome, ServiceError> {
        let id = self.user()?;
        let app_id = id.app_id.clone();
        let mut users: Vec<String> = req
            .users
            .into_iter()
            .filter(|u| !self.channels.watching.contains(u))
            .collect();
        users.sort_unstable();
        users.dedup();
        for user in &users {
            super::check_recipient(id, user, self.gw.limits.max_user_id_chars)?;
        }
        let max = self.gw.limits.max_presence_subscriptions;
        if self.channels.watching.len() + users.len() > max {
            return Err(ServiceError::invalid(format!(
                "more than {max} watched users on one connection"
            )));
        }
        let conn = self.conn()?;
        // Watched before the lookup, so no change is missed; the registry
        // tells each state once, whichever comes first.
        for user in &users {
            self.gw.channels.watch(&app_id, user, conn.clone());
            self.channels.watching.insert(user.clone());
        }
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let now = match self.gw.deps.presence.gateways_batch(&app_id, &refs).await {
            Ok(now) => now,
            Err(e) => {
                // Not watched after all: a retry asks for them again.
                for user in &users {
                    self.gw.channels.unwatch(&app_id, user, self.conn_id);
                    self.channels.watching.remove(user);
                }
                return Err(ServiceError::unavailable(e.to_string()));
            }
        };
        for (user, gateways) in users.iter().zip(now) {
            self.gw
                .channels
                .tell(&app_id, user, self.conn_id, !gateways.is_empty());
        }
        Ok(ChannelOutcome::Done)
    }

    pub fn presence_unsubscribe(
        &mut self,
        req: PresenceUsers,
    ) -> Result<ChannelOutcome, ServiceError> {
        let app_id = self.user()?.app_id.clone();
        for user in req.users {
            if self.channels.watching.remove(&user) {
                self.gw.channels.unwatch(&app_id, &user, self.conn_id);
            }
        }
        Ok(ChannelOutcome::Done)
    }

    pub async fn user_list(&mut self) -> Result<ChannelOutcome, ServiceError> {
        let id = self.user()?;
        let (users, truncated) = self
            .gw
            .deps
            .presence
            .online_users(&id.app_id, self.gw.limits.max_user_list)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        Ok(ChannelOutcome::UserList { users, truncated })
    }

    /// The connection is gone: its subscriptions, rooms and watches end.
    pub async fn close_channels(&mut self) {
        let Ok(id) = self.room_user() else {
            return;
        };
        let app_id = id.app_id.clone();
        if self.gw.shutdown.is_cancelled() {
            // The whole gateway is stopping: owners are not called for each
            // connection (they may be stopping too); they drop this gateway
            // once discovery no longer lists it.
            for topic in std::mem::take(&mut self.channels.topics) {
                self.gw.channels.topic_remove(&app_id, &topic, self.conn_id);
            }
            for room in std::mem::take(&mut self.channels.rooms).into_keys() {
                self.gw.channels.room_remove(&app_id, &room, self.conn_id);
            }
        }
        for topic in std::mem::take(&mut self.channels.topics) {
            self.leave_topic(&app_id, &topic).await;
        }
        for (room, (user_id, nick)) in std::mem::take(&mut self.channels.rooms) {
            self.leave_room(&app_id, &room, user_id, nick).await;
        }
        for user in std::mem::take(&mut self.channels.watching) {
            self.gw.channels.unwatch(&app_id, &user, self.conn_id);
        }
    }
}
