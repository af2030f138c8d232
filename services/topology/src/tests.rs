use proptest::prelude::*;

use super::*;

const RING: &str = include_str!("../../../deploy/federation/ring.yaml");

fn ring() -> Network {
    match Topology::parse(RING) {
        Ok((_, network)) => network,
        Err(e) => panic!("ring.yaml: {e}"),
    }
}

fn problems(yaml: &str) -> Vec<Problem> {
    let t = Topology::from_yaml(yaml).expect("shape");
    match t.check() {
        Ok(_) => vec![],
        Err(p) => p.0,
    }
}

fn domain(name: &str) -> Domain {
    Domain {
        name: name.into(),
        federation: "http://127.0.0.1:9090".into(),
        client: "ws://127.0.0.1:8088/ws".into(),
    }
}

fn path(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_example_file_parses_with_the_issue_keys() {
    let t = Topology::from_yaml(RING).expect("parse");
    assert_eq!(t.domains.len(), 4);
    assert_eq!(t.domains[0].federation, "http://127.0.0.1:9091");
    assert_eq!(t.domains[0].client, "ws://127.0.0.1:8091/ws");
    // The weight defaults to 1.
    assert_eq!(t.domain_links[3].weight, 1);
    let app = &t.client_apps[0];
    assert_eq!(
        (app.app_name.as_str(), app.app_id.as_str(), app.auth_enabled),
        ("ANZ", "app-id-343", false)
    );
    assert_eq!(app.master_user_id, "ANZ-123223");
    assert_eq!(app.user_distributions[3].to, None);
    // Stored as JSON and read back unchanged.
    let json = serde_json::to_string(&t).expect("json");
    assert!(json.contains("\"domainLinks\"") && json.contains("\"userDistributions\""));
    assert_eq!(serde_json::from_str::<Topology>(&json).expect("back"), t);
}

#[test]
fn a_misspelt_key_is_a_parse_error_naming_it() {
    let err = Topology::from_yaml("domains: []\ndomainLinks:\n  - {n1: a, n2: b, wieght: 2}\n")
        .expect_err("unknown key");
    assert!(err.to_string().contains("wieght"), "{err}");
    assert!(Topology::from_yaml("domains: [").is_err());
}

#[test]
fn the_ring_routes_by_cost_then_by_name() {
    let net = ring();
    let up = LinkState::all_up();
    // 1 -> 3 costs 2 either way round: domain-02 < domain-04 wins.
    let r = net.next_hop("domain-01", "domain-03", &up).expect("route");
    assert_eq!(r.next, "domain-02");
    assert_eq!(r.path, path(&["domain-01", "domain-02", "domain-03"]));
    assert_eq!(r.cost, 2);
    // And from 3 back to 1 the same tie goes through domain-02 as well.
    let r = net.next_hop("domain-03", "domain-01", &up).expect("route");
    assert_eq!(r.path, path(&["domain-03", "domain-02", "domain-01"]));
    // A neighbour is one hop.
    let r = net.next_hop("domain-01", "domain-04", &up).expect("route");
    assert_eq!((r.next.as_str(), r.cost), ("domain-04", 1));
    // The 1-2 link down: the other way round.
    let mut down = LinkState::all_up();
    down.set_down("domain-02", "domain-01");
    assert!(down.is_down("domain-01", "domain-02"));
    let r = net
        .next_hop("domain-01", "domain-03", &down)
        .expect("route");
    assert_eq!(r.path, path(&["domain-01", "domain-04", "domain-03"]));
    let r = net
        .next_hop("domain-01", "domain-02", &down)
        .expect("route");
    assert_eq!(
        r.path,
        path(&["domain-01", "domain-04", "domain-03", "domain-02"])
    );
    assert_eq!(r.cost, 3);
    // Both links of domain-01 down: nothing reaches it.
    down.set_down("domain-01", "domain-04");
    assert_eq!(net.next_hop("domain-03", "domain-01", &down), None);
    assert!(
        net.routes_from("domain-01", &down)
            .expect("known")
            .is_empty()
    );
    down.set_up("domain-01", "domain-02");
    assert!(net.next_hop("domain-03", "domain-01", &down).is_some());
    // Unknown or same domains have no route.
    assert_eq!(net.next_hop("domain-01", "domain-01", &up), None);
    assert_eq!(net.next_hop("domain-01", "nowhere", &up), None);
    assert!(net.routes_from("nowhere", &up).is_none());
}

#[test]
fn a_heavier_link_moves_the_route() {
    let heavy = RING.replace(
        "{n1: domain-01, n2: domain-02, weight: 1}",
        "{n1: domain-01, n2: domain-02, weight: 5}",
    );
    let (_, net) = Topology::parse(&heavy).expect("valid");
    let table = net
        .routes_from("domain-01", &LinkState::all_up())
        .expect("known");
    let summary: Vec<(&str, &str, u64)> = table
        .iter()
        .map(|(to, r)| (to.as_str(), r.next.as_str(), r.cost))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("domain-02", "domain-04", 3),
            ("domain-03", "domain-04", 2),
            ("domain-04", "domain-04", 1),
        ]
    );
}

