//! Op-ledger retention: entries past the retention are pruned in small transactions, recent ones stay, writers
//! are not blocked, and the pruning role can do nothing else.

use std::time::Duration;

use deeprecall_sync::db::ledger::prune_once;
use deeprecall_tests::{TestEnv, count, insert, statuses};
use serde_json::json;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);

/// Backdates `n` new ledger rows spread over `owners` to `age_days` ago.
async fn old_rows(db: &tokio_postgres::Client, owners: &[Uuid], n: i32, age_days: i32) {
    db.execute(
        "insert into sync_applied_ops (owner_id, op_id, applied_at)
         select ($1::uuid[])[1 + i % array_length($1::uuid[], 1)], gen_random_uuid(),
                now() - $3::int * interval '1 day' - i * interval '1 second'
           from generate_series(1, $2) as i",
        &[&owners, &n, &age_days],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn entries_past_the_retention_are_pruned_and_recent_ones_kept() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();

    // Recent ops through the API, and their op_ids in the ledger.
    let recent = vec![
        insert("works", json!({"title": "recent 1"})),
        insert("works", json!({"title": "recent 2"})),
    ];
    let (status, body) = env.batch(user, json!(recent)).await;
    assert_eq!(status, 200, "{body}");
    // An op applied 40 days ago (backdated), and 2,500 more old rows of several owners: more than two chunks.
    let old = insert("works", json!({"title": "old"}));
    let (status, body) = env.batch(user, json!([old.clone()])).await;
    assert_eq!(status, 200, "{body}");
    db.execute(
        "update sync_applied_ops set applied_at = now() - interval '40 days' where op_id = $1::text::uuid",
        &[&old["op_id"].as_str().unwrap()],
    )
    .await
    .unwrap();
    let owners: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
    old_rows(&db, &owners, 2500, 31).await;
    // Just inside the retention: kept.
    old_rows(&db, &owners, 10, 29).await;
    let total = count(&db, "select count(*) from sync_applied_ops", &[]).await;
    assert_eq!(total, 2 + 1 + 2500 + 10);

    let deleted = prune_once(&env.state.pool, 30 * DAY, 1000)
        .await
        .expect("prune");
    assert_eq!(deleted, 2501);
    assert_eq!(
        count(
            &db,
            "select count(*) from sync_applied_ops where applied_at < now() - interval '30 days'",
            &[]
        )
        .await,
        0
    );
    assert_eq!(
        count(&db, "select count(*) from sync_applied_ops", &[]).await,
        12
    );
    // Nothing left to do: a second pass deletes nothing.
    assert_eq!(
        prune_once(&env.state.pool, 30 * DAY, 1000).await.unwrap(),
        0
    );

    // Recent op_ids are still duplicates; the pruned one is applied again (the documented cost of retention).
    let (_, body) = env.batch(user, json!(recent)).await;
    assert_eq!(statuses(&body), ["duplicate", "duplicate"]);
    let (_, body) = env.batch(user, json!([old])).await;
    assert_eq!(statuses(&body), ["applied"]);
}

#[tokio::test]
async fn pruning_a_large_backlog_does_not_block_writers() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let owners: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    old_rows(&db, &owners, 30_000, 60).await;
    let user = owners[0];
    let pool = env.state.pool.clone();
    let pruner = tokio::spawn(async move { prune_once(&pool, 30 * DAY, 1000).await });
    // Batches of the same owners, into the same ledger, while the backlog is pruned: each one commits.
    let mut written = 0;
    while !pruner.is_finished() || written < 5 {
        let (status, body) = env
            .batch(user, json!([insert("works", json!({"title": "during"}))]))
            .await;
        assert_eq!(status, 200, "{body}");
        written += 1;
    }
    assert_eq!(pruner.await.unwrap().unwrap(), 30_000);
    assert_eq!(
        count(&db, "select count(*) from sync_applied_ops", &[]).await,
        written
    );
}

#[tokio::test]
async fn the_server_prunes_in_the_background() {
    let (cluster, url) = deeprecall_tests::start_cluster().await;
    let mut options =
        deeprecall_sync::cli::ServerOptions::new(url.clone(), deeprecall_tests::test_auth());
    options.op_ledger_retention = DAY;
    options.op_ledger_prune_interval = Duration::from_millis(200);
    options.pool_size = 4;
    let server = deeprecall_sync::cli::start_server(options)
        .await
        .expect("server");
    let db = deeprecall_tests::connect(&url).await;
    let owners = [Uuid::new_v4()];
    old_rows(&db, &owners, 1500, 2).await;
    db.execute(
        "insert into sync_applied_ops (owner_id, op_id) values ($1, gen_random_uuid())",
        &[&owners[0]],
    )
    .await
    .unwrap();
    let mut left = 0;
    for _ in 0..100 {
        left = count(&db, "select count(*) from sync_applied_ops", &[]).await;
        if left == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 1, "the background pruner left old rows");
    server.shutdown().await;
    drop(cluster);
}

#[tokio::test]
async fn the_pruning_role_can_only_read_and_delete_the_ledger() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    db.batch_execute("set role deeprecall_maintenance")
        .await
        .unwrap();
    for sql in [
        "select count(*) from works",
        "select count(*) from sync_clients",
        "insert into sync_applied_ops (owner_id, op_id) values (gen_random_uuid(), gen_random_uuid())",
        "update sync_applied_ops set applied_at = now()",
        "delete from annotations",
    ] {
        let err = db.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    db.batch_execute(
        "select count(*) from sync_applied_ops; delete from sync_applied_ops where false",
    )
    .await
    .expect("the pruner's own statements");
}
