//! The federation topology: which domains exist, how they are linked, and
//! which domain is each user's home. Parsed from the operator's YAML file
//! ([`Topology::from_yaml`]), checked as a whole ([`Topology::check`],
//! every problem at once), and turned into a [`Network`] that answers
//! [`Network::home_domain`] and shortest-path routes
//! ([`Network::next_hop`], [`Network::routes_from`]).
//!
//! A crate of its own, not a module of `switchboard-metadata`: metadata is
//! the storage seam (records by kind in etcd, watched) and knows nothing
//! of what a record means; this is a pure model with no I/O (no etcd, no
//! tokio), so the router, the CLI and the benchmark use it without a
//! control plane, and its tests are plain functions. Metadata stores it
//! as one record of kind `topology`, as it stores `AppConfig` from the
//! config crate.

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub mod fuzzing;
mod routing;
mod validate;

pub use routing::{LinkState, Network, Route};
pub use validate::{Problem, Problems};

/// The key prefix in etcd that every domain of a federation shares.
pub const DEFAULT_PREFIX: &str = "/switchboard-federation/";

/// Largest link weight: path costs stay far from overflow.
pub const MAX_WEIGHT: i64 = 1_000_000;

/// The topology file, as the operator writes it (and as it is stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    pub domains: Vec<Domain>,
    #[serde(default)]
    pub domain_links: Vec<Link>,
    #[serde(default)]
    pub client_apps: Vec<ClientApp>,
}

/// One domain: a complete Switchboard deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Domain {
    /// 1–63 characters of a-z 0-9 - (as `switchboard run --domain`).
    pub name: String,
    /// The gRPC endpoint neighbours call: `http(s)://host:port`.
    pub federation: String,
    /// The client URL, for redirects: `ws(s)://host:port/path`.
    pub client: String,
}

/// An undirected link between two domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub n1: String,
    pub n2: String,
    /// 1 to [`MAX_WEIGHT`]; signed so that a negative weight in the file
    /// is reported as such rather than as a parse error.
    #[serde(default = "default_weight")]
    pub weight: i64,
}

fn default_weight() -> i64 {
    1
}

/// A client app and where its users live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientApp {
    /// User ids are `APPNAME-<number>`.
    pub app_name: String,
    pub app_id: String,
    #[serde(default)]
    pub master_user_id: String,
    #[serde(default)]
    pub auth_enabled: bool,
    /// Numeric id ranges per domain; ranges of one app never overlap.
    #[serde(default)]
    pub user_distributions: Vec<UserRange>,
    /// Fallback 1: users placed one by one (ids no range covers, such as
    /// `ANZ-support`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserHome>,
    /// Fallback 2: a user no range or entry places lives in one of these
    /// domains, chosen by rendezvous hashing of the user id (adding a
    /// domain moves only the users that now hash to it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_domains: Vec<String>,
}

/// Users `APPNAME-<from>` to `APPNAME-<to>` (inclusive; no `to`: every id
/// from `from` on) live in `domain_name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserRange {
    pub domain_name: String,
    pub from: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

/// One user placed explicitly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserHome {
    pub user_id: String,
    pub domain_name: String,
}

/// Why a topology cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Not the topology file's shape (YAML syntax, unknown key, wrong type).
    #[error("not a topology file: {0}")]
    Parse(String),
    /// The shape is right but the content is not; every problem is listed.
    #[error("{0}")]
    Invalid(Problems),
}

impl Topology {
    /// Parses the YAML file shape. Only the shape is checked here; see
    /// [`Topology::check`].
    pub fn from_yaml(text: &str) -> Result<Topology, TopologyError> {
        serde_norway::from_str(text).map_err(|e| TopologyError::Parse(e.to_string()))
    }

    /// Parses and checks: the network, or every problem of the file.
    pub fn parse(text: &str) -> Result<(Topology, Network), TopologyError> {
        let topology = Topology::from_yaml(text)?;
        let network = topology.check().map_err(TopologyError::Invalid)?;
        Ok((topology, network))
    }

    /// Every problem that makes this topology unusable, or the network it
    /// describes. Changes nothing.
    pub fn check(&self) -> Result<Network, Problems> {
        let problems = validate::problems(self);
        if !problems.0.is_empty() {
            return Err(problems);
        }
        Ok(Network::new(self))
    }
}

#[cfg(test)]
mod tests;
