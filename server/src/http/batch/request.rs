//! The typed `POST /v1/batch` request: the envelope parsed as a stream (`body.rs`), then each op into its fields,
//! with the error codes of docs/api.md. Pure; no catalog and no database.
//!
//! Rows stay `RawValue`s here (slices of the body): the planner decodes each value straight into its column's
//! type, so no `serde_json::Value` tree is ever built.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use axum::http::StatusCode;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::body::Bounded;
use crate::error::ApiError;

/// What a batch op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Insert a new row; an existing id is a 409 conflict.
    Insert,
    /// Insert, or update the given columns when the row exists.
    Upsert,
    /// Update the given columns of an existing row; `not_found` when there is none.
    Update,
    /// Delete a row; `not_found` when there is none.
    Delete,
}

impl OpKind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "insert" => Self::Insert,
            "upsert" => Self::Upsert,
            "update" => Self::Update,
            "delete" => Self::Delete,
            _ => return None,
        })
    }
}

/// A parsed batch: the envelope checked, every op's fields typed; rows not yet decoded.
#[derive(Debug)]
pub(crate) struct BatchRequest<'a> {
    /// The outbox the ops come from: with it, ops carry `seq` (sequence idempotency).
    pub(crate) client_id: Option<Uuid>,
    /// The ops, in request order.
    pub(crate) ops: Vec<OpRequest<'a>>,
}

/// One op's fields.
#[derive(Debug)]
pub(crate) struct OpRequest<'a> {
    /// Client-generated id of the op.
    pub(crate) op_id: Uuid,
    /// Position in the client's sequence (`client_id` batches).
    pub(crate) seq: Option<i64>,
    /// Table name (checked against the catalog by the planner).
    pub(crate) table: Cow<'a, str>,
    /// What to do.
    pub(crate) kind: OpKind,
    /// The row, as sent.
    pub(crate) row: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Parses `body` in one pass: the envelope with at most `max_ops` ops (stopping at op `max_ops + 1`), each op's
/// fields and row entries as slices of the body; then checks each op's fields.
pub(crate) fn parse(body: &[u8], max_ops: usize) -> Result<BatchRequest<'_>, ApiError> {
    let envelope = parse_envelope(body, max_ops)?;
    let mut ops = Vec::with_capacity(envelope.ops.len());
    for (index, slot) in envelope.ops.into_iter().enumerate() {
        ops.push(check_op(slot).map_err(|e| e.at_op(index))?);
    }
    Ok(BatchRequest {
        client_id: envelope.client_id,
        ops,
    })
}

/// The envelope: `ops` read into their fields, `client_id` and `device_id` checked.
struct Envelope<'a> {
    client_id: Option<Uuid>,
    ops: Vec<OpSlot<'a>>,
}

/// What went wrong inside the streaming parse, beyond what serde's error says.
#[derive(Debug, Default)]
struct Findings {
    /// Op `max_ops + 1` was reached: parsing stopped there.
    too_many: Cell<bool>,
    /// The top level is not an object, or `ops` is not an array: 400 invalid_request.
    shape: Cell<Option<&'static str>>,
    /// A field's value is wrong (kept, reported only if the whole body is valid JSON, so that "not JSON" wins).
    field: Cell<Option<(&'static str, &'static str)>>,
}

fn parse_envelope(body: &[u8], max_ops: usize) -> Result<Envelope<'_>, ApiError> {
    let findings = Findings::default();
    // Until the top-level object opens, a shape error is about the body as a whole.
    findings
        .shape
        .set(Some("the body must be a JSON object with `ops`"));
    // One UTF-8 check of the whole body (a fast bulk pass), after which serde_json reads it as `str` and skips
    // the check it would otherwise make string by string (~6% of parsing a typical batch).
    let Ok(body) = std::str::from_utf8(body) else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "request body is not valid JSON: it is not UTF-8",
        ));
    };
    let mut de = serde_json::Deserializer::from_str(body);
    let parsed = EnvelopeSeed {
        max_ops,
        findings: &findings,
    }
    .deserialize(&mut de)
    .and_then(|envelope| de.end().map(|()| envelope));
    match parsed {
        _ if findings.too_many.get() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_ops",
            format!("a batch holds at most {max_ops} ops (this one has more); split it"),
        )),
        Err(e) if e.is_syntax() || e.is_eof() => Err(ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_request",
            findings
                .shape
                .get()
                .map_or_else(|| e.to_string(), str::to_owned),
        )),
        Ok(_) if findings.field.get().is_some() => {
            let (code, message) = findings.field.get().unwrap_or_default();
            Err(ApiError::unprocessable(code, message))
        }
        Ok(None) => Err(ApiError::bad_request(
            "invalid_request",
            "`ops` must be an array of operations",
        )),
        Ok(Some(envelope)) => Ok(envelope),
    }
}

