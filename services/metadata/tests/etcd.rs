//! The metadata contract against a real etcd (`SWITCHBOARD_TEST_ETCD`,
//! started by `scripts/test.sh`), each test in its own key prefix.

use switchboard_config::AppConfig;
use switchboard_metadata::{EtcdMetadata, Kind, Metadata, MetadataExt, contract};

async fn metadata() -> Option<EtcdMetadata> {
    let (m, _, _) = metadata_at().await?;
    Some(m)
}

/// A metadata in a fresh prefix, with the etcd URL and the prefix.
async fn metadata_at() -> Option<(EtcdMetadata, String, String)> {
    let url = switchboard_testenv::service(switchboard_testenv::ETCD)?;
    let prefix = format!("/sbtest-meta/{}/", switchboard_testenv::unique());
    let m = EtcdMetadata::connect(std::slice::from_ref(&url), &prefix)
        .await
        .expect("connect to etcd");
    Some((m, url, prefix))
}

#[tokio::test]
async fn etcd_metadata_keeps_the_contract() {
    let Some(m) = metadata().await else {
        return;
    };
    contract::run_all(&m).await;
}

#[tokio::test]
async fn the_config_seeds_etcd_once_and_etcd_wins_after() {
    let Some(m) = metadata().await else {
        return;
    };
    let app = |id: &str| AppConfig {
        app_id: id.into(),
        ..AppConfig::demo()
    };
    let json = |a: &AppConfig| (a.app_id.clone(), serde_json::to_vec(a).expect("json"));
    assert!(
        m.seed_once(Kind::Apps, &[json(&app("s1"))])
            .await
            .expect("seed")
    );
    // An operator deletes it; a process starting with the old config does
    // not bring it back.
    assert!(m.delete(Kind::Apps, "s1").await.expect("delete"));
    assert!(
        !m.seed_once(Kind::Apps, &[json(&app("s1"))])
            .await
            .expect("seed")
    );
    assert!(
        m.get_record::<AppConfig>("s1")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_change_made_by_another_process_is_notified() {
    let Some((writer, url, prefix)) = metadata_at().await else {
        return;
    };
    let reader = EtcdMetadata::connect(&[url], &prefix)
        .await
        .expect("connect");
    let mut changes = reader.changes();
    let app = AppConfig {
        app_id: "elsewhere".into(),
        ..AppConfig::demo()
    };
    writer.put_record(&app).await.expect("put");
    let change = tokio::time::timeout(std::time::Duration::from_secs(15), changes.recv())
        .await
        .expect("notified in time")
        .expect("open");
    assert_eq!(change.key, "elsewhere");
    let seen: Option<AppConfig> = reader.get_record("elsewhere").await.expect("get");
    assert_eq!(seen, Some(app));
}
