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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use super::handoff::PgSnapshot;
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
    /// Most bytes of transactions queued for one connection (one transaction always fits an empty queue);
    /// beyond it the connection is cut off as too slow.
    pub queue_bytes: usize,
    /// Most bytes of transactions queued for all connections together (counted per connection, so a
    /// transaction shared by several connections counts several times: an upper bound).
    pub queued_bytes_total: usize,
    /// Most bytes of transactions queued for one user's connections together (counted the same way).
    pub queued_bytes_per_user: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            history_per_user: 1000,
            history_bytes: 256 * 1024 * 1024,
            truncate_memory: 256,
            queue_bytes: 32 * 1024 * 1024,
            queued_bytes_total: 512 * 1024 * 1024,
            queued_bytes_per_user: 64 * 1024 * 1024,
        }
    }
}

/// Handle the hub keeps per connection.
#[derive(Debug)]
struct ConnEntry {
    id: u64,
    tx: mpsc::Sender<ConnEvent>,
    lag: Arc<LagSignal>,
    /// Bytes of the transactions in its queue.
    queued: Arc<AtomicUsize>,
}

/// Raised by the hub when a connection must close: its queue overflowed (it lost a transaction), or this server
/// went on standby (another process holds the replication slot).
#[derive(Debug, Default)]
pub struct LagSignal {
    /// 0: fine, 1: lagging, 2: standby.
    state: AtomicU8,
    notify: Notify,
}

const LAGGING: u8 = 1;
const STANDBY: u8 = 2;

impl LagSignal {
    /// Waits until the connection must close.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.state.load(Ordering::Acquire) != 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether the connection lost a transaction (its queue overflowed).
    pub fn is_raised(&self) -> bool {
        self.state.load(Ordering::Acquire) == LAGGING
    }

    /// The close code and reason to tell the client (after [`LagSignal::wait`] returned).
    pub fn close_frame(&self) -> (u16, &'static str) {
        if self.state.load(Ordering::Acquire) == STANDBY {
            (
                super::protocol::close::STANDBY,
                "this server is on standby (another one streams); reconnect and resume from your offset",
            )
        } else {
            (
                super::protocol::close::TOO_SLOW,
                "too slow; reconnect and resume from your offset",
            )
        }
    }

