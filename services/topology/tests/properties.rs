//! Property tests of the federation topology file: generated files (some
//! valid, some not) and the example with one byte changed. The same check
//! the fuzz target in fuzz/ runs (`switchboard_topology::fuzzing`): a
//! parse error, a list of problems, or a network that routes and writes
//! back as itself.

use proptest::prelude::*;
use switchboard_topology::fuzzing::check_topology;

const RING: &str = include_str!("../../../deploy/federation/ring.yaml");

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["d1", "d2", "d3", "d4"]).prop_map(str::to_owned),
        1 => "[a-zA-Z0-9 -]{0,6}",
    ]
}

fn topology() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((name(), 0..3u8), 0..5),
        prop::collection::vec((name(), name(), -2..1_000_002i64), 0..6),
        prop::collection::vec(
            ("[A-Z]{0,4}", "[a-z0-9-]{0,8}", any::<bool>(), prop::collection::vec((name(), 0..100u32, prop::option::of(0..200u32)), 0..3)),
            0..2,
        ),
    )
        .prop_map(|(domains, links, apps)| {
            let mut y = String::from("domains:\n");
            for (d, url) in &domains {
                let url = ["http://127.0.0.1:9090", "not a url", ""][usize::from(*url)];
                y += &format!("  - name: {d:?}\n    federation: {url:?}\n    client: \"ws://127.0.0.1:8088/ws\"\n");
            }
            y += "domainLinks:\n";
            for (a, b, w) in &links {
                y += &format!("  - {{n1: {a:?}, n2: {b:?}, weight: {w}}}\n");
            }
            y += "clientApps:\n";
            for (app, id, auth, ranges) in &apps {
                y += &format!(
                    "  - appName: {app:?}\n    appId: {id:?}\n    authEnabled: {auth}\n    masterUserId: \"{app}-1\"\n    userDistributions:\n"
                );
                for (d, from, to) in ranges {
                    match to {
                        Some(to) => y += &format!("      - {{domainName: {d:?}, from: {from}, to: {to}}}\n"),
                        None => y += &format!("      - {{domainName: {d:?}, from: {from}}}\n"),
                    }
                }
            }
            y
        })
}

proptest! {
    #[test]
    fn generated_files_parse_check_and_round_trip(text in topology()) {
        check_topology(&text);
    }

    #[test]
    fn the_example_with_a_byte_changed_is_read_or_refused(at in any::<usize>(), byte in 0x20u8..0x7f) {
        let mut bytes = RING.as_bytes().to_vec();
        let at = at % bytes.len();
        bytes[at] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            check_topology(&text);
        }
    }
}

#[test]
fn the_example_round_trips() {
    check_topology(RING);
}
