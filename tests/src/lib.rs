//! Test harness: a real PostgreSQL cluster per test, started from the installed server binaries in a temp dir on a
//! free port, and a deeprecall-sync server on 127.0.0.1:0 in front of it. Dropping [`TestEnv`] stops the server
//! and Postgres and removes the directory, also when the test panics (unwinding runs the drops).

pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;

use deeprecall_sync::auth::{AuthConfig, KeySource};
use deeprecall_sync::pgcluster::{ClusterOptions, LocalCluster};
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
    // Declared last: dropped after the server is told to stop.
    /// The cluster.
    pub cluster: LocalCluster,
}

/// Settings for [`TestEnv::start_with`].
#[derive(Debug, Clone, Default)]
pub struct EnvOptions {
    /// Request limits (default: the server's defaults).
    pub limits: Option<Limits>,
}

/// Starts a server in front of `cluster` on 127.0.0.1:0.
async fn serve(
    cluster: &LocalCluster,
    auth: AuthConfig,
    limits: Limits,
) -> (
    deeprecall_sync::cli::Server,
    tokio::task::JoinHandle<()>,
    SocketAddr,
) {
    let mut options = deeprecall_sync::cli::ServerOptions::new(cluster.url(DB_NAME), auth);
    options.limits = limits;
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

/// Starts a throwaway cluster with the test database created (not migrated).
pub async fn start_cluster() -> (LocalCluster, String) {
    let cluster = tokio::task::spawn_blocking(|| {
        LocalCluster::start_temporary(&ClusterOptions {
            ephemeral: true,
            ..Default::default()
        })
    })
    .await
    .expect("cluster task")
    .expect("starting a throwaway Postgres cluster");
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("create database {DB_NAME}"))
        .await
        .expect("create database");
    let url = cluster.url(DB_NAME);
    (cluster, url)
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

    /// Starts a server (migrating the database) in front of `cluster`.
    async fn launch(cluster: LocalCluster, auth: AuthConfig, limits: Limits) -> Self {
        let (server, http_task, addr) = serve(&cluster, auth, limits).await;
        let state = server.state.clone();
        Self {
            base: format!("http://{addr}"),
            addr,
            auth: state.auth.clone(),
            state,
            http: reqwest::Client::new(),
            server: Some(server),
            http_task: Some(http_task),
            cluster,
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
        let (server, http_task, addr) = serve(&self.cluster, test_auth(), self.state.limits).await;
        self.state = server.state.clone();
        self.auth = self.state.auth.clone();
        self.addr = addr;
        self.base = format!("http://{addr}");
        self.server = Some(server);
        self.http_task = Some(http_task);
    }

    /// Database URL (superuser) of the test database.
    pub fn db_url(&self) -> String {
        self.cluster.url(DB_NAME)
    }

    /// A superuser connection to the test database (bypasses RLS: for setup and for checking the truth).
    pub async fn superuser(&self) -> tokio_postgres::Client {
        connect(&self.db_url()).await
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
        let (cluster, _) = start_cluster().await;
        Self::launch(cluster, auth, options.limits.unwrap_or_default()).await
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
