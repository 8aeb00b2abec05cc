//! `GET /v1/stream`: one WebSocket per client, JSON text frames (docs/protocol.md). This is the socket loop only:
//! the connection's logic is the [`Session`] state machine, the wire format is `protocol.rs`.
//!
//! One task per connection owns everything about it: its session, its queue from the hub, the socket. Nothing is
//! shared with other connections except the hub, so a slow client only ever delays itself.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::hub::{ConnEvent, ConnQueue, LagSignal};
use super::job::{JobReport, JobSpec, Prepared, Purpose, SnapshotColumn, Wanted};
use super::protocol::{ClientMessage, SnapshotFrame, close};
use super::session::{Action, Actions, Session, SnapshotChunk, StartJob};
use super::snapshot::{self, SinkGone, SnapshotSink};
use crate::auth::AuthUser;
use crate::db::catalog::Table;
use crate::error::ApiError;
use crate::state::AppState;

/// A frame that takes longer than this to write means the client is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upgrade handler.
pub async fn stream(
    State(state): State<AppState>,
    user: AuthUser,
    slot: Option<axum::Extension<crate::app::ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    // A socket closes when its token expires (unless refreshed); one that is already expired would close at
    // once, so refuse it here. (HTTP requests accept a small clock-skew leeway; a long-lived socket does not.)
    if user.expires_at <= now_secs() {
        return crate::auth::AuthError::Expired.into_response();
    }
    if let Some(refusal) = state.hub.standby_refusal() {
        return refusal;
    }
    if state.hub.stats_connections() >= state.limits.max_connections {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at its connection limit; retry later",
        )
        .into_response();
    }
    // Taken here, before the upgrade, so two sockets opening at once cannot both pass the check.
    let place = state.sockets_per_user.try_acquire(user.user_id);
    // Small socket buffers: most connections are idle, and memory per idle connection is a target.
    // Client messages are small (subscribe, ping); the buffer grows if one is not.
    ws.read_buffer_size(512)
        .write_buffer_size(0)
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| async move {
            // The upgraded socket keeps its connection slot (app::serve's cap) for as long as it lives, and its
            // place among its user's sockets.
            let _slot = slot;
            match place {
                Some(_place) => Connection::new(state, user).run(socket).await,
                None => refuse_over_user_cap(socket).await,
            }
        })
}

