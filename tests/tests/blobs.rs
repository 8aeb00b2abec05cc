//! Blob coordination, the per-caller BlobHandle, the admin inventory and the figures of `v_blob_inventory`.

use deeprecall_tests::{TestEnv, count, dump_table, error_code, insert, sha, statuses, xmins};
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn sha256_must_be_64_lowercase_hex() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let bad = [
        sha(0xab).to_uppercase(),
        sha(1)[..63].to_owned(),
        format!("{}0", sha(1)),
        format!("{}g", &sha(1)[..63]),
        format!("{} ", &sha(1)[..63]),
        String::new(),
    ];
    for s in &bad {
        // The bad hash is the second blob: the first (valid) one must not be written either.
        let body = json!({"device_id": Uuid::new_v4(), "blobs": [
            {"sha256": sha(7), "size": 1}, {"sha256": s, "size": 1}]});
        let (status, resp) = env.coordinate(user, body).await;
        assert_eq!(
            (status.as_u16(), error_code(&resp)),
            (422, "invalid_sha256"),
            "{s:?}: {resp}"
        );
        assert_eq!(resp["error"]["blob_index"], 1, "{resp}");
    }
    assert_eq!(count(&db, "select count(*) from blobs_meta", &[]).await, 0);
    assert_eq!(
        count(&db, "select count(*) from device_blobs", &[]).await,
        0
    );

    for path in ["NOTHEX", &sha(0xab).to_uppercase(), &sha(1)[..63]] {
        let (status, resp) = env.get(&format!("/v1/blobs/{path}"), Some(&token)).await;
        assert_eq!(
            (status.as_u16(), error_code(&resp)),
            (422, "invalid_sha256"),
            "{path}: {resp}"
        );
    }
    // Valid but unknown: 404.
    let (status, resp) = env
        .get(&format!("/v1/blobs/{}", sha(9)), Some(&token))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (404, "not_found"),
        "{resp}"
    );

    // Other invalid reports name their blob too.
    let cases = [
        (json!({"sha256": sha(2), "size": -1}), 400, "invalid_value"),
        (
            json!({"sha256": sha(2), "size": 1, "health": "great"}),
            400,
            "invalid_value",
        ),
        (
            json!({"sha256": sha(7), "size": 1}),
            422,
            "duplicate_sha256",
        ),
        // Postgres refuses these too, but its answer named neither the blob nor the field.
        (
            json!({"sha256": sha(2), "size": 1, "page_count": -5}),
            400,
            "invalid_value",
        ),
        (
            json!({"sha256": sha(2), "size": 1, "image_height": -1}),
            400,
            "invalid_value",
        ),
        (
            json!({"sha256": sha(2), "size": 1, "path": "/a\u{0}b"}),
            400,
            "invalid_value",
        ),
        (
            json!({"sha256": sha(2), "size": 1, "mime": "text/\u{0}"}),
            400,
            "invalid_value",
        ),
    ];
    // A value that is none of its field's forms is 400; a blob the request names twice, 422.
    for (blob, want, code) in cases {
        let body =
            json!({"device_id": Uuid::new_v4(), "blobs": [{"sha256": sha(7), "size": 1}, blob]});
        let (status, resp) = env.coordinate(user, body).await;
        assert_eq!((status.as_u16(), error_code(&resp)), (want, code), "{resp}");
        assert_eq!(resp["error"]["blob_index"], 1, "{resp}");
    }
    let (status, resp) = env
        .coordinate(user, json!({"device_id": "phone", "blobs": []}))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "invalid_request"),
        "{resp}"
    );
    // The nil UUID is a placeholder, not a device's id.
    let (status, resp) = env
        .coordinate(
            user,
            json!({"device_id": Uuid::nil(), "blobs": [{"sha256": sha(2), "size": 1}]}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (400, "invalid_value"),
        "{resp}"
    );

    // Writes that bypass coordination are held to the same form, checked by the server before the database (the
    // table's check constraint stays as the last line).
    let (status, resp) = env
        .batch(
            user,
            json!([insert(
                "blobs_meta",
                json!({"sha256": sha(0xcd).to_uppercase(), "size": 1})
            )]),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "invalid_sha256"),
        "{resp}"
    );
    assert_eq!(resp["error"]["op_index"], 0, "{resp}");
    assert_eq!(count(&db, "select count(*) from blobs_meta", &[]).await, 0);
}