struct EnvelopeSeed<'f> {
    max_ops: usize,
    findings: &'f Findings,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed<'_> {
    type Value = Option<Envelope<'de>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed<'_> {
    type Value = Option<Envelope<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with `ops`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.findings.shape.set(None);
        let mut ops = None;
        let mut client_id = None;
        let mut seen = [false; 3];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            // A top-level key given twice is refused, not resolved: with the last `ops` kept, the ops of the first
            // array were silently not applied, and a `client_id` followed by a `null` one dropped sequence
            // idempotency for the batch.
            if let Some(i) = ["ops", "client_id", "device_id"]
                .iter()
                .position(|k| *k == key.0.as_ref())
                && std::mem::replace(&mut seen[i], true)
            {
                self.findings.shape.set(Some(
                    "`ops`, `client_id` and `device_id` may each appear only once in a batch",
                ));
                return Err(serde::de::Error::custom("duplicate key"));
            }
            match key.0.as_ref() {
                "ops" => {
                    let seed = Bounded::<OpSlot<'de>>::new(
                        self.max_ops,
                        &self.findings.too_many,
                        "an array of operations",
                    );
                    self.findings
                        .shape
                        .set(Some("`ops` must be an array of operations"));
                    ops = Some(map.next_value_seed(seed)?);
                    self.findings.shape.set(None);
                }
                "client_id" => {
                    let value: Option<&'de RawValue> = map.next_value()?;
                    client_id = value.and_then(|v| {
                        let id = uuid_of(v);
                        if id.is_none() {
                            self.note("invalid_client_id", "`client_id` must be a UUID string");
                        }
                        id
                    });
                }
                "device_id" => {
                    // Validated for the client's sake; not used by the server.
                    let value: Option<&'de RawValue> = map.next_value()?;
                    if value.is_some_and(|v| uuid_of(v).is_none()) {
                        self.note("invalid_device_id", "`device_id` must be a UUID string");
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(ops.map(|ops| Envelope { client_id, ops }))
    }
}

impl EnvelopeSeed<'_> {
    fn note(&self, code: &'static str, message: &'static str) {
        if self.findings.field.get().is_none() {
            self.findings.field.set(Some((code, message)));
        }
    }
}

/// A map key, borrowed from the body unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

fn uuid_of(raw: &RawValue) -> Option<Uuid> {
    let s: Cow<'_, str> = serde_json::from_str::<Key<'_>>(raw.get()).ok()?.0;
    Uuid::parse_str(&s).ok()
}

fn str_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Key<'_>>(raw.get()).ok().map(|k| k.0)
}

/// One element of `ops` as read: its fields, each still raw so that every mistake gets its own code later; or
/// something that is not an object. Read in the envelope's single pass (no second parse of the op), and never an
/// error there, so that "not JSON" anywhere in the body still wins over a mistake in an op.
enum OpSlot<'a> {
    Fields(OpFields<'a>),
    NotObject,
}

#[derive(Default)]
struct OpFields<'a> {
    op_id: Option<&'a RawValue>,
    seq: Option<&'a RawValue>,
    table: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
    row: Option<RowSlot<'a>>,
}

/// `row` as read: its entries in request order (a repeated key is kept twice here; the planner lets the last one
/// win, as `JSON.parse` does), or something that is not an object.
enum RowSlot<'a> {
    Entries(Vec<(Cow<'a, str>, &'a RawValue)>),
    NotObject,
}

