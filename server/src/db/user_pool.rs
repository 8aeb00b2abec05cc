//! The pool as users draw on it: each user holds at most a share of its connections at once.
//!
//! ```text
//!  request of user U ──► U's place (at most --max-db-connections-per-user)  ─┐ one deadline:
//!                    ──► a pooled connection (--pool-size, all users)        ─┘ --pool-wait-timeout-ms
//!                        └─ no place in time: 429 too_many_requests · no connection in time: 503 database_busy
//! ```
//!
//! Why: the pool is first come, first served. A user's request waits for a connection, then holds it for its
//! whole transaction, and nothing bounded how many one user held or waited for. One user with 100 connections, each
//! posting 1000-op batches that update the same rows (so that every transaction waits for the one before it),
//! kept all 16 connections and the pool's queue full: another user's 1-op batch took 5 s and was answered 503
//! (0.8 ms alone). With 32 such connections it took 1 s. Now a user's surplus requests wait in a line of their own,
//! which holds no connection, and the pool's queue has at most a share of anyone's requests in it.
//!
//! The place is taken before the connection and given back after it, so a user never holds more connections than
//! places. Server-wide work (the catalog reload, the ledger pruner, health, metrics, admin reports) takes
//! connections from the pool directly.
//!
//! A request ends when its client goes away (hyper drops the handler), but what it already sent to Postgres does
//! not: Postgres runs it to its end, here perhaps waiting for a row lock. So a [`UserConnection`] dropped before
//! [`UserConnection::settled`] goes back to the pool, and gives back the user's place, only once Postgres has
//! answered everything sent on it ([`super::settle`], on a task of its own). Before, it went back at once with the
//! transaction still running in it: a user abandoning batch after batch that waited on a lock kept every pooled
//! connection busy while holding no place, and another user's batch, handed one of them, waited behind that lock.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};
use tokio::time::Instant;
use uuid::Uuid;

use super::Scope;
use crate::live::admission::{PerUserLimit, UserPermit};

/// The write pool, with a per-user share.
#[derive(Debug)]
pub struct UserPool {
    pool: Pool,
    per_user: Arc<PerUserLimit>,
    wait: Duration,
}

/// A pooled connection held for one user; derefs to the connection. Dropping it returns the connection to the pool
/// and then the user's place: at once once [`UserConnection::settled`] was called, otherwise when Postgres has
/// answered everything sent on it.
#[derive(Debug)]
pub struct UserConnection {
    /// `None` only while dropping.
    connection: Option<Object>,
    place: Option<UserPermit>,
    settled: bool,
    user: Uuid,
}

/// Why no connection was handed out.
#[derive(Debug, thiserror::Error)]
pub enum UserPoolError {
    /// The user's requests held their whole share for the wait timeout.
    #[error(
        "this user's requests hold {0} database connections, the most one user may hold at once"
    )]
    Share(usize),
    /// The pool had none free in time, or could not connect.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl UserPool {
    /// At most `per_user` of `pool`'s connections per user (at least 1); a request waits at most `wait` for both its
    /// place and its connection. How long its statements wait for a lock is the pool's sessions' `lock_timeout`
    /// ([`super::PgTarget::with_lock_timeout`]).
    pub fn new(pool: Pool, per_user: usize, wait: Duration) -> Self {
        Self {
            pool,
            per_user: PerUserLimit::new(per_user),
            wait,
        }
    }

    /// Connections `user` holds now.
    pub fn held_by(&self, user: Uuid) -> usize {
        self.per_user.taken(user)
    }

    /// A connection for `user`: first a place in the user's line, then one from the pool, both by one deadline.
    pub async fn get(&self, user: Uuid) -> Result<UserConnection, UserPoolError> {
        let deadline = Instant::now() + self.wait;
        let Some(place) = self.per_user.acquire(user, deadline).await else {
            crate::metrics::db_connection_refused("user_share");
            return Err(UserPoolError::Share(self.per_user.limit()));
        };
        let connection = super::get_by(&self.pool, deadline).await?;
        Ok(UserConnection {
            connection: Some(connection),
            place: Some(place),
            settled: false,
            user,
        })
    }
}

impl UserConnection {
    /// How this user's transactions on this connection start: as the user ([`Scope::user`]). They wait at most
    /// `--lock-timeout-ms` for a lock, the pool's session setting ([`super::PgTarget::with_lock_timeout`]). A share
    /// bounds how many connections a user's requests hold; the lock timeout bounds for how long, when they wait for
    /// a lock that someone else (an operator's `CREATE INDEX`, a forgotten open transaction) holds: without it they
    /// would hold the user's places, and fill the pool, for as long as the lock is held.
    pub fn scope(&self) -> Scope<'static> {
        Scope::user(self.user)
    }

    /// Says that every statement sent on the connection has been answered (the handler awaited them all), so that
    /// dropping it needs no round trip to make sure. Call it after the last `await` on the connection; a handler
    /// that returns early without it only costs that round trip.
    pub fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (Some(connection), place) = (self.connection.take(), self.place.take()) else {
            return;
        };
        // Outside a runtime (never in the server) there is nothing to wait with: the fields drop as they are.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                super::settle(&connection).await;
                drop(connection);
                drop(place);
            });
        }
    }
}

impl std::ops::Deref for UserConnection {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.connection.as_ref().expect("taken only while dropping")
    }
}

impl std::ops::DerefMut for UserConnection {
    fn deref_mut(&mut self) -> &mut Object {
        self.connection.as_mut().expect("taken only while dropping")
    }
}