#[test]
fn home_domains_follow_ranges_then_entries_then_the_hash() {
    let net = ring();
    let home = |user: &str| net.home_domain("app-id-343", user);
    assert_eq!(home("ANZ-0"), Some("domain-01"));
    assert_eq!(home("ANZ-999999"), Some("domain-01"));
    assert_eq!(home("ANZ-1000000"), Some("domain-02"));
    assert_eq!(home("ANZ-2999999"), Some("domain-03"));
    // Open-ended.
    assert_eq!(home("ANZ-18446744073709551615"), Some("domain-04"));
    assert_eq!(home("ANZ-support"), Some("domain-01"));
    // Not a number, not listed: hashed over domain-02 and domain-03, the
    // same way every time.
    let hashed = home("ANZ-ops").expect("hashed");
    assert!(["domain-02", "domain-03"].contains(&hashed));
    assert_eq!(home("ANZ-ops"), Some(hashed));
    let spread: std::collections::BTreeSet<&str> = (0..200)
        .filter_map(|i| home(&format!("ANZ-x{i}")))
        .collect();
    assert_eq!(spread.len(), 2, "the hash uses both domains");
    // A number beyond u64 is not a number: hashed.
    assert!(home("ANZ-99999999999999999999").is_some());
    // Not this app's ids, or not this app.
    assert_eq!(home("BNZ-5"), None);
    assert_eq!(home("ANZ-"), None);
    assert_eq!(home("ANZ5"), None);
    assert_eq!(net.home_domain("no-such-app", "ANZ-5"), None);
}

#[test]
fn without_a_rule_a_user_has_no_home() {
    let t = Topology {
        domains: vec![domain("a"), domain("b")],
        domain_links: vec![Link {
            n1: "a".into(),
            n2: "b".into(),
            weight: 1,
        }],
        client_apps: vec![ClientApp {
            app_name: "X".into(),
            app_id: "x".into(),
            master_user_id: String::new(),
            auth_enabled: false,
            user_distributions: vec![UserRange {
                domain_name: "a".into(),
                from: 10,
                to: Some(20),
            }],
            users: vec![],
            hash_domains: vec![],
        }],
    };
    let net = t.check().expect("valid");
    assert_eq!(net.home_domain("x", "X-9"), None);
    assert_eq!(net.home_domain("x", "X-10"), Some("a"));
    assert_eq!(net.home_domain("x", "X-20"), Some("a"));
    assert_eq!(net.home_domain("x", "X-21"), None);
    assert_eq!(net.home_domain("x", "X-abc"), None);
}

