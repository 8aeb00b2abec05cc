//! The admin API (`GET /v1/admin/blobs` with filters, sorting, paging and aggregates; `GET /v1/admin/stats`) and
//! the embedded admin page.

use std::collections::BTreeSet;

use deeprecall_tests::admin::{Inventory, keys, seed_inventory};
use deeprecall_tests::{TestEnv, error_code, sha};
use serde_json::{Value, json};
use uuid::Uuid;

async fn admin_get(env: &TestEnv, query: &str) -> Value {
    let token = env.admin_token(Uuid::new_v4());
    let (status, body) = env
        .get(&format!("/v1/admin/blobs{query}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

fn shas(page: &Value) -> Vec<String> {
    keys(page).into_iter().map(|(_, s)| s).collect()
}

fn set(items: &[u8]) -> BTreeSet<String> {
    items.iter().map(|&i| sha(i)).collect()
}

#[tokio::test]
async fn only_admins_get_in_and_the_check_comes_first() {
    let env = TestEnv::start().await;
    seed_inventory(&env).await;
    let user = env.token(Uuid::new_v4());
    for path in [
        "/v1/admin/blobs",
        "/v1/admin/blobs?group_by=owner_id",
        "/v1/admin/blobs?limit=nonsense&sort=nothing",
        "/v1/admin/stats",
    ] {
        let (status, body) = env.get(path, Some(&user)).await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (403, "forbidden"),
            "{path}: {body}"
        );
        let (status, body) = env.get(path, None).await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (401, "missing_token"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn filters_select_the_right_blobs() {
    let env = TestEnv::start().await;
    let Inventory {
        alice,
        bob,
        laptop,
        phone,
        desktop,
    } = seed_inventory(&env).await;
    let got = |q: &'static str| {
        let env = &env;
        async move {
            shas(&admin_get(env, q).await)
                .into_iter()
                .collect::<BTreeSet<_>>()
        }
    };
    assert_eq!(got("").await, set(&[1, 2, 3, 4, 5, 6]));
    assert_eq!(
        shas(&admin_get(&env, &format!("?owner_id={bob}")).await)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        set(&[5, 6])
    );
    let by_device = |d: Uuid| format!("?device_id={d}");
    assert_eq!(
        shas(&admin_get(&env, &by_device(laptop)).await)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        set(&[1, 2]),
        "present on the laptop (sha(3) is reported missing there)"
    );
    assert_eq!(
        shas(&admin_get(&env, &by_device(phone)).await)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        set(&[1])
    );
    assert_eq!(shas(&admin_get(&env, &by_device(desktop)).await).len(), 2);
    assert_eq!(got("?mime=application/pdf").await, set(&[1, 3, 5]));
    assert_eq!(got("?mime=application/*").await, set(&[1, 3, 5, 6]));
    assert_eq!(
        got("?mime=").await,
        set(&[4]),
        "empty mime: blobs without one"
    );
    assert_eq!(got("?missing=true").await, set(&[3, 4]));
    assert_eq!(got("?missing=false").await, set(&[1, 2, 5, 6]));
    assert_eq!(
        got("?q=ATTENTION").await,
        set(&[1]),
        "case-insensitive filename"
    );
    assert_eq!(got("?q=epub").await, set(&[6]), "MIME type");
    assert_eq!(got("?q=0505").await, set(&[5]), "sha256 prefix");
    // LIKE wildcards in the search are literal characters.
    assert_eq!(got("?q=%25").await, set(&[3]));
    assert_eq!(got("?q=_").await, set(&[2, 3, 5]));
    let owner_prefix = &alice.to_string()[..8];
    assert_eq!(
        shas(&admin_get(&env, &format!("?q={owner_prefix}")).await)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        set(&[1, 2, 3, 4])
    );
    // Filters combine.
    assert_eq!(
        shas(
            &admin_get(
                &env,
                &format!("?owner_id={alice}&mime=application/pdf&missing=true")
            )
            .await
        ),
        vec![sha(3)]
    );
    let counted = admin_get(&env, "?mime=application/*&count=true&limit=1").await;
    assert_eq!(counted["total"], 4, "{counted}");
    assert_eq!(counted["items"].as_array().unwrap().len(), 1);
    assert!(admin_get(&env, "").await.get("total").is_none());
}

#[tokio::test]
async fn every_sort_pages_through_everything_once_in_order() {
    let env = TestEnv::start().await;
    seed_inventory(&env).await;
    let full = admin_get(&env, "?limit=1000").await;
    let items = full["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 6);
    let sorts = [
        "owner_id",
        "sha256",
        "size",
        "stored_bytes",
        "device_count",
        "asset_count",
        "filename",
        "mime",
        "last_seen_at",
        "created_at",
        "updated_at",
    ];
    for sort in sorts {
        for order in ["asc", "desc"] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            let mut pages = 0;
            loop {
                let mut q = format!("?sort={sort}&order={order}&limit=2");
                if let Some(c) = &cursor {
                    q.push_str(&format!("&cursor={c}"));
                }
                let page = admin_get(&env, &q).await;
                seen.extend(page["items"].as_array().unwrap().iter().cloned());
                pages += 1;
                assert!(pages <= 4, "{sort} {order}: paging does not end");
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => break,
                }
            }
            let got: Vec<(String, String)> = keys(&json!({ "items": seen }));
            let unique: BTreeSet<_> = got.iter().collect();
            assert_eq!(unique.len(), 6, "{sort} {order}: {got:?}");
            // The pages, concatenated, are sorted by (key, owner_id, sha256) in the requested direction, with a
            // missing text or time sorting as the smallest value.
            let key = |v: &Value| -> (String, String, String) {
                let k = match &v[sort] {
                    Value::Null => String::new(),
                    Value::Number(n) => format!("{:020}", n.as_i64().unwrap()),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (
                    k,
                    v["owner_id"].as_str().unwrap().to_owned(),
                    v["sha256"].as_str().unwrap().to_owned(),
                )
            };
            let keys: Vec<_> = seen.iter().map(key).collect();
            let mut expected = keys.clone();
            expected.sort();
            if order == "desc" {
                expected.reverse();
            }
            assert_eq!(keys, expected, "{sort} {order}");
        }
    }
    // Largest first, concretely.
    let by_size = admin_get(&env, "?sort=size&order=desc&limit=3").await;
    assert_eq!(shas(&by_size), vec![sha(3), sha(1), sha(6)]);
}

#[tokio::test]
async fn bad_queries_are_refused_clearly() {
    let env = TestEnv::start().await;
    seed_inventory(&env).await;
    let admin = env.admin_token(Uuid::new_v4());
    let size_cursor = admin_get(&env, "?sort=size&limit=1").await["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = [
        ("?limit=0", "invalid_limit"),
        ("?limit=1001", "invalid_limit"),
        ("?sort=owner", "invalid_sort"),
        ("?order=sideways", "invalid_order"),
        ("?group_by=sha256", "invalid_group_by"),
        ("?group_by=mime&sort=size", "invalid_query"),
        ("?cursor=bm9wZQ", "invalid_cursor"),
        ("?missing=maybe", "invalid_query"),
        ("?owner_id=alice", "invalid_query"),
        ("?colour=blue", "invalid_query"),
        // Postgres's text cannot hold U+0000: refused before the query, naming the parameter.
        ("?q=a%00b", "invalid_query"),
        ("?mime=%00", "invalid_query"),
    ];
    for (q, code) in cases {
        let (status, body) = env.get(&format!("/v1/admin/blobs{q}"), Some(&admin)).await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (422, code),
            "{q}: {body}"
        );
    }
    // A cursor only continues the order it came from.
    let (status, body) = env
        .get(
            &format!("/v1/admin/blobs?sort=filename&cursor={size_cursor}"),
            Some(&admin),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "invalid_cursor"),
        "{body}"
    );
    let (status, body) = env
        .get(
            &format!("/v1/admin/blobs?sort=size&order=desc&cursor={size_cursor}"),
            Some(&admin),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "invalid_cursor"),
        "{body}"
    );
    let long = "x".repeat(201);
    let (status, body) = env
        .get(&format!("/v1/admin/blobs?q={long}"), Some(&admin))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "invalid_query"),
        "{body}"
    );
}

