//! Pure: one WebSocket connection's subscriptions, as a state machine. Events in (client messages, the user's
//! committed transactions, refetches, snapshot row frames and job reports), actions out (frames to send, jobs to
//! start, a close). No socket, no database, no clock: `ws.rs` drives it, the unit tests below drive it too.
//!
//! ```text
//! hub queue ──► Txn ──► per live subscription: filter (watermark guards resume duplicates) ──► one `txn` frame
//!                 └──► pending subscriptions: buffer until their snapshot/resume report arrives (same queue,
//!                      so ordering with transactions is exact)
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use super::admission::{PerUserLimit, UserPermit};
use super::filter::Filter;
use super::hub::{CannotResume, ConnEvent, Hub, Refetch};
use super::job::{JobReport, Purpose, Wanted};
use super::offset::Offset;
use super::protocol::{
    ClientMessage, OffsetField, ProtocolError, ServerMessage, Subscribe, TxnFrame, close,
};
use super::routing::UserTxn;
use super::subscription::{MustRefetch, Subscription};
use crate::auth::{AuthError, AuthUser};
use crate::db::catalog::Table;
use crate::metrics::Transport;

/// Most subscriptions on one connection.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// What the session needs from the per-user history (the hub implements it; tests fake it).
pub trait History {
    /// The transactions of `owner` after `from` and the position they reach, or why they cannot be served.
    fn resume(
        &self,
        owner: Uuid,
        table: &str,
        from: Offset,
    ) -> Result<(Vec<Arc<UserTxn>>, u64), CannotResume>;

    /// The current generation and processed position.
    fn position(&self) -> Offset;
}

impl History for Hub {
    fn resume(
        &self,
        owner: Uuid,
        table: &str,
        from: Offset,
    ) -> Result<(Vec<Arc<UserTxn>>, u64), CannotResume> {
        Hub::resume(self, owner, table, from)
    }

    fn position(&self) -> Offset {
        Hub::position(self)
    }
}

/// One ready-to-send `snapshot` frame of a subscription's initial rows.
#[derive(Debug)]
pub struct SnapshotChunk {
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Attempt it belongs to (a stale attempt's frames are dropped).
    pub epoch: u64,
    /// The frame's JSON text.
    pub frame: String,
}

/// A job to start for a pending subscription.
#[derive(Debug, Clone)]
pub struct StartJob {
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Attempt number.
    pub epoch: u64,
    /// Table name.
    pub table_name: Arc<str>,
    /// The table when the caller already resolved it (subscribe); otherwise resolve `table_name` (refetch).
    pub table: Option<Arc<Table>>,
    /// Filter.
    pub filter: Filter,
    /// Snapshot or resume.
    pub purpose: Purpose,
    /// Whether the attempt is still wanted (the job stops when it is not).
    pub wanted: Option<Arc<Wanted>>,
}

/// What the socket loop must do.
#[derive(Debug)]
pub enum Action {
    /// Send this text frame.
    Send(String),
    /// Start a job (its report comes back as [`ConnEvent::Job`]). Boxed: rare, and the socket loop holds an action
    /// across a send, so the enum's size is part of every connection's future.
    Start(Box<StartJob>),
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
    /// Send the rest of a transaction too large for one frame, a frame at a time, each rendered only when the one
    /// before it has gone ([`Session::next_part`]). Boxed: rare.
    SendParts(Box<TxnParts>),
}

/// A `txn` frame's size after which the rest of the transaction goes to the connection in further parts.
///
/// Why: a change goes into the frame once for every subscription of the connection that receives it, so a frame
/// was as large as the transaction (or its part, about 4 MiB) times the subscriptions on its table. One user's
/// connection with 100 subscriptions on `works` and a 4 MB batch made one frame of about 400 MB (the server grew
/// 735 MiB, and the client could not receive it); 32 connections made that 23 GB. Now the connection gets the
/// transaction in parts of about this size (and one subscription's share), rendered one at a time.
pub const TXN_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// What is left of a transaction that goes to a connection in more parts than the server's (see
/// [`TXN_FRAME_BYTES`]): the subscriptions whose changes are not rendered yet, in order.
#[derive(Debug)]
pub struct TxnParts {
    txn: Arc<UserTxn>,
    ids: std::collections::VecDeque<Arc<str>>,
    /// The connection's number for the next part.
    next: u32,
}

/// Reusable list of actions; the socket loop drains it after every event.
pub type Actions = Vec<Action>;

/// One connection's subscriptions.
#[derive(Debug)]
pub struct Session {
    owner: Uuid,
    expires_at: u64,
    subs: HashMap<Arc<str>, Subscription>,
    next_epoch: u64,
    /// The transaction (xid) that came to this connection in parts and of which it was sent a part but not yet the
    /// last one, and the connection's number for its next part: its last part goes out even without changes, to
    /// close it.
    open_split: Option<(u64, u32)>,
    /// Job reports that came while a transaction was open on the connection (`open_split`): their subscriptions
    /// go live (handoff frames and `up_to_date`) once it is closed, so that no frame of another transaction comes
    /// between a transaction's parts (docs/protocol.md, "Large transactions in parts").
    deferred_jobs: Vec<JobReport>,
    /// Where the subscriptions' filters are charged (bytes per user, over all their connections); `None`: no limit.
    filter_budget: Option<Arc<PerUserLimit>>,
}

fn send(out: &mut Actions, msg: ServerMessage<'_>) {
    out.push(Action::Send(msg.to_text()));
}

/// Tells subscription `id` to refetch (counted by reason).
fn tell_refetch(out: &mut Actions, id: &str, reason: &'static str) {
    crate::metrics::must_refetch(reason);
    send(out, ServerMessage::must_refetch(id, reason));
}

impl Session {
    /// A session of `user` with no subscriptions.
    pub fn new(user: &AuthUser) -> Self {
        Self {
            owner: user.user_id,
            expires_at: user.expires_at,
            subs: HashMap::new(),
            next_epoch: 0,
            open_split: None,
            deferred_jobs: Vec::new(),
            filter_budget: None,
        }
    }

