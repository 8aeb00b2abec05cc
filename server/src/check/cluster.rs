//! Checks of what the PostgreSQL cluster provides: TLS, version, WAL and replication settings, the REPLICATION
//! right, and the slot.

use deeprecall_replication::slot;
use deeprecall_replication::stream::SslMode;

use super::report::human_bytes;
use super::{Check, CheckArgs, Db, Finding, connect};
use crate::db::DbIdentity;

/// Slot lag above which `check` warns: the server is down, or not keeping up.
const LAG_WARN_BYTES: i64 = 1 << 30;

pub(super) async fn tls(ctx: &Db<'_>, _args: &CheckArgs) -> Result<Check, tokio_postgres::Error> {
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

pub(super) fn server_version(ctx: &Db<'_>) -> Check {
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

pub(super) async fn wal_level(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
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

pub(super) async fn replication_slots(
    ctx: &Db<'_>,
    args: &CheckArgs,
) -> Result<Check, tokio_postgres::Error> {
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

pub(super) async fn wal_senders(
    ctx: &Db<'_>,
    args: &CheckArgs,
) -> Result<Check, tokio_postgres::Error> {
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

pub(super) async fn max_slot_wal_keep_size(ctx: &Db<'_>) -> Result<Check, tokio_postgres::Error> {
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

/// The REPLICATION right of the role the stream connects as, and, with a replication URL, that it reaches the
/// database DATABASE_URL reaches. `Err`: the replication URL cannot be reached.
pub(super) async fn replication_role(ctx: &Db<'_>, args: &CheckArgs) -> Result<Check, Check> {
    const NAME: &str = "replication_role";
    let query = "select current_user::text, rolreplication, rolsuper from pg_roles where rolname = current_user";
    let could_not = |e: tokio_postgres::Error| {
        Check::fail(
            NAME,
            format!("could not check: {}", crate::error::Chain(&e)),
            "run check as the role serve uses",
        )
    };
    let mut findings = Vec::new();
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
            // The slot is made, and the changes decoded, in the database the replication URL reaches: another
            // one than DATABASE_URL's streams nothing of this one (or another deployment's rows).
            let identities = match DbIdentity::read(ctx.client).await {
                Ok(ours) => DbIdentity::read(&client).await.map(|theirs| (ours, theirs)),
                Err(e) => Err(e),
            };
            let (ours, theirs) = match identities {
                Ok(pair) => pair,
                Err(e) => return Ok(could_not(e)),
            };
            if let Some(mismatch) = theirs.mismatch(&ours) {
                findings.push(Finding::fail(
                    format!("{mismatch}, and serve refuses to start"),
                    "point DEEPRECALL_REPLICATION_URL at the same host, port and database as DATABASE_URL (only \
                     the role and its password may differ)",
                ));
            }
            (
                client.query_one(query, &[]).await,
                "DEEPRECALL_REPLICATION_URL",
            )
        }
    };
    let row = match row {
        Ok(r) => r,
        Err(e) => return Ok(could_not(e)),
    };
    let (role, replication, superuser): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !(replication || superuser) {
        findings.push(Finding::fail(
            format!(
                "{role} ({via}) lacks REPLICATION: the live stream cannot open its replication connection"
            ),
            format!(
                "as a superuser: alter role {role} replication; or give serve a role that has it in \
                 DEEPRECALL_REPLICATION_URL"
            ),
        ));
    }
    Ok(Check::from_findings(
        NAME,
        format!(
            "{role} ({via}) has {}{}",
            if replication {
                "REPLICATION"
            } else {
                "superuser (REPLICATION included)"
            },
            if via == "DATABASE_URL" {
                ""
            } else {
                ", and reaches the same database as DATABASE_URL"
            }
        ),
        findings,
    ))
}

pub(super) async fn slot_state(
    ctx: &Db<'_>,
    args: &CheckArgs,
) -> Result<Check, tokio_postgres::Error> {
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
        let what = if info.slot_type == "physical" {
            // A physical slot has neither plugin nor database (a standby's or a base backup's).
            "a physical slot (a standby's or a backup's)".to_owned()
        } else {
            format!(
                "a {} slot with plugin {} on database {}",
                info.slot_type, info.plugin, info.database
            )
        };
        return Ok(Check::fail(
            NAME,
            format!("{} is {what}: serve refuses it", args.slot),
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
