//! Everything that makes a topology unusable, found in one pass: an
//! operator fixes a file once, not once per problem.

use std::collections::{BTreeMap, BTreeSet};

use crate::{MAX_WEIGHT, Topology};

/// One problem of a topology, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no domains: a topology names at least one")]
    NoDomains,
    #[error("domain name {name:?} must be 1 to 63 characters of a-z, 0-9 and -")]
    DomainName { name: String },
    #[error("domain {name:?} is listed more than once")]
    DuplicateDomain { name: String },
    #[error("domain {domain:?}: {field} URL {url:?} {reason}")]
    BadUrl {
        domain: String,
        field: &'static str,
        url: String,
        reason: String,
    },
    #[error("link {n1} - {n2}: no domain named {unknown:?}")]
    LinkToUnknownDomain {
        n1: String,
        n2: String,
        unknown: String,
    },
    #[error("link {domain} - {domain}: a domain cannot link to itself")]
    SelfLink { domain: String },
    #[error("link {n1} - {n2} is listed more than once (links are undirected)")]
    DuplicateLink { n1: String, n2: String },
    #[error("link {n1} - {n2}: weight {weight} must be 1 to {MAX_WEIGHT}")]
    BadWeight { n1: String, n2: String, weight: i64 },
    #[error("the domains are not all linked: {}", list_parts(.parts))]
    Disconnected { parts: Vec<Vec<String>> },
    #[error("app {app:?}: {field} is empty")]
    EmptyAppField { app: String, field: &'static str },
    #[error("app name {name:?} is used by more than one app")]
    DuplicateAppName { name: String },
    #[error("app id {app_id:?} is used by more than one app")]
    DuplicateAppId { app_id: String },
    #[error("app {app:?}: masterUserId {user:?} is not {app}-<id>")]
    MasterUserNotOfApp { app: String, user: String },
    #[error("app {app:?}: range {domain} {from}-{to} is inverted (from > to)")]
    InvertedRange {
        app: String,
        domain: String,
        from: u64,
        to: u64,
    },
    #[error("app {app:?}: range {first} overlaps range {second}")]
    OverlappingRanges {
        app: String,
        first: String,
        second: String,
    },
    #[error("app {app:?}: {rule} names {domain:?}, which is not a domain of the topology")]
    UnknownDomainInApp {
        app: String,
        rule: String,
        domain: String,
    },
    #[error("app {app:?}: user {user:?} is not {app}-<id>")]
    UserNotOfApp { app: String, user: String },
    #[error("app {app:?}: user {user:?} is placed more than once")]
    DuplicateUser { app: String, user: String },
    #[error("app {app:?}: user {user:?} is placed explicitly but the range {range} covers it")]
    UserInRange {
        app: String,
        user: String,
        range: String,
    },
    #[error("app {app:?}: hashDomains names {domain:?} more than once")]
    DuplicateHashDomain { app: String, domain: String },
    #[error("app {app:?} places no user: give userDistributions, users or hashDomains")]
    NoUserRule { app: String },
}

fn list_parts(parts: &[Vec<String>]) -> String {
    parts
        .iter()
        .map(|p| format!("{{{}}}", p.join(", ")))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Every problem of a topology (empty: none), one per line when shown.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Problems(pub Vec<Problem>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the topology (nothing was changed):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// How a range reads in a problem: `domain-01 0-999` or `domain-02 1000-`.
pub(crate) fn range_text(domain: &str, from: u64, to: Option<u64>) -> String {
    match to {
        Some(to) => format!("{domain} {from}-{to}"),
        None => format!("{domain} {from}-"),
    }
}

/// The numeric part of `APPNAME-<number>`, if the id has that form.
pub(crate) fn user_number(app_name: &str, user_id: &str) -> Option<u64> {
    let digits = user_id.strip_prefix(app_name)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn of_app(app_name: &str, user_id: &str) -> bool {
    user_id
        .strip_prefix(app_name)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|rest| !rest.is_empty())
}

fn check_url(
    out: &mut Vec<Problem>,
    domain: &str,
    field: &'static str,
    text: &str,
    schemes: &[&str],
) {
    let bad = |reason: String| Problem::BadUrl {
        domain: domain.to_owned(),
        field,
        url: text.to_owned(),
        reason,
    };
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            out.push(bad(format!("is not a URL ({e})")));
            return;
        }
    };
    if !schemes.contains(&url.scheme()) {
        out.push(bad(format!(
            "must start with {}://",
            schemes.join(":// or ")
        )));
    } else if url.host_str().is_none_or(str::is_empty) {
        out.push(bad("has no host".into()));
    } else if !url.username().is_empty() || url.password().is_some() {
        out.push(bad("must not carry credentials".into()));
    } else if url.query().is_some() || url.fragment().is_some() {
        out.push(bad("must not have a query or fragment".into()));
    } else if field == "federation" && url.path() != "/" {
        out.push(bad("must be scheme://host:port, without a path".into()));
    }
}

