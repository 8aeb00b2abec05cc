//! Pure: one JSON value → the value of a column's Postgres type, decided in Rust before anything reaches the
//! database, and bound as a typed binary parameter (docs/api.md, "Values"; docs/decisions.md §14).
//!
//! | column type | accepted JSON | bound as |
//! |---|---|---|
//! | `uuid` | string (hyphenated, 32 hex digits, `{…}` or `urn:uuid:…`, any case) | `uuid` |
//! | `text`, `varchar`, `bpchar` | string without U+0000 | `text` (Postgres applies the column's length) |
//! | a text column named `sha256` | 64 lowercase hex characters | `text` |
//! | `boolean` | `true` / `false` | `bool` |
//! | `smallint`, `integer`, `bigint` | integral number in range, or a string of digits with an optional sign | `int2/4/8` |
//! | `real`, `double precision` | number in range (not one that rounds to 0 unless it is 0, as Postgres), or `"NaN"`, `"Infinity"`, `"-Infinity"` (as the stream sends them) | `float4/8` |
//! | `json`, `jsonb` | any JSON value at most [`MAX_JSON_DEPTH`] deep (a JSON `null` is SQL NULL); jsonb: no `\u0000`, no unpaired surrogate escape | `json`/`jsonb` |
//! | `timestamp with time zone` | RFC 3339 / ISO 8601 with a UTC offset, Postgres's output (years beyond 9999, ` BC`), within Postgres's range (4714-11-24 BC to 294276-12-31 UTC); or `"infinity"`, `"-infinity"` | `timestamptz` |
//! | one-dimensional array of the above | JSON array of such values (or nulls); for `json[]`/`jsonb[]` any JSON value, arrays too, is one element | array literal, cast by Postgres |
//! | a domain over `json`/`jsonb` | string (its JSON text, checked as `json`/`jsonb` is), number or boolean, as text | text, cast by Postgres |
//! | anything else (`numeric`, `date`, other domains, …) | string, number or boolean, as text | text, cast by Postgres |
//!
//! A string whose escapes have no text form (half a UTF-16 surrogate pair) is refused for every type. `null` is SQL
//! NULL for every type. No value is ever spliced into SQL: arrays and "anything else" travel as text
//! parameters that Postgres casts with the column type's own input function.

use serde_json::value::RawValue;
use uuid::Uuid;

use crate::db::catalog::Column;
use crate::error::ApiError;

/// How a column's values are decoded and bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ColumnType {
    /// `uuid`.
    Uuid,
    /// `text`, `varchar`, `bpchar`.
    Text,
    /// A text column named `sha256`: a content hash, 64 lowercase hex characters everywhere in the schema.
    Sha256,
    /// `boolean`.
    Bool,
    /// `smallint`.
    Int2,
    /// `integer`.
    Int4,
    /// `bigint`.
    Int8,
    /// `real`.
    Float4,
    /// `double precision`.
    Float8,
    /// `json`.
    Json,
    /// `jsonb`.
    Jsonb,
    /// `timestamp with time zone`.
    Timestamptz,
    /// A one-dimensional array; elements decoded as `element`, sent as an array literal cast to `cast`.
    Array {
        /// Element type (never an array itself).
        element: Box<ColumnType>,
        /// The array type without type modifiers, e.g. `text[]`, `character varying[]`.
        cast: String,
    },
    /// A domain over `json` or `jsonb`: like [`ColumnType::Other`] (a string is the value's JSON text, as the
    /// live stream sends it, cast to `cast` by Postgres), with the checks of the base type applied to that text.
    JsonDomain {
        /// The domain, e.g. `doc`.
        cast: String,
        /// The base type is `jsonb` (not `json`).
        binary: bool,
    },
    /// Any other type: sent as text and cast to `cast` (the type without type modifiers) by Postgres.
    Other {
        /// E.g. `numeric`, `date`.
        cast: String,
    },
}

use crate::db::pg_type::{self as oid, array_element};

fn scalar(type_oid: u32) -> Option<ColumnType> {
    Some(match type_oid {
        oid::UUID => ColumnType::Uuid,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR => ColumnType::Text,
        oid::BOOL => ColumnType::Bool,
        oid::INT2 => ColumnType::Int2,
        oid::INT4 => ColumnType::Int4,
        oid::INT8 => ColumnType::Int8,
        oid::FLOAT4 => ColumnType::Float4,
        oid::FLOAT8 => ColumnType::Float8,
        oid::JSON => ColumnType::Json,
        oid::JSONB => ColumnType::Jsonb,
        oid::TIMESTAMPTZ => ColumnType::Timestamptz,
        _ => return None,
    })
}

/// `format_type()` output without type modifiers: `character varying(20)[]` → `character varying[]`,
/// `numeric(10,2)` → `numeric`. An explicit cast to a type *with* modifiers would silently truncate
/// (`'abcdef'::varchar(3)`); without them, the column's modifiers are applied by the assignment, which refuses.
pub(crate) fn without_typmod(type_name: &str) -> String {
    let mut out = String::with_capacity(type_name.len());
    let (mut depth, mut quoted) = (0usize, false);
    for c in type_name.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                if depth == 0 {
                    out.push(c);
                }
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    // "timestamp(3) with time zone" → "timestamp  with time zone": collapse the double space.
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl ColumnType {
    /// The decoding of `column`.
    pub(crate) fn of(column: &Column) -> Self {
        if let Some(t) = scalar(column.type_oid) {
            return if t == Self::Text && column.name == "sha256" {
                Self::Sha256
            } else {
                t
            };
        }
        let cast = without_typmod(&column.type_name);
        if column.base_type_oid != column.type_oid
            && matches!(column.base_type_oid, oid::JSON | oid::JSONB)
        {
            return Self::JsonDomain {
                cast,
                binary: column.base_type_oid == oid::JSONB,
            };
        }
        if let Some(element) = array_element(column.type_oid).and_then(scalar) {
            return Self::Array {
                element: Box::new(element),
                cast,
            };
        }
        match cast.strip_suffix("[]") {
            Some(element) => Self::Array {
                element: Box::new(Self::Other {
                    cast: element.to_owned(),
                }),
                cast,
            },
            None => Self::Other { cast },
        }
    }

    /// The parameter type of a column of these values in `unnest($n::<type>[])`.
    pub(crate) fn param_array_type(&self) -> &'static str {
        match self {
            Self::Uuid => "uuid[]",
            Self::Text
            | Self::Sha256
            | Self::Array { .. }
            | Self::JsonDomain { .. }
            | Self::Other { .. } => "text[]",
            Self::Bool => "bool[]",
            Self::Int2 => "int2[]",
            Self::Int4 => "int4[]",
            Self::Int8 => "int8[]",
            Self::Float4 => "float4[]",
            Self::Float8 => "float8[]",
            Self::Json => "json[]",
            Self::Jsonb => "jsonb[]",
            Self::Timestamptz => "timestamptz[]",
        }
    }

    /// The cast Postgres applies after `unnest` (text sent for arrays and other types), if any.
    pub(crate) fn cast(&self) -> Option<&str> {
        match self {
            Self::Array { cast, .. } | Self::JsonDomain { cast, .. } | Self::Other { cast } => {
                Some(cast)
            }
            _ => None,
        }
    }
}

