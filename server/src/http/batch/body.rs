//! Request bodies of the write endpoints (`/v1/batch`, `/v1/blobs/coordinate`): read within `--max-body-bytes`,
//! a byte budget and a deadline, then parsed as a stream that counts the array's elements as it goes and stops at
//! the first one over the limit.
//!
//! ```text
//! Content-Length (or, without one, --max-body-bytes) reserved from the user's and the server's in-flight budget
//!   │   user over --max-body-bytes-in-flight-per-user: 429 too_many_requests; server over its total: 503 server_busy
//!   ▼
//! bytes (≤ --max-body-bytes, else 413 payload_too_large; all within --body-timeout-secs, else 408 body_timeout)
//!   └─ serde_json streaming parse ── element max+1 seen ──► stop: 413 too_many_ops / too_many_blobs
//!        each element: a borrowed `RawValue` (batch) or a small typed struct (coordinate); never a `Value` tree
//! ```
//!
//! Why: a `serde_json::Value` of an 8 MB body of a million tiny ops costs ~600 MB and its parse blocks a runtime
//! thread before any limit is looked at. Here the work before the op-count check is proportional to the ops
//! actually allowed (besides one UTF-8 check of the bytes, at memory speed), and a large body is parsed on a
//! blocking thread ([`parse_off_runtime`]).
//!
//! Why a budget and a deadline: the body is read whole before parsing, so without them the memory of the write
//! path was the number of connections times 8 MiB, held as long as a client cared to wait before sending the last
//! byte (100 connections of one token that each sent 8 MB and stopped held 800 MB, for good). Now it is at most
//! `--max-body-bytes-in-flight` (one user at most its own share), for at most the deadline. The permit is held
//! until the request is answered, because the plan decoded from the body costs about as much as the body.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{StatusCode, header};
use futures::StreamExt;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::ApiError;
use crate::live::admission::{PerUserLimit, UserPermit};
use crate::state::AppState;

/// Bodies at least this large are parsed on tokio's blocking pool, so a burst of large bodies cannot stall the
/// runtime threads that serve every other request. Smaller ones (a 100-op batch is ~25 kB) parse in well under a
/// millisecond, less than the hand-off would cost.
pub(crate) const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// Bodies in flight, in KiB: the server's total and each user's share (places of a [`PerUserLimit`]).
#[derive(Debug)]
pub struct BodyBudget {
    total: Arc<Semaphore>,
    total_kib: usize,
    per_user: Arc<PerUserLimit>,
}

/// A body's place in the budget; given back on drop.
#[derive(Debug)]
pub struct BodyPermit {
    _user: UserPermit,
    _total: OwnedSemaphorePermit,
}

/// Why a body found no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// The user's own bodies in flight fill its share.
    User,
    /// The server's bodies in flight fill the total.
    Server,
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).max(1)
}

impl BodyBudget {
    /// A budget of `total_bytes` for the server and `per_user_bytes` for each user. Both are raised to at least
    /// `max_body_bytes`, so that a body of the largest allowed size always fits an idle server.
    pub fn new(total_bytes: usize, per_user_bytes: usize, max_body_bytes: usize) -> Arc<Self> {
        let per_user = kib(per_user_bytes.max(max_body_bytes)).min(Semaphore::MAX_PERMITS);
        let total = kib(total_bytes).max(per_user).min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            total: Arc::new(Semaphore::new(total)),
            total_kib: total,
            per_user: PerUserLimit::new(per_user),
        })
    }

    /// Bytes reserved by bodies in flight now (a metric).
    pub fn in_flight_bytes(&self) -> usize {
        (self.total_kib - self.total.available_permits()) * 1024
    }

    /// Reserves `bytes` for `user` if there is room now; never waits (a client told to come back later costs
    /// nothing, one waiting here would hold its connection and leave the budget's owners to finish first anyway).
    pub fn try_reserve(&self, user: Uuid, bytes: usize) -> Result<BodyPermit, NoRoom> {
        let kib = u32::try_from(kib(bytes)).map_err(|_| NoRoom::User)?;
        let user = self
            .per_user
            .try_acquire_many(user, kib)
            .ok_or(NoRoom::User)?;
        let total = self
            .total
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| NoRoom::Server)?;
        Ok(BodyPermit {
            _user: user,
            _total: total,
        })
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body exceeds the server's limit (--max-body-bytes); split the batch",
    )
}

/// Reads a write endpoint's body for `user`: reserves its size in the budget first, then reads it whole within
/// `--max-body-bytes` and `--body-timeout-secs`. The permit must be kept until the request is answered.
pub async fn read_body(
    state: &AppState,
    user: Uuid,
    request: Request,
) -> Result<(Bytes, BodyPermit), ApiError> {
    let max = state.limits.max_body_bytes;
    // Bodies are read as they are sent: a compressed one was parsed as its compressed bytes ("not UTF-8", or, for
    // a body labelled compressed that was not, accepted). Refused as HTTP says, before anything is reserved.
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            "request bodies are not decompressed: send the body without Content-Encoding",
        ));
    }
    let declared = match request.headers().get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_body", "Content-Length is not a number")
                })?,
        ),
    };
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    // Without a Content-Length (a chunked body) the size is known only at the end: the largest allowed is
    // reserved.
    let reserve = declared.map_or(max, |n| n as usize);
    let permit = state.bodies.try_reserve(user, reserve).map_err(|room| {
        crate::metrics::body_refused(match room {
            NoRoom::User => "user_share",
            NoRoom::Server => "server_budget",
        });
        match room {
            NoRoom::User => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "this user's request bodies in flight fill its share \
                 (--max-body-bytes-in-flight-per-user); retry after the Retry-After delay",
            )
            .retry_after(1),
            NoRoom::Server => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "the server's request bodies in flight fill its budget \
                 (--max-body-bytes-in-flight); retry after the Retry-After delay",
            )
            .retry_after(1),
        }
    })?;
    let timeout = state.limits.body_timeout;
    let bytes = tokio::time::timeout(timeout, collect(request.into_body(), reserve))
        .await
        .map_err(|_| {
            crate::metrics::body_refused("timeout");
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s (--body-timeout-secs)",
                    timeout.as_secs()
                ),
            )
        })??;
    Ok((bytes, permit))
}

