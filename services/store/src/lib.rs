//! The inbox store: undelivered RELIABLE messages per user, ordered by a
//! per-inbox sequence number, and the id index that makes a resend of a
//! client-given message id idempotent.
//!
//! The data model is the one a wide-column or relational store wants:
//! partition key `(app_id, user_id)`, clustering key `seq`, value the encoded
//! [`InboxMessage`]; the id index is keyed by `(app_id, sender, client id)`.
//! [`Store`] promises only what such a shared database can give without a
//! single writer (increasing, not gap-free, sequence numbers; follow-ups
//! safe to write twice); [`contract`] is the suite every engine passes.
//!
//! The engine built in is [`FjallStore`]: an append-only inbox log of
//! segment files with an in-memory index of the undelivered messages (the
//! hot tier, where nearly every message is written once and removed moments
//! later) in front of fjall, a log-structured merge tree, which keeps what
//! stays undelivered and the id index past the log's life. One writer thread
//! commits everything queued as one synced write (group commit).
//!
//! With the `scylla` feature, [`ScyllaStore`] keeps the same contracts in a
//! ScyllaDB cluster shared by any number of processes (scylla_store.rs).
//! [`PostgresStore`] keeps the same contract in a PostgreSQL database that
//! several delivery processes share (`postgres.rs`).

pub mod contract;
#[cfg(test)]
mod damage_tests;
mod fjall_store;
#[doc(hidden)]
pub mod fuzzing;
mod group_commit;
pub mod group_contract;
pub mod groups;
mod hot;
mod manifest;
mod postgres;
mod postgres_groups;
mod postgres_queue;
#[cfg(test)]
mod postgres_tests;
pub mod queue;
pub mod queue_contract;
#[cfg(all(test, feature = "scylla"))]
mod scylla_contract_tests;
#[cfg(feature = "scylla")]
mod scylla_groups;
#[cfg(feature = "scylla")]
mod scylla_queue;
#[cfg(feature = "scylla")]
mod scylla_schema;
#[cfg(feature = "scylla")]
mod scylla_seq;
#[cfg(feature = "scylla")]
mod scylla_store;

use async_trait::async_trait;
pub use fjall_store::{FjallStore, FjallStoreOptions};
pub use groups::{FjallGroups, GroupChange, GroupRecord, GroupStore};
pub use postgres::{PostgresOptions, PostgresStore};
use prost::Message;
pub use queue::{FjallQueues, Queue, QueueDepth, QueueItem};
#[cfg(feature = "scylla")]
pub use scylla_groups::ScyllaGroups;
#[cfg(feature = "scylla")]
pub use scylla_queue::ScyllaQueues;
#[cfg(feature = "scylla")]
pub use scylla_store::{ScyllaOptions, ScyllaStore};
pub use switchboard_proto::mesh::InboxMessage;

/// One user's inbox: the partition key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboxKey {
    pub app_id: String,
    pub user_id: String,
}

impl InboxKey {
    pub fn new(app_id: impl Into<String>, user_id: impl Into<String>) -> Self {
        InboxKey {
            app_id: app_id.into(),
            user_id: user_id.into(),
        }
    }
}

/// The fields of a stored message that a follow-up is built from: all but
/// its content, group and timestamps, borrowed from the stored bytes, so
/// that a removal never copies (or validates) a message body and allocates
/// nothing for a message that needs no follow-up. Same field numbers as
/// [`InboxMessage`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MessageHeader<'a> {
    pub id: &'a str,
    pub kind: i32,
    pub from: &'a str,
    pub to: &'a str,
    pub reference: &'a str,
}

impl MessageHeader<'_> {
    /// The kind; an unknown value reads as the default, as prost's accessor.
    pub fn kind(&self) -> switchboard_proto::mesh::MessageKind {
        switchboard_proto::mesh::MessageKind::try_from(self.kind).unwrap_or_default()
    }
}

/// Builds the message that follows the removal of a delivered one (a
/// sender confirmation answers the sender's reference). Called only for
/// removed messages that carry a non-empty `reference`: a store need not
/// read the others.
pub type FollowUp = fn(&MessageHeader<'_>) -> Option<InboxMessage>;

/// What a removal did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Removal {
    /// Sequence numbers of the messages that were still there.
    pub removed: Vec<u64>,
    /// Follow-up messages this removal wrote, with their sequence numbers.
    /// A follow-up another removal of the same message already wrote (a
    /// retried or racing removal in a shared engine) may be listed again:
    /// it is stored once, and pushing it twice is what at-least-once allows.
    pub appended: Vec<InboxMessage>,
}

/// What an append did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence number of its inbox.
    Stored(u64),
    /// Its client id was already accepted from its sender within the id
    /// window: not stored again.
    Repeat,
}

impl Appended {
    /// The sequence number it was stored under; `None` for a repeat.
    pub fn seq(self) -> Option<u64> {
        match self {
            Appended::Stored(seq) => Some(seq),
            Appended::Repeat => None,
        }
    }
}

