//! Shared state handed to every handler.

use std::sync::Arc;

use axum::extract::FromRef;
use deadpool_postgres::Pool;

use crate::auth::AuthConfig;
use crate::db::catalog::CatalogHandle;

/// Request limits (configurable; exceeding one answers 413).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most ops in one batch (and blobs in one coordination).
    pub max_ops_per_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 8 * 1024 * 1024, max_ops_per_batch: 1000 }
    }
}

/// Everything a handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Pooled connections as the server's role (user work switches role per transaction).
    pub pool: Pool,
    /// Token verification.
    pub auth: Arc<AuthConfig>,
    /// Synced tables and their columns.
    pub catalog: Arc<CatalogHandle>,
    /// Request limits.
    pub limits: Limits,
}

impl FromRef<AppState> for Arc<AuthConfig> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}
