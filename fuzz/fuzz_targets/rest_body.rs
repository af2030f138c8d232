//! A REST request body, read as each body type the handlers take.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard_gateway::fuzzing::check_rest_body(data);
});