/// Consumes any JSON value that is not the object a slot wants, and says so.
macro_rules! not_object {
    ($ty:ident) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($ty::NotObject)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($ty::NotObject)
        }
    };
}

impl<'de> Deserialize<'de> for OpSlot<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OpVisitor;
        impl<'de> Visitor<'de> for OpVisitor {
            type Value = OpSlot<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an operation")
            }
            not_object!(OpSlot);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OpSlot<'de>, A::Error> {
                let mut op = OpFields::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    // A key given twice keeps its last value.
                    match key.0.as_ref() {
                        "op_id" => op.op_id = map.next_value()?,
                        "seq" => op.seq = map.next_value()?,
                        "table" => op.table = map.next_value()?,
                        "kind" => op.kind = map.next_value()?,
                        "row" => op.row = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(OpSlot::Fields(op))
            }
        }
        d.deserialize_any(OpVisitor)
    }
}

impl<'de> Deserialize<'de> for RowSlot<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = RowSlot<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a row")
            }
            not_object!(RowSlot);
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RowSlot<'de>, A::Error> {
                let mut out: Vec<(Cow<'de, str>, &'de RawValue)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some((key, value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    out.push((key.0, value));
                }
                Ok(RowSlot::Entries(out))
            }
        }
        d.deserialize_any(RowVisitor)
    }
}

