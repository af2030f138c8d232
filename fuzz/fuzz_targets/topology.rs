//! A federation topology file: parsed, checked, routed, written back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        switchboard_topology::fuzzing::check_topology(text);
    }
});
