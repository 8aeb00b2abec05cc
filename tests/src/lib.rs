//! Test harness: a real PostgreSQL database per test, in a cluster started from the installed server binaries in a
//! temp dir on a free port (one cluster per test binary, a migrated database per test: see [`cluster`]), and a
//! deeprecall-sync server on 127.0.0.1:0 in front of it. Dropping [`TestEnv`] stops the server and drops the
//! database and its replication slot, also when the test panics (unwinding runs the drops).

pub mod admin;
pub mod batch;
pub mod cluster;
pub mod ops;
pub mod shape;
pub mod stream;

use cluster::TestDb;

use std::net::SocketAddr;
use std::sync::Arc;

use deeprecall_sync::auth::{AuthConfig, KeySource};
use deeprecall_sync::state::{AppState, Limits};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

/// The HS256 secret every test server uses.
pub const TEST_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// Name of the test database.
pub const DB_NAME: &str = "deeprecall";

/// A Postgres cluster plus a running server.
pub struct TestEnv {
    /// HTTP base URL of the server, e.g. `http://127.0.0.1:41234`.
    pub base: String,
    /// Server address.
    pub addr: SocketAddr,
    /// The server's state (pool, catalog...).
    pub state: AppState,
    /// Token verifier/minter with [`TEST_SECRET`].
    pub auth: Arc<AuthConfig>,
    /// HTTP client.
    pub http: reqwest::Client,
    server: Option<deeprecall_sync::cli::Server>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    /// Settings the server is (re)started with.
    settings: Settings,
    // Declared last: dropped after the server is told to stop.
    /// The database (and the cluster it is in).
    pub db: TestDb,
}

/// Settings for [`TestEnv::start_with`].
#[derive(Debug, Clone, Default)]
pub struct EnvOptions {
    /// Request limits (default: the server's defaults).
    pub limits: Option<Limits>,
    /// Origins allowed to call the API from a browser (default: none, as `serve`).
    pub cors: deeprecall_sync::http::cors::CorsOrigins,
    /// Run Postgres in a cluster of the test's own, for tests that restart or reconfigure it (default: a database
    /// in the test binary's shared cluster).
    pub own_cluster: bool,
    /// When a large transaction is handed on in parts (default: the server's default).
    pub part_limit: Option<deeprecall_replication::PartLimit>,
}

/// What a test server is (re)started with.
#[derive(Debug, Clone)]
struct Settings {
    limits: Limits,
    hub: deeprecall_sync::live::hub::HubConfig,
    cors: deeprecall_sync::http::cors::CorsOrigins,
    part_limit: Option<deeprecall_replication::PartLimit>,
}

/// Starts a server in front of `db` on 127.0.0.1:0.
async fn serve(
    db: &TestDb,
    auth: AuthConfig,
    settings: &Settings,
) -> (
    deeprecall_sync::cli::Server,
    tokio::task::JoinHandle<()>,
    SocketAddr,
) {
    let mut options = deeprecall_sync::cli::ServerOptions::new(db.url(), auth);
    options.slot = db.slot_name();
    options.limits = settings.limits;
    options.hub = settings.hub;
    options.cors = settings.cors.clone();
    if let Some(limit) = settings.part_limit {
        options.part_limit = limit;
    }
    options.pool_size = 8;
    let server = deeprecall_sync::cli::start_server(options)
        .await
        .expect("starting the server");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let signal = server.shutdown_signal();
    let state = server.state.clone();
    let http_task = tokio::spawn(async move {
        let _ = deeprecall_sync::app::serve(listener, state, signal).await;
    });
    (server, http_task, addr)
}

/// Starts a throwaway cluster of its own with the test database created (not migrated).
pub async fn start_cluster() -> (TestDb, String) {
    let db = TestDb::own(DB_NAME).await;
    let url = db.url();
    (db, url)
}

/// Connects with the server's pinned session settings.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let config = deeprecall_sync::db::parse_config(url).expect("url");
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to test Postgres");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A test auth config (HS256 with [`TEST_SECRET`], admin claim `role: admin`).
pub fn test_auth() -> AuthConfig {
    AuthConfig::new(
        vec![KeySource::Secret(TEST_SECRET.as_bytes().to_vec())],
        None,
        None,
        "role".into(),
        "admin".into(),
    )
    .expect("auth config")
}