#[tokio::test]
async fn cursors_of_the_default_order_are_the_ones_issued_before() {
    let env = TestEnv::start().await;
    let inv = seed_inventory(&env).await;
    // GET /v1/blobs (the user's own inventory) issues `owner/sha256` cursors; the admin default order takes them.
    let (status, own) = env
        .get("/v1/blobs?limit=2", Some(&env.token(inv.alice)))
        .await;
    assert_eq!(status, 200, "{own}");
    let cursor = own["next_cursor"].as_str().unwrap();
    let rest = admin_get(&env, &format!("?owner_id={}&cursor={cursor}", inv.alice)).await;
    let first: Vec<String> = shas(&own);
    let mut all = first.clone();
    all.extend(shas(&rest));
    assert_eq!(all, vec![sha(1), sha(2), sha(3), sha(4)]);
}

#[tokio::test]
async fn aggregates_per_owner_device_and_mime_match_the_tables() {
    let env = TestEnv::start().await;
    let inv = seed_inventory(&env).await;

    let owners = admin_get(&env, "?group_by=owner_id").await;
    assert_eq!(owners["group_by"], "owner_id");
    assert_eq!(owners["more"], false);
    assert_eq!(
        owners["totals"],
        json!({"blobs": 6, "bytes": 7210, "stored_bytes": 3200, "owners": 2, "devices": 3,
               "missing_everywhere": 2}),
    );
    // Ordered by stored bytes, largest first: alice 1000*2 + 200 = 2200, bob 300 + 700 = 1000.
    assert_eq!(
        owners["groups"],
        json!([
            {"owner_id": inv.alice, "blobs": 4, "bytes": 6210, "stored_bytes": 2200, "devices": 2,
             "missing_everywhere": 2},
            {"owner_id": inv.bob, "blobs": 2, "bytes": 1000, "stored_bytes": 1000, "devices": 1,
             "missing_everywhere": 0},
        ])
    );
    // The same figures straight from the tables (superuser, no view), as an oracle.
    let db = env.superuser().await;
    for g in owners["groups"].as_array().unwrap() {
        let owner: Uuid = g["owner_id"].as_str().unwrap().parse().unwrap();
        let row = db
            .query_one(
                "select (select count(*) from blobs_meta where owner_id = $1),
                        (select coalesce(sum(size), 0)::bigint from blobs_meta where owner_id = $1),
                        (select coalesce(sum(m.size), 0)::bigint from device_blobs d
                           join blobs_meta m using (owner_id, sha256) where d.owner_id = $1 and d.present),
                        (select count(distinct device_id) from device_blobs where owner_id = $1 and present)",
                &[&owner],
            )
            .await
            .unwrap();
        assert_eq!(g["blobs"], row.get::<_, i64>(0));
        assert_eq!(g["bytes"], row.get::<_, i64>(1));
        assert_eq!(g["stored_bytes"], row.get::<_, i64>(2));
        assert_eq!(g["devices"], row.get::<_, i64>(3));
    }

    // By bytes present, largest first; the phone and the desktop tie at 1000 bytes and go by blob count.
    let devices = admin_get(&env, "?group_by=device_id").await;
    assert_eq!(
        devices["groups"],
        json!([
            {"owner_id": inv.alice, "device_id": inv.laptop, "blobs": 2, "bytes": 1200, "missing": 1},
            {"owner_id": inv.bob, "device_id": inv.desktop, "blobs": 2, "bytes": 1000, "missing": 0},
            {"owner_id": inv.alice, "device_id": inv.phone, "blobs": 1, "bytes": 1000, "missing": 1},
        ])
    );

    let mimes = admin_get(&env, "?group_by=mime").await;
    assert_eq!(
        mimes["groups"],
        json!([
            {"mime": "application/pdf", "blobs": 3, "bytes": 6300, "stored_bytes": 2300, "missing_everywhere": 1},
            {"mime": "application/epub+zip", "blobs": 1, "bytes": 700, "stored_bytes": 700, "missing_everywhere": 0},
            {"mime": "image/png", "blobs": 1, "bytes": 200, "stored_bytes": 200, "missing_everywhere": 0},
            {"mime": null, "blobs": 1, "bytes": 10, "stored_bytes": 0, "missing_everywhere": 1},
        ])
    );

    // Filters narrow the aggregates too; limit caps the groups and says there are more.
    let bobs = admin_get(&env, &format!("?group_by=mime&owner_id={}", inv.bob)).await;
    assert_eq!(bobs["totals"]["blobs"], 2);
    assert_eq!(bobs["groups"].as_array().unwrap().len(), 2);
    let one = admin_get(&env, "?group_by=owner_id&limit=1").await;
    assert_eq!(one["groups"].as_array().unwrap().len(), 1);
    assert_eq!(one["more"], true);
    assert_eq!(one["totals"]["blobs"], 6, "totals cover every group");
    let none = admin_get(&env, "?group_by=mime&q=no-such-file").await;
    assert_eq!(
        none,
        json!({"group_by": "mime", "groups": [], "more": false, "totals":
               {"blobs": 0, "bytes": 0, "stored_bytes": 0, "owners": 0, "devices": 0, "missing_everywhere": 0}})
    );
}