/// A 9,000-character sha256 was a 500 ("index row size exceeds maximum") when written through /v1/batch into a
/// table whose sha256 is indexed without a check constraint (device_blobs, assets). Every path now answers 4xx
/// before the database, and nothing is written.
#[tokio::test]
async fn an_oversized_sha256_is_a_client_error_on_every_path() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    // Random hex: incompressible, so the index entry really is too large (a run of one letter would compress and
    // fit, and then fail only on the foreign key).
    let huge: String = (0..282)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect::<String>()[..9000]
        .to_owned();
    let device = Uuid::new_v4();
    for (table, row) in [
        (
            "device_blobs",
            json!({"id": Uuid::new_v4(), "device_id": device, "sha256": huge}),
        ),
        ("assets", json!({"id": Uuid::new_v4(), "sha256": huge})),
        ("blobs_meta", json!({"sha256": huge, "size": 1})),
        ("annotations", json!({"id": Uuid::new_v4(), "sha256": huge})),
    ] {
        let ok = insert("works", json!({"id": Uuid::new_v4(), "title": "before"}));
        let (status, resp) = env.batch(user, json!([ok, insert(table, row)])).await;
        assert_eq!(
            (status.as_u16(), error_code(&resp)),
            (422, "invalid_sha256"),
            "{table}: {resp}"
        );
        assert_eq!(resp["error"]["op_index"], 1, "{table}: {resp}");
    }
    let (status, resp) = env
        .coordinate(
            user,
            json!({"device_id": device, "blobs": [{"sha256": huge, "size": 1}]}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "invalid_sha256"),
        "{resp}"
    );
    let (status, resp) = env.get(&format!("/v1/blobs/{huge}"), Some(&token)).await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "invalid_sha256"),
        "{resp}"
    );
    // Not UTF-8 once percent-decoded: the same JSON error (it was axum's plain-text 400).
    let (status, resp) = env.get("/v1/blobs/%FF", Some(&token)).await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "invalid_sha256"),
        "{resp}"
    );
    for t in [
        "works",
        "blobs_meta",
        "device_blobs",
        "assets",
        "annotations",
    ] {
        assert_eq!(
            count(&db, &format!("select count(*) from {t}"), &[]).await,
            0,
            "{t}"
        );
    }

    // A value too large for an index in a column the server cannot know about (a table added by SQL) is still a
    // client error: Postgres's "program limit exceeded" (54000) maps to 422 value_too_large, not 500.
    db.batch_execute(
        "create table labels (
           id uuid not null default gen_random_uuid(),
           owner_id uuid not null default deeprecall_current_user_id(),
           name text not null,
           created_at timestamptz not null default now(),
           updated_at timestamptz not null default now(),
           primary key (owner_id, id),
           unique (owner_id, name));
         alter publication deeprecall_sync add table labels;",
    )
    .await
    .unwrap();
    let mut migrator = deeprecall_tests::connect(&env.db_url()).await;
    deeprecall_sync::db::migrate::migrate(&mut migrator)
        .await
        .expect("migrate");
    // 9,600 random hex digits: nothing for Postgres's compression to find, so far above the index's 2,704 bytes.
    let noise: String = (0..300)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let op = insert("labels", json!({"name": noise}));
    let mut last = Value::Null;
    for _ in 0..50 {
        let (status, resp) = env.batch(user, json!([op.clone()])).await;
        if error_code(&resp) != "unknown_table" {
            assert_eq!(
                (status.as_u16(), error_code(&resp)),
                (422, "value_too_large"),
                "{resp}"
            );
            assert_eq!(resp["error"]["op_index"], 0, "{resp}");
            assert_eq!(count(&db, "select count(*) from labels", &[]).await, 0);
            return;
        }
        last = resp;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("labels never became writable: {last}");
}

