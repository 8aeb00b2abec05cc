//! The read path: logical replication -> per-user routing -> subscribers over two transports.
//!
//! ```text
//! Postgres slot ──pgoutput──► replicator (replication::stream, routing::route)
//!                                 │ publish(Routed), then ack end_lsn
//!                                 ▼
//!                               hub ──► connection queue ──► ws task (session) ──► client
//!                                 │  ▲                        │ subscribe
//!                                 │  └─ barrier ◄─ snapshot job ◄┘ (also for shape requests)
//!                                 └──► request queue / history ──► shape request ──► Electric client
//! ```
//!
//! Layers, each importing only those below it (no two modules import each other):
//!
//! | layer | modules |
//! |---|---|
//! | transports (I/O) | `ws` (`GET /v1/stream`, socket loop), `shape` (`GET /v1/shape`, Electric's HTTP API) |
//! | session core (pure) | `session` (one WebSocket's subscriptions), `subscription` (one subscription's position, both transports) |
//! | wire formats (pure) | `protocol` (WebSocket messages and frame encoders), `electric` (shape messages, schema, offsets), `handle` (signed shape handles) |
//! | jobs and fan-out | `snapshot` (the snapshot job), `spill` (its spool: memory, then a temp file), `admission` (snapshot and per-user limits), `barrier`, `hub` (queues, history), `replicator` |
//! | model (pure) | `job`, `handoff`, `routing`, `filter` + `where_sql` (one predicate model), `offset`, `convert` |

pub mod admission;
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
pub mod spill;
pub mod subscription;
pub mod where_sql;
pub mod ws;

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "deeprecall_sync";
