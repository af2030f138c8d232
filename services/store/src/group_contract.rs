//! The group store contract: behaviour every [`GroupStore`] engine must
//! show, reopening included. Run it against an engine with
//! [`group_store_contract_tests!`](crate::group_store_contract_tests).

use std::path::Path;
use std::sync::Arc;

use crate::groups::{GroupChange, GroupRecord, GroupStore};

/// Opens the engine's group store on a data dir.
pub type OpenGroups = fn(&Path) -> Arc<dyn GroupStore>;

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("demo-{n}")).collect()
}

fn record(group: &str, owner: &str, members: &[&str]) -> GroupRecord {
    let mut members = users(members);
    members.sort();
    GroupRecord {
        app_id: "app-1".into(),
        group: group.into(),
        name: format!("{group} team"),
        owner: format!("demo-{owner}"),
        members,
        created_ms: 1_764_000_000_000,
    }
}

fn ids(groups: &[GroupRecord]) -> Vec<&str> {
    groups.iter().map(|g| g.group.as_str()).collect()
}

pub async fn a_created_group_reads_back_with_sorted_members(s: &dyn GroupStore) {
    let g = record(
        "g-1",
        "ann",
        &["zed", "ann", "bob", "a-very-long-user-name"],
    );
    assert_eq!(s.create_group(&g).await.expect("create"), None, "created");
    let read = s.group("app-1", "g-1").await.expect("get").expect("found");
    assert_eq!(read, g);
    let mut sorted = read.members.clone();
    sorted.sort();
    assert_eq!(read.members, sorted, "members are sorted");
    assert_eq!(s.group("app-1", "g-2").await.expect("get"), None);
    assert_eq!(s.group("app-2", "g-1").await.expect("get"), None, "per app");
}

pub async fn creating_an_existing_group_returns_it_and_writes_nothing(s: &dyn GroupStore) {
    let first = record("g-1", "ann", &["ann", "bob"]);
    s.create_group(&first).await.expect("create");
    let second = record("g-1", "cat", &["cat"]);
    let existing = s.create_group(&second).await.expect("create again");
    assert_eq!(existing, Some(first.clone()));
    assert_eq!(
        s.group("app-1", "g-1").await.expect("get"),
        Some(first),
        "the first stays"
    );
    assert!(
        s.groups_of("app-1", "demo-cat")
            .await
            .expect("groups_of")
            .is_empty()
    );
}

pub async fn updates_add_remove_and_rename_and_repeat_safely(s: &dyn GroupStore) {
    s.create_group(&record("g-1", "ann", &["ann", "bob"]))
        .await
        .expect("create");
    let change = GroupChange {
        add: users(&["cat", "dan", "bob"]),
        remove: users(&["bob", "eve"]),
        name: Some("Renamed".into()),
    };
    let after = s
        .update_group("app-1", "g-1", &change)
        .await
        .expect("update")
        .expect("found");
    assert_eq!(after.members, users(&["ann", "cat", "dan"]));
    assert_eq!(after.name, "Renamed");
    assert_eq!(after.owner, "demo-ann");
    // The same change again is the same state.
    let again = s
        .update_group("app-1", "g-1", &change)
        .await
        .expect("update")
        .expect("found");
    assert_eq!(again, after);
    assert_eq!(
        s.group("app-1", "g-1").await.expect("get"),
        Some(after.clone())
    );
    // Memberships follow.
    assert!(
        s.groups_of("app-1", "demo-bob")
            .await
            .expect("of")
            .is_empty()
    );
    assert_eq!(
        ids(&s.groups_of("app-1", "demo-cat").await.expect("of")),
        ["g-1"]
    );
    // No such group: nothing written.
    assert_eq!(
        s.update_group("app-1", "g-9", &change)
            .await
            .expect("update"),
        None
    );
    assert_eq!(s.group("app-1", "g-9").await.expect("get"), None);
    assert_eq!(
        ids(&s.groups_of("app-1", "demo-cat").await.expect("of")),
        ["g-1"]
    );
}

pub async fn delete_removes_the_group_and_its_memberships_once(s: &dyn GroupStore) {
    let g = record("g-1", "ann", &["ann", "bob"]);
    s.create_group(&g).await.expect("create");
    s.create_group(&record("g-2", "bob", &["bob"]))
        .await
        .expect("create");
    assert_eq!(
        s.delete_group("app-1", "g-1").await.expect("delete"),
        Some(g)
    );
    assert_eq!(s.delete_group("app-1", "g-1").await.expect("again"), None);
    assert_eq!(s.group("app-1", "g-1").await.expect("get"), None);
    assert!(
        s.groups_of("app-1", "demo-ann")
            .await
            .expect("of")
            .is_empty()
    );
    assert_eq!(
        ids(&s.groups_of("app-1", "demo-bob").await.expect("of")),
        ["g-2"]
    );
    // The id can be used again.
    let reborn = record("g-1", "cat", &["cat"]);
    assert_eq!(s.create_group(&reborn).await.expect("create"), None);
    assert_eq!(s.group("app-1", "g-1").await.expect("get"), Some(reborn));
}