    /// Charges every subscription's filter to `budget` (`--max-filter-bytes-per-user`).
    pub fn with_filter_budget(mut self, budget: Arc<PerUserLimit>) -> Self {
        self.filter_budget = Some(budget);
        self
    }

    /// `filter`'s place in the user's filter budget (`None`: no filter, or no budget), or why there is none.
    /// Without a budget, one user's 32 connections of 100 subscriptions, each with a filter of nearly a mebibyte
    /// (the largest message), held about 3 GiB of the server's memory.
    fn charge_filter(&self, filter: &Filter) -> Result<Option<UserPermit>, String> {
        let bytes = filter.retained_bytes();
        let Some(budget) = self.filter_budget.as_ref().filter(|_| bytes > 0) else {
            return Ok(None);
        };
        u32::try_from(bytes)
            .ok()
            .and_then(|n| budget.try_acquire_many(self.owner, n))
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "this filter holds {bytes} bytes, and with your other subscriptions' filters that is more \
                     than one user may hold ({} bytes, --max-filter-bytes-per-user); unsubscribe some, or use \
                     smaller filters",
                    budget.limit()
                )
            })
    }

    /// The user.
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    /// When the connection's token expires (unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// A client message that could not be parsed.
    pub fn protocol_error(&mut self, e: &ProtocolError, out: &mut Actions) {
        send(
            out,
            ServerMessage::error(e.id.as_deref(), e.code, &e.message),
        );
    }

    /// The checks of a `subscribe` that need no table: `Ok` to go on and resolve the table.
    pub fn admit(&mut self, s: &Subscribe, out: &mut Actions) -> bool {
        let error = match s.id.as_deref() {
            Some(id) if !id.is_empty() && id.len() <= 200 => {
                if self.subs.contains_key(id) {
                    Some((
                        "duplicate_subscription",
                        format!("a subscription `{id}` exists; unsubscribe first"),
                    ))
                } else if self.subs.len() >= MAX_SUBSCRIPTIONS {
                    Some((
                        "too_many_subscriptions",
                        format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                    ))
                } else {
                    None
                }
            }
            _ => Some((
                "invalid_message",
                "subscribe needs an `id` (1-200 characters)".to_owned(),
            )),
        };
        match error {
            Some((code, message)) => {
                send(out, ServerMessage::error(s.id.as_deref(), code, &message));
                false
            }
            None => true,
        }
    }

    /// A `subscribe` that passed [`Session::admit`], with its table resolved (or why not).
    pub fn subscribe(
        &mut self,
        s: Subscribe,
        table: Result<Arc<Table>, (&'static str, String)>,
        out: &mut Actions,
    ) {
        let id = s.id.unwrap_or_default();
        let table = match table {
            Ok(t) => t,
            Err((code, message)) => {
                return send(out, ServerMessage::error(Some(&id), code, &message));
            }
        };
        let filter = match Filter::parse(s.filter.as_ref(), |c| table.column(c)) {
            Ok(f) => f,
            Err(e) => return send(out, ServerMessage::error(Some(&id), "invalid_where", &e.0)),
        };
        let charge = match self.charge_filter(&filter) {
            Ok(charge) => charge,
            Err(message) => {
                return send(
                    out,
                    ServerMessage::error(Some(&id), "too_many_filter_bytes", &message),
                );
            }
        };
        let purpose = match s.offset {
            OffsetField::None | OffsetField::Invalid => Purpose::Snapshot,
            OffsetField::Valid(offset) => Purpose::Resume(offset),
        };
        let id: Arc<str> = Arc::from(id);
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let table_name: Arc<str> = Arc::from(table.name.as_str());
        let sub = Subscription::pending(table_name.clone(), filter.clone(), epoch).charged(charge);
        let wanted = sub.job_watch();
        if self.subs.insert(id.clone(), sub).is_none() {
            crate::metrics::subscription_opened(Transport::WebSocket);
        }
        out.push(Action::Start(Box::new(StartJob {
            sub_id: id.clone(),
            epoch,
            table_name,
            table: Some(table),
            filter,
            purpose,
            wanted,
        })));
        if s.offset == OffsetField::Invalid {
            // Not an offset we issue: say so before the snapshot that replaces the client's data.
            tell_refetch(out, &id, "invalid_offset");
        }
    }

    /// `ping` and `unsubscribe` (`subscribe` and `refresh_token` have their own entry points).
    pub fn on_message(&mut self, msg: ClientMessage, out: &mut Actions) {
        match msg {
            ClientMessage::Ping => send(out, ServerMessage::pong()),
            ClientMessage::Unsubscribe { id: None } => send(
                out,
                ServerMessage::error(None, "invalid_message", "unsubscribe needs an `id`"),
            ),
            ClientMessage::Unsubscribe { id: Some(id) } => {
                if self.remove(id.as_str()) {
                    send(out, ServerMessage::unsubscribed(&id));
                } else {
                    send(
                        out,
                        ServerMessage::error(
                            Some(&id),
                            "unknown_subscription",
                            "no subscription with this id",
                        ),
                    );
                }
            }
            ClientMessage::Subscribe(_) | ClientMessage::RefreshToken { .. } => {}
        }
    }

    /// `refresh_token`, with the new token verified (or why not).
    pub fn refresh_token(&mut self, verified: Result<AuthUser, AuthError>, out: &mut Actions) {
        match verified {
            Ok(new) if new.user_id == self.owner => {
                self.expires_at = new.expires_at;
                send(out, ServerMessage::token_refreshed(new.expires_at));
            }
            Ok(_) => out.push(Action::Close(
                close::USER_MISMATCH,
                "the refreshed token belongs to another user",
            )),
            Err(e) => send(out, ServerMessage::error(None, e.code(), &e.to_string())),
        }
    }

    /// A committed transaction of this user: one frame with every live subscription's share of it. The hot
    /// path: no allocation besides the frame itself.
    pub fn on_txn(&mut self, txn: &Arc<UserTxn>, out: &mut Actions) {
        // The connection numbers the parts it is sent of a transaction 0, 1, 2, … (the server's parts, and the
        // further parts of one too large for a frame).
        let open = match self.open_split {
            Some((xid, next)) if xid == txn.xid => Some(next),
            _ => None,
        };
        let part = open.or(txn.is_split().then_some(0));
        let mut frame = TxnFrame::numbered(txn, part);
        let mut rest: Option<Box<TxnParts>> = None;
        for (id, sub) in self.subs.iter_mut() {
            if sub.offer(txn) {
                match &mut rest {
                    Some(rest) => rest.ids.push_back(id.clone()),
                    None => {
                        frame.add_changes(id, &sub.table, &sub.filter, txn);
                        if frame.len() >= TXN_FRAME_BYTES {
                            rest = Some(Box::new(TxnParts {
                                txn: txn.clone(),
                                ids: std::collections::VecDeque::new(),
                                next: part.unwrap_or(0) + 1,
                            }));
                        }
                    }
                }
            }
        }
        if let Some(rest) = rest.filter(|r| !r.ids.is_empty()) {
            // Too large for one frame: this one is a part, the rest follow one by one as they are sent.
            let part = part.unwrap_or(0);
            out.push(Action::Send(frame.finish_as_part(txn, part)));
            self.open_split = Some((txn.xid, part + 1));
            out.push(Action::SendParts(rest));
            return;
        }
        if let Some(text) = self.finish_txn(txn, frame, part, open.is_some()) {
            out.push(Action::Send(text));
        }
    }

    /// The next frame of a transaction going out in more parts than the server's, or `None` when it is complete.
    pub fn next_part(&mut self, parts: &mut TxnParts) -> Option<String> {
        let txn = parts.txn.clone();
        if parts.ids.is_empty() {
            return None;
        }
        let part = parts.next;
        let mut frame = TxnFrame::numbered(&txn, Some(part));
        while let Some(id) = parts.ids.pop_front() {
            if let Some(sub) = self.subs.get(&id) {
                frame.add_changes(&id, &sub.table, &sub.filter, &txn);
            }
            if frame.len() >= TXN_FRAME_BYTES && !parts.ids.is_empty() {
                parts.next += 1;
                self.open_split = Some((txn.xid, parts.next));
                return Some(frame.finish_as_part(&txn, part));
            }
        }
        // The last frame of what the connection has of this (server) part: `ids` is empty now.
        self.finish_txn(&txn, frame, Some(part), true)
    }

    /// The frame that ends what the connection gets of `txn` (a whole transaction, or the server's part): with
    /// changes, or empty when it closes a transaction of which the connection was sent parts (`open`); `None` when
    /// there is nothing to send.
    fn finish_txn(
        &mut self,
        txn: &UserTxn,
        frame: TxnFrame,
        part: Option<u32>,
        open: bool,
    ) -> Option<String> {
        if txn.last {
            self.open_split = None;
            (open || !frame.is_empty()).then(|| frame.finish_even_if_empty())
        } else {
            let text = frame.finish()?;
            self.open_split = Some((txn.xid, part.unwrap_or(0) + 1));
            Some(text)
        }
    }

    /// Subscriptions on a table (or all) must refetch: each is told and restarted with a fresh snapshot.
    pub fn on_refetch(&mut self, refetch: &Refetch, out: &mut Actions) {
        let ids = self.subs_on(refetch.table.as_deref());
        if refetch.table.is_none() && self.open_split.is_some() {
            // The stream restarted between a transaction's parts (slot recreated, or moved by another process):
            // its last part will not come, and nothing else may come before it (docs/protocol.md, "Large
            // transactions in parts"). Every subscription is told, and the connection closes: the client
            // subscribes again on a new one.
            for id in &ids {
                tell_refetch(out, id, refetch.reason);
            }
            self.open_split = None;
            self.deferred_jobs.clear();
            out.push(Action::Close(
                close::STREAM_RESTARTED,
                "the replication stream restarted; reconnect and subscribe again",
            ));
            return;
        }
        for id in ids {
            tell_refetch(out, &id, refetch.reason);
            self.restart(&id, out);
        }
    }

    /// A snapshot row frame: sent if its subscription attempt is still the pending one.
    pub fn on_chunk(&mut self, chunk: SnapshotChunk, out: &mut Actions) {
        if self
            .subs
            .get(&chunk.sub_id)
            .is_some_and(|s| s.awaits(chunk.epoch))
        {
            out.push(Action::Send(chunk.frame));
        }
    }

    /// A job's report. Row frames of a snapshot were all passed to [`Session::on_chunk`] before. While a
    /// transaction is open on the connection, the report waits for its last part ([`Session::run_deferred_jobs`]);
    /// the subscription stays pending meanwhile, so the parts it misses are accounted for as for any pending one.
    pub fn on_job(&mut self, report: JobReport, history: &impl History, out: &mut Actions) {
        if self.open_split.is_some() {
            self.deferred_jobs.push(report);
            return;
        }
        let id = report.sub_id;
        let Some(sub) = self.subs.get_mut(&id) else {
            return;
        };
        if !sub.awaits(report.epoch) {
            return; // superseded by a refetch or a re-subscribe
        }
        let prepared = match report.result {
            Ok(p) => p,
            Err(e) => {
                self.remove(&id);
                return send(
                    out,
                    ServerMessage::error(Some(&id), e.code(), &e.to_string()),
                );
            }
        };
        sub.filter = prepared.filter;
        let generation = history.position().generation;
        match (prepared.purpose, prepared.handoff) {
            (Purpose::Resume(from), _) => {
                // The job waited until the stream is up and has reached the offset (snapshot.rs).
                match history.resume(self.owner, &sub.table, from) {
                    Ok((txns, position)) => {
                        sub.go_live_at(position);
                        go_live(out, &id, sub, &txns, position, generation);
                    }
                    Err(reason) => {
                        tell_refetch(out, &id, reason.0);
                        self.restart(&id, out);
                    }
                }
            }
            (Purpose::Snapshot, Some(handoff)) => {
                // The rows went out as they were read; now the transactions the snapshot missed, including any
                // streamed before this subscription began buffering (`Prepared::earlier`).
                match sub.go_live_after_snapshot(&handoff, false, prepared.earlier) {
                    Ok((missed, watermark)) => {
                        go_live(out, &id, sub, &missed, watermark, generation);
                    }
                    // It missed one too large to have been buffered, or the look-back could not tell: start over
                    // with a newer snapshot.
                    Err(MustRefetch(reason)) => {
                        tell_refetch(out, &id, reason);
                        self.restart(&id, out);
                    }
                }
            }
            (Purpose::Snapshot, None) => {}
        }
    }

    /// Whether job reports wait for a transaction open on the connection to close.
    pub fn has_deferred_jobs(&self) -> bool {
        !self.deferred_jobs.is_empty()
    }

    /// The job reports that waited for a transaction's last part, once it went out (in the order they came).
    pub fn run_deferred_jobs(&mut self, history: &impl History, out: &mut Actions) {
        if self.open_split.is_some() {
            return;
        }
        for report in std::mem::take(&mut self.deferred_jobs) {
            self.on_job(report, history, out);
        }
    }

    /// Whether a subscription waits for a job (a snapshot or resume not yet reported).
    pub fn awaits_job(&self) -> bool {
        self.subs.values().any(|s| !s.is_live())
    }

    /// The table of a subscription to restart is gone: forget the subscription.
    pub fn forget(&mut self, id: &str) {
        self.remove(id);
    }

    /// Removes a subscription; whether there was one.
    fn remove(&mut self, id: &str) -> bool {
        let removed = self.subs.remove(id).is_some();
        if removed {
            crate::metrics::subscription_closed(Transport::WebSocket);
        }
        removed
    }

    /// Server shutdown, after the replicator stopped publishing: delivers what is queued, then tells every live
    /// subscription the final position (the slot was acknowledged up to it, so a resume after restart is exact).
    /// Subscriptions with a refetch still queued are told it (`must_refetch`) and get no final offset, nor any
    /// transaction queued after it. Nor does
    /// any subscription while a transaction is still open on the connection (the replicator stopped between its
    /// parts): no `up_to_date` comes between a transaction's parts, so they keep the offsets they have (a rare
    /// refetch, for those older than the restarted server's history).
    pub fn shutdown(
        &mut self,
        queued: impl Iterator<Item = ConnEvent>,
        position: Offset,
        out: &mut Actions,
    ) {
        for event in queued {
            match event {
                ConnEvent::Txn(txn) => self.on_txn(&txn, out),
                ConnEvent::Refetch(refetch) => {
                    // Told now, and pending from here on (no job: the server is stopping): the transactions queued
                    // after the refetch are not delivered to them. A client that got the truncating transaction's
                    // end for them would resume past the truncate from a server that no longer remembers it.
                    for id in self.subs_on(refetch.table.as_deref()) {
                        tell_refetch(out, &id, refetch.reason);
                        self.make_pending(&id);
                    }
                }
                ConnEvent::Job(_) => {}
            }
        }
        // A transaction still open (its last part not queued yet) gets no up_to_date in the middle: every
        // subscription keeps the offset it has, and those that had parts of it refetch on resume.
        let open = self.open_split.is_some();
        let mut ids: Vec<&Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| !open && s.is_live())
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        for id in ids {
            send(out, ServerMessage::up_to_date(id, position));
        }
        out.push(Action::Close(
            close::SHUTDOWN,
            "server shutting down; reconnect and resume from your offset",
        ));
    }

    /// The subscriptions on `table` (or all).
    fn subs_on(&self, table: Option<&str>) -> Vec<Arc<str>> {
        self.subs
            .iter()
            .filter(|(_, s)| s.on_table(table))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Makes subscription `id` a new pending attempt (it buffers, and delivers nothing until its job reports).
    fn make_pending(&mut self, id: &str) -> Option<&Subscription> {
        let sub = self.subs.get_mut(id)?;
        self.next_epoch += 1;
        sub.restart(self.next_epoch);
        Some(sub)
    }

    /// A new pending attempt of subscription `id`, with the snapshot job that serves it.
    fn restart(&mut self, id: &Arc<str>, out: &mut Actions) {
        let Some(sub) = self.make_pending(id) else {
            return;
        };
        out.push(Action::Start(Box::new(StartJob {
            sub_id: id.clone(),
            epoch: sub.epoch,
            table_name: sub.table.clone(),
            table: None,
            filter: sub.filter.clone(),
            purpose: Purpose::Snapshot,
            wanted: sub.job_watch(),
        })));
    }
}

