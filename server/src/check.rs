//! `deeprecall-sync check`: a preflight for the database an operator is about to point the server at.
//!
//! Connects with DATABASE_URL (TLS settings included) and reports one line per check: server version, TLS,
//! `wal_level`, slot and WAL sender headroom, `max_slot_wal_keep_size`, the REPLICATION right, migrations and their
//! checksums, publication membership, REPLICA IDENTITY FULL, row-level security and its policies, roles, grants,
//! and the slot's state and lag. Every check is listed in every report: one that cannot run is `skip`, with why.
//! Exit status: 0 when nothing failed (warnings allowed), 1 on a failure, 2 when it cannot connect. Read-only: it
//! never changes the database.
//!
//! Definitions are not repeated here: migrations and their checksums come from [`crate::db::migrate`], the synced
//! tables from [`crate::db::catalog::Catalog`] (members of the publication that follow the id/owner_id/primary key
//! convention), slot state from the replication crate's `slot_info`. What the policies file grants is spelled out
//! in `schema.rs`, next to the policy shapes, because Postgres cannot be asked what a file *would* grant.
//!
//! ```text
//!  check ── connect (exit 2 on failure) ── Db::load (settings, login role, catalog)
//!    ├─ cluster: tls, server_version, wal_level, replication_slots, wal_senders, max_slot_wal_keep_size,
//!    │           replication_role (may connect with the replication URL, which must reach the same database;
//!    │           exit 2 on failure)
//!    ├─ schema:  schema_version ─ (not migrated: the rest is skipped) ─ publication, replica_identity,
//!    │           row_level_security, roles, grants (the three per-table ones skipped when no table is synced)
//!    └─ cluster: slot
//! ```

mod cluster;
pub mod report;
mod schema;

use anyhow::Context as _;
use clap::Args;
use deeprecall_replication::stream::SslMode;
use tokio_postgres::Client;

use crate::cli::Exit;
use crate::db::PgTarget;
use crate::db::catalog::{Catalog, PUBLICATION, Table};
use cluster::{
    max_slot_wal_keep_size, replication_role, replication_slots, server_version, slot_state, tls,
    wal_level, wal_senders,
};
pub use report::{Check, Finding, Report, Status};
use schema::{grants, publication, replica_identity, roles, row_level_security, schema_version};

/// `check` flags: the same connection settings `serve` reads, so a systemd `ExecStartPre` sees what `serve` will.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Postgres connection URL to check (the one `serve` uses), TLS parameters included.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Postgres URL of the replication role, when `serve` gets one (its REPLICATION right is checked).
    #[arg(long, env = "DEEPRECALL_REPLICATION_URL", hide_env_values = true)]
    pub replication_url: Option<String>,
    /// The slot `serve` will use.
    #[arg(long, env = "DEEPRECALL_SLOT", default_value = crate::live::DEFAULT_SLOT)]
    pub slot: String,
    /// `serve` will run with --migrate: a schema behind this binary is a warning (serve applies the migrations),
    /// not a failure.
    #[arg(long, env = "DEEPRECALL_MIGRATE")]
    pub migrate: bool,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    /// Checks `database_url` with the defaults `serve` has.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            replication_url: None,
            slot: crate::live::DEFAULT_SLOT.to_owned(),
            migrate: false,
            json: false,
        }
    }
}

/// Runs the checks, prints the report, and exits 0, 1 or 2 (through [`Exit`]).
pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let report = check(&args).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).context("rendering the report")?
        );
    } else {
        print!("{}", report.to_text());
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(Exit(code).into()),
    }
}