/// A decoded value, owned (it outlives the request body when parsing runs on a blocking thread).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    /// SQL NULL.
    Null,
    /// `uuid`.
    Uuid(Uuid),
    /// Text, or the text form of an array or "other" value (cast by Postgres).
    Text(String),
    /// `boolean`.
    Bool(bool),
    /// `smallint`.
    I16(i16),
    /// `integer`.
    I32(i32),
    /// `bigint`.
    I64(i64),
    /// `real`.
    F32(f32),
    /// `double precision`.
    F64(f64),
    /// `json` / `jsonb`: the value's JSON text as sent (valid JSON: the request parser checked it).
    Json(String),
    /// `timestamp with time zone`.
    Timestamp(Timestamp),
}

/// Why a value does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValueError {
    /// `invalid_value`, or `invalid_sha256` for a hash column.
    pub(crate) code: &'static str,
    /// What is wrong (without the column name; the caller adds it).
    pub(crate) message: String,
}

impl ValueError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            code: "invalid_value",
            message: message.into(),
        }
    }

    /// The answer to the client, `context` (the column) before the message: `400 invalid_value` for a value that
    /// is none of its type's forms ([`ApiError::invalid_value`]); `422 invalid_sha256` for a hash column's text
    /// that is not a hash, as `/v1/blobs/coordinate` answers it (a rule of the blob tables, like a check
    /// constraint, not a type's).
    pub(crate) fn into_api(self, context: &str) -> ApiError {
        let message = format!("{context}: {}", self.message);
        match self.code {
            "invalid_value" => ApiError::invalid_value(message),
            code => ApiError::unprocessable(code, message),
        }
    }
}

/// The JSON kind of a raw value, from its first character (the parser already validated it).
fn kind(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "boolean",
        Some(b'"') => "string",
        Some(b'[') => "array",
        Some(b'{') => "object",
        _ => "number",
    }
}

/// The text of a JSON string, borrowed from the body when it has no escapes (the common case: no allocation, no
/// second parse); `None` if `raw` is not a string or is one without a text form (see [`text_of`]).
fn text(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    text_of(raw, "a string").ok()
}

fn string(raw: &str) -> Option<String> {
    text(raw).map(std::borrow::Cow::into_owned)
}

/// The text of a JSON string; if `raw` is not a string, the error says that `expected` was. A string that is valid
/// JSON can still have no text form: a lone UTF-16 surrogate escape (`"\ud800"`) has no UTF-8 encoding, and such
/// a string is refused as it is, never stored as something else.
fn text_of<'a>(raw: &'a str, expected: &str) -> Result<std::borrow::Cow<'a, str>, ValueError> {
    let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return Err(wrong(expected, raw));
    };
    if !inner.contains('\\') {
        return Ok(inner.into());
    }
    serde_json::from_str::<String>(raw)
        .map(Into::into)
        .map_err(|e| {
            // The body is valid JSON (checked while parsing it), so an escape that does not decode can only be a
            // surrogate without its pair. serde_json's position is within this value, not the body: left out.
            let why = e.to_string();
            let why = why.split(" at line ").next().unwrap_or_default();
            ValueError::new(format!(
                "the string has no text form: a UTF-16 surrogate escape (\\uD800-\\uDFFF) without its pair ({why})"
            ))
        })
}

fn wrong(expected: &str, raw: &str) -> ValueError {
    ValueError::new(format!("expected {expected}, got a JSON {}", kind(raw)))
}

/// Decodes one value for a column of type `ty`.
pub(crate) fn decode(ty: &ColumnType, raw: &RawValue) -> Result<Cell, ValueError> {
    let raw = raw.get().trim_start();
    if raw.starts_with('n') {
        return Ok(Cell::Null);
    }
    match ty {
        ColumnType::Uuid => {
            let s = text_of(raw, "a UUID string")?;
            Uuid::parse_str(&s)
                .map(Cell::Uuid)
                .map_err(|_| ValueError::new(format!("{s:?} is not a UUID")))
        }
        ColumnType::Text => {
            let s = text_of(raw, "a string")?.into_owned();
            no_nul(&s)?;
            Ok(Cell::Text(s))
        }
        ColumnType::Sha256 => {
            let s = string(raw).filter(|s| crate::http::blobs::is_sha256(s));
            s.map(Cell::Text).ok_or_else(|| ValueError {
                code: "invalid_sha256",
                message: "sha256 must be 64 lowercase hexadecimal characters".into(),
            })
        }
        ColumnType::Bool => match raw {
            "true" => Ok(Cell::Bool(true)),
            "false" => Ok(Cell::Bool(false)),
            _ => Err(wrong("true or false", raw)),
        },
        ColumnType::Int2 => integer(raw, "smallint").map(Cell::I16),
        ColumnType::Int4 => integer(raw, "integer").map(Cell::I32),
        ColumnType::Int8 => integer(raw, "bigint").map(Cell::I64),
        ColumnType::Float4 => float::<f32>(raw, "real").map(Cell::F32),
        ColumnType::Float8 => float::<f64>(raw, "double precision").map(Cell::F64),
        ColumnType::Json => json(raw, false),
        ColumnType::Jsonb => json(raw, true),
        ColumnType::Timestamptz => {
            let s = text_of(raw, "a timestamp string")?;
            Timestamp::parse(&s).map(Cell::Timestamp).map_err(|why| {
                ValueError::new(format!(
                    "{s:?} is not a timestamp: {why} (expected RFC 3339 with a UTC offset, e.g. \
                     \"2026-12-01T10:00:00Z\" or \"2026-12-01 10:00:00.5+01:00\")"
                ))
            })
        }
        ColumnType::Array { element, .. } => array(element, raw).map(Cell::Text),
        // A string is sent as text for Postgres to cast; for a domain over json/jsonb that text is the JSON it
        // parses (recursively: the depth bound matters as much as for jsonb).
        ColumnType::JsonDomain { cast, .. } | ColumnType::Other { cast } => match kind(raw) {
            "string" => {
                let s = text_of(raw, "a string")?.into_owned();
                no_nul(&s)?;
                if let ColumnType::JsonDomain { binary, .. } = ty {
                    json_checks(&s, *binary)?;
                }
                Ok(Cell::Text(s))
            }
            "number" | "boolean" => Ok(Cell::Text(raw.to_owned())),
            _ => {
                let hint = match ty {
                    ColumnType::JsonDomain { .. } => " (its JSON text as a string)",
                    _ => "",
                };
                Err(wrong(&format!("a value of type {cast}{hint}"), raw))
            }
        },
    }
}

