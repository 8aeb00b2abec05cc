//! Who may start a snapshot now, and who may open another socket.
//!
//! ```text
//!  subscribe / GET /v1/shape?offset=-1
//!     │ per-user place (at most M of one user's jobs, until its rows are delivered) ── wait ≤ queue timeout
//!     │ snapshot connection (a pool of its own, N connections, until the rows are read) ── same deadline
//!     ▼                                                       └─ timeout: `too_many_snapshots` / 503 Retry-After
//!  snapshot job (snapshot.rs)
//! ```
//!
//! Why two limits: the global one (N) bounds what snapshots cost Postgres, and since the connections are a pool of
//! their own, no number of snapshots can take the write path's connections. It is held only while rows are read,
//! which no longer depends on the client (spill.rs). The per-user one (M) is held until the rows are delivered:
//! a client that reads slowly (or not at all) only delays its own user's next snapshots, and one user's spill files
//! are bounded by M snapshots. Both waits share one deadline, then the job fails with a retryable error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use super::spill::{SpoolConfig, SpoolError, SpoolReader, SpoolWriter, spool};

/// At most `limit` places per user. Users without a place taken have no entry.
#[derive(Debug)]
pub struct PerUserLimit {
    limit: usize,
    users: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
}

/// One user's place; given back on drop.
#[derive(Debug)]
pub struct UserPermit {
    owner: Arc<PerUserLimit>,
    user: Uuid,
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl PerUserLimit {
    /// A limit of `limit` places per user (at least 1).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn semaphore(&self, user: Uuid) -> Arc<Semaphore> {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user)
            .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
            .clone()
    }

    /// A place for `user` if one is free now.
    pub fn try_acquire(self: &Arc<Self>, user: Uuid) -> Option<UserPermit> {
        self.try_acquire_many(user, 1)
    }

    /// `n` places for `user` at once, if they are free now (a limit counted in units, e.g. KiB of bodies).
    pub fn try_acquire_many(self: &Arc<Self>, user: Uuid, n: u32) -> Option<UserPermit> {
        let semaphore = self.semaphore(user);
        let permit = semaphore.clone().try_acquire_many_owned(n).ok();
        self.permit(user, semaphore, permit)
    }

    /// A place for `user`, waiting in line (first come, first served) until `deadline`. A free place is taken
    /// without arming a timer (the common case; a semaphore with waiters has no free place, so nobody jumps the line).
    pub async fn acquire(self: &Arc<Self>, user: Uuid, deadline: Instant) -> Option<UserPermit> {
        let semaphore = self.semaphore(user);
        let permit = match semaphore.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => tokio::time::timeout_at(deadline, semaphore.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        };
        self.permit(user, semaphore, permit)
    }

    /// Users with a place taken (or waited for) now.
    pub fn users(&self) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Places of `user` taken now.
    pub fn taken(&self, user: Uuid) -> usize {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&user)
            .map_or(0, |s| self.limit - s.available_permits())
    }

    fn permit(
        self: &Arc<Self>,
        user: Uuid,
        semaphore: Arc<Semaphore>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<UserPermit> {
        // Built even without a permit, so that dropping it removes an entry nobody uses any more.
        let permit = UserPermit {
            owner: self.clone(),
            user,
            semaphore,
            permit,
        };
        permit.permit.is_some().then_some(permit)
    }
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut users = self.owner.users.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours only: no holder, no waiter (each holds a clone), so the entry can go. Under
        // the lock, so no one can clone it from the map meanwhile.
        if Arc::strong_count(&self.semaphore) == 2 {
            users.remove(&self.user);
        }
    }
}

/// Settings of the snapshot limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Snapshot (and resume) jobs reading from Postgres at once, server-wide: the size of their own pool.
    pub concurrency: usize,
    /// One user's snapshot jobs at once, from start until their rows are delivered.
    pub per_user: usize,
    /// How long a job waits for both places before it fails with a retryable error.
    pub queue_timeout: Duration,
    /// Bytes of rows one snapshot keeps in memory before spilling to a temporary file.
    pub buffer_bytes: usize,
    /// Bytes of rows all snapshots together keep in memory.
    pub buffer_total_bytes: usize,
    /// Spill files open at once, server-wide (one file descriptor each); a snapshot that would need one more
    /// fails with a retryable error.
    pub spill_files: usize,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        Self {
            concurrency: 4,
            per_user: 2,
            queue_timeout: Duration::from_secs(30),
            buffer_bytes: 4 * 1024 * 1024,
            buffer_total_bytes: 64 * 1024 * 1024,
            spill_files: 512,
        }
    }
}