#[tokio::test]
async fn stats_report_the_slot_stream_and_pool() {
    let env = TestEnv::start().await;
    let admin = env.admin_token(Uuid::new_v4());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        let (status, body) = env.get("/v1/admin/stats", Some(&admin)).await;
        assert_eq!(status, 200, "{body}");
        // A slot being created is already active, but has no confirmed position until it is consistent.
        let sample = &body["slot"]["sample"];
        if sample["active"] == true && sample["lag_bytes"].is_i64() {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never active: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(body["database_up"], true);
    assert_eq!(body["slot"]["name"], env.state.slot_name.as_str());
    assert_eq!(body["slot"]["exists"], true);
    let sample = &body["slot"]["sample"];
    assert_eq!(sample["wal_status"], "reserved");
    assert!(sample["lag_bytes"].as_i64().unwrap() >= 0, "{body}");
    assert!(sample["current_wal_lsn"].as_str().unwrap().contains('/'));
    assert_eq!(body["pool"]["max_size"], 8);
    assert_eq!(body["stream"]["generation"], 1);
    for field in [
        "connections",
        "users",
        "subscriptions",
        "changes_total",
        "transactions_total",
    ] {
        assert!(body["stream"][field].is_u64(), "{field}: {body}");
    }
    assert!(body["sampled_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
}

#[tokio::test]
async fn the_page_is_embedded_and_locked_down() {
    let env = TestEnv::start().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .get(format!("{}/admin", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let header = |r: &reqwest::Response, h: &str| {
        r.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    let csp = header(&resp, "content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(header(&resp, "x-content-type-options"), "nosniff");
    let html = resp.text().await.unwrap();
    assert!(
        html.contains(r#"<script type="module" src="admin/app.js">"#),
        "{html}"
    );
    assert!(
        !html.contains("<script>"),
        "no inline script (the CSP forbids it)"
    );

    let js = http
        .get(format!("{}/admin/app.js", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&js, "content-type"),
        "text/javascript; charset=utf-8"
    );
    let js = js.text().await.unwrap();
    assert!(js.contains("sessionStorage") && !js.contains("localStorage"));
    assert!(
        !js.contains(".innerHTML"),
        "server data is inserted as text only"
    );
    let css = http
        .get(format!("{}/admin/app.css", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&css, "content-type"), "text/css; charset=utf-8");

    let slash = http
        .get(format!("{}/admin/", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(slash.status(), 308);
    assert_eq!(header(&slash, "location"), "../admin");
}

#[tokio::test]
async fn a_bi_login_role_in_deeprecall_admin_reads_the_view_and_writes_nothing() {
    // Login roles are cluster-wide: a cluster of its own, with the database named as in docs/operations.md.
    let env = TestEnv::start_with(deeprecall_tests::EnvOptions {
        own_cluster: true,
        ..Default::default()
    })
    .await;
    seed_inventory(&env).await;
    let db = env.superuser().await;
    // What docs/operations.md tells an operator to run for a BI tool.
    db.batch_execute(
        "create role bi_reader login password 'bi-secret';
         grant connect on database deeprecall to bi_reader;
         grant deeprecall_admin to bi_reader;
         create role stranger login password 'stranger-secret';",
    )
    .await
    .unwrap();
    let url = |user: &str, password: &str| {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/deeprecall",
            env.db.cluster().port()
        )
    };
    let bi = deeprecall_tests::connect(&url("bi_reader", "bi-secret")).await;
    let row = bi
        .query_one(
            "select count(*), count(distinct owner_id), sum(stored_bytes)::bigint from v_blob_inventory",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (6, 2, 3200)
    );
    let err = bi
        .execute("delete from blobs_meta", &[])
        .await
        .expect_err("deeprecall_admin is read-only");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
    // Without the membership, the view is not readable at all.
    let stranger = deeprecall_tests::connect(&url("stranger", "stranger-secret")).await;
    let err = stranger
        .query_one("select count(*) from v_blob_inventory", &[])
        .await
        .expect_err("no membership, no access");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{err}"
    );
}

#[tokio::test]
async fn the_servers_login_role_reads_and_deletes_nothing_until_it_switches_role() {
    // A production login role (docs/operations.md): not a superuser, a member of the three group roles, inheriting
    // them (the default). Unswitched, a policy "using (true)" for deeprecall_admin or deeprecall_maintenance applied
    // to it: it read every user's rows and could delete every user's ledger rows.
    let env = TestEnv::start_with(deeprecall_tests::EnvOptions {
        own_cluster: true,
        ..Default::default()
    })
    .await;
    seed_inventory(&env).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for user in [alice, bob] {
        // Without client_id: one ledger row per op.
        let (status, _) = env
            .batch(
                user,
                json!([deeprecall_tests::insert(
                    "works",
                    json!({"title": "secret"})
                )]),
            )
            .await;
        assert_eq!(status, 200);
    }
    let db = env.superuser().await;
    db.batch_execute(
        "create role service login password 'service-secret';
         grant connect on database deeprecall to service;
         grant deeprecall_user, deeprecall_admin, deeprecall_maintenance to service;
         create role bi_reader login password 'bi-secret';
         grant connect on database deeprecall to bi_reader;
         grant deeprecall_admin to bi_reader;",
    )
    .await
    .unwrap();
    let url = |user: &str, password: &str| {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/deeprecall",
            env.db.cluster().port()
        )
    };
    let service = deeprecall_tests::connect(&url("service", "service-secret")).await;
    let n = |sql: &str| format!("select count(*) from {sql}");
    for table in [
        "works",
        "blobs_meta",
        "sync_applied_ops",
        "sync_clients",
        "v_blob_inventory",
    ] {
        let row = service.query_one(&n(table), &[]).await.unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            0,
            "unswitched, the login role read {table}"
        );
    }
    let deleted = service
        .execute("delete from sync_applied_ops", &[])
        .await
        .unwrap();
    assert_eq!(deleted, 0, "unswitched, the login role deleted ledger rows");
    // Switched, each role does what it is for.
    service
        .batch_execute("set role deeprecall_admin")
        .await
        .unwrap();
    let row = service.query_one(&n("works"), &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    service
        .batch_execute("set role deeprecall_maintenance")
        .await
        .unwrap();
    let row = service
        .query_one(&n("sync_applied_ops"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    service.batch_execute("reset role").await.unwrap();
    // A reporting role that cannot act as a user still reads every owner without switching.
    let bi = deeprecall_tests::connect(&url("bi_reader", "bi-secret")).await;
    let row = bi.query_one(&n("works"), &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    let row = bi.query_one(&n("v_blob_inventory"), &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 6);
}
