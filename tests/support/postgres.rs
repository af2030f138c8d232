//! A database of its own per test, in the PostgreSQL under test
//! (`SWITCHBOARD_TEST_POSTGRES`, started by `scripts/test.sh`).

/// The server's URL; `None` (a recorded skip) outside CI when unset.
pub fn server() -> Option<String> {
    switchboard_testenv::service(switchboard_testenv::POSTGRES)
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}")
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database(server: &str) -> String {
    let database = format!(
        "it_{}_{}",
        std::process::id(),
        switchboard_mesh::new_message_id().replace('-', "")
    );
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .expect("connect to SWITCHBOARD_TEST_POSTGRES");
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await
        .expect("create a test database");
    drop(client);
    let _ = driver.await;
    with_database(server, &database)
}
