//! The metadata contract against a real etcd (`SWITCHBOARD_TEST_ETCD`,
//! started by `scripts/test.sh`), each test in its own key prefix.

use switchboard_config::AppConfig;
use switchboard_metadata::{EtcdMetadata, Kind, Metadata, MetadataExt, contract};

async fn metadata() -> Option<EtcdMetadata> {
    let url = switchboard_testenv::service(switchboard_testenv::ETCD)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let prefix = format!("/sbtest-meta/{:x}-{}/", nanos, std::process::id());
    let m = EtcdMetadata::connect(&[url], &prefix)
        .await
        .expect("connect to etcd");
    Some(m)
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
