//! The fan-out hub: owner -> connections, the bounded per-user history that serves resumes, barriers, and the
//! processed stream position.
//!
//! ```text
//! replicator ──publish(Routed)──► Hub (one mutex) ──try_send──► connection queues (bounded)
//!                                   │    history: per-user ring + global byte budget
//!                                   └─── barriers: snapshot tasks wait for their marker
//! ```
//!
//! Everything that must be atomic with respect to publishing happens under the one lock: appending to history,
//! pushing to queues, registering a connection, copying history for a resume, completing a barrier. That is what
//! makes "history copy + queue" gap-free and duplicate-free (a subscription delivers queued transactions only
//! past the position it copied up to). The router never waits on a client: a full queue marks the connection
//! lagging and it is closed with the "resume" code.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use super::job::JobReport;
use super::offset::Offset;
use super::routing::{Routed, UserTxn};

/// What a connection's queue carries.
#[derive(Debug)]
pub enum ConnEvent {
    /// A committed transaction of this connection's user.
    Txn(Arc<UserTxn>),
    /// Subscriptions on a table (or all) must refetch. Boxed: rare, and it would double every queue slot.
    Refetch(Box<Refetch>),
    /// A snapshot job's report (after its rows, or before them for the HTTP shape endpoint).
    Job(Box<JobReport>),
}

/// Subscriptions on `table` (every table when `None`) must refetch.
#[derive(Debug)]
pub struct Refetch {
    /// The table, or all.
    pub table: Option<Arc<str>>,
    /// Why (sent to the client).
    pub reason: &'static str,
}

/// Limits of the hub.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// Queue capacity per connection, in transactions.
    pub queue_capacity: usize,
    /// Transactions kept per user for resumes.
    pub history_per_user: usize,
    /// Total bytes of history kept for all users.
    pub history_bytes: usize,
    /// Truncations remembered (a resume across one of its table refetches).
    pub truncate_memory: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            history_per_user: 1000,
            history_bytes: 256 * 1024 * 1024,
            truncate_memory: 256,
        }
    }
}

/// Handle the hub keeps per connection.
#[derive(Debug)]
struct ConnEntry {
    id: u64,
    tx: mpsc::Sender<ConnEvent>,
    lag: Arc<LagSignal>,
}

/// Raised by the hub when a connection's queue overflowed.
#[derive(Debug, Default)]
pub struct LagSignal {
    lagged: AtomicBool,
    notify: Notify,
}

impl LagSignal {
    /// Waits until the connection is marked lagging.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.lagged.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Whether the connection was marked lagging.
    pub fn is_raised(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }

    fn raise(&self) {
        self.lagged.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct UserHistory {
    /// `(sequence number, transaction)`, oldest first.
    txns: VecDeque<(u64, Arc<UserTxn>)>,
    /// Positions <= this are incomplete for this user (something was evicted).
    horizon: u64,
}

#[derive(Debug)]
struct Inner {
    generation: i64,
    /// Positions before this were never seen by this process (or this slot generation).
    start: u64,
    /// Everything up to here has been processed (published or skipped).
    position: u64,
    conns: HashMap<Uuid, Vec<ConnEntry>>,
    history: HashMap<Uuid, UserHistory>,
    /// Global age order of history entries as `(sequence, owner)`. Entries already evicted by the per-user cap
    /// stay until they reach the front (recognised by their sequence) or the queue is rebuilt.
    fifo: VecDeque<(u64, Uuid)>,
    seq: u64,
    live_entries: usize,
    history_bytes: usize,
    truncates: VecDeque<(u64, Arc<str>)>,
    truncate_horizon: u64,
    barriers: HashMap<String, oneshot::Sender<u64>>,
    next_id: u64,
}

/// The hub. Cheap to share (`Arc<Hub>`).
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    connections: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::watch::Sender<bool>,
    config: HubConfig,
    position_tx: tokio::sync::watch::Sender<u64>,
}

/// A resume that cannot be served: the client must refetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CannotResume(pub &'static str);

/// Counters for `/v1/admin/replication` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HubStats {
    /// Slot generation.
    pub generation: i64,
    /// Processed stream position.
    pub position: String,
    /// Connected users.
    pub users: usize,
    /// Open connections.
    pub connections: usize,
    /// Users with history.
    pub history_users: usize,
    /// Bytes of history.
    pub history_bytes: usize,
}

