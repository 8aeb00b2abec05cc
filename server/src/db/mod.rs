//! Database access: the connection pool, the row-level-security session ([`begin_scoped`]), migrations, the catalog
//! of synced tables and op-ledger retention.

pub mod catalog;
pub mod ledger;
pub mod migrate;
pub mod pg_type;
pub mod tls;
pub mod user_pool;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use deeprecall_replication::stream::TlsSettings;

pub use tls::{DbUrlError, PgConnector};
use tokio_postgres::IsolationLevel;

/// Session settings pinned on every connection the server opens (pool, snapshot and replication alike), so a value
/// is rendered the same way in a snapshot row and in a live change: text output depends on these.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c extra_float_digits=3 \
     -c bytea_output=hex -c TimeZone=UTC -c application_name=deeprecall-sync";

/// The role user-scoped work runs as; it cannot bypass row-level security (policies/).
pub const USER_ROLE: &str = "deeprecall_user";
/// The read-only reporting role (admin endpoints).
pub const ADMIN_ROLE: &str = "deeprecall_admin";
/// The housekeeping role: may read and delete op-ledger rows of every owner, nothing else (policies/).
pub const MAINTENANCE_ROLE: &str = "deeprecall_maintenance";

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

    /// The same target, its sessions named `name` in `pg_stat_activity` (so operators can tell them apart).
    pub fn named(&self, name: &str) -> Self {
        let mut target = self.clone();
        target.config.application_name(name);
        target
    }

    /// The same target, its sessions waiting at most `timeout` for any lock (`lock_timeout`, a startup option of
    /// every session; `None`: no limit). For the pool users' requests draw on (`--lock-timeout-ms`).
    ///
    /// Why the session, not each transaction: a connection prepares a statement the first time it runs it, and it
    /// does so before the transaction begins (the fast path sends `BEGIN` … `COMMIT` in one round trip, and binding
    /// needs the prepared statement's types). Preparing an `INSERT` or `UPDATE` takes its table's lock, so a
    /// transaction-local `lock_timeout` set by the transaction's first statement came too late for it: behind an
    /// operator's `CREATE INDEX`, a batch of a shape its connection had not run yet waited for the whole index build
    /// (audit of 2026-12-05). Server-wide work on the same pool (the catalog, the ledger pruner, the replicator's
    /// bookkeeping, admin reports) waits as long too, and retries; migrations lift it ([`migrate::migrate`]).
    pub fn with_lock_timeout(&self, timeout: Option<std::time::Duration>) -> Self {
        let mut target = self.clone();
        if let Some(timeout) = timeout {
            let ms = (timeout.as_millis() as u64).max(1);
            let options = target.config.get_options().unwrap_or_default().to_owned();
            target
                .config
                .options(format!("{options} -c lock_timeout={ms}").trim_start());
        }
        target
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

/// Which database of which cluster a connection reached: what must be the same for the pooled connections
/// (DATABASE_URL) and the replication connection (`--replication-url`), or the stream decodes another database's
/// changes (or, without a publication there, none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbIdentity {
    /// `current_database()`.
    pub database: String,
    /// `pg_control_system().system_identifier` (what a walsender's IDENTIFY_SYSTEM answers as `systemid`), or
    /// `None` when the role may not execute it (PUBLIC may by default; an operator can revoke it).
    pub system_identifier: Option<String>,
}

impl DbIdentity {
    /// Reads the identity of the database `client` is connected to. The cluster identifier is read apart, and any
    /// failure to read it (a revoked grant, a fork or managed service that refuses the function) leaves it `None`:
    /// only the database's name is compared then, rather than refusing a start over a function we merely consult.
    pub async fn read(client: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let database: String = client
            .query_one("select current_database()::text", &[])
            .await?
            .get(0);
        let system_identifier = client
            .query_one(
                "select case when has_function_privilege('pg_catalog.pg_control_system()', 'execute')
                             then (select system_identifier::text from pg_catalog.pg_control_system()) end",
                &[],
            )
            .await
            .ok()
            .and_then(|row| row.get(0));
        Ok(Self {
            database,
            system_identifier,
        })
    }

