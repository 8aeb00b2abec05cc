//! TLS to Postgres: `sslmode` and `sslrootcert` against a cluster that accepts TLS connections only, with a CA the
//! test makes. verify-full succeeds with the CA and fails with a wrong host name or a wrong CA (clear errors);
//! require encrypts without a CA; a server streams live changes with every connection (pool, schema watcher, slot
//! administration, replication) over TLS.

use std::time::Duration;

use deeprecall_sync::check::{CheckArgs, Status, check};
use deeprecall_sync::db::PgTarget;
use deeprecall_tests::ops::{TlsCluster, UrlServer};
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{DB_NAME, insert};
use serde_json::json;
use uuid::Uuid;

/// Connects with `url`; on success returns whether the session is encrypted (`pg_stat_ssl`).
async fn try_connect(url: &str) -> Result<bool, String> {
    let target = PgTarget::parse(url).map_err(|e| e.to_string())?;
    let client = target.connect().await.map_err(|e| chain(&e))?;
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    Ok(ssl)
}

/// An error with its causes (tokio-postgres puts the TLS or server message in the source, not in Display).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[tokio::test]
async fn verify_full_needs_the_right_ca_and_host_name() {
    let c = TlsCluster::start().await;
    let ca = c.ca_path().display().to_string();
    let other = c.other_ca_path().display().to_string();

    let url = c.url(DB_NAME, &format!("sslmode=verify-full&sslrootcert={ca}"));
    assert_eq!(try_connect(&url).await, Ok(true));

    // The certificate names `localhost`; 127.0.0.1 is the same server under a name it does not carry.
    let err = try_connect(&c.url_with_host(
        "127.0.0.1",
        DB_NAME,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(
        err.contains("not valid for host \"127.0.0.1\"") && err.contains("localhost"),
        "{err}"
    );
    assert!(err.contains("sslmode=verify-full"), "{err}");
    // The name is the URL's host, also when hostaddr says where to connect.
    let err = try_connect(&c.url_with_host(
        "db.wrong.example",
        DB_NAME,
        &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(err.contains("db.wrong.example"), "{err}");
    assert_eq!(
        try_connect(&c.url_with_host(
            "localhost",
            DB_NAME,
            &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}"),
        ))
        .await,
        Ok(true)
    );

    let err = try_connect(&c.url(DB_NAME, &format!("sslmode=verify-full&sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(
        err.contains("not signed by a CA in sslrootcert") && err.contains("other-ca.pem"),
        "{err}"
    );

    // Without a CA, verify-full is refused before connecting, saying what to add.
    let err = try_connect(&c.url(DB_NAME, "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(err.contains("sslrootcert"), "{err}");
}

#[tokio::test]
async fn other_sslmodes() {
    let c = TlsCluster::start().await;
    let ca = c.ca_path().display().to_string();
    let other = c.other_ca_path().display().to_string();

    // require: encrypted, nothing verified (libpq's behaviour without a root certificate).
    assert_eq!(
        try_connect(&c.url_with_host("127.0.0.1", DB_NAME, "sslmode=require")).await,
        Ok(true)
    );
    // prefer (also the default): encrypted when the server offers it.
    assert_eq!(
        try_connect(&c.url(DB_NAME, "sslmode=prefer")).await,
        Ok(true)
    );
    assert_eq!(try_connect(&c.url(DB_NAME, "")).await, Ok(true));
    // verify-ca: the chain is checked, the host name is not.
    assert_eq!(
        try_connect(&c.url_with_host(
            "127.0.0.1",
            DB_NAME,
            &format!("sslmode=verify-ca&sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    let err = try_connect(&c.url(DB_NAME, &format!("sslmode=verify-ca&sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(err.contains("not signed by a CA"), "{err}");
    // require with a root certificate verifies the chain, as libpq does.
    let err = try_connect(&c.url(DB_NAME, &format!("sslmode=require&sslrootcert={other}")))
        .await
        .unwrap_err();
    assert!(err.contains("not signed by a CA"), "{err}");
    // disable: plain TCP, which this cluster refuses (so the successes above really were TLS).
    let err = try_connect(&c.url(DB_NAME, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_streams_over_tls() {
    let c = TlsCluster::start().await;
    let url = c.url(
        DB_NAME,
        &format!("sslmode=verify-full&sslrootcert={}", c.ca_path().display()),
    );
    // The cluster refuses plain TCP, so everything below (migration, pool, schema watcher, slot administration,
    // replication) went over TLS or would have failed.
    let server = UrlServer::start(&url).await;
    writes_and_streams(&server, "Over TLS").await;

    // The replication connection's walsender and the server's other sessions report TLS.
    let db = PgTarget::parse(&url).unwrap().connect().await.unwrap();
    let row = db
        .query_one(
            "select count(*) filter (where s.ssl), count(*)
               from pg_stat_replication r join pg_stat_ssl s using (pid)",
            &[],
        )
        .await
        .unwrap();
    let (ssl, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((ssl, all), (1, 1), "walsenders with TLS / all");
    let plain: i64 = db
        .query_one(
            "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid)
              where a.application_name like 'deeprecall-sync%' and not s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);

    // check over TLS: the tls line says what was verified.
    let report = check(&CheckArgs::new(url.clone())).await;
    let tls = report.get("tls").unwrap();
    assert_eq!(tls.status, Status::Ok, "{}", report.to_text());
    assert!(
        tls.detail.contains("verified against the host name"),
        "{}",
        report.to_text()
    );
    // ... and cannot connect (exit 2) with the wrong CA, saying why.
    let wrong = c.url(
        DB_NAME,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            c.other_ca_path().display()
        ),
    );
    let report = check(&CheckArgs::new(wrong)).await;
    assert_eq!(report.exit_code(), 2, "{}", report.to_text());
    assert!(
        report
            .get("connection")
            .unwrap()
            .detail
            .contains("not signed by a CA"),
        "{}",
        report.to_text()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_with_a_root_certificate_streams_in_plain_text_from_a_server_without_tls() {
    // libpq's default `prefer` with a root certificate (`sslrootcert=…`, or ~/.postgresql/root.crt) verifies the
    // certificate when the server offers TLS, and falls back to plain text when it does not; the pool did. The
    // replication stream (asked as verify-ca) refused a server without TLS: every request worked, and the live
    // stream never started.
    let mut env = deeprecall_tests::TestEnv::start().await;
    env.stop_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("root.crt");
    std::fs::write(
        &ca,
        deeprecall_tests::ops::TestPki::new(&["localhost"]).ca_pem,
    )
    .unwrap();
    let url = format!("{}?sslrootcert={}", env.db_url(), ca.display());
    let server = UrlServer::start_on_slot(&url, &env.db.slot_name()).await;
    writes_and_streams(&server, "plain").await;
}

/// A new user subscribed to works, one work titled `title` written through `/v1/batch`, and its transaction on the
/// live stream: the write path and the replication stream both work.
async fn writes_and_streams(server: &UrlServer, title: &str) {
    let token = server.token(Uuid::new_v4());
    let mut client = StreamClient::connect(&server.base, &token).await;
    client.subscribe("w", "works", json!(null)).await;
    client.up_to_date("w").await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/batch", server.base))
        .bearer_auth(&token)
        .json(&json!({"ops": [insert("works", json!({"id": Uuid::new_v4(), "title": title}))]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let txn = client
        .until(Duration::from_secs(30), |v| v["type"] == "txn")
        .await;
    assert_eq!(txn["changes"][0]["row"]["title"], title, "{txn}");
}
