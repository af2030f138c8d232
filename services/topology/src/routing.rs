//! Home domains and shortest paths over a checked topology.
//!
//! Routes are Dijkstra over the links that are up. Among paths of equal
//! cost the one whose sequence of domain names is smallest (compared name
//! by name from the source) wins, so every router computes the same
//! route from the same topology and link state. That choice is
//! consistent hop by hop: the rest of a chosen path is the route the next
//! domain chooses itself, and every hop strictly lowers the remaining
//! cost, so forwarding along next hops never loops.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use crate::validate::user_number;
use crate::{Domain, Topology};

/// The route from one domain to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The neighbour to hand the message to.
    pub next: String,
    /// Every domain on the way, from the source to the destination.
    pub path: Vec<String>,
    /// The sum of the weights of the links taken.
    pub cost: u64,
}

/// The links that are down (the rest are up). Links are undirected:
/// `a - b` and `b - a` are one link. Links not in the topology are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    down: BTreeSet<(String, String)>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl LinkState {
    /// Every link up.
    pub fn all_up() -> Self {
        LinkState::default()
    }

    pub fn set_down(&mut self, a: &str, b: &str) {
        self.down.insert(pair(a, b));
    }

    pub fn set_up(&mut self, a: &str, b: &str) {
        self.down.remove(&pair(a, b));
    }

    pub fn is_down(&self, a: &str, b: &str) -> bool {
        self.down.contains(&pair(a, b))
    }
}

#[derive(Debug, Clone, Copy)]
struct Edge {
    to: u32,
    weight: u64,
    link: u32,
}

#[derive(Debug)]
struct AppRules {
    name: String,
    /// (from, to inclusive, domain), sorted by `from`, not overlapping.
    ranges: Vec<(u64, u64, u32)>,
    users: HashMap<String, u32>,
    hash: Vec<u32>,
}

/// A checked topology, indexed for routing. Domains are numbered in name
/// order, so comparing numbers compares names.
#[derive(Debug)]
pub struct Network {
    domains: Vec<Domain>,
    index: HashMap<String, u32>,
    adjacency: Vec<Vec<Edge>>,
    /// (a, b, weight) with a < b, in order.
    links: Vec<(u32, u32, u64)>,
    link_index: HashMap<(u32, u32), u32>,
    apps: HashMap<String, AppRules>,
}

/// Shortest distances and predecessors from one source.
struct Tree {
    dist: Vec<Option<u64>>,
    pred: Vec<Option<u32>>,
}

impl Tree {
    /// The domains from the source to `to`.
    fn path(&self, to: u32) -> Vec<u32> {
        let mut path = vec![to];
        let mut at = to;
        while let Some(p) = self.pred[at as usize] {
            path.push(p);
            at = p;
        }
        path.reverse();
        path
    }
}

