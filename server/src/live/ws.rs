//! `GET /v1/stream`: one WebSocket per client, JSON text frames (docs/protocol.md).
//!
//! One task per connection owns everything about it: its subscriptions, its queue from the hub, the socket.
//! Nothing is shared with other connections except the hub, so a slow client only ever delays itself.
//!
//! ```text
//! hub queue ──► Txn ──► per live subscription: filter (watermark guards resume duplicates) ──► one `txn` frame
//!                 └──► pending subscriptions: buffer until their snapshot/resume outcome arrives (same queue,
//!                      so ordering with transactions is exact)
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use deeprecall_replication::Op;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::convert::write_json_str;
use super::filter::Filter;
use super::hub::{ConnEvent, LagSignal, Refetch};
use super::offset::Offset;
use super::routing::UserTxn;
use super::snapshot::{self, Purpose, SnapshotChunk, SnapshotJob, SnapshotOutcome};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

/// Close codes (docs/protocol.md).
pub mod close {
    /// Normal close (client asked).
    pub const NORMAL: u16 = 1000;
    /// Server shutting down: reconnect and resume with your offsets.
    pub const SHUTDOWN: u16 = 1001;
    /// Protocol violation (binary frame, oversized message).
    pub const PROTOCOL: u16 = 1002;
    /// The token expired and was not refreshed: reconnect with a fresh token and resume.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// A refreshed token belongs to another user.
    pub const USER_MISMATCH: u16 = 4003;
    /// The client did not keep up: reconnect and resume with your offsets.
    pub const TOO_SLOW: u16 = 4008;
}

/// Most subscriptions on one connection.
const MAX_SUBSCRIPTIONS: usize = 100;
/// A frame that takes longer than this to write means the client is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upgrade handler.
pub async fn stream(
    State(state): State<AppState>,
    user: AuthUser,
    ws: WebSocketUpgrade,
) -> Response {
    // A socket closes when its token expires (unless refreshed); one that is already expired would close at
    // once, so refuse it here. (HTTP requests accept a small clock-skew leeway; a long-lived socket does not.)
    if user.expires_at <= now_secs() {
        return crate::auth::AuthError::Expired.into_response();
    }
    if state.hub.stats_connections() >= state.limits.max_connections {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at its connection limit; retry later",
        )
        .into_response();
    }
    // Small socket buffers: most connections are idle, and memory per idle connection is a target.
    // Client messages are small (subscribe, ping); the buffer grows if one is not.
    ws.read_buffer_size(512)
        .write_buffer_size(0)
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| async move { Connection::new(state, user).run(socket).await })
}

#[derive(Debug)]
enum SubState {
    /// Waiting for a snapshot or resume; transactions are buffered.
    Pending { buffer: Vec<Arc<UserTxn>> },
    /// Delivering transactions past `watermark`.
    Live { watermark: u64 },
}

#[derive(Debug)]
struct Subscription {
    table: Arc<str>,
    filter: Filter,
    epoch: u64,
    state: SubState,
}

struct Connection {
    state: AppState,
    user: AuthUser,
    /// Snapshot tasks send ready row frames here; a small bound makes them wait for a slow client.
    chunks: mpsc::Sender<SnapshotChunk>,
    chunks_rx: Option<mpsc::Receiver<SnapshotChunk>>,
    subs: HashMap<Arc<str>, Subscription>,
    next_epoch: u64,
}

