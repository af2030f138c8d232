//! The CQL schema of the ScyllaDB engine, its versions, and the settings
//! it is created with.
//!
//! Every table is partitioned by what one request reads: an inbox
//! (`app_id, user_id`), a sender's id index, a queue, a group, a user's
//! memberships. The schema is created at start-up when missing and its
//! version is kept in `schema_version`; a keyspace written by a newer
//! version of Switchboard is refused rather than guessed at.

use crate::StoreError;

/// The version of the schema this build writes.
pub const SCHEMA_VERSION: i32 = 1;

/// The statements of each schema version, oldest first: version `n` is
/// `MIGRATIONS[n - 1]`, run in order on a keyspace at version `n - 1`.
/// Every statement may run twice (`IF NOT EXISTS`): a start that dies
/// half-way runs its migration again.
const MIGRATIONS: &[&[&str]] = &[&[
    // Undelivered messages, oldest first; `msg` is the encoded
    // InboxMessage (its seq field unset: the key is the seq).
    "CREATE TABLE IF NOT EXISTS {ks}.inbox (
        app_id text, user_id text, seq bigint, msg blob,
        PRIMARY KEY ((app_id, user_id), seq)
    ) WITH CLUSTERING ORDER BY (seq ASC)",
    // The id index: a client-given id accepted from a sender, for the id
    // window (a TTL); `accepted_us` makes the window exact to the
    // microsecond where the TTL is in whole seconds.
    "CREATE TABLE IF NOT EXISTS {ks}.message_ids (
        app_id text, sender text, id text, accepted_us bigint,
        PRIMARY KEY ((app_id, sender), id)
    )",
    // Follow-ups (sender confirmations) written into an inbox, by their
    // id: same partition key as `inbox`, so that the follow-up and its
    // marker go to the same replicas in one write.
    "CREATE TABLE IF NOT EXISTS {ks}.inbox_follow_ups (
        app_id text, user_id text, id text, seq bigint,
        PRIMARY KEY ((app_id, user_id), id)
    )",
    // Writer numbers (scylla_seq.rs): one row, counted up with a
    // lightweight transaction once per start.
    "CREATE TABLE IF NOT EXISTS {ks}.writers (
        name text PRIMARY KEY, incarnation bigint
    )",
    // Durable queues: items by id, times taken, and the names in use.
    "CREATE TABLE IF NOT EXISTS {ks}.queue_items (
        queue text, id bigint, enqueued_ms bigint, payload blob,
        PRIMARY KEY (queue, id)
    ) WITH CLUSTERING ORDER BY (id ASC)",
    "CREATE TABLE IF NOT EXISTS {ks}.queue_attempts (
        queue text, id bigint, attempts int,
        PRIMARY KEY (queue, id)
    )",
    "CREATE TABLE IF NOT EXISTS {ks}.queue_names (
        bucket int, queue text,
        PRIMARY KEY (bucket, queue)
    )",
    // Persistent groups, their members, and each user's memberships.
    "CREATE TABLE IF NOT EXISTS {ks}.groups (
        app_id text, group_id text, name text, owner text, created_ms bigint,
        PRIMARY KEY ((app_id, group_id))
    )",
    "CREATE TABLE IF NOT EXISTS {ks}.group_members (
        app_id text, group_id text, user_id text,
        PRIMARY KEY ((app_id, group_id), user_id)
    ) WITH CLUSTERING ORDER BY (user_id ASC)",
    "CREATE TABLE IF NOT EXISTS {ks}.user_groups (
        app_id text, user_id text, group_id text,
        PRIMARY KEY ((app_id, user_id), group_id)
    ) WITH CLUSTERING ORDER BY (group_id ASC)",
]];

/// The statement that creates the keyspace. Tablets are off: the engine
/// uses lightweight transactions (group creation, the writer number),
/// which ScyllaDB does not run on tablet keyspaces.
pub fn keyspace_statement(keyspace: &str, replication_factor: u32) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}} \
         AND durable_writes = true AND tablets = {{'enabled': false}}"
    )
}

/// The table that records the schema version.
pub fn version_table_statement(keyspace: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {keyspace}.schema_version (\
         component text PRIMARY KEY, version int, applied_ms bigint)"
    )
}

/// The statements that take a keyspace from version `from` to
/// [`SCHEMA_VERSION`], in order. A keyspace newer than this build is an
/// error naming both versions.
pub fn migrations(keyspace: &str, from: i32) -> Result<Vec<String>, StoreError> {
    if from > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "keyspace {keyspace} has schema version {from}; this build knows up to \
             {SCHEMA_VERSION} (it was written by a newer switchboard)"
        )));
    }
    let from = usize::try_from(from.max(0)).unwrap_or(0);
    Ok(MIGRATIONS[from..]
        .iter()
        .flat_map(|version| version.iter())
        .map(|statement| statement.replace("{ks}", keyspace))
        .collect())
}

/// A keyspace name CQL takes unquoted: a letter, then letters, digits or
/// `_`, at most 48 in all.
pub fn check_keyspace(keyspace: &str) -> Result<(), StoreError> {
    let mut chars = keyspace.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if first_ok && rest_ok && keyspace.len() <= 48 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "store.keyspace {keyspace:?} is not a keyspace name: a letter, then letters, digits \
             or _, at most 48"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_keyspace_gets_every_table_once() {
        let all = migrations("sb", 0).expect("migrations");
        let tables: Vec<&str> = all
            .iter()
            .filter_map(|s| s.strip_prefix("CREATE TABLE IF NOT EXISTS sb."))
            .filter_map(|s| s.split(' ').next())
            .collect();
        assert_eq!(
            tables,
            [
                "inbox",
                "message_ids",
                "inbox_follow_ups",
                "writers",
                "queue_items",
                "queue_attempts",
                "queue_names",
                "groups",
                "group_members",
                "user_groups"
            ]
        );
        assert!(all.iter().all(|s| !s.contains("{ks}")));
        // The inbox is read oldest first within one partition per inbox.
        assert!(all[0].contains("PRIMARY KEY ((app_id, user_id), seq)"));
        assert!(all[0].contains("CLUSTERING ORDER BY (seq ASC)"));
    }

    #[test]
    fn a_current_keyspace_needs_nothing_and_a_newer_one_is_refused() {
        assert!(
            migrations("sb", SCHEMA_VERSION)
                .expect("current")
                .is_empty()
        );
        let err = migrations("sb", SCHEMA_VERSION + 1).expect_err("newer");
        assert!(err.to_string().contains("newer switchboard"), "{err}");
    }

    #[test]
    fn the_keyspace_statement_carries_the_replication_factor() {
        let cql = keyspace_statement("chat", 3);
        assert_eq!(
            cql,
            "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = {'class': \
             'NetworkTopologyStrategy', 'replication_factor': 3} AND durable_writes = true AND \
             tablets = {'enabled': false}"
        );
        assert!(version_table_statement("chat").starts_with("CREATE TABLE IF NOT EXISTS chat."));
    }

    #[test]
    fn keyspace_names_are_checked() {
        for good in ["switchboard", "sb_test_1", "A"] {
            assert!(check_keyspace(good).is_ok(), "{good}");
        }
        for bad in ["", "1sb", "sb-test", "sb;DROP", "s b", &"k".repeat(49)] {
            assert!(check_keyspace(bad).is_err(), "{bad}");
        }
    }
}
