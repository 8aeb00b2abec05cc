//! `/healthz` answers while the process runs; `/readyz` only while the database is at this binary's schema and the
//! process streams from its replication slot.

use deeprecall_sync::db::migrate::latest_version;
use deeprecall_tests::TestEnv;

#[tokio::test]
async fn readyz_follows_the_migration_ledger() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let (status, body) = env.get("/healthz", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    // Ready once the replication stream runs (a moment after start).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        let (status, body) = env.get("/readyz", None).await;
        if status == 200 {
            break body;
        }
        assert_eq!(body["reason"], "stream_starting", "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(body["status"], "ready");
    assert_eq!(body["schema_version"], latest_version());

    // A newer schema than this binary knows: not ready, and it says why.
    db.batch_execute("insert into deeprecall_schema_migrations (version, name, checksum) values (9999, 'x', 'x')")
        .await
        .unwrap();
    let (status, body) = env.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["reason"], "schema", "{body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("newer"),
        "{body}"
    );
    db.batch_execute("delete from deeprecall_schema_migrations where version = 9999")
        .await
        .unwrap();
    let (status, body) = env.get("/readyz", None).await;
    assert_eq!(status, 200, "back to ready: {body}");

    // A ledger that lost its rows (older than this binary): not ready; liveness is unaffected.
    db.batch_execute("delete from deeprecall_schema_migrations")
        .await
        .unwrap();
    let (status, body) = env.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("deeprecall-sync migrate"),
        "{body}"
    );
    let (status, _) = env.get("/healthz", None).await;
    assert_eq!(status, 200);

    // No ledger at all: not ready either.
    db.batch_execute("drop table deeprecall_schema_migrations")
        .await
        .unwrap();
    let (status, body) = env.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
}