/// A page of an inbox, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboxPage {
    pub messages: Vec<InboxMessage>,
    /// Messages stored past this page.
    pub left: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("stored message could not be decoded: {0}")]
    Corrupt(#[from] prost::DecodeError),
    #[error("stored message could not be decoded: {0}")]
    Malformed(&'static str),
    #[error("store is closed")]
    Closed,
    /// A file of the store is damaged (or missing) where start-up cannot
    /// tell it from data: the start is refused, unless the store is opened
    /// to recover (`store.recover`), which keeps every intact record.
    #[error(
        "store damaged: {file} at byte {offset}: {detail}; --store-recover keeps every intact \
         record and logs what was lost (config store.recover)"
    )]
    Damaged {
        file: std::path::PathBuf,
        offset: u64,
        detail: String,
    },
    /// A request the store refuses (an empty or too long queue name, a
    /// payload or batch past its bound).
    #[error("invalid store request: {0}")]
    Invalid(String),
}

/// Persistence of inboxes: what an engine must give, and no more, so that
/// an embedded engine with one writer and a shared database with many
/// (ScyllaDB, PostgreSQL) can both keep it.
///
/// - **Sequence numbers** of an inbox strictly increase: the messages of one
///   call in input order, and a message appended after another's append
///   returned gets a higher number. They are never reused (also after the
///   inbox was emptied, or a restart) and need not be gap-free: a failed or
///   repeated write may consume numbers (the contract suite asserts increase,
///   never gap-freedom). Readers page by `seq > after_seq`, so an engine
///   whose appends commit concurrently must not show a number before the
///   lower ones it has acknowledged.
/// - **Idempotent sends**: a message appended with its client-id flag is
///   indexed by `(app, from, id)` for the id window in the same durable write
///   as the message; an append of the same key within the window is answered
///   [`Appended::Repeat`] and not stored. The index is per sender.
/// - **Follow-ups** (sender confirmations) are keyed by their id in their
///   inbox: writing one twice stores it once. They need not be atomic with
///   the removal that produced them; see [`Store::remove`] for the order a
///   shared engine must use.
/// - No engine type appears here: messages go in and out as
///   [`InboxMessage`], stored bytes as `&[u8]`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends each message to the inbox named by its `to` field, returning
    /// per message (in input order) the sequence number it got or
    /// [`Appended::Repeat`]. Durable when it returns: a crash after this point
    /// loses neither the messages nor their id index entries.
    ///
    /// `client_ids` is empty (no message carries a client-given id) or has
    /// one flag per message. A flagged message is looked up by
    /// `(app_id, from, id)` in the sender's id index: when that key was
    /// accepted within the id window it is a repeat; otherwise the key is
    /// indexed with the message. Several flagged messages with the same key
    /// in one call are the copies of one send (a group message, one per
    /// recipient): one index entry, all repeats or none; a second copy for
    /// the same recipient is a repeat. Of concurrent appends of one key,
    /// exactly one stores it.
    async fn append(
        &self,
        app_id: &str,
        messages: &[InboxMessage],
        client_ids: &[bool],
    ) -> Result<Vec<Appended>, StoreError>;

    /// Up to `limit` messages with `seq > after_seq`, oldest first, and how
    /// many more are stored after them.
    async fn fetch(
        &self,
        inbox: &InboxKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError>;

    /// Removes messages by sequence number and returns those that were still
    /// there (a second removal of the same message returns nothing). For each
    /// removed message with a reference, `follow_up` may build a message (a
    /// sender confirmation, keyed by the removed message's id) that is stored
    /// in the inbox its `to` names, same app.
    ///
    /// A follow-up is stored once however many removals of its message run
    /// (retried, or racing on several nodes), and a crash never loses it once
    /// its message is gone. An engine may write the follow-up and the removal
    /// as one atomic write (the embedded engine: one log frame, one sync), or
    /// — a shared database without multi-partition transactions — must write
    /// the follow-up **first**, as an insert keyed by (its inbox, its id) that
    /// does nothing when the key exists, and the removal after it: a crash
    /// between the two leaves the message, which is delivered and removed
    /// again, and the second follow-up write finds the first.
    ///
    /// A removal without follow-ups need not be durable at once: a message
    /// that reappears after a crash is delivered again, which at-least-once
    /// allows. With follow-ups it is durable when it returns.
    async fn remove(
        &self,
        inbox: &InboxKey,
        seqs: &[u64],
        follow_up: Option<FollowUp>,
    ) -> Result<Removal, StoreError>;

    /// Removes from several inboxes at once, like [`Store::remove`] on each
    /// (one result per inbox, in order). Backends that batch writes commit
    /// them together.
    async fn remove_many(
        &self,
        removals: Vec<(InboxKey, Vec<u64>)>,
        follow_up: Option<FollowUp>,
    ) -> Result<Vec<Removal>, StoreError> {
        let mut out = Vec::with_capacity(removals.len());
        for (inbox, seqs) in &removals {
            out.push(self.remove(inbox, seqs, follow_up).await?);
        }
        Ok(out)
    }

    /// Number of messages in an inbox.
    async fn count(&self, inbox: &InboxKey) -> Result<u64, StoreError> {
        Ok(self.fetch(inbox, 0, 0).await?.left)
    }

    /// Finishes in-flight writes and releases the storage. Later calls fail
    /// with [`StoreError::Closed`].
    async fn close(&self) -> Result<(), StoreError>;
}

