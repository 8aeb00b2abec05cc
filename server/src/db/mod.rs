//! Database access: the connection pool, migrations and the catalog of synced tables.

pub mod catalog;
pub mod migrate;
pub mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use deeprecall_replication::stream::TlsSettings;

pub use tls::{DbUrlError, PgConnector};

/// Session settings pinned on every connection the server opens (pool, snapshot and replication alike), so a value
/// is rendered the same way in a snapshot row and in a live change: text output depends on these.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c extra_float_digits=3 \
     -c bytea_output=hex -c TimeZone=UTC -c application_name=deeprecall-sync";

/// The role user-scoped work runs as; it cannot bypass row-level security (policies/).
pub const USER_ROLE: &str = "deeprecall_user";
/// The read-only reporting role (admin endpoints).
pub const ADMIN_ROLE: &str = "deeprecall_admin";

/// A parsed DATABASE_URL: the `tokio-postgres` settings (session settings pinned), the TLS settings libpq's
/// `ssl*` parameters ask for, and the connector that applies them. Every connection the server opens goes through
/// one of these (the replication connection through [`TlsSettings`] in its `StreamConfig`).
#[derive(Clone)]
pub struct PgTarget {
    /// Host, port, credentials, database, session options; `ssl_mode` is what tokio-postgres can express.
    pub config: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
    pub tls: TlsSettings,
    connector: PgConnector,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("PgTarget")
            .field("config", &self.config)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses `url` (`postgres://…` or `key=value` pairs), pins the session settings and loads the certificates.
    pub fn parse(url: &str) -> Result<Self, DbUrlError> {
        let (mut config, tls) = tls::split_url(url)?;
        config.options(SESSION_OPTIONS);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        let connector = tls::connector(&tls)?;
        Ok(Self {
            config,
            tls,
            connector,
        })
    }

    /// The TLS connector for these settings.
    pub fn connector(&self) -> PgConnector {
        self.connector.clone()
    }

    /// Opens one connection (not pooled) and drives it in a background task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnectError> {
        let (client, connection) =
            self.config
                .connect(self.connector())
                .await
                .map_err(|error| ConnectError {
                    message: self.explain(&error),
                    error,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// A connection error (from here or from the pool) with its causes on one line, certificate failures worded
    /// for the operator.
    pub fn explain(&self, err: &(dyn std::error::Error + 'static)) -> String {
        tls::explain(err, &self.tls)
    }
}

/// Connecting failed; the message includes the causes (`tokio-postgres` alone prints only the outermost one).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    message: String,
    /// The original error (its causes are in the message already, so it is not reported as a source).
    pub error: tokio_postgres::Error,
}

/// Parses a `postgres://` URL and pins the session settings (the TLS parameters are taken out and checked; connect
/// through [`PgTarget`] to apply them).
pub fn parse_config(url: &str) -> Result<tokio_postgres::Config, DbUrlError> {
    Ok(PgTarget::parse(url)?.config)
}

/// Builds a connection pool. Connections are opened lazily, with the target's TLS settings. With `wait_timeout`, a
/// `get()` that finds every connection in use fails with `PoolError::Timeout(Wait)` after that long instead of
/// waiting for ever (the handlers answer it 503 `database_busy` with `Retry-After`).
pub fn pool(
    target: &PgTarget,
    max_size: usize,
    wait_timeout: Option<std::time::Duration>,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        target.config.clone(),
        target.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(wait_timeout)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()?)
}

/// Starts a user-scoped transaction's first statement: switches to `role` and sets `app.user_id` for this
/// transaction only (`set_config(..., true)` is `SET LOCAL`, which takes no bind parameters), and returns the
/// transaction id as a decimal string (`pg_current_xact_id()`, 64-bit with epoch; the stream reports the same).
pub const BEGIN_AS_USER_SQL: &str = "select set_config('role', $1, true), set_config('app.user_id', $2, true), \
     pg_current_xact_id()::text";

/// Opens a transaction on a pooled connection as `role` with `app.user_id = user`; returns it with its txid.
///
/// Both settings are transaction-local, so the connection goes back to the pool as the server's own role with no
/// user set (and then reads `app.user_id` as `''`, which the policies treat as "no user").
pub async fn begin_as<'a>(
    client: &'a mut deadpool_postgres::Object,
    role: &str,
    user: uuid::Uuid,
    read_only: bool,
) -> Result<(deadpool_postgres::Transaction<'a>, String), tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await?;
    let begin = tx.prepare_cached(BEGIN_AS_USER_SQL).await?;
    let user = user.to_string();
    let txid: String = tx.query_one(&begin, &[&role, &user]).await?.get(2);
    Ok((tx, txid))
}
