//! Pure: one subscription's position relative to the stream, shared by both transports (the WebSocket session and
//! the HTTP shape endpoint).
//!
//! ```text
//!             subscribe / refetch                snapshot report (handoff)
//!   ──────────────► Pending { buffer } ──────────────────────────────► Live { watermark }
//!                     ▲   every txn of the user is buffered              │ txn past watermark: deliver,
//!                     │                                                  │ watermark = its end
//!                     └───────────── must refetch ◄──────────────────────┘
//! ```
//!
//! Going live after a snapshot delivers the buffered transactions the snapshot did not contain
//! ([`Handoff::must_deliver`]); after a resume, the history's transactions past the client's offset. From then on
//! the watermark drops everything already delivered (a transaction can be both in a copied history and in the
//! queue behind it), so each change arrives exactly once.

use std::sync::Arc;

use super::admission::UserPermit;
use super::filter::Filter;
use super::handoff::Handoff;
use super::job::{Wanted, WantedGuard};
use super::routing::UserTxn;

/// Most bytes of transactions one pending subscription buffers while its snapshot is taken. Beyond it (and for
/// any part of a transaction too large to come whole) only the transaction's identity is kept: if the snapshot
/// turns out to lack it, the subscription refetches instead of delivering it from the buffer.
pub const PENDING_BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// A transaction a pending subscription did not buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Skipped {
    xid: u64,
    commit_lsn: u64,
}

/// Where a subscription is.
#[derive(Debug)]
enum SubState {
    /// Waiting for a snapshot or resume; transactions are buffered (up to [`PENDING_BUFFER_BYTES`]). Boxed: a
    /// subscription is pending only briefly, and every connection (mostly idle, mostly live) holds its
    /// subscriptions for as long as it lives.
    Pending(Box<PendingBuffer>),
    /// Delivering transactions past `watermark`.
    Live { watermark: u64 },
}

/// What a pending subscription keeps.
#[derive(Debug, Default)]
struct PendingBuffer {
    buffer: Vec<Arc<UserTxn>>,
    bytes: usize,
    skipped: Vec<Skipped>,
    /// The attempt's job stops when this goes (the subscription removed or started over).
    wanted: WantedGuard,
}

impl SubState {
    fn pending() -> Self {
        Self::Pending(Box::default())
    }
}

/// The snapshot lacks a transaction the subscription did not buffer: it must refetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MustRefetch(pub &'static str);

/// One subscription: a table, a filter, and its position.
#[derive(Debug)]
pub struct Subscription {
    /// Table name.
    pub table: Arc<str>,
    /// The filter (canonical once the first job report arrived).
    pub filter: Filter,
    /// Attempt number: reports and row chunks of older attempts are ignored.
    pub epoch: u64,
    state: SubState,
    /// The filter's bytes in its user's filter budget, given back when the subscription goes (boxed: most
    /// subscriptions have no filter, and there is one per connection at least).
    _charge: Option<Box<UserPermit>>,
}

impl Subscription {
    /// A subscription waiting for attempt `epoch`.
    pub fn pending(table: Arc<str>, filter: Filter, epoch: u64) -> Self {
        Self {
            table,
            filter,
            epoch,
            state: SubState::pending(),
            _charge: None,
        }
    }

    /// Holds `charge` (the filter's place in its user's budget) for as long as the subscription lives.
    pub fn charged(mut self, charge: Option<UserPermit>) -> Self {
        self._charge = charge.map(Box::new);
        self
    }

    /// Whether it is live (not waiting for a snapshot or resume).
    pub fn is_live(&self) -> bool {
        matches!(self.state, SubState::Live { .. })
    }

    /// What the job of the current attempt watches to know it is still wanted (`None` once live: no job runs).
    pub fn job_watch(&self) -> Option<Arc<Wanted>> {
        match &self.state {
            SubState::Pending(pending) => Some(pending.wanted.watch()),
            SubState::Live { .. } => None,
        }
    }