impl Drop for Session {
    /// The connection is gone: its subscriptions end.
    fn drop(&mut self) {
        for _ in self.subs.drain() {
            crate::metrics::subscription_closed(Transport::WebSocket);
        }
    }
}

/// Sends a subscription that just went live its share of `txns` (each in its own frame), then `up_to_date` at
/// `watermark`.
fn go_live(
    out: &mut Actions,
    id: &str,
    sub: &Subscription,
    txns: &[Arc<UserTxn>],
    watermark: u64,
    generation: i64,
) {
    for txn in txns {
        let mut frame = TxnFrame::new(txn);
        frame.add_changes(id, &sub.table, &sub.filter, txn);
        if let Some(text) = frame.finish() {
            out.push(Action::Send(text));
        }
    }
    send(
        out,
        ServerMessage::up_to_date(
            id,
            Offset {
                generation,
                lsn: watermark,
            },
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::catalog::Column;
    use crate::live::handoff::{Handoff, PgSnapshot};
    use crate::live::job::{JobError, Prepared};
    use crate::live::routing::Change;
    use deeprecall_replication::{Lsn, Op, Row};
    use serde_json::{Value, json};
    use std::cell::RefCell;

    const OWNER: Uuid = Uuid::from_u128(7);

    struct FakeHistory {
        txns: Vec<Arc<UserTxn>>,
        position: u64,
        refuse: Option<&'static str>,
        asked: RefCell<Vec<Offset>>,
    }

    impl History for FakeHistory {
        fn resume(
            &self,
            _owner: Uuid,
            _table: &str,
            from: Offset,
        ) -> Result<(Vec<Arc<UserTxn>>, u64), CannotResume> {
            self.asked.borrow_mut().push(from);
            match self.refuse {
                Some(r) => Err(CannotResume(r)),
                None => Ok((
                    self.txns
                        .iter()
                        .filter(|t| t.end_lsn.0 > from.lsn)
                        .cloned()
                        .collect(),
                    self.position,
                )),
            }
        }

        fn position(&self) -> Offset {
            Offset {
                generation: 1,
                lsn: self.position,
            }
        }
    }

    fn history() -> FakeHistory {
        FakeHistory {
            txns: vec![],
            position: 5000,
            refuse: None,
            asked: RefCell::new(vec![]),
        }
    }

    fn table() -> Arc<Table> {
        let col = |name: &str, oid| Column {
            name: name.into(),
            type_name: "text".into(),
            type_oid: oid,
            base_type_oid: oid,
            not_null: false,
            generated: false,
            identity_always: false,
        };
        Arc::new(Table {
            oid: 1,
            schema: "public".into(),
            name: "works".into(),
            columns: vec![col("id", 25), col("owner_id", 2950), col("read_status", 25)],
            primary_key: "works_pkey".into(),
        })
    }

    fn user() -> AuthUser {
        AuthUser {
            user_id: OWNER,
            expires_at: 100,
            admin: false,
        }
    }

    fn txn(xid: u64, commit: u64, rows: &[(&str, &str)]) -> Arc<UserTxn> {
        let changes = rows
            .iter()
            .map(|(id, status)| {
                let row: Row = [
                    ("id", Some(*id)),
                    ("owner_id", Some("00000000-0000-0000-0000-000000000007")),
                    ("read_status", Some(*status)),
                ]
                .into_iter()
                .collect();
                Change {
                    table: "works".into(),
                    op: Op::Insert,
                    new: Some(row),
                    old: None,
                    unchanged: vec![],
                    row_json: json!({"id": id, "read_status": status}).to_string().into(),
                }
            })
            .collect();
        Arc::new(UserTxn {
            owner: OWNER,
            xid,
            generation: 1,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            changes,
            bytes: 0,
            part: 0,
            last: true,
        })
    }

    fn subscribe(session: &mut Session, json: Value, out: &mut Actions) {
        let Ok(ClientMessage::Subscribe(s)) = ClientMessage::parse(&json.to_string()) else {
            panic!("not a subscribe: {json}")
        };
        if session.admit(&s, out) {
            session.subscribe(s, Ok(table()), out);
        }
    }

    fn frames(out: &mut Actions) -> Vec<Value> {
        out.drain(..)
            .filter_map(|a| match a {
                Action::Send(t) => Some(serde_json::from_str(&t).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn started(out: &Actions) -> Vec<(String, u64, Purpose)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Start(s) => Some((s.sub_id.to_string(), s.epoch, s.purpose)),
                _ => None,
            })
            .collect()
    }

    /// A session with one subscription to works, `id`, live after its snapshot (epoch 1), and no actions left.
    fn live_on_works(id: &str) -> (Session, Actions) {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": id, "table": "works"}),
            &mut out,
        );
        s.on_job(
            snapshot_report(id, 1, Filter::default()),
            &history(),
            &mut out,
        );
        out.clear();
        (s, out)
    }

    fn snapshot_report(id: &str, epoch: u64, filter: Filter) -> JobReport {
        JobReport {
            sub_id: id.into(),
            epoch,
            result: Ok(Prepared {
                filter,
                purpose: Purpose::Snapshot,
                handoff: Some(Handoff {
                    snapshot: PgSnapshot::parse("100:110:105").unwrap(),
                    wal_lsn: 1000,
                    barrier_lsn: 1500,
                }),
                columns: Arc::from(vec![]),
                generation: 1,
                earlier: Ok(vec![]),
            }),
        }
    }

    #[test]
    fn snapshot_handoff_then_live_frames() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "w", "table": "works"}),
            &mut out,
        );
        assert_eq!(started(&out), vec![("w".into(), 1, Purpose::Snapshot)]);
        out.clear();
        // While pending: buffered, nothing sent.
        s.on_txn(&txn(101, 900, &[("a", "unread")]), &mut out);
        s.on_txn(&txn(105, 950, &[("b", "unread")]), &mut out);
        assert!(out.is_empty());
        s.on_chunk(
            SnapshotChunk {
                sub_id: "w".into(),
                epoch: 1,
                frame: r#"{"type":"snapshot","id":"w","rows":[]}"#.into(),
            },
            &mut out,
        );
        s.on_chunk(
            SnapshotChunk {
                sub_id: "w".into(),
                epoch: 0,
                frame: "stale".into(),
            },
            &mut out,
        );
        s.on_job(
            snapshot_report("w", 1, Filter::default()),
            &history(),
            &mut out,
        );
        let f = frames(&mut out);
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!(f[0]["type"], "snapshot");
        // xid 101 is in the snapshot; 105 was in progress.
        assert_eq!(f[1]["xid"], "105");
        assert_eq!(f[1]["changes"][0]["id"], "w");
        assert_eq!(
            f[2],
            json!({"type": "up_to_date", "id": "w", "offset": "1-00000000000005dc"})
        );
        // Live: once, and never what the watermark already covers.
        s.on_txn(&txn(105, 950, &[("b", "unread")]), &mut out);
        assert!(out.is_empty());
        s.on_txn(&txn(120, 2000, &[("c", "read")]), &mut out);
        let f = frames(&mut out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0]["offset"], "1-00000000000007d8");
    }

    /// Part `part` of transaction `xid` (the last one when `last`).
    fn part_of(
        xid: u64,
        commit: u64,
        part: u32,
        last: bool,
        rows: &[(&str, &str)],
    ) -> Arc<UserTxn> {
        let mut t = Arc::unwrap_or_clone(txn(xid, commit, rows));
        t.part = part;
        t.last = last;
        if !last {
            t.end_lsn = Lsn(commit);
        }
        Arc::new(t)
    }

    #[test]
    fn a_subscription_goes_live_only_between_transactions_never_between_parts() {
        let (mut s, mut out) = live_on_works("a");
        // "b" is pending; a transaction it missed is buffered.
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "b", "table": "works"}),
            &mut out,
        );
        out.clear();
        s.on_txn(&txn(130, 1600, &[("w", "unread")]), &mut out);
        assert_eq!(frames(&mut out).len(), 1, "live \"a\" gets it");
        // A large transaction begins: "a" gets its first part.
        s.on_txn(&part_of(140, 2000, 0, false, &[("x", "unread")]), &mut out);
        let f = frames(&mut out);
        assert_eq!((f.len(), &f[0]["more"]), (1, &json!(true)));
        // "b"'s snapshot is done now: its handoff (130) and up_to_date wait for the transaction's last part.
        let mut report = snapshot_report("b", 2, Filter::default());
        if let Ok(p) = &mut report.result {
            p.handoff = Some(Handoff {
                // Sees the large transaction (140, committed before it), not 130 (in progress then).
                snapshot: PgSnapshot::parse("130:145:130").unwrap(),
                wal_lsn: 2500,
                barrier_lsn: 2600,
            });
        }
        s.on_job(report, &history(), &mut out);
        assert!(out.is_empty(), "{:?}", frames(&mut out));
        assert!(s.has_deferred_jobs() && s.awaits_job());
        s.run_deferred_jobs(&history(), &mut out);
        assert!(out.is_empty(), "still open: nothing yet");
        s.on_txn(&part_of(140, 2000, 1, true, &[("y", "unread")]), &mut out);
        let f = frames(&mut out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0]["xid"], "140");
        assert!(f[0].get("offset").is_some(), "the last part: {:?}", f[0]);
        s.run_deferred_jobs(&history(), &mut out);
        let f = frames(&mut out);
        assert!(!s.has_deferred_jobs() && !s.awaits_job());
        // "b": the transaction its snapshot missed, then up_to_date. Its snapshot saw the large one (140), which
        // was streamed late, so its parts, skipped while "b" was pending, are not needed.
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            (&f[0]["xid"], &f[0]["changes"][0]["id"]),
            (&json!("130"), &json!("b"))
        );
        assert_eq!(
            f[1],
            json!({"type": "up_to_date", "id": "b", "offset": "1-0000000000000a28"})
        );
        // A shutdown while a transaction is open sends no final offsets in its middle.
        s.on_txn(&part_of(150, 3000, 0, false, &[("z", "unread")]), &mut out);
        out.clear();
        let mut stopping = Actions::new();
        s.shutdown(
            std::iter::empty(),
            Offset {
                generation: 1,
                lsn: 2500,
            },
            &mut stopping,
        );
        assert!(frames(&mut stopping).is_empty());
        // The stream restarting while a transaction is open: its last part will not come. Every subscription is
        // told, and the connection closes instead of waiting for it (and holding back any job report for ever).
        s.on_refetch(
            &Refetch {
                table: None,
                reason: "slot_recreated",
            },
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(Action::Close(close::STREAM_RESTARTED, _))
        ));
        assert!(started(&out).is_empty());
        let f = frames(&mut out);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().all(|f| f["type"] == "must_refetch"));
    }

    #[test]
    fn streamed_before_subscribing_yet_unseen_by_the_snapshot() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        // 105's commit was streamed before the subscription existed (a live one would have had it), yet the
        // snapshot still saw it in progress: only the job's look-back (`earlier`) has it.
        s.on_txn(&txn(105, 950, &[("b", "unread")]), &mut out);
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "w", "table": "works"}),
            &mut out,
        );
        out.clear();
        s.on_txn(&txn(107, 1100, &[("c", "unread")]), &mut out);
        let mut report = snapshot_report("w", 1, Filter::default());
        if let Ok(p) = &mut report.result {
            p.earlier = Ok(vec![
                txn(105, 950, &[("b", "unread")]),
                txn(107, 1100, &[("c", "unread")]),
            ]);
        }
        s.on_job(report, &history(), &mut out);
        let f = frames(&mut out);
        let xids: Vec<Value> = f.iter().map(|f| f["xid"].clone()).collect();
        assert_eq!(xids, vec![json!("105"), json!("107"), Value::Null], "{f:?}");
        assert_eq!(f[2]["type"], "up_to_date");
        // A look-back that cannot tell (evicted history): refetch with a new attempt.
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "x", "table": "works"}),
            &mut out,
        );
        out.clear();
        let mut report = snapshot_report("x", 2, Filter::default());
        if let Ok(p) = &mut report.result {
            p.earlier = Err("transaction_not_in_history");
        }
        s.on_job(report, &history(), &mut out);
        assert_eq!(started(&out), vec![("x".into(), 3, Purpose::Snapshot)]);
        let f = frames(&mut out);
        assert_eq!(f[0]["type"], "must_refetch");
        assert_eq!(f[0]["reason"], "transaction_not_in_history");
    }

    #[test]
    fn one_frame_per_transaction_for_all_subscriptions() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "all", "table": "works"}),
            &mut out,
        );
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "unread", "table": "works", "where": {"read_status": "unread"}}),
            &mut out,
        );
        out.clear();
        s.on_job(
            snapshot_report("all", 1, Filter::default()),
            &history(),
            &mut out,
        );
        let t = table();
        let unread =
            Filter::parse(Some(&json!({"read_status": "unread"})), |c| t.column(c)).unwrap();
        s.on_job(snapshot_report("unread", 2, unread), &history(), &mut out);
        out.clear();
        s.on_txn(&txn(200, 3000, &[("a", "unread"), ("b", "read")]), &mut out);
        let f = frames(&mut out);
        assert_eq!(f.len(), 1);
        let mut ids: Vec<(String, String)> = f[0]["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap().into(),
                    c["row"]["id"].as_str().unwrap().into(),
                )
            })
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![
                ("all".into(), "a".into()),
                ("all".into(), "b".into()),
                ("unread".into(), "a".into())
            ]
        );
    }

    #[test]
    fn errors_leave_nothing_behind() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "table": "works"}),
            &mut out,
        );
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "c", "table": "works", "where": {"nope": 1}}),
            &mut out,
        );
        let Ok(ClientMessage::Subscribe(sub)) =
            ClientMessage::parse(r#"{"type":"subscribe","id":"t","table":"x"}"#)
        else {
            panic!()
        };
        assert!(s.admit(&sub, &mut out));
        s.subscribe(
            sub,
            Err(("unknown_table", "`x` is not a synced table".into())),
            &mut out,
        );
        let f = frames(&mut out);
        let codes: Vec<(&str, Value)> = f
            .iter()
            .map(|v| (v["code"].as_str().unwrap(), v["id"].clone()))
            .collect();
        assert_eq!(
            codes,
            vec![
                ("invalid_message", Value::Null),
                ("invalid_where", json!("c")),
                ("unknown_table", json!("t"))
            ]
        );
        // The ids are free.
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "c", "table": "works"}),
            &mut out,
        );
        assert_eq!(started(&out).len(), 1);
        out.clear();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "c", "table": "works"}),
            &mut out,
        );
        assert_eq!(frames(&mut out)[0]["code"], "duplicate_subscription");
        // A failed job removes its subscription.
        s.on_job(
            JobReport {
                sub_id: "c".into(),
                epoch: 1,
                result: Err(JobError::StreamUnavailable),
            },
            &history(),
            &mut out,
        );
        assert_eq!(frames(&mut out)[0]["code"], "stream_unavailable");
        s.on_message(
            ClientMessage::Unsubscribe {
                id: Some("c".into()),
            },
            &mut out,
        );
        assert_eq!(frames(&mut out)[0]["code"], "unknown_subscription");
    }

    #[test]
    fn invalid_offset_refetches_and_resume_replays_history() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "bad", "table": "works", "offset": "zz"}),
            &mut out,
        );
        assert_eq!(started(&out), vec![("bad".into(), 1, Purpose::Snapshot)]);
        assert_eq!(
            frames(&mut out),
            vec![json!({"type": "must_refetch", "id": "bad", "reason": "invalid_offset"})]
        );
        let from = Offset {
            generation: 1,
            lsn: 1000,
        };
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "r", "table": "works", "offset": from.to_string()}),
            &mut out,
        );
        assert_eq!(started(&out), vec![("r".into(), 2, Purpose::Resume(from))]);
        out.clear();
        let mut h = history();
        h.txns = vec![
            txn(50, 900, &[("old", "read")]),
            txn(60, 1100, &[("new", "read")]),
        ];
        let report = JobReport {
            sub_id: "r".into(),
            epoch: 2,
            result: Ok(Prepared {
                filter: Filter::default(),
                purpose: Purpose::Resume(from),
                handoff: None,
                columns: Arc::from(vec![]),
                generation: 0,
                earlier: Ok(vec![]),
            }),
        };
        s.on_job(report, &h, &mut out);
        let f = frames(&mut out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0]["xid"], "60");
        assert_eq!(f[1]["offset"], "1-0000000000001388");
        // Refused: must_refetch, then a snapshot job for the same id.
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "x", "table": "works", "offset": from.to_string()}),
            &mut out,
        );
        out.clear();
        h.refuse = Some("offset_older_than_server_history");
        let report = JobReport {
            sub_id: "x".into(),
            epoch: 3,
            result: Ok(Prepared {
                filter: Filter::default(),
                purpose: Purpose::Resume(from),
                handoff: None,
                columns: Arc::from(vec![]),
                generation: 0,
                earlier: Ok(vec![]),
            }),
        };
        s.on_job(report, &h, &mut out);
        assert_eq!(started(&out), vec![("x".into(), 4, Purpose::Snapshot)]);
        assert_eq!(
            frames(&mut out)[0]["reason"],
            "offset_older_than_server_history"
        );
    }

    #[test]
    fn refetch_restarts_only_that_table_and_shutdown_skips_stale() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "a", "table": "works"}),
            &mut out,
        );
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "b", "table": "works"}),
            &mut out,
        );
        out.clear();
        s.on_job(
            snapshot_report("a", 1, Filter::default()),
            &history(),
            &mut out,
        );
        s.on_job(
            snapshot_report("b", 2, Filter::default()),
            &history(),
            &mut out,
        );
        out.clear();
        s.on_refetch(
            &Refetch {
                table: Some("boards".into()),
                reason: "truncated",
            },
            &mut out,
        );
        assert!(out.is_empty());
        s.shutdown(
            [ConnEvent::Refetch(Box::new(Refetch {
                table: None,
                reason: "slot_recreated",
            }))]
            .into_iter(),
            Offset {
                generation: 1,
                lsn: 9,
            },
            &mut out,
        );
        // A refetch was pending: told, and no final offsets.
        let f = frames(&mut out);
        assert!(f.iter().all(|f| f["type"] == "must_refetch"), "{f:?}");
        let mut told: Vec<&str> = f.iter().filter_map(|f| f["id"].as_str()).collect();
        told.sort_unstable();
        assert_eq!(told, ["a", "b"]);
        let (mut s2, mut out) = live_on_works("a");
        s2.on_refetch(
            &Refetch {
                table: Some("works".into()),
                reason: "truncated",
            },
            &mut out,
        );
        assert_eq!(started(&out), vec![("a".into(), 2, Purpose::Snapshot)]);
        assert_eq!(frames(&mut out)[0]["reason"], "truncated");
        s2.shutdown(
            std::iter::empty(),
            Offset {
                generation: 1,
                lsn: 9,
            },
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(Action::Close(close::SHUTDOWN, _))
        ));
        assert!(
            frames(&mut out).is_empty(),
            "pending subscriptions get no final offset"
        );
    }

    #[test]
    fn a_truncate_queued_at_shutdown_is_told_and_its_transaction_not_delivered() {
        let (mut s, mut out) = live_on_works("w");
        // TRUNCATE works; INSERT …: the hub queues the refetch before the transaction.
        s.shutdown(
            [
                ConnEvent::Refetch(Box::new(Refetch {
                    table: Some("works".into()),
                    reason: "truncated",
                })),
                ConnEvent::Txn(txn(300, 3000, &[("n", "unread")])),
            ]
            .into_iter(),
            Offset {
                generation: 1,
                lsn: 3008,
            },
            &mut out,
        );
        let f = frames(&mut out);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (&f[0]["type"], &f[0]["id"]),
            (&json!("must_refetch"), &json!("w"))
        );
    }

    #[test]
    fn shutdown_delivers_queued_then_final_offsets() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "a", "table": "works"}),
            &mut out,
        );
        subscribe(
            &mut s,
            json!({"type": "subscribe", "id": "p", "table": "works"}),
            &mut out,
        );
        s.on_job(
            snapshot_report("a", 1, Filter::default()),
            &history(),
            &mut out,
        );
        out.clear();
        let queued = [ConnEvent::Txn(txn(300, 4000, &[("z", "read")]))];
        s.shutdown(
            queued.into_iter(),
            Offset {
                generation: 1,
                lsn: 4100,
            },
            &mut out,
        );
        let f = frames(&mut out);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0]["type"], "txn");
        assert_eq!(
            f[1],
            json!({"type": "up_to_date", "id": "a", "offset": "1-0000000000001004"})
        );
    }

    #[test]
    fn token_refresh() {
        let mut s = Session::new(&user());
        let mut out = Actions::new();
        s.refresh_token(
            Ok(AuthUser {
                user_id: OWNER,
                expires_at: 500,
                admin: false,
            }),
            &mut out,
        );
        assert_eq!(s.expires_at(), 500);
        assert_eq!(frames(&mut out)[0]["expires_at"], 500);
        s.refresh_token(
            Ok(AuthUser {
                user_id: Uuid::from_u128(8),
                expires_at: 600,
                admin: false,
            }),
            &mut out,
        );
        assert!(matches!(out[0], Action::Close(close::USER_MISMATCH, _)));
        assert_eq!(s.expires_at(), 500);
    }
}