/// The user is at `--max-connections-per-user`: close with 4029. Upgraded first, because a browser cannot read the
/// status of a refused upgrade, only a close code.
async fn refuse_over_user_cap(mut socket: WebSocket) {
    let close = Message::Close(Some(CloseFrame {
        code: close::TOO_MANY_CONNECTIONS,
        reason: Utf8Bytes::from_static("too many connections for this user; close one and retry"),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if socket.send(close).await.is_ok() {
            // Until the client's close echo (or the socket ends).
            while let Some(Ok(msg)) = socket.next().await {
                if let Message::Close(_) = msg {
                    break;
                }
            }
        }
    })
    .await;
}

struct Connection {
    state: AppState,
    user: AuthUser,
    session: Session,
    /// Snapshot jobs send ready row frames here; a small bound makes them wait for a slow client. Only while a
    /// subscription waits for a job: a channel costs about 2 KiB, and most connections are idle and live.
    chunks: Option<(mpsc::Sender<SnapshotChunk>, mpsc::Receiver<SnapshotChunk>)>,
    /// Reused for every event: the hot path allocates nothing here.
    actions: Actions,
    /// The server's shutdown flag, as every frame's write watches it ([`send`]): one receiver per connection, not
    /// one per frame.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Why the loop ended.
enum Exit {
    Close(u16, &'static str),
    /// The client sent a close frame: the library queued the echo; flush it.
    ClientClosed,
    Gone,
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// Writes one frame: a client that takes none of it within [`WRITE_TIMEOUT`] is too slow. Once the server shuts down,
/// a write waits at most [`SHUTDOWN_DELIVERY`] more: a connection blocked on a client that does not read would
/// otherwise hold the server's exit for up to the write timeout (it noticed the shutdown only between frames).
async fn send(
    sink: &mut Sink,
    text: String,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), Exit> {
    crate::metrics::frame_sent(text.len());
    tokio::select! {
        biased;
        sent = sink.send(Message::Text(Utf8Bytes::from(text))) => sent.map_err(|_| Exit::Gone),
        () = tokio::time::sleep(WRITE_TIMEOUT) => Err(Exit::Close(
            close::TOO_SLOW,
            "too slow; reconnect and resume from your offset",
        )),
        () = async {
            crate::shutdown::until_true(shutdown).await;
            tokio::time::sleep(SHUTDOWN_DELIVERY).await;
        } => Err(Exit::Gone),
    }
}

impl Connection {
    fn new(state: AppState, user: AuthUser) -> Self {
        Self {
            session: Session::new(&user).with_filter_budget(state.filter_bytes_per_user.clone()),
            shutdown: state.shutdown.clone(),
            state,
            user,
            chunks: None,
            actions: Vec::new(),
        }
    }

    /// Every row frame already sent by the jobs, into the session.
    fn drain_chunks(&mut self) {
        if let Some((_, rx)) = self.chunks.as_mut() {
            while let Ok(chunk) = rx.try_recv() {
                self.session.on_chunk(chunk, &mut self.actions);
            }
        }
    }

    /// Not an `async fn`: the socket is split before the future is built, so the future does not keep room for
    /// the unsplit socket for its whole life (an `async fn`'s arguments stay in it), one per connection.
    fn run(self, socket: WebSocket) -> impl Future<Output = ()> + Send {
        let (sink, incoming) = socket.split();
        self.run_split(sink, incoming)
    }

    async fn run_split(
        mut self,
        mut sink: Sink,
        mut incoming: futures::stream::SplitStream<WebSocket>,
    ) {
        let hub = self.state.hub.clone();
        let (registration, mut queue, queue_tx, lag) = hub.register(self.user.user_id);
        let mut shutdown = self.state.shutdown.clone();
        let exit = loop {
            let expiry = tokio::time::sleep(expires_in(self.session.expires_at()));
            let step = tokio::select! {
                biased;
                () = crate::shutdown::until_true(&mut shutdown) => {
                    break Box::pin(self.finish_for_shutdown(&mut sink, &mut queue, &lag)).await;
                }
                () = lag.wait() => {
                    let (code, reason) = lag.close_frame();
                    Err(Exit::Close(code, reason))
                }
                () = expiry => Err(Exit::Close(close::TOKEN_EXPIRED, "token expired; reconnect with a fresh token")),
                // The task's future is as large as its largest branch, and there is one per connection, mostly
                // idle: the hot path (a transaction) runs inline, everything rarer is boxed while it runs.
                event = queue.recv() => match event {
                    Some(ConnEvent::Txn(txn)) => {
                        self.session.on_txn(&txn, &mut self.actions);
                        match self.perform(&mut sink, &queue_tx).await {
                            // Reports that waited for the transaction's last part (rare).
                            Ok(()) if self.session.has_deferred_jobs() => {
                                Box::pin(self.on_jobs(&mut sink, &queue_tx, None)).await
                            }
                            sent => sent,
                        }
                    }
                    Some(ConnEvent::Job(report)) => {
                        Box::pin(self.on_jobs(&mut sink, &queue_tx, Some(*report))).await
                    }
                    Some(ConnEvent::Refetch(refetch)) => {
                        self.session.on_refetch(&refetch, &mut self.actions);
                        Box::pin(self.perform(&mut sink, &queue_tx)).await
                    }
                    None => Err(Exit::Gone),
                },
                chunk = next_chunk(&mut self.chunks) => match chunk {
                    Some(chunk) => {
                        self.session.on_chunk(chunk, &mut self.actions);
                        self.perform(&mut sink, &queue_tx).await
                    }
                    None => Ok(()),
                },
                msg = incoming.next() => match msg {
                    Some(Ok(Message::Text(text))) => Box::pin(self.on_text(&mut sink, &queue_tx, text.as_str())).await,
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
        drop(registration);
        if let Exit::Close(close::TOO_SLOW, _) = exit {
            crate::metrics::slow_client_cut_off();
        }
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

    /// A job's report (or none), and any that waited for a transaction's last part: the subscriptions they concern
    /// go live or refetch.
    async fn on_jobs(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
        report: Option<JobReport>,
    ) -> Result<(), Exit> {
        // Its job sent every row frame before this report: deliver them first.
        self.drain_chunks();
        let hub = self.state.hub.clone();
        self.session.run_deferred_jobs(&*hub, &mut self.actions);
        if let Some(report) = report {
            self.session.on_job(report, &*hub, &mut self.actions);
        }
        if !self.session.awaits_job() {
            // No current job is left (a stale one still running sees the channel close and stops).
            self.chunks = None;
        }
        self.perform(sink, queue).await
    }

    /// Carries out the session's actions, in order.
    async fn perform(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
    ) -> Result<(), Exit> {
        let mut result = Ok(());
        // Drained in full even after a failed send, so the list is empty for the next event.
        for action in self.actions.drain(..) {
            if result.is_err() {
                continue;
            }
            result = match action {
                Action::Send(text) => send(sink, text, &mut self.shutdown).await,
                Action::SendParts(mut parts) => {
                    // One frame at a time: the next is rendered once the one before it has gone.
                    let mut sent = Ok(());
                    while let Some(text) = self.session.next_part(&mut parts) {
                        sent = send(sink, text, &mut self.shutdown).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    sent
                }
                Action::Close(code, reason) => Err(Exit::Close(code, reason)),
                Action::Start(start) => {
                    // The channel is made when none is open.
                    let chunks = self
                        .chunks
                        .get_or_insert_with(|| mpsc::channel(2))
                        .0
                        .clone();
                    // Boxed: rare, and inline it would grow every connection's future.
                    Box::pin(start_job(
                        &self.state,
                        chunks,
                        queue,
                        &mut self.session,
                        *start,
                    ))
                    .await;
                    Ok(())
                }
            };
        }
        result
    }

    async fn on_text(
        &mut self,
        sink: &mut Sink,
        queue: &mpsc::Sender<ConnEvent>,
        text: &str,
    ) -> Result<(), Exit> {
        match ClientMessage::parse(text) {
            Err(e) => self.session.protocol_error(&e, &mut self.actions),
            Ok(ClientMessage::Subscribe(s)) => {
                if self.session.admit(&s, &mut self.actions) {
                    let table = resolve_table(&self.state, s.table.as_deref().unwrap_or("")).await;
                    self.session.subscribe(s, table, &mut self.actions);
                }
            }
            Ok(ClientMessage::RefreshToken { access_token }) => {
                let verified = self
                    .state
                    .auth
                    .verify(access_token.as_deref().unwrap_or(""));
                self.session.refresh_token(verified, &mut self.actions);
            }
            Ok(other) => self.session.on_message(other, &mut self.actions),
        }
        self.perform(sink, queue).await
    }

    /// Server shutdown: wait for the replicator to stop publishing, then let the session deliver what is queued
    /// and send the final offsets, within [`SHUTDOWN_DELIVERY`].
    async fn finish_for_shutdown(
        &mut self,
        sink: &mut Sink,
        queue: &mut ConnQueue,
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
        let queued = std::iter::from_fn(|| queue.try_recv().ok());
        self.session
            .shutdown(queued, hub.position(), &mut self.actions);
        let (dummy_tx, _) = mpsc::channel(1);
        // A client that does not read would keep this write, and the server's exit, waiting for as long as the
        // shutdown lets connections finish (10 s): it gets a few seconds, then its socket is dropped. It resumes
        // from the last offset it stored, as after any drop.
        match tokio::time::timeout(SHUTDOWN_DELIVERY, self.perform(sink, &dummy_tx)).await {
            Ok(Err(exit)) => exit,
            Ok(Ok(())) | Err(_) => Exit::Gone,
        }
    }
}

/// How long a connection has, at shutdown, to take what is queued for it and its final offsets.
const SHUTDOWN_DELIVERY: Duration = Duration::from_secs(3);

/// The next row frame of the connection's jobs; never ready while no channel is open.
async fn next_chunk(
    chunks: &mut Option<(mpsc::Sender<SnapshotChunk>, mpsc::Receiver<SnapshotChunk>)>,
) -> Option<SnapshotChunk> {
    match chunks {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The synced table called `name`; a miss reloads the catalog (rate-limited) before answering `unknown_table`.
async fn resolve_table(state: &AppState, name: &str) -> Result<Arc<Table>, (&'static str, String)> {
    if let Some(t) = state.catalog.get().await.table(name) {
        return Ok(t.clone());
    }
    // Database and library text stays in the log; the client gets the code and a generic message.
    let unavailable = |e: &dyn std::error::Error| {
        tracing::warn!(error = %crate::error::Chain(e), "catalog reload for a subscription failed");
        (
            "database_error",
            "the database could not serve this subscription; retry".to_owned(),
        )
    };
    let fresh = state
        .catalog
        .refresh_on_miss(&state.pool)
        .await
        .map_err(|e| unavailable(&e))?;
    fresh
        .table(name)
        .cloned()
        .ok_or(("unknown_table", format!("`{name}` is not a synced table")))
}

/// Spawns the job of a pending subscription; its report comes back through `queue`.
async fn start_job(
    state: &AppState,
    chunks: mpsc::Sender<SnapshotChunk>,
    queue: &mpsc::Sender<ConnEvent>,
    session: &mut Session,
    start: StartJob,
) {
    let table = match start.table {
        Some(t) => t,
        None => match state.catalog.get().await.table(&start.table_name) {
            Some(t) => t.clone(),
            None => return session.forget(&start.sub_id),
        },
    };
    let sink = WsSink {
        sub_id: start.sub_id.clone(),
        epoch: start.epoch,
        chunks,
        queue: queue.clone(),
        frame: None,
        sent_any: false,
        wanted: start.wanted,
    };
    let spec = JobSpec {
        owner: session.owner(),
        sub_id: start.sub_id,
        epoch: start.epoch,
        table,
        filter: start.filter,
        purpose: start.purpose,
        columns: None,
    };
    tokio::spawn(snapshot::run(
        state.snapshots.clone(),
        state.hub.clone(),
        state.barriers.clone(),
        spec,
        sink,
    ));
}

/// Renders a job's rows as `snapshot` frames of up to [`super::protocol::SNAPSHOT_FRAME_ROWS`] rows and about
/// [`super::protocol::SNAPSHOT_FRAME_BYTES`] ([`SnapshotFrame::is_full`]) and passes its report to the
/// connection's queue (after the frames, so the loop can deliver them first).
struct WsSink {
    sub_id: Arc<str>,
    epoch: u64,
    chunks: mpsc::Sender<SnapshotChunk>,
    queue: mpsc::Sender<ConnEvent>,
    frame: Option<SnapshotFrame>,
    sent_any: bool,
    /// The subscription attempt's: once it is gone, the job stops (its rows would be ignored).
    wanted: Option<Arc<Wanted>>,
}

impl WsSink {
    async fn send_frame(&mut self, frame: SnapshotFrame) -> Result<(), SinkGone> {
        if self.wanted.as_ref().is_some_and(|w| w.is_gone()) {
            return Err(SinkGone);
        }
        self.sent_any = true;
        let chunk = SnapshotChunk {
            sub_id: self.sub_id.clone(),
            epoch: self.epoch,
            frame: frame.finish(),
        };
        self.chunks.send(chunk).await.map_err(|_| SinkGone)
    }
}

impl SnapshotSink for WsSink {
    async fn prepared(&mut self, _prepared: &Prepared) -> Result<(), SinkGone> {
        Ok(())
    }

    async fn row(
        &mut self,
        columns: &[SnapshotColumn],
        row: &[Option<&str>],
    ) -> Result<(), SinkGone> {
        let frame = self
            .frame
            .get_or_insert_with(|| SnapshotFrame::new(&self.sub_id));
        frame.push_row(
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.as_str(), c.type_oid, row.get(i).copied().flatten())),
        );
        if frame.is_full()
            && let Some(full) = self.frame.take()
        {
            self.send_frame(full).await?;
        }
        Ok(())
    }

    async fn closed(&self) {
        match &self.wanted {
            Some(wanted) => tokio::select! {
                () = self.chunks.closed() => {}
                () = wanted.gone() => {}
            },
            None => self.chunks.closed().await,
        }
    }

    async fn finish(mut self, report: JobReport) {
        let snapshot_done = matches!(
            &report.result,
            Ok(Prepared {
                purpose: Purpose::Snapshot,
                ..
            })
        );
        if snapshot_done {
            // The last frame, or the one empty frame of an empty result.
            let last = match self.frame.take() {
                Some(f) => Some(f),
                None if !self.sent_any => Some(SnapshotFrame::new(&self.sub_id)),
                None => None,
            };
            if let Some(f) = last
                && self.send_frame(f).await.is_err()
            {
                return;
            }
        }
        // Waits if the queue is full: a report must not be dropped (the connection closes if it lags).
        let _ = self.queue.send(ConnEvent::Job(Box::new(report))).await;
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn expires_in(exp: u64) -> Duration {
    Duration::from_secs(exp.saturating_sub(now_secs()))
}