impl Hub {
    /// A hub at generation 0 with nothing seen.
    pub fn new(config: HubConfig) -> Self {
        let (position_tx, _) = tokio::sync::watch::channel(0);
        let (closed, _) = tokio::sync::watch::channel(false);
        Self {
            connections: std::sync::atomic::AtomicUsize::new(0),
            closed,
            inner: Mutex::new(Inner {
                generation: 0,
                start: u64::MAX,
                position: 0,
                conns: HashMap::new(),
                history: HashMap::new(),
                fifo: VecDeque::new(),
                seq: 0,
                live_entries: 0,
                history_bytes: 0,
                truncates: VecDeque::new(),
                truncate_horizon: 0,
                barriers: HashMap::new(),
                next_id: 0,
            }),
            config,
            position_tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough data (every step is a single push or pop);
        // keep serving rather than poisoning every connection.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the replicator when streaming (re)starts. `start` is the slot's confirmed position. A new
    /// generation means the slot was recreated: history is dropped and every subscription refetches.
    pub fn stream_started(&self, generation: i64, start: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            let first = inner.generation == 0;
            inner.generation = generation;
            inner.start = start;
            inner.position = inner.position.max(start);
            inner.history.clear();
            inner.fifo.clear();
            inner.live_entries = 0;
            inner.history_bytes = 0;
            inner.truncates.clear();
            inner.truncate_horizon = start;
            if !first {
                broadcast(&mut inner, None, "slot_recreated");
            }
        }
        let position = inner.position;
        drop(inner);
        self.position_tx.send_replace(position);
    }

    /// The current generation and processed position.
    pub fn position(&self) -> Offset {
        let inner = self.lock();
        Offset {
            generation: inner.generation,
            lsn: inner.position,
        }
    }

    /// Watches the processed position.
    pub fn watch_position(&self) -> tokio::sync::watch::Receiver<u64> {
        self.position_tx.subscribe()
    }

    /// Registers a connection of `owner`: from now on every committed transaction of the user is queued for it.
    /// Returns the registration (dropping it unregisters), the queue and its sender, and the lag signal.
    pub fn register(
        self: &Arc<Self>,
        owner: Uuid,
    ) -> (
        Registration,
        mpsc::Receiver<ConnEvent>,
        mpsc::Sender<ConnEvent>,
        Arc<LagSignal>,
    ) {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity);
        let lag = Arc::new(LagSignal::default());
        let mut inner = self.lock();
        self.connections.fetch_add(1, Ordering::Relaxed);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.conns.entry(owner).or_default().push(ConnEntry {
            id,
            tx: tx.clone(),
            lag: lag.clone(),
        });
        let registration = Registration {
            hub: self.clone(),
            owner,
            id,
        };
        (registration, rx, tx, lag)
    }

    /// Removes a connection.
    fn unregister(&self, owner: Uuid, id: u64) {
        let mut inner = self.lock();
        if let Some(list) = inner.conns.get_mut(&owner) {
            let before = list.len();
            list.retain(|c| c.id != id);
            self.connections
                .fetch_sub(before - list.len(), Ordering::Relaxed);
            if list.is_empty() {
                inner.conns.remove(&owner);
            }
        }
    }

