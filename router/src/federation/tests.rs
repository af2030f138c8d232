//! Route choices of one domain: plain functions over a four-domain ring
//! d1 - d2 - d3 - d4 - d1 (weights 1, 1, 2, 2: d1 reaches d3 through d2).

use std::collections::HashMap;
use std::sync::Arc;

use switchboard_metadata::CurrentTopology;
use switchboard_topology::Topology;

use super::Target;
use super::routes::RouteTable;

const RING: &str = "
domains:
  - {name: d1, federation: 'http://127.0.0.1:1', client: 'ws://127.0.0.1:1/ws'}
  - {name: d2, federation: 'http://127.0.0.1:2', client: 'ws://127.0.0.1:2/ws'}
  - {name: d3, federation: 'http://127.0.0.1:3', client: 'ws://127.0.0.1:3/ws'}
  - {name: d4, federation: 'http://127.0.0.1:4', client: 'ws://127.0.0.1:4/ws'}
domainLinks:
  - {n1: d1, n2: d2, weight: 1}
  - {n1: d2, n2: d3, weight: 1}
  - {n1: d3, n2: d4, weight: 2}
  - {n1: d4, n2: d1, weight: 2}
clientApps:
  - appName: ANZ
    appId: app
    userDistributions:
      - {domainName: d1, from: 0, to: 999}
      - {domainName: d2, from: 1000, to: 1999}
      - {domainName: d3, from: 2000, to: 2999}
      - {domainName: d4, from: 3000}
";

fn ring() -> Arc<CurrentTopology> {
    let (topology, network) = Topology::parse(RING).expect("ring");
    Arc::new(CurrentTopology { topology, network })
}

fn table(me: &str, reported: &[(&str, &str)], own_down: &[&str]) -> RouteTable {
    let reported = reported
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    let own: HashMap<String, bool> = own_down.iter().map(|p| ((*p).to_owned(), false)).collect();
    RouteTable::new(me, Some(ring()), reported, &own)
}

fn peer(p: &str) -> Target {
    Target::Peer(p.to_owned())
}

#[test]
fn local_users_and_users_of_unknown_apps_stay_here() {
    let t = table("d1", &[], &[]);
    assert_eq!(t.target("app", "ANZ-5", &[]), Target::Local);
    assert_eq!(t.target("other-app", "ANZ-2500", &[]), Target::Local);
    assert_eq!(t.home("app", "ANZ-2500"), Some("d3"));
    assert_eq!(t.home("app", "ANZ-5"), None);
}

#[test]
fn the_cheapest_path_and_around_a_link_this_domain_sees_down() {
    assert_eq!(
        table("d1", &[], &[]).target("app", "ANZ-2500", &[]),
        peer("d2")
    );
    assert_eq!(
        table("d1", &[], &["d2"]).target("app", "ANZ-2500", &[]),
        peer("d4")
    );
}

#[test]
fn links_other_domains_report_down_are_avoided_but_own_observation_wins() {
    // d3 reports d2-d3 down: d1 goes round through d4.
    assert_eq!(
        table("d1", &[("d3", "d2")], &[]).target("app", "ANZ-2500", &[]),
        peer("d4")
    );
    // d2 reports d1-d2 down, but d1 itself sees it up: d1's view wins.
    assert_eq!(
        table("d1", &[("d2", "d1")], &[]).target("app", "ANZ-2500", &[]),
        peer("d2")
    );
}

#[test]
fn with_no_path_up_an_envelope_waits_for_the_cheapest_link() {
    assert_eq!(
        table("d1", &[], &["d2", "d4"]).target("app", "ANZ-2500", &[]),
        peer("d2")
    );
}

#[test]
fn domains_passed_before_are_never_next() {
    // At d2, an envelope that came from d1 for d4: the cheapest way back
    // through d1 is excluded, it goes on through d3.
    let t = table("d2", &[], &[]);
    assert_eq!(t.target("app", "ANZ-3500", &[]), peer("d1"));
    assert_eq!(t.target("app", "ANZ-3500", &["d1".to_owned()]), peer("d3"));
    // Its home already passed it on: nowhere to go.
    assert_eq!(
        t.target("app", "ANZ-5", &["d1".to_owned()]),
        Target::Nowhere
    );
}

#[test]
fn a_domain_the_topology_does_not_name_routes_nothing() {
    let t = table("d9", &[], &[]);
    assert_eq!(t.target("app", "ANZ-2500", &[]), Target::Local);
    assert!(!t.is_neighbour("d1"));
    assert!(table("d1", &[], &[]).is_neighbour("d4"));
    assert!(!table("d1", &[], &[]).is_neighbour("d3"));
}
