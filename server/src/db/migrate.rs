//! Schema migrations: `sql/` in order, then `policies/`, compiled into the binary.
//!
//! - Versions are the numeric prefixes of `sql/NNNN_name.sql`; each applied one is recorded with a checksum in
//!   `deeprecall_schema_migrations`.
//! - A session-level advisory lock serialises concurrent `migrate` runs (two servers starting at once): the second
//!   waits, then finds nothing to do.
//! - A database that has a version this binary does not know (newer server ran there), or whose applied migration
//!   differs from ours (edited after release), is refused with a message: running against it could corrupt data.
//! - `policies/` is idempotent and re-applied on every run, so a policy fix ships without a new version.

use include_dir::{Dir, include_dir};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

static SQL_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../sql");
static POLICIES_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../policies");

/// Arbitrary but fixed: the advisory lock key shared by every deeprecall-sync migrating this database.
const LOCK_KEY: i64 = 0x6465_6570_7265_6361; // "deeprecall" prefix in ASCII

/// A migration compiled into this binary.
#[derive(Debug, Clone)]
pub struct Migration {
    /// Numeric prefix of the file name.
    pub version: i32,
    /// File name.
    pub name: String,
    /// SQL text.
    pub sql: &'static str,
    /// Hex sha256 of the SQL text.
    pub checksum: String,
}

/// Why migrating or checking failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database was migrated by a newer deeprecall-sync.
    #[error(
        "database schema is at version {found}, newer than this deeprecall-sync understands (it knows up to \
         {known}); upgrade deeprecall-sync instead of running an old binary against a newer schema"
    )]
    DatabaseNewer {
        /// Highest version in the database.
        found: i32,
        /// Highest version this binary knows.
        known: i32,
    },
    /// The database is older than this binary; `serve` refuses until `migrate` has run.
    #[error(
        "database schema is at version {found} but this deeprecall-sync needs version {known}; run \
         `deeprecall-sync migrate` (or start with --migrate)"
    )]
    DatabaseOlder {
        /// Highest version in the database (0 = none).
        found: i32,
        /// Highest version this binary knows.
        known: i32,
    },
    /// An applied migration's text differs from ours.
    #[error(
        "migration {version} ({name}) in the database differs from the one in this binary (checksum {found} vs \
         {expected}); migrations must never be edited after they were applied"
    )]
    ChecksumMismatch {
        /// Version.
        version: i32,
        /// File name.
        name: String,
        /// Checksum stored.
        found: String,
        /// Checksum of our file.
        expected: String,
    },
    /// A migration file could not be applied.
    #[error("applying {name} failed: {source}")]
    Apply {
        /// File name.
        name: String,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Any other database error.
    #[error("database error while migrating: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What a migrate run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions applied by this run (empty when already current).
    pub applied: Vec<i32>,
    /// Schema version after the run.
    pub version: i32,
}

/// The migrations compiled into this binary, ordered by version.
pub fn migrations() -> Vec<Migration> {
    let mut out: Vec<Migration> = SQL_DIR
        .files()
        .filter(|f| f.path().extension().is_some_and(|e| e == "sql"))
        .filter_map(|f| {
            let name = f.path().file_name()?.to_str()?.to_owned();
            let version: i32 = name.split('_').next()?.parse().ok()?;
            let sql = f.contents_utf8()?;
            Some(Migration {
                version,
                name,
                sql,
                checksum: hex_sha256(sql),
            })
        })
        .collect();
    out.sort_by_key(|m| m.version);
    out
}

/// The highest version this binary knows.
pub fn latest_version() -> i32 {
    migrations().last().map_or(0, |m| m.version)
}

fn policies() -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = POLICIES_DIR
        .files()
        .filter(|f| f.path().extension().is_some_and(|e| e == "sql"))
        .filter_map(|f| {
            Some((
                f.path().file_name()?.to_str()?.to_owned(),
                f.contents_utf8()?,
            ))
        })
        .collect();
    out.sort();
    out
}

fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const CREATE_LEDGER: &str = "create table if not exists deeprecall_schema_migrations (
    version    integer primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
)";

/// Applies pending migrations and the policies, under the advisory lock. Safe to run twice or concurrently.
///
/// It waits for locks as long as it takes (another server's migration, a table in use), whatever the session's
/// `lock_timeout` (`serve --migrate` migrates on a connection of the users' pool, which has one), and restores the
/// session's setting after.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    client.batch_execute("set lock_timeout = 0").await?;
    client
        .execute("select pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = migrate_locked(client).await;
    // Released on disconnect anyway; unlock explicitly so a pooled connection does not keep it.
    let unlock = client
        .execute("select pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    // Back to the value the session started with (its startup options).
    let reset = client.batch_execute("reset lock_timeout").await;
    let report = result?;
    unlock?;
    reset?;
    Ok(report)
}

async fn migrate_locked(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    client
        .batch_execute("set client_min_messages = warning")
        .await?;
    client.batch_execute(CREATE_LEDGER).await?;
    let ours = migrations();
    let applied = applied_versions(client).await?;
    verify_known(&ours, &applied)?;
    let mut report = MigrateReport {
        applied: Vec::new(),
        version: 0,
    };
    // One transaction for every pending migration and the policies: a schema is never left half-migrated, or
    // migrated without its row-level security (which would make it look ready while every table is unprotected).
    let tx = client.transaction().await?;
    for m in &ours {
        if applied.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        tx.batch_execute(m.sql)
            .await
            .map_err(|source| MigrateError::Apply {
                name: format!("sql/{}", m.name),
                source,
            })?;
        tx.execute(
            "insert into deeprecall_schema_migrations (version, name, checksum) values ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum],
        )
        .await?;
        report.applied.push(m.version);
    }
    for (name, sql) in policies() {
        tx.batch_execute(sql)
            .await
            .map_err(|source| MigrateError::Apply {
                name: format!("policies/{name}"),
                source,
            })?;
    }
    // Running servers refresh their catalog of writable tables on this notification (sent at commit).
    tx.batch_execute("notify deeprecall_schema_changed").await?;
    tx.commit().await?;
    report.version = latest_version();
    Ok(report)
}

async fn applied_versions(
    client: &Client,
) -> Result<Vec<(i32, String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "select version, name, checksum from deeprecall_schema_migrations order by version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

fn verify_known(ours: &[Migration], applied: &[(i32, String, String)]) -> Result<(), MigrateError> {
    let known = ours.last().map_or(0, |m| m.version);
    for (version, name, checksum) in applied {
        match ours.iter().find(|m| m.version == *version) {
            None => {
                let found = applied.iter().map(|(v, _, _)| *v).max().unwrap_or(*version);
                return Err(MigrateError::DatabaseNewer { found, known });
            }
            Some(m) if &m.checksum != checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    version: *version,
                    name: name.clone(),
                    found: checksum.clone(),
                    expected: m.checksum.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks that the database is exactly at this binary's version (for `serve` without `--migrate`, and `/readyz`).
pub async fn check_current(client: &Client) -> Result<i32, MigrateError> {
    let exists: bool = client
        .query_one(
            "select to_regclass('deeprecall_schema_migrations') is not null",
            &[],
        )
        .await?
        .get(0);
    let ours = migrations();
    let known = ours.last().map_or(0, |m| m.version);
    if !exists {
        return Err(MigrateError::DatabaseOlder { found: 0, known });
    }
    let applied = applied_versions(client).await?;
    verify_known(&ours, &applied)?;
    let found = applied.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
    if ours
        .iter()
        .any(|m| !applied.iter().any(|(v, _, _)| *v == m.version))
    {
        return Err(MigrateError::DatabaseOlder { found, known });
    }
    Ok(found)
}