/// Collects a body of at most `max` bytes (hyper itself holds a body to its Content-Length). A body that came in
/// one chunk is not copied.
async fn collect(body: Body, max: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut chunks = Vec::new();
    let mut len = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        len += chunk.len();
        if len > max {
            return Err(too_large());
        }
        chunks.push(chunk);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Runs `parse` on the body: inline when it is small, on the blocking pool when it is large.
pub(crate) async fn parse_off_runtime<T, F>(body: Bytes, parse: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
{
    if body.len() < BLOCKING_PARSE_BYTES {
        return parse(&body);
    }
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .map_err(|e| ApiError::internal(&e))?
}

/// Deserializes a JSON array into a `Vec<T>` of at most `max` elements. On element `max + 1` it sets `exceeded`
/// and fails at once, without reading the rest of the array (let alone the rest of the body).
pub(crate) struct Bounded<'f, T> {
    max: usize,
    exceeded: &'f Cell<bool>,
    what: &'static str,
    element: PhantomData<fn() -> T>,
}

impl<'f, T> Bounded<'f, T> {
    /// `what` names the array in error messages, e.g. "an array of operations".
    pub(crate) fn new(max: usize, exceeded: &'f Cell<bool>, what: &'static str) -> Self {
        Self {
            max,
            exceeded,
            what,
            element: PhantomData,
        }
    }
}

impl<'de, T: serde::Deserialize<'de>> DeserializeSeed<'de> for Bounded<'_, T> {
    type Value = Vec<T>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for Bounded<'_, T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // Never trust the size hint: allocate for what is allowed, grow as elements arrive.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(1024));
        // Peek by reading one element past the limit: an array of exactly `max` is fine.
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                self.exceeded.set(true);
                return Err(serde::de::Error::custom("too many elements"));
            }
            out.push(item);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn parse(body: &str, max: usize) -> (Result<Vec<&RawValue>, serde_json::Error>, bool) {
        let exceeded = Cell::new(false);
        let mut de = serde_json::Deserializer::from_str(body);
        let out = Bounded::new(max, &exceeded, "an array").deserialize(&mut de);
        (out, exceeded.get())
    }

    #[test]
    fn the_body_budget_counts_per_user_and_in_all_and_gives_room_back() {
        const KIB: usize = 1024;
        // Per user 2 KiB, in all 3 KiB; both at least the largest body (1 KiB).
        let budget = BodyBudget::new(3 * KIB, 2 * KIB, KIB);
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        let a1 = budget.try_reserve(a, KIB).unwrap();
        // 1 byte still takes a KiB.
        let a2 = budget.try_reserve(a, 1).unwrap();
        assert_eq!(budget.try_reserve(a, 1).unwrap_err(), NoRoom::User);
        let b1 = budget.try_reserve(b, 100).unwrap();
        assert_eq!(budget.in_flight_bytes(), 3 * KIB);
        assert_eq!(budget.try_reserve(b, 100).unwrap_err(), NoRoom::Server);
        drop(a1);
        let b2 = budget.try_reserve(b, KIB).unwrap();
        drop((a2, b1, b2));
        assert_eq!(budget.in_flight_bytes(), 0);
        assert_eq!(
            budget.per_user.users(),
            0,
            "users without bodies keep no entry"
        );
        // Shares below the largest body are raised to it: a body of the largest size always fits an idle server.
        let small = BodyBudget::new(0, 0, 8 * KIB);
        assert!(small.try_reserve(a, 8 * KIB).is_ok());
    }

    #[test]
    fn stops_at_the_first_element_over_the_limit() {
        let (ok, exceeded) = parse("[{}, {}, {}]", 3);
        assert_eq!(ok.unwrap().len(), 3);
        assert!(!exceeded);
        // Element 4 is a complete value, after which comes garbage the parser would refuse: it never gets there.
        let (err, exceeded) = parse("[{}, {}, {}, {}, this is not JSON", 3);
        assert!(exceeded, "{err:?}");
        // Without the limit the same text is a syntax error: the early stop is what avoided reading it.
        let (err, exceeded) = parse("[{}, {}, {}, {}, this is not JSON", 10);
        assert!(!exceeded);
        assert!(err.unwrap_err().is_syntax());
    }

    #[test]
    fn a_million_tiny_elements_cost_the_limit_not_the_body() {
        let mut body = String::from("[");
        body.push_str(&"{\"a\":1},".repeat(1_000_000));
        body.push_str("{}]");
        let (err, exceeded) = parse(&body, 1000);
        assert!(exceeded);
        // The error position shows where parsing stopped: in element 1001, 8 bytes each.
        let err = err.unwrap_err();
        assert_eq!(err.line(), 1);
        assert!(
            err.column() <= 1 + 8 * 1001,
            "stopped at column {}",
            err.column()
        );
    }
}