fn no_nul(s: &str) -> Result<(), ValueError> {
    if s.contains('\0') {
        Err(ValueError::new(
            "text cannot contain the character U+0000 (Postgres refuses it)",
        ))
    } else {
        Ok(())
    }
}

fn integer<T: std::str::FromStr>(raw: &str, name: &str) -> Result<T, ValueError> {
    let text = match kind(raw) {
        "number" => raw.to_owned(),
        "string" => text_of(raw, "a string")?.into_owned(),
        _ => return Err(wrong(&format!("an integer ({name})"), raw)),
    };
    // Digits with an optional sign only: `str::parse` refuses "1.0", "1e3", " 1" and "" as Postgres would not all.
    let digits = text.strip_prefix(['-', '+']).unwrap_or(&text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::new(format!(
            "{text} is not an integer ({name})"
        )));
    }
    text.parse::<T>()
        .map_err(|_| ValueError::new(format!("{text} is out of range for type {name}")))
}

fn float<T: std::str::FromStr + Into<f64> + Copy>(raw: &str, name: &str) -> Result<T, ValueError> {
    match kind(raw) {
        // The raw text, not serde_json's f64: Rust's parser rounds correctly, and a `real` is rounded once.
        "number" => {
            let v = raw
                .parse::<T>()
                .map_err(|_| ValueError::new(format!("{raw} is not a number")))?;
            let f: f64 = v.into();
            // As Postgres's float4in/float8in (strtof/strtod with ERANGE): a value too large for the type, or
            // one whose text is not zero but that rounds to 0 (`1e-400`, `1e-46` for `real`), is out of range;
            // a subnormal that is not 0 is kept.
            if f.is_finite() && (f != 0.0 || !nonzero_mantissa(raw)) {
                Ok(v)
            } else {
                Err(ValueError::new(format!(
                    "{raw} is out of range for type {name}"
                )))
            }
        }
        "string" => match string(raw).as_deref() {
            Some(s @ ("NaN" | "Infinity" | "-Infinity")) => s
                .parse::<T>()
                .map_err(|_| ValueError::new(format!("{s} is not a number"))),
            _ => Err(wrong(
                &format!("a number ({name}), or \"NaN\", \"Infinity\", \"-Infinity\""),
                raw,
            )),
        },
        _ => Err(wrong(&format!("a number ({name})"), raw)),
    }
}

/// Whether a JSON number's digits before its exponent are not all zeros (`1e-400`: yes; `-0.000e5`: no).
fn nonzero_mantissa(number: &str) -> bool {
    number
        .bytes()
        .take_while(|&b| b != b'e' && b != b'E')
        .any(|b| matches!(b, b'1'..=b'9'))
}

/// How deeply a `json`/`jsonb` value may nest arrays and objects. Postgres parses these types recursively and gives up
/// with "stack depth limit exceeded" somewhere past a few thousand levels (with the default `max_stack_depth`), which
/// would reach the client as a 500 after a round trip; no document a client keeps comes near this bound.
pub(crate) const MAX_JSON_DEPTH: usize = 1000;

fn json(raw: &str, binary: bool) -> Result<Cell, ValueError> {
    json_checks(raw, binary)?;
    Ok(Cell::Json(raw.to_owned()))
}

/// What a `json` (`binary`: `jsonb`) value cannot be, checked on its JSON text: nested too deep, and for jsonb
/// `\u0000` or half a surrogate pair. Text that is not JSON is not refused here (Postgres's input refuses it).
fn json_checks(raw: &str, binary: bool) -> Result<(), ValueError> {
    let scan = scan_json(raw);
    if binary && scan.nul_escape {
        return Err(ValueError::new(
            "jsonb cannot hold \\u0000 in a string (Postgres refuses it)",
        ));
    }
    if binary && scan.lone_surrogate {
        return Err(ValueError::new(
            "jsonb cannot hold a UTF-16 surrogate escape (\\uD800-\\uDFFF) without its pair (Postgres refuses it)",
        ));
    }
    if scan.depth > MAX_JSON_DEPTH {
        return Err(ValueError::new(format!(
            "the value nests arrays and objects {} deep; at most {MAX_JSON_DEPTH} levels are accepted",
            scan.depth
        )));
    }
    Ok(())
}

/// What one pass over valid JSON text finds.
struct JsonScan {
    /// It contains the escape `\u0000` (any case).
    nul_escape: bool,
    /// It contains a `\u` escape of half a UTF-16 surrogate pair without the other half.
    lone_surrogate: bool,
    /// The deepest nesting of arrays and objects (a scalar: 0).
    depth: usize,
}

/// The four hex digits at `at` (valid JSON has them after every `\u`).
fn hex4(b: &[u8], at: usize) -> Option<u16> {
    u16::from_str_radix(std::str::from_utf8(b.get(at..at + 4)?).ok()?, 16).ok()
}

/// Scans valid JSON text (any text without a panic; for text that is not JSON, what it finds means little).
/// Outside strings a backslash cannot occur, and inside one every backslash starts an escape,
/// so skipping the escaped character after each is exact; a quote that is not escaped opens or closes a string,
/// and brackets count only outside strings.
fn scan_json(raw: &str) -> JsonScan {
    let b = raw.as_bytes();
    let mut scan = JsonScan {
        nul_escape: false,
        lone_surrogate: false,
        depth: 0,
    };
    let (mut depth, mut in_string) = (0usize, false);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                match hex4(b, i + 2) {
                    Some(0) => scan.nul_escape = true,
                    Some(0xD800..=0xDBFF) => {
                        // A leading surrogate is whole only with a trailing one right after it.
                        if b.get(i + 6..i + 8) == Some(b"\\u")
                            && matches!(hex4(b, i + 8), Some(0xDC00..=0xDFFF))
                        {
                            i += 12;
                            continue;
                        }
                        scan.lone_surrogate = true;
                    }
                    Some(0xDC00..=0xDFFF) => scan.lone_surrogate = true,
                    _ => {}
                }
                i += 6;
                continue;
            }
            b'\\' => {
                i += 2;
                continue;
            }
            b'"' => in_string = !in_string,
            b'[' | b'{' if !in_string => {
                depth += 1;
                scan.depth = scan.depth.max(depth);
            }
            b']' | b'}' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    scan
}

