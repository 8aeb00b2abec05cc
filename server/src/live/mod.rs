//! The read path: logical replication -> per-user routing -> WebSocket subscribers.
//!
//! ```text
//! Postgres slot ──pgoutput──► replicator (replication::stream, routing::route)
//!                                 │ publish(Routed), then ack end_lsn
//!                                 ▼
//!                               hub ──► connection queue ──► ws task ──► client
//!                                 ▲                             │ subscribe
//!                                 └── barrier ◄── snapshot task ◄┘
//! ```

pub mod convert;
pub mod filter;
pub mod hub;
pub mod offset;
pub mod replicator;
pub mod routing;
pub mod snapshot;
pub mod ws;

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "deeprecall_sync";
