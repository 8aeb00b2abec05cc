//! Request bodies of the write endpoints (`/v1/batch`, `/v1/blobs/coordinate`): read within `--max-body-bytes`,
//! then parsed as a stream that counts the array's elements as it goes and stops at the first one over the limit.
//!
//! ```text
//! bytes (≤ --max-body-bytes, else 413 payload_too_large)
//!   └─ serde_json streaming parse ── element max+1 seen ──► stop: 413 too_many_ops / too_many_blobs
//!        each element: a borrowed `RawValue` (batch) or a small typed struct (coordinate); never a `Value` tree
//! ```
//!
//! Why: a `serde_json::Value` of an 8 MB body of a million tiny ops costs ~600 MB and its parse blocks a runtime
//! thread before any limit is looked at. Here the work before the op-count check is proportional to the ops
//! actually allowed (besides one UTF-8 check of the bytes, at memory speed), and a large body is parsed on a
//! blocking thread ([`parse_off_runtime`]).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};

use crate::error::ApiError;

/// Bodies at least this large are parsed on tokio's blocking pool, so a burst of large bodies cannot stall the
/// runtime threads that serve every other request. Smaller ones (a 100-op batch is ~25 kB) parse in well under a
/// millisecond, less than the hand-off would cost.
pub(crate) const BLOCKING_PARSE_BYTES: usize = 64 * 1024;

/// Maps a body-read failure: over the size limit is 413, anything else 400.
pub fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds the server's limit (--max-body-bytes); split the batch",
        )
    } else {
        ApiError::bad_request("invalid_body", rejection.body_text())
    }
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
