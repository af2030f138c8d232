//! Property tests of config loading: the example file with lines changed,
//! keys set to random values, and `SWITCHBOARD_*` variables. The same check
//! the fuzz target in fuzz/ runs (`switchboard_config::fuzzing`): an error
//! or a valid config that written back as TOML loads as itself.

use std::collections::BTreeMap;

use proptest::prelude::*;
use switchboard_config::fuzzing::check_config;

const EXAMPLE: &str = include_str!("../../../deploy/switchboard.example.toml");

/// `key = value` lines of the example file, by section.
fn keys() -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in EXAMPLE.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once('=') {
            out.push((section.clone(), key.trim().to_owned()));
        }
    }
    out
}

/// A TOML value of any type, or text that is not one.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0..100_000u32).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9.:/_ -]{0,16}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(vec![
            "\"1s\"",
            "\"24h\"",
            "\"0s\"",
            "\"fjall\"",
            "\"none\"",
            "0.5",
            "-1",
            "[]",
            "[\"gateway\"]",
            "{}",
            "\"\""
        ])
        .prop_map(str::to_owned),
        "\\PC{0,8}",
    ]
}

fn edited() -> impl Strategy<Value = String> {
    let keys = keys();
    prop::collection::vec((prop::sample::select(keys), toml_value()), 0..4).prop_map(|edits| {
        // Each edit replaces the key's line in its section.
        let mut text = String::new();
        let mut section = String::new();
        for line in EXAMPLE.lines() {
            let bare = line.split('#').next().unwrap_or("").trim();
            if let Some(name) = bare.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            }
            let key = bare.split_once('=').map(|(k, _)| k.trim());
            match edits
                .iter()
                .find(|((s, k), _)| *s == section && Some(k.as_str()) == key)
            {
                Some(((_, k), v)) => text.push_str(&format!("{k} = {v}\n")),
                None => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    })
}

fn env() -> impl Strategy<Value = BTreeMap<String, String>> {
    let names: Vec<String> = keys()
        .into_iter()
        .map(|(s, k)| {
            let path = if s.is_empty() { k } else { format!("{s}__{k}") };
            format!("SWITCHBOARD_{}", path.to_ascii_uppercase())
        })
        .collect();
    prop::collection::btree_map(
        prop::sample::select(names),
        prop_oneof![
            "[a-z0-9.:,_ -]{0,12}",
            (0..100_000u32).prop_map(|n| n.to_string())
        ],
        0..3,
    )
}

proptest! {
    #[test]
    fn edited_example_files_load_or_are_refused(text in edited(), env in env()) {
        check_config(&text, &BTreeMap::new());
        check_config(&text, &env);
    }

    #[test]
    fn any_text_loads_or_is_refused(text in "\\PC{0,48}") {
        check_config(&text, &BTreeMap::new());
    }
}

#[test]
fn the_example_file_round_trips() {
    check_config(EXAMPLE, &BTreeMap::new());
}
