//! What a snapshot job is asked to do and what it answers.
//!
//! These types sit below everything that uses them: the session core starts jobs, the snapshot runner executes
//! them, and the hub's connection queue carries their reports (so a report is ordered exactly with the
//! transactions queued before it). Keeping them here means none of those modules imports another for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use uuid::Uuid;

use super::filter::Filter;
use super::handoff::Handoff;
use super::offset::Offset;
use super::routing::UserTxn;
use crate::db::catalog::Table;

/// What a pending subscription waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Initial (or refetch) snapshot.
    Snapshot,
    /// Resume: only the filter needs canonicalising; the hub's history does the rest.
    Resume(Offset),
}

/// One column a snapshot reads: its name and type OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotColumn {
    /// Column name.
    pub name: String,
    /// Type OID (decides how its text output is rendered).
    pub type_oid: u32,
}

/// A job: read one subscription's rows (or only validate its filter, for a resume).
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The user (rows are read as this user, under row-level security).
    pub owner: Uuid,
    /// Subscription id (the transport's name for it).
    pub sub_id: Arc<str>,
    /// Which attempt of that subscription this is (a report of a superseded attempt is ignored).
    pub epoch: u64,
    /// Table (from the catalog).
    pub table: Arc<Table>,
    /// Filter as the client sent it (canonicalised by the job unless it already is).
    pub filter: Filter,
    /// Snapshot or resume.
    pub purpose: Purpose,
    /// Columns to read; `None` = every non-generated column as of the snapshot (columns added since the catalog
    /// was loaded included).
    pub columns: Option<Arc<[SnapshotColumn]>>,
}

/// What a job established before its rows: enough to render them and to hand over to the live stream.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The filter with canonical values.
    pub filter: Filter,
    /// What the job was for.
    pub purpose: Purpose,
    /// Snapshot visibility and barrier (`None` for a resume).
    pub handoff: Option<Handoff>,
    /// The columns read, in the order of each row.
    pub columns: Arc<[SnapshotColumn]>,
    /// Slot generation the barrier came through (0 for a resume).
    pub generation: i64,
    /// The user's transactions the snapshot did not see but whose commits were streamed before its barrier
    /// ([`Hub::published_among`](super::hub::Hub::published_among), empty for a resume): those streamed before
    /// the subscription began buffering are delivered from here. `Err(reason)`: one may have been evicted from
    /// the history, and the subscription must refetch.
    pub earlier: Result<Vec<Arc<UserTxn>>, &'static str>,
}

/// A job's answer, delivered through the owner's hub queue.
#[derive(Debug)]
pub struct JobReport {
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Which attempt of that subscription this answers.
    pub epoch: u64,
    /// Data or error.
    pub result: Result<Prepared, JobError>,
}

/// Why a subscription could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A `where` value does not fit its column's type.
    #[error("invalid `where` value: {0}")]
    BadFilter(String),
    /// The replication stream did not deliver the barrier in time.
    #[error("the live stream is not available; retry")]
    StreamUnavailable,
    /// The shape's definition no longer fits the table (a column was dropped or retyped meanwhile).
    #[error("the table changed; refetch")]
    SchemaChanged,
    /// No snapshot place (per user or server-wide) came free within the queue timeout, or no spill file could be
    /// opened: retry after a backoff.
    #[error("too many snapshots are running; retry after a backoff")]
    Busy,
    /// Database trouble. The detail is logged, never sent: clients see a generic message (no database or library
    /// text reaches them).
    #[error("the database could not serve this subscription; retry")]
    Database(String),
}

impl JobError {
    /// Stable code for the client.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadFilter(_) => "invalid_where",
            Self::StreamUnavailable => "stream_unavailable",
            Self::SchemaChanged => "schema_changed",
            Self::Busy => "too_many_snapshots",
            Self::Database(_) => "database_error",
        }
    }
}

/// Whether the subscription attempt a job works for is still wanted. The attempt holds a [`WantedGuard`]; when it
/// goes (unsubscribed, started over as a new attempt, its connection closed), the job stops at its next step, also
/// while it waits in line for a snapshot place.
///
/// Why: the job used to stop only when its whole connection went. A client that subscribed and unsubscribed in a
/// loop left one job per round waiting in its user's line for up to `--snapshot-queue-timeout-ms`, each holding a
/// copy of the subscription's filter (up to a mebibyte), and each then read the user's rows for nobody.
#[derive(Debug, Default)]
pub struct Wanted {
    gone: AtomicBool,
    notify: Notify,
}

impl Wanted {
    /// Whether the attempt is gone.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Resolves once the attempt is gone (at once if it is already).
    pub async fn gone(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a drop in between still wakes this waiter.
            notified.as_mut().enable();
            if self.is_gone() {
                return;
            }
            notified.await;
        }
    }
}

/// Held by a subscription attempt while its job runs; dropping it tells the job ([`Wanted`]).
#[derive(Debug, Default)]
pub struct WantedGuard(Arc<Wanted>);

impl WantedGuard {
    /// What the job watches.
    pub fn watch(&self) -> Arc<Wanted> {
        self.0.clone()
    }
}

impl Drop for WantedGuard {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}
