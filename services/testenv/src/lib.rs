//! Whether a test that needs an external service (etcd, Redis) runs.
//!
//! `scripts/test.sh` starts etcd, Redis and PostgreSQL and names them in
//! `SWITCHBOARD_TEST_ETCD` / `SWITCHBOARD_TEST_REDIS` /
//! `SWITCHBOARD_TEST_POSTGRES`. A test asks for the
//! services it needs with [`services`]:
//! - all set: it runs, with their addresses;
//! - one missing under `CI=true`: the test fails (CI provides them, so a
//!   missing one is a broken setup, not a reason to pass);
//! - one missing otherwise: the test is skipped. It says so on stderr (not
//!   captured by the test harness) and, when `SWITCHBOARD_TEST_SKIPS` names
//!   a file, appends one line to it, which `scripts/test.sh` counts in its
//!   closing line and lists.

use std::io::Write;

/// The etcd under test (`http://host:port`).
pub const ETCD: &str = "SWITCHBOARD_TEST_ETCD";
/// The Redis under test (`redis://host:port`).
pub const REDIS: &str = "SWITCHBOARD_TEST_REDIS";
/// The PostgreSQL under test (`postgres://user@host:port/database`); tests
/// create databases of their own in it.
pub const POSTGRES: &str = "SWITCHBOARD_TEST_POSTGRES";
/// The `schemathesis` executable (PyPI), which fuzzes the REST API from its
/// OpenAPI document; `scripts/test.sh` installs it into a venv.
pub const SCHEMATHESIS: &str = "SWITCHBOARD_TEST_SCHEMATHESIS";
/// File a skipped test appends its line to.
pub const SKIPS_FILE: &str = "SWITCHBOARD_TEST_SKIPS";
/// A ScyllaDB node (`host:9042`). Not started by `scripts/test.sh`: no
/// runnable ScyllaDB installs here, so its tests are skipped when it is
/// unset, under CI too ([`optional_service`]).
pub const SCYLLA: &str = "SWITCHBOARD_TEST_SCYLLA";

/// The values of `vars`, in order, when all are set; `None` (recorded as a
/// skip) when one is missing outside CI. Panics under `CI=true`.
pub fn services(vars: &[&str]) -> Option<Vec<String>> {
    let lookup = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match present(vars, lookup) {
        Ok(values) => Some(values),
        Err(missing) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{missing} not set (CI=true): run scripts/test.sh")
        }
        Err(missing) => {
            record_skip(&format!("{missing} not set (scripts/test.sh sets it)"));
            None
        }
    }
}

/// One service: `service(REDIS)`.
pub fn service(var: &str) -> Option<String> {
    services(&[var]).and_then(|mut v| v.pop())
}

/// A service CI does not provide (ScyllaDB): its value, or `None`,
/// recorded as a skip with `why`, under `CI=true` as well.
pub fn optional_service(var: &str, why: &str) -> Option<String> {
    match std::env::var(var).ok().filter(|v| !v.is_empty()) {
        Some(value) => Some(value),
        None => {
            record_skip(&format!("{var} not set ({why})"));
            None
        }
    }
}

/// The values of `vars`, or the names of those missing.
fn present(vars: &[&str], lookup: impl Fn(&str) -> Option<String>) -> Result<Vec<String>, String> {
    let values: Vec<Option<String>> = vars.iter().map(|v| lookup(v)).collect();
    let missing: Vec<&str> = vars
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_none())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        Ok(values.into_iter().flatten().collect())
    } else {
        Err(missing.join(", "))
    }
}

/// Reports the running test as skipped for `reason`.
pub fn record_skip(reason: &str) {
    let line = format!("{}: {reason}", test_name());
    // Straight to the process's stderr: the harness captures eprintln! of
    // passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "skipped {line}");
    if let Some(path) = std::env::var_os(SKIPS_FILE)
        && let Err(e) = append_line(std::path::Path::new(&path), &line)
    {
        let _ = writeln!(
            std::io::stderr(),
            "cannot record the skip in {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}

/// One line appended in one write: tests of one binary run on several
/// threads, and binaries may run side by side.
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(format!("{line}\n").as_bytes())
}

/// `binary::test`: the test harness names each test's thread after the
/// test; the binary's name (without cargo's hash) says which suite.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => s,
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("main");
    format!("{binary}::{test}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn present_services_are_returned_in_order_and_missing_ones_named() {
        let got = present(&[REDIS, ETCD], from(&[(ETCD, "e"), (REDIS, "r")]));
        assert_eq!(got, Ok(vec!["r".to_owned(), "e".to_owned()]));
        let got = present(&[REDIS, ETCD], from(&[]));
        assert_eq!(got, Err(format!("{REDIS}, {ETCD}")));
    }

    #[test]
    fn skips_are_appended_one_line_each() {
        let dir = std::env::temp_dir().join(format!("sb-testenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("skips");
        let _ = std::fs::remove_file(&file);
        append_line(&file, "a::one: why").expect("append");
        append_line(&file, "a::two: why").expect("append");
        let text = std::fs::read_to_string(&file).expect("read");
        assert_eq!(text, "a::one: why\na::two: why\n");
        assert!(
            test_name().ends_with("::tests::skips_are_appended_one_line_each"),
            "{}",
            test_name()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A name no other test of any run shares: process id, wall clock and a
/// counter, in hex joined by `_` (valid in etcd prefixes, Redis keys,
/// PostgreSQL database names and ScyllaDB keyspaces). Two tests of one
/// process can read the same clock nanosecond; the counter tells them
/// apart.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}_{:x}_{:x}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod unique_tests {
    #[test]
    fn two_names_taken_at_once_differ() {
        let names: std::collections::HashSet<String> = (0..1000).map(|_| super::unique()).collect();
        assert_eq!(names.len(), 1000);
    }
}