    /// Whether it waits for attempt `epoch`.
    pub fn awaits(&self, epoch: u64) -> bool {
        self.epoch == epoch && !self.is_live()
    }

    /// Starts over as attempt `epoch` (a refetch): back to pending with an empty buffer.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.state = SubState::pending();
    }

    /// Whether a refetch for `table` (every table when `None`) concerns it.
    pub fn on_table(&self, table: Option<&str>) -> bool {
        table.is_none_or(|t| t == &*self.table)
    }

    /// A committed transaction of the user (or a part of one) arrives. Returns whether to deliver it now (live,
    /// and past the watermark, which then moves to its end; a part before the last one does not move it); a
    /// pending subscription buffers it, within its budget.
    pub fn offer(&mut self, txn: &Arc<UserTxn>) -> bool {
        match &mut self.state {
            SubState::Pending(pending) => {
                let PendingBuffer {
                    buffer,
                    bytes,
                    skipped,
                    ..
                } = &mut **pending;
                if txn.is_split() || *bytes + txn.bytes > PENDING_BUFFER_BYTES {
                    let id = Skipped {
                        xid: txn.xid,
                        commit_lsn: txn.commit_lsn.0,
                    };
                    if skipped.last() != Some(&id) {
                        skipped.push(id);
                    }
                } else {
                    *bytes += txn.bytes;
                    buffer.push(txn.clone());
                }
                false
            }
            SubState::Live { watermark } => {
                // A part before a transaction's last has no end yet (its `end_lsn` is the commit LSN), and a
                // commit record may start exactly where the watermark is (the end of the user's previous commit
                // right before it, or a keepalive position): such a part is past the watermark all the same.
                let fresh = if txn.last {
                    txn.end_lsn.0 > *watermark
                } else {
                    txn.commit_lsn.0 >= *watermark
                };
                if fresh && txn.last {
                    *watermark = txn.end_lsn.0;
                }
                fresh
            }
        }
    }

    /// The snapshot's rows went out: goes live and returns the buffered transactions to deliver after them, plus
    /// the watermark (the stream position the client is then complete up to).
    ///
    /// With `cut_at_barrier` only transactions up to the barrier are handed over and the watermark is the barrier
    /// (for a transport that answers once and leaves later ones to the next request); otherwise every buffered
    /// one is, and the watermark is past the last of them.
    ///
    /// `earlier` is the job's look-back ([`Prepared::earlier`](super::job::Prepared::earlier)): the user's
    /// transactions the snapshot did not see but whose commits had been streamed by its barrier. Those published
    /// before the subscription started buffering are handed over too, first (handoff.rs, "Streamed before it was
    /// visible").
    ///
    /// `Err` when the snapshot lacks a transaction that was not buffered (too large, or over the budget), or the
    /// look-back could not tell (its reason): the subscription stays pending and must refetch.
    pub fn go_live_after_snapshot(
        &mut self,
        handoff: &Handoff,
        cut_at_barrier: bool,
        earlier: Result<Vec<Arc<UserTxn>>, &'static str>,
    ) -> Result<(Vec<Arc<UserTxn>>, u64), MustRefetch> {
        let earlier = earlier.map_err(MustRefetch)?;
        if let SubState::Pending(pending) = &self.state {
            let skipped = &pending.skipped;
            let needed = skipped.iter().any(|t| {
                (!cut_at_barrier || t.commit_lsn < handoff.barrier_lsn)
                    && handoff.must_deliver_at(t.xid, t.commit_lsn)
            });
            if needed {
                return Err(MustRefetch("transaction_too_large"));
            }
        }
        let (mut buffer, skipped) =
            match std::mem::replace(&mut self.state, SubState::Live { watermark: 0 }) {
                SubState::Pending(pending) => (pending.buffer, pending.skipped),
                SubState::Live { .. } => (Vec::new(), Vec::new()),
            };
        if !earlier.is_empty() {
            // Those published after the subscription started buffering are in the buffer (or were skipped,
            // handled above) already.
            let held = |t: &UserTxn| {
                let id = Skipped {
                    xid: t.xid,
                    commit_lsn: t.commit_lsn.0,
                };
                skipped.contains(&id)
                    || buffer
                        .iter()
                        .any(|b| b.xid == id.xid && b.commit_lsn.0 == id.commit_lsn)
            };
            // The rest were published before anything buffered: in stream order (the hub sorts them), ahead.
            let mut merged: Vec<Arc<UserTxn>> = earlier.into_iter().filter(|t| !held(t)).collect();
            merged.append(&mut buffer);
            buffer = merged;
        }
        let watermark = if cut_at_barrier {
            buffer.retain(|t| t.end_lsn.0 <= handoff.barrier_lsn && handoff.must_deliver(t));
            handoff.barrier_lsn
        } else {
            let last = buffer.last().map_or(0, |t| t.end_lsn.0);
            buffer.retain(|t| handoff.must_deliver(t));
            handoff.barrier_lsn.max(last)
        };
        self.state = SubState::Live { watermark };
        Ok((buffer, watermark))
    }

    /// Goes live at `watermark` (a resume: the history up to it was copied); drops the buffer.
    pub fn go_live_at(&mut self, watermark: u64) {
        self.state = SubState::Live { watermark };
    }

    /// The live position (`None` while pending).
    pub fn watermark(&self) -> Option<u64> {
        match self.state {
            SubState::Live { watermark } => Some(watermark),
            SubState::Pending(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::handoff::PgSnapshot;
    use deeprecall_replication::Lsn;
    use uuid::Uuid;

    fn txn(xid: u64, commit: u64) -> Arc<UserTxn> {
        Arc::new(UserTxn {
            owner: Uuid::nil(),
            xid,
            generation: 1,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            changes: vec![],
            bytes: 0,
            part: 0,
            last: true,
        })
    }

    fn handoff() -> Handoff {
        Handoff {
            snapshot: PgSnapshot::parse("100:110:105").unwrap(),
            wal_lsn: 1000,
            barrier_lsn: 1500,
        }
    }

    #[test]
    fn every_part_of_a_transaction_committed_right_at_the_watermark_is_delivered() {
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        // Live at 1008: the end of the user's previous commit, where the next commit record starts.
        s.go_live_at(1008);
        let part = |part: u32, last: bool| {
            let mut t = Arc::unwrap_or_clone(txn(200, 1008));
            t.part = part;
            t.last = last;
            if !last {
                t.end_lsn = Lsn(1008);
            }
            Arc::new(t)
        };
        assert!(s.offer(&part(0, false)), "the first part was dropped");
        assert!(s.offer(&part(1, false)), "a middle part was dropped");
        assert!(s.offer(&part(2, true)));
        assert_eq!(s.watermark(), Some(1016));
        // What the watermark covers is still not delivered again.
        assert!(!s.offer(&txn(150, 900)));
        assert!(!s.offer(&part(2, true)));
    }

    #[test]
    fn buffers_then_hands_over_what_the_snapshot_missed() {
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        assert!(s.awaits(1) && !s.awaits(2));
        for t in [txn(101, 900), txn(105, 950), txn(112, 1200), txn(113, 1600)] {
            assert!(!s.offer(&t), "pending subscriptions never deliver directly");
        }
        let (missed, watermark) = s
            .go_live_after_snapshot(&handoff(), false, Ok(vec![]))
            .unwrap();
        let xids: Vec<u64> = missed.iter().map(|t| t.xid).collect();
        assert_eq!(xids, vec![105, 112, 113]);
        assert_eq!(watermark, 1608);
        assert!(s.is_live());
        // Queued behind the buffer already: dropped; new: delivered once.
        assert!(!s.offer(&txn(113, 1600)));
        assert!(s.offer(&txn(114, 1700)));
        assert!(!s.offer(&txn(114, 1700)));
        assert_eq!(s.watermark(), Some(1708));
    }

    #[test]
    fn hands_over_what_was_streamed_before_buffering_began() {
        // 105 was still in progress for the snapshot, but its commit had been streamed before the subscription
        // began buffering: only the hub's look-back has it. 112 is in both and goes out once.
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.offer(&txn(112, 1200));
        let (missed, watermark) = s
            .go_live_after_snapshot(&handoff(), false, Ok(vec![txn(105, 950), txn(112, 1200)]))
            .unwrap();
        let xids: Vec<u64> = missed.iter().map(|t| t.xid).collect();
        assert_eq!(xids, vec![105, 112]);
        assert_eq!(watermark, 1500);
        // Cut at the barrier: the same, and nothing past it.
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.offer(&txn(113, 1600));
        let (missed, _) = s
            .go_live_after_snapshot(&handoff(), true, Ok(vec![txn(105, 950)]))
            .unwrap();
        assert_eq!(missed.iter().map(|t| t.xid).collect::<Vec<_>>(), vec![105]);
    }

    #[test]
    fn cut_at_barrier_leaves_later_transactions_for_later() {
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        for t in [txn(105, 950), txn(113, 1600)] {
            s.offer(&t);
        }
        let (missed, watermark) = s
            .go_live_after_snapshot(&handoff(), true, Ok(vec![]))
            .unwrap();
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].xid, 105);
        assert_eq!(watermark, 1500);
    }

    #[test]
    fn restart_and_refetch_scope() {
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.go_live_at(50);
        assert!(!s.offer(&txn(1, 40)));
        assert!(s.offer(&txn(2, 60)));
        assert!(s.on_table(Some("works")) && s.on_table(None) && !s.on_table(Some("boards")));
        s.restart(2);
        assert!(s.awaits(2) && s.watermark().is_none());
    }

    fn part(xid: u64, commit: u64, index: u32, last: bool) -> Arc<UserTxn> {
        let mut t = (*txn(xid, commit)).clone();
        t.part = index;
        t.last = last;
        if !last {
            t.end_lsn = Lsn(commit);
        }
        Arc::new(t)
    }

    #[test]
    fn parts_are_delivered_in_order_and_only_the_last_moves_the_watermark() {
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.go_live_at(500);
        assert!(s.offer(&part(120, 1000, 0, false)));
        assert!(s.offer(&part(120, 1000, 1, false)));
        assert_eq!(s.watermark(), Some(500));
        assert!(s.offer(&part(120, 1000, 2, true)));
        assert_eq!(s.watermark(), Some(1008));
        assert!(!s.offer(&part(120, 1000, 2, true)), "not twice");
    }

    #[test]
    fn an_unbuffered_transaction_the_snapshot_lacks_means_refetch() {
        // Committed after the snapshot (commit >= L): the snapshot lacks it, and its parts were not buffered.
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.offer(&part(120, 1200, 0, false));
        s.offer(&part(120, 1200, 1, true));
        assert_eq!(
            s.go_live_after_snapshot(&handoff(), false, Ok(vec![]))
                .unwrap_err(),
            MustRefetch("transaction_too_large")
        );
        assert!(!s.is_live());
        // Visible in the snapshot (committed before it): its parts are simply not needed.
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        s.offer(&part(101, 900, 0, false));
        s.offer(&part(101, 900, 1, true));
        let (missed, watermark) = s
            .go_live_after_snapshot(&handoff(), false, Ok(vec![]))
            .unwrap();
        assert!(missed.is_empty());
        assert_eq!(watermark, 1500);
        // Over the buffer budget: kept as an identity only, same rule.
        let mut s = Subscription::pending("works".into(), Filter::default(), 1);
        let mut big = (*txn(112, 1200)).clone();
        big.bytes = PENDING_BUFFER_BYTES + 1;
        s.offer(&Arc::new(big));
        assert!(
            s.go_live_after_snapshot(&handoff(), false, Ok(vec![]))
                .is_err()
        );
    }
}
