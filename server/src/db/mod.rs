//! Database access: the connection pool, migrations and the catalog of synced tables.

pub mod catalog;
pub mod migrate;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// Session settings pinned on every connection the server opens (pool, snapshot and replication alike), so a value
/// is rendered the same way in a snapshot row and in a live change: text output depends on these.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c extra_float_digits=3 \
     -c bytea_output=hex -c TimeZone=UTC -c application_name=deeprecall-sync";

/// The role user-scoped work runs as; it cannot bypass row-level security (policies/).
pub const USER_ROLE: &str = "deeprecall_user";
/// The read-only reporting role (admin endpoints).
pub const ADMIN_ROLE: &str = "deeprecall_admin";

/// Parses a `postgres://` URL and pins the session settings.
pub fn parse_config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.options(SESSION_OPTIONS);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    Ok(config)
}

/// Builds the connection pool. Connections are opened lazily.
pub fn pool(config: tokio_postgres::Config, max_size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager).max_size(max_size).build()?)
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
