//! Pure: which buffered transactions a snapshot already contains (field notes, "Snapshot + live stream").
//!
//! A snapshot job reads, in its first statement, the database snapshot S (`pg_current_snapshot()`) and the WAL
//! insert position L, then waits for a barrier B: a logical message committed after S was taken. When the stream
//! has delivered B, every transaction that committed before it has been published. A transaction T is then
//! missing from the snapshot's rows, and must be delivered after them, iff `T.commit_lsn >= L` or S does not see
//! T's (64-bit) xid (visible = `x < xmin`, or `x < xmax` and not in xip).
//!
//! `pg_current_wal_insert_lsn()` rather than `pg_current_wal_lsn()`: the latter can lag an asynchronous commit.
//!
//! **Streamed before it was visible.** "Not seen by S" does not imply "published after the subscription started
//! buffering": Postgres flushes a commit record (which the walsender may stream at once) before it removes the
//! transaction from its running list, so a snapshot taken in between does not see a transaction the connection
//! may already have delivered to its other subscriptions. The job therefore also asks the hub for the user's
//! published transactions S did not see ([`Hub::published_among`](super::hub::Hub::published_among)); the
//! subscription delivers those it did not buffer (docs/decisions.md 32).

use super::routing::UserTxn;

/// A Postgres snapshot (`pg_current_snapshot()`), 64-bit xids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    /// Oldest xid still running; everything below is finished.
    pub xmin: u64,
    /// First xid not yet assigned; everything at or above is invisible.
    pub xmax: u64,
    /// In progress at snapshot time (invisible).
    pub xip: Vec<u64>,
}

impl PgSnapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Self { xmin, xmax, xip })
    }

    /// Whether a transaction with (64-bit) id `xid` had committed as far as this snapshot is concerned.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// What a snapshot's rows contain, relative to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// S.
    pub snapshot: PgSnapshot,
    /// L: the WAL insert position when S was taken.
    pub wal_lsn: u64,
    /// B: the stream position of the barrier transaction (committed after S).
    pub barrier_lsn: u64,
}

impl Handoff {
    /// Whether transaction `t` (committed after the subscription registered) is missing from the snapshot's rows.
    pub fn must_deliver(&self, t: &UserTxn) -> bool {
        self.must_deliver_at(t.xid, t.commit_lsn.0)
    }

    /// [`Handoff::must_deliver`] for a transaction known by its (64-bit) xid and commit LSN.
    pub fn must_deliver_at(&self, xid: u64, commit_lsn: u64) -> bool {
        commit_lsn >= self.wal_lsn || !self.snapshot.sees(xid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeprecall_replication::Lsn;
    use uuid::Uuid;

    #[test]
    fn snapshot_visibility() {
        let s = PgSnapshot::parse("100:110:102,105").unwrap();
        assert_eq!(
            s,
            PgSnapshot {
                xmin: 100,
                xmax: 110,
                xip: vec![102, 105]
            }
        );
        assert!(s.sees(99));
        assert!(s.sees(101));
        assert!(!s.sees(102));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
        assert_eq!(PgSnapshot::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert!(PgSnapshot::parse("garbage").is_none());
    }

    #[test]
    fn delivers_what_the_snapshot_did_not_see() {
        let h = Handoff {
            snapshot: PgSnapshot::parse("100:110:105").unwrap(),
            wal_lsn: 1000,
            barrier_lsn: 2000,
        };
        let txn = |xid, commit| UserTxn {
            owner: Uuid::nil(),
            xid,
            generation: 1,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            changes: vec![],
            bytes: 0,
            part: 0,
            last: true,
        };
        assert!(!h.must_deliver(&txn(101, 900)), "seen by S, before L");
        assert!(h.must_deliver(&txn(105, 900)), "in progress at S");
        assert!(h.must_deliver(&txn(111, 950)), "started after S");
        assert!(h.must_deliver(&txn(99, 1000)), "committed at or after L");
    }
}
