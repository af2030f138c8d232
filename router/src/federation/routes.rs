//! The routes of this domain: computed whole from the topology and the
//! link states, replaced whole when either changes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};

use switchboard_metadata::CurrentTopology;
use switchboard_topology::{LinkState, Route};

use super::Target;

/// Routes from this domain over the links that are up.
pub struct RouteTable {
    me: String,
    pub(crate) topology: Option<Arc<CurrentTopology>>,
    down: LinkState,
    routes: BTreeMap<String, Route>,
    /// Next hops of envelopes that passed other domains, by (home,
    /// domains passed): computed once per table, not once per envelope
    /// (a forwarding domain's worker asks for every envelope it holds).
    detours: Mutex<HashMap<(String, Vec<String>), Target>>,
}

/// Detours remembered per table before the memory starts over.
const MAX_DETOURS: usize = 10_000;

impl RouteTable {
    /// `reported`: (reporter, peer) links other domains publish as down;
    /// `own`: this domain's observation of its own links, which wins.
    pub(crate) fn new(
        me: &str,
        topology: Option<Arc<CurrentTopology>>,
        reported: Vec<(String, String)>,
        own: &HashMap<String, bool>,
    ) -> Self {
        let mut down = LinkState::all_up();
        for (reporter, peer) in &reported {
            if reporter != me && peer != me {
                down.set_down(reporter, peer);
            }
        }
        for (peer, up) in own {
            if !up {
                down.set_down(me, peer);
            }
        }
        let routes = topology
            .as_ref()
            .and_then(|t| t.network.routes_from(me, &down))
            .unwrap_or_default();
        RouteTable {
            me: me.to_owned(),
            topology,
            down,
            routes,
            detours: Mutex::new(HashMap::new()),
        }
    }

    /// The home domain of a user, when it is another domain than this one.
    pub fn home(&self, app_id: &str, user_id: &str) -> Option<&str> {
        let t = self.topology.as_ref()?;
        t.network
            .home_domain(app_id, user_id)
            .filter(|home| *home != self.me && t.network.domain(&self.me).is_some())
    }

    /// Where a message for `user_id` goes from here, avoiding the domains
    /// in `visited`: its next hop over links that are up, else over any
    /// link (it waits in that outbox for the link to come back).
    pub(crate) fn target(&self, app_id: &str, user_id: &str, visited: &[String]) -> Target {
        let Some(home) = self.home(app_id, user_id) else {
            return Target::Local;
        };
        let Some(t) = &self.topology else {
            return Target::Local;
        };
        if visited.iter().any(|v| v == home) {
            // Its home passed it on: a topology change in between. It can
            // only go back there.
            return Target::Nowhere;
        }
        if visited.is_empty()
            && let Some(route) = self.routes.get(home)
        {
            return Target::Peer(route.next.clone());
        }
        let key = (home.to_owned(), visited.to_vec());
        let mut detours = self.detours.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = detours.get(&key) {
            return t.clone();
        }
        let target = self.detour(t, home, visited);
        if detours.len() >= MAX_DETOURS {
            detours.clear();
        }
        detours.insert(key, target.clone());
        target
    }

    /// The next hop to `home` avoiding `visited`: over links that are up,
    /// else over any link, else none.
    fn detour(&self, t: &CurrentTopology, home: &str, visited: &[String]) -> Target {
        let mut avoid = self.down.clone();
        let mut without_down = LinkState::all_up();
        for (a, b, _) in t.network.links() {
            if visited.iter().any(|v| v == a || v == b) {
                avoid.set_down(a, b);
                without_down.set_down(a, b);
            }
        }
        if let Some(route) = t.network.next_hop(&self.me, home, &avoid) {
            return Target::Peer(route.next);
        }
        match t.network.next_hop(&self.me, home, &without_down) {
            Some(route) => Target::Peer(route.next),
            None => Target::Nowhere,
        }
    }

    /// Whether a topology naming this domain is in force.
    pub fn names_me(&self) -> bool {
        self.topology
            .as_ref()
            .is_some_and(|t| t.network.domain(&self.me).is_some())
    }

    /// Whether `domain` is linked to this one in the topology.
    pub fn is_neighbour(&self, domain: &str) -> bool {
        self.topology.as_ref().is_some_and(|t| {
            t.network
                .links()
                .any(|(a, b, _)| (a == self.me && b == domain) || (b == self.me && a == domain))
        })
    }

    /// Destination → next hop, for change detection.
    pub(crate) fn next_hops(&self) -> BTreeMap<&str, &str> {
        self.routes
            .iter()
            .map(|(d, r)| (d.as_str(), r.next.as_str()))
            .collect()
    }

    pub(crate) fn topology_differs(&self, other: &RouteTable) -> bool {
        match (&self.topology, &other.topology) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        }
    }

    /// The route to `domain` over the links that are up.
    pub fn route(&self, domain: &str) -> Option<&Route> {
        self.routes.get(domain)
    }

    /// One line: every destination with its path and cost.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (dest, r) in &self.routes {
            let _ = write!(out, "{dest}: {} (cost {}); ", r.path.join(">"), r.cost);
        }
        if out.is_empty() {
            out.push_str("none");
        }
        out
    }
}
