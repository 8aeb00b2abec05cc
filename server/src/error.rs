//! HTTP API errors: `{"error": {"code", "message", "op_index"?}}` with a deliberate status.
//!
//! The body says what the client did wrong and how to fix it. Internal failures get a generic message; their
//! full source chain goes to the log, never to the client. Every 503 carries `Retry-After` (seconds).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (documented in docs/api.md).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Which element of the request is to blame: (`"op_index"`, n) in a batch, (`"blob_index"`, n) in a
    /// blob coordination.
    pub index: Option<(&'static str, usize)>,
    /// More machine-readable facts for the client, e.g. `last_seq` of a `seq_gap`.
    pub fields: Vec<(&'static str, serde_json::Value)>,
    /// `Retry-After` in seconds (a 503 without one gets [`DEFAULT_RETRY_AFTER_SECS`]).
    pub retry_after: Option<u32>,
}

/// `Retry-After` of a 503 that names no other delay.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 5;

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            index: None,
            fields: Vec::new(),
            retry_after: None,
        }
    }

    /// Sets `Retry-After` (seconds).
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 Bad Request.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_value`: a value that is not one of the forms its field's type accepts (a word for an integer, a
    /// timestamp without an offset, a varchar longer than its limit, a negative size). 400, not 422 like the other
    /// refusals of a well-formed request: issue 9 named the status, and the value is malformed for its type the way
    /// a body is malformed for JSON; a client treats both alike (fix the op, never retry it). docs/decisions.md 56.
    pub fn invalid_value(message: impl Into<String>) -> Self {
        Self::bad_request("invalid_value", message)
    }

    /// 422 Unprocessable Entity.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// Attaches the index of the failing op.
    pub fn at_op(mut self, index: usize) -> Self {
        self.index = Some(("op_index", index));
        self
    }

    /// Adds a field to the error object (next to `code` and `message`).
    pub fn with(mut self, field: &'static str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.push((field, value.into()));
        self
    }

    /// Attaches the index of the failing blob.
    pub fn at_blob(mut self, index: usize) -> Self {
        self.index = Some(("blob_index", index));
        self
    }

    /// 500 with a generic message; logs the full error chain.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; see the server log",
        )
    }

    /// 500 with the generic message for a fault the server found itself (no error value to chain); logs `what`.
    pub fn internal_fault(what: &str) -> Self {
        tracing::error!(error = %what, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; see the server log",
        )
    }

    /// 503 when every pooled connection stayed busy for the pool's wait timeout: nothing was done, retry soon.
    pub fn busy() -> Self {
        tracing::warn!("no pooled database connection came free within the pool wait timeout");
        crate::metrics::db_connection_refused("pool_busy");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_busy",
            "every database connection is busy; retry after the Retry-After delay",
        )
        .retry_after(1)
    }

    /// 503 when the database cannot be reached.
    pub fn unavailable(err: &(dyn std::error::Error + 'static)) -> Self {
        tracing::warn!(error = %Chain(err), "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable; retry later",
        )
    }
}

/// Displays an error and its causes on one line (`outer: cause: cause`), each cause once: a cause whose text the
/// line already holds (a `thiserror` message that embeds its source) is not repeated. For logs: `tokio-postgres`
/// displays a server's refusal as just "db error", with Postgres's message only in its source, so `error = %e`
/// logged "replication interrupted error=slot: slot management: db error" where the operator needed "logical
/// decoding requires wal_level >= logical". Log sites use `error = %Chain(&e)`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = s.source();
        }
        f.write_str(&out)
    }
}

/// Marks a response whose error was already logged, with its cause, where it was made.
#[derive(Debug, Clone, Copy)]
pub struct LoggedAtSource;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some((field, i)) = self.index {
            error[field] = json!(i);
        }
        for (field, value) in self.fields {
            error[field] = value;
        }
        let retry_after = match self.retry_after {
            Some(secs) => Some(secs),
            None if self.status == StatusCode::SERVICE_UNAVAILABLE => {
                Some(DEFAULT_RETRY_AFTER_SECS)
            }
            None => None,
        };
        let mut response = (self.status, Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            // Every 500 of ours was logged with its cause where it was made (`internal`, `internal_fault`); the
            // access log need not log it again (app.rs).
            response.extensions_mut().insert(LoggedAtSource);
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<crate::db::catalog::RefreshError> for ApiError {
    fn from(err: crate::db::catalog::RefreshError) -> Self {
        match err {
            crate::db::catalog::RefreshError::Pool(e) => e.into(),
            crate::db::catalog::RefreshError::Db(e) => from_db(&e),
        }
    }
}

impl From<crate::db::user_pool::UserPoolError> for ApiError {
    fn from(err: crate::db::user_pool::UserPoolError) -> Self {
        match err {
            // The user's own requests fill the user's share: the user's to slow down, like the body budget's share.
            share @ crate::db::user_pool::UserPoolError::Share(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("{share}; retry after the Retry-After delay"),
            )
            .retry_after(1),
            crate::db::user_pool::UserPoolError::Pool(e) => e.into(),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            // The pool's wait timeout (db::pool): the database is fine, every connection is in use.
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                Self::busy()
            }
            err => Self::unavailable(&err),
        }
    }
}

/// `503 locked`: the request waited `--lock-timeout-ms` for a lock held by another transaction and did nothing.
pub fn locked() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "locked",
        "a row or table this request needs stayed locked by another transaction for longer than the server's \
         lock timeout; nothing was done; retry after the Retry-After delay",
    )
    .retry_after(1)
}

/// Code of [`schema_changed`].
pub const SCHEMA_CHANGED: &str = "schema_changed";

/// Postgres does not know a table or column the server's catalog has: DDL ran without `migrate`'s notification
/// (`alter table … drop column`, a table renamed) and no change of that table was streamed since, so the catalog is
/// stale. Only the batch path answers this ([`from_batch_db`]), and its handler reloads the catalog and runs the
/// batch once more before answering; nothing was written.
pub fn schema_changed(msg: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        SCHEMA_CHANGED,
        format!("the database's schema changed under this server ({msg}); nothing was done; retry"),
    )
    .retry_after(1)
}

/// [`from_db`] for the statements of a batch, which name the tables and columns of the server's catalog: 42703 and
/// 42P01 there mean the catalog is older than the schema ([`schema_changed`]). Elsewhere (a trigger or policy naming
/// a missing column, the server's own tables) they stay internal errors, logged.
pub fn from_batch_db(err: &tokio_postgres::Error) -> ApiError {
    use tokio_postgres::error::SqlState;
    match err.as_db_error() {
        Some(db)
            if *db.code() == SqlState::UNDEFINED_COLUMN
                || *db.code() == SqlState::UNDEFINED_TABLE =>
        {
            schema_changed(db.message().to_owned())
        }
        _ => from_db(err),
    }
}

/// Maps a Postgres error raised by a client's data to a client error, deliberately by SQLSTATE; anything else is
/// internal. The message is Postgres's own primary message (it names the constraint or the bad value, never
/// another user's data), plus its detail for constraint violations.
pub fn from_db(err: &tokio_postgres::Error) -> ApiError {
    use tokio_postgres::error::SqlState;
    let Some(db) = err.as_db_error() else {
        return if err.is_closed() {
            ApiError::unavailable(err)
        } else {
            ApiError::internal(err)
        };
    };
    let code = db.code();
    let msg = db.message().to_owned();
    let with_detail = || match db.detail() {
        // Foreign-key details name the referenced key, which is the caller's own (keys include owner_id).
        Some(d) => format!("{msg} ({d})"),
        None => msg.clone(),
    };
    if *code == SqlState::UNIQUE_VIOLATION || *code == SqlState::EXCLUSION_VIOLATION {
        // 23P01: an exclusion constraint an operator added (no two bookings overlapping): a conflict like a key's.
        ApiError::new(StatusCode::CONFLICT, "conflict", with_detail())
    } else if *code == SqlState::GENERATED_ALWAYS {
        // 428C9: a value for a `generated always` column. The catalog marks those read-only, so this is a catalog
        // older than the column (plain DDL); the client's to fix either way.
        ApiError::unprocessable("read_only_column", msg)
    } else if *code == SqlState::FOREIGN_KEY_VIOLATION {
        ApiError::unprocessable("foreign_key_violation", with_detail())
    } else if *code == SqlState::CHECK_VIOLATION || *code == SqlState::NOT_NULL_VIOLATION {
        ApiError::unprocessable("constraint_violation", with_detail())
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE && msg.contains("row-level security") {
        // "new row violates row-level security policy": the client tried to write what is not theirs. Other
        // privilege errors (e.g. "permission denied to set role") are the operator's setup, not the client's.
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg)
    } else if code.code().starts_with("54") {
        // Class 54, program limit exceeded. 54000, e.g. "index row size 9016 exceeds btree version 4 maximum 2704
        // for index …": a value too large for where the client put it; 54001 "stack depth limit exceeded": a value
        // nested too deep for a type's input function. The client's to fix, not the server's.
        ApiError::unprocessable("value_too_large", msg)
    } else if code.code().starts_with("22") || *code == SqlState::DATATYPE_MISMATCH {
        // Class 22: data exception (bad uuid, number out of range, invalid json, bad timestamp...): mostly Postgres's
        // input function refusing a value the server passed through as text; the same answer as the server's own.
        ApiError::invalid_value(msg)
    } else if *code == SqlState::LOCK_NOT_AVAILABLE {
        // 55P03 after --lock-timeout-ms: another transaction held a lock this one needed. Not the client's data;
        // the same request succeeds once the lock is gone.
        locked()
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        ApiError::new(
            StatusCode::CONFLICT,
            "retry",
            "the transaction conflicted with another; retry the request",
        )
    } else if is_unavailability(code) {
        ApiError::unavailable(err)
    } else {
        ApiError::internal(err)
    }
}

/// Postgres cannot serve the request now, through no fault of the request or of this server: it is shutting down or
/// restarting (57P01 when an operator or a failover stops it fast, 57P02, 57P03 while it starts), an operator ended the
/// session or cancelled the statement (57P01 from `pg_terminate_backend`, 57014), the connection failed (class 08), it
/// is out of resources (class 53: disk full, out of memory, too many connections; 58030 an I/O error), or it is a
/// read-only standby (25006, e.g. a failover left the server pointed at the old primary). Such an error used to be a
/// 500 logged as a server bug; it is `503 database_unavailable` with `Retry-After`, logged as a warning, and the same
/// request succeeds once Postgres is back (nothing of it was committed: a failed statement aborts its transaction).
fn is_unavailability(code: &tokio_postgres::error::SqlState) -> bool {
    let code = code.code();
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code == "58030"
        || code == "25006"
}
