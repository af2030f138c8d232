//! The metadata contract: what every [`Metadata`] implementation must do.
//! Each implementation's tests call [`run_all`] on a fresh, empty instance
//! (for etcd: its own key prefix).

use std::time::Duration;

use switchboard_config::{AppConfig, AuthMode};
use tokio::sync::broadcast;

use crate::{Change, ChangeOp, Kind, Metadata, MetadataError, MetadataExt};

/// How long a change may take to be notified.
const NOTICE: Duration = Duration::from_secs(5);

pub async fn run_all(m: &dyn Metadata) {
    records_round_trip(m).await;
    changes_are_notified_in_order(m).await;
    bad_keys_and_records_are_refused(m).await;
}

fn app(id: &str, name: &str) -> AppConfig {
    AppConfig {
        name: name.into(),
        app_id: id.into(),
        ..AppConfig::demo()
    }
}

pub async fn records_round_trip(m: &dyn Metadata) {
    assert!(m.list(Kind::Apps).await.expect("list").is_empty());
    assert_eq!(m.get(Kind::Apps, "a1").await.expect("get"), None);
    m.put_record(&app("a1", "one")).await.expect("put");
    m.put_record(&app("a2", "two")).await.expect("put");
    let got: Option<AppConfig> = m.get_record("a1").await.expect("get");
    assert_eq!(got, Some(app("a1", "one")));
    // Replacing keeps one record per key.
    let mut jwt = app("a1", "one");
    jwt.auth = AuthMode::Jwt;
    jwt.jwt_secret = Some("s".into());
    m.put_record(&jwt).await.expect("replace");
    let mut all: Vec<AppConfig> = m.list_records().await.expect("list");
    all.sort_by(|a, b| a.app_id.cmp(&b.app_id));
    assert_eq!(all, vec![jwt.clone(), app("a2", "two")]);
    assert!(m.delete_record::<AppConfig>("a2").await.expect("delete"));
    assert!(
        !m.delete_record::<AppConfig>("a2")
            .await
            .expect("delete again")
    );
    let keys: Vec<String> = m
        .list(Kind::Apps)
        .await
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["a1".to_owned()]);
    assert!(m.delete(Kind::Apps, "a1").await.expect("delete"));
    assert!(m.list(Kind::Apps).await.expect("list").is_empty());
}

async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Change {
    tokio::time::timeout(NOTICE, rx.recv())
        .await
        .expect("a change is notified in time")
        .expect("the change stream is open")
}

pub async fn changes_are_notified_in_order(m: &dyn Metadata) {
    let mut rx = m.changes();
    m.put(Kind::Apps, "c1", b"{}".to_vec()).await.expect("put");
    m.put(Kind::Apps, "c1", b"{\"x\":1}".to_vec())
        .await
        .expect("put");
    m.delete(Kind::Apps, "c1").await.expect("delete");
    // A delete of nothing changes nothing.
    m.delete(Kind::Apps, "c1").await.expect("delete");
    m.put(Kind::Apps, "c2", b"{}".to_vec()).await.expect("put");
    let seen = [
        next_change(&mut rx).await,
        next_change(&mut rx).await,
        next_change(&mut rx).await,
        next_change(&mut rx).await,
    ];
    let change = |key: &str, op| Change {
        kind: Kind::Apps,
        key: key.into(),
        op,
    };
    assert_eq!(
        seen,
        [
            change("c1", ChangeOp::Put(b"{}".to_vec())),
            change("c1", ChangeOp::Put(b"{\"x\":1}".to_vec())),
            change("c1", ChangeOp::Deleted),
            change("c2", ChangeOp::Put(b"{}".to_vec())),
        ]
    );
    m.delete(Kind::Apps, "c2").await.expect("clean up");
}

pub async fn bad_keys_and_records_are_refused(m: &dyn Metadata) {
    for key in ["", "a/b", &"k".repeat(257)] {
        assert!(
            matches!(
                m.put(Kind::Apps, key, b"{}".to_vec()).await,
                Err(MetadataError::Key(_))
            ),
            "{key:?}"
        );
    }
    // A JWT app without any key could authenticate nobody.
    let mut no_key = app("b1", "b");
    no_key.auth = AuthMode::Jwt;
    let err = m.put_record(&no_key).await.expect_err("refused");
    assert!(err.to_string().contains("jwt"), "{err}");
    assert_eq!(m.get(Kind::Apps, "b1").await.expect("get"), None);
    // A malformed record (written by hand) is an error when read alone and
    // left out of a list.
    m.put(Kind::Apps, "b2", b"not json".to_vec())
        .await
        .expect("raw put");
    m.put_record(&app("b3", "b")).await.expect("put");
    assert!(m.get_record::<AppConfig>("b2").await.is_err());
    let all: Vec<AppConfig> = m.list_records().await.expect("list");
    assert_eq!(all, vec![app("b3", "b")]);
    m.delete(Kind::Apps, "b2").await.expect("clean up");
    m.delete(Kind::Apps, "b3").await.expect("clean up");
}
