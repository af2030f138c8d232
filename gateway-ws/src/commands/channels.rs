//! Typed requests for topics, rooms and presence subscriptions.

/// Subscribe to a topic; with `since`, recover what came after that offset.
#[derive(Debug)]
pub struct Subscribe {
    pub topic: String,
    pub since: Option<u64>,
}

#[derive(Debug)]
pub struct Unsubscribe {
    pub topic: String,
}

#[derive(Debug)]
pub struct Publish {
    pub topic: String,
    pub content: String,
}

/// Join a room; `app_id` only for an anonymous join (no AUTH_CLIENT).
#[derive(Debug)]
pub struct RoomJoin {
    pub room: String,
    pub nick: Option<String>,
    pub app_id: Option<String>,
}

#[derive(Debug)]
pub struct RoomMessage {
    pub room: String,
    pub content: String,
}

#[derive(Debug)]
pub struct RoomLeave {
    pub room: String,
}

/// Watch (or stop watching) users' presence.
#[derive(Debug)]
pub struct PresenceUsers {
    pub users: Vec<String>,
}
