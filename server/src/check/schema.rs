//! Checks of what `migrate` sets up: migrations and their checksums, the publication, replica identity, row-level
//! security and its policies, roles and grants.

use super::{Check, CheckArgs, Db, Finding};
use crate::db::catalog::PUBLICATION;
use crate::db::migrate::{self, MigrateError};
use crate::db::{ADMIN_ROLE, MAINTENANCE_ROLE, USER_ROLE};

/// The remedy for anything `migrate` creates or re-applies.
const MIGRATE_FIX: &str = "run `deeprecall-sync migrate` (it re-applies policies/: row-level security, grants, replica identity)";

/// The migration line, and whether the schema exists at all (the checks after it need it).
pub(super) async fn schema_version(ctx: &Db<'_>, args: &CheckArgs) -> (Check, bool) {
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

/// The publication line, and whether a pending migration could repair what it found (not a missing publication,
/// nor a row filter or a column list: no migration touches those).
pub(super) async fn publication(ctx: &Db<'_>) -> Result<(Check, bool), tokio_postgres::Error> {
    const NAME: &str = "publication";
    // Tables with the shape of a synced table (an `id`, and an `owner_id` that defaults to the session's user, as
    // sql/0001_schema.sql declares every synced table) that are not members: their writes succeed but never reach
    // any client. The op ledger has no `id` and stays out. Without the publication, these are the tables to
    // recreate it with.
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
    let Some(row) = ctx
        .client
        .query_opt(
            "select pubinsert, pubupdate, pubdelete, pubtruncate, puballtables from pg_publication where pubname = $1",
            &[&PUBLICATION],
        )
        .await?
    else {
        // sql/0001_schema.sql created it, and an applied migration is never run again: `migrate` does not
        // recreate it. Creating it needs the ownership of the tables (the role that ran migrate).
        let tables = if outside.is_empty() {
            "<the synced tables>".to_owned()
        } else {
            outside.join(", ")
        };
        return Ok((Check::fail(
            NAME,
            format!("publication {PUBLICATION} does not exist: no table is synced"),
            format!(
                "as the owner of the tables: create publication {PUBLICATION} for table {tables}; then run \
                 `deeprecall-sync migrate` (it re-applies row-level security, grants and replica identity to the \
                 members; it does not recreate the publication, which only the first migration creates)"
            ),
        ), false));
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
    // A row filter or a column list on a synced table's membership: the stream silently lacks that table's
    // changes (a filter), or every change of it looks like a schema change and makes subscribers refetch (a list).
    let filtered: Vec<_> = crate::db::catalog::publication_filters(ctx.client)
        .await?
        .into_iter()
        .filter(|f| ctx.catalog.table(&f.table).is_some())
        .collect();
    if !filtered.is_empty() {
        findings.push(Finding::fail(
            format!(
                "{}: the live stream needs every change and every column of a synced table (a row filter drops \
                 changes without a trace, a column list makes every change a schema change that subscribers refetch)",
                filtered
                    .iter()
                    .map(|f| format!("{} has a {}", f.qualified, f.describe()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "re-add it without filter or column list, in one transaction (so that no change falls between the two): begin; {} commit; \
                 then clients that synced it while it was filtered should refetch it",
                filtered
                    .iter()
                    .map(|f| format!(
                        "alter publication {PUBLICATION} drop table {t}; alter publication {PUBLICATION} add table {t};",
                        t = f.qualified
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
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
    let unsynced: Vec<&str> = members
        .iter()
        .filter(|m| ctx.catalog.table(m).is_none())
        .map(|s| s.as_str())
        .collect();
    if !unsynced.is_empty() {
        // The catalog leaves them out and policies/ gives them nothing (no row-level security, no grants), so
        // `migrate` succeeds with them: a warning, not a failure.
        findings.push(Finding::warn(
            format!(
                "{} in {PUBLICATION} but not synced: a synced table needs id, owner_id and a primary key; the server \
                 ignores their changes and `migrate` gives them no row-level security or grants",
                unsynced.join(", ")
            ),
            format!(
                "add the missing columns or key and run `deeprecall-sync migrate`, or: alter publication \
                 {PUBLICATION} drop table {}",
                unsynced.join(", ")
            ),
        ));
    }
    if row.get::<_, bool>(4) {
        findings.push(Finding::warn(
            format!("{PUBLICATION} is FOR ALL TABLES: every table's changes are decoded"),
            "drop it and run `deeprecall-sync migrate` on a database without it, or recreate it FOR TABLE the synced \
             tables",
        ));
    }
    if ctx.catalog.names().is_empty() && outside.is_empty() {
        findings.push(Finding::fail(
            format!("{PUBLICATION} has no synced table"),
            format!(
                "as the owner of the tables: alter publication {PUBLICATION} add table <the synced tables>; then run \
                 `deeprecall-sync migrate`"
            ),
        ));
    }
    let repairable = filtered.is_empty();
    Ok((
        Check::from_findings(
            NAME,
            format!(
                "{PUBLICATION} publishes insert, update, delete, truncate of {} synced tables: {}",
                ctx.catalog.names().len(),
                ctx.catalog.names().join(", ")
            ),
            findings,
        ),
        repairable,
    ))
}

pub(super) async fn replica_identity(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
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
/// The per-client sequence records (sql/0003): row-level security like a synced table (policies/0002).
const CLIENTS: &str = "sync_clients";

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
        // Not `true`: the server's login role inherits the admin role and must read nothing unswitched.
        using: "( SELECT deeprecall_reads_all() AS deeprecall_reads_all)",
        with_check: None,
    },
];

/// What the pruner's policies hold to: only a session switched to the maintenance role (policies/0002).
const MAINTENANCE_USING: &str = "( SELECT (CURRENT_USER = 'deeprecall_maintenance'::name))";

/// The op-ledger pruner's policies (policies/0002): on the ledger only, for the maintenance role.
const LEDGER_POLICIES: &[ExpectedPolicy] = &[
    ExpectedPolicy {
        name: "retention_read",
        command: "SELECT",
        role: MAINTENANCE_ROLE,
        using: MAINTENANCE_USING,
        with_check: None,
    },
    ExpectedPolicy {
        name: "retention_prune",
        command: "DELETE",
        role: MAINTENANCE_ROLE,
        using: MAINTENANCE_USING,
        with_check: None,
    },
];

/// The policies `table` must have.
fn expected_policies(table: &str) -> impl Iterator<Item = &'static ExpectedPolicy> {
    let ledger = if table == LEDGER {
        LEDGER_POLICIES
    } else {
        &[]
    };
    EXPECTED_POLICIES.iter().chain(ledger)
}

pub(super) async fn row_level_security(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "row_level_security";
    let mut oids: Vec<u32> = ctx.tables().iter().map(|t| t.oid).collect();
    for table in [LEDGER, CLIENTS] {
        if let Some(row) = ctx
            .client
            .query_opt("select to_regclass($1)::oid", &[&table])
            .await?
            && let Some(oid) = row.get::<_, Option<u32>>(0)
        {
            oids.push(oid);
        }
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
                    .map(|t| format!("alter table {t} force row level security"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ));
    }
    for r in &rows {
        let table: String = r.get(0);
        for expected in expected_policies(&table) {
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
                && !expected_policies(&table).any(|e| e.name == p.get::<_, String>(1))
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
            "enabled and forced on {} tables (synced tables, {LEDGER}, {CLIENTS}), with owner_isolation and admin_read \
             (and the pruner's policies on {LEDGER})",
            rows.len()
        ),
        findings,
    ))
}

/// `migrating`: serve will run with --migrate, whose policies create a missing group role and grant the login role
/// its membership: those two findings are warnings then. A role that bypasses row-level security is not repaired by
/// anything and stays a failure.
pub(super) async fn roles(ctx: &Db<'_>, migrating: bool) -> Result<Check, tokio_postgres::Error> {
    const NAME: &str = "roles";
    let repaired = |detail: String, fix: String| {
        if migrating {
            Finding::warn(
                format!("{detail} (serve --migrate repairs this at start)"),
                fix,
            )
        } else {
            Finding::fail(detail, fix)
        }
    };
    let mut findings = Vec::new();
    for role in [USER_ROLE, ADMIN_ROLE, MAINTENANCE_ROLE] {
        let row = ctx
            .client
            .query_opt(
                "select rolsuper, rolbypassrls, rolcanlogin, pg_has_role(current_user, oid, 'MEMBER')
                   from pg_roles where rolname = $1",
                &[&role],
            )
            .await?;
        let Some(row) = row else {
            findings.push(repaired(
                format!("role {role} does not exist"),
                MIGRATE_FIX.to_owned(),
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
            findings.push(repaired(
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
            "{USER_ROLE}, {ADMIN_ROLE} and {MAINTENANCE_ROLE} exist without bypassrls; {} is a member of each",
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
    (LEDGER, MAINTENANCE_ROLE, &["SELECT", "DELETE"]),
    (CLIENTS, USER_ROLE, &["SELECT", "INSERT", "UPDATE"]),
    (CLIENTS, ADMIN_ROLE, &["SELECT"]),
    ("v_blob_inventory", USER_ROLE, &["SELECT"]),
    ("v_blob_inventory", ADMIN_ROLE, &["SELECT"]),
];

pub(super) async fn grants(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
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
        for role in [USER_ROLE, ADMIN_ROLE, MAINTENANCE_ROLE] {
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
                "{USER_ROLE}, {ADMIN_ROLE} and {MAINTENANCE_ROLE} hold their privileges on {} synced tables, \
                 {LEDGER}, {CLIENTS} and v_blob_inventory",
                tables.len()
            ),
        )
    } else {
        Check::fail(NAME, missing.join("; "), MIGRATE_FIX)
    })
}
