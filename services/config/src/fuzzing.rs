//! Not an API: config loading (TOML text and `SWITCHBOARD_*` variables)
//! with the properties it must keep, for the fuzz targets in `fuzz/` and
//! the property tests. A broken property is an `assert!`, so the fuzzer
//! reports it as a crash.

use std::collections::BTreeMap;

use crate::Config;

/// A config file and variables: an error, or a valid config that written
/// back as TOML loads as itself (decode -> encode -> decode).
pub fn check_config(text: &str, env: &BTreeMap<String, String>) {
    let Ok(config) = Config::from_toml_and_env(text, env) else {
        return;
    };
    let written = toml::to_string(&config).expect("a config serializes");
    match Config::from_toml_and_env(&written, &BTreeMap::new()) {
        Ok(again) => assert_eq!(again, config, "decode -> encode -> decode differs"),
        Err(e) => panic!("an accepted config, written back, is refused: {e}\n{written}"),
    }
}