/// A JSON array of `element` values → a Postgres array literal (`{"a",NULL,"b"}`), every element decoded (so
/// checked) first and then written in a canonical text form, quoted. One dimension only: an element that is an
/// array is refused, unless the elements are `json`/`jsonb`, where any JSON value is one element.
fn array(element: &ColumnType, raw: &str) -> Result<String, ValueError> {
    let items: Vec<&RawValue> = if kind(raw) == "array" {
        serde_json::from_str(raw).map_err(|e| ValueError::new(format!("not an array: {e}")))?
    } else {
        return Err(wrong("an array", raw));
    };
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // An array inside is a second dimension, except for json/jsonb elements: each of those is one JSON value,
        // arrays included (`[{"a":1},[1,2]]` is a one-dimensional jsonb[] of two elements).
        if kind(item.get()) == "array" && !matches!(element, ColumnType::Json | ColumnType::Jsonb) {
            return Err(ValueError::new(
                "nested arrays are not accepted (one-dimensional arrays only)",
            ));
        }
        let cell = decode(element, item).map_err(|e| ValueError {
            code: e.code,
            message: format!("element {i}: {}", e.message),
        })?;
        let text = match cell {
            Cell::Null => {
                out.push_str("NULL");
                continue;
            }
            Cell::Uuid(u) => u.hyphenated().to_string(),
            Cell::Text(s) => s,
            Cell::Bool(b) => if b { "t" } else { "f" }.to_owned(),
            Cell::I16(v) => v.to_string(),
            Cell::I32(v) => v.to_string(),
            Cell::I64(v) => v.to_string(),
            // A number as sent (Postgres's float input reads JSON number syntax and rounds it as Rust did);
            // the non-finite values in Postgres's spelling.
            Cell::F32(_) | Cell::F64(_) => match kind(item.get()) {
                "number" => item.get().to_owned(),
                _ => string(item.get()).unwrap_or_default(),
            },
            Cell::Json(j) => j,
            Cell::Timestamp(t) => t.to_string(),
        };
        out.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    Ok(out)
}

/// A `timestamp with time zone` as Postgres stores it: microseconds since 2000-01-01 00:00:00 UTC, with
/// `i64::MAX` / `i64::MIN` for `infinity` / `-infinity`.
///
/// Parsed by hand: the accepted forms are RFC 3339 plus Postgres's own ISO output (`2026-11-28 03:50:37.409858+00`,
/// `10000-01-01 00:00:00+00`, `0001-12-31 23:00:00+00 BC`: what the live stream sends, so a client can write back
/// a value it received), for the range Postgres supports ([`MIN_TIMESTAMP`] ..= [`MAX_TIMESTAMP`]). `time` and `chrono` parse RFC 3339
/// but not offsets without minutes, and both would then need a second conversion into Postgres's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timestamp(pub i64);

/// 2000-01-01 (Postgres's epoch) as counted by [`days_from_civil`].
const EPOCH_2000: i64 = days_from_civil(2000, 1, 1);
const USECS_PER_DAY: i64 = 86_400_000_000;

/// The earliest `timestamptz` Postgres supports: 4714-11-24 00:00:00 BC UTC (proleptic Gregorian; Julian day 0,
/// the "4713 BC" of its documentation), its `MIN_TIMESTAMP`.
pub(crate) const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
/// The latest: 294276-12-31 23:59:59.999999 UTC (one microsecond before Postgres's `END_TIMESTAMP`).
pub(crate) const MAX_TIMESTAMP: i64 = 9_223_371_331_200_000_000 - 1;
const OUT_OF_RANGE: &str =
    "out of range (Postgres keeps 4714-11-24 00:00:00 BC to 294276-12-31 23:59:59.999999 UTC)";

/// Days since 0000-03-01 (H. Hinnant's `days_from_civil`, shifted so the epoch is positive).
const fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// A cursor over ASCII text for the timestamp parser.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn digits(&mut self, n: usize, what: &'static str) -> Result<i64, &'static str> {
        let s = self.b.get(self.i..self.i + n).ok_or(what)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return Err(what);
        }
        self.i += n;
        Ok(s.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')))
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
}

