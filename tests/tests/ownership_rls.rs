//! Tenant isolation: user B can neither read, change, delete nor reference user A's rows, through the API or
//! directly in SQL under the user role; a session without a user sees nothing.

use deeprecall_tests::{TestEnv, count, dump_table, error_code, insert, op, sha, statuses, xmins};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn through_the_api_b_cannot_touch_a_rows() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (work, note) = (Uuid::new_v4(), Uuid::new_v4());
    let (status, body) = env
        .batch(
            a,
            json!([
                insert("works", json!({"id": work, "title": "A's paper"})),
                insert(
                    "annotations",
                    json!({"id": note, "work_id": work, "body": "A's note"})
                ),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let before = (
        dump_table(&db, "works", &[]).await,
        dump_table(&db, "annotations", &[]).await,
    );
    let before_xmins = (xmins(&db, "works").await, xmins(&db, "annotations").await);

    // Update and delete of A's ids look exactly like update and delete of ids that do not exist.
    let (status, body) = env
        .batch(
            b,
            json!([
                op("update", "works", json!({"id": work, "title": "stolen"})),
                op("delete", "works", json!({"id": work})),
                op(
                    "update",
                    "annotations",
                    json!({"id": note, "body": "defaced"})
                ),
                op("delete", "annotations", json!({"id": note})),
                op(
                    "update",
                    "works",
                    json!({"id": Uuid::new_v4(), "title": "nobody's"})
                ),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), vec!["not_found"; 5]);
    assert_eq!(
        (
            dump_table(&db, "works", &[]).await,
            dump_table(&db, "annotations", &[]).await
        ),
        before
    );
    assert_eq!(
        (xmins(&db, "works").await, xmins(&db, "annotations").await),
        before_xmins
    );

    // Referencing A's work from B's row fails: keys include owner_id, so the reference cannot match.
    for row in [
        insert(
            "annotations",
            json!({"id": Uuid::new_v4(), "work_id": work}),
        ),
        insert("boards", json!({"id": Uuid::new_v4(), "work_id": work})),
    ] {
        let (status, body) = env.batch(b, json!([row])).await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (422, "foreign_key_violation"),
            "{body}"
        );
        assert_eq!(body["error"]["op_index"], 0);
        assert!(
            !body.to_string().contains(&a.to_string()),
            "the error must not reveal A: {body}"
        );
    }
    // ... also via an update that points B's own row at A's work.
    let own = Uuid::new_v4();
    let (status, body) = env
        .batch(
            b,
            json!([insert("annotations", json!({"id": own, "body": "mine"}))]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = env
        .batch(
            b,
            json!([op(
                "update",
                "annotations",
                json!({"id": own, "work_id": work})
            )]),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "foreign_key_violation"),
        "{body}"
    );
    // ... and an asset cannot point at A's blob.
    let (status, body) = env
        .coordinate(
            a,
            json!({"device_id": Uuid::new_v4(), "blobs": [{"sha256": sha(1), "size": 10}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = env
        .batch(
            b,
            json!([insert(
                "assets",
                json!({"id": Uuid::new_v4(), "sha256": sha(1)})
            )]),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "foreign_key_violation"),
        "{body}"
    );

    // An upsert by B with A's id creates B's own row and leaves A's alone; the same id then exists once per owner.
    let (status, body) = env
        .batch(
            b,
            json!([op(
                "upsert",
                "works",
                json!({"id": work, "title": "B's paper"})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"]);
    let rows = db
        .query(
            "select owner_id, title from works where id = $1 order by title",
            &[&work],
        )
        .await
        .unwrap();
    let rows: Vec<(Uuid, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        vec![(a, "A's paper".to_owned()), (b, "B's paper".to_owned())]
    );
    // A plain insert of A's note id by B neither collides with nor reveals A's row: it is B's own.
    let (status, body) = env
        .batch(
            b,
            json!([insert(
                "annotations",
                json!({"id": note, "body": "B's note"})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        count(
            &db,
            "select count(*) from annotations where id = $1",
            &[&note]
        )
        .await,
        2
    );
    // B deleting "work" removes only B's row.
    let (status, body) = env
        .batch(b, json!([op("delete", "works", json!({"id": work}))]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"]);
    let owners: Vec<Uuid> = db
        .query("select owner_id from works where id = $1", &[&work])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, vec![a]);
    assert_eq!(
        count(
            &db,
            "select count(*) from annotations where owner_id = $1",
            &[&a]
        )
        .await,
        1
    );
    let body: String = db
        .query_one(
            "select body from annotations where id = $1 and owner_id = $2",
            &[&note, &a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "A's note");
}

#[tokio::test]
async fn under_the_user_role_sql_is_confined_to_the_own_rows() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let work = Uuid::new_v4();
    let (status, body) = env
        .batch(
            a,
            json!([
                insert("works", json!({"id": work, "title": "A's paper"})),
                insert("activities", json!({"title": "A's course"})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = env
        .batch(b, json!([insert("works", json!({"title": "B's paper"}))]))
        .await;
    assert_eq!(status, 200, "{body}");

    let as_b = env.as_user(b).await;
    let visible: Vec<Uuid> = as_b
        .query("select owner_id from works", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(visible, vec![b], "B sees only B's rows");
    assert_eq!(
        count(&as_b, "select count(*) from works where id = $1", &[&work]).await,
        0
    );
    assert_eq!(
        count(&as_b, "select count(*) from activities", &[]).await,
        0
    );
    assert_eq!(
        count(
            &as_b,
            "select count(*) from sync_applied_ops where owner_id = $1",
            &[&a]
        )
        .await,
        0
    );
    assert_eq!(
        as_b.execute("update works set title = 'x' where id = $1", &[&work])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        as_b.execute("delete from works where id = $1", &[&work])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        as_b.execute("delete from activities", &[]).await.unwrap(),
        0
    );

    // Writing another owner's id is refused by the policy's WITH CHECK (insufficient_privilege, 42501).
    let err = as_b
        .execute(
            "insert into works (id, owner_id, title) values ($1, $2, 'forged')",
            &[&Uuid::new_v4(), &a],
        )
        .await
        .expect_err("insert with A's owner_id");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    let err = as_b
        .execute("update works set owner_id = $1", &[&a])
        .await
        .expect_err("moving B's row to A");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    let err = as_b
        .execute(
            "insert into sync_applied_ops (owner_id, op_id) values ($1, $2)",
            &[&a, &Uuid::new_v4()],
        )
        .await
        .expect_err("ledger row for A");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    // The default owner is B.
    as_b.execute("insert into works (title) values ('B again')", &[])
        .await
        .unwrap();
    assert_eq!(
        count(&db, "select count(*) from works where owner_id = $1", &[&b]).await,
        2
    );

    // The user role cannot switch RLS off or escape to a bypassing role.
    let err = as_b
        .batch_execute("set row_security = off; select * from works")
        .await;
    assert!(
        err.is_err(),
        "row_security=off must fail rather than bypass"
    );
    let role = db.query_one(
        "select rolsuper, rolbypassrls from pg_roles where rolname = 'deeprecall_user'",
        &[],
    );
    let role = role.await.unwrap();
    assert!(!role.get::<_, bool>(0) && !role.get::<_, bool>(1));

    // An empty app.user_id (what a pooled connection reads after a transaction-local set_config) sees nothing.
    let nobody = env.superuser().await;
    nobody
        .batch_execute(&format!(
            "begin; select set_config('app.user_id', '{a}', true); commit; set role deeprecall_user"
        ))
        .await
        .unwrap();
    let setting: String = nobody
        .query_one("select current_setting('app.user_id', true)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "", "the trap from the field notes is real here");
    for t in ["works", "activities", "sync_applied_ops"] {
        assert_eq!(
            count(&nobody, &format!("select count(*) from {t}"), &[]).await,
            0,
            "{t}"
        );
    }
    assert_eq!(
        nobody
            .execute("update works set title = 'x'", &[])
            .await
            .unwrap(),
        0
    );
    assert!(
        nobody
            .execute("insert into works (title) values ('orphan')", &[])
            .await
            .is_err()
    );

    // The user role with app.user_id never set sees nothing either.
    let unset = env.superuser().await;
    unset
        .batch_execute("set role deeprecall_user")
        .await
        .unwrap();
    let setting: Option<String> = unset
        .query_one("select current_setting('app.user_id', true)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, None);
    for t in ["works", "activities", "blobs_meta", "v_blob_inventory"] {
        assert_eq!(
            count(&unset, &format!("select count(*) from {t}"), &[]).await,
            0,
            "{t}"
        );
    }
    assert_eq!(unset.execute("delete from works", &[]).await.unwrap(), 0);
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 3);
}

#[tokio::test]
async fn rls_is_forced_on_every_synced_table_and_admin_only_reads() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let rows = db
        .query(
            "select c.relname::text, c.relrowsecurity, c.relforcerowsecurity,
                    (select count(*) from pg_policies p
                      where p.tablename = c.relname and p.policyname = 'owner_isolation'
                        and p.with_check is not null and 'deeprecall_user' = any(p.roles))
               from pg_publication_tables pt join pg_class c on c.relname = pt.tablename
              where pt.pubname = 'deeprecall_sync'
             union all
             select relname::text, relrowsecurity, relforcerowsecurity, 1 from pg_class
              where relname = 'sync_applied_ops'
             order by 1",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for expected in [
        "activities",
        "annotations",
        "assets",
        "blobs_meta",
        "boards",
        "device_blobs",
        "strokes",
        "works",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} is synced: {names:?}"
        );
    }
    for r in &rows {
        let name: String = r.get(0);
        assert!(
            r.get::<_, bool>(1) && r.get::<_, bool>(2),
            "{name}: RLS enabled and forced"
        );
        assert_eq!(
            r.get::<_, i64>(3),
            1,
            "{name}: owner policy with a WITH CHECK"
        );
    }

    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [a, b] {
        let (status, body) = env
            .batch(u, json!([insert("works", json!({"title": "t"}))]))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let admin = env.superuser().await;
    admin
        .batch_execute("set role deeprecall_admin")
        .await
        .unwrap();
    assert_eq!(
        count(&admin, "select count(*) from works", &[]).await,
        2,
        "admin reads every owner"
    );
    assert_eq!(
        count(
            &admin,
            "select count(distinct owner_id) from sync_applied_ops",
            &[]
        )
        .await,
        2
    );
    for sql in [
        "insert into works (owner_id, title) values (gen_random_uuid(), 'x')",
        "update works set title = 'x'",
        "delete from works",
    ] {
        let err = admin.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
}
