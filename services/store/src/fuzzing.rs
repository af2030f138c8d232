//! Not an API: the decoders of what the store reads back from disk, with
//! the properties they must keep, for the fuzz targets in `fuzz/` and the
//! property tests. Each `check_*` takes arbitrary bytes and panics (an
//! `assert!`) only when a property is broken: damage must be an error,
//! never a panic, and what was encoded must decode to itself.

use prost::Message;

use crate::{InboxMessage, StoreError, decode_header, manifest, queue};

pub use crate::hot::replay_checks::{
    check_arbitrary_segment, check_log_open, check_written_segment,
};

/// A stored message value: the header reader never panics, agrees with a
/// full decode whenever that succeeds, and a decoded message re-encodes to
/// bytes that decode to it again.
pub fn check_stored_message(value: &[u8]) {
    let header = decode_header(value);
    let Ok(full) = InboxMessage::decode(value) else {
        return;
    };
    let header = match header {
        Ok(header) => header,
        Err(e) => panic!("a full decode reads it but the header reader does not: {e}"),
    };
    assert_eq!(header.id, full.id);
    assert_eq!(header.kind, full.kind);
    assert_eq!(header.from, full.from);
    assert_eq!(header.to, full.to);
    assert_eq!(header.reference, full.reference);
    let again = InboxMessage::decode(full.encode_to_vec().as_slice());
    assert_eq!(
        again.ok().as_ref(),
        Some(&full),
        "decode -> encode -> decode differs"
    );
}

/// An outbox (queue) item's stored value: a clear error or an item that
/// encodes back to the same bytes.
pub fn check_queue_item(value: &[u8]) {
    match queue::decode_item(7, value, 1) {
        Ok(item) => {
            assert_eq!(
                queue::encode_item(item.enqueued_at_ms, &item.payload),
                value
            );
        }
        Err(StoreError::Malformed(_)) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

/// The inbox log's manifest: arbitrary bytes are refused with an offset
/// inside them (the checksum catches nearly everything), and the same
/// bytes with their checksum fixed up — so the fuzzer reaches the entry
/// reader — decode to entries that encode and decode to themselves.
pub fn check_manifest(bytes: &[u8]) {
    if let Err((offset, _)) = manifest::decode(bytes) {
        assert!(offset <= bytes.len() as u64);
    }
    let mut fixed = bytes.to_vec();
    fixed.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(bytes).to_le_bytes());
    match manifest::decode(&fixed) {
        Ok(entries) => {
            let again = manifest::decode(&manifest::encode(&entries));
            assert_eq!(again.as_ref(), Ok(&entries), "encode -> decode differs");
        }
        Err((offset, _)) => assert!(offset <= bytes.len() as u64),
    }
}
