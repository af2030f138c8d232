//! The inbox log as start-up replays it: arbitrary segment bytes, written
//! segments with one damaged byte, and the manifest. The first byte picks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_store::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 4 {
        0 => fuzzing::check_arbitrary_segment(rest, u64::from(pick >> 2), false),
        1 => fuzzing::check_arbitrary_segment(rest, u64::from(pick >> 2), true),
        2 => fuzzing::check_written_segment(rest),
        _ => fuzzing::check_manifest(rest),
    }
});