pub async fn groups_of_and_counts_cover_every_membership(s: &dyn GroupStore) {
    for (i, group) in ["g-b", "g-a", "g-long-name", "g-c"].iter().enumerate() {
        let members: &[&str] = if i % 2 == 0 {
            &["ann", "bob"]
        } else {
            &["ann"]
        };
        s.create_group(&record(group, "ann", members))
            .await
            .expect("create");
    }
    let of_ann = s.groups_of("app-1", "demo-ann").await.expect("of");
    assert_eq!(ids(&of_ann), ["g-a", "g-b", "g-c", "g-long-name"], "by id");
    assert!(
        of_ann
            .iter()
            .all(|g| g.members.is_empty() && !g.name.is_empty()),
        "without members, with names"
    );
    assert_eq!(
        ids(&s.groups_of("app-1", "demo-bob").await.expect("of")),
        ["g-b", "g-long-name"]
    );
    assert_eq!(
        s.count_groups("app-1", &users(&["ann", "bob", "nobody"]))
            .await
            .expect("count"),
        [4, 2, 0]
    );
    assert_eq!(
        s.count_groups("app-2", &users(&["ann"]))
            .await
            .expect("count"),
        [0],
        "per app"
    );
}

pub async fn a_large_group_reads_back_whole(s: &dyn GroupStore) {
    let names: Vec<String> = (0..10_000).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let g = record("big", "u0", &refs);
    s.create_group(&g).await.expect("create");
    let read = s.group("app-1", "big").await.expect("get").expect("found");
    assert_eq!(read.members.len(), 10_000);
    assert_eq!(read, g);
}

pub async fn bad_fields_are_refused(s: &dyn GroupStore) {
    let mut empty_id = record("g-1", "ann", &["ann"]);
    empty_id.group.clear();
    assert!(s.create_group(&empty_id).await.is_err());
    let mut long_member = record("g-1", "ann", &["ann"]);
    long_member
        .members
        .push("x".repeat(crate::groups::MAX_FIELD_BYTES + 1));
    assert!(s.create_group(&long_member).await.is_err());
    assert_eq!(s.group("app-1", "g-1").await.expect("get"), None);
}

/// Groups written before a close are there after reopening.
pub async fn groups_survive_reopening(open: OpenGroups, dir: &Path) {
    let g = record("g-1", "ann", &["ann", "bob"]);
    {
        let s = open(dir);
        s.create_group(&g).await.expect("create");
        s.update_group(
            "app-1",
            "g-1",
            &GroupChange {
                add: users(&["cat"]),
                remove: users(&["bob"]),
                name: None,
            },
        )
        .await
        .expect("update");
    }
    let s = open(dir);
    let read = s.group("app-1", "g-1").await.expect("get").expect("found");
    assert_eq!(read.members, users(&["ann", "cat"]));
    assert_eq!(
        ids(&s.groups_of("app-1", "demo-cat").await.expect("of")),
        ["g-1"]
    );
}

/// Generates the group store contract tests for an engine. `$open` is a
/// `fn(&Path) -> Arc<dyn GroupStore>` (a closure without captures) opening
/// the engine's groups on a data dir.
#[macro_export]
macro_rules! group_store_contract_tests {
    ($open:expr) => {
        $crate::group_store_contract_tests!($open, ready = || true);
    };
    // `ready` says whether the engine's service is there (a shared
    // database named by an environment variable); a test skips when not.
    ($open:expr, ready = $ready:expr) => {
        $crate::group_store_contract_tests!(@each $open; $ready;
            a_created_group_reads_back_with_sorted_members,
            creating_an_existing_group_returns_it_and_writes_nothing,
            updates_add_remove_and_rename_and_repeat_safely,
            delete_removes_the_group_and_its_memberships_once,
            groups_of_and_counts_cover_every_membership,
            a_large_group_reads_back_whole,
            bad_fields_are_refused
        );
    };
    (@each $open:expr; $ready:expr; $($name:ident),*) => {
        mod group_store_contract_suite {
            #[allow(unused_imports)]
            use super::*;

            const OPEN: $crate::group_contract::OpenGroups = $open;
            const READY: fn() -> bool = $ready;

            $(
                #[tokio::test]
                async fn $name() {
                    if !READY() {
                        return;
                    }
                    let dir = tempfile::tempdir().expect("tempdir");
                    let groups = OPEN(dir.path());
                    $crate::group_contract::$name(&*groups).await;
                }
            )*

            #[tokio::test]
            async fn groups_survive_reopening() {
                if !READY() {
                    return;
                }
                let dir = tempfile::tempdir().expect("tempdir");
                $crate::group_contract::groups_survive_reopening(OPEN, dir.path()).await;
            }
        }
    };
}