    /// Why a replication connection that reached `self` must not stream for pooled connections that reached
    /// `ours`, if it must not: the slot would be made there, and the stream would decode that database's changes
    /// (another deployment's rows, if it has a publication of the same name) or none at all.
    pub fn mismatch(&self, ours: &Self) -> Option<String> {
        (!self.same_as(ours)).then(|| {
            format!(
                "the replication URL (DEEPRECALL_REPLICATION_URL) reaches {self}, but DATABASE_URL reaches {ours}: \
                 the live stream would decode the other database's changes"
            )
        })
    }

    /// Whether both name the same database of the same cluster. When either cluster identifier could not be read,
    /// only the names are compared (the `Display` of such an identity says so).
    pub fn same_as(&self, other: &Self) -> bool {
        self.database == other.database
            && match (&self.system_identifier, &other.system_identifier) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for DbIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database {}", self.database)?;
        match &self.system_identifier {
            Some(id) => write!(f, " of cluster {id}"),
            None => write!(f, " (cluster identifier not readable)"),
        }
    }
}

/// `url` (a `postgres://` URL or a libpq key=value string) with its password masked, for what is printed or
/// logged: the password of the user info (`user:***@host`) and any `password` parameter (`?password=***`,
/// `password=***`). Errs on the side of masking: in a URL the user info is taken to end at the *last* `@` (a
/// password may hold `@`, `/` or `?`; at worst a host is masked too).
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let masked = match rest.rfind('@') {
                Some(at) => {
                    let creds = &rest[..at];
                    match creds.split_once(':') {
                        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                        None => url.to_owned(),
                    }
                }
                None => url.to_owned(),
            };
            mask_password_values(&masked, true)
        }
        None => mask_password_values(url, false),
    }
}

/// Masks the value of every `password` parameter: in a URL's query (`in_url`: values end at `&`) or in a libpq
/// key=value string (values end at unescaped white space, or are single-quoted with backslash escapes).
fn mask_password_values(text: &str, in_url: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find("password") {
        let start = from + found;
        from = start + 1;
        let starts_key = start == 0
            || if in_url {
                matches!(bytes[start - 1], b'?' | b'&')
            } else {
                bytes[start - 1].is_ascii_whitespace()
            };
        let mut i = start + "password".len();
        while !in_url && i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if !starts_key || bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while !in_url && i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut end = i;
        if in_url {
            while end < bytes.len() && bytes[end] != b'&' {
                end += 1;
            }
        } else if bytes.get(i) == Some(&b'\'') {
            end += 1;
            while end < bytes.len() && bytes[end] != b'\'' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            end = (end + 1).min(bytes.len());
        } else {
            while end < bytes.len() && !bytes[end].is_ascii_whitespace() {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            end = end.min(bytes.len());
        }
        out.push_str(&text[copied..i]);
        out.push_str("***");
        copied = end;
        from = end.max(from);
    }
    out.push_str(&text[copied..]);
    out
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

/// A connection from `pool`, waiting at most until `deadline` (at least a millisecond) for one to come free: for
/// waits that share one deadline with another (a user's place, a snapshot's admission).
pub async fn get_by(
    pool: &Pool,
    deadline: tokio::time::Instant,
) -> Result<deadpool_postgres::Object, deadpool_postgres::PoolError> {
    let wait = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(std::time::Duration::from_millis(1));
    let timeouts = deadpool_postgres::Timeouts {
        wait: Some(wait),
        ..deadpool_postgres::Timeouts::default()
    };
    pool.timeout_get(&timeouts).await
}

/// Waits until Postgres has answered everything already sent on `client`: an empty query, answered in order after
/// them. For a connection whose last request was abandoned mid-flight (its future dropped: the HTTP client went
/// away), before it goes back to a pool. A transaction dropped uncommitted has queued its `ROLLBACK` already.
/// Errors are ignored: a connection that failed is discarded by the pool anyway.
pub async fn settle(client: &tokio_postgres::Client) {
    let _ = client.simple_query("").await;
}

/// How a transaction that acts for someone starts: which role, which user, isolation, read-only, and what else its
/// first statement reads. Built with [`Scope::user`], [`Scope::admin`] or [`Scope::maintenance`] and the builder
/// methods; consumed by [`begin_scoped`], the one place the row-level-security session is set up.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    role: &'static str,
    user: Option<uuid::Uuid>,
    isolation: Option<IsolationLevel>,
    read_only: bool,
    first_reading: &'a [&'a str],
    txid: bool,
}

