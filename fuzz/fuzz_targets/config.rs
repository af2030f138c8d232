//! A config file and `SWITCHBOARD_*` variables: the TOML text, then after a
//! NUL byte one `KEY=VALUE` per line (the prefix is added).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, vars) = text.split_once('\0').unwrap_or((text, ""));
    let env: BTreeMap<String, String> = vars
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (format!("SWITCHBOARD_{k}"), v.to_owned()))
        .collect();
    switchboard_config::fuzzing::check_config(toml, &env);
});
