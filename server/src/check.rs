//! `deeprecall-sync check`: a preflight for the database an operator is about to point the server at.
//!
//! Connects with DATABASE_URL (TLS settings included) and reports one line per check: server version, TLS,
//! `wal_level`, slot and WAL sender headroom, `max_slot_wal_keep_size`, the REPLICATION right, migrations and their
//! checksums, publication membership, REPLICA IDENTITY FULL, row-level security and its policies, roles, grants,
//! and the slot's state and lag. Exit status: 0 when nothing failed (warnings allowed), 1 on a failure, 2 when it
//! cannot connect. Read-only: it never changes the database.
//!
//! Definitions are not repeated here: migrations and their checksums come from [`crate::db::migrate`], the synced
//! tables from [`crate::db::catalog::Catalog`] (members of the publication that follow the id/owner_id/primary key
//! convention), slot state from the replication crate's `slot_info`. What the policies file grants is spelled out
//! in [`expected_grants`], next to the policy shapes, because Postgres cannot be asked what a file *would* grant.

pub mod report;

use anyhow::Context as _;
use clap::Args;
use deeprecall_replication::slot;
use deeprecall_replication::stream::SslMode;
use tokio_postgres::Client;

use crate::cli::Exit;
use crate::db::catalog::{Catalog, PUBLICATION, Table};
use crate::db::migrate::{self, MigrateError};
use crate::db::{ADMIN_ROLE, PgTarget, USER_ROLE};
use report::human_bytes;
pub use report::{Check, Finding, Report, Status};

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

/// Slot lag above which `check` warns: the server is down, or not keeping up.
const LAG_WARN_BYTES: i64 = 1 << 30;

/// Runs every check against `args.database_url`.
pub async fn check(args: &CheckArgs) -> Report {
    let mut report = Report {
        target: redacted(&args.database_url),
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
            return report;
        }
    }
    let (schema, migrated) = schema_version(&ctx, args).await;
    report.checks.push(schema);
    if migrated {
        report
            .checks
            .push(guard("publication", publication(&ctx)).await);
        report
            .checks
            .push(guard("replica_identity", replica_identity(&ctx)).await);
        report
            .checks
            .push(guard("row_level_security", row_level_security(&ctx)).await);
        report.checks.push(guard("roles", roles(&ctx)).await);
        report.checks.push(guard("grants", grants(&ctx)).await);
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
                error_chain(&e)
            ),
            "check host, port, credentials, pg_hba.conf and the TLS parameters (sslmode, sslrootcert)",
        )),
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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

/// The URL with its password replaced, for when it cannot even be parsed.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((creds, host)) => {
                let user = creds.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_owned(),
        },
        None => "(DATABASE_URL in key=value form)".to_owned(),
    }
}

