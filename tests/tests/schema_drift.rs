//! What an operator's DDL does to the write path: columns Postgres assigns, constraints beyond keys, and a schema
//! changed by hand (without `migrate` and its notification) under a running server.

use std::time::Duration;

use deeprecall_tests::{TestEnv, count, error_code, insert, statuses};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// Asserts the batch was refused with `(status, code)`, at its op 1.
fn refused_at_op_1(status: u16, body: &Value, expect: (u16, &str)) {
    assert_eq!((status, error_code(body)), expect, "{body}");
    assert_eq!(body["error"]["op_index"], 1, "{body}");
}

/// Sends `ops` as `user` until the answer is not `unknown_column` (the server reloads its catalog on the
/// notification, asynchronously), and returns it.
async fn batch_once_known(env: &TestEnv, user: Uuid, ops: Value) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = env.batch(user, ops.clone()).await;
        if error_code(&body) != "unknown_column" {
            return (status.as_u16(), body);
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `generated always as identity` column is Postgres's to fill: a value for it was a 500 (`428C9` raised while
/// the statement was prepared, so without `op_index`). Now it is `422 read_only_column` at its op, and a row
/// without it gets Postgres's number.
#[tokio::test]
async fn an_identity_column_is_read_only() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.ddl(
        "alter table works add column serial bigint generated always as identity",
        true,
    )
    .await;
    let w = Uuid::new_v4();
    let (status, body) = batch_once_known(
        &env,
        user,
        json!([
            insert("works", json!({"id": Uuid::new_v4(), "title": "fine"})),
            insert(
                "works",
                json!({"id": w, "title": "numbered by hand", "serial": 7})
            ),
        ]),
    )
    .await;
    refused_at_op_1(status, &body, (422, "read_only_column"));
    let db = env.superuser().await;
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);

    let (status, body) = env
        .batch(
            user,
            json!([insert("works", json!({"id": w, "title": "numbered"}))]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let serial: i64 = db
        .query_one("select serial from works where id = $1", &[&w])
        .await
        .unwrap()
        .get(0);
    assert!(serial >= 1);
}

/// An exclusion constraint (no two overlapping spans) refuses a row as a unique key does: `409 conflict` at the
/// op, not a 500.
#[tokio::test]
async fn an_exclusion_violation_is_a_conflict() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.ddl(
        "alter table works add column span int4range;
         alter table works add constraint works_span_free exclude using gist (span with &&)",
        true,
    )
    .await;
    let (status, body) = batch_once_known(
        &env,
        user,
        json!([
            insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": "a", "span": "[1,10)"})
            ),
            insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": "b", "span": "[5,20)"})
            ),
        ]),
    )
    .await;
    refused_at_op_1(status, &body, (409, "conflict"));
    let db = env.superuser().await;
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);
}

/// A column dropped by hand (no `migrate`, no notification) stayed in the server's catalog: a batch naming it got a
/// 500 (`42703`) until some other request happened to name an unknown table. Now the server reloads and answers
/// what it answers for any unknown column; batches that do not name it were never affected.
#[tokio::test]
async fn a_column_dropped_without_a_notification_is_an_unknown_column() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.ddl("alter table works add column shelf text", true)
        .await;
    let (status, body) = batch_once_known(
        &env,
        user,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "a", "shelf": "x"})
        )]),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    env.ddl("alter table works drop column shelf", false).await;
    let (status, body) = env
        .batch(
            user,
            json!([
                insert("works", json!({"id": Uuid::new_v4(), "title": "b"})),
                insert(
                    "works",
                    json!({"id": Uuid::new_v4(), "title": "c", "shelf": "y"})
                ),
            ]),
        )
        .await;
    refused_at_op_1(status.as_u16(), &body, (422, "unknown_column"));
    let (status, body) = env
        .batch(
            user,
            json!([insert("works", json!({"id": Uuid::new_v4(), "title": "d"}))]),
        )
        .await;
    assert_eq!(statuses(&body), ["applied"], "{status} {body}");
    let db = env.superuser().await;
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 2);
}

/// A column made `generated always as identity` by hand, before the server has seen it: Postgres refuses the value
/// (428C9), and the answer names the op. (A statement Postgres refuses while preparing it is now attributed to its
/// op too; here the refusal comes when the cached statement runs.)
#[tokio::test]
async fn a_column_made_identity_by_hand_is_refused_at_its_op() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.ddl(
        "alter table works add column num bigint not null default 0",
        true,
    )
    .await;
    let (status, body) = batch_once_known(
        &env,
        user,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "a", "num": 1})
        )]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    env.ddl(
        "alter table works alter column num drop default, alter column num add generated always as identity",
        false,
    )
    .await;
    let (status, body) = env
        .batch(
            user,
            json!([
                insert("works", json!({"id": Uuid::new_v4(), "title": "b"})),
                insert(
                    "works",
                    json!({"id": Uuid::new_v4(), "title": "c", "num": 2})
                ),
            ]),
        )
        .await;
    refused_at_op_1(status.as_u16(), &body, (422, "read_only_column"));
}

/// A trigger that names a column the table does not have fails every insert with 42703, whatever the catalog: that
/// is the operator's fault, answered as a logged 500, not as a `503 schema_changed` the client would retry for ever.
#[tokio::test]
async fn a_trigger_naming_a_missing_column_is_a_server_error_not_a_retry() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.ddl(
        "create function bad_trg() returns trigger language plpgsql as
           $$ begin if NEW.no_such_col is null then null; end if; return NEW; end $$;
         create trigger bad before insert on works for each row execute function bad_trg();",
        false,
    )
    .await;
    for _ in 0..2 {
        let (status, body) = env
            .batch(
                user,
                json!([insert("works", json!({"id": Uuid::new_v4(), "title": "a"}))]),
            )
            .await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (500, "internal"),
            "{body}"
        );
    }
}

/// A reload already under way when DDL commits may have read the catalog before it. A request that missed a name
/// after the DDL and waited for that reload was handed its result as if it had seen the change: a column just
/// dropped by hand was then a 500 (the "fresh" catalog still had it), and one just added an `unknown_column`. It
/// happened in CI when the replicator's reload (a table's new column list) crossed a test's `drop column`. Now only
/// a reload that began after the miss answers it. Here a task reloads without pause, so the DDL nearly always
/// commits during a reload.
#[tokio::test]
async fn a_miss_is_answered_only_by_a_reload_that_began_after_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = TestEnv::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (catalog, stop, db) = (
            env.state.catalog.clone(),
            stop.clone(),
            env.superuser().await,
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                catalog.refresh(&db).await.unwrap();
            }
        })
    };
    for round in 0..5 {
        let column = format!("drift_{round}");
        env.ddl(
            &format!("alter table works add column {column} text"),
            false,
        )
        .await;
        let seen = env
            .state
            .catalog
            .refresh_on_miss(&env.state.pool)
            .await
            .unwrap();
        let works = seen.table("works").unwrap();
        assert!(
            works.column(&column).is_some(),
            "round {round}: {column} not seen"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reloader.await.unwrap();
}