/// Runs every check against `args.database_url`.
pub async fn check(args: &CheckArgs) -> Report {
    let mut report = Report {
        target: crate::db::redact_url(&args.database_url),
        checks: Vec::new(),
        unreachable: false,
    };
    let client = match connect(&args.database_url, "DATABASE_URL").await {
        Ok((target, client)) => {
            report.target = describe(&target);
            client
        }
        Err(line) => {
            report.checks.push(line);
            report.unreachable = true;
            skip_rest(&mut report, "cannot connect (see connection)");
            return report;
        }
    };
    let ctx = match Db::load(&client, args).await {
        Ok(ctx) => ctx,
        Err(e) => {
            report.checks.push(Check::fail(
                "connection",
                format!("connected, but reading the server's state failed: {e}"),
                "check that the role may read pg_settings, pg_roles and pg_replication_slots",
            ));
            skip_rest(
                &mut report,
                "the server's state could not be read (see connection)",
            );
            return report;
        }
    };
    report.checks.push(Check::ok(
        "connection",
        format!(
            "connected to database {} as role {}",
            ctx.database, ctx.login
        ),
    ));
    report.checks.push(guard("tls", tls(&ctx, args)).await);
    report.checks.push(server_version(&ctx));
    report
        .checks
        .push(guard("wal_level", wal_level(&ctx)).await);
    report
        .checks
        .push(guard("replication_slots", replication_slots(&ctx, args)).await);
    report
        .checks
        .push(guard("wal_senders", wal_senders(&ctx, args)).await);
    report
        .checks
        .push(guard("max_slot_wal_keep_size", max_slot_wal_keep_size(&ctx)).await);
    match replication_role(&ctx, args).await {
        Ok(line) => report.checks.push(line),
        Err(line) => {
            // The replication URL cannot be reached: the stream would not start either.
            report.checks.push(line);
            report.unreachable = true;
            skip_rest(
                &mut report,
                "the replication URL cannot be reached (see replication_role)",
            );
            return report;
        }
    }
    let (schema, migrated) = schema_version(&ctx, args).await;
    let schema_status = schema.status;
    report.checks.push(schema);
    if migrated {
        // With --migrate, serve repairs some of what these find before it serves, so a unit whose check runs
        // first (deploy/deeprecall-sync.service) must not stop the start that would repair it: policies/ is
        // re-applied by every migrate (row-level security and its policies, grants, replica identity, missing group
        // roles and the login role's membership: `roles` itself), and the publication changes only with a
        // migration still pending. Nothing repairs a group role that bypasses row-level security, or a
        // publication broken at the current version: those stay failures. Nor does a pending migration recreate a
        // missing publication (only the first one creates it) or remove a row filter or column list.
        let pending = args.migrate && schema_status == Status::Warn;
        let mut repairable = false;
        let line = guard("publication", async {
            let (line, pending_repairs) = publication(&ctx).await?;
            repairable = pending_repairs;
            Ok(line)
        })
        .await;
        report
            .checks
            .push(line.repaired_by_migrate(pending && repairable));
        // These look at the synced tables: with none (no publication, or none of its members synced), an `ok` would
        // be a statement about nothing.
        let no_tables = ctx.catalog.names().is_empty().then(|| {
            if ctx.publication_exists {
                format!("{PUBLICATION} has no synced table to check (see publication)")
            } else {
                format!("publication {PUBLICATION} does not exist, so no table is synced to check (see publication)")
            }
        });
        let per_table = |name: &'static str, line: Check| match &no_tables {
            Some(reason) => Check::skip(name, reason.clone()),
            None => line.repaired_by_migrate(args.migrate),
        };
        report.checks.push(per_table(
            "replica_identity",
            guard("replica_identity", replica_identity(&ctx)).await,
        ));
        report.checks.push(per_table(
            "row_level_security",
            guard("row_level_security", row_level_security(&ctx)).await,
        ));
        report
            .checks
            .push(guard("roles", roles(&ctx, args.migrate)).await);
        report
            .checks
            .push(per_table("grants", guard("grants", grants(&ctx)).await));
    } else {
        for name in [
            "publication",
            "replica_identity",
            "row_level_security",
            "roles",
            "grants",
        ] {
            report.checks.push(Check::skip(
                name,
                "the schema is not migrated (see schema_version)",
            ));
        }
    }
    report
        .checks
        .push(guard("slot", slot_state(&ctx, args)).await);
    report
}

/// Every check, in the order of the report.
pub const CHECKS: &[&str] = &[
    "connection",
    "tls",
    "server_version",
    "wal_level",
    "replication_slots",
    "wal_senders",
    "max_slot_wal_keep_size",
    "replication_role",
    "schema_version",
    "publication",
    "replica_identity",
    "row_level_security",
    "roles",
    "grants",
    "slot",
];

