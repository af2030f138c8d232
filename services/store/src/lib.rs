//! The inbox store: undelivered RELIABLE messages per user, ordered by a
//! per-inbox sequence number.
//!
//! The data model is the one a wide-column store wants: partition key
//! `(app_id, user_id)`, clustering key `seq`, value the encoded
//! [`InboxMessage`]. Every backend (the embedded redb store here, ScyllaDB
//! later) implements [`Store`] and passes the same [`contract`] suite.

pub mod contract;
#[cfg(test)]
mod damage_tests;
mod fjall_store;
mod group_commit;
mod hot;
mod manifest;
pub mod queue;
pub mod queue_contract;
mod redb_store;

use async_trait::async_trait;
pub use fjall_store::{FjallStore, FjallStoreOptions};
use prost::Message;
pub use queue::{FjallQueues, Queue, QueueDepth, QueueItem};
pub use redb_store::{RedbStore, RedbStoreOptions};
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
    /// Follow-up messages appended, with their sequence numbers.
    pub appended: Vec<InboxMessage>,
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

/// Persistence of inboxes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends each message to the inbox named by its `to` field and assigns
    /// the next sequence number of that inbox (written into the returned
    /// sequence list, in input order). Durable when it returns: a crash after
    /// this point does not lose the messages. Sequence numbers are never
    /// reused, also after the inbox was emptied.
    async fn append(&self, app_id: &str, messages: &[InboxMessage])
    -> Result<Vec<u64>, StoreError>;

    /// Up to `limit` messages with `seq > after_seq`, oldest first, and how
    /// many more are stored after them.
    async fn fetch(
        &self,
        inbox: &InboxKey,
        after_seq: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError>;

    /// Removes messages by sequence number and returns those that were still
    /// there (a second removal of the same message returns nothing, which is
    /// what makes sender confirmations happen once). For each removed
    /// message with a reference, `follow_up` may build a message (a sender confirmation) that
    /// is appended — to the inbox its `to` names, same app — atomically with
    /// the removal, so that a crash loses neither or both.
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

/// A message encoded for storage, on the caller's thread: the writer only
/// assigns its sequence number (kept in the key, not in the value).
pub(crate) struct Prepared {
    pub(crate) to: String,
    /// Whether it carries a reference: only such a message can have a
    /// follow-up (see [`FollowUp`]), so a removal reads no other.
    pub(crate) referenced: bool,
    /// Encoded straight into the buffer the engines keep (no copy on the
    /// writer thread).
    pub(crate) value: fjall::Slice,
}

impl Prepared {
    pub(crate) fn new(msg: &InboxMessage) -> Self {
        // The seq lives in the key only.
        let value = if msg.seq == 0 {
            encode_value(msg)
        } else {
            encode_value(&InboxMessage {
                seq: 0,
                ..msg.clone()
            })
        };
        Prepared {
            to: msg.to.clone(),
            referenced: !msg.reference.is_empty(),
            value,
        }
    }
}

fn encode_value(msg: &InboxMessage) -> fjall::Slice {
    let mut value = byteview::ByteView::with_size(msg.encoded_len());
    let encoded = match value.get_mut() {
        Some(mut buf) => {
            let mut out: &mut [u8] = &mut buf;
            // The buffer has exactly the encoded length.
            msg.encode(&mut out).is_ok() && out.is_empty()
        }
        None => false,
    };
    if encoded {
        fjall::Slice::from(value)
    } else {
        // Unreachable in practice (a fresh buffer has one owner, and the
        // length is prost's own); the plain way.
        fjall::Slice::from(msg.encode_to_vec())
    }
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