impl Network {
    /// Indexes `t`, which [`Topology::check`] found valid.
    pub(crate) fn new(t: &Topology) -> Network {
        let mut domains = t.domains.clone();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        let index: HashMap<String, u32> = domains
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i as u32))
            .collect();
        let at = |name: &str| index.get(name).copied();
        let mut links: Vec<(u32, u32, u64)> = t
            .domain_links
            .iter()
            .filter_map(|l| {
                let (a, b) = (at(&l.n1)?, at(&l.n2)?);
                let weight = u64::try_from(l.weight).ok()?;
                Some((a.min(b), a.max(b), weight))
            })
            .collect();
        links.sort();
        let mut adjacency = vec![Vec::new(); domains.len()];
        let mut link_index = HashMap::new();
        for (i, &(a, b, weight)) in links.iter().enumerate() {
            let link = i as u32;
            adjacency[a as usize].push(Edge {
                to: b,
                weight,
                link,
            });
            adjacency[b as usize].push(Edge {
                to: a,
                weight,
                link,
            });
            link_index.insert((a, b), link);
        }
        for edges in &mut adjacency {
            edges.sort_by_key(|e| e.to);
        }
        let apps = t
            .client_apps
            .iter()
            .map(|app| {
                let mut ranges: Vec<(u64, u64, u32)> = app
                    .user_distributions
                    .iter()
                    .filter_map(|r| Some((r.from, r.to.unwrap_or(u64::MAX), at(&r.domain_name)?)))
                    .collect();
                ranges.sort();
                let users = app
                    .users
                    .iter()
                    .filter_map(|u| Some((u.user_id.clone(), at(&u.domain_name)?)))
                    .collect();
                let hash = app.hash_domains.iter().filter_map(|d| at(d)).collect();
                let rules = AppRules {
                    name: app.app_name.clone(),
                    ranges,
                    users,
                    hash,
                };
                (app.app_id.clone(), rules)
            })
            .collect();
        Network {
            domains,
            index,
            adjacency,
            links,
            link_index,
            apps,
        }
    }

    /// The domains, in name order.
    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.index.get(name).map(|&i| &self.domains[i as usize])
    }

    /// The links as (n1, n2, weight), n1 < n2, in order.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.links
            .iter()
            .map(|&(a, b, w)| (self.name(a), self.name(b), w))
    }

    fn name(&self, i: u32) -> &str {
        &self.domains[i as usize].name
    }

    /// The home domain of `user_id` of the app with id `app_id`: its
    /// explicit entry, else the range holding its number, else the hash
    /// rule. `None`: unknown app, an id that is not `APPNAME-…`, or no
    /// rule places it.
    pub fn home_domain(&self, app_id: &str, user_id: &str) -> Option<&str> {
        let app = self.apps.get(app_id)?;
        let rest = user_id.strip_prefix(&app.name)?.strip_prefix('-')?;
        if rest.is_empty() {
            return None;
        }
        if let Some(&d) = app.users.get(user_id) {
            return Some(self.name(d));
        }
        if let Some(n) = user_number(&app.name, user_id) {
            let after = app.ranges.partition_point(|&(from, _, _)| from <= n);
            if let Some(&(_, to, d)) = after.checked_sub(1).map(|i| &app.ranges[i])
                && n <= to
            {
                return Some(self.name(d));
            }
        }
        // Rendezvous hashing: the domain scoring highest for this user.
        let seedless = xxhash_rust::xxh3::xxh3_64;
        app.hash
            .iter()
            .map(|&d| {
                let seed = seedless(self.name(d).as_bytes());
                let score = xxhash_rust::xxh3::xxh3_64_with_seed(user_id.as_bytes(), seed);
                (score, Reverse(d))
            })
            .max()
            .map(|(_, Reverse(d))| self.name(d))
    }

    /// The route from `from` to `to` over the links that are not down;
    /// `None` when either is unknown, they are the same, or no path is up.
    pub fn next_hop(&self, from: &str, to: &str, down: &LinkState) -> Option<Route> {
        let (&s, &t) = (self.index.get(from)?, self.index.get(to)?);
        if s == t {
            return None;
        }
        let tree = self.shortest_paths(s, Some(t), down);
        self.route(&tree, t)
    }

    /// The route from `from` to every other domain that can be reached
    /// over the links that are not down, by destination. `None` when
    /// `from` is not a domain.
    pub fn routes_from(&self, from: &str, down: &LinkState) -> Option<BTreeMap<String, Route>> {
        let &s = self.index.get(from)?;
        let tree = self.shortest_paths(s, None, down);
        Some(
            (0..self.domains.len() as u32)
                .filter(|&t| t != s)
                .filter_map(|t| Some((self.name(t).to_owned(), self.route(&tree, t)?)))
                .collect(),
        )
    }

    fn route(&self, tree: &Tree, t: u32) -> Option<Route> {
        let cost = tree.dist[t as usize]?;
        let path: Vec<String> = tree
            .path(t)
            .into_iter()
            .map(|i| self.name(i).to_owned())
            .collect();
        Some(Route {
            next: path.get(1)?.clone(),
            path,
            cost,
        })
    }

    fn is_down(&self, down: &LinkState) -> Vec<bool> {
        let mut out = vec![false; self.links.len()];
        for (a, b) in &down.down {
            if let (Some(&a), Some(&b)) = (self.index.get(a), self.index.get(b))
                && let Some(&link) = self.link_index.get(&(a.min(b), a.max(b)))
            {
                out[link as usize] = true;
            }
        }
        out
    }

    /// Dijkstra from `s` (stopping once `target` is settled). A node's
    /// distance and path are final when it leaves the heap: only nodes
    /// strictly closer (weights > 0), all settled before it, could offer
    /// an equal-cost path to it.
    fn shortest_paths(&self, s: u32, target: Option<u32>, down: &LinkState) -> Tree {
        let n = self.domains.len();
        let down = self.is_down(down);
        let mut tree = Tree {
            dist: vec![None; n],
            pred: vec![None; n],
        };
        let mut settled = vec![false; n];
        let mut heap = BinaryHeap::new();
        tree.dist[s as usize] = Some(0);
        heap.push(Reverse((0u64, s)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if settled[u as usize] {
                continue;
            }
            settled[u as usize] = true;
            if Some(u) == target {
                break;
            }
            for e in &self.adjacency[u as usize] {
                if down[e.link as usize] || settled[e.to as usize] {
                    continue;
                }
                let cand = d + e.weight;
                let v = e.to as usize;
                let better = match tree.dist[v] {
                    None => true,
                    Some(old) if cand < old => true,
                    Some(old) if cand == old => match tree.pred[v] {
                        Some(p) if p != u => {
                            let mut via_u = tree.path(u);
                            via_u.push(e.to);
                            let mut via_p = tree.path(p);
                            via_p.push(e.to);
                            via_u.cmp(&via_p) == Ordering::Less
                        }
                        _ => false,
                    },
                    Some(_) => false,
                };
                if better {
                    if tree.dist[v] != Some(cand) {
                        heap.push(Reverse((cand, e.to)));
                    }
                    tree.dist[v] = Some(cand);
                    tree.pred[v] = Some(u);
                }
            }
        }
        tree
    }
}
