//! Request ids and JSON logs: every HTTP response carries `x-request-id` (the caller's when usable, else a new
//! one), and the server run as a subprocess with `--log-format json` writes JSON lines whose request span carries
//! that id.

use std::time::Duration;

use deeprecall_sync::http::cors::CorsOrigins;
use deeprecall_tests::ops::{free_port, server_bin, until_ready};
use deeprecall_tests::{EnvOptions, TEST_SECRET, TestEnv};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id on {} {:?}", resp.status(), resp.url()))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let env = TestEnv::start_with(EnvOptions {
        cors: CorsOrigins::Any,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", env.base);

    // Generated when absent: a UUID, different per request.
    let a = request_id(&http.get(url("/healthz")).send().await.unwrap());
    let b = request_id(&http.get(url("/healthz")).send().await.unwrap());
    assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
    assert_ne!(a, b);

    // A usable incoming id is kept, on success and on errors alike.
    for (method, path, status) in [
        (reqwest::Method::GET, "/readyz", 200),
        (reqwest::Method::GET, "/no/such/endpoint", 404),
        (reqwest::Method::POST, "/v1/batch", 401),
        (reqwest::Method::DELETE, "/v1/batch", 405),
    ] {
        let resp = http
            .request(method.clone(), url(path))
            .header("x-request-id", "edge-7f3a:42")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(request_id(&resp), "edge-7f3a:42", "{method} {path}");
    }
    // Preflights are answered by the CORS layer before routing, and still get one.
    let resp = http
        .request(reqwest::Method::OPTIONS, url("/v1/batch"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("x-request-id", "preflight-1")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(request_id(&resp), "preflight-1");

    // An unusable one (too long, odd characters) is replaced.
    for bad in [
        "x".repeat(200),
        "has spaces in it".to_owned(),
        "quote\"d".to_owned(),
    ] {
        let resp = http
            .get(url("/healthz"))
            .header("x-request-id", bad.as_str())
            .send()
            .await
            .unwrap();
        let id = request_id(&resp);
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} -> {id}");
    }
}

/// `deeprecall-sync serve` as a subprocess on `slot`, logging JSON lines under `rust_log` (None: the server's default
/// filter); its stderr lines arrive on `lines` as they are written.
struct JsonServer {
    child: tokio::process::Child,
    base: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    reader: tokio::task::JoinHandle<()>,
}

impl JsonServer {
    fn spawn(env: &TestEnv, slot: &str, rust_log: Option<&str>) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = tokio::process::Command::new(server_bin());
        command
            .args([
                "serve",
                "--log-format",
                "json",
                "--listen",
                &listen,
                "--slot",
                slot,
            ])
            .env("DATABASE_URL", env.db_url())
            .env("DEEPRECALL_JWT_SECRET", TEST_SECRET)
            .env_remove("RUST_LOG")
            .env_remove("DEEPRECALL_LOG_FORMAT")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let mut child = command.spawn().expect("spawning deeprecall-sync serve");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel::<String>();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            base: format!("http://{listen}"),
            lines,
            reader,
        }
    }

    /// Waits until its `/readyz` answers 200.
    async fn until_ready(&self) {
        until_ready(&self.base).await;
    }

    /// Stops the server with SIGTERM (it must exit successfully) and returns the lines not yet received.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("pid").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("server stops on SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit}");
        let _ = self.reader.await;
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            rest.push(line);
        }
        rest
    }
}

#[tokio::test]
async fn json_logs_parse_and_carry_the_request_id() {
    let env = TestEnv::start().await;
    // A slot of its own: the test environment's server holds its slot.
    let mut server = JsonServer::spawn(&env, "logs_test", Some("info,tower_http=debug"));
    let base = server.base.clone();
    let http = reqwest::Client::new();
    server.until_ready().await;
    let resp = http
        .get(format!("{base}/readyz"))
        .header("x-request-id", "log-test-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(request_id(&resp), "log-test-42");

    // Read lines until the request's own log line shows up.
    let mut lines: Vec<String> = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = server.lines.recv().await {
            lines.push(line.clone());
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["span"]["request_id"] == "log-test-42" {
                return v;
            }
        }
        panic!("stderr ended")
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no log line with the request id; got:\n{}",
            lines.join("\n")
        )
    });
    assert_eq!(found["span"]["path"], "/readyz", "{found}");
    assert_eq!(found["span"]["method"], "GET", "{found}");
    assert!(
        found["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["request_id"] == "log-test-42")),
        "{found}"
    );

    // Graceful stop, then every line the server wrote is one JSON object with the standard fields.
    lines.extend(server.stop().await);
    assert!(lines.len() >= 3, "{lines:?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(v[field].is_string(), "{field} missing: {line}");
        }
    }
    assert!(
        lines.iter().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["message"] == "deeprecall-sync serving" && v["level"] == "INFO"
        }),
        "{lines:?}"
    );
}

