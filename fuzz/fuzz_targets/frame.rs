//! A WebSocket text frame as the server parses it into a command.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text frames reach the parser as UTF-8 (invalid UTF-8 is refused by
    // the socket reader with close 1007).
    if let Ok(text) = std::str::from_utf8(data) {
        switchboard_gateway::fuzzing::check_frame(text);
    }
});