    /// Publishes one routed transaction at stream position `end_lsn` (called in commit order).
    pub fn publish(&self, routed: Routed, end_lsn: u64) {
        let mut inner = self.lock();
        let generation = inner.generation;
        for mut txn in routed.per_owner {
            txn.generation = generation;
            let txn = Arc::new(txn);
            if let Some(conns) = inner.conns.get(&txn.owner) {
                for c in conns {
                    if c.tx.try_send(ConnEvent::Txn(txn.clone())).is_err() {
                        c.lag.raise();
                    }
                }
            }
            self.remember(&mut inner, txn);
        }
        let marks = routed
            .truncated
            .into_iter()
            .map(|t| (t, "truncated"))
            .chain(
                routed
                    .schema_changed
                    .into_iter()
                    .map(|t| (t, "schema_changed")),
            );
        for (table, reason) in marks {
            inner.truncates.push_back((end_lsn, table.clone()));
            if inner.truncates.len() > self.config.truncate_memory
                && let Some((lsn, _)) = inner.truncates.pop_front()
            {
                inner.truncate_horizon = lsn;
            }
            broadcast(&mut inner, Some(table), reason);
        }
        inner.position = inner.position.max(end_lsn);
        for id in routed.barriers {
            if let Some(waiter) = inner.barriers.remove(&id) {
                let _ = waiter.send(end_lsn);
            }
        }
        let position = inner.position;
        drop(inner);
        self.position_tx.send_replace(position);
    }

    /// Advances the position without a transaction (idle keepalive).
    pub fn advance(&self, lsn: u64) {
        let mut inner = self.lock();
        if lsn > inner.position {
            inner.position = lsn;
            drop(inner);
            self.position_tx.send_replace(lsn);
        }
    }

    fn remember(&self, inner: &mut Inner, txn: Arc<UserTxn>) {
        let owner = txn.owner;
        inner.seq += 1;
        let seq = inner.seq;
        let start = inner.start;
        inner.history_bytes += txn.bytes;
        inner.live_entries += 1;
        inner.fifo.push_back((seq, owner));
        let history = inner.history.entry(owner).or_insert_with(|| UserHistory {
            txns: VecDeque::new(),
            horizon: start,
        });
        history.txns.push_back((seq, txn));
        if history.txns.len() > self.config.history_per_user {
            evict_oldest(inner, owner);
        }
        // Global budget: evict the oldest entries across all users.
        while inner.history_bytes > self.config.history_bytes {
            let Some((seq, user)) = inner.fifo.pop_front() else {
                break;
            };
            let current = inner
                .history
                .get(&user)
                .and_then(|h| h.txns.front())
                .is_some_and(|(s, _)| *s == seq);
            if current {
                evict_oldest(inner, user);
            }
        }
        // Drop stale fronts, and rebuild when stale entries pile up behind an old live one.
        while let Some((seq, user)) = inner.fifo.front().copied() {
            let live = inner
                .history
                .get(&user)
                .is_some_and(|h| h.txns.front().is_some_and(|(s, _)| *s <= seq));
            if live {
                break;
            }
            inner.fifo.pop_front();
        }
        if inner.fifo.len() > 4 * inner.live_entries + 4096 {
            let mut all: Vec<(u64, Uuid)> = inner
                .history
                .iter()
                .flat_map(|(u, h)| h.txns.iter().map(move |(s, _)| (*s, *u)))
                .collect();
            all.sort_unstable();
            inner.fifo = all.into();
        }
    }