#[tokio::test]
async fn coordinate_is_idempotent_and_complete_marks_the_rest_missing() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
    let report = json!({"device_id": d1, "blobs": [
        {"sha256": sha(1), "size": 1000, "mime": "application/pdf", "filename": "a.pdf", "path": "/docs/a.pdf",
         "page_count": 12},
        {"sha256": sha(2), "size": 2000, "path": "/docs/b.png"},
    ]});
    let (status, body) = env.coordinate(user, report.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["meta_created"].as_u64(),
            body["devices_upserted"].as_u64()
        ),
        (Some(2), Some(2)),
        "{body}"
    );
    assert!(
        body["txid"]
            .as_str()
            .is_some_and(|t| t.parse::<u64>().is_ok()),
        "{body}"
    );
    let meta = dump_table(&db, "blobs_meta", &[]).await;
    let meta_xmins = xmins(&db, "blobs_meta").await;
    let volatile = ["last_seen_at", "updated_at"];
    let devices = dump_table(&db, "device_blobs", &volatile).await;
    assert_eq!(meta.len(), 2);
    assert_eq!(devices.len(), 2);
    assert!(meta.iter().all(|m| m["owner_id"] == json!(user)));
    let a = meta.iter().find(|m| m["sha256"] == sha(1)).unwrap();
    assert_eq!(
        (
            a["size"].as_i64(),
            a["mime"].as_str(),
            a["page_count"].as_i64()
        ),
        (Some(1000), Some("application/pdf"), Some(12))
    );

    // The identical report again: nothing created, the metadata rows not even rewritten (no stream change),
    // the device rows the same apart from the last-seen clock.
    let (status, body) = env.coordinate(user, report.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["meta_created"].as_u64(), body["meta_updated"].as_u64()),
        (Some(0), Some(0)),
        "{body}"
    );
    assert_eq!(dump_table(&db, "blobs_meta", &[]).await, meta);
    assert_eq!(xmins(&db, "blobs_meta").await, meta_xmins);
    assert_eq!(dump_table(&db, "device_blobs", &volatile).await, devices);

    // A later report fills metadata that was missing but never overwrites what is known.
    let (status, body) = env
        .coordinate(
            user,
            json!({"device_id": d2, "blobs": [
                {"sha256": sha(1), "size": 1000, "mime": "text/plain", "filename": "renamed.pdf", "path": "C:\\a.pdf"},
                {"sha256": sha(2), "size": 2000, "mime": "image/png", "image_width": 640, "image_height": 480},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["meta_created"].as_u64(), body["meta_updated"].as_u64()),
        (Some(0), Some(1)),
        "{body}"
    );
    let row = db
        .query_one(
            "select mime, filename from blobs_meta where sha256 = $1",
            &[&sha(1)],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("application/pdf".into(), "a.pdf".into())
    );
    let row = db
        .query_one(
            "select mime, image_width from blobs_meta where sha256 = $1",
            &[&sha(2)],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("image/png".into(), 640)
    );

    // complete: true with only sha(1): d1's sha(2) is marked not present; d2 and sha(1) are untouched.
    let (status, body) = env
        .coordinate(
            user,
            json!({"device_id": d1, "complete": true, "blobs": [{"sha256": sha(1), "size": 1000}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["marked_missing"].as_u64(), Some(1), "{body}");
    let presence = |device: Uuid| {
        let db = &db;
        async move {
            db.query("select sha256, present, health from device_blobs where device_id = $1 order by sha256", &[&device])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1), r.get::<_, String>(2)))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        presence(d1).await,
        vec![
            (sha(1), true, "healthy".to_owned()),
            (sha(2), false, "missing".to_owned())
        ]
    );
    assert_eq!(
        presence(d2).await,
        vec![
            (sha(1), true, "healthy".to_owned()),
            (sha(2), true, "healthy".to_owned())
        ]
    );
    // Repeating the complete report marks nothing more; an empty complete report empties the device.
    let (_, body) = env
        .coordinate(
            user,
            json!({"device_id": d1, "complete": true, "blobs": [{"sha256": sha(1), "size": 1000}]}),
        )
        .await;
    assert_eq!(body["marked_missing"].as_u64(), Some(0), "{body}");
    let (_, body) = env
        .coordinate(
            user,
            json!({"device_id": d2, "complete": true, "blobs": []}),
        )
        .await;
    assert_eq!(body["marked_missing"].as_u64(), Some(2), "{body}");
    assert!(presence(d2).await.iter().all(|(_, present, _)| !present));
    // Reporting a blob again brings it back.
    let (_, body) = env
        .coordinate(
            user,
            json!({"device_id": d2, "blobs": [{"sha256": sha(2), "size": 2000}]}),
        )
        .await;
    assert_eq!(body["devices_upserted"].as_u64(), Some(1), "{body}");
    assert_eq!(presence(d2).await[1], (sha(2), true, "healthy".to_owned()));

    // Another user's coordination of the same device id and hashes never touches this user's rows.
    let before = dump_table(&db, "device_blobs", &[]).await;
    let other = Uuid::new_v4();
    let (status, body) = env
        .coordinate(
            other,
            json!({"device_id": d1, "complete": true, "blobs": []}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["marked_missing"].as_u64(), Some(0), "{body}");
    assert_eq!(dump_table(&db, "device_blobs", &[]).await, before);
}

#[tokio::test]
async fn blob_handle_merges_the_three_tables_for_the_caller_only() {
    let env = TestEnv::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (d1, d2, db_) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let h = sha(0x42);
    for (device, path) in [(d1, "/a/paper.pdf"), (d2, "/b/paper.pdf")] {
        let (status, body) = env
            .coordinate(
                a,
                json!({"device_id": device, "blobs": [{"sha256": h, "size": 4096, "mime": "application/pdf",
                       "filename": "paper.pdf", "path": path, "page_count": 9}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, body) = env
        .coordinate(
            a,
            json!({"device_id": d2, "blobs": [{"sha256": h, "size": 4096, "health": "missing"}]}),
        )
        .await;
    assert_eq!(body["devices_upserted"], 1);
    let (work, asset) = (Uuid::new_v4(), Uuid::new_v4());
    let (status, body) = env
        .batch(
            a,
            json!([
                insert("works", json!({"id": work, "title": "Paper"})),
                insert(
                    "assets",
                    json!({"id": asset, "sha256": h, "work_id": work, "role": "main"})
                ),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied", "applied"]);

    let (status, handle) = env
        .get(&format!("/v1/blobs/{h}"), Some(&env.token(a)))
        .await;
    assert_eq!(status, 200, "{handle}");
    assert_eq!(handle["sha256"], h);
    assert_eq!(handle["meta"]["size"], 4096);
    assert_eq!(handle["meta"]["mime"], "application/pdf");
    assert_eq!(handle["meta"]["page_count"], 9);
    let devices = handle["devices"].as_array().expect("devices");
    let mut got: Vec<(String, bool)> = devices
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_owned(),
                d["present"] == true,
            )
        })
        .collect();
    got.sort();
    let mut want = vec![(d1.to_string(), true), (d2.to_string(), false)];
    want.sort();
    assert_eq!(got, want, "{handle}");
    assert_eq!(
        devices
            .iter()
            .find(|d| d["device_id"] == json!(d1))
            .unwrap()["path"],
        "/a/paper.pdf"
    );
    let assets = handle["assets"].as_array().expect("assets");
    assert_eq!(assets.len(), 1);
    assert_eq!(
        (&assets[0]["id"], &assets[0]["work_id"]),
        (&json!(asset), &json!(work))
    );
    assert!(
        !handle.to_string().contains(&a.to_string()),
        "owner ids are not part of the handle: {handle}"
    );

    // Another user: the same hash does not exist for them (404, same as a never-seen hash).
    let (status, body) = env
        .get(&format!("/v1/blobs/{h}"), Some(&env.token(b)))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (404, "not_found"),
        "{body}"
    );
    // Once B holds the same content, B sees only B's device and no assets; A's handle is unchanged.
    let (status, body) = env
        .coordinate(
            b,
            json!({"device_id": db_, "blobs": [{"sha256": h, "size": 4096, "path": "/b"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, hb) = env
        .get(&format!("/v1/blobs/{h}"), Some(&env.token(b)))
        .await;
    assert_eq!(status, 200, "{hb}");
    let b_devices: Vec<&Value> = hb["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["device_id"])
        .collect();
    assert_eq!(b_devices, vec![&json!(db_)]);
    assert_eq!(hb["assets"], json!([]));
    assert_eq!(hb["meta"]["mime"], Value::Null, "B's metadata is B's own");
    let (_, again) = env
        .get(&format!("/v1/blobs/{h}"), Some(&env.token(a)))
        .await;
    assert_eq!(again, handle);
}

type Figures = (Uuid, String, i64, i32, Vec<Uuid>, Vec<Uuid>, i32, i64);

/// `v_blob_inventory` as `client` sees it: owner, sha256, size, device_count, devices, missing_on, asset_count,
/// stored_bytes.
async fn read(client: &tokio_postgres::Client) -> Vec<Figures> {
    client
        .query(
            "select owner_id, sha256, size, device_count, devices, missing_on, asset_count, stored_bytes::bigint
               from v_blob_inventory order by owner_id, sha256",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)))
        .collect()
}

/// Coordinates `blobs` (seed, size) for `owner` on `device`.
async fn hold(env: &TestEnv, owner: Uuid, device: Uuid, blobs: &[(u8, i64)], missing: &[u8]) {
    let mut list: Vec<Value> = blobs
        .iter()
        .map(|(s, size)| json!({"sha256": sha(*s), "size": size}))
        .collect();
    list.extend(
        missing
            .iter()
            .map(|s| json!({"sha256": sha(*s), "size": 0, "health": "missing"})),
    );
    let (status, body) = env
        .coordinate(owner, json!({"device_id": device, "blobs": list}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn admin_inventory_needs_an_admin_and_pages_across_owners() {
    let env = TestEnv::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    hold(&env, a, Uuid::new_v4(), &[(1, 10), (2, 20), (3, 30)], &[]).await;
    hold(
        &env,
        b,
        Uuid::new_v4(),
        &[(1, 10), (4, 40), (5, 50), (6, 60)],
        &[],
    )
    .await;

    let (status, body) = env.get("/v1/admin/blobs", Some(&env.token(a))).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (403, "forbidden"),
        "{body}"
    );
    let (status, body) = env.get("/v1/admin/blobs", None).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (401, "missing_token"),
        "{body}"
    );

    let admin = env.admin_token(Uuid::new_v4());
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/blobs?limit=3&cursor={c}"),
            None => "/v1/admin/blobs?limit=3".to_owned(),
        };
        let (status, page) = env.get(&path, Some(&admin)).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|i| {
            (
                i["owner_id"].as_str().unwrap().to_owned(),
                i["sha256"].as_str().unwrap().to_owned(),
            )
        }));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<(String, String)> =
        [(a, 1), (a, 2), (a, 3), (b, 1), (b, 4), (b, 5), (b, 6)]
            .iter()
            .map(|(o, s)| (o.to_string(), sha(*s)))
            .collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "every (owner, sha256) exactly once, in key order"
    );

    // Filter by owner; bad paging parameters are rejected.
    let (status, page) = env
        .get(&format!("/v1/admin/blobs?owner_id={b}"), Some(&admin))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    assert_eq!(page["next_cursor"], Value::Null);
    for q in ["limit=0", "limit=1001", "cursor=bm9wZQ"] {
        let (status, body) = env.get(&format!("/v1/admin/blobs?{q}"), Some(&admin)).await;
        assert_eq!(status, 422, "{q}: {body}");
    }

    // A user's own inventory (GET /v1/blobs) shows only their rows, whatever owner_id they ask for.
    let (status, page) = env
        .get(&format!("/v1/blobs?owner_id={b}"), Some(&env.token(a)))
        .await;
    assert_eq!(status, 200, "{page}");
    let owners: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["owner_id"])
        .collect();
    assert_eq!(owners, vec![&json!(a); 3]);
}

#[tokio::test]
async fn blob_inventory_figures_are_right() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (laptop, phone, desktop) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // A: sha(1) on laptop and phone; sha(2) on laptop, missing on phone; sha(3) known but on no device.
    hold(&env, a, laptop, &[(1, 1000), (2, 500)], &[]).await;
    hold(&env, a, phone, &[(1, 1000)], &[2]).await;
    let (status, body) = env
        .batch(
            a,
            json!([
                insert(
                    "blobs_meta",
                    json!({"sha256": sha(3), "size": 7, "mime": "text/plain"})
                ),
                insert("assets", json!({"sha256": sha(1), "role": "main"})),
                insert("assets", json!({"sha256": sha(1), "role": "thumbnail"})),
                insert("assets", json!({"sha256": sha(2)})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // B: the same content sha(1) on B's desktop; B's laptop figures never mix with A's.
    hold(&env, b, desktop, &[(1, 1000)], &[]).await;

    let mut both = vec![laptop, phone];
    both.sort();
    let a_rows: Vec<Figures> = vec![
        (a, sha(1), 1000, 2, both, vec![], 2, 2000),
        (a, sha(2), 500, 1, vec![laptop], vec![phone], 1, 500),
        (a, sha(3), 7, 0, vec![], vec![], 0, 0),
    ];
    let b_rows: Vec<Figures> = vec![(b, sha(1), 1000, 1, vec![desktop], vec![], 0, 1000)];
    let mut all = a_rows.clone();
    all.extend(b_rows.clone());
    all.sort_by(|x, y| (x.0, &x.1).cmp(&(y.0, &y.1)));
    assert_eq!(read(&db).await, all);

    // The admin role reads every owner; a user-scoped reader only their own; no user, nothing.
    let admin = env.superuser().await;
    admin
        .batch_execute("set role deeprecall_admin")
        .await
        .unwrap();
    assert_eq!(read(&admin).await, all);
    assert_eq!(read(&env.as_user(a).await).await, a_rows);
    assert_eq!(read(&env.as_user(b).await).await, b_rows);
    assert_eq!(read(&env.as_user(Uuid::new_v4()).await).await, vec![]);

    // The admin endpoint serves the same figures.
    let (status, page) = env
        .get("/v1/admin/blobs", Some(&env.admin_token(Uuid::new_v4())))
        .await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let a1 = items
        .iter()
        .find(|i| i["owner_id"] == json!(a) && i["sha256"] == sha(1))
        .unwrap();
    assert_eq!(
        (
            a1["device_count"].as_i64(),
            a1["asset_count"].as_i64(),
            a1["stored_bytes"].as_i64()
        ),
        (Some(2), Some(2), Some(2000))
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from v_blob_inventory where stored_bytes <> size * device_count",
            &[]
        )
        .await,
        0
    );
}

#[tokio::test]
async fn two_devices_reporting_the_same_library_at_once_both_succeed() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    // Large enough that the two transactions interleave; metadata rows locked in report order would deadlock
    // when the two devices list the same blobs in different orders.
    let blobs: Vec<Value> = (0..1000u32)
        .map(|i| json!({"sha256": format!("{i:064x}"), "size": i, "mime": "application/pdf"}))
        .collect();
    for _ in 0..2 {
        let reversed: Vec<Value> = blobs.iter().rev().cloned().collect();
        let ((s1, b1), (s2, b2)) = tokio::join!(
            env.coordinate(user, json!({"device_id": Uuid::new_v4(), "blobs": blobs})),
            env.coordinate(
                user,
                json!({"device_id": Uuid::new_v4(), "blobs": reversed})
            ),
        );
        assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{b1} {b2}");
    }
    assert_eq!(
        count(&db, "select count(*) from blobs_meta", &[]).await,
        1000
    );
    assert_eq!(
        count(&db, "select count(*) from device_blobs", &[]).await,
        4000
    );
}

/// A user decides how many device and asset rows one sha256 has; the BlobHandle holds at most 1000 of each and about
/// 4 MiB of either list, and says when it cut one. Before, every row went into one answer built in memory: 200,000
/// assets of one blob made an 83 MB response and took the server from 407 to 1,000 MB for one request.
#[tokio::test]
async fn a_blob_handle_is_capped_in_rows_and_bytes_and_says_so() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let (many, big, small) = (sha(0x51), sha(0x52), sha(0x53));
    hold(
        &env,
        user,
        Uuid::new_v4(),
        &[(0x51, 1), (0x52, 2), (0x53, 3)],
        &[],
    )
    .await;
    // 1,499 more devices (1,500 in all, half of them present) and 1,500 assets of `many`; 6 assets of `big`, each with
    // a title of 1 MiB; one asset of `small`.
    db.batch_execute(&format!(
        "insert into device_blobs (owner_id, device_id, sha256, present)
           select '{user}', gen_random_uuid(), '{many}', i % 2 = 0 from generate_series(1, 1499) i;
         insert into assets (owner_id, sha256, title) select '{user}', '{many}', 'a' from generate_series(1, 1500);
         insert into assets (owner_id, sha256, title) select '{user}', '{big}', repeat('x', 1048576)
           from generate_series(1, 6);
         insert into assets (owner_id, sha256) values ('{user}', '{small}');"
    ))
    .await
    .unwrap();

    let (status, handle) = env.get(&format!("/v1/blobs/{many}"), Some(&token)).await;
    assert_eq!(status, 200, "{handle}");
    assert_eq!(handle["devices"].as_array().unwrap().len(), 1000);
    assert_eq!(handle["devices_truncated"], true);
    assert_eq!(handle["assets"].as_array().unwrap().len(), 1000);
    assert_eq!(handle["assets_truncated"], true);
    // Every present device, though the device list was cut: the 749 even ones of the added rows and the first report's.
    assert_eq!(handle["available_on"].as_array().unwrap().len(), 750);
    // The first 1000 in the documented order.
    let ids: Vec<String> = handle["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);

    let (status, handle) = env.get(&format!("/v1/blobs/{big}"), Some(&token)).await;
    assert_eq!(status, 200);
    let assets = handle["assets"].as_array().unwrap();
    // At most 4 MiB of JSON: three rows of a little over 1 MiB (a fourth would pass it).
    assert_eq!(assets.len(), 3, "{} assets", assets.len());
    assert_eq!(handle["assets_truncated"], true);
    assert_eq!(handle["devices_truncated"], false);

    let (status, handle) = env.get(&format!("/v1/blobs/{small}"), Some(&token)).await;
    assert_eq!(status, 200, "{handle}");
    assert_eq!(handle["assets"].as_array().unwrap().len(), 1);
    assert_eq!(
        (&handle["assets_truncated"], &handle["devices_truncated"]),
        (&json!(false), &json!(false))
    );
    assert_eq!(handle["meta"]["size"], 3);
}

/// The first 300 characters of a JSON value, for an assertion's message (these bodies run to megabytes).
fn head(v: &Value) -> String {
    v.to_string().chars().take(300).collect()
}

/// Every page of `GET /v1/blobs` up to its last, as (items, pages); each page's JSON is checked against the byte cap.
async fn all_pages(env: &TestEnv, path: &str, token: &str) -> (Vec<Value>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            None => path.to_owned(),
            Some(c) => format!("{path}{sep}cursor={c}"),
        };
        let (status, body) = env.get(&url, Some(token)).await;
        assert_eq!(status, 200, "{url}: {}", head(&body));
        let page = body["items"].as_array().unwrap().clone();
        // 4 MiB of rows, plus at most the row that crosses it.
        let largest = page.iter().map(|r| r.to_string().len()).max().unwrap_or(0);
        assert!(
            body["items"].to_string().len() <= (4 << 20) + largest,
            "{url}: a page of {} bytes",
            body["items"].to_string().len()
        );
        items.extend(page);
        pages += 1;
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (items, pages),
        }
    }
}

/// A user decides how long a blob's filename is and how many devices report it; one inventory page (`GET /v1/blobs`,
/// `GET /v1/admin/blobs`) of 1,000 rows held all of it: 1,000 blobs with a 1-MB filename made a 1-GB answer in the
/// server's memory. A page now ends at 4 MiB of rows, and a row's `devices` / `missing_on` at 100 ids, saying so; a
/// list of admin groups at 4 MiB too.
#[tokio::test]
async fn inventory_pages_are_capped_in_bytes_and_device_lists_and_say_so() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let crowded = sha(0x61);
    let last_device = Uuid::max();
    // `crowded` on 250 devices and missing on 130 (the last present device sorts last); 30 blobs with a filename of
    // 300,000 characters (9 MB in all).
    db.batch_execute(&format!(
        "insert into blobs_meta (owner_id, sha256, size) values ('{user}', '{crowded}', 10);
         insert into device_blobs (owner_id, device_id, sha256, present)
           select '{user}', gen_random_uuid(), '{crowded}', i <= 249 from generate_series(1, 379) i;
         insert into device_blobs (owner_id, device_id, sha256) values ('{user}', '{last_device}', '{crowded}');
         insert into blobs_meta (owner_id, sha256, size, filename)
           select '{user}', lpad(to_hex(i), 64, 'a'), i, repeat('f', 300000) from generate_series(1, 30) i;"
    ))
    .await
    .unwrap();

    let admin = env.admin_token(Uuid::new_v4());
    for (path, token) in [
        ("/v1/blobs?limit=1000".to_owned(), &token),
        (
            format!("/v1/admin/blobs?owner_id={user}&limit=1000&sort=size"),
            &admin,
        ),
    ] {
        let (items, pages) = all_pages(&env, &path, token).await;
        // Every blob once, over several pages.
        let mut shas: Vec<&str> = items
            .iter()
            .map(|r| r["sha256"].as_str().unwrap())
            .collect();
        shas.sort();
        shas.dedup();
        assert_eq!((shas.len(), items.len()), (31, 31), "{path}");
        assert!(pages >= 3, "{path}: {pages} pages");
        for row in &items {
            let crowded_row = row["sha256"] == crowded.as_str();
            assert_eq!(
                row["devices_truncated"],
                crowded_row,
                "{path}: {}",
                head(row)
            );
            assert_eq!(row["missing_on_truncated"], crowded_row, "{path}");
            if crowded_row {
                assert_eq!(row["devices"].as_array().unwrap().len(), 100, "{path}");
                assert_eq!(row["missing_on"].as_array().unwrap().len(), 100, "{path}");
                // Counted in full.
                assert_eq!(row["device_count"], 250, "{path}");
                assert_eq!(row["stored_bytes"], 2500, "{path}");
            } else {
                assert_eq!(row["devices"], json!([]), "{path}");
            }
        }
    }
    // The admin's device filter still searches every device of a row, not the ones shown.
    let (status, body) = env
        .get(
            &format!("/v1/admin/blobs?device_id={last_device}&count=true"),
            Some(&admin),
        )
        .await;
    assert_eq!(status, 200, "{}", head(&body));
    assert_eq!(body["total"], 1, "{}", head(&body));
    assert_eq!(
        body["items"][0]["sha256"],
        crowded.as_str(),
        "{}",
        head(&body)
    );

    // A group's key is as long as its owner made it: 12 MIME types of 500,000 characters end the list at 4 MiB.
    let other = Uuid::new_v4();
    db.batch_execute(&format!(
        "insert into blobs_meta (owner_id, sha256, size, mime)
           select '{other}', lpad(to_hex(i), 64, 'b'), i, repeat(chr(96 + i), 500000) from generate_series(1, 12) i;"
    ))
    .await
    .unwrap();
    let (status, body) = env
        .get(
            &format!("/v1/admin/blobs?owner_id={other}&group_by=mime&limit=1000"),
            Some(&admin),
        )
        .await;
    assert_eq!(status, 200, "{}", head(&body));
    let groups = body["groups"].as_array().unwrap();
    assert_eq!(
        (groups.len(), &body["more"]),
        (8, &json!(true)),
        "{}",
        head(&body)
    );
    assert_eq!(body["totals"]["blobs"], 12, "{}", body["totals"]);
}

/// An admin cursor carried its page's last sort key whole: sorted by a 200,000-character filename, `next_cursor`
/// was longer than a request header may be, and the next page could not be asked for. A long key is now cut in the
/// cursor and looked up by its row, so paging stays exact even where the keys share the cut prefix.
#[tokio::test]
async fn admin_cursors_stay_short_whatever_the_sort_key() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    db.batch_execute(&format!(
        "insert into blobs_meta (owner_id, sha256, size, filename)
           select '{user}', lpad(to_hex(i), 64, 'c'), i, repeat('a', 200000) || i from generate_series(1, 3) i;"
    ))
    .await
    .unwrap();
    let admin = env.admin_token(Uuid::new_v4());
    for order in ["asc", "desc"] {
        let (mut seen, mut cursor) = (Vec::new(), None::<String>);
        loop {
            let mut path =
                format!("/v1/admin/blobs?owner_id={user}&sort=filename&order={order}&limit=1");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = env.get(&path, Some(&admin)).await;
            assert_eq!(status, 200, "{order}: {}", head(&body));
            for row in body["items"].as_array().unwrap() {
                seen.push(row["size"].as_i64().unwrap());
            }
            match body["next_cursor"].as_str() {
                Some(c) => {
                    assert!(c.len() < 4096, "a cursor of {} bytes", c.len());
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
            assert!(seen.len() <= 3, "{order}: rows repeat: {seen:?}");
        }
        let expect = if order == "asc" { [1, 2, 3] } else { [3, 2, 1] };
        assert_eq!(seen, expect, "{order}");
    }
}

/// One user's blob of size 2^63 - 1 on two devices made `stored_bytes` (size × devices, bigint) overflow, and with it
/// every inventory query touching the row: the admin dashboard (its totals too) answered 422 "bigint out of range"
/// for everyone. Sizes are now at most 2^53 - 1, and nothing the view or the admin API adds up is a bigint.
#[tokio::test]
async fn no_blob_size_breaks_the_inventory() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    const MAX: i64 = (1 << 53) - 1;

    // Past the bound: refused, naming the blob, and nothing written.
    let (status, body) = env
        .coordinate(
            a,
            json!({"device_id": Uuid::new_v4(), "blobs": [
                {"sha256": sha(1), "size": 1}, {"sha256": sha(2), "size": MAX + 1}]}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (400, "invalid_value"),
        "{body}"
    );
    assert_eq!(body["error"]["blob_index"], 1, "{body}");
    assert_eq!(count(&db, "select count(*) from blobs_meta", &[]).await, 0);
    // The table refuses it too (a write through /v1/batch, or SQL).
    let err = db
        .execute(
            "insert into blobs_meta (owner_id, sha256, size) values ($1, $2, $3)",
            &[&a, &sha(2), &(MAX + 1)],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("blobs_meta_size_max"),
        "{err:?}"
    );

    // At the bound, on two devices; and 1,100 more such blobs of another user, one device each: their sizes add up
    // to about 2^63.1, past what a bigint holds.
    let (d1, d2) = (Uuid::new_v4(), Uuid::new_v4());
    hold(&env, a, d1, &[(3, MAX)], &[]).await;
    hold(&env, a, d2, &[(3, MAX)], &[]).await;
    db.batch_execute(&format!(
        "insert into blobs_meta (owner_id, sha256, size, mime)
           select '{b}', lpad(to_hex(i), 64, '0'), {MAX}, 'video/mp4' from generate_series(1, 1100) i;
         insert into device_blobs (owner_id, device_id, sha256)
           select owner_id, '{d1}', sha256 from blobs_meta where owner_id = '{b}';"
    ))
    .await
    .unwrap();

    let admin = env.admin_token(Uuid::new_v4());
    for q in [
        "",
        "?sort=stored_bytes&order=desc&limit=2",
        "?sort=size&order=desc",
        "?group_by=owner_id",
        "?group_by=mime",
        "?group_by=device_id",
        "?count=true",
    ] {
        let (status, body) = env.get(&format!("/v1/admin/blobs{q}"), Some(&admin)).await;
        assert_eq!(status, 200, "{q}: {body}");
    }
    let (_, body) = env
        .get(
            "/v1/admin/blobs?sort=stored_bytes&order=desc&limit=1",
            Some(&admin),
        )
        .await;
    assert_eq!(body["items"][0]["owner_id"], json!(a));
    assert_eq!(body["items"][0]["stored_bytes"], json!(2 * MAX));
    // The next page, through a cursor whose key is a numeric past what a bigint holds in the sums' types.
    let cursor = body["next_cursor"].as_str().unwrap();
    let (status, page) = env
        .get(
            &format!("/v1/admin/blobs?sort=stored_bytes&order=desc&limit=1&cursor={cursor}"),
            Some(&admin),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["owner_id"], json!(b));
    let (_, groups) = env
        .get("/v1/admin/blobs?group_by=owner_id", Some(&admin))
        .await;
    let total = groups["totals"]["bytes"].as_f64().unwrap();
    let expected = 1101.0 * MAX as f64;
    assert!((total - expected).abs() / expected < 1e-9, "{groups}");
    let (status, body) = env.get("/v1/blobs", Some(&env.token(a))).await;
    assert_eq!(status, 200, "{body}");

    // A size written before the bound existed (the constraint is `not valid`: such rows stay) fails any update of
    // its row. A report naming it replaces the size, instead of failing the whole report (and every guest sign-in
    // that lists the blob) with a constraint violation.
    db.batch_execute(&format!(
        "alter table blobs_meta drop constraint blobs_meta_size_max;
         insert into blobs_meta (owner_id, sha256, size) values ('{a}', '{}', {});
         alter table blobs_meta add constraint blobs_meta_size_max check (size <= {MAX}) not valid;",
        sha(5),
        i64::MAX
    ))
    .await
    .unwrap();
    let (status, body) = env
        .coordinate(
            a,
            json!({"device_id": d1, "blobs": [
                {"sha256": sha(5), "size": 5, "mime": "application/pdf"}, {"sha256": sha(6), "size": 6}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let sizes: Vec<i64> = db
        .query(
            "select size from blobs_meta where owner_id = $1 and sha256 = any($2) order by sha256",
            &[&a, &vec![sha(5), sha(6)]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sizes, [5, 6]);
}

/// A cursor is base64 of JSON, not signed: one whose key does not fit its sort's type is the documented
/// `invalid_cursor`, not Postgres's message about a type.
#[tokio::test]
async fn a_forged_admin_cursor_is_invalid_cursor() {
    use base64::Engine as _;
    let env = TestEnv::start().await;
    let admin = env.admin_token(Uuid::new_v4());
    for (sort, key) in [
        ("size", "foo"),
        ("stored_bytes", "1e"),
        ("last_seen_at", "yesterday-ish"),
        ("owner_id", "not-a-uuid"),
        ("device_count", "99999999999999999999999"),
    ] {
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            json!({"s": sort, "d": true, "k": key, "o": Uuid::new_v4(), "h": sha(1)}).to_string(),
        );
        let (status, body) = env
            .get(
                &format!("/v1/admin/blobs?sort={sort}&order=desc&cursor={cursor}"),
                Some(&admin),
            )
            .await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (422, "invalid_cursor"),
            "{sort} {key}: {body}"
        );
    }
}
