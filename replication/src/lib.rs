//! Logical replication for deeprecall-sync: pgoutput bytes in, committed transactions out.
//!
//! This crate has no HTTP or WebSocket dependencies; the server crate owns delivery.
//!
//! ```text
//!  XLogData payload (one pgoutput v1 message)
//!        │
//!        ▼  protocol::parse / parse_bytes          pure, never panics
//!  PgOutputMessage ── Relation ──► RelationCache   (keyed by OID, replaced whole)
//!        │                              │
//!        ▼  txn::TxnAssembler::push ◄───┘ decode: tuple + relation -> RowChange
//!  Begin … Insert/Update/Delete/Truncate … Commit
//!        │
//!        ▼
//!  Transaction { xid, commit_lsn, end_lsn, changes, truncated }
//!        │
//!        ▼  server: route to subscribers, then acknowledge end_lsn
//! ```
//!
//! `protocol`, `decode` and `txn` are pure; `stream` owns the replication socket and `slot` holds the slot SQL.
//!
//! Everything in the pure modules is a pure function of the bytes it is given: no I/O, no clock. The caller owns
//! the socket, feeds each message in stream order, and on any error restarts replication from the
//! last acknowledged LSN with a fresh [`TxnAssembler`] (Postgres re-sends Relation messages then).

pub mod decode;
pub mod protocol;
pub mod slot;
pub mod stream;
pub mod txn;

pub use decode::{ChangeError, Op, RelationCache, Row, RowChange};
pub use protocol::{
    ColumnDef, ColumnValue, DecodeError, Lsn, ParseLsnError, PgOutputMessage, RelationBody,
    TupleData, parse, parse_bytes,
};
pub use txn::{PartLimit, Transaction, TxnAssembler, TxnError};