/// A file with one of each problem: every one is reported, with names.
#[test]
fn every_problem_is_listed_with_what_is_wrong() {
    let yaml = r#"
domains:
  - {name: d1, federation: "http://10.0.0.1:9090", client: "ws://10.0.0.1:8088/ws"}
  - {name: d2, federation: "ftp://10.0.0.2:9090", client: "ws://10.0.0.2:8088/ws"}
  - {name: d3, federation: "http://10.0.0.3:9090", client: "not a url"}
  - {name: d1, federation: "http://10.0.0.9:9090", client: "ws://10.0.0.9:8088/ws"}
  - {name: Bad_Name, federation: "http://10.0.0.4:9090/x", client: "wss://h/ws"}
  - {name: d5, federation: "http://10.0.0.5:9090", client: "ws://10.0.0.5:8088/ws"}
domainLinks:
  - {n1: d1, n2: d2}
  - {n1: d2, n2: d1, weight: 3}
  - {n1: d1, n2: d9}
  - {n1: d3, n2: d3}
  - {n1: d2, n2: d3, weight: 0}
  - {n1: d3, n2: Bad_Name, weight: -2}
clientApps:
  - appName: ANZ
    appId: a1
    masterUserId: BNZ-1
    userDistributions:
      - {domainName: d1, from: 0, to: 99}
      - {domainName: d2, from: 50, to: 150}
      - {domainName: d3, from: 500, to: 400}
      - {domainName: d7, from: 1000}
    users:
      - {userId: ANZ-42, domainName: d2}
      - {userId: ANZ-boss, domainName: d8}
      - {userId: ANZ-boss, domainName: d1}
      - {userId: XYZ-1, domainName: d1}
    hashDomains: [d1, d1, d6]
  - {appName: ANZ, appId: a1}
"#;
    let got: Vec<String> = problems(yaml).iter().map(|p| p.to_string()).collect();
    let expect = [
        r#"domain "d2": federation URL "ftp://10.0.0.2:9090" must start with http:// or https://"#,
        r#"domain "d3": client URL "not a url" is not a URL"#,
        r#"domain "d1" is listed more than once"#,
        r#"domain name "Bad_Name" must be 1 to 63 characters of a-z, 0-9 and -"#,
        r#"domain "Bad_Name": federation URL "http://10.0.0.4:9090/x" must be scheme://host:port, without a path"#,
        "link d2 - d1 is listed more than once",
        r#"link d1 - d9: no domain named "d9""#,
        "link d3 - d3: a domain cannot link to itself",
        "link d2 - d3: weight 0 must be 1 to 1000000",
        "link d3 - Bad_Name: weight -2 must be 1 to 1000000",
        "the domains are not all linked: {Bad_Name, d1, d2, d3} and {d5}",
        r#"app "ANZ": masterUserId "BNZ-1" is not ANZ-<id>"#,
        r#"app "ANZ": range d3 500-400 is inverted (from > to)"#,
        r#"app "ANZ": range d1 0-99 overlaps range d2 50-150"#,
        r#"app "ANZ": range d7 1000- names "d7", which is not a domain of the topology"#,
        r#"app "ANZ": user "ANZ-42" is placed explicitly but the range d1 0-99 covers it"#,
        r#"app "ANZ": user ANZ-boss names "d8", which is not a domain of the topology"#,
        r#"app "ANZ": user "ANZ-boss" is placed more than once"#,
        r#"app "ANZ": user "XYZ-1" is not ANZ-<id>"#,
        r#"app "ANZ": hashDomains names "d1" more than once"#,
        r#"app "ANZ": hashDomains names "d6", which is not a domain of the topology"#,
        r#"app "ANZ" places no user: give userDistributions, users or hashDomains"#,
        r#"app name "ANZ" is used by more than one app"#,
        r#"app id "a1" is used by more than one app"#,
    ];
    for e in expect {
        assert!(
            got.iter().any(|g| g.contains(e)),
            "missing {e:?} in:\n{}",
            got.join("\n")
        );
    }
    assert_eq!(got.len(), expect.len(), "{}", got.join("\n"));
    // Shown one per line, counted.
    let err = Topology::parse(yaml).expect_err("invalid");
    let text = err.to_string();
    assert!(text.starts_with(&format!("{} problems in the topology", expect.len())));
    assert_eq!(text.lines().count(), expect.len() + 1, "{text}");
}

#[test]
fn the_smallest_problems_are_found_alone() {
    assert_eq!(problems("domains: []\n"), vec![Problem::NoDomains]);
    let one = "domains:\n  - {name: a, federation: 'http://h:1', client: 'ws://h:2/ws'}\n";
    assert_eq!(problems(one), vec![]);
    // Open-ended then a later range: overlap.
    let apps = "clientApps:\n  - appName: A\n    appId: a\n    userDistributions:\n      - {domainName: a, from: 10}\n      - {domainName: a, from: 20, to: 30}\n";
    assert_eq!(
        problems(&format!("{one}{apps}")),
        vec![Problem::OverlappingRanges {
            app: "A".into(),
            first: "a 10-".into(),
            second: "a 20-30".into(),
        }]
    );
    // Adjacent ranges do not overlap.
    let apps = "clientApps:\n  - appName: A\n    appId: a\n    userDistributions:\n      - {domainName: a, from: 0, to: 9}\n      - {domainName: a, from: 10}\n";
    assert_eq!(problems(&format!("{one}{apps}")), vec![]);
}

