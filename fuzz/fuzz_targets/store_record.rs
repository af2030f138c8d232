//! A stored record's bytes: an inbox message value (header reader and full
//! decode) and an outbox item. The first byte picks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_store::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick % 2 == 0 {
        fuzzing::check_stored_message(rest);
    } else {
        fuzzing::check_queue_item(rest);
    }
});