fn check_op(slot: OpSlot<'_>) -> Result<OpRequest<'_>, ApiError> {
    let OpSlot::Fields(fields) = slot else {
        return Err(ApiError::bad_request(
            "invalid_op",
            "each op must be a JSON object",
        ));
    };
    let op_id = match fields.op_id {
        None => {
            return Err(ApiError::unprocessable(
                "missing_op_id",
                "every op needs an `op_id` (a UUID)",
            ));
        }
        Some(v) => uuid_of(v).ok_or_else(|| {
            ApiError::unprocessable("invalid_op_id", "`op_id` must be a UUID string")
        })?,
    };
    let seq = match fields.seq {
        None => None,
        Some(v) => Some(
            v.get()
                .parse::<i64>()
                .ok()
                .filter(|s| *s >= 1)
                .ok_or_else(|| {
                    ApiError::unprocessable(
                        "invalid_seq",
                        "`seq` must be an integer from 1 to 9223372036854775807",
                    )
                })?,
        ),
    };
    let table = fields
        .table
        .and_then(str_of)
        .ok_or_else(|| ApiError::unprocessable("missing_table", "every op needs a `table`"))?;
    let kind_name = fields.kind.and_then(str_of).unwrap_or_default();
    let kind = OpKind::parse(&kind_name).ok_or_else(|| {
        ApiError::unprocessable(
            "invalid_kind",
            format!("`kind` must be insert, upsert, update or delete (got {kind_name:?})"),
        )
    })?;
    let Some(RowSlot::Entries(row)) = fields.row else {
        return Err(ApiError::unprocessable(
            "invalid_row",
            "`row` must be a JSON object",
        ));
    };
    Ok(OpRequest {
        op_id,
        seq,
        table,
        kind,
        row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str, max: usize) -> (u16, &'static str, Option<usize>) {
        let e = parse(body.as_bytes(), max).expect_err(body);
        (e.status.as_u16(), e.code, e.index.map(|(_, i)| i))
    }

    const OP: &str = r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","table":"works","kind":"insert","row":{"title":"x"}}"#;

    #[test]
    fn a_valid_request_is_typed() {
        let body = format!(
            r#"{{"client_id":"7d3c9a10-4e2b-4f5a-9b6c-1a2b3c4d5e6f","device_id":null,"extra":[1,{{}}],
                "ops":[{OP}, {{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a02","seq":7,"table":"w\u006frks",
                "kind":"update","row":{{"id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a03","t\"q":"a","t\"q":"b"}}}}]}}"#
        );
        let req = parse(body.as_bytes(), 2).unwrap();
        assert_eq!(
            req.client_id,
            Some("7d3c9a10-4e2b-4f5a-9b6c-1a2b3c4d5e6f".parse().unwrap())
        );
        assert_eq!(req.ops.len(), 2);
        assert_eq!(req.ops[0].kind, OpKind::Insert);
        assert_eq!(req.ops[0].seq, None);
        assert!(matches!(req.ops[0].table, Cow::Borrowed("works")));
        assert_eq!(req.ops[1].table, "works");
        assert_eq!(req.ops[1].seq, Some(7));
        // Rows are slices of the body, in request order.
        let row: Vec<(&str, &str)> = req.ops[1]
            .row
            .iter()
            .map(|(k, v)| (k.as_ref(), v.get()))
            .collect();
        assert_eq!(
            row,
            [
                ("id", "\"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a03\""),
                ("t\"q", "\"a\""),
                ("t\"q", "\"b\"")
            ]
        );
    }

    #[test]
    fn the_op_limit_stops_the_parse_before_the_rest_of_the_body() {
        let ops = [OP; 3].join(",");
        assert_eq!(
            code(&format!("{{\"ops\":[{ops}]}}"), 2),
            (413, "too_many_ops", None)
        );
        // Op 3 is followed by garbage: with the limit at 2 the parser never reads it (413, not 400 invalid_json).
        let body = format!("{{\"ops\":[{ops}, oops");
        assert_eq!(code(&body, 2), (413, "too_many_ops", None));
        assert_eq!(code(&body, 5), (400, "invalid_json", None));
        assert!(parse(format!("{{\"ops\":[{ops}]}}").as_bytes(), 3).is_ok());
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(code("{\"ops\": [", 10), (400, "invalid_json", None));
        assert_eq!(code("[1, 2]", 10), (400, "invalid_request", None));
        assert_eq!(code("{}", 10), (400, "invalid_request", None));
        assert_eq!(code("{\"ops\": 5}", 10), (400, "invalid_request", None));
        assert_eq!(code("{\"ops\": []} x", 10), (400, "invalid_json", None));
        // A top-level key twice: refused whole, whichever value is valid.
        for body in [
            r#"{"ops": [], "ops": []}"#,
            r#"{"client_id": "00000000-0000-4000-8000-000000000001", "client_id": null, "ops": []}"#,
            r#"{"device_id": null, "ops": [], "device_id": null}"#,
        ] {
            assert_eq!(code(body, 10), (400, "invalid_request", None), "{body}");
        }
        assert_eq!(
            code(r#"{"device_id": "laptop", "ops": []}"#, 10),
            (422, "invalid_device_id", None)
        );
        assert_eq!(
            code(r#"{"client_id": 7, "ops": []}"#, 10),
            (422, "invalid_client_id", None)
        );
        // Not JSON wins over a bad field seen earlier.
        assert_eq!(
            code(r#"{"device_id": "laptop", "ops": [}"#, 10),
            (400, "invalid_json", None)
        );
        // Bytes that are not UTF-8, inside a string or not: not JSON (RFC 8259 §8.1).
        let mut latin1 = br#"{"ops": [{"op_id": "x", "row": {"title": "caf"#.to_vec();
        latin1.extend_from_slice(b"\xe9\"}}]}");
        let e = parse(&latin1, 10).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = parse(b"{\"ops\": 5}", 10).unwrap_err();
        assert_eq!(e.message, "`ops` must be an array of operations");
    }

    #[test]
    fn op_errors_name_their_index() {
        let with = |op: &str| format!("{{\"ops\":[{OP},{op}]}}");
        let cases = [
            ("\"oops\"", 400, "invalid_op"),
            ("{}", 422, "missing_op_id"),
            (r#"{"op_id":"nope"}"#, 422, "invalid_op_id"),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","seq":0}"#,
                422,
                "invalid_seq",
            ),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","seq":1.5}"#,
                422,
                "invalid_seq",
            ),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","seq":"1"}"#,
                422,
                "invalid_seq",
            ),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","table":3}"#,
                422,
                "missing_table",
            ),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","table":"works","kind":"merge"}"#,
                422,
                "invalid_kind",
            ),
            (
                r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01","table":"works","kind":"insert","row":[]}"#,
                422,
                "invalid_row",
            ),
        ];
        for (op, status, want) in cases {
            assert_eq!(code(&with(op), 10), (status, want, Some(1)), "{op}");
        }
    }
}