impl TestEnv {
    /// Cluster + migrated database + server with default settings.
    pub async fn start() -> Self {
        Self::start_with(EnvOptions::default()).await
    }

    /// Cluster + migrated database + server.
    pub async fn start_with(options: EnvOptions) -> Self {
        Self::start_with_auth(options, test_auth()).await
    }

    /// Starts a server (migrating the database) in front of a new test database.
    async fn launch(auth: AuthConfig, options: EnvOptions) -> Self {
        Self::launch_with_hub(auth, options, Default::default()).await
    }

    /// Like [`TestEnv::launch`] with explicit hub limits.
    async fn launch_with_hub(
        auth: AuthConfig,
        options: EnvOptions,
        hub: deeprecall_sync::live::hub::HubConfig,
    ) -> Self {
        let db = if options.own_cluster {
            TestDb::own(DB_NAME).await
        } else {
            TestDb::shared().await
        };
        let settings = Settings {
            limits: options.limits.unwrap_or_default(),
            hub,
            cors: options.cors,
            part_limit: options.part_limit,
        };
        let (server, http_task, addr) = serve(&db, auth, &settings).await;
        let state = server.state.clone();
        // Ready as a deployed server would be before traffic reaches it (`/readyz`): streaming from its slot.
        assert!(
            state
                .hub
                .wait_started(std::time::Duration::from_secs(60))
                .await,
            "the test server's replication stream did not start"
        );
        Self {
            base: format!("http://{addr}"),
            addr,
            auth: state.auth.clone(),
            state,
            http: reqwest::Client::new(),
            server: Some(server),
            http_task: Some(http_task),
            settings,
            db,
        }
    }

    /// Shuts the server down gracefully (final offsets sent, slot acknowledged) and starts a new one on the same
    /// cluster, as an operator's restart would. The new server listens on a new port (`base` changes).
    pub async fn restart_server(&mut self) {
        self.stop_server().await;
        self.start_server_again().await;
    }

    /// Starts a server again after [`TestEnv::stop_server`].
    pub async fn start_server_again(&mut self) {
        let (server, http_task, addr) = serve(&self.db, test_auth(), &self.settings).await;
        self.state = server.state.clone();
        self.auth = self.state.auth.clone();
        self.addr = addr;
        self.base = format!("http://{addr}");
        self.server = Some(server);
        self.http_task = Some(http_task);
    }

    /// Database URL (superuser) of the test database.
    pub fn db_url(&self) -> String {
        self.db.url()
    }

    /// A superuser connection to the test database (bypasses RLS: for setup and for checking the truth).
    pub async fn superuser(&self) -> tokio_postgres::Client {
        connect(&self.db_url()).await
    }

    /// Runs `ddl` as superuser; with `notify`, then `notify deeprecall_schema_changed`, as `migrate` ends, so the
    /// server reloads its catalog (without it, DDL by hand, which the server must notice by itself).
    pub async fn ddl(&self, ddl: &str, notify: bool) {
        let db = self.superuser().await;
        db.batch_execute(ddl)
            .await
            .unwrap_or_else(|e| panic!("{ddl}: {e}"));
        if notify {
            db.batch_execute("notify deeprecall_schema_changed")
                .await
                .unwrap();
        }
    }

    /// A connection that behaves like the server's user-scoped sessions for `user`: role deeprecall_user (cannot
    /// bypass RLS) and app.user_id set for the whole session.
    pub async fn as_user(&self, user: Uuid) -> tokio_postgres::Client {
        let client = self.superuser().await;
        client
            .batch_execute(&format!(
                "set role deeprecall_user; select set_config('app.user_id', '{user}', false)"
            ))
            .await
            .expect("switch to user role");
        client
    }

    /// A user token valid for an hour.
    pub fn token(&self, user: Uuid) -> String {
        self.auth.mint(user, false, 3600).expect("mint")
    }

    /// An admin token valid for an hour.
    pub fn admin_token(&self, user: Uuid) -> String {
        self.auth.mint(user, true, 3600).expect("mint")
    }

    /// POSTs JSON with a bearer token; returns status and JSON body (Null if the body is not JSON).
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// GETs with a bearer token; returns status and JSON body.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/batch` as `user`.
    pub async fn batch(&self, user: Uuid, ops: Value) -> (StatusCode, Value) {
        let token = self.token(user);
        self.post(
            "/v1/batch",
            Some(&token),
            &serde_json::json!({ "ops": ops }),
        )
        .await
    }

