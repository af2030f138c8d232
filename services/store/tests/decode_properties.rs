//! Property tests of what the store reads back from disk: inbox log
//! segments (replay of damaged logs), the log's manifest, stored message
//! values and outbox items. The same checks the fuzz targets in fuzz/ run
//! (`switchboard_store::fuzzing`), on generated input: damage is an error
//! or reported damage, never a panic; what was written reads back as
//! itself.

use proptest::prelude::*;
use prost::Message;
use switchboard_store::InboxMessage;
use switchboard_store::fuzzing::{
    check_arbitrary_segment, check_log_open, check_manifest, check_queue_item,
    check_stored_message, check_written_segment,
};

fn message() -> impl Strategy<Value = InboxMessage> {
    (
        (
            "[a-z0-9-]{0,12}",
            0..6i32,
            "\\PC{0,8}",
            "\\PC{0,8}",
            "\\PC{0,40}",
        ),
        ("\\PC{0,8}", any::<i64>(), any::<u64>(), 0..3i32),
        prop::collection::vec("[a-z]{1,4}", 0..3),
    )
        .prop_map(
            |((id, kind, from, to, content), (reference, ts, seq, feature), hops)| InboxMessage {
                id,
                kind,
                from,
                to,
                group: String::new(),
                content,
                reference,
                ts,
                seq,
                feature,
                hops,
            },
        )
}

proptest! {
    #[test]
    fn written_segments_replay_as_written_and_one_damaged_byte_is_reported(
        data in prop::collection::vec(any::<u8>(), 0..600)
    ) {
        check_written_segment(&data);
    }

    #[test]
    fn arbitrary_segment_bytes_replay_without_a_panic(
        data in prop::collection::vec(any::<u8>(), 0..300), id in 0..64u64, legacy in any::<bool>()
    ) {
        check_arbitrary_segment(&data, id, legacy);
    }

    #[test]
    fn manifests_are_refused_or_round_trip(data in prop::collection::vec(any::<u8>(), 0..200)) {
        check_manifest(&data);
    }

    #[test]
    fn stored_messages_decode_alike_whole_and_by_header(
        msg in message(), at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()
    ) {
        let mut bytes = msg.encode_to_vec();
        check_stored_message(&bytes);
        if !bytes.is_empty() {
            let at = at % bytes.len();
            if cut { bytes.truncate(at) } else { bytes[at] = byte }
        }
        check_stored_message(&bytes);
    }

    #[test]
    fn outbox_items_are_refused_or_round_trip(data in prop::collection::vec(any::<u8>(), 0..40)) {
        check_queue_item(&data);
    }
}

proptest! {
    // Each case writes and opens two log directories: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn log_directories_open_or_report_their_damage(
        data in prop::collection::vec(any::<u8>(), 0..400)
    ) {
        check_log_open(&data);
    }
}
