//! The store, queue and group contracts on PostgreSQL: each test in a
//! database of its own, created in the server `SWITCHBOARD_TEST_POSTGRES`
//! names (skipped with the reason printed when it is unset, failing under
//! `CI=true`).

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::{PostgresOptions, PostgresStore};
use crate::{GroupStore, Queue};

fn server() -> Option<String> {
    switchboard_testenv::service(switchboard_testenv::POSTGRES)
}

fn ready() -> bool {
    server().is_some()
}

/// `url` with its database replaced by `database`.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    format!("{scheme}://{authority}/{database}{query}")
}

/// Creates `database` unless it exists.
async fn create_database(server: &str, database: &str) {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .expect("connect to SWITCHBOARD_TEST_POSTGRES");
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await
        .expect("look the database up")
        .is_some();
    if !exists {
        // Two openers of one data dir race only in the crash test's child
        // and parent, which run one after the other.
        client
            .batch_execute(&format!("CREATE DATABASE \"{database}\""))
            .await
            .expect("create the test database");
    }
    drop(client);
    let _ = driver.await;
}

fn options(url: String, id_window: Duration) -> PostgresOptions {
    PostgresOptions {
        url,
        pool_size: 8,
        id_window,
        ..PostgresOptions::default()
    }
}

/// A database of its own per test.
struct PgHarness {
    url: String,
}

impl PgHarness {
    async fn new() -> Self {
        let server = server().expect("checked by available()");
        let database = format!("t_{}", switchboard_testenv::unique());
        create_database(&server, &database).await;
        PgHarness {
            url: with_database(&server, &database),
        }
    }
}

impl crate::contract::Harness for PgHarness {
    type Store = PostgresStore;

    fn available() -> bool {
        ready()
    }

    async fn create() -> Self {
        PgHarness::new().await
    }

    async fn open(&self, id_window: Duration) -> PostgresStore {
        PostgresStore::connect(options(self.url.clone(), id_window))
            .await
            .expect("open the store")
    }
}

impl crate::queue_contract::QueueHarness for PgHarness {
    fn available() -> bool {
        ready()
    }

    async fn create() -> Self {
        PgHarness::new().await
    }

    async fn open(&self) -> Arc<dyn Queue> {
        PostgresStore::connect(options(self.url.clone(), Duration::from_secs(60)))
            .await
            .expect("open the store")
            .queues()
    }
}

impl crate::group_contract::GroupHarness for PgHarness {
    fn available() -> bool {
        ready()
    }

    async fn create() -> Self {
        PgHarness::new().await
    }

    async fn open(&self) -> Arc<dyn GroupStore> {
        PostgresStore::connect(options(self.url.clone(), Duration::from_secs(60)))
            .await
            .expect("open the store")
            .groups()
    }
}

crate::store_contract_tests!(PgHarness);

crate::queue_contract_tests!(harness = PgHarness);

crate::group_store_contract_tests!(harness = PgHarness);

#[test]
fn a_url_gets_another_database() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "t_1"),
        "postgres://postgres@127.0.0.1:5432/t_1"
    );
    assert_eq!(
        with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
        "postgres://u:p@h:1/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[tokio::test]
async fn a_wrong_address_names_it() {
    // A port nothing listens on (bound and closed at once).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/db");
    let error = PostgresStore::connect(options(url, Duration::from_secs(60)))
        .await
        .err()
        .expect("no server there");
    let text = error.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}/db")), "{text}");
}

#[tokio::test]
async fn migrations_are_recorded_once_and_a_newer_schema_is_refused() {
    if !ready() {
        return;
    }
    let place = <PgHarness as crate::contract::Harness>::create().await;
    let opens = futures_util::future::join_all(
        (0..3).map(|_| PostgresStore::connect(options(place.url.clone(), Duration::from_secs(60)))),
    )
    .await;
    assert!(
        opens.iter().all(Result::is_ok),
        "three processes start at once"
    );
    let (client, connection) = tokio_postgres::connect(&place.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1]);
    client
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
            &[],
        )
        .await
        .expect("a future version");
    drop(client);
    let _ = driver.await;
    let refused = PostgresStore::connect(options(place.url.clone(), Duration::from_secs(60)))
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(refused.to_string().contains("version 999"), "{refused}");
}