    fn raise(&self) {
        // Lagging wins over standby: it also means a transaction was lost.
        self.state.store(LAGGING, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn raise_standby(&self) {
        let _ = self
            .state
            .compare_exchange(0, STANDBY, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_waiters();
    }
}

/// A connection's end of its queue. Receiving a transaction releases its bytes from the connection's and the
/// hub's accounting (dropping the queue releases whatever is still in it).
#[derive(Debug)]
pub struct ConnQueue {
    rx: mpsc::Receiver<ConnEvent>,
    queued: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
    /// Woken when bytes are released (the replicator may be pacing a large transaction).
    room: Arc<Notify>,
}

impl ConnQueue {
    /// The next event; `None` when the queue is closed.
    pub async fn recv(&mut self) -> Option<ConnEvent> {
        let event = self.rx.recv().await;
        self.release(event.as_ref());
        event
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<ConnEvent, mpsc::error::TryRecvError> {
        let event = self.rx.try_recv();
        self.release(event.as_ref().ok());
        event
    }

    fn release(&self, event: Option<&ConnEvent>) {
        if let Some(ConnEvent::Txn(txn)) = event {
            self.queued.fetch_sub(txn.bytes, Ordering::AcqRel);
            self.total.fetch_sub(txn.bytes, Ordering::AcqRel);
            self.room.notify_waiters();
        }
    }
}

impl Drop for ConnQueue {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(event) = self.rx.try_recv() {
            self.release(Some(&event));
        }
    }
}

/// Whether this process streams from the replication slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum StreamState {
    /// Not streaming yet, or reconnecting after an interruption: the interruption's error with its causes, if
    /// there was one (an operator's misconfiguration, e.g. `wal_level = replica`, otherwise showed only as
    /// "starting", for ever, and in the log).
    Starting(Option<String>),
    /// Streaming: the slot is this process's.
    Streaming,
    /// Another process holds the slot (e.g. the other server of a rolling deploy); this one waits for it.
    Standby(String),
    /// Stopped for good: the stream cannot be decoded (a retry would fail the same way).
    Failed(String),
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
    stream: StreamState,
    /// The transaction coming in parts right now (its commit LSN) and the owners its parts reached so far: each
    /// of them gets its last part, even an empty one, to close it.
    split: Option<(u64, std::collections::HashSet<Uuid>)>,
    /// Recently published transactions that touched some user, by xid; at most [`RECENT_XIDS`], the oldest (in
    /// `recent_order`) dropped first. The snapshot handoff's look-back ([`Hub::published_among`]).
    recent: BTreeMap<u64, Published>,
    recent_order: VecDeque<u64>,
    /// Users whose slow connections held the stream back lately ([`Hub::wait_for_room`]): what is left of their
    /// allowance, and when it was last counted. A user not listed has all of it.
    pacing: HashMap<Uuid, (Duration, tokio::time::Instant)>,
}

/// How long one user's slow connections may hold back the stream (every user's live changes) while the parts of
/// large transactions wait for room in their queues, in all; regained at [`PACING_ALLOWANCE`] per
/// [`PACING_REFILL`]. Without it a user who kept a socket open without reading, and wrote one large batch after
/// another, could delay every other user's changes by up to 30 s per batch.
pub const PACING_ALLOWANCE: Duration = Duration::from_secs(30);
/// See [`PACING_ALLOWANCE`].
pub const PACING_REFILL: Duration = Duration::from_secs(600);

/// What is left of a user's pacing allowance at `now` (`entry`: what was left when last counted, and when).
fn allowance_left(
    entry: Option<&(Duration, tokio::time::Instant)>,
    now: tokio::time::Instant,
) -> Duration {
    match entry {
        None => PACING_ALLOWANCE,
        Some(&(left, at)) => {
            let regained = PACING_ALLOWANCE.mul_f64(
                now.saturating_duration_since(at).as_secs_f64() / PACING_REFILL.as_secs_f64(),
            );
            (left + regained).min(PACING_ALLOWANCE)
        }
    }
}

/// What the look-back keeps of a published transaction.
#[derive(Debug, Clone, Copy)]
struct Published {
    end_lsn: u64,
    /// Its only owner; `None` when it touched several (almost every transaction touches one user, and a user's
    /// look-back can then skip other users' transactions without asking its own history).
    only: Option<Uuid>,
}

/// How many recently published transactions [`Hub::published_among`] can find. A transaction is looked for there
/// when a snapshot did not see it although its commit had already been streamed: its backend was between
/// writing its commit record and leaving Postgres's list of running transactions. That window is microseconds
/// long unless the backend is descheduled; to escape this look-back, 65,536 other transactions would have to be
/// published while it lasts (docs/decisions.md 32). 40 bytes an entry plus the map's overhead: about 4 MB.
pub const RECENT_XIDS: usize = 65_536;

/// The hub. Cheap to share (`Arc<Hub>`).
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    connections: std::sync::atomic::AtomicUsize,
    /// Of those, the HTTP shape endpoint's (a held long-poll, a server-sent-events stream, a snapshot being
    /// handed off): the rest are WebSockets (`deeprecall_stream_connections{transport}`).
    long_polls: std::sync::atomic::AtomicUsize,
    /// Bytes of transactions queued for all connections.
    queued_total: Arc<AtomicUsize>,
    /// Notified whenever a connection takes a transaction off its queue.
    room: Arc<Notify>,
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
    /// Of those, the HTTP shape endpoint's.
    pub long_polls: usize,
    /// Users with history.
    pub history_users: usize,
    /// Bytes of history.
    pub history_bytes: usize,
    /// Bytes of transactions waiting in connection queues.
    pub queued_bytes: usize,
    /// Whether this process streams from the slot.
    pub stream: StreamState,
}

impl Hub {
    /// A hub at generation 0 with nothing seen.
    pub fn new(config: HubConfig) -> Self {
        let (position_tx, _) = tokio::sync::watch::channel(0);
        let (closed, _) = tokio::sync::watch::channel(false);
        Self {
            connections: std::sync::atomic::AtomicUsize::new(0),
            long_polls: std::sync::atomic::AtomicUsize::new(0),
            queued_total: Arc::new(AtomicUsize::new(0)),
            room: Arc::new(Notify::new()),
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
                stream: StreamState::Starting(None),
                split: None,
                recent: BTreeMap::new(),
                recent_order: VecDeque::new(),
                pacing: HashMap::new(),
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

    /// Called by the replicator once Postgres accepted START_REPLICATION (the slot is this process's). `start` is
    /// where the stream starts: the slot's confirmed position, read after the start, when no other process can
    /// move it any more.
    ///
    /// Continuity is checked, never assumed:
    /// - a new generation means the slot was recreated: history is dropped and every subscription refetches;
    /// - a start *past* this process's position means another process streamed from the slot meanwhile and
    ///   acknowledged changes this process never saw (a rolling deploy's other server): history and offsets
    ///   before `start` cannot be served, and every subscription refetches (`stream_discontinuity`).
    pub fn stream_started(&self, generation: i64, start: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            let first = inner.generation == 0;
            inner.generation = generation;
            reset_history(&mut inner, start);
            // Offsets of the old generation are void, and the new slot may start behind the old position (a
            // failover to a replica that was behind): the position is the new stream's.
            inner.position = start;
            if !first {
                broadcast(&mut inner, None, "slot_recreated");
            }
        } else if start > inner.position {
            tracing::warn!(
                position = %deeprecall_replication::Lsn(inner.position),
                start = %deeprecall_replication::Lsn(start),
                "the slot was advanced by another process; every subscription refetches"
            );
            reset_history(&mut inner, start);
            broadcast(&mut inner, None, "stream_discontinuity");
        }
        inner.stream = StreamState::Streaming;
        let position = inner.position;
        drop(inner);
        self.position_tx.send_replace(position);
    }

    /// The stream stopped or could not start (`error`, with its causes; a reconnect is pending): not streaming.
    pub fn stream_interrupted(&self, error: String) {
        let mut inner = self.lock();
        if matches!(
            inner.stream,
            StreamState::Streaming | StreamState::Starting(_)
        ) {
            inner.stream = StreamState::Starting(Some(error));
        }
    }

    /// Another process holds the slot: this server waits on standby. Its connections are closed with the
    /// standby code (their clients reconnect, through the load balancer, to the server that streams); new ones
    /// are refused until it streams again.
    pub fn stream_standby(&self, holder: String) {
        let mut inner = self.lock();
        inner.stream = StreamState::Standby(holder);
        for conns in inner.conns.values() {
            for c in conns {
                c.lag.raise_standby();
            }
        }
    }

    /// The stream stopped for good (it cannot be decoded).
    pub fn stream_failed(&self, reason: String) {
        self.lock().stream = StreamState::Failed(reason);
        self.position_tx.send_modify(|_| {});
    }

    /// Whether this process streams.
    pub fn stream_state(&self) -> StreamState {
        self.lock().stream.clone()
    }

    /// The answer to a new client while this server is on standby (503 with `Retry-After`), if it is.
    pub fn standby_refusal(&self) -> Option<axum::response::Response> {
        use axum::response::IntoResponse;
        if !matches!(self.lock().stream, StreamState::Standby(_)) {
            return None;
        }
        let mut response = crate::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "standby",
            "this server is on standby (another server streams from the replication slot); retry",
        )
        .into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("2"),
        );
        Some(response)
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
    pub fn register(self: &Arc<Self>, owner: Uuid) -> Registered {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity);
        let lag = Arc::new(LagSignal::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let mut inner = self.lock();
        self.connections.fetch_add(1, Ordering::Relaxed);
        inner.next_id += 1;
        let id = inner.next_id;
        if matches!(inner.stream, StreamState::Standby(_)) {
            lag.raise_standby();
        }
        inner.conns.entry(owner).or_default().push(ConnEntry {
            id,
            tx: tx.clone(),
            lag: lag.clone(),
            queued: queued.clone(),
        });
        let registration = Registration {
            hub: self.clone(),
            owner,
            id,
            long_poll: false,
        };
        let queue = ConnQueue {
            rx,
            queued,
            total: self.queued_total.clone(),
            room: self.room.clone(),
        };
        (registration, queue, tx, lag)
    }