/// The cheapest path from `s` to `t` by trying every simple path; among
/// equally cheap ones the smallest sequence of names.
fn brute_force(
    n: usize,
    links: &[(usize, usize, u64)],
    s: usize,
    t: usize,
) -> Option<(u64, Vec<usize>)> {
    fn walk(
        at: usize,
        t: usize,
        links: &[(usize, usize, u64)],
        path: &mut Vec<usize>,
        cost: u64,
        best: &mut Option<(u64, Vec<usize>)>,
    ) {
        if at == t {
            let cand = (cost, path.clone());
            if best.as_ref().is_none_or(|b| cand < *b) {
                *best = Some(cand);
            }
            return;
        }
        for &(a, b, w) in links {
            let next = if a == at {
                b
            } else if b == at {
                a
            } else {
                continue;
            };
            if path.contains(&next) {
                continue;
            }
            path.push(next);
            walk(next, t, links, path, cost + w, best);
            path.pop();
        }
    }
    let _ = n;
    let mut best = None;
    walk(s, t, links, &mut vec![s], 0, &mut best);
    best
}

fn graph() -> impl Strategy<Value = (usize, Vec<(usize, usize, u64)>, Vec<bool>)> {
    (2usize..=7).prop_flat_map(|n| {
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect();
        let m = pairs.len();
        (
            Just(n),
            // Small weights: many ties, which is what the name rule is for.
            prop::collection::vec(prop::option::weighted(0.5, 1u64..=3), m).prop_map(move |ws| {
                pairs
                    .iter()
                    .zip(ws)
                    .filter_map(|(&(a, b), w)| Some((a, b, w?)))
                    .collect::<Vec<_>>()
            }),
            prop::collection::vec(prop::bool::weighted(0.2), m),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn routes_match_a_brute_force_shortest_path((n, links, down_bits) in graph()) {
        // Names whose order is not the order they are listed in.
        let names: Vec<String> = (0..n).map(|i| format!("d{}", n - 1 - i)).collect();
        let topology = Topology {
            domains: names.iter().map(|d| domain(d)).collect(),
            domain_links: links
                .iter()
                .map(|&(a, b, w)| Link { n1: names[a].clone(), n2: names[b].clone(), weight: w as i64 })
                .collect(),
            client_apps: vec![],
        };
        let net = Network::new(&topology);
        let mut down = LinkState::all_up();
        let mut up_links = Vec::new();
        for (&(a, b, w), &is_down) in links.iter().zip(down_bits.iter()) {
            if is_down {
                down.set_down(&names[a], &names[b]);
            } else {
                up_links.push((a, b, w));
            }
        }
        // Brute force over names' order: relabel so that index order is
        // name order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| names[x].cmp(&names[y]));
        let rank: Vec<usize> = {
            let mut r = vec![0; n];
            for (i, &x) in order.iter().enumerate() { r[x] = i; }
            r
        };
        let ranked: Vec<(usize, usize, u64)> =
            up_links.iter().map(|&(a, b, w)| (rank[a], rank[b], w)).collect();
        for s in 0..n {
            let table = net.routes_from(&names[s], &down).expect("known");
            for t in 0..n {
                if s == t { continue; }
                let want = brute_force(n, &ranked, rank[s], rank[t]).map(|(cost, p)| Route {
                    next: names[order[p[1]]].clone(),
                    path: p.iter().map(|&i| names[order[i]].clone()).collect(),
                    cost,
                });
                let got = net.next_hop(&names[s], &names[t], &down);
                prop_assert_eq!(&got, &want, "{} -> {}", names[s], names[t]);
                prop_assert_eq!(table.get(&names[t]), want.as_ref());
                // Hop by hop consistent: the next domain's own route is
                // the rest of this one.
                if let Some(route) = &want && route.path.len() > 2 {
                    let rest = net.next_hop(&route.next, &names[t], &down).expect("rest");
                    prop_assert_eq!(&rest.path[..], &route.path[1..]);
                }
            }
        }
    }
}