impl<'a> Scope<'a> {
    /// `user`'s own work: role `deeprecall_user`, `app.user_id = user` (row-level security restricts every statement
    /// to their rows).
    pub fn user(user: uuid::Uuid) -> Self {
        Self::with_role(USER_ROLE, Some(user))
    }

    /// Read-only reporting across owners: role `deeprecall_admin`, `app.user_id = user` (the admin's own id).
    pub fn admin(user: uuid::Uuid) -> Self {
        Self::with_role(ADMIN_ROLE, Some(user))
    }

    /// Server housekeeping (op-ledger retention): role `deeprecall_maintenance`, no user.
    pub fn maintenance() -> Self {
        Self::with_role(MAINTENANCE_ROLE, None)
    }

    fn with_role(role: &'static str, user: Option<uuid::Uuid>) -> Self {
        Self {
            role,
            user,
            isolation: None,
            read_only: false,
            first_reading: &[],
            txid: false,
        }
    }

    /// A read-only transaction.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// An isolation level other than the session default (read committed).
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Also return the transaction id (`pg_current_xact_id()`, decimal): for writes, whose txid the live stream
    /// reports. Not for reads: it would assign them an xid for nothing.
    pub fn with_txid(mut self) -> Self {
        self.txid = true;
        self
    }

    /// SQL expressions (constant text, never client input) evaluated by the transaction's **first** statement,
    /// before the role switch, e.g. `pg_current_snapshot()::text` and `pg_current_wal_insert_lsn()::text` for a
    /// snapshot whose position must be read in the same instant as its snapshot is taken. Their values are
    /// [`Session::head`]'s columns `0..n`.
    pub fn first_reading(mut self, expressions: &'a [&'a str]) -> Self {
        self.first_reading = expressions;
        self
    }

    /// The `BEGIN` that opens a transaction of this scope.
    fn begin_sql(&self) -> String {
        let mut sql = String::from("begin");
        match self.isolation {
            Some(IsolationLevel::Serializable) => sql.push_str(" isolation level serializable"),
            Some(IsolationLevel::RepeatableRead) => {
                sql.push_str(" isolation level repeatable read")
            }
            Some(IsolationLevel::ReadCommitted) => sql.push_str(" isolation level read committed"),
            Some(IsolationLevel::ReadUncommitted) => {
                sql.push_str(" isolation level read uncommitted")
            }
            _ => {}
        }
        if self.read_only {
            sql.push_str(" read only");
        }
        sql
    }

    /// The first statement: `select <first_reading…>, [pg_current_xact_id()::text,] set_config('role', $1, true),
    /// set_config('app.user_id', $2, true)`, with its parameters ([`Scope::head_params`]).
    fn head_sql(&self) -> String {
        let mut sql = String::from("select ");
        for e in self.first_reading {
            sql.push_str(e);
            sql.push_str(", ");
        }
        if self.txid {
            sql.push_str("pg_current_xact_id()::text, ");
        }
        sql.push_str("set_config('role', $1, true), set_config('app.user_id', $2, true)");
        sql
    }
}

impl Scope<'_> {
    /// The first statement's parameters: the role and the user (`''` for none).
    fn head_params(&self) -> (&'static str, String) {
        (
            self.role,
            self.user.map(|u| u.to_string()).unwrap_or_default(),
        )
    }
}

/// A transaction opened by [`begin_scoped`].
pub struct Session<'c> {
    /// The transaction; rolled back when dropped uncommitted.
    pub tx: deadpool_postgres::Transaction<'c>,
    /// The first statement's row: the [`Scope::first_reading`] values at columns `0..n`.
    pub head: tokio_postgres::Row,
    /// `pg_current_xact_id()` as a decimal string, with [`Scope::with_txid`].
    pub txid: Option<String>,
    /// Rows of each statement pipelined behind the first one, in the order given.
    pub pipelined: Vec<Vec<tokio_postgres::Row>>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("txid", &self.txid)
            .finish_non_exhaustive()
    }
}