/// Lists the checks not run yet as skipped, so the report (and `--json`) always names every check.
fn skip_rest(report: &mut Report, reason: &str) {
    for name in CHECKS {
        if report.get(name).is_none() {
            report.checks.push(Check::skip(name, reason));
        }
    }
}

/// Connects, or returns the `connection` line saying why not.
async fn connect(url: &str, what: &str) -> Result<(PgTarget, Client), Check> {
    let target = PgTarget::parse(url).map_err(|e| {
        Check::fail(
            "connection",
            format!("{what} cannot be used: {e}"),
            "correct the URL (postgres://user:password@host:port/database?sslmode=…)",
        )
    })?;
    match target.connect().await {
        Ok(client) => Ok((target, client)),
        Err(e) => Err(Check::fail(
            "connection",
            format!(
                "cannot connect with {what} ({}): {}",
                describe(&target),
                crate::error::Chain(&e)
            ),
            "check host, port, credentials, pg_hba.conf and the TLS parameters (sslmode, sslrootcert)",
        )),
    }
}

/// `host:port/database as user (sslmode=…)`, never the password.
fn describe(target: &PgTarget) -> String {
    let c = &target.config;
    let host = match (c.get_hosts().first(), c.get_hostaddrs().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), _) => h.clone(),
        (Some(tokio_postgres::config::Host::Unix(p)), _) => p.display().to_string(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "?".into(),
    };
    format!(
        "{host}:{}/{} as {} (sslmode={})",
        c.get_ports().first().copied().unwrap_or(5432),
        c.get_dbname().unwrap_or("?"),
        c.get_user().unwrap_or("?"),
        target.tls.mode
    )
}

/// A check whose query failed reports that as its own failure rather than ending the run.
async fn guard(
    name: &'static str,
    probe: impl std::future::Future<Output = Result<Check, tokio_postgres::Error>>,
) -> Check {
    probe.await.unwrap_or_else(|e| {
        Check::fail(
            name,
            format!("could not check: {}", crate::error::Chain(&e)),
            "run check as the role serve uses; it needs to read the system catalogs",
        )
    })
}

/// What every check needs to know, read once.
struct Db<'a> {
    client: &'a Client,
    database: String,
    login: String,
    superuser: bool,
    version_num: i32,
    version: String,
    in_recovery: bool,
    host_is_local: bool,
    sslmode: SslMode,
    verifies_chain: bool,
    catalog: Catalog,
    publication_exists: bool,
}

impl<'a> Db<'a> {
    async fn load(client: &'a Client, args: &CheckArgs) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "select current_database()::text, current_user::text,
                        (select rolsuper from pg_roles where rolname = current_user),
                        current_setting('server_version_num')::int, current_setting('server_version'),
                        pg_is_in_recovery(),
                        coalesce(host(inet_server_addr()) in ('127.0.0.1', '::1'), true),
                        exists (select 1 from pg_publication where pubname = $1)",
                &[&PUBLICATION],
            )
            .await?;
        let target = PgTarget::parse(&args.database_url).ok();
        let catalog = Catalog::load(client).await?;
        Ok(Self {
            client,
            database: row.get(0),
            login: row.get(1),
            superuser: row.get::<_, Option<bool>>(2).unwrap_or(false),
            version_num: row.get(3),
            version: row.get(4),
            in_recovery: row.get(5),
            host_is_local: row.get(6),
            sslmode: target.as_ref().map_or(SslMode::Prefer, |t| t.tls.mode),
            verifies_chain: target.as_ref().is_some_and(|t| t.tls.verifies_chain()),
            catalog,
            publication_exists: row.get(7),
        })
    }

    async fn setting(&self, name: &str) -> Result<String, tokio_postgres::Error> {
        Ok(self
            .client
            .query_one("select current_setting($1)", &[&name])
            .await?
            .get(0))
    }

    fn tables(&self) -> Vec<&Table> {
        let mut tables: Vec<&Table> = self.catalog.tables().map(|t| t.as_ref()).collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        tables
    }
}
