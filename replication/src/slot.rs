//! Publication and slot SQL, on an ordinary (non-replication) connection.
//!
//! The publication is created by the schema migration (it is part of the schema: it lists the synced tables).
//! The slot belongs to the running server: created when missing, validated when present, recreated when Postgres
//! invalidated it (`wal_status = 'lost'`, after `max_slot_wal_keep_size` was exceeded while we were away).

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::protocol::Lsn;

/// What `pg_replication_slots` says about a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Output plugin (`pgoutput` expected).
    pub plugin: String,
    /// `logical` expected.
    pub slot_type: String,
    /// Database it decodes.
    pub database: String,
    /// Held by a walsender right now.
    pub active: bool,
    /// Position Postgres will resume from.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is lost (null when unlimited).
    pub safe_wal_size: Option<i64>,
    /// WAL bytes the slot pins (`pg_current_wal_lsn() - restart_lsn`).
    pub retained_bytes: Option<i64>,
}

impl SlotInfo {
    /// Whether Postgres invalidated the slot.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Slot management failures.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The slot exists but is not a pgoutput logical slot of this database: an operator must look.
    #[error(
        "replication slot {slot} exists but is a {slot_type} slot with plugin {plugin} on database {database}; \
         drop it or configure another slot name"
    )]
    Incompatible {
        /// Slot name.
        slot: String,
        /// Its type.
        slot_type: String,
        /// Its plugin.
        plugin: String,
        /// Its database.
        database: String,
    },
    /// Slot names are plain identifiers.
    #[error("invalid slot name {0:?}: use lowercase letters, digits and underscores")]
    InvalidName(String),
    /// Database error.
    #[error("slot management: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Whether `name` is a valid slot name (Postgres's rule).
pub fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Reads the slot's state, if it exists.
pub async fn slot_info(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select plugin::text, slot_type::text, coalesce(database::text, ''), active,
                    confirmed_flush_lsn::text, wal_status::text, safe_wal_size,
                    (pg_current_wal_lsn() - restart_lsn)::bigint
               from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get::<_, Option<String>>(0).unwrap_or_default(),
        slot_type: r.get(1),
        database: r.get(2),
        active: r.get(3),
        confirmed_flush_lsn: r.get::<_, Option<String>>(4).and_then(|s| s.parse().ok()),
        wal_status: r.get(5),
        safe_wal_size: r.get(6),
        retained_bytes: r.get(7),
    }))
}

/// The walsender streaming from a slot: who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHolder {
    /// Its backend pid.
    pub pid: i32,
    /// Its `application_name` (deeprecall-sync's is `deeprecall-sync-replication`).
    pub application_name: Option<String>,
    /// Client address (`None` for a local socket).
    pub client_addr: Option<String>,
    /// When its connection started.
    pub since: Option<String>,
}

impl std::fmt::Display for SlotHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "walsender pid {} ({} from {}, since {})",
            self.pid,
            self.application_name
                .as_deref()
                .unwrap_or("unknown application"),
            self.client_addr.as_deref().unwrap_or("a local socket"),
            self.since.as_deref().unwrap_or("?")
        )
    }
}

/// Who streams from `slot` right now, if anyone.
pub async fn slot_holder(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotHolder>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select s.active_pid, r.application_name, r.client_addr::text, r.backend_start::text
               from pg_replication_slots s left join pg_stat_replication r on r.pid = s.active_pid
              where s.slot_name = $1 and s.active_pid is not null",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotHolder {
        pid: r.get(0),
        application_name: r.get(1),
        client_addr: r.get(2),
        since: r.get(3),
    }))
}

/// What [`ensure_slot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOutcome {
    /// The slot existed and is usable.
    Existing,
    /// The slot was missing and was created.
    Created,
    /// The slot was lost (or unusable) and was dropped and created again: history before it is gone.
    Recreated,
}

/// Makes sure a usable pgoutput slot called `slot` exists in the current database.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotOutcome, SlotError> {
    if !valid_slot_name(slot) {
        return Err(SlotError::InvalidName(slot.to_owned()));
    }
    let db: String = client
        .query_one("select current_database()::text", &[])
        .await?
        .get(0);
    match slot_info(client, slot).await? {
        None => {
            create_slot(client, slot).await?;
            Ok(SlotOutcome::Created)
        }
        Some(info)
            if info.plugin != "pgoutput" || info.slot_type != "logical" || info.database != db =>
        {
            Err(SlotError::Incompatible {
                slot: slot.to_owned(),
                slot_type: info.slot_type,
                plugin: info.plugin,
                database: info.database,
            })
        }
        Some(info) if info.is_lost() => {
            recreate_slot(client, slot).await?;
            Ok(SlotOutcome::Recreated)
        }
        Some(_) => Ok(SlotOutcome::Existing),
    }
}

/// Creates the slot. Its consistent point is "now": nothing committed before is ever streamed.
pub async fn create_slot(client: &Client, slot: &str) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    Ok(row.get::<_, String>(0).parse().unwrap_or_default())
}

/// Drops (retrying while a departing walsender still holds it) and creates the slot again.
pub async fn recreate_slot(client: &Client, slot: &str) -> Result<Lsn, tokio_postgres::Error> {
    drop_slot(client, slot).await?;
    create_slot(client, slot).await
}

/// Drops the slot if it exists. Right after a replication connection closes, its walsender may hold the slot for
/// a moment (SQLSTATE 55006): retry for a few seconds.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let mut attempt = 0;
    loop {
        match client
            .execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && attempt < 50 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
