//! `switchboard topology apply|show` against the real etcd that
//! `scripts/test.sh` starts (`SWITCHBOARD_TEST_ETCD`), in a prefix of
//! the test's own: what an operator runs and reads.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use switchboard_metadata::{EtcdMetadata, Kind, Metadata, TOPOLOGY_KEY};

fn ring_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/federation/ring.yaml")
}

/// Runs `switchboard topology ARGS --etcd ETCD --prefix PREFIX`: success
/// and stdout + stderr.
fn topology(etcd: &str, prefix: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["topology"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--etcd", etcd, "--prefix", prefix]);
    support::switchboard_cli(&all)
}

fn fresh_prefix() -> String {
    format!("/sbtest-federation/{}/", switchboard_testenv::unique())
}

fn assert_has(out: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            out.lines().any(|l| l.trim_end() == *line),
            "no line {line:?} in:\n{out}"
        );
    }
}

#[tokio::test]
async fn a_topology_is_applied_shown_refused_when_invalid_and_changed() {
    let Some(etcd) = switchboard_testenv::service(switchboard_testenv::ETCD) else {
        return;
    };
    let prefix = fresh_prefix();
    let ring = ring_file();
    let ring_path = ring.to_string_lossy().into_owned();

    let (ok, out) = topology(&etcd, &prefix, &["show"]);
    assert!(ok && out.contains("no topology at"), "{out}");

    let (ok, out) = topology(&etcd, &prefix, &["apply", &ring_path]);
    assert!(ok, "{out}");
    assert!(out.contains("domains=4 links=4 apps=1"), "{out}");
    // One record, under the shared prefix.
    let metadata = EtcdMetadata::connect_kinds(std::slice::from_ref(&etcd), &prefix, &[])
        .await
        .expect("etcd");
    let stored = metadata.list(Kind::Topology).await.expect("list");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, TOPOLOGY_KEY);

    let (ok, shown) = topology(&etcd, &prefix, &["show"]);
    assert!(ok, "{shown}");
    assert_has(
        &shown,
        &[
            "domains (4)",
            "  domain-01  federation=http://127.0.0.1:9091  client=ws://127.0.0.1:8091/ws",
            "links (4)",
            "  ANZ  appId=app-id-343  auth=off  users: domain-01:0-999999, domain-02:1000000-1999999, \
             domain-03:2000000-2999999, domain-04:3000000-, 1 listed one by one, \
             others hashed over domain-02,domain-03",
            "  domain-01 - domain-02  weight=1  state=unknown",
            "  domain-01 - domain-04  weight=1  state=unknown",
            // The tie between the two ways round goes to the smaller name.
            "  domain-01 -> domain-03  next=domain-02  path=domain-01>domain-02>domain-03  cost=2",
            "  domain-03 -> domain-01  next=domain-02  path=domain-03>domain-02>domain-01  cost=2",
            "  domain-04 -> domain-02  next=domain-01  path=domain-04>domain-01>domain-02  cost=2",
            "  domain-01 -> domain-04  next=domain-04  path=domain-01>domain-04  cost=1",
        ],
    );
    // 4 domains, each with a route to the 3 others.
    assert_eq!(shown.lines().filter(|l| l.contains(" -> ")).count(), 12);

    // An invalid file: every problem printed, nothing written.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(&ring).expect("ring.yaml");
    let invalid = text
        .replace(
            "{n1: domain-02, n2: domain-03, weight: 1}",
            "{n1: domain-02, n2: domain-05, weight: 0}",
        )
        .replace("from: 1000000, to: 1999999", "from: 900000, to: 1999999");
    assert_ne!(invalid, text);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, invalid).expect("write");
    let (ok, out) = topology(&etcd, &prefix, &["apply", &bad.to_string_lossy()]);
    assert!(!ok, "{out}");
    for problem in [
        "3 problems in the topology (nothing was changed)",
        r#"link domain-02 - domain-05: no domain named "domain-05""#,
        "link domain-02 - domain-05: weight 0 must be 1 to 1000000",
        r#"app "ANZ": range domain-01 0-999999 overlaps range domain-02 900000-1999999"#,
    ] {
        assert!(out.contains(problem), "no {problem:?} in:\n{out}");
    }
    let (ok, after) = topology(&etcd, &prefix, &["show"]);
    assert!(
        ok && after == shown,
        "changed by an invalid apply:\n{after}"
    );
    // Not even parseable: refused too.
    std::fs::write(&bad, "domains:\n  - name: domain-01\n    federaton: x\n").expect("write");
    let (ok, out) = topology(&etcd, &prefix, &["apply", &bad.to_string_lossy()]);
    assert!(!ok && out.contains("federaton"), "{out}");

    // Applying the same file again changes nothing.
    let (ok, out) = topology(&etcd, &prefix, &["apply", &ring_path]);
    assert!(ok && out.contains("unchanged"), "{out}");

    // A heavier 1-2 link: 1 reaches 3, and 2, the other way round.
    let heavier = dir.path().join("heavier.yaml");
    std::fs::write(
        &heavier,
        text.replace(
            "{n1: domain-01, n2: domain-02, weight: 1}",
            "{n1: domain-01, n2: domain-02, weight: 5}",
        ),
    )
    .expect("write");
    let (ok, out) = topology(&etcd, &prefix, &["apply", &heavier.to_string_lossy()]);
    assert!(ok, "{out}");
    let (ok, shown) = topology(&etcd, &prefix, &["show"]);
    assert!(ok, "{shown}");
    assert_has(
        &shown,
        &[
            "  domain-01 - domain-02  weight=5  state=unknown",
            "  domain-01 -> domain-03  next=domain-04  path=domain-01>domain-04>domain-03  cost=2",
            "  domain-01 -> domain-02  next=domain-04  path=domain-01>domain-04>domain-03>domain-02  cost=3",
        ],
    );
    metadata
        .delete(Kind::Topology, TOPOLOGY_KEY)
        .await
        .expect("clean up");
}

#[test]
fn an_invalid_file_is_refused_without_etcd_and_a_missing_etcd_is_named() {
    // The file is checked before etcd is dialled: nothing listens here.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "domains:\n  - {name: a, federation: 'http://h:1', client: 'ws://h:2/ws'}\ndomainLinks:\n  - {n1: a, n2: a}\n",
    )
    .expect("write");
    let (ok, out) = topology(
        "http://127.0.0.1:9",
        "/x/",
        &["apply", &bad.to_string_lossy()],
    );
    assert!(
        !ok && out.contains("link a - a: a domain cannot link to itself"),
        "{out}"
    );
    let huge = dir.path().join("huge.yaml");
    std::fs::write(&huge, "#".repeat(1024 * 1024 + 1)).expect("write");
    let (ok, out) = topology(
        "http://127.0.0.1:9",
        "/x/",
        &["apply", &huge.to_string_lossy()],
    );
    assert!(!ok && out.contains("at most 1048576"), "{out}");
    let (ok, out) = topology(
        "http://127.0.0.1:9",
        "/x/",
        &["apply", "/nonexistent/t.yaml"],
    );
    assert!(
        !ok && out.contains("cannot read /nonexistent/t.yaml"),
        "{out}"
    );
    let (ok, out) = topology("http://127.0.0.1:9", "/x/", &["show"]);
    assert!(
        !ok && out.contains("cannot read /x/topology/current")
            && out.contains("etcd at http://127.0.0.1:9"),
        "{out}"
    );
    let (ok, out) = topology("http://127.0.0.1:9", "nope", &["show"]);
    assert!(!ok && out.contains("--prefix"), "{out}");
}