/// A statement to pipeline behind the session's first statement, with its parameters.
pub type Pipelined<'s> = (
    &'s tokio_postgres::Statement,
    &'s [&'s (dyn tokio_postgres::types::ToSql + Sync)],
);

/// Opens a transaction acting as `scope` says. With [`run_scoped`], the only way the row-level-security session
/// (role, `app.user_id`; its SQL is [`Scope`]'s) is set up, for every path (batch, blobs, inventory, snapshots,
/// housekeeping).
///
/// Round trips: `BEGIN`, then the first statement with every `pipelined` statement sent behind it before any answer
/// is awaited (Postgres runs them in order, after the role switch, so they are bound by row-level security). Prepare
/// the pipelined statements on `client` beforehand (`prepare_cached`). The first statement itself is prepared before
/// `BEGIN`, so that in a repeatable-read transaction it really is the statement that takes the snapshot (a `Parse`
/// inside the transaction would take it already).
///
/// Both settings are transaction-local (`set_config(…, true)` is `SET LOCAL`, which takes no bind parameters), so the
/// connection goes back to the pool as the server's own role with no user set (and then reads `app.user_id` as `''`,
/// which the policies treat as "no user").
pub async fn begin_scoped<'c>(
    client: &'c mut deadpool_postgres::Object,
    scope: &Scope<'_>,
    pipelined: &[Pipelined<'_>],
) -> Result<Session<'c>, tokio_postgres::Error> {
    let head = client.prepare_cached(&scope.head_sql()).await?;
    let mut builder = client.build_transaction().read_only(scope.read_only);
    if let Some(level) = scope.isolation {
        builder = builder.isolation_level(level);
    }
    let tx = builder.start().await?;
    let (role, user) = scope.head_params();
    let (head, rest) = {
        let head_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&role, &user];
        // join! polls the head first, so it is sent first; join_all sends the rest in order behind it.
        futures::join!(
            tx.query_one(&head, &head_params),
            futures::future::join_all(
                pipelined
                    .iter()
                    .map(|(stmt, params)| tx.query(*stmt, params))
            )
        )
    };
    let head = head?;
    let pipelined = rest.into_iter().collect::<Result<Vec<_>, _>>()?;
    let txid = scope
        .txid
        .then(|| head.get::<_, String>(scope.first_reading.len()));
    Ok(Session {
        tx,
        head,
        txid,
        pipelined,
    })
}

/// What [`run_scoped`] returns: every statement's outcome. The transaction committed iff `committed`.
pub struct OneTrip {
    /// The first statement's row (see [`Session::head`]), or why the transaction failed at its start.
    pub head: Result<tokio_postgres::Row, tokio_postgres::Error>,
    /// `pg_current_xact_id()` with [`Scope::with_txid`], once the head succeeded.
    pub txid: Option<String>,
    /// Each statement's rows or error, in the order given. After the first error the rest fail with 25P02.
    pub results: Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
    /// Whether the transaction committed: every statement succeeded and so did `COMMIT`.
    pub committed: bool,
}

impl std::fmt::Debug for OneTrip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneTrip")
            .field("txid", &self.txid)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