/// The follow-up of a removed message's stored bytes: `None` without a
/// reference (the message is then not decoded at all beyond its header).
pub(crate) fn follow_up_of(
    follow_up: FollowUp,
    stored: &[u8],
) -> Result<Option<InboxMessage>, StoreError> {
    let header = decode_header(stored)?;
    Ok(if header.reference.is_empty() {
        None
    } else {
        follow_up(&header)
    })
}

/// Reads what a follow-up needs of a stored message (protobuf wire format,
/// the last occurrence of a field winning as in any protobuf reader),
/// skipping its body and allocating nothing.
pub fn decode_header(value: &[u8]) -> Result<MessageHeader<'_>, StoreError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut buf = value;
    let mut header = MessageHeader::default();
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf)?;
        match (tag, wire) {
            (1 | 3 | 4 | 7, WireType::LengthDelimited) => {
                let len = usize::try_from(decode_varint(&mut buf)?)
                    .ok()
                    .filter(|&len| len <= buf.len())
                    .ok_or(StoreError::Malformed("a field runs past the end"))?;
                let (field, rest) = buf.split_at(len);
                let field = std::str::from_utf8(field)
                    .map_err(|_| StoreError::Malformed("a string field is not UTF-8"))?;
                match tag {
                    1 => header.id = field,
                    3 => header.from = field,
                    4 => header.to = field,
                    _ => header.reference = field,
                }
                buf = rest;
            }
            // An enum field is an int32 varint (sign-extended when negative).
            (2, WireType::Varint) => header.kind = decode_varint(&mut buf)? as i32,
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())?,
        }
    }
    Ok(header)
}

/// Decodes a stored message; its sequence number comes from the key.
pub(crate) fn decode_stored(value: &[u8], seq: u64) -> Result<InboxMessage, StoreError> {
    let mut msg = InboxMessage::decode(value)?;
    msg.seq = seq;
    Ok(msg)
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use prost::Message;

    fn message(i: usize) -> InboxMessage {
        InboxMessage {
            id: format!("0190-{i}"),
            kind: (i % 3) as i32,
            from: format!("demo-ann-{i}"),
            to: if i.is_multiple_of(4) {
                String::new()
            } else {
                "demo-bøb".into()
            },
            group: if i.is_multiple_of(2) {
                "g-42".into()
            } else {
                String::new()
            },
            content: "x".repeat(i * 97),
            reference: if i.is_multiple_of(3) {
                String::new()
            } else {
                format!("r{i}")
            },
            ts: 1_764_000_000_000 + i as i64,
            seq: i as u64,
            feature: (i % 2) as i32,
            hops: if i.is_multiple_of(5) {
                Vec::new()
            } else {
                vec!["d1".into(), "d2".into()]
            },
        }
    }

    #[test]
    fn the_header_is_what_a_full_decode_reads_without_the_body() {
        for i in 0..20 {
            let msg = message(i);
            let bytes = msg.encode_to_vec();
            let header = decode_header(&bytes).expect("decodes");
            let full = InboxMessage::decode(bytes.as_slice()).expect("full decode");
            assert_eq!(header.id, full.id);
            assert_eq!(header.kind, full.kind);
            assert_eq!(header.kind(), full.kind());
            assert_eq!(header.from, full.from);
            assert_eq!(header.to, full.to);
            assert_eq!(header.reference, full.reference);
        }
    }

    #[test]
    fn a_repeated_field_reads_as_its_last_value_like_prost() {
        let mut bytes = message(1).encode_to_vec();
        bytes.extend(
            InboxMessage {
                from: "later".into(),
                kind: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let header = decode_header(&bytes).expect("decodes");
        let full = InboxMessage::decode(bytes.as_slice()).expect("full decode");
        assert_eq!((header.from, header.kind), ("later", 2));
        assert_eq!((full.from.as_str(), full.kind), ("later", 2));
        assert_eq!(header.id, full.id);
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let bytes = message(5).encode_to_vec();
        for cut in 1..bytes.len() {
            // Every prefix either decodes (it ends between fields) or fails.
            let _ = decode_header(&bytes[..cut]);
        }
        // A field length past the end.
        assert!(decode_header(&[0x0a, 0x05, b'a']).is_err());
        // `from` that is not UTF-8.
        assert!(decode_header(&[0x1a, 0x02, 0xff, 0xfe]).is_err());
        // A truncated key.
        assert!(decode_header(&[0x80]).is_err());
    }
}
