//! A log directory (segments, one damaged or missing, and a manifest)
//! opened as start-up opens it, plainly and recovering. Writes files: slower
//! per execution than the in-memory targets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchboard_store::fuzzing::check_log_open(data);
});
