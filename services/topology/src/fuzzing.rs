//! Not an API: the topology file's parser and checks with the properties
//! they must keep, for the fuzz targets in `fuzz/` and the property tests.
//! A broken property is an `assert!`, so the fuzzer reports it as a crash.

use crate::{LinkState, Topology, TopologyError};

/// Any text as a topology file: a parse error, a list of problems, or a
/// network that routes from each of its domains; an accepted file written
/// back as YAML reads as the same topology (decode -> encode -> decode).
pub fn check_topology(text: &str) {
    let topology = match Topology::parse(text) {
        Ok((topology, network)) => {
            for domain in &topology.domains {
                let routes = network.routes_from(&domain.name, &LinkState::all_up());
                assert!(routes.is_some(), "a listed domain has no routes");
            }
            topology
        }
        Err(TopologyError::Parse(_)) => return,
        Err(TopologyError::Invalid(problems)) => {
            assert!(!problems.0.is_empty(), "refused without a problem");
            let _ = problems.to_string();
            return;
        }
    };
    let yaml = serde_norway::to_string(&topology).expect("a topology serializes");
    match Topology::parse(&yaml) {
        Ok((again, _)) => assert_eq!(again, topology, "decode -> encode -> decode differs"),
        Err(e) => panic!("an accepted topology, written back, is refused: {e}\n{yaml}"),
    }
}