impl Timestamp {
    /// Parses `YYYY-MM-DD(T|t| )HH:MM[:SS[.fraction]]` followed by `Z`, `±HH`, `±HHMM`, `±HH:MM` or `±HH:MM:SS`
    /// and, as Postgres prints years before 1 AD, an optional ` BC` (`0001` BC is the year before `0001`); or
    /// `infinity` / `-infinity`. The year has four or more digits and is at least 1; fractions beyond microseconds
    /// are rounded (half up). The instant must be within Postgres's range ([`MIN_TIMESTAMP`]..=[`MAX_TIMESTAMP`]).
    pub(crate) fn parse(s: &str) -> Result<Self, &'static str> {
        match s {
            "infinity" | "+infinity" => return Ok(Self(i64::MAX)),
            "-infinity" => return Ok(Self(i64::MIN)),
            _ => {}
        }
        // " BC" ends the value, after the offset, as Postgres prints it.
        let (s, bc) = match s.strip_suffix(" BC") {
            Some(before) => (before, true),
            None => (s, false),
        };
        let mut p = Scan {
            b: s.as_bytes(),
            i: 0,
        };
        let year_digits = p.b.iter().take_while(|b| b.is_ascii_digit()).count();
        if year_digits > 9 {
            return Err("the year is out of range");
        }
        let y = p.digits(year_digits.max(4), "the year needs four digits")?;
        if !p.eat(b'-') {
            return Err("expected '-' after the year");
        }
        let m = p.digits(2, "the month needs two digits")?;
        if !p.eat(b'-') {
            return Err("expected '-' after the month");
        }
        let d = p.digits(2, "the day needs two digits")?;
        if !(p.eat(b'T') || p.eat(b't') || p.eat(b' ')) {
            return Err("a time of day is required after the date");
        }
        let hh = p.digits(2, "the hour needs two digits")?;
        if !p.eat(b':') {
            return Err("expected ':' after the hour");
        }
        let mi = p.digits(2, "the minutes need two digits")?;
        let mut ss = 0;
        let mut usec = 0;
        if p.eat(b':') {
            ss = p.digits(2, "the seconds need two digits")?;
            if p.eat(b'.') {
                let start = p.i;
                let mut scale = 100_000;
                while let Some(c @ b'0'..=b'9') = p.peek() {
                    let digit = i64::from(c - b'0');
                    match p.i - start {
                        0..=5 => usec += digit * scale,
                        6 if digit >= 5 => usec += 1,
                        _ => {}
                    }
                    scale /= 10;
                    p.i += 1;
                }
                if p.i == start {
                    return Err("expected digits after '.'");
                }
            }
        }
        // The date is checked in astronomical years (1 BC = 0, 2 BC = -1), where the leap years fall.
        if y < 1 {
            return Err("no such date (there is no year 0; 1 BC is the year before 0001)");
        }
        let y = if bc { 1 - y } else { y };
        if !(-4713..=294_277).contains(&y) {
            return Err(OUT_OF_RANGE);
        }
        if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
            return Err("no such date");
        }
        if hh > 23 || mi > 59 || ss > 59 {
            return Err("no such time of day");
        }
        let offset_secs = match p.peek() {
            Some(b'Z' | b'z') => {
                p.i += 1;
                0
            }
            Some(sign @ (b'+' | b'-')) => {
                p.i += 1;
                let oh = p.digits(2, "the offset's hours need two digits")?;
                let colon = p.eat(b':');
                let om = if colon || p.peek().is_some() {
                    p.digits(2, "the offset's minutes need two digits")?
                } else {
                    0
                };
                let os = if colon && p.eat(b':') {
                    p.digits(2, "the offset's seconds need two digits")?
                } else {
                    0
                };
                if oh > 15 || om > 59 || os > 59 {
                    return Err("the UTC offset is out of range");
                }
                let secs = oh * 3600 + om * 60 + os;
                if sign == b'-' { -secs } else { secs }
            }
            None => return Err("a UTC offset is required (Z or ±HH:MM)"),
            Some(_) => return Err("unexpected characters after the time"),
        };
        if p.i != p.b.len() {
            return Err("unexpected characters after the UTC offset");
        }
        let days = days_from_civil(y, m, d) - EPOCH_2000;
        let secs = hh * 3600 + mi * 60 + ss - offset_secs;
        let t = days * USECS_PER_DAY + secs * 1_000_000 + usec;
        if !(MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&t) {
            return Err(OUT_OF_RANGE);
        }
        Ok(Self(t))
    }
}

impl std::fmt::Display for Timestamp {
    /// Postgres's ISO output in UTC: `2026-11-28 03:50:37.409858+00`, `2026-11-28 03:50:37.25+00`,
    /// `0001-12-31 23:00:00+00 BC` (astronomical year 0), `10000-01-01 00:00:00+00`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            i64::MAX => return f.write_str("infinity"),
            i64::MIN => return f.write_str("-infinity"),
            _ => {}
        }
        let days = self.0.div_euclid(USECS_PER_DAY);
        let in_day = self.0.rem_euclid(USECS_PER_DAY);
        let (y, m, d) = civil_from_days(days + EPOCH_2000);
        // Postgres has no year 0 and no negative years: 1 BC, 2 BC… for 0, -1…
        let (year, era) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
        let secs = in_day / 1_000_000;
        let usec = in_day % 1_000_000;
        write!(
            f,
            "{year:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        if usec != 0 {
            // As Postgres prints it: no trailing zeros.
            let fraction = format!("{usec:06}");
            write!(f, ".{}", fraction.trim_end_matches('0'))?;
        }
        write!(f, "+00{era}")
    }
}

/// JSON text bound as `json` or `jsonb` as it is (binary `jsonb` is a version byte and the text). No serialisation
/// and no second validation: the request parser already checked it is JSON.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonText<'a>(pub(crate) &'a str);

impl tokio_postgres::types::ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        if *ty == tokio_postgres::types::Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSON || *ty == tokio_postgres::types::Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

impl tokio_postgres::types::ToSql for Timestamp {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        out.put_i64(self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }

    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn json(s: &str) -> Cell {
        Cell::Json(s.to_owned())
    }