/// Why the loop ended.
enum Exit {
    Close(u16, &'static str),
    /// The client sent a close frame: the library queued the echo; flush it.
    ClientClosed,
    Gone,
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

async fn send(sink: &mut Sink, text: String) -> Result<(), Exit> {
    match tokio::time::timeout(
        WRITE_TIMEOUT,
        sink.send(Message::Text(Utf8Bytes::from(text))),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Exit::Gone),
        Err(_) => Err(Exit::Close(
            close::TOO_SLOW,
            "too slow; reconnect and resume from your offset",
        )),
    }
}

async fn send_json(sink: &mut Sink, value: Value) -> Result<(), Exit> {
    send(sink, value.to_string()).await
}

impl Connection {
    fn new(state: AppState, user: AuthUser) -> Self {
        let (chunks, chunks_rx) = mpsc::channel(2);
        Self {
            state,
            user,
            chunks,
            chunks_rx: Some(chunks_rx),
            subs: HashMap::new(),
            next_epoch: 0,
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let owner = self.user.user_id;
        let hub = self.state.hub.clone();
        let (conn_id, mut queue, queue_tx, lag) = hub.register(owner);
        let (mut sink, mut incoming) = socket.split();
        let Some(mut chunks_rx) = self.chunks_rx.take() else {
            return;
        };
        let mut shutdown = self.state.shutdown.clone();
        let exit = loop {
            let expiry = tokio::time::sleep(expires_in(self.user.expires_at));
            let step = tokio::select! {
                biased;
                () = crate::shutdown::until_true(&mut shutdown) => {
                    break Box::pin(self.finish_for_shutdown(&mut sink, &mut queue, &lag)).await;
                }
                () = lag.wait() => Err(Exit::Close(close::TOO_SLOW, "too slow; reconnect and resume from your offset")),
                () = expiry => Err(Exit::Close(close::TOKEN_EXPIRED, "token expired; reconnect with a fresh token")),
                // The task's future is as large as its largest branch, and there is one per connection, mostly
                // idle: the hot path (a transaction) runs inline, everything rarer is boxed while it runs.
                event = queue.recv() => match event {
                    Some(ConnEvent::Txn(txn)) => self.on_txn(&mut sink, txn).await,
                    Some(event @ ConnEvent::Snapshot(_)) => {
                        // Its task sent every row frame before this outcome: deliver them first.
                        match self.drain_chunks(&mut sink, &mut chunks_rx).await {
                            Ok(()) => Box::pin(self.on_event(&mut sink, &queue_tx, event)).await,
                            Err(e) => Err(e),
                        }
                    }
                    Some(event) => Box::pin(self.on_event(&mut sink, &queue_tx, event)).await,
                    None => Err(Exit::Gone),
                },
                chunk = chunks_rx.recv() => match chunk {
                    Some(chunk) => self.on_chunk(&mut sink, chunk).await,
                    None => Ok(()),
                },
                msg = incoming.next() => match msg {
                    Some(Ok(Message::Text(text))) => Box::pin(self.on_client_message(&mut sink, &queue_tx, text.as_str())).await,
                    Some(Ok(Message::Binary(_))) => Err(Exit::Close(close::PROTOCOL, "binary frames are not supported")),
                    Some(Ok(Message::Close(_))) => Err(Exit::ClientClosed),
                    Some(Ok(_)) => Ok(()), // ping/pong frames are answered by the library
                    // A frame over the size limit, or a malformed one; a reset socket just fails to get the close.
                    Some(Err(_)) => Err(Exit::Close(close::PROTOCOL, "invalid frame or message too large")),
                    None => Err(Exit::Gone),
                },
            };
            if let Err(exit) = step {
                break exit;
            }
        };
        hub.unregister(owner, conn_id);
        if let Exit::ClientClosed = exit {
            let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
        }
        if let Exit::Close(code, reason) = exit {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                sink.send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                }))),
            )
            .await;
        }
    }

    /// Server shutdown: wait for the replicator to stop publishing, deliver what is queued, tell every live
    /// subscription the final position (the slot was acknowledged up to it, so a resume after restart is exact).
    async fn finish_for_shutdown(
        &mut self,
        sink: &mut Sink,
        queue: &mut mpsc::Receiver<ConnEvent>,
        lag: &LagSignal,
    ) -> Exit {
        let hub = self.state.hub.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), hub.wait_closed()).await;
        // A connection that lost a transaction to a full queue must not be told it is up to date.
        if lag.is_raised() {
            return Exit::Close(
                close::TOO_SLOW,
                "too slow; reconnect and resume from your offset",
            );
        }
        let (dummy_tx, _) = mpsc::channel(1);
        // Subscriptions with a refetch still queued get no final offset: their last offset stays older than the
        // restarted server's history, so their resume turns into a refetch instead of silently missing it.
        let mut stale: Vec<Arc<str>> = Vec::new();
        while let Ok(event) = queue.try_recv() {
            match event {
                ConnEvent::Txn(_) => {
                    if let Err(e) = self.on_event(sink, &dummy_tx, event).await {
                        return e;
                    }
                }
                ConnEvent::Refetch(refetch) => stale.extend(
                    self.subs
                        .iter()
                        .filter(|(_, s)| refetch.table.as_deref().is_none_or(|t| t == &*s.table))
                        .map(|(id, _)| id.clone()),
                ),
                ConnEvent::Snapshot(_) => {}
            }
        }
        let position = hub.position();
        let ids: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(id, s)| matches!(s.state, SubState::Live { .. }) && !stale.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let msg = json!({"type": "up_to_date", "id": &*id, "offset": position.to_string()});
            if let Err(e) = send_json(sink, msg).await {
                return e;
            }
        }
        Exit::Close(
            close::SHUTDOWN,
            "server shutting down; reconnect and resume from your offset",
        )
    }

    async fn on_client_message(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
        text: &str,
    ) -> Result<(), Exit> {
        let msg: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return send_json(
                    sink,
                    error(None, "invalid_message", &format!("not JSON: {e}")),
                )
                .await;
            }
        };
        let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
        let id = msg.get("id").and_then(Value::as_str);
        match kind {
            "ping" => send_json(sink, json!({"type": "pong"})).await,
            "subscribe" => match self.subscribe(&msg, queue).await {
                Ok(false) => Ok(()),
                // The offset was not one we issue: say so before the snapshot that replaces the client's data.
                Ok(true) => {
                    send_json(
                        sink,
                        json!({"type": "must_refetch", "id": id, "reason": "invalid_offset"}),
                    )
                    .await
                }
                Err((code, message)) => send_json(sink, error(id, code, &message)).await,
            },
            "unsubscribe" => {
                let Some(id) = id else {
                    return send_json(
                        sink,
                        error(None, "invalid_message", "unsubscribe needs an `id`"),
                    )
                    .await;
                };
                if self.subs.remove(id).is_some() {
                    send_json(sink, json!({"type": "unsubscribed", "id": id})).await
                } else {
                    send_json(
                        sink,
                        error(
                            Some(id),
                            "unknown_subscription",
                            "no subscription with this id",
                        ),
                    )
                    .await
                }
            }
            "refresh_token" => {
                let token = msg
                    .get("access_token")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match self.state.auth.verify(token) {
                    Ok(new) if new.user_id == self.user.user_id => {
                        self.user = new;
                        send_json(
                            sink,
                            json!({"type": "token_refreshed", "expires_at": self.user.expires_at}),
                        )
                        .await
                    }
                    Ok(_) => Err(Exit::Close(
                        close::USER_MISMATCH,
                        "the refreshed token belongs to another user",
                    )),
                    Err(e) => send_json(sink, error(None, e.code(), &e.to_string())).await,
                }
            }
            other => {
                send_json(
                    sink,
                    error(
                        id,
                        "invalid_message",
                        &format!("unknown message type {other:?}"),
                    ),
                )
                .await
            }
        }
    }

    async fn subscribe(
        &mut self,
        msg: &Value,
        queue: &mpsc::Sender<ConnEvent>,
    ) -> Result<bool, (&'static str, String)> {
        let id = msg
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 200)
            .ok_or((
                "invalid_message",
                "subscribe needs an `id` (1-200 characters)".to_owned(),
            ))?;
        if self.subs.contains_key(id) {
            return Err((
                "duplicate_subscription",
                format!("a subscription `{id}` exists; unsubscribe first"),
            ));
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return Err((
                "too_many_subscriptions",
                format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
            ));
        }
        let table_name = msg.get("table").and_then(Value::as_str).unwrap_or("");
        let catalog = self.state.catalog.get().await;
        let table = match catalog.table(table_name) {
            Some(t) => t.clone(),
            None => {
                let client = self
                    .state
                    .pool
                    .get()
                    .await
                    .map_err(|e| ("database_error", e.to_string()))?;
                let fresh = self
                    .state
                    .catalog
                    .refresh_on_miss(&client)
                    .await
                    .map_err(|e| ("database_error", e.to_string()))?;
                fresh.table(table_name).cloned().ok_or((
                    "unknown_table",
                    format!("`{table_name}` is not a synced table"),
                ))?
            }
        };
        let filter = Filter::parse(msg.get("where"), |c| table.column(c).is_some())
            .map_err(|e| ("invalid_where", e.0))?;
        let mut bad_offset = false;
        let purpose = match msg.get("offset") {
            None | Some(Value::Null) => Purpose::Snapshot,
            Some(v) => match v.as_str().and_then(|s| s.parse::<Offset>().ok()) {
                Some(offset) => Purpose::Resume(offset),
                // Not an offset we issued: the client must start over, which is what a snapshot does.
                None => {
                    bad_offset = true;
                    Purpose::Snapshot
                }
            },
        };
        let id: Arc<str> = Arc::from(id);
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.subs.insert(
            id.clone(),
            Subscription {
                table: Arc::from(table.name.as_str()),
                filter: filter.clone(),
                epoch,
                state: SubState::Pending { buffer: Vec::new() },
            },
        );
        self.start_job(id, epoch, table, filter, purpose, queue);
        Ok(bad_offset)
    }

    async fn on_event(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
        event: ConnEvent,
    ) -> Result<(), Exit> {
        match event {
            ConnEvent::Txn(txn) => self.on_txn(sink, txn).await,
            ConnEvent::Refetch(refetch) => {
                let Refetch { table, reason } = *refetch;
                let ids: Vec<Arc<str>> = self
                    .subs
                    .iter()
                    .filter(|(_, s)| table.as_deref().is_none_or(|t| t == &*s.table))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in ids {
                    send_json(
                        sink,
                        json!({"type": "must_refetch", "id": &*id, "reason": reason}),
                    )
                    .await?;
                    self.restart_snapshot(&id, queue).await;
                }
                Ok(())
            }
            ConnEvent::Snapshot(outcome) => self.on_snapshot(sink, queue, *outcome).await,
        }
    }

    /// Sends a snapshot row frame if its subscription attempt is still the pending one.
    async fn on_chunk(&mut self, sink: &mut Sink, chunk: SnapshotChunk) -> Result<(), Exit> {
        let wanted = self
            .subs
            .get(&chunk.sub_id)
            .is_some_and(|s| s.epoch == chunk.epoch && matches!(s.state, SubState::Pending { .. }));
        if wanted {
            send(sink, chunk.frame).await
        } else {
            Ok(())
        }
    }

    async fn drain_chunks(
        &mut self,
        sink: &mut Sink,
        chunks: &mut mpsc::Receiver<SnapshotChunk>,
    ) -> Result<(), Exit> {
        while let Ok(chunk) = chunks.try_recv() {
            self.on_chunk(sink, chunk).await?;
        }
        Ok(())
    }

    /// A committed transaction of this user: one frame with every live subscription's share of it.
    async fn on_txn(&mut self, sink: &mut Sink, txn: Arc<UserTxn>) -> Result<(), Exit> {
        let mut out = TxnFrame::new(&txn);
        for (id, sub) in self.subs.iter_mut() {
            match &mut sub.state {
                SubState::Pending { buffer } => buffer.push(txn.clone()),
                SubState::Live { watermark } => {
                    if txn.end_lsn.0 > *watermark {
                        out.add_changes(id, sub.table.as_ref(), &sub.filter, &txn);
                        *watermark = txn.end_lsn.0;
                    }
                }
            }
        }
        match out.finish() {
            Some(text) => send(sink, text).await,
            None => Ok(()),
        }
    }

    async fn restart_snapshot(&mut self, id: &Arc<str>, queue: &mpsc::Sender<ConnEvent>) {
        let catalog = self.state.catalog.get().await;
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        let Some(table) = catalog.table(&sub.table).cloned() else {
            self.subs.remove(id);
            return;
        };
        self.next_epoch += 1;
        sub.epoch = self.next_epoch;
        sub.state = SubState::Pending { buffer: Vec::new() };
        let (epoch, filter) = (sub.epoch, sub.filter.clone());
        self.start_job(id.clone(), epoch, table, filter, Purpose::Snapshot, queue);
    }

    /// Spawns the snapshot (or resume) task of a pending subscription; its outcome comes back through `queue`.
    fn start_job(
        &self,
        sub_id: Arc<str>,
        epoch: u64,
        table: Arc<crate::db::catalog::Table>,
        filter: Filter,
        purpose: Purpose,
        queue: &mpsc::Sender<ConnEvent>,
    ) {
        let job = SnapshotJob {
            owner: self.user.user_id,
            sub_id,
            epoch,
            table,
            filter,
            purpose,
            chunks: self.chunks.clone(),
        };
        tokio::spawn(snapshot::run(
            self.state.pool.clone(),
            self.state.hub.clone(),
            job,
            queue.clone(),
        ));
    }

    async fn on_snapshot(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
        outcome: SnapshotOutcome,
    ) -> Result<(), Exit> {
        let id = outcome.sub_id.clone();
        let Some(sub) = self.subs.get_mut(&id) else {
            return Ok(());
        };
        if sub.epoch != outcome.epoch {
            return Ok(()); // superseded by a refetch or a re-subscribe
        }
        let data = match outcome.result {
            Ok(d) => d,
            Err(e) => {
                self.subs.remove(&id);
                return send_json(sink, error(Some(&id), e.code(), &e.to_string())).await;
            }
        };
        let SubState::Pending { buffer } =
            std::mem::replace(&mut sub.state, SubState::Live { watermark: 0 })
        else {
            return Ok(());
        };
        sub.filter = data.filter.clone();
        let generation = self.state.hub.position().generation;
        match data.purpose {
            Purpose::Resume(from) => {
                // The resume task waited until the stream is up and has reached the offset (snapshot.rs).
                let generation = self.state.hub.position().generation;
                match self.state.hub.resume(self.user.user_id, &sub.table, from) {
                    Ok((txns, position)) => {
                        go_live(sink, &id, sub, txns.iter(), position, generation).await
                    }
                    Err(reason) => {
                        send_json(
                            sink,
                            json!({"type": "must_refetch", "id": &*id, "reason": reason.0}),
                        )
                        .await?;
                        self.restart_snapshot(&id, queue).await;
                        Ok(())
                    }
                }
            }
            Purpose::Snapshot => {
                // The rows went out as they were read (on_chunk); now the transactions the snapshot missed.
                let Some(sub) = self.subs.get_mut(&id) else {
                    return Ok(());
                };
                let watermark = buffer.last().map_or(data.barrier_lsn, |last| {
                    data.barrier_lsn.max(last.end_lsn.0)
                });
                let missed = buffer.iter().filter(|t| data.must_deliver(t));
                go_live(sink, &id, sub, missed, watermark, generation).await
            }
        }
    }
}

