//! deeprecall-sync: the sync server that sits next to DeepRecall's Postgres.
//!
//! - Write path: `POST /v1/batch` runs a client's ops in one transaction as a row-level-security-bound role with
//!   `app.user_id` set, so Postgres assigns and enforces ownership.
//! - Blob shells: `POST /v1/blobs/coordinate`, `GET /v1/blobs/{sha256}` (BlobHandle), `GET /v1/admin/blobs`.
//! - Read path: `GET /v1/stream` (WebSocket) streams each user's changes from the logical replication slot:
//!   snapshot, then live transactions, resumable from an offset (`live`).

pub mod app;
pub mod auth;
pub mod check;
pub mod cli;
pub mod db;
pub mod error;
pub mod http;
pub mod live;
pub mod metrics;
pub mod pgcluster;
pub mod shutdown;
pub mod state;
pub mod tail;