    fn ok(ty: &ColumnType, s: &str) -> Cell {
        decode(ty, &raw(s)).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    fn err(ty: &ColumnType, s: &str) -> ValueError {
        decode(ty, &raw(s)).expect_err(s)
    }

    fn column(name: &str, type_name: &str, type_oid: u32) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid,
            base_type_oid: type_oid,
            not_null: false,
            generated: false,
            identity_always: false,
        }
    }

    #[test]
    fn column_types_come_from_the_oid() {
        assert_eq!(
            ColumnType::of(&column("id", "uuid", 2950)),
            ColumnType::Uuid
        );
        assert_eq!(
            ColumnType::of(&column("sha256", "text", 25)),
            ColumnType::Sha256
        );
        assert_eq!(
            ColumnType::of(&column("title", "text", 25)),
            ColumnType::Text
        );
        assert_eq!(
            ColumnType::of(&column("tags", "text[]", 1009)),
            ColumnType::Array {
                element: Box::new(ColumnType::Text),
                cast: "text[]".into()
            }
        );
        assert_eq!(
            ColumnType::of(&column("n", "numeric(10,2)", 1700)),
            ColumnType::Other {
                cast: "numeric".into()
            }
        );
        assert_eq!(
            ColumnType::of(&column("c", "character varying(3)[]", 1015)).cast(),
            Some("character varying[]")
        );
        assert_eq!(
            ColumnType::of(&column("d", "date[]", 1182)),
            ColumnType::Array {
                element: Box::new(ColumnType::Other {
                    cast: "date".into()
                }),
                cast: "date[]".into()
            }
        );
        assert_eq!(
            without_typmod("timestamp(3) with time zone"),
            "timestamp with time zone"
        );
        assert_eq!(without_typmod("\"odd(name)\"[]"), "\"odd(name)\"[]");
    }

    #[test]
    fn scalars_are_checked_in_rust() {
        let u = "0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01";
        assert_eq!(
            ok(&ColumnType::Uuid, &format!("\"{}\"", u.to_uppercase())),
            Cell::Uuid(u.parse().unwrap())
        );
        assert_eq!(ok(&ColumnType::Uuid, "null"), Cell::Null);
        assert_eq!(err(&ColumnType::Uuid, "\"nope\"").code, "invalid_value");
        assert!(
            err(&ColumnType::Uuid, "7")
                .message
                .contains("got a JSON number")
        );

        assert_eq!(
            ok(&ColumnType::Text, r#""a\"b""#),
            Cell::Text("a\"b".into())
        );
        assert!(
            err(&ColumnType::Text, "{\"en\":\"x\"}")
                .message
                .contains("object")
        );
        assert!(err(&ColumnType::Text, "12").message.contains("number"));
        assert!(
            err(&ColumnType::Text, r#""a\u0000b""#)
                .message
                .contains("U+0000")
        );
        // A lone surrogate escape is valid JSON but has no text form: refused, never stored as something else.
        for ty in [
            ColumnType::Text,
            ColumnType::Uuid,
            ColumnType::Timestamptz,
            ColumnType::Int4,
            ColumnType::Other {
                cast: "citext".into(),
            },
        ] {
            let e = err(&ty, r#""a\ud800b""#);
            assert_eq!(e.code, "invalid_value");
            assert!(
                e.message.contains("no text form") && e.message.contains("surrogate"),
                "{ty:?}: {}",
                e.message
            );
        }
        assert_eq!(
            ok(&ColumnType::Text, r#""\ud83d\ude00""#),
            Cell::Text("\u{1f600}".into())
        );

        let hash = "ab".repeat(32);
        assert_eq!(
            ok(&ColumnType::Sha256, &format!("\"{hash}\"")),
            Cell::Text(hash.clone())
        );
        for bad in [hash.to_uppercase(), "a".repeat(9000), hash[..63].to_owned()] {
            assert_eq!(
                err(&ColumnType::Sha256, &format!("\"{bad}\"")).code,
                "invalid_sha256"
            );
        }

        assert_eq!(ok(&ColumnType::Bool, "true"), Cell::Bool(true));
        for bad in ["\"yes\"", "1", "\"t\""] {
            err(&ColumnType::Bool, bad);
        }

        assert_eq!(ok(&ColumnType::Int4, "2019"), Cell::I32(2019));
        assert_eq!(ok(&ColumnType::Int4, "\"2019\""), Cell::I32(2019));
        assert_eq!(ok(&ColumnType::Int4, "-7"), Cell::I32(-7));
        assert_eq!(
            ok(&ColumnType::Int8, "\"9007199254740993\""),
            Cell::I64(9_007_199_254_740_993)
        );
        assert_eq!(ok(&ColumnType::Int2, "32767"), Cell::I16(32767));
        for bad in [
            "\"abc\"",
            "\"MMXVII\"",
            "2019.0",
            "1e3",
            "\" 1\"",
            "\"\"",
            "true",
            "[1]",
        ] {
            assert_eq!(err(&ColumnType::Int4, bad).code, "invalid_value", "{bad}");
        }
        assert!(
            err(&ColumnType::Int4, "99999999999")
                .message
                .contains("out of range")
        );
        assert!(
            err(&ColumnType::Int2, "32768")
                .message
                .contains("out of range")
        );

        assert_eq!(ok(&ColumnType::Float8, "1.5"), Cell::F64(1.5));
        assert_eq!(ok(&ColumnType::Float8, "0.1"), Cell::F64(0.1));
        assert_eq!(ok(&ColumnType::Float4, "0.1"), Cell::F32(0.1));
        assert!(matches!(ok(&ColumnType::Float8, "\"NaN\""), Cell::F64(v) if v.is_nan()));
        assert_eq!(
            ok(&ColumnType::Float8, "\"-Infinity\""),
            Cell::F64(f64::NEG_INFINITY)
        );
        assert!(
            err(&ColumnType::Float4, "1e39")
                .message
                .contains("out of range")
        );
        err(&ColumnType::Float8, "1e999");
        err(&ColumnType::Float8, "\"1.5\"");

        assert_eq!(
            ok(&ColumnType::Jsonb, "{\"x\": [1, 2]}"),
            json("{\"x\": [1, 2]}")
        );
        assert_eq!(ok(&ColumnType::Jsonb, "null"), Cell::Null);
        assert_eq!(ok(&ColumnType::Jsonb, "\"s\""), json("\"s\""));
        assert!(
            err(&ColumnType::Jsonb, r#"{"a": "x\u0000"}"#)
                .message
                .contains("u0000")
        );
        // An escaped backslash followed by "u0000" is just text.
        ok(&ColumnType::Jsonb, r#"{"a": "x\\u0000"}"#);
        // json (not jsonb) keeps what jsonb refuses.
        ok(&ColumnType::Json, r#"{"a": "x\u0000"}"#);

        // jsonb cannot hold half a surrogate pair (Postgres refuses it); a whole pair, in any case, is fine; json
        // keeps its text as sent.
        for lone in [
            r#""\ud800""#,
            r#"["\udc00"]"#,
            r#"{"a": "x\uD83Dy"}"#,
            r#""\ud800\u0041""#,
        ] {
            assert!(
                err(&ColumnType::Jsonb, lone).message.contains("surrogate"),
                "{lone}"
            );
            ok(&ColumnType::Json, lone);
        }
        ok(
            &ColumnType::Jsonb,
            r#"{"a": "\ud83d\ude00", "b": "\uD83D\uDE00 \u00e9"}"#,
        );
        ok(&ColumnType::Jsonb, r#""\\ud800""#);
        // Nesting: at most MAX_JSON_DEPTH levels, for json and jsonb; brackets inside strings do not count.
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        for ty in [ColumnType::Json, ColumnType::Jsonb] {
            ok(&ty, &nested(MAX_JSON_DEPTH));
            ok(
                &ty,
                &format!("{{\"a\": [{{\"b\": {}}}]}}", nested(MAX_JSON_DEPTH - 3)),
            );
            let e = err(&ty, &nested(MAX_JSON_DEPTH + 1));
            assert_eq!(e.code, "invalid_value");
            assert!(e.message.contains("1001 deep"), "{}", e.message);
            err(
                &ty,
                &format!("{{\"a\": [{{\"b\": {}}}]}}", nested(MAX_JSON_DEPTH - 2)),
            );
            ok(&ty, &format!("[\"{}\", \"\\\"{{\"]", "[{".repeat(5000)));
        }

        let other = ColumnType::Other {
            cast: "numeric".into(),
        };
        assert_eq!(
            ok(&other, "3.14159265358979323846"),
            Cell::Text("3.14159265358979323846".into())
        );
        assert_eq!(ok(&other, "\"12.5\""), Cell::Text("12.5".into()));
        err(&other, "{}");
    }

    #[test]
    fn floats_that_underflow_are_out_of_range() {
        // As in Postgres: a value whose text is not zero but that rounds to 0 is out of range. Zeros in any
        // spelling, and subnormals that are not 0, are kept.
        for (ty, bad) in [
            (ColumnType::Float8, "1e-400"),
            (ColumnType::Float8, "-2.4e-324"),
            (ColumnType::Float8, "0.0000001e-320"),
            (ColumnType::Float4, "1e-46"),
            (ColumnType::Float4, "-7e-46"),
            (ColumnType::Float4, "1e-400"),
            (ColumnType::Float4, "3.5e38"),
        ] {
            let e = err(&ty, bad);
            assert!(e.message.contains("out of range"), "{bad}: {}", e.message);
        }
        assert_eq!(ok(&ColumnType::Float8, "5e-324"), Cell::F64(5e-324));
        assert_eq!(ok(&ColumnType::Float8, "3e-324"), Cell::F64(5e-324));
        assert_eq!(
            ok(&ColumnType::Float8, "2.2250738585072014e-308"),
            Cell::F64(f64::MIN_POSITIVE)
        );
        assert_eq!(ok(&ColumnType::Float4, "1e-45"), Cell::F32(1e-45));
        assert_eq!(ok(&ColumnType::Float4, "8e-46"), Cell::F32(1e-45));
        for zero in ["0", "-0", "0.0", "0e-400", "-0.000e999", "0E5"] {
            assert!(
                matches!(ok(&ColumnType::Float8, zero), Cell::F64(v) if v == 0.0),
                "{zero}"
            );
            assert!(
                matches!(ok(&ColumnType::Float4, zero), Cell::F32(v) if v == 0.0),
                "{zero}"
            );
        }
        let floats = ColumnType::Array {
            element: Box::new(ColumnType::Float8),
            cast: "double precision[]".into(),
        };
        assert!(
            err(&floats, "[1, 1e-400]")
                .message
                .starts_with("element 1:")
        );
    }

    #[test]
    fn json_array_elements_may_be_arrays() {
        for (ty, cast) in [(ColumnType::Jsonb, "jsonb[]"), (ColumnType::Json, "json[]")] {
            let docs = ColumnType::Array {
                element: Box::new(ty),
                cast: cast.into(),
            };
            assert_eq!(
                ok(&docs, r#"[{"a":1},[1,2],[],"s",3,null,[[["x"]]]]"#),
                Cell::Text(r#"{"{\"a\":1}","[1,2]","[]","\"s\"","3",NULL,"[[[\"x\"]]]"}"#.into())
            );
            // Each element is still checked as a json/jsonb value.
            let nested = format!("[[1], {}1{}]", "[".repeat(1001), "]".repeat(1001));
            assert!(err(&docs, &nested).message.starts_with("element 1:"));
        }
        let docs = ColumnType::Array {
            element: Box::new(ColumnType::Jsonb),
            cast: "jsonb[]".into(),
        };
        assert!(err(&docs, r#"[["\u0000"]]"#).message.contains("u0000"));
        // Other element types stay one-dimensional.
        let ints = ColumnType::Array {
            element: Box::new(ColumnType::Int4),
            cast: "integer[]".into(),
        };
        assert!(err(&ints, "[[1, 2]]").message.contains("nested"));
    }

    #[test]
    fn domains_over_json_get_the_json_checks() {
        let domain = |base: u32| {
            let mut c = column("doc", "doc", 16_385);
            c.base_type_oid = base;
            ColumnType::of(&c)
        };
        let (jsonb, json) = (domain(3802), domain(114));
        // A string is the value's JSON text (as the live stream sends a domain's value), cast by Postgres.
        for ty in [&jsonb, &json] {
            assert_eq!(ty.cast(), Some("doc"));
            assert_eq!(ty.param_array_type(), "text[]");
            assert_eq!(
                ok(ty, r#""{\"a\": [1]}""#),
                Cell::Text(r#"{"a": [1]}"#.into())
            );
            assert_eq!(ok(ty, "7"), Cell::Text("7".into()));
            let deep = |n: usize| format!("\"{}1{}\"", "[".repeat(n), "]".repeat(n));
            ok(ty, &deep(MAX_JSON_DEPTH));
            for n in [MAX_JSON_DEPTH + 1, 20_000] {
                let e = err(ty, &deep(n));
                assert_eq!(e.code, "invalid_value");
                assert!(e.message.contains(&format!("{n} deep")), "{}", e.message);
            }
        }
        // jsonb's own refusals, on the text.
        assert!(err(&jsonb, r#""[\"\\u0000\"]""#).message.contains("u0000"));
        assert!(
            err(&jsonb, r#""\"\\ud800\"""#)
                .message
                .contains("surrogate")
        );
        ok(&json, r#""[\"\\u0000\"]""#);
        // A domain over another type is cast as before.
        assert_eq!(domain(25), ColumnType::Other { cast: "doc".into() });
    }

    #[test]
    fn arrays_become_quoted_literals() {
        let text = ColumnType::Array {
            element: Box::new(ColumnType::Text),
            cast: "text[]".into(),
        };
        assert_eq!(
            ok(
                &text,
                r#"["ml", null, "a \"q\" \\ b", "NULL", "", "{x,y}"]"#
            ),
            Cell::Text(r#"{"ml",NULL,"a \"q\" \\ b","NULL","","{x,y}"}"#.into())
        );
        assert_eq!(ok(&text, "[]"), Cell::Text("{}".into()));
        assert!(err(&text, "[\"ok\", 7]").message.starts_with("element 1:"));
        assert!(err(&text, "[[\"a\"]]").message.contains("nested"));
        assert!(err(&text, "\"{a,b}\"").message.contains("an array"));

        let uuids = ColumnType::Array {
            element: Box::new(ColumnType::Uuid),
            cast: "uuid[]".into(),
        };
        let u = "0B7C2F4E7C1E4A539D573B1C3C1D8A01";
        assert_eq!(
            ok(&uuids, &format!("[\"{u}\"]")),
            Cell::Text("{\"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01\"}".into())
        );
        let stamps = ColumnType::Array {
            element: Box::new(ColumnType::Timestamptz),
            cast: "timestamp with time zone[]".into(),
        };
        assert_eq!(
            ok(&stamps, "[\"2026-12-01T10:00:00+01:00\"]"),
            Cell::Text("{\"2026-12-01 09:00:00+00\"}".into())
        );
        let floats = ColumnType::Array {
            element: Box::new(ColumnType::Float8),
            cast: "double precision[]".into(),
        };
        assert_eq!(
            ok(&floats, "[0.1, \"NaN\", 1e300]"),
            Cell::Text("{\"0.1\",\"NaN\",\"1e300\"}".into())
        );
    }

    #[test]
    fn timestamps_cover_postgres_range_in_its_output_forms() {
        let t = |s: &str| Timestamp::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        // Postgres's output of the earliest and latest timestamptz it keeps, and of years before 1 AD or after
        // 9999, is read back and printed the same way (select '…'::timestamptz, with TimeZone UTC).
        for s in [
            "4714-11-24 00:00:00+00 BC",
            "0001-12-31 23:00:00+00 BC",
            "0001-01-01 00:00:00+00 BC",
            "0044-03-15 12:00:00.5+00 BC",
            "0005-02-29 00:00:00+00 BC",
            "10000-01-01 14:59:59.999999+00",
            "294276-12-31 23:59:59.999999+00",
        ] {
            assert_eq!(t(s).to_string(), s);
        }
        // The year before 0001 is 1 BC (astronomical year 0, a leap year): one day apart.
        assert_eq!(
            t("0001-01-01 00:00:00+00").0 - t("0001-12-31 00:00:00+00 BC").0,
            86_400_000_000
        );
        // select extract(epoch from '4714-11-24 00:00:00+00 BC'::timestamptz - '2000-01-01 00:00:00+00') * 1e6
        assert_eq!(
            t("4714-11-24 00:00:00+00 BC"),
            Timestamp(-211_813_488_000_000_000)
        );
        assert_eq!(
            t("294276-12-31 23:59:59.999999+00"),
            Timestamp(9_223_371_331_199_999_999)
        );
        // An accepted value with an offset is printed as Postgres prints it in UTC, BC included.
        assert_eq!(
            t("0001-01-01T00:00:00+01:00").to_string(),
            "0001-12-31 23:00:00+00 BC"
        );
        assert_eq!(
            t("9999-12-31T23:59:59.999999-15:00").to_string(),
            "10000-01-01 14:59:59.999999+00"
        );
        assert_eq!(
            t("4714-11-23 23:00:00-01 BC").to_string(),
            "4714-11-24 00:00:00+00 BC"
        );
        let stamps = ColumnType::Array {
            element: Box::new(ColumnType::Timestamptz),
            cast: "timestamp with time zone[]".into(),
        };
        assert_eq!(
            ok(
                &stamps,
                "[\"0001-01-01T00:00:00+01:00\", \"0010-01-01 00:00:00+00 BC\"]"
            ),
            Cell::Text("{\"0001-12-31 23:00:00+00 BC\",\"0010-01-01 00:00:00+00 BC\"}".into())
        );
        // Outside Postgres's range, or not a date: refused.
        for bad in [
            "4714-11-23 23:59:59.999999+00 BC",
            "4714-11-24 00:00:00+01 BC",
            "4715-01-01 00:00:00+00 BC",
            "294277-01-01 00:00:00+00",
            "294276-12-31 23:59:59.999999-01",
            "999999999-01-01 00:00:00+00",
            "9999999999999-01-01 00:00:00+00",
            "0000-01-01 00:00:00+00 BC",
            "0001-02-29 00:00:00+00",
            "0002-02-29 00:00:00+00 BC",
            "123-01-01 00:00:00+00",
            "2026-12-01 10:00:00+00 bc",
            "2026-12-01 10:00:00+00BC",
            "2026-12-01 10:00:00 BC",
            "2026-12-01 10:00:00+00 BC ",
            "infinity BC",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn timestamps_accept_rfc3339_and_postgres_output_only() {
        let t = |s: &str| Timestamp::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(t("2000-01-01T00:00:00Z"), Timestamp(0));
        assert_eq!(t("2000-01-01 00:00:00+00"), Timestamp(0));
        assert_eq!(t("2000-01-01T01:00:00+01:00"), Timestamp(0));
        assert_eq!(t("2000-01-01T01:00:00+0100"), Timestamp(0));
        assert_eq!(t("1999-12-31T23:00:00-01"), Timestamp(0));
        assert_eq!(t("2000-01-01t00:00z"), Timestamp(0));
        assert_eq!(t("2000-01-01T00:00:00.5Z"), Timestamp(500_000));
        assert_eq!(t("2000-01-01T00:00:00.0000005Z"), Timestamp(1));
        assert_eq!(t("2000-01-01T00:00:00.0000004999Z"), Timestamp(0));
        assert_eq!(t("1999-12-31T23:59:59.999999Z"), Timestamp(-1));
        assert_eq!(t("infinity"), Timestamp(i64::MAX));
        assert_eq!(t("-infinity"), Timestamp(i64::MIN));
        // 2026-11-28 03:50:37.409858 UTC, checked with Postgres:
        // select extract(epoch from '2026-11-28 03:50:37.409858+00'::timestamptz - '2000-01-01 00:00:00+00')
        assert_eq!(
            t("2026-11-28 03:50:37.409858+00"),
            Timestamp(849_153_037_409_858)
        );
        assert_eq!(
            t("2024-02-29T12:00:00Z").to_string(),
            "2024-02-29 12:00:00+00"
        );
        assert_eq!(
            t("0001-01-01T00:00:00Z").to_string(),
            "0001-01-01 00:00:00+00"
        );
        assert_eq!(
            t("9999-12-31T23:59:59.25+00:30:15").to_string(),
            "9999-12-31 23:29:44.25+00"
        );
        for s in [
            "2026-11-28 03:50:37.409858+00",
            "1970-01-01 00:00:00+00",
            "1900-03-01 12:34:56.000001+00",
        ] {
            assert_eq!(t(s).to_string(), s);
        }
        for bad in [
            "yesterday",
            "now",
            "today",
            "2026-12-01",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00",
            "2026-02-29T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:00:60Z",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00+16:00",
            "2026-12-01T10:00:00Z ",
            "0000-12-01T10:00:00Z",
            "2026-12-01T10:00:00 UTC",
            "Mon, 01 Dec 2026 10:00:00 GMT",
            "",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
