//! Rendering what topic, room and presence requests came to.

use super::{Connection, Flow};
use crate::commands::RequestMeta;
use crate::frames;
use crate::session::ChannelOutcome;

impl Connection {
    pub(super) fn on_channel(&mut self, outcome: ChannelOutcome, meta: &RequestMeta) -> Flow {
        let reference = meta.reference.as_deref();
        match outcome {
            ChannelOutcome::Subscribed {
                topic,
                offset,
                recovered,
                publications,
                epoch,
            } => {
                self.send_text(
                    "SUBSCRIBED",
                    frames::subscribed(&topic, offset, recovered, reference),
                );
                let mut floor = offset;
                for p in &publications {
                    floor = floor.max(p.offset);
                    self.send_text("PUBLICATION", frames::publication(p));
                }
                self.session.topic_ready(&topic, &epoch, floor);
            }
            ChannelOutcome::Unsubscribed { topic } => {
                self.send_text("UNSUBSCRIBED", frames::unsubscribed(&topic, reference));
            }
            ChannelOutcome::Published {
                topic,
                id,
                offset,
                held,
            } => {
                self.send_text(
                    "PUBLISHED",
                    frames::published(&topic, &id, offset, reference),
                );
                if held {
                    self.session.publish_answered(&topic);
                }
            }
            ChannelOutcome::RoomJoined {
                room,
                history,
                members,
                user_id,
                seq,
                epoch,
            } => {
                self.send_text(
                    "ROOM_JOINED",
                    frames::room_joined(&room, &history, members, user_id.as_deref(), reference),
                );
                self.session.room_ready(&room, &epoch, seq);
            }
            ChannelOutcome::UserList { users, truncated } => {
                self.send_text("USER_LIST", frames::user_list(&users, truncated, reference));
            }
            ChannelOutcome::Done => {}
        }
        Flow::Continue
    }
}
