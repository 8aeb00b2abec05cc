//! Test harness: a real PostgreSQL cluster per test, started from the installed server binaries in a temp dir on a
//! free port, and a deeprecall-sync server on 127.0.0.1:0 in front of it. Dropping [`TestEnv`] stops the server
//! and Postgres and removes the directory, also when the test panics (unwinding runs the drops).

use std::net::SocketAddr;
use std::sync::Arc;

use deeprecall_sync::auth::{AuthConfig, KeySource};
use deeprecall_sync::pgcluster::{ClusterOptions, LocalCluster};
use deeprecall_sync::state::{AppState, Limits};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
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
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
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

/// Starts a throwaway cluster with the test database created (not migrated).
pub async fn start_cluster() -> (LocalCluster, String) {
    let cluster = tokio::task::spawn_blocking(|| {
        LocalCluster::start_temporary(&ClusterOptions { ephemeral: true, ..Default::default() })
    })
    .await
    .expect("cluster task")
    .expect("starting a throwaway Postgres cluster");
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute(&format!("create database {DB_NAME}")).await.expect("create database");
    let url = cluster.url(DB_NAME);
    (cluster, url)
}

/// Connects with the server's pinned session settings.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let config = deeprecall_sync::db::parse_config(url).expect("url");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("connect to test Postgres");
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
        let (cluster, url) = start_cluster().await;
        let limits = options.limits.unwrap_or_default();
        let state = deeprecall_sync::cli::prepare_state(&url, test_auth(), limits, 8, true)
            .await
            .expect("preparing server state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let server_state = state.clone();
        let server = tokio::spawn(async move {
            let _ = deeprecall_sync::app::serve(listener, server_state, async {
                let _ = rx.await;
            })
            .await;
        });
        Self {
            base: format!("http://{addr}"),
            addr,
            auth: state.auth.clone(),
            state,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            server: Some(server),
            cluster,
        }
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
            .batch_execute(&format!("set role deeprecall_user; select set_config('app.user_id', '{user}', false)"))
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
        self.post("/v1/batch", Some(&token), &serde_json::json!({ "ops": ops })).await
    }

    /// Stops the HTTP server (the cluster keeps running).
    pub async fn stop_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
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