    /// [`Hub::register`] for a request of the HTTP shape endpoint (counted as `long_poll` in the metrics).
    pub fn register_long_poll(self: &Arc<Self>, owner: Uuid) -> Registered {
        let (mut registration, queue, tx, lag) = self.register(owner);
        registration.long_poll = true;
        self.long_polls.fetch_add(1, Ordering::Relaxed);
        (registration, queue, tx, lag)
    }

    /// Open connections of `owner`.
    pub fn user_connections(&self, owner: Uuid) -> usize {
        self.lock().conns.get(&owner).map_or(0, Vec::len)
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

    /// Publishes one routed transaction, or one part of a transaction that came in parts, in commit order.
    /// `end_lsn` is the transaction's end (for a part before the last: its commit LSN; the position then does
    /// not move).
    ///
    /// A part is queued for the owner's connections but never kept in the history (it would be a partial
    /// transaction there, and too large anyway): the owner's history horizon moves past it, so an offset from
    /// before it cannot be resumed and refetches instead.
    pub fn publish(&self, mut routed: Routed, end_lsn: u64) {
        let mut inner = self.lock();
        let generation = inner.generation;
        let last = routed.last;
        if routed.is_split() {
            let reached = match &mut inner.split {
                Some((commit, owners)) if *commit == routed.commit_lsn => owners,
                other => &mut other.insert((routed.commit_lsn, Default::default())).1,
            };
            reached.extend(routed.per_owner.iter().map(|t| t.owner));
            if last {
                // Owners reached by an earlier part but without a change in the last one get it empty: it
                // completes the transaction for them (and carries its offset).
                for owner in std::mem::take(reached) {
                    if !routed.per_owner.iter().any(|t| t.owner == owner) {
                        routed.per_owner.push(routed.empty_part_for(owner));
                    }
                }
                inner.split = None;
            }
        }
        if last && let Some(first) = routed.per_owner.first() {
            let only = routed
                .per_owner
                .iter()
                .all(|t| t.owner == first.owner)
                .then_some(first.owner);
            remember_xid(&mut inner, routed.xid, Published { end_lsn, only });
        }
        if last {
            // A truncate or a column change goes out before the transaction's rows: a connection that got the
            // transaction (and may store its offset) got the refetch before it, so no client holds the
            // transaction's end for a subscription the refetch concerns. (After the rows, a client that lost the
            // connection in between resumed from that end past the truncate, and kept the truncated rows.)
            let marks = std::mem::take(&mut routed.truncated)
                .into_iter()
                .map(|t| (t, "truncated"))
                .chain(
                    std::mem::take(&mut routed.schema_changed)
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
        }
        for mut txn in routed.per_owner {
            txn.generation = generation;
            let txn = Arc::new(txn);
            if let Some(conns) = inner.conns.get(&txn.owner) {
                let mut user_queued = conns.iter().map(|c| c.queued.load(Ordering::Acquire)).sum();
                for c in conns {
                    self.enqueue(c, &txn, &mut user_queued);
                }
            }
            if txn.is_split() {
                let horizon = if txn.last {
                    txn.end_lsn.0
                } else {
                    txn.commit_lsn.0 + 1
                };
                let start = inner.start;
                let history = inner
                    .history
                    .entry(txn.owner)
                    .or_insert_with(|| UserHistory {
                        txns: VecDeque::new(),
                        horizon: start,
                    });
                history.horizon = history.horizon.max(horizon);
            } else {
                self.remember(&mut inner, txn);
            }
        }
        if !last {
            // A part before the transaction's last: nothing else to do until it completes.
            return;
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

    /// Waits, at most until `deadline`, until every connection that `routed` goes to has room for its share
    /// (within the byte budgets). The replicator paces the parts of a large transaction this way: a connection
    /// that reads, only more slowly than Postgres sends, gets the whole transaction instead of being cut off and
    /// refetching everything, while memory stays within the queues' budgets. Past the deadline, publishing cuts
    /// off whoever still has no room.
    ///
    /// Every user is delayed while it waits, so a user's full connections are waited for only within that user's
    /// allowance ([`PACING_ALLOWANCE`]); once it is used up they no longer hold the stream back, and publishing
    /// cuts them off (4008: they resume, or refetch).
    pub async fn wait_for_room(&self, routed: &Routed, deadline: tokio::time::Instant) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = tokio::time::Instant::now();
            let (total_full, blocking) = {
                let inner = self.lock();
                let total = self.queued_total.load(Ordering::Acquire);
                let bytes: usize = routed.per_owner.iter().map(|t| t.bytes).sum();
                // The users with a full connection that still have allowance (one whose allowance is used up is
                // not waited for, nor does it shorten the wait), and the least allowance among them.
                let blocking: Vec<(Uuid, Duration)> = routed
                    .per_owner
                    .iter()
                    .filter(|t| {
                        inner.conns.get(&t.owner).is_some_and(|conns| {
                            conns.iter().any(|c| {
                                let queued = c.queued.load(Ordering::Acquire);
                                !c.lag.is_raised()
                                    && queued > 0
                                    && queued + t.bytes > self.config.queue_bytes
                            })
                        })
                    })
                    .map(|t| (t.owner, allowance_left(inner.pacing.get(&t.owner), now)))
                    .filter(|(_, left)| !left.is_zero())
                    .collect();
                (total + bytes > self.config.queued_bytes_total, blocking)
            };
            if !total_full && blocking.is_empty() {
                return;
            }
            // Woken when room is made, at the deadline, or when a waited-for user's allowance runs out.
            let until = match blocking.iter().map(|(_, left)| *left).min() {
                None => deadline,
                Some(allowance) => deadline.min(now + allowance),
            };
            let timed_out = tokio::time::timeout_at(until, notified).await.is_err();
            let later = tokio::time::Instant::now();
            if !blocking.is_empty() {
                let mut inner = self.lock();
                for (owner, left) in blocking {
                    inner
                        .pacing
                        .insert(owner, (left.saturating_sub(later - now), later));
                }
                // Users who have all of their allowance again need no entry.
                inner
                    .pacing
                    .retain(|_, entry| allowance_left(Some(entry), later) < PACING_ALLOWANCE);
            }
            if timed_out && later >= deadline {
                return;
            }
        }
    }

    /// Queues `txn` for connection `c` within its byte budgets; a connection that cannot take it is cut off.
    /// `user_queued` is what the connection's user has queued in all (updated here).
    ///
    /// Only a connection that is already behind (its queue not empty) is ever cut for a budget: one transaction
    /// always fits an empty queue, however large, and however full the user's and the server's budgets are. So
    /// the connections cut are the ones that hold the budget, never a client that keeps up. (Before, whoever's
    /// transaction came next once the server's total was full was cut: one user's 32 sockets that stopped reading
    /// could fill the total and get every other user's connections closed with 4008.) The per-user budget keeps a
    /// single user from filling the server's total.
    ///
    /// Once a connection lost a transaction, nothing more is queued for it: its queue is a gap-free prefix of the
    /// stream, so a reader that drains it before noticing the signal (a shape response collecting what is queued)
    /// never goes past the lost transaction.
    fn enqueue(&self, c: &ConnEntry, txn: &Arc<UserTxn>, user_queued: &mut usize) {
        if c.lag.is_raised() {
            return;
        }
        let bytes = txn.bytes;
        // Counted before sending (the receiver may release it at once); given back if it is not sent.
        let before = c.queued.fetch_add(bytes, Ordering::AcqRel);
        let total = self.queued_total.fetch_add(bytes, Ordering::AcqRel);
        let over = before > 0
            && (before + bytes > self.config.queue_bytes
                || *user_queued + bytes > self.config.queued_bytes_per_user
                || total + bytes > self.config.queued_bytes_total);
        if over || c.tx.try_send(ConnEvent::Txn(txn.clone())).is_err() {
            c.queued.fetch_sub(bytes, Ordering::AcqRel);
            self.queued_total.fetch_sub(bytes, Ordering::AcqRel);
            c.lag.raise();
        } else {
            *user_queued += bytes;
        }
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
        // At `from` too: the truncating transaction ends there, and a client that holds its end may have its
        // rows but not the refetch (see `publish`).
        if from.lsn < inner.truncate_horizon
            || inner
                .truncates
                .iter()
                .any(|(lsn, t)| *lsn >= from.lsn && &**t == table)
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

    /// The snapshot handoff's look-back (handoff.rs, "Streamed before it was visible"): `owner`'s transactions
    /// that `snapshot` did not see (in progress, or at or past its `xmax`) and that were published at or before
    /// `upto` (the snapshot's barrier), oldest first. Called as soon as the barrier is back, so the range past
    /// `xmax` holds little more than what committed between the snapshot and its barrier.
    ///
    /// A subscription that started buffering after one of them was published holds it neither in its rows nor in
    /// its buffer; it delivers those it did not buffer (`Subscription::go_live_after_snapshot`).
    ///
    /// `Err` when one of them was this user's, or touched several users, and is no longer in this user's history
    /// (evicted): whether the user had a change in it cannot be told, and the subscription must refetch (a newer
    /// snapshot sees it committed).
    pub fn published_among(
        &self,
        owner: Uuid,
        snapshot: &PgSnapshot,
        upto: u64,
    ) -> Result<Vec<Arc<UserTxn>>, CannotResume> {
        let inner = self.lock();
        let unseen = snapshot
            .xip
            .iter()
            .filter_map(|xid| inner.recent.get_key_value(xid))
            .chain(inner.recent.range(snapshot.xmax..));
        let history = inner.history.get(&owner);
        // Complete past the horizon; a user without history had no transaction since `start`.
        let horizon = history.map_or(inner.start, |h| h.horizon);
        let mut found = Vec::new();
        for (xid, published) in unseen {
            let end = published.end_lsn;
            if end > upto {
                // Queued behind the job's report: delivered live.
                continue;
            }
            if published.only.is_some_and(|only| only != owner) {
                continue; // another user's
            }
            match history.and_then(|h| h.txns.iter().rev().find(|(_, t)| t.xid == *xid)) {
                Some((_, t)) => found.push(t.clone()),
                None if end <= horizon => {
                    return Err(CannotResume("transaction_not_in_history"));
                }
                None => {} // another user's
            }
        }
        found.sort_by_key(|t| t.end_lsn);
        Ok(found)
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

    /// Waits (at most `limit`) until this process streams from the slot; returns whether it does.
    pub async fn wait_started(&self, limit: std::time::Duration) -> bool {
        let mut changes = self.position_tx.subscribe();
        let streaming = || self.lock().stream == StreamState::Streaming;
        let _ = tokio::time::timeout(limit, async {
            loop {
                if streaming() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        streaming()
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
            long_polls: self.long_polls.load(Ordering::Relaxed),
            history_users: inner.history.len(),
            history_bytes: inner.history_bytes,
            queued_bytes: self.queued_total.load(Ordering::Relaxed),
            stream: inner.stream.clone(),
        }
    }
}

/// Forgets every user's history: positions before `start` cannot be served from here on.
fn reset_history(inner: &mut Inner, start: u64) {
    inner.start = start;
    inner.position = inner.position.max(start);
    inner.history.clear();
    inner.fifo.clear();
    inner.live_entries = 0;
    inner.history_bytes = 0;
    inner.truncates.clear();
    inner.truncate_horizon = start;
    inner.recent.clear();
    inner.recent_order.clear();
}

/// Remembers a published transaction's xid for [`Hub::published_among`], within [`RECENT_XIDS`].
fn remember_xid(inner: &mut Inner, xid: u64, published: Published) {
    // A transaction the stream sends again after a reconnect keeps its place.
    if inner.recent.insert(xid, published).is_none() {
        inner.recent_order.push_back(xid);
        if inner.recent_order.len() > RECENT_XIDS
            && let Some(old) = inner.recent_order.pop_front()
        {
            inner.recent.remove(&old);
        }
    }
}

/// What [`Hub::register`] hands a connection: its place, its queue and the queue's sender, and its lag signal.
pub type Registered = (
    Registration,
    ConnQueue,
    mpsc::Sender<ConnEvent>,
    Arc<LagSignal>,
);

/// A connection's place in the hub; dropping it unregisters the connection (also when a request is cancelled).
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    owner: Uuid,
    id: u64,
    long_poll: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.long_poll {
            self.hub.long_polls.fetch_sub(1, Ordering::Relaxed);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use deeprecall_replication::Lsn;

    fn routed(owner: Uuid, xid: u64, commit: u64) -> Routed {
        Routed {
            per_owner: vec![UserTxn {
                owner,
                xid,
                generation: 0,
                commit_lsn: Lsn(commit),
                end_lsn: Lsn(commit + 8),
                changes: vec![],
                bytes: 10,
                part: 0,
                last: true,
            }],
            xid,
            commit_lsn: commit,
            end_lsn: commit + 8,
            ..Routed::default()
        }
    }

    fn xids(found: Result<Vec<Arc<UserTxn>>, CannotResume>) -> Vec<u64> {
        found.unwrap().iter().map(|t| t.xid).collect()
    }

    #[test]
    fn connections_that_stop_reading_are_cut_not_the_ones_that_keep_up() {
        // Per connection 1000 bytes, per user 200, in all 300; every transaction is 60 bytes.
        let hub = Arc::new(Hub::new(HubConfig {
            queue_bytes: 1000,
            queued_bytes_per_user: 200,
            queued_bytes_total: 300,
            ..HubConfig::default()
        }));
        hub.stream_started(1, 100);
        let (mallory, bob, carol) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        // Mallory's four sockets never read.
        let mallorys: Vec<_> = (0..4).map(|_| hub.register(mallory)).collect();
        let (_b, mut bob_queue, _, bob_lag) = hub.register(bob);
        let (_c, _carol_queue, _, carol_lag) = hub.register(carol);
        let mut commit = 200;
        let mut publish = |owner: Uuid| {
            commit += 100;
            let mut txn = routed(owner, commit, commit);
            txn.per_owner[0].bytes = 60;
            hub.publish(txn, commit + 8);
        };
        // Carol reads slowly: one transaction waits in her queue.
        publish(carol);
        // Mallory's first transaction reaches all four (empty queues: 240 bytes, over her 200); her second is
        // over her budget for every one of them, which are cut.
        publish(mallory);
        publish(mallory);
        for (_, _, _, lag) in &mallorys {
            assert!(lag.is_raised(), "a socket over its user's budget was kept");
        }
        // The server's total is now full (240 of Mallory's + Carol's 60). Bob keeps up: each of his transactions
        // reaches him, however full the total is.
        for _ in 0..3 {
            publish(bob);
            assert!(matches!(bob_queue.try_recv(), Ok(ConnEvent::Txn(_))));
            assert!(!bob_lag.is_raised(), "a client that keeps up was cut");
        }
        // Carol is behind while the total is full: she is cut (she resumes from her offset).
        publish(carol);
        assert!(carol_lag.is_raised());
    }

    #[test]
    fn after_a_lost_transaction_nothing_more_is_queued_so_the_queue_has_no_gap() {
        // Per connection 100 bytes; every transaction is 60.
        let hub = Arc::new(Hub::new(HubConfig {
            queue_bytes: 100,
            ..HubConfig::default()
        }));
        hub.stream_started(1, 100);
        let carol = Uuid::from_u128(3);
        let (_c, mut queue, _, lag) = hub.register(carol);
        let mut commit = 200;
        let mut publish = || {
            commit += 100;
            let mut txn = routed(carol, commit, commit);
            txn.per_owner[0].bytes = 60;
            hub.publish(txn, commit + 8);
            commit
        };
        let first = publish();
        publish(); // over the connection's budget behind the first: lost
        assert!(lag.is_raised());
        // The reader takes the first, leaving the queue empty, before it looks at the signal (as a shape
        // response collecting what is queued does); a later transaction would fit an empty queue, but would
        // come after the gap.
        match queue.try_recv() {
            Ok(ConnEvent::Txn(t)) => assert_eq!(t.commit_lsn.0, first),
            other => panic!("expected the first transaction, got {other:?}"),
        }
        publish();
        assert!(
            queue.try_recv().is_err(),
            "a transaction after the lost one was queued"
        );
    }

    #[test]
    fn a_recreated_slot_behind_the_old_position_is_streamed_from_its_start() {
        let hub = Arc::new(Hub::new(HubConfig::default()));
        hub.stream_started(1, 1000);
        let alice = Uuid::from_u128(1);
        hub.publish(routed(alice, 1900, 1900), 1908);
        assert_eq!(hub.position().lsn, 1908);
        // A failover to a replica that was behind: the new slot starts at 1500.
        hub.stream_started(2, 1500);
        assert_eq!(
            hub.position(),
            Offset {
                generation: 2,
                lsn: 1500
            }
        );
        // On the same timeline (a slot recreated ahead), the start is ahead anyway.
        hub.stream_started(3, 4000);
        assert_eq!(hub.position().lsn, 4000);
    }

    #[test]
    fn a_truncate_goes_out_before_its_transactions_rows_and_its_end_does_not_resume() {
        let hub = Arc::new(Hub::new(HubConfig::default()));
        hub.stream_started(1, 100);
        let alice = Uuid::from_u128(1);
        let (_a, mut queue, _, _) = hub.register(alice);
        // TRUNCATE works; INSERT INTO works …: one transaction.
        let mut txn = routed(alice, 300, 300);
        txn.truncated = vec![Arc::from("works")];
        hub.publish(txn, 308);
        assert!(
            matches!(queue.try_recv(), Ok(ConnEvent::Refetch(r)) if r.reason == "truncated"),
            "the refetch comes first"
        );
        assert!(matches!(queue.try_recv(), Ok(ConnEvent::Txn(_))));
        // An offset at the transaction's end, of a client that got its rows but not the refetch, refetches.
        let at = |lsn| Offset { generation: 1, lsn };
        assert_eq!(
            hub.resume(alice, "works", at(308)).err().map(|c| c.0),
            Some("table_truncated")
        );
        // Other tables resume from it.
        assert!(hub.resume(alice, "boards", at(308)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn one_users_full_sockets_hold_the_stream_back_only_within_their_allowance() {
        use tokio::time::{Instant, advance};
        let hub = Arc::new(Hub::new(HubConfig {
            queue_bytes: 100,
            ..HubConfig::default()
        }));
        hub.stream_started(1, 100);
        let (mallory, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        // A socket of each that does not read, with one 60-byte transaction in its queue: a 60-byte part of a
        // large transaction has no room in either.
        let _m = hub.register(mallory);
        let _b = hub.register(bob);
        let part = |owner: Uuid, commit: u64| {
            let mut txn = routed(owner, commit, commit);
            txn.per_owner[0].bytes = 60;
            txn
        };
        hub.publish(part(mallory, 200), 208);
        hub.publish(part(bob, 300), 308);
        let waited = |deadline_secs: u64, owner: Uuid| {
            let hub = hub.clone();
            async move {
                let start = Instant::now();
                hub.wait_for_room(
                    &part(owner, 400),
                    start + Duration::from_secs(deadline_secs),
                )
                .await;
                start.elapsed()
            }
        };
        // A transaction's own budget (here 20 s) still bounds one wait.
        assert_eq!(waited(20, mallory).await, Duration::from_secs(20));
        // Then what is left of Mallory's allowance (10 s), then nothing: her sockets stop holding the stream back.
        assert_eq!(waited(30, mallory).await, Duration::from_secs(10));
        assert_eq!(waited(30, mallory).await, Duration::ZERO);
        // Bob has his own allowance, also in a transaction of both: Mallory's used-up one does not cut his wait short.
        let mut both = part(bob, 500);
        both.per_owner.push(part(mallory, 500).per_owner.remove(0));
        let start = Instant::now();
        hub.wait_for_room(&both, start + Duration::from_secs(3))
            .await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(waited(5, bob).await, Duration::from_secs(5));
        // Regained over time: in the 8 s of Bob's waits and a fifth of the refill period after them, 128 s of 600.
        advance(PACING_REFILL / 5).await;
        let regained = waited(30, mallory).await;
        let expected = PACING_ALLOWANCE.mul_f64(128.0 / 600.0);
        assert!(
            regained.abs_diff(expected) < Duration::from_millis(1),
            "{regained:?}"
        );
    }

    #[test]
    fn look_back_finds_the_published_transactions_a_snapshot_did_not_see() {
        let hub = Hub::new(HubConfig {
            history_per_user: 2,
            ..HubConfig::default()
        });
        hub.stream_started(1, 100);
        let (alice, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for (owner, xid, commit) in [
            (alice, 10, 200),
            (bob, 11, 300),
            (alice, 12, 400),
            (alice, 15, 500),
        ] {
            hub.publish(routed(owner, xid, commit), commit + 8);
        }
        // 10 and 11 seen; 12 in progress; 15 at or past xmax.
        let s = PgSnapshot::parse("12:14:12").unwrap();
        assert_eq!(xids(hub.published_among(alice, &s, 600)), [12, 15]);
        // Only up to the barrier.
        assert_eq!(xids(hub.published_among(alice, &s, 450)), [12]);
        assert!(xids(hub.published_among(bob, &s, 600)).is_empty());
        // 10 is no longer in alice's history (two kept): for her it cannot be told; bob knows it was not his.
        let s = PgSnapshot::parse("10:14:10,12").unwrap();
        assert_eq!(
            hub.published_among(alice, &s, 600).unwrap_err(),
            CannotResume("transaction_not_in_history")
        );
        assert!(xids(hub.published_among(bob, &s, 600)).is_empty());
        // A transaction of both: found in each one's history.
        let mut both = routed(alice, 20, 700);
        let mut bobs = both.per_owner[0].clone();
        bobs.owner = bob;
        both.per_owner.push(bobs);
        hub.publish(both, 708);
        let s = PgSnapshot::parse("20:20:").unwrap();
        assert_eq!(xids(hub.published_among(alice, &s, 800)), [20]);
        assert_eq!(xids(hub.published_among(bob, &s, 800)), [20]);
        // A new slot generation forgets them.
        hub.stream_started(2, 1000);
        assert!(xids(hub.published_among(alice, &s, 2000)).is_empty());
    }
}