/// A 503 is the server saying "not now", here `/readyz` of an instance on standby, which a load balancer polls for as
/// long as the standby waits: it is logged at DEBUG, not as an ERROR per probe (tower-http's default). The standby
/// itself is one WARN line.
#[tokio::test]
async fn a_standby_polled_for_readiness_logs_no_errors() {
    // Built first: the build blocks this test's runtime, and with the test server running, a minute-long build
    // (cargo rebuilds when the features differ from the test build's) let Postgres time out its replication
    // connection and hand the slot to the second server.
    let _ = server_bin();
    let env = TestEnv::start().await;
    // The test environment's own server holds its slot once it is ready, so a second server on it waits on standby.
    let http = reqwest::Client::new();
    until_ready(&env.base).await;
    let server = JsonServer::spawn(&env, &env.state.slot_name, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut standby_answers = 0;
    while standby_answers < 5 {
        if let Ok(r) = http.get(format!("{}/readyz", server.base)).send().await {
            assert_eq!(r.status(), 503, "a standby is not ready");
            let body: Value = r.json().await.unwrap();
            if body["reason"] == "standby" {
                standby_answers += 1;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no standby readiness answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = server.stop().await;
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&Value> = parsed.iter().filter(|v| v["level"] == "ERROR").collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
    assert!(
        parsed.iter().any(|v| v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("on standby"))),
        "no standby warning in {lines:#?}"
    );
}

/// A 500 is one ERROR line, with its cause and the request's id: the error is logged where it is made, and the
/// access log (tower-http) does not log the same response again without the cause.
#[tokio::test]
async fn a_500_is_logged_once_with_its_cause() {
    let env = TestEnv::start().await;
    let server = JsonServer::spawn(&env, "logs_500", None);
    let http = reqwest::Client::new();
    server.until_ready().await;
    // The operator's mistake, not the client's: the user role lost a grant, so the insert fails with a privilege
    // error that is not row-level security's.
    env.superuser()
        .await
        .batch_execute("revoke insert on works from deeprecall_user")
        .await
        .unwrap();
    let resp = http
        .post(format!("{}/v1/batch", server.base))
        .bearer_auth(env.token(uuid::Uuid::new_v4()))
        .header("x-request-id", "log-500")
        .json(&serde_json::json!({"ops": [deeprecall_tests::insert("works", serde_json::json!({"title": "x"}))]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "internal server error; see the server log"
    );

    let lines = server.stop().await;
    let errors: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "ERROR lines: {errors:#?}");
    let error = &errors[0];
    assert_eq!(error["span"]["request_id"], "log-500", "{error}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied")),
        "{error}"
    );
}

/// A replication failure is logged with Postgres's own message. `tokio-postgres` displays a server's refusal as
/// "db error" and keeps the message in its source: the log said `replication interrupted error=database: db
/// error` (or, with `wal_level = replica`, `error=slot: slot management: db error`), and what was wrong was only in
/// Postgres's log. Here the operator made the database read-only.
#[tokio::test]
async fn a_replication_failure_is_logged_with_postgres_own_message() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let name: String = db
        .query_one("select current_database()", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "alter database {name} set default_transaction_read_only = on"
    ))
    .await
    .unwrap();
    let mut server = JsonServer::spawn(&env, "logs_read_only", None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let warning = loop {
        let line = tokio::time::timeout_at(deadline, server.lines.recv())
            .await
            .expect("no replication warning in 30 s")
            .expect("server exited");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["level"] == "WARN" && v["message"] == "replication interrupted" {
            break v;
        }
    };
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("read-only transaction")),
        "{warning}"
    );
    // And an admin can read it without the log: the stream state "starting" carries the last error.
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let replication = loop {
        if let Ok(r) = http
            .get(format!("{}/v1/admin/replication", server.base))
            .bearer_auth(env.admin_token(uuid::Uuid::new_v4()))
            .send()
            .await
            && r.status().is_success()
        {
            break r.json::<Value>().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "no admin answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replication["stream"]["state"], "starting", "{replication}");
    assert!(
        replication["stream"]["detail"]
            .as_str()
            .is_some_and(|e| e.contains("read-only transaction")),
        "{replication}"
    );
    // Killed, not stopped: its graceful stop would wait on a database that refuses its writes.
    server.child.kill().await.unwrap();
    db.batch_execute(&format!(
        "alter database {name} reset default_transaction_read_only"
    ))
    .await
    .unwrap();
}