    /// Shuts the server down gracefully (the cluster keeps running).
    pub async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        if let Some(h) = self.http_task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), h).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.begin_shutdown();
        }
        if let Some(h) = self.http_task.take() {
            h.abort();
        }
    }
}

/// An insert op for `table` with a fresh op_id.
pub fn insert(table: &str, row: Value) -> Value {
    serde_json::json!({ "op_id": Uuid::new_v4(), "table": table, "kind": "insert", "row": row })
}

/// An op of any kind with a fresh op_id.
pub fn op(kind: &str, table: &str, row: Value) -> Value {
    serde_json::json!({ "op_id": Uuid::new_v4(), "table": table, "kind": kind, "row": row })
}

impl TestEnv {
    /// Like [`TestEnv::start_with`], but the server verifies tokens with `auth` instead of [`test_auth`] (for
    /// RS256/EdDSA, JWKS, issuer and audience tests). [`TestEnv::token`] only works when `auth` has a secret.
    pub async fn start_with_auth(options: EnvOptions, auth: AuthConfig) -> Self {
        Self::launch(auth, options).await
    }

    /// POSTs raw bytes (any content, not necessarily JSON) with an optional bearer token.
    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POSTs JSON with an arbitrary `Authorization` header value (or none); returns status, the
    /// `WWW-Authenticate` header and the JSON body.
    pub async fn post_with_authorization(
        &self,
        path: &str,
        authorization: Option<&str>,
        body: &Value,
    ) -> (StatusCode, Option<String>, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(a) = authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (status, challenge, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/blobs/coordinate` as `user`.
    pub async fn coordinate(&self, user: Uuid, body: Value) -> (StatusCode, Value) {
        let token = self.token(user);
        self.post("/v1/blobs/coordinate", Some(&token), &body).await
    }
}

/// `error.code` of an error body ("" when absent).
pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Checks that `frames` are one transaction's `txn` frames in parts, as a connection must get them: the same xid,
/// `part` 0, 1, 2, … without gaps, `"more": true` on every part but the last, and an offset on the last only.
pub fn assert_txn_parts(frames: &[&Value]) {
    let Some(first) = frames.first() else {
        panic!("no txn frames")
    };
    for (i, f) in frames.iter().enumerate() {
        let is_last = i + 1 == frames.len();
        assert_eq!(f["xid"], first["xid"], "one transaction: {f}");
        assert_eq!(f["part"].as_u64(), Some(i as u64), "parts in order: {f}");
        assert_eq!(
            f.get("more").is_none(),
            is_last,
            "only the last part ends it"
        );
        assert_eq!(
            f.get("offset").is_some(),
            is_last,
            "only the last part has an offset"
        );
    }
}

/// The `status` of every op in a batch response, in order.
pub fn statuses(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| x["status"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every row of `table` as JSON, without the columns named in `without`, ordered by that JSON text. Use a superuser
/// client to see the truth across owners, or a user-scoped one to see what RLS lets through.
pub async fn dump_table(
    client: &tokio_postgres::Client,
    table: &str,
    without: &[&str],
) -> Vec<Value> {
    let without: Vec<String> = without.iter().map(|s| (*s).to_owned()).collect();
    let sql = format!(
        "select coalesce(jsonb_agg(to_jsonb(t) - $1::text[] order by (to_jsonb(t) - $1::text[])::text), '[]'::jsonb) from {} t",
        deeprecall_sync::db::catalog::quote_ident(table)
    );
    let value: Value = client
        .query_one(&sql, &[&without])
        .await
        .expect("dump table")
        .get(0);
    value.as_array().cloned().unwrap_or_default()
}

/// `(id, xmin)` of every row of `table`, ordered: an unchanged list means no row was rewritten.
pub async fn xmins(client: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    let sql = format!(
        "select id::text || '/' || owner_id::text, xmin::text from {} order by owner_id, id",
        deeprecall_sync::db::catalog::quote_ident(table)
    );
    client
        .query(&sql, &[])
        .await
        .expect("xmins")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `select count(*)` of `sql` (which must return one bigint), with parameters.
pub async fn count(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A 64-character lowercase hex string derived from `seed` (a valid, distinct sha256 for tests).
pub fn sha(seed: u8) -> String {
    format!("{seed:02x}").repeat(32)
}

// ---- Live stream helpers (issue 3 tests) ----

/// Per subscription id: rows keyed by their `id`.
pub type SubState = std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>;

impl TestEnv {
    /// Like [`TestEnv::start_with`], with explicit hub limits (queue capacity, history), kept across
    /// [`TestEnv::restart_server`].
    pub async fn start_with_hub(
        options: EnvOptions,
        hub: deeprecall_sync::live::hub::HubConfig,
    ) -> Self {
        Self::launch_with_hub(test_auth(), options, hub).await
    }

    /// Stops Postgres (fast shutdown, or an immediate "crash" when `crash`) and starts it again on the same port,
    /// while the server keeps running. Blocks a runtime worker: needs `#[tokio::test(flavor = "multi_thread")]`.
    pub async fn restart_postgres(&mut self, crash: bool) {
        let cluster = self.db.own_cluster_mut();
        tokio::task::block_in_place(|| {
            if crash {
                cluster.kill().expect("killing Postgres");
            } else {
                cluster.stop().expect("stopping Postgres");
            }
            cluster
                .restart_same_port()
                .expect("starting Postgres again");
        });
    }

    /// The truth: `user`'s rows of `table` (optionally narrowed by the SQL condition `extra`, e.g.
    /// `read_status = 'read'`), as the stream shows rows (each column's text output through the server's JSON
    /// conversion), keyed by `id`. Reads as superuser, so RLS does not hide or add anything.
    pub async fn truth(
        &self,
        table: &str,
        user: Uuid,
        extra: Option<&str>,
    ) -> std::collections::BTreeMap<String, Value> {
        let db = self.superuser().await;
        let columns: Vec<(String, u32)> = db
            .query(
                "select attname::text, atttypid::oid from pg_attribute
                  where attrelid = $1::text::regclass and attnum > 0 and not attisdropped and attgenerated = ''
                  order by attnum",
                &[&table],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let list: Vec<String> = columns
            .iter()
            .map(|(n, _)| {
                // The type's output function (what pgoutput sends), not a cast: `boolean::text` is `true`, the
                // output is `t`.
                let c = deeprecall_sync::db::catalog::quote_ident(n);
                format!("case when {c} is null then null else format('%s', {c}) end")
            })
            .collect();
        let sql = format!(
            "select {} from {} where owner_id = $1 and ({})",
            list.join(", "),
            deeprecall_sync::db::catalog::quote_ident(table),
            extra.unwrap_or("true")
        );
        let mut out = std::collections::BTreeMap::new();
        for row in db.query(&sql, &[&user]).await.expect("truth query") {
            let mut buf = Vec::new();
            deeprecall_sync::live::convert::write_row(
                &mut buf,
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, (n, oid))| (n.as_str(), *oid, row.get::<_, Option<&str>>(i))),
            );
            let v: Value = serde_json::from_slice(&buf).expect("row json");
            out.insert(v["id"].as_str().unwrap_or_default().to_owned(), v);
        }
        out
    }
}

/// Rebuilds every subscription's state from frames, in order, checking the stream's invariants: an insert
/// never targets a row the subscription already holds, an update or delete only one it holds, a snapshot row
/// arrives once, and no `(xid, row id, op)` arrives twice for a subscription (until a `must_refetch` restarts it).
#[derive(Debug, Default)]
pub struct StreamCheck {
    /// The rebuilt state.
    pub state: SubState,
    seen: std::collections::HashMap<String, std::collections::HashSet<(String, String, String)>>,
    /// `must_refetch` frames seen, with their reasons.
    pub refetches: Vec<(String, String)>,
    /// Number of changes applied.
    pub changes: usize,
}

impl StreamCheck {
    /// Applies every frame; panics with the first violation.
    pub fn apply_all<'a>(&mut self, frames: impl IntoIterator<Item = &'a Value>) {
        for f in frames {
            if let Err(e) = self.apply(f) {
                panic!("stream invariant violated: {e}\nframe: {}", short(f));
            }
        }
    }

