//! `migrate`: applies everything once, is a no-op the second time and when two run at once (advisory lock), and
//! refuses a database that is newer than the binary or whose applied migration was edited. `serve` refuses an
//! older database.

use clap::Parser;
use deeprecall_sync::cli::Cli;
use deeprecall_sync::db::migrate::{self, MigrateError, latest_version, migrations};
use deeprecall_tests::{TEST_SECRET, connect, count, start_cluster};

fn all_versions() -> Vec<i32> {
    migrations().iter().map(|m| m.version).collect()
}

async fn ledger(client: &tokio_postgres::Client) -> Vec<(i32, String)> {
    client
        .query(
            "select version, checksum from deeprecall_schema_migrations order by version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn ledger_exists(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one(
            "select to_regclass('deeprecall_schema_migrations')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn migrate_twice_applies_nothing_the_second_time() {
    let (_cluster, url) = start_cluster().await;
    let mut client = connect(&url).await;
    assert!(!all_versions().is_empty());
    match migrate::check_current(&client).await {
        Err(MigrateError::DatabaseOlder { found: 0, known }) => assert_eq!(known, latest_version()),
        other => panic!("fresh database must be reported older, got {other:?}"),
    }
    // `serve` (without --migrate) refuses it before listening, and says what to run.
    let serve = Cli::try_parse_from([
        "deeprecall-sync",
        "serve",
        "--database-url",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        TEST_SECRET,
    ])
    .expect("parse serve");
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        deeprecall_sync::cli::run(serve),
    )
    .await
    .expect("serve must refuse at once, not start serving");
    let err = refused.expect_err("serve must refuse an unmigrated database");
    assert!(
        format!("{err:#}").contains("deeprecall-sync migrate"),
        "{err:#}"
    );
    assert!(
        ledger_exists(&client).await.is_none(),
        "serve without --migrate must not migrate"
    );

    let first = migrate::migrate(&mut client).await.expect("first migrate");
    assert_eq!(first.applied, all_versions());
    assert_eq!(first.version, latest_version());
    let recorded = ledger(&client).await;
    let expected: Vec<(i32, String)> = migrations()
        .iter()
        .map(|m| (m.version, m.checksum.clone()))
        .collect();
    assert_eq!(recorded, expected);

    let second = migrate::migrate(&mut client).await.expect("second migrate");
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.version, latest_version());
    assert_eq!(ledger(&client).await, expected);
    assert_eq!(
        migrate::check_current(&client).await.unwrap(),
        latest_version()
    );
    // The lock was released: a third run from another session does not wait forever.
    let mut other = connect(&url).await;
    let third = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        migrate::migrate(&mut other),
    )
    .await;
    assert!(
        third
            .expect("lock released")
            .expect("third migrate")
            .applied
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_migrations_apply_each_version_once() {
    let (_cluster, url) = start_cluster().await;
    let (mut a, mut b, mut c) = (
        connect(&url).await,
        connect(&url).await,
        connect(&url).await,
    );
    let (ra, rb, rc) = tokio::join!(
        migrate::migrate(&mut a),
        migrate::migrate(&mut b),
        migrate::migrate(&mut c)
    );
    let reports = [
        ra.expect("migrate a"),
        rb.expect("migrate b"),
        rc.expect("migrate c"),
    ];
    let mut applied: Vec<i32> = reports.iter().flat_map(|r| r.applied.clone()).collect();
    applied.sort_unstable();
    assert_eq!(
        applied,
        all_versions(),
        "each version applied by exactly one of the runs: {reports:?}"
    );
    assert!(reports.iter().all(|r| r.version == latest_version()));
    let check = connect(&url).await;
    assert_eq!(ledger(&check).await.len(), migrations().len());
    assert_eq!(
        count(&check, "select count(*) from pg_roles where rolname in ('deeprecall_user', 'deeprecall_admin')", &[])
            .await,
        2
    );
    assert_eq!(
        migrate::check_current(&check).await.unwrap(),
        latest_version()
    );
}

#[tokio::test]
async fn refuses_a_newer_database_and_an_edited_migration() {
    let (_cluster, url) = start_cluster().await;
    let mut client = connect(&url).await;
    migrate::migrate(&mut client).await.unwrap();

    client
        .batch_execute(
            "insert into deeprecall_schema_migrations (version, name, checksum) values (9999, '9999_future.sql', 'f')",
        )
        .await
        .unwrap();
    let known = latest_version();
    match migrate::migrate(&mut client).await {
        Err(e @ MigrateError::DatabaseNewer { found: 9999, .. }) => {
            assert!(matches!(e, MigrateError::DatabaseNewer { known: k, .. } if k == known));
            assert!(e.to_string().contains("newer"), "{e}");
        }
        other => panic!("expected DatabaseNewer, got {other:?}"),
    }
    assert!(matches!(
        migrate::check_current(&client).await,
        Err(MigrateError::DatabaseNewer { found: 9999, .. })
    ));
    // The refused run left the lock free and the ledger as it was.
    let other = connect(&url).await;
    assert_eq!(
        count(
            &other,
            "select count(*) from pg_locks where locktype = 'advisory'",
            &[]
        )
        .await,
        0
    );
    assert_eq!(ledger(&client).await.len(), migrations().len() + 1);

    client
        .batch_execute("delete from deeprecall_schema_migrations where version = 9999")
        .await
        .unwrap();
    client
        .batch_execute(
            "update deeprecall_schema_migrations set checksum = 'edited' where version = 1",
        )
        .await
        .unwrap();
    match migrate::migrate(&mut client).await {
        Err(e @ MigrateError::ChecksumMismatch { version: 1, .. }) => {
            assert!(e.to_string().contains("never be edited"), "{e}")
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(matches!(
        migrate::check_current(&client).await,
        Err(MigrateError::ChecksumMismatch { .. })
    ));
}

#[tokio::test]
async fn the_migrate_subcommand_migrates_and_refuses() {
    let (_cluster, url) = start_cluster().await;
    let cli = |url: &str| {
        Cli::try_parse_from(["deeprecall-sync", "migrate", "--database-url", url]).expect("parse")
    };
    deeprecall_sync::cli::run(cli(&url))
        .await
        .expect("migrate subcommand");
    let client = connect(&url).await;
    assert_eq!(
        migrate::check_current(&client).await.unwrap(),
        latest_version()
    );
    assert_eq!(
        count(
            &client,
            "select count(*) from pg_publication where pubname = 'deeprecall_sync'",
            &[]
        )
        .await,
        1
    );
    deeprecall_sync::cli::run(cli(&url))
        .await
        .expect("second run is a no-op");
    assert_eq!(ledger(&client).await.len(), migrations().len());

    client
        .batch_execute("insert into deeprecall_schema_migrations (version, name, checksum) values (9999, 'x', 'x')")
        .await
        .unwrap();
    let err = deeprecall_sync::cli::run(cli(&url))
        .await
        .expect_err("newer database");
    assert!(format!("{err:#}").contains("newer"), "{err:#}");
}
