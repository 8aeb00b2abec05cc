//! `POST /v1/batch`: the one write path.
//!
//! ```text
//! body (≤ --max-body-bytes) ──request::parse──► BatchRequest      typed; stops at op max+1 (413); blocking pool if large
//!                           ──plan::plan──────► Plan               catalog + typed values, 4xx with op_index; no DB
//!                           ──execute::run────► BatchResponse      one transaction as the user (RLS), idempotent
//! ```
//!
//! Values never become SQL text: each column of a run of same-shape ops is one typed binary array parameter,
//! expanded with `unnest` (plan.rs); identifiers come from the catalog and are quoted. `owner_id` is never taken
//! from the client: it defaults to `app.user_id`, and the policy's `with check` refuses anything else.
//!
//! Idempotency (docs/api.md): a batch with `client_id` numbers its ops with `seq`, and the server keeps one row per
//! (owner, client) with the last applied seq; a batch without keeps one ledger row per `op_id`
//! (`sync_applied_ops`, pruned after the retention by `db::ledger`).

mod body;
mod execute;
mod plan;
mod request;
mod value;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};

pub use body::{BodyBudget, BodyPermit, NoRoom, read_body};
pub(crate) use body::{Bounded, parse_off_runtime};
pub use execute::{BatchResponse, OpResult, OpStatus};
pub use request::OpKind;

use crate::auth::AuthUser;
use crate::db::catalog::Catalog;
use crate::error::{ApiError, SCHEMA_CHANGED};
use crate::state::AppState;

/// Handler for `POST /v1/batch`.
pub async fn post_batch(
    State(state): State<AppState>,
    user: AuthUser,
    request: Request,
) -> Result<Json<BatchResponse>, ApiError> {
    // Held until the batch is answered: its plan costs about as much memory as its body.
    let (body, _permit) = read_body(&state, user.user_id, request).await?;
    let max_ops = state.limits.max_ops_per_batch;
    // Parsed and planned before a database connection is taken: a bad or oversized batch never holds one.
    let mut catalog = state.catalog.get().await;
    let plan = match parse_and_plan(body.clone(), catalog.clone(), max_ops).await {
        Err(e) if e.code == "unknown_table" || e.code == "unknown_column" => {
            // Maybe a migration added it since we loaded the catalog.
            catalog = state.catalog.refresh_on_miss(&state.pool).await?;
            parse_and_plan(body.clone(), catalog.clone(), max_ops).await?
        }
        other => other?,
    };
    let response = match run(&state, user.user_id, &plan).await {
        Err(e) if e.code == SCHEMA_CHANGED => {
            // Postgres does not know a table or column of the plan: nothing was written. If the catalog is stale
            // (plain DDL, no notification), reload, plan again (the client may now get its `unknown_column`) and
            // run once more. No pooled connection is held while the reload waits for its turn. If the catalog is
            // what Postgres has, or the schema moved again, the cause is not the client's: a logged 500.
            let fresh = state.catalog.refresh_on_miss(&state.pool).await?;
            if *fresh == *catalog {
                return Err(unexplained(&e));
            }
            let plan = parse_and_plan(body, fresh, max_ops).await?;
            match run(&state, user.user_id, &plan).await {
                Err(e) if e.code == SCHEMA_CHANGED => return Err(unexplained(&e)),
                other => other?,
            }
        }
        other => other?,
    };
    crate::metrics::batch_rows(plan.ops.len());
    Ok(Json(response))
}

/// A `schema_changed` that a fresh catalog does not explain.
fn unexplained(e: &ApiError) -> ApiError {
    ApiError::internal(&std::io::Error::other(format!(
        "a batch statement names a table or column Postgres does not have, with a fresh catalog: {}",
        e.message
    )))
}

async fn run(
    state: &AppState,
    user: uuid::Uuid,
    plan: &plan::Plan,
) -> Result<BatchResponse, ApiError> {
    let mut client = state.user_pool.get(user).await?;
    let scope = client.scope();
    let response = execute::run(&mut client, scope, plan).await;
    client.settled();
    response
}

async fn parse_and_plan(
    body: Bytes,
    catalog: Arc<Catalog>,
    max_ops: usize,
) -> Result<plan::Plan, ApiError> {
    parse_off_runtime(body, move |bytes| {
        let request = request::parse(bytes, max_ops)?;
        plan::plan(catalog.as_ref(), &request)
    })
    .await
}