    /// Applies one frame.
    pub fn apply(&mut self, v: &Value) -> Result<(), String> {
        match v["type"].as_str() {
            Some("snapshot") => {
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                let rows = self.state.entry(id.clone()).or_default();
                for row in v["rows"].as_array().into_iter().flatten() {
                    let key = row["id"].as_str().unwrap_or_default().to_owned();
                    if rows.insert(key.clone(), row.clone()).is_some() {
                        return Err(format!("snapshot of `{id}` carries row {key} twice"));
                    }
                }
            }
            Some("must_refetch") => {
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                self.state.insert(id.clone(), Default::default());
                self.seen.remove(&id);
                self.refetches
                    .push((id, v["reason"].as_str().unwrap_or_default().to_owned()));
            }
            Some("txn") => {
                let xid = v["xid"].as_str().unwrap_or_default().to_owned();
                for c in v["changes"].as_array().into_iter().flatten() {
                    self.changes += 1;
                    let sub = c["id"].as_str().unwrap_or_default().to_owned();
                    let op = c["op"].as_str().unwrap_or_default().to_owned();
                    let key = c["row"]["id"].as_str().unwrap_or_default().to_owned();
                    if !self.seen.entry(sub.clone()).or_default().insert((
                        xid.clone(),
                        key.clone(),
                        op.clone(),
                    )) {
                        return Err(format!(
                            "duplicate: ({xid}, {key}, {op}) arrived twice for `{sub}`"
                        ));
                    }
                    let rows = self.state.entry(sub.clone()).or_default();
                    match op.as_str() {
                        "insert" => {
                            if rows.insert(key.clone(), c["row"].clone()).is_some() {
                                return Err(format!(
                                    "`{sub}`: insert of row {key} it already holds (xid {xid})"
                                ));
                            }
                        }
                        "update" => {
                            let Some(old) = rows.get_mut(&key) else {
                                return Err(format!(
                                    "`{sub}`: update of row {key} it never received (xid {xid})"
                                ));
                            };
                            if c.get("unchanged").is_some() {
                                for (k, val) in c["row"].as_object().into_iter().flatten() {
                                    old[k] = val.clone();
                                }
                            } else {
                                *old = c["row"].clone();
                            }
                        }
                        "delete" => {
                            if rows.remove(&key).is_none() {
                                return Err(format!(
                                    "`{sub}`: delete of row {key} it never received (xid {xid})"
                                ));
                            }
                        }
                        other => return Err(format!("unknown op {other:?}")),
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A frame, shortened for messages.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 600 {
        format!("{}…({} bytes)", &s[..600], s.len())
    } else {
        s
    }
}

/// Differences between a subscription's rows and the truth (empty: equal). With `missing_as_null`, a column the
/// client never received counts as null (rows received before an `ADD COLUMN`).
pub fn diff_rows(
    got: &std::collections::BTreeMap<String, Value>,
    want: &std::collections::BTreeMap<String, Value>,
    missing_as_null: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => out.push(format!("missing row {k}: {}", short(w))),
            Some(g) => {
                let (Some(go), Some(wo)) = (g.as_object(), w.as_object()) else {
                    out.push(format!("row {k} not an object"));
                    continue;
                };
                for (col, wv) in wo {
                    let gv = go.get(col);
                    let same = match gv {
                        Some(gv) => gv == wv,
                        None => missing_as_null && wv.is_null(),
                    };
                    if !same {
                        out.push(format!(
                            "row {k} column {col}: got {}, want {}",
                            gv.map(short).unwrap_or_else(|| "<missing>".into()),
                            short(wv)
                        ));
                    }
                }
                for col in go.keys().filter(|c| !wo.contains_key(*c)) {
                    out.push(format!("row {k}: extra column {col}"));
                }
            }
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            out.push(format!("extra row {k}: {}", short(g)));
        }
    }
    out
}

/// Waits until `pred` matches a frame, counting frames already received (unlike [`stream::StreamClient::until`],
/// which only looks at new ones); returns it. Panics after `timeout`.
pub async fn seen_or_wait(
    client: &mut stream::StreamClient,
    timeout: std::time::Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    if let Some(v) = client.frames.iter().find(|v| pred(v)) {
        return v.clone();
    }
    client.until(timeout, pred).await
}

/// Waits until each subscription in `ids` has received an `up_to_date` (already received ones count).
pub async fn all_up_to_date(client: &mut stream::StreamClient, ids: &[&str]) {
    for id in ids {
        seen_or_wait(client, std::time::Duration::from_secs(30), |v| {
            v["type"] == "up_to_date" && v["id"] == *id
        })
        .await;
    }
}