/// A whole transaction of `scope` in **one** round trip: `BEGIN`, the scope's first statement (the same one
/// [`begin_scoped`] runs), `statements` in order, and `COMMIT` are all sent before any answer is awaited. If any
/// statement fails, Postgres aborts the transaction, the later ones fail with 25P02, and the `COMMIT` rolls it back:
/// all or nothing, decided by Postgres without waiting for the server.
///
/// For callers that know everything they will run up front (the write path's common case). Prepare the
/// statements on `client` first (`prepare_cached`). Every message is queued on the connection within the first poll,
/// so even if this future is dropped (the HTTP client went away) the connection ends outside a transaction.
/// `Err` only when the connection itself failed.
pub async fn run_scoped(
    client: &mut deadpool_postgres::Object,
    scope: &Scope<'_>,
    statements: &[Pipelined<'_>],
) -> Result<OneTrip, tokio_postgres::Error> {
    let head = client.prepare_cached(&scope.head_sql()).await?;
    let (role, user) = scope.head_params();
    let head_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&role, &user];
    let client: &tokio_postgres::Client = client;
    let begin = scope.begin_sql();
    // join! polls each future once, in order, on its first poll: all messages are queued before anything is awaited.
    let (begun, head, results, commit) = futures::join!(
        client.batch_execute(&begin),
        client.query_one(&head, &head_params),
        futures::future::join_all(
            statements
                .iter()
                .map(|(stmt, params)| client.query(*stmt, params))
        ),
        client.batch_execute("commit")
    );
    begun?;
    // A failed transaction's COMMIT succeeds (as a rollback); a failing COMMIT is a failed commit (or a lost
    // connection, reported as such by the caller's error mapping).
    let committed = head.is_ok() && results.iter().all(Result::is_ok);
    if let Err(e) = commit
        && (committed || e.is_closed())
    {
        return Err(e);
    }
    let txid = match (&head, scope.txid) {
        (Ok(row), true) => Some(row.get::<_, String>(scope.first_reading.len())),
        _ => None,
    };
    Ok(OneTrip {
        head,
        txid,
        results,
        committed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_urls_never_carry_a_password() {
        for (url, want) in [
            (
                "postgres://sync:s3cret@db:5432/deeprecall",
                "postgres://sync:***@db:5432/deeprecall",
            ),
            (
                "postgres://sync:p@s3cret@db/deeprecall?sslmode=require",
                "postgres://sync:***@db/deeprecall?sslmode=require",
            ),
            (
                "postgres://sync:p?s3cret@db/deeprecall",
                "postgres://sync:***@db/deeprecall",
            ),
            (
                "postgres://sync:p/s3cret@db/deeprecall",
                "postgres://sync:***@db/deeprecall",
            ),
            (
                "postgres://sync@db/deeprecall?sslmode=require&password=s3cret",
                "postgres://sync@db/deeprecall?sslmode=require&password=***",
            ),
            (
                "postgresql://db/deeprecall?password=s3cret&user=sync",
                "postgresql://db/deeprecall?password=***&user=sync",
            ),
            (
                "host=db user=sync password=s3cret dbname=deeprecall",
                "host=db user=sync password=*** dbname=deeprecall",
            ),
            (
                "host=db\npassword=s3cret\ndbname=deeprecall",
                "host=db\npassword=***\ndbname=deeprecall",
            ),
            (
                "host=db password=ab\\ s3cret dbname=deeprecall",
                "host=db password=*** dbname=deeprecall",
            ),
            (
                "host=db password=a&s3cret dbname=deeprecall",
                "host=db password=*** dbname=deeprecall",
            ),
            (
                "host=db password = 's3 cret\\'x' dbname=deeprecall",
                "host=db password = *** dbname=deeprecall",
            ),
            (
                "host=/run/postgresql dbname=deeprecall",
                "host=/run/postgresql dbname=deeprecall",
            ),
            (
                "postgres://db/deeprecall?sslpassword=k",
                "postgres://db/deeprecall?sslpassword=k",
            ),
            ("password=s3cret", "password=***"),
            ("host=db password=", "host=db password=***"),
            ("host=é password=s3crét", "host=é password=***"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
            assert!(!redact_url(url).contains("s3cr"), "{url}");
        }
    }

    #[test]
    fn the_first_statement_reads_before_it_switches_role() {
        let user = uuid::Uuid::nil();
        assert_eq!(
            Scope::user(user).with_txid().head_sql(),
            "select pg_current_xact_id()::text, set_config('role', $1, true), set_config('app.user_id', $2, true)"
        );
        let snapshot = Scope::user(user)
            .isolation(IsolationLevel::RepeatableRead)
            .read_only()
            .first_reading(&[
                "pg_current_snapshot()::text",
                "pg_current_wal_insert_lsn()::text",
            ]);
        assert_eq!(
            snapshot.head_sql(),
            "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text, set_config('role', $1, true), \
             set_config('app.user_id', $2, true)"
        );
        assert_eq!(
            snapshot.begin_sql(),
            "begin isolation level repeatable read read only"
        );
        assert_eq!(Scope::user(user).begin_sql(), "begin");
        assert_eq!(snapshot.head_params(), (USER_ROLE, user.to_string()));
        assert_eq!(
            Scope::maintenance().head_params(),
            (MAINTENANCE_ROLE, String::new())
        );
        assert_eq!(Scope::admin(user).head_params().0, ADMIN_ROLE);
    }
}