/// Connected parts of the graph over `links` (names known to be domains).
fn connected_parts(domains: &BTreeSet<&str>, links: &[(&str, &str)]) -> Vec<Vec<String>> {
    let mut neighbours: BTreeMap<&str, Vec<&str>> = domains.iter().map(|d| (*d, vec![])).collect();
    for (a, b) in links {
        neighbours.entry(a).or_default().push(b);
        neighbours.entry(b).or_default().push(a);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for start in domains {
        if !seen.insert(*start) {
            continue;
        }
        let mut part = vec![start.to_string()];
        let mut stack = vec![*start];
        while let Some(d) = stack.pop() {
            for n in neighbours.get(d).into_iter().flatten() {
                if seen.insert(n) {
                    part.push(n.to_string());
                    stack.push(n);
                }
            }
        }
        part.sort();
        out.push(part);
    }
    out
}

pub(crate) fn problems(t: &Topology) -> Problems {
    let mut out = Vec::new();
    if t.domains.is_empty() {
        out.push(Problem::NoDomains);
    }
    let mut domains = BTreeSet::new();
    for d in &t.domains {
        if switchboard_config::validate_domain(&d.name).is_err() {
            out.push(Problem::DomainName {
                name: d.name.clone(),
            });
        }
        if !domains.insert(d.name.as_str()) {
            out.push(Problem::DuplicateDomain {
                name: d.name.clone(),
            });
        }
        check_url(
            &mut out,
            &d.name,
            "federation",
            &d.federation,
            &["http", "https"],
        );
        check_url(&mut out, &d.name, "client", &d.client, &["ws", "wss"]);
    }

    let mut links = BTreeSet::new();
    let mut usable = Vec::new();
    for l in &t.domain_links {
        let mut known = true;
        for end in [&l.n1, &l.n2] {
            if !domains.contains(end.as_str()) {
                known = false;
                // A link naming one unknown domain twice is one problem.
                if end == &l.n2 && l.n1 == l.n2 {
                    continue;
                }
                out.push(Problem::LinkToUnknownDomain {
                    n1: l.n1.clone(),
                    n2: l.n2.clone(),
                    unknown: end.clone(),
                });
            }
        }
        if l.n1 == l.n2 {
            out.push(Problem::SelfLink {
                domain: l.n1.clone(),
            });
            continue;
        }
        if !(1..=MAX_WEIGHT).contains(&l.weight) {
            out.push(Problem::BadWeight {
                n1: l.n1.clone(),
                n2: l.n2.clone(),
                weight: l.weight,
            });
        }
        let pair = if l.n1 < l.n2 {
            (l.n1.as_str(), l.n2.as_str())
        } else {
            (l.n2.as_str(), l.n1.as_str())
        };
        if !links.insert(pair) {
            out.push(Problem::DuplicateLink {
                n1: l.n1.clone(),
                n2: l.n2.clone(),
            });
        } else if known {
            usable.push(pair);
        }
    }
    let parts = connected_parts(&domains, &usable);
    if parts.len() > 1 {
        out.push(Problem::Disconnected { parts });
    }

    let mut names = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for app in &t.client_apps {
        app_problems(&mut out, app, &domains);
        if !app.app_name.is_empty() && !names.insert(app.app_name.as_str()) {
            out.push(Problem::DuplicateAppName {
                name: app.app_name.clone(),
            });
        }
        if !app.app_id.is_empty() && !ids.insert(app.app_id.as_str()) {
            out.push(Problem::DuplicateAppId {
                app_id: app.app_id.clone(),
            });
        }
    }
    Problems(out)
}

fn app_problems(out: &mut Vec<Problem>, app: &crate::ClientApp, domains: &BTreeSet<&str>) {
    let name = if app.app_name.is_empty() {
        &app.app_id
    } else {
        &app.app_name
    };
    let empty = |field| Problem::EmptyAppField {
        app: name.clone(),
        field,
    };
    if app.app_name.is_empty() {
        out.push(empty("appName"));
    }
    if app.app_id.is_empty() {
        out.push(empty("appId"));
    }
    if !app.master_user_id.is_empty() && !of_app(&app.app_name, &app.master_user_id) {
        out.push(Problem::MasterUserNotOfApp {
            app: name.clone(),
            user: app.master_user_id.clone(),
        });
    }
    if app.user_distributions.is_empty() && app.users.is_empty() && app.hash_domains.is_empty() {
        out.push(Problem::NoUserRule { app: name.clone() });
    }
    let unknown = |rule: String, domain: &str| Problem::UnknownDomainInApp {
        app: name.clone(),
        rule,
        domain: domain.to_owned(),
    };

    let mut ranges = Vec::new();
    for r in &app.user_distributions {
        let text = range_text(&r.domain_name, r.from, r.to);
        if !domains.contains(r.domain_name.as_str()) {
            out.push(unknown(format!("range {text}"), &r.domain_name));
        }
        match r.to {
            Some(to) if to < r.from => out.push(Problem::InvertedRange {
                app: name.clone(),
                domain: r.domain_name.clone(),
                from: r.from,
                to,
            }),
            to => ranges.push((r.from, to.unwrap_or(u64::MAX), text)),
        }
    }
    ranges.sort();
    // Sorted by start: a range overlaps a previous one exactly when it
    // starts at or before the furthest end seen so far.
    let mut furthest: Option<(u64, &str)> = None;
    for (from, to, text) in &ranges {
        if let Some((end, prev)) = furthest
            && *from <= end
        {
            out.push(Problem::OverlappingRanges {
                app: name.clone(),
                first: prev.to_owned(),
                second: text.clone(),
            });
        }
        if furthest.is_none_or(|(end, _)| *to > end) {
            furthest = Some((*to, text));
        }
    }

    let mut users = BTreeSet::new();
    for u in &app.users {
        if !domains.contains(u.domain_name.as_str()) {
            out.push(unknown(format!("user {}", u.user_id), &u.domain_name));
        }
        if !of_app(&app.app_name, &u.user_id) {
            out.push(Problem::UserNotOfApp {
                app: name.clone(),
                user: u.user_id.clone(),
            });
        }
        if !users.insert(u.user_id.as_str()) {
            out.push(Problem::DuplicateUser {
                app: name.clone(),
                user: u.user_id.clone(),
            });
        }
        if let Some(n) = user_number(&app.app_name, &u.user_id)
            && let Some((_, _, text)) = ranges.iter().find(|(f, t, _)| (*f..=*t).contains(&n))
        {
            out.push(Problem::UserInRange {
                app: name.clone(),
                user: u.user_id.clone(),
                range: text.clone(),
            });
        }
    }

    let mut hashed = BTreeSet::new();
    for d in &app.hash_domains {
        if !domains.contains(d.as_str()) {
            out.push(unknown("hashDomains".into(), d));
        }
        if !hashed.insert(d.as_str()) {
            out.push(Problem::DuplicateHashDomain {
                app: name.clone(),
                domain: d.clone(),
            });
        }
    }
}