    /// For a resume of `owner`'s subscription on `table` from `from`: the transactions after it and the position
    /// they reach (deliver queued transactions only past that position), or why it cannot be served.
    pub fn resume(
        &self,
        owner: Uuid,
        table: &str,
        from: Offset,
    ) -> Result<(Vec<Arc<UserTxn>>, u64), CannotResume> {
        let inner = self.lock();
        if from.generation != inner.generation {
            return Err(CannotResume("offset_from_another_slot_generation"));
        }
        if from.lsn > inner.position {
            return Err(CannotResume("offset_ahead_of_server"));
        }
        if from.lsn < inner.start {
            return Err(CannotResume("offset_older_than_server_history"));
        }
        if from.lsn < inner.truncate_horizon
            || inner
                .truncates
                .iter()
                .any(|(lsn, t)| *lsn > from.lsn && &**t == table)
        {
            // A truncate or a schema change of this table happened after the offset: history cannot express it.
            return Err(CannotResume("table_truncated"));
        }
        let txns = match inner.history.get(&owner) {
            None => Vec::new(),
            Some(h) => {
                if from.lsn < h.horizon {
                    return Err(CannotResume("offset_older_than_server_history"));
                }
                h.txns
                    .iter()
                    .filter(|(_, t)| t.end_lsn.0 > from.lsn)
                    .map(|(_, t)| t.clone())
                    .collect()
            }
        };
        Ok((txns, inner.position))
    }

    /// Waits (at most `limit`) until the stream has started and, for an offset of the current generation, has
    /// processed up to it. A process that just started has generation 0 and position 0 until the replicator's
    /// first `stream_started`, and its position may trail an offset issued by the previous process (idle
    /// keepalives advance it): resuming earlier would refuse offsets that are perfectly servable.
    pub async fn ready_for(&self, from: Offset, limit: std::time::Duration) {
        let mut changes = self.position_tx.subscribe();
        let _ = tokio::time::timeout(limit, async {
            loop {
                {
                    let inner = self.lock();
                    if inner.generation != 0
                        && (inner.generation != from.generation || inner.position >= from.lsn)
                    {
                        return;
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Waits (at most `limit`) until the replicator has made sure the slot exists and is about to stream; returns
    /// whether it has.
    pub async fn wait_started(&self, limit: std::time::Duration) -> bool {
        let mut changes = self.position_tx.subscribe();
        tokio::time::timeout(limit, async {
            loop {
                if self.lock().generation != 0 {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && self.lock().generation != 0
    }

    /// Registers a barrier; the receiver yields the position of the transaction that carried it.
    pub fn barrier(&self, id: String) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        self.lock().barriers.insert(id, tx);
        rx
    }

    /// Forgets a barrier that will never come (the emitting statement failed).
    pub fn cancel_barrier(&self, id: &str) {
        self.lock().barriers.remove(id);
    }

    /// Open connections (lock-free).
    pub fn stats_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Marks the stream as stopped for good (server shutdown): nothing will be published any more.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Waits until [`Hub::close`] was called.
    pub async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Counters.
    pub fn stats(&self) -> HubStats {
        let inner = self.lock();
        HubStats {
            generation: inner.generation,
            position: deeprecall_replication::Lsn(inner.position).to_string(),
            users: inner.conns.len(),
            connections: inner.conns.values().map(Vec::len).sum(),
            history_users: inner.history.len(),
            history_bytes: inner.history_bytes,
        }
    }
}

/// A connection's place in the hub; dropping it unregisters the connection (also when a request is cancelled).
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    owner: Uuid,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.owner, self.id);
    }
}

/// Evicts `user`'s oldest history entry, moving that user's horizon past it.
fn evict_oldest(inner: &mut Inner, user: Uuid) {
    let Some(h) = inner.history.get_mut(&user) else {
        return;
    };
    if let Some((_, old)) = h.txns.pop_front() {
        h.horizon = h.horizon.max(old.end_lsn.0);
        inner.history_bytes -= old.bytes;
        inner.live_entries -= 1;
    }
}

/// Tells every connection that subscriptions on `table` (or all) must refetch. A connection whose queue is full
/// is marked lagging instead: it reconnects, and its resume then fails into a refetch anyway.
fn broadcast(inner: &mut Inner, table: Option<Arc<str>>, reason: &'static str) {
    for conns in inner.conns.values() {
        for c in conns {
            if c.tx
                .try_send(ConnEvent::Refetch(Box::new(Refetch {
                    table: table.clone(),
                    reason,
                })))
                .is_err()
            {
                c.lag.raise();
            }
        }
    }
}