/// A check whose query failed reports that as its own failure rather than ending the run.
async fn guard(
    name: &'static str,
    probe: impl std::future::Future<Output = Result<Check, tokio_postgres::Error>>,
) -> Check {
    probe.await.unwrap_or_else(|e| {
        Check::fail(
            name,
            format!("could not check: {}", error_chain(&e)),
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
}

impl<'a> Db<'a> {
    async fn load(client: &'a Client, args: &CheckArgs) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "select current_database()::text, current_user::text,
                        (select rolsuper from pg_roles where rolname = current_user),
                        current_setting('server_version_num')::int, current_setting('server_version'),
                        pg_is_in_recovery(),
                        coalesce(host(inet_server_addr()) in ('127.0.0.1', '::1'), true)",
                &[],
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

const MIGRATE_FIX: &str = "run `deeprecall-sync migrate` (it re-applies policies/: row-level security, grants, replica identity)";

async fn tls(ctx: &Db<'_>, _args: &CheckArgs) -> Result<Check, tokio_postgres::Error> {
    let row = ctx
        .client
        .query_opt(
            "select ssl, coalesce(version, ''), coalesce(cipher, '') from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (ssl, version, cipher) = row.map_or((false, String::new(), String::new()), |r| {
        (r.get(0), r.get(1), r.get(2))
    });
    let mode = ctx.sslmode;
    Ok(match (ssl, ctx.verifies_chain) {
        (true, true) => Check::ok(
            "tls",
            format!(
                "{version} {cipher}; sslmode={mode}: the server's certificate is verified{}",
                if mode == SslMode::VerifyFull {
                    " against the host name"
                } else {
                    " (CA only, not the host name)"
                }
            ),
        ),
        (true, false) if ctx.host_is_local => Check::ok(
            "tls",
            format!(
                "{version} {cipher}; sslmode={mode}, certificate not verified (local connection)"
            ),
        ),
        (true, false) => Check::warn(
            "tls",
            format!(
                "{version} {cipher}, but sslmode={mode} does not verify the server's certificate: someone in the \
                 middle could pose as the database"
            ),
            "use sslmode=verify-full&sslrootcert=/path/to/ca.pem in DATABASE_URL",
        ),
        (false, _) if ctx.host_is_local => Check::ok(
            "tls",
            format!("not encrypted (sslmode={mode}; local connection)"),
        ),
        (false, _) => Check::warn(
            "tls",
            format!(
                "not encrypted (sslmode={mode}): the password and all data cross the network in plain text"
            ),
            "turn on ssl in postgresql.conf and use sslmode=verify-full&sslrootcert=/path/to/ca.pem \
             (docs/operations.md, TLS to Postgres)",
        ),
    })
}

fn server_version(ctx: &Db<'_>) -> Check {
    const NAME: &str = "server_version";
    if ctx.version_num < 150_000 {
        return Check::fail(
            NAME,
            format!(
                "PostgreSQL {}: deeprecall-sync needs 15 or newer (security_invoker views, on delete set null \
                 (column))",
                ctx.version
            ),
            "upgrade PostgreSQL to 15 or newer",
        );
    }
    if ctx.in_recovery {
        return Check::fail(
            NAME,
            format!(
                "PostgreSQL {} is a standby (in recovery): writes and logical decoding need the primary",
                ctx.version
            ),
            "point DATABASE_URL at the primary",
        );
    }
    Check::ok(NAME, format!("PostgreSQL {} (primary)", ctx.version))
}

async fn wal_level(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    let level = ctx.setting("wal_level").await?;
    Ok(if level == "logical" {
        Check::ok("wal_level", "logical")
    } else {
        Check::fail(
            "wal_level",
            format!("wal_level is {level}: the live stream decodes the WAL and needs logical"),
            "set wal_level = logical in postgresql.conf (deploy/postgresql.conf.snippet) and restart PostgreSQL",
        )
    })
}

async fn replication_slots(ctx: &Db<'_>, args: &CheckArgs) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "replication_slots";
    let row = ctx
        .client
        .query_one(
            "select current_setting('max_replication_slots')::int,
                    (select count(*)::int from pg_replication_slots),
                    exists (select 1 from pg_replication_slots
                             where slot_name = $1 and database = current_database()),
                    coalesce((select string_agg(slot_name::text, ', ' order by slot_name)
                                from pg_replication_slots where slot_name <> $1), '')",
            &[&args.slot],
        )
        .await?;
    let (max, used, ours, others): (i32, i32, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let need = if ours { 0 } else { 1 };
    let free = max - used;
    let fix = "raise max_replication_slots in postgresql.conf (restart), or drop slots nobody reads: \
               select pg_drop_replication_slot('…')";
    Ok(if free < need {
        Check::fail(
            NAME,
            format!(
                "all {max} replication slots are taken ({others}): the server cannot create its slot {}",
                args.slot
            ),
            fix,
        )
    } else if free - need == 0 {
        Check::warn(
            NAME,
            format!(
                "{used} of {max} in use{}: no spare slot for a second instance or a rolling deploy",
                if ours { ", this server's included" } else { "" }
            ),
            fix,
        )
    } else {
        Check::ok(
            NAME,
            format!(
                "{used} of {max} in use{}",
                if ours {
                    format!(", this server's ({}) included", args.slot)
                } else {
                    format!("; {} will be created at start", args.slot)
                }
            ),
        )
    })
}

async fn wal_senders(ctx: &Db<'_>, args: &CheckArgs) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "wal_senders";
    // Walsenders of other clients; our own slot's (a running server of this deployment) will be replaced by ours.
    let row = ctx
        .client
        .query_one(
            "select current_setting('max_wal_senders')::int,
                    (select count(*)::int from pg_stat_replication r
                      where r.pid is distinct from (select active_pid from pg_replication_slots
                                                     where slot_name = $1 and database = current_database()))",
            &[&args.slot],
        )
        .await?;
    let (max, others): (i32, i32) = (row.get(0), row.get(1));
    let fix = "raise max_wal_senders in postgresql.conf (restart)";
    Ok(if max - others < 1 {
        Check::fail(
            NAME,
            format!(
                "max_wal_senders is {max} and {others} are in use: the replication connection would be refused"
            ),
            fix,
        )
    } else if max - others == 1 {
        Check::warn(
            NAME,
            format!(
                "{others} of {max} in use by other clients: exactly one left for this server, none for a second \
                 instance or a backup"
            ),
            fix,
        )
    } else {
        Check::ok(NAME, format!("{others} of {max} in use by other clients"))
    })
}

async fn max_slot_wal_keep_size(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "max_slot_wal_keep_size";
    let value = ctx.setting("max_slot_wal_keep_size").await?;
    Ok(if value == "-1" {
        Check::warn(
            NAME,
            "-1 (unlimited): while the server is down, its slot keeps WAL without limit and can fill the disk",
            "set max_slot_wal_keep_size (e.g. 10GB, see deploy/postgresql.conf.snippet) and reload PostgreSQL",
        )
    } else {
        Check::ok(
            NAME,
            format!(
                "{value}: a slot further behind is invalidated, and the server recreates it (clients refetch)"
            ),
        )
    })
}

/// The REPLICATION right of the role the stream connects as. `Err`: the replication URL cannot be reached.
async fn replication_role(ctx: &Db<'_>, args: &CheckArgs) -> Result<Check, Check> {
    const NAME: &str = "replication_role";
    let query = "select current_user::text, rolreplication, rolsuper from pg_roles where rolname = current_user";
    let (row, via) = match &args.replication_url {
        None => (ctx.client.query_one(query, &[]).await, "DATABASE_URL"),
        Some(url) => {
            let (_, client) =
                connect(url, "DEEPRECALL_REPLICATION_URL")
                    .await
                    .map_err(|mut c| {
                        c.name = NAME;
                        c
                    })?;
            (
                client.query_one(query, &[]).await,
                "DEEPRECALL_REPLICATION_URL",
            )
        }
    };
    let row = match row {
        Ok(r) => r,
        Err(e) => {
            return Ok(Check::fail(
                NAME,
                format!("could not check: {}", error_chain(&e)),
                "run check as the role serve uses",
            ));
        }
    };
    let (role, replication, superuser): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    Ok(if replication || superuser {
        Check::ok(
            NAME,
            format!(
                "{role} ({via}) has {}",
                if replication {
                    "REPLICATION"
                } else {
                    "superuser (REPLICATION included)"
                }
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "{role} ({via}) lacks REPLICATION: the live stream cannot open its replication connection"
            ),
            format!(
                "as a superuser: alter role {role} replication; or give serve a role that has it in \
                 DEEPRECALL_REPLICATION_URL"
            ),
        )
    })
}

/// The migration line, and whether the schema exists at all (the checks after it need it).
async fn schema_version(ctx: &Db<'_>, args: &CheckArgs) -> (Check, bool) {
    const NAME: &str = "schema_version";
    let known = migrate::latest_version();
    let count = migrate::migrations().len();
    match migrate::check_current(ctx.client).await {
        Ok(version) => (
            Check::ok(
                NAME,
                format!(
                    "version {version}, the latest this binary knows; checksums of all {count} migrations match"
                ),
            ),
            true,
        ),
        Err(MigrateError::DatabaseOlder { found, known }) if args.migrate => (
            Check::warn(
                NAME,
                format!(
                    "version {found}, this binary's is {known}: serve --migrate will apply the rest at start"
                ),
                "nothing, if the role may migrate; or run `deeprecall-sync migrate` first",
            ),
            found > 0,
        ),
        Err(MigrateError::DatabaseOlder { found, known }) => (
            Check::fail(
                NAME,
                if found == 0 {
                    format!("not migrated (this binary's schema is version {known})")
                } else {
                    format!("version {found}, but this binary needs version {known}")
                },
                "run `deeprecall-sync migrate` (or start serve with --migrate)",
            ),
            found > 0,
        ),
        Err(e @ MigrateError::DatabaseNewer { .. }) => (
            Check::fail(NAME, e.to_string(), "deploy the newer deeprecall-sync"),
            true,
        ),
        Err(e @ MigrateError::ChecksumMismatch { .. }) => (
            Check::fail(
                NAME,
                e.to_string(),
                "run the deeprecall-sync release that applied it, or restore the migration's original text",
            ),
            true,
        ),
        Err(e) => (
            Check::fail(
                NAME,
                format!("could not read the migrations ledger: {e} (this binary knows {known})"),
                "run check as the role serve uses",
            ),
            false,
        ),
    }
}

async fn publication(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "publication";
    let Some(row) = ctx
        .client
        .query_opt(
            "select pubinsert, pubupdate, pubdelete, pubtruncate, puballtables from pg_publication where pubname = $1",
            &[&PUBLICATION],
        )
        .await?
    else {
        return Ok(Check::fail(
            NAME,
            format!("publication {PUBLICATION} does not exist: no table is synced"),
            MIGRATE_FIX,
        ));
    };
    let mut findings = Vec::new();
    let actions = ["insert", "update", "delete", "truncate"];
    let missing: Vec<&str> = actions
        .iter()
        .enumerate()
        .filter(|(i, _)| !row.get::<_, bool>(*i))
        .map(|(_, a)| *a)
        .collect();
    if !missing.is_empty() {
        findings.push(Finding::fail(
            format!("{PUBLICATION} does not publish {}", missing.join(", ")),
            format!(
                "alter publication {PUBLICATION} set (publish = 'insert, update, delete, truncate')"
            ),
        ));
    }
    // Tables with the shape of a synced table (an `id`, and an `owner_id` that defaults to the session's user, as
    // sql/0001_schema.sql declares every synced table) that are not members: their writes succeed but never reach
    // any client. The op ledger has no `id` and stays out.
    let outside: Vec<String> = ctx
        .client
        .query(
            "select format('%I.%I', n.nspname, c.relname)
               from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
              where c.relkind in ('r', 'p') and not c.relispartition
                and n.nspname not in ('pg_catalog', 'information_schema')
                and exists (select 1 from pg_attribute a
                             where a.attrelid = c.oid and a.attname = 'id' and not a.attisdropped)
                and exists (select 1 from pg_attribute a
                              join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                             where a.attrelid = c.oid and a.attname = 'owner_id' and not a.attisdropped
                               and pg_get_expr(d.adbin, d.adrelid) like '%deeprecall_current_user_id()%')
                and not exists (select 1 from pg_publication_tables pt
                                 where pt.pubname = $1 and pt.schemaname = n.nspname and pt.tablename = c.relname)
              order by 1",
            &[&PUBLICATION],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !outside.is_empty() {
        findings.push(Finding::fail(
            format!(
                "{} not in {PUBLICATION}, though shaped like synced tables (id, owner_id defaulting to the session's \
                 user): their writes never reach any client",
                outside.join(", ")
            ),
            format!(
                "alter publication {PUBLICATION} add table {}; then `deeprecall-sync migrate`",
                outside.join(", ")
            ),
        ));
    }
    let members: Vec<String> = ctx
        .client
        .query(
            "select tablename::text from pg_publication_tables where pubname = $1 order by 1",
            &[&PUBLICATION],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unsynced: Vec<&String> = members
        .iter()
        .filter(|m| ctx.catalog.table(m).is_none())
        .collect();
    if !unsynced.is_empty() {
        findings.push(Finding::warn(
            format!(
                "{} in {PUBLICATION} but not synced: a synced table needs id, owner_id and a primary key",
                unsynced
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("add the missing columns or key, or: alter publication {PUBLICATION} drop table …"),
        ));
    }
    if row.get::<_, bool>(4) {
        findings.push(Finding::warn(
            format!("{PUBLICATION} is FOR ALL TABLES: every table's changes are decoded"),
            "drop it and run `deeprecall-sync migrate` on a database without it, or recreate it FOR TABLE the synced \
             tables",
        ));
    }
    if ctx.catalog.names().is_empty() && findings.is_empty() {
        findings.push(Finding::fail(
            format!("{PUBLICATION} has no synced table"),
            MIGRATE_FIX,
        ));
    }
    Ok(Check::from_findings(
        NAME,
        format!(
            "{PUBLICATION} publishes insert, update, delete, truncate of {} synced tables: {}",
            ctx.catalog.names().len(),
            ctx.catalog.names().join(", ")
        ),
        findings,
    ))
}

async fn replica_identity(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "replica_identity";
    let oids: Vec<u32> = ctx.tables().iter().map(|t| t.oid).collect();
    let rows = ctx
        .client
        .query(
            "select relname::text,
                    case relreplident when 'd' then 'default' when 'n' then 'nothing' when 'i' then 'index'
                                      else 'full' end
               from pg_class where oid = any($1) and relreplident <> 'f' order by 1",
            &[&oids],
        )
        .await?;
    let wrong: Vec<String> = rows
        .iter()
        .map(|r| format!("{} ({})", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(if wrong.is_empty() {
        Check::ok(NAME, format!("FULL on all {} synced tables", oids.len()))
    } else {
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        Check::fail(
            NAME,
            format!(
                "not FULL: {}; the stream cannot route deletes by owner or fill unchanged large values",
                wrong.join(", ")
            ),
            format!(
                "{MIGRATE_FIX}, or: {}",
                names
                    .iter()
                    .map(|n| format!("alter table {n} replica identity full;"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
    })
}

/// The op ledger: not synced, but row-level security applies to it like to a synced table (policies/).
const LEDGER: &str = "sync_applied_ops";

/// A policy as policies/0001_roles_and_rls.sql creates it on every synced table and the ledger.
struct ExpectedPolicy {
    name: &'static str,
    command: &'static str,
    role: &'static str,
    using: &'static str,
    with_check: Option<&'static str>,
}

const EXPECTED_POLICIES: &[ExpectedPolicy] = &[
    ExpectedPolicy {
        name: "owner_isolation",
        command: "ALL",
        role: USER_ROLE,
        using: "(owner_id = deeprecall_current_user_id())",
        with_check: Some("(owner_id = deeprecall_current_user_id())"),
    },
    ExpectedPolicy {
        name: "admin_read",
        command: "SELECT",
        role: ADMIN_ROLE,
        using: "true",
        with_check: None,
    },
];

async fn row_level_security(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "row_level_security";
    let mut oids: Vec<u32> = ctx.tables().iter().map(|t| t.oid).collect();
    if let Some(row) = ctx
        .client
        .query_opt("select to_regclass($1)::oid", &[&LEDGER])
        .await?
        && let Some(oid) = row.get::<_, Option<u32>>(0)
    {
        oids.push(oid);
    }
    let rows = ctx
        .client
        .query(
            "select c.relname::text, c.relrowsecurity, c.relforcerowsecurity
               from pg_class c where c.oid = any($1) order by 1",
            &[&oids],
        )
        .await?;
    let policies = ctx
        .client
        .query(
            "select c.relname::text, p.polname::text, p.polpermissive,
                    case p.polcmd when 'r' then 'SELECT' when 'a' then 'INSERT' when 'w' then 'UPDATE'
                                  when 'd' then 'DELETE' else 'ALL' end,
                    coalesce((select array_agg(case r when 0 then 'public' else pg_get_userbyid(r)::text end
                                               order by 1)
                                from unnest(p.polroles) r), '{}'),
                    pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
               from pg_policy p join pg_class c on c.oid = p.polrelid
              where p.polrelid = any($1)",
            &[&oids],
        )
        .await?;
    let mut findings = Vec::new();
    let mut not_enabled = Vec::new();
    let mut not_forced = Vec::new();
    for r in &rows {
        let (table, enabled, forced): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
        if !enabled {
            not_enabled.push(table.clone());
        } else if !forced {
            not_forced.push(table.clone());
        }
    }
    if !not_enabled.is_empty() {
        findings.push(Finding::fail(
            format!(
                "row-level security is off on {}: a user-scoped session reads and writes every owner's rows",
                not_enabled.join(", ")
            ),
            MIGRATE_FIX,
        ));
    }
    if !not_forced.is_empty() {
        findings.push(Finding::fail(
            format!(
                "row-level security is not forced on {}: the table owner (usually the server's own role) bypasses \
                 the policies",
                not_forced.join(", ")
            ),
            format!(
                "{MIGRATE_FIX}, or: {}",
                not_forced
                    .iter()
                    .map(|t| format!("alter table {t} force row level security;"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
    }
    for r in &rows {
        let table: String = r.get(0);
        for expected in EXPECTED_POLICIES {
            let found = policies
                .iter()
                .find(|p| p.get::<_, String>(0) == table && p.get::<_, String>(1) == expected.name);
            let problem = match found {
                None => Some("missing".to_owned()),
                Some(p) => {
                    let permissive: bool = p.get(2);
                    let command: String = p.get(3);
                    let roles: Vec<String> = p.get(4);
                    let using: Option<String> = p.get(5);
                    let with_check: Option<String> = p.get(6);
                    if !permissive
                        || command != expected.command
                        || roles != [expected.role.to_owned()]
                        || using.as_deref() != Some(expected.using)
                        || with_check.as_deref() != expected.with_check
                    {
                        Some(format!(
                            "differs (for {command} to {} using {} with check {})",
                            roles.join(","),
                            using.as_deref().unwrap_or("-"),
                            with_check.as_deref().unwrap_or("-")
                        ))
                    } else {
                        None
                    }
                }
            };
            if let Some(problem) = problem {
                findings.push(Finding::fail(
                    format!("policy {} on {table} {problem}", expected.name),
                    MIGRATE_FIX,
                ));
            }
        }
        // Permissive policies are OR-ed: any extra one can only widen what a user sees or writes.
        for p in policies.iter().filter(|p| {
            p.get::<_, String>(0) == table
                && p.get::<_, bool>(2)
                && !EXPECTED_POLICIES
                    .iter()
                    .any(|e| e.name == p.get::<_, String>(1))
        }) {
            findings.push(Finding::warn(
                format!(
                    "extra permissive policy {} on {table}: permissive policies are OR-ed, so it can widen what a \
                     user sees",
                    p.get::<_, String>(1)
                ),
                format!(
                    "make sure it is meant; else: drop policy {} on {table}",
                    p.get::<_, String>(1)
                ),
            ));
        }
    }
    Ok(Check::from_findings(
        NAME,
        format!(
            "enabled and forced on {} tables (synced tables and {LEDGER}), with owner_isolation and admin_read",
            rows.len()
        ),
        findings,
    ))
}

async fn roles(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "roles";
    let mut findings = Vec::new();
    for role in [USER_ROLE, ADMIN_ROLE] {
        let row = ctx
            .client
            .query_opt(
                "select rolsuper, rolbypassrls, rolcanlogin, pg_has_role(current_user, oid, 'MEMBER')
                   from pg_roles where rolname = $1",
                &[&role],
            )
            .await?;
        let Some(row) = row else {
            findings.push(Finding::fail(
                format!("role {role} does not exist"),
                MIGRATE_FIX,
            ));
            continue;
        };
        let (superuser, bypass, login, member): (bool, bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if superuser || bypass {
            findings.push(Finding::fail(
                format!("{role} bypasses row-level security (superuser or bypassrls)"),
                format!("alter role {role} nosuperuser nobypassrls"),
            ));
        }
        if login {
            findings.push(Finding::warn(
                format!("{role} can log in; it is meant to be switched to, not logged in as"),
                format!("alter role {role} nologin"),
            ));
        }
        if !member {
            findings.push(Finding::fail(
                format!(
                    "{} is not a member of {role}: every request would fail with permission denied to set role",
                    ctx.login
                ),
                format!(
                    "as a role with admin option on it (or createrole): grant {role} to {}; `deeprecall-sync migrate` \
                     run as {} does it",
                    ctx.login, ctx.login
                ),
            ));
        }
    }
    let me = ctx
        .client
        .query_one(
            "select rolbypassrls from pg_roles where rolname = current_user",
            &[],
        )
        .await?;
    if ctx.superuser || me.get::<_, bool>(0) {
        findings.push(Finding::warn(
            format!(
                "{} is a {}: anything that does not switch to {USER_ROLE} sees every owner's rows",
                ctx.login,
                if ctx.superuser { "superuser" } else { "bypassrls role" }
            ),
            "serve as a dedicated role without superuser and bypassrls (docs/operations.md, Database and login role)",
        ));
    } else {
        // Later migrations alter these tables (publication membership needs ownership).
        let oids: Vec<u32> = ctx.tables().iter().map(|t| t.oid).collect();
        let owners: Vec<String> = ctx
            .client
            .query(
                "select distinct pg_get_userbyid(relowner)::text from pg_class
                  where oid = any($1) and relowner <> (select oid from pg_roles where rolname = current_user)
                  order by 1",
                &[&oids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !owners.is_empty() {
            findings.push(Finding::warn(
                format!(
                    "synced tables are owned by {}, not by {}: a later migration run as {} cannot alter them",
                    owners.join(", "),
                    ctx.login,
                    ctx.login
                ),
                "run migrate and serve as the same role, or transfer ownership: alter table … owner to …",
            ));
        }
    }
    Ok(Check::from_findings(
        NAME,
        format!(
            "{USER_ROLE} and {ADMIN_ROLE} exist without bypassrls; {} is a member of both",
            ctx.login
        ),
        findings,
    ))
}

/// What policies/0001_roles_and_rls.sql grants: `(object, role, privileges)`, where `synced` stands for every synced
/// table.
const EXPECTED_GRANTS: &[(&str, &str, &[&str])] = &[
    (
        "synced",
        USER_ROLE,
        &["SELECT", "INSERT", "UPDATE", "DELETE"],
    ),
    ("synced", ADMIN_ROLE, &["SELECT"]),
    (LEDGER, USER_ROLE, &["SELECT", "INSERT"]),
    (LEDGER, ADMIN_ROLE, &["SELECT"]),
    ("v_blob_inventory", USER_ROLE, &["SELECT"]),
    ("v_blob_inventory", ADMIN_ROLE, &["SELECT"]),
];

async fn grants(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "grants";
    let mut missing: Vec<String> = Vec::new();
    // (quoted name for to_regclass, name for people)
    let tables: Vec<(String, String)> = ctx
        .tables()
        .iter()
        .map(|t| (t.qualified(), format!("{}.{}", t.schema, t.name)))
        .collect();
    for (object, role, privileges) in EXPECTED_GRANTS {
        let objects: Vec<(String, String)> = if *object == "synced" {
            tables.clone()
        } else {
            vec![((*object).to_owned(), (*object).to_owned())]
        };
        for (regclass, table) in objects {
            for privilege in *privileges {
                // has_table_privilege counts membership and PUBLIC, as Postgres does when it checks.
                let has: Option<bool> = ctx
                    .client
                    .query_one(
                        "select case when to_regclass($2) is null then null
                                     else has_table_privilege($1, to_regclass($2), $3) end",
                        &[role, &regclass, privilege],
                    )
                    .await?
                    .get(0);
                match has {
                    Some(true) => {}
                    Some(false) => missing.push(format!("{role} lacks {privilege} on {table}")),
                    None => missing.push(format!("{table} does not exist")),
                }
            }
        }
    }
    let oids: Vec<u32> = ctx.tables().iter().map(|t| t.oid).collect();
    let schemas: Vec<String> = ctx
        .client
        .query(
            "select distinct n.nspname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where c.oid = any($1) order by 1",
            &[&oids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for schema in &schemas {
        for role in [USER_ROLE, ADMIN_ROLE] {
            let has: bool = ctx
                .client
                .query_one(
                    "select has_schema_privilege($1, $2, 'USAGE')",
                    &[&role, schema],
                )
                .await?
                .get(0);
            if !has {
                missing.push(format!("{role} lacks USAGE on schema {schema}"));
            }
        }
    }
    missing.dedup();
    Ok(if missing.is_empty() {
        Check::ok(
            NAME,
            format!(
                "{USER_ROLE} and {ADMIN_ROLE} hold their privileges on {} synced tables, {LEDGER} and \
                 v_blob_inventory",
                tables.len()
            ),
        )
    } else {
        Check::fail(NAME, missing.join("; "), MIGRATE_FIX)
    })
}

async fn slot_state(ctx: &Db<'_>, args: &CheckArgs) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "slot";
    if !slot::valid_slot_name(&args.slot) {
        return Ok(Check::fail(
            NAME,
            format!("{:?} is not a valid slot name", args.slot),
            "set DEEPRECALL_SLOT to lowercase letters, digits and underscores (at most 63)",
        ));
    }
    let Some(info) = slot::slot_info(ctx.client, &args.slot).await? else {
        return Ok(Check::ok(
            NAME,
            format!(
                "{} does not exist yet; serve creates it at start",
                args.slot
            ),
        ));
    };
    if info.plugin != "pgoutput" || info.slot_type != "logical" || info.database != ctx.database {
        return Ok(Check::fail(
            NAME,
            format!(
                "{} is a {} slot with plugin {:?} on database {:?}: serve refuses it",
                args.slot, info.slot_type, info.plugin, info.database
            ),
            format!(
                "choose another --slot, or drop it if nothing reads it: select pg_drop_replication_slot('{}')",
                args.slot
            ),
        ));
    }
    let row = ctx
        .client
        .query_one(
            "select (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, active_pid
               from pg_replication_slots where slot_name = $1",
            &[&args.slot],
        )
        .await?;
    let lag: Option<i64> = row.get(0);
    let pid: Option<i32> = row.get(1);
    let wal_status = info.wal_status.clone().unwrap_or_else(|| "unknown".into());
    let summary = format!(
        "{}: wal_status {wal_status}, {} behind the current WAL position, retains {} of WAL, {}",
        args.slot,
        lag.map_or("?".into(), human_bytes),
        info.retained_bytes.map_or("?".into(), human_bytes),
        pid.map_or("inactive".to_owned(), |p| format!(
            "active (walsender pid {p})"
        ))
    );
    let mut findings = Vec::new();
    match wal_status.as_str() {
        "lost" => findings.push(Finding::warn(
            format!(
                "{summary}; invalidated: serve recreates it and every connected client refetches"
            ),
            "raise max_slot_wal_keep_size, or keep the server running",
        )),
        "unreserved" => findings.push(Finding::warn(
            format!("{summary}; about to be invalidated (past max_slot_wal_keep_size)"),
            "start the server so it catches up, or raise max_slot_wal_keep_size",
        )),
        _ => {}
    }
    if findings.is_empty()
        && let Some(lag) = lag
        && lag > LAG_WARN_BYTES
    {
        findings.push(Finding::warn(
            format!(
                "{summary}; more than {} behind: the server is down or not keeping up",
                human_bytes(LAG_WARN_BYTES)
            ),
            "start the server (it catches up from the slot); if nothing will read this slot again, drop it",
        ));
    }
    Ok(Check::from_findings(NAME, summary, findings))
}