/// Why a job could not start.
#[derive(Debug)]
pub enum AdmitError {
    /// No place (per user or server-wide) within the queue timeout.
    Busy,
    /// The snapshot pool could not open a connection.
    Database(PoolError),
}

/// The snapshot limits of one server: its own connection pool, the per-user places, the spool budget.
#[derive(Debug)]
pub struct SnapshotCapacity {
    pool: Pool,
    per_user: Arc<PerUserLimit>,
    queue_timeout: Duration,
    spool: SpoolConfig,
    waiting: AtomicUsize,
    rejected: AtomicU64,
}

/// A job's per-user place and the deadline for its connection.
#[derive(Debug)]
pub struct Admission {
    place: Arc<UserPermit>,
    deadline: Instant,
}

impl Admission {
    /// The place, for a task that must keep it after the job ends (the reader, until Postgres is done with its
    /// connection). The place is given back when the admission and every share are dropped.
    pub fn share(&self) -> Arc<UserPermit> {
        self.place.clone()
    }
}

/// What the snapshot limits are doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Snapshot connections in use (jobs reading rows).
    pub reading: usize,
    /// Jobs waiting for a place or a connection.
    pub waiting: usize,
    /// Jobs refused after the queue timeout, since start.
    pub rejected: u64,
    /// Bytes of rows held in memory by spools.
    pub buffered_bytes: usize,
    /// Bytes written to spill files, since start.
    pub spilled_bytes: u64,
    /// Spill files open now.
    pub spill_files_open: usize,
}

struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SnapshotCapacity {
    /// Closes the snapshot pool (server shutdown): idle connections end now, busy ones when returned.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Limits over `pool` (the snapshot jobs' own pool, sized `limits.concurrency`).
    pub fn new(pool: Pool, limits: &SnapshotLimits) -> Self {
        Self {
            pool,
            per_user: PerUserLimit::new(limits.per_user),
            queue_timeout: limits.queue_timeout,
            spool: SpoolConfig::new(
                limits.buffer_bytes,
                limits.buffer_total_bytes,
                limits.spill_files.max(1),
            ),
            waiting: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Waits in line for one of `owner`'s places.
    pub async fn admit(&self, owner: Uuid) -> Result<Admission, AdmitError> {
        let deadline = Instant::now() + self.queue_timeout;
        let _waiting = Waiting::new(&self.waiting);
        match self.per_user.acquire(owner, deadline).await {
            Some(place) => Ok(Admission {
                place: Arc::new(place),
                deadline,
            }),
            None => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(AdmitError::Busy)
            }
        }
    }

    /// A snapshot connection, waiting in line until the admission's deadline.
    pub async fn connection(&self, admission: &Admission) -> Result<Object, AdmitError> {
        let _waiting = Waiting::new(&self.waiting);
        match crate::db::get_by(&self.pool, admission.deadline).await {
            Ok(c) => Ok(c),
            Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(AdmitError::Busy)
            }
            Err(e) => Err(AdmitError::Database(e)),
        }
    }

    /// A new spool with this server's budgets.
    pub fn spool<E: From<SpoolError>>(&self) -> (SpoolWriter<E>, SpoolReader<E>) {
        spool(self.spool.clone())
    }

    /// What the limits are doing now.
    pub fn stats(&self) -> SnapshotStats {
        let status = self.pool.status();
        SnapshotStats {
            reading: status.size.saturating_sub(status.available),
            waiting: self.waiting.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            buffered_bytes: self.spool.budget.used(),
            spilled_bytes: self.spool.stats.spilled_bytes.load(Ordering::Relaxed),
            spill_files_open: self.spool.stats.files_open.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn places_per_user_are_bounded_and_given_back() {
        let limit = PerUserLimit::new(2);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = limit.try_acquire(a).expect("first");
        let second = limit.try_acquire(a).expect("second");
        assert!(limit.try_acquire(a).is_none(), "a third place of one user");
        assert!(
            limit.try_acquire(b).is_some(),
            "another user is not affected"
        );
        assert_eq!(limit.taken(a), 2);

        // A waiter gets the next free place; one that waits too long gets none.
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(limit.acquire(a, soon).await.is_none());
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move {
                limit
                    .acquire(a, Instant::now() + Duration::from_secs(10))
                    .await
                    .is_some()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert!(waiter.await.unwrap());
        drop(second);
        // Nothing taken, nobody waiting: no entry is kept.
        assert_eq!(limit.taken(a), 0);
        assert!(limit.users.lock().unwrap().is_empty());
    }
}