/// Sends a pending subscription its share of `txns` (each in its own frame), makes it live past `watermark`,
/// and tells the client it is up to date there.
async fn go_live<'a>(
    sink: &mut Sink,
    id: &str,
    sub: &mut Subscription,
    txns: impl Iterator<Item = &'a Arc<UserTxn>>,
    watermark: u64,
    generation: i64,
) -> Result<(), Exit> {
    for txn in txns {
        let mut frame = TxnFrame::new(txn);
        frame.add_changes(id, &sub.table, &sub.filter, txn);
        if let Some(text) = frame.finish() {
            send(sink, text).await?;
        }
    }
    sub.state = SubState::Live { watermark };
    let offset = Offset {
        generation,
        lsn: watermark,
    };
    send_json(
        sink,
        json!({"type": "up_to_date", "id": id, "offset": offset.to_string()}),
    )
    .await
}

/// Builds one `txn` frame for a connection: the row JSON was serialised once by the router; here it is only
/// copied next to each subscription id that receives it.
struct TxnFrame {
    out: Vec<u8>,
    changes: usize,
}

impl TxnFrame {
    fn new(txn: &UserTxn) -> Self {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"type\":\"txn\",\"xid\":\"");
        out.extend_from_slice(txn.xid.to_string().as_bytes());
        out.extend_from_slice(b"\",\"lsn\":\"");
        out.extend_from_slice(txn.commit_lsn.to_string().as_bytes());
        out.extend_from_slice(b"\",\"offset\":\"");
        out.extend_from_slice(
            Offset {
                generation: txn.generation,
                lsn: txn.end_lsn.0,
            }
            .to_string()
            .as_bytes(),
        );
        out.extend_from_slice(b"\",\"changes\":[");
        Self { out, changes: 0 }
    }

    fn add_changes(&mut self, id: &str, table: &str, filter: &Filter, txn: &UserTxn) {
        for change in txn.changes.iter().filter(|c| &*c.table == table) {
            let Some(op) = change.for_filter(filter) else {
                continue;
            };
            if self.changes > 0 {
                self.out.push(b',');
            }
            self.changes += 1;
            self.out.extend_from_slice(b"{\"id\":");
            write_json_str(&mut self.out, id);
            self.out.extend_from_slice(b",\"table\":");
            write_json_str(&mut self.out, table);
            self.out.extend_from_slice(match op {
                Op::Insert => b",\"op\":\"insert\",\"row\":".as_slice(),
                Op::Update => b",\"op\":\"update\",\"row\":".as_slice(),
                Op::Delete => b",\"op\":\"delete\",\"row\":".as_slice(),
            });
            self.out.extend_from_slice(change.row_json.as_bytes());
            if !change.unchanged.is_empty() && op == Op::Update {
                self.out.extend_from_slice(b",\"unchanged\":");
                let _ = serde_json::to_writer(&mut self.out, &change.unchanged);
            }
            self.out.push(b'}');
        }
    }

    fn finish(mut self) -> Option<String> {
        if self.changes == 0 {
            return None;
        }
        self.out.extend_from_slice(b"]}");
        // Once per transaction per connection: no copy of the frame.
        Some(super::convert::into_string(self.out))
    }
}

fn error(id: Option<&str>, code: &str, message: &str) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn expires_in(exp: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Duration::from_secs(exp.saturating_sub(now))
}
