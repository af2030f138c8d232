//! Route computation on a generated 100-domain, 300-link connected graph:
//! one domain's table (what a router computes), every domain's table (what
//! `topology show` prints), and one domain's table again after a link
//! goes down (what a link-state change costs a router).

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_topology::{Domain, Link, LinkState, Network, Topology};

const DOMAINS: usize = 100;
const LINKS: usize = 300;

/// A ring (connected) plus chords from a fixed linear congruential
/// sequence, weights 1 to 10: the same graph on every run.
fn generated() -> (Topology, Network) {
    let name = |i: usize| format!("domain-{i:03}");
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut pairs = std::collections::BTreeSet::new();
    for i in 0..DOMAINS {
        pairs.insert((i, (i + 1) % DOMAINS));
    }
    while pairs.len() < LINKS {
        let a = next() as usize % DOMAINS;
        let b = next() as usize % DOMAINS;
        if a != b && !pairs.contains(&(b, a)) {
            pairs.insert((a, b));
        }
    }
    let topology = Topology {
        domains: (0..DOMAINS)
            .map(|i| Domain {
                name: name(i),
                federation: format!("http://10.0.{}.{}:9090", i / 250, i % 250 + 1),
                client: format!("ws://10.0.{}.{}:8088/ws", i / 250, i % 250 + 1),
            })
            .collect(),
        domain_links: pairs
            .iter()
            .map(|&(a, b)| Link {
                n1: name(a),
                n2: name(b),
                weight: (next() % 10 + 1) as i64,
            })
            .collect(),
        client_apps: vec![],
    };
    match topology.check() {
        Ok(network) => (topology, network),
        Err(problems) => panic!("generated topology: {problems}"),
    }
}

fn routes(c: &mut Criterion) {
    let (topology, network) = generated();
    assert_eq!(network.links().count(), LINKS);
    let up = LinkState::all_up();
    let from = "domain-000";
    c.bench_function("routes_from one domain (100 domains, 300 links)", |b| {
        b.iter(|| network.routes_from(std::hint::black_box(from), &up))
    });
    c.bench_function("routes_from every domain (full table)", |b| {
        b.iter(|| {
            network
                .domains()
                .iter()
                .map(|d| network.routes_from(&d.name, &up).map_or(0, |t| t.len()))
                .sum::<usize>()
        })
    });
    // The link the first route of domain-000 uses goes down.
    let table = network.routes_from(from, &up).unwrap_or_default();
    let first = table
        .values()
        .next()
        .map(|r| r.next.clone())
        .unwrap_or_default();
    let mut down = LinkState::all_up();
    down.set_down(from, &first);
    c.bench_function("routes_from one domain after a link went down", |b| {
        b.iter(|| network.routes_from(std::hint::black_box(from), &down))
    });
    c.bench_function("check + index the 100-domain topology", |b| {
        b.iter(|| std::hint::black_box(&topology).check().is_ok())
    });
}

criterion_group!(benches, routes);
criterion_main!(benches);
