//! The read path: logical replication -> per-user routing -> subscribers over two transports.
//!
//! ```text
//! Postgres slot ──pgoutput──► replicator (replication::stream, routing::route)
//!                                 │ publish(Routed), then ack end_lsn
//!                                 ▼
//!                               hub ──► connection queue ──► ws task (session) ──► client
//!                                 ▲                             │ subscribe
//!                                 └── barrier ◄── snapshot job ◄┘
//! ```
//!
//! Layers, each importing only those below it (no two modules import each other):
//!
//! | layer | modules |
//! |---|---|
//! | transports (I/O) | `ws` (socket loop) |
//! | session core (pure) | `session` (one WebSocket's subscriptions), `subscription` (one subscription's position) |
//! | wire format (pure) | `protocol` (WebSocket messages and the frame encoders) |
//! | jobs and fan-out | `snapshot` (the snapshot job), `barrier`, `hub` (queues, history), `replicator` |
//! | model (pure) | `job`, `handoff`, `routing`, `filter`, `offset`, `convert` |

pub mod barrier;
pub mod convert;
pub mod electric;
pub mod filter;
pub mod handle;
pub mod handoff;
pub mod hub;
pub mod job;
pub mod offset;
pub mod protocol;
pub mod replicator;
pub mod routing;
pub mod session;
pub mod shape;
pub mod snapshot;
pub mod subscription;
pub mod where_sql;
pub mod ws;

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "deeprecall_sync";
