//! Pure: a subscription's filter, one predicate model for both transports.
//!
//! - The WebSocket's JSON form, `{"work_id": "…", "kind": {"in": ["note", "highlight"]}, "page": null}` (each key a
//!   column, ANDed; a scalar means equality, `{"in": [...]}` membership, `null` "is null"), is parsed here.
//! - The HTTP shape endpoint's SQL `where` is parsed by `where_sql.rs` into the same [`Expr`].
//!
//! A filter is used twice, and both uses must agree exactly: as SQL for the snapshot query ([`Filter::to_sql`]), and
//! evaluated in Rust on every live change ([`Filter::matches`]). So:
//!
//! - Literal values are canonicalised through Postgres before use: cast to the column's type and printed back by
//!   its output function (`'0B7C…'::uuid` prints lower case, `'1.50'::numeric` keeps its scale), which validates
//!   them too. Live rows arrive as the same output (pgoutput's text), so both sides compare the same text.
//! - Comparisons follow the column's type ([`Kind`]): integers, floats and numerics numerically (NaN equal to
//!   itself and above everything, as in Postgres), dates and timestamps chronologically, uuids and booleans as
//!   their canonical text, text byte-wise — which the SQL side matches with `COLLATE "C"` on ordering
//!   comparisons (Electric compares text the same way). Types without an exact order in Rust (jsonb, arrays,
//!   intervals, …) allow only `=`, `<>`, `IN` and `IS [NOT] NULL`, compared as canonical text on both sides.
//! - SQL's three-valued logic: a comparison with NULL is unknown, `NOT unknown` is unknown, and a row matches only
//!   when the whole filter is true.
//!
//! The owner is never part of a filter's purpose: every subscription is limited to the token's user on top of it
//! (row-level security and `owner_id = $1` in the snapshot, the router on the live path).

use std::cmp::Ordering;

use serde_json::Value;

use super::convert::output_text_sql;
use crate::db::catalog::{Column, quote_ident};

/// Most values one `IN` list may hold.
pub const MAX_IN_VALUES: usize = 1000;

/// Words that Postgres's date and time input reads relative to the moment of the cast (`'yesterday'` is midnight
/// of the day before the casting transaction's).
const RELATIVE_TIME_WORDS: &[&str] = &["now", "today", "tomorrow", "yesterday"];

/// Whether `text`, a literal for a column of type `type_oid`, names a time relative to when it is cast. A filter's
/// literals are cast when it is compiled, and a shape's or a resumed subscription's definition is compiled again by
/// every request: such a literal would move under a live filter, so that its live changes and a new snapshot no
/// longer agree. Refused (docs/protocol.md, docs/electric.md).
pub fn is_relative_time(type_oid: u32, text: &str) -> bool {
    use crate::db::pg_type::{DATE, TIME, TIMESTAMP, TIMESTAMPTZ, TIMETZ};
    matches!(type_oid, DATE | TIME | TIMESTAMP | TIMESTAMPTZ | TIMETZ)
        && text.split(|c: char| !c.is_ascii_alphabetic()).any(|word| {
            RELATIVE_TIME_WORDS
                .iter()
                .any(|r| word.eq_ignore_ascii_case(r))
        })
}

/// How a column's values compare, from its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// int2, int4, int8, oid.
    Int,
    /// float4, float8.
    Float,
    /// numeric.
    Numeric,
    /// bool (`f` < `t`).
    Bool,
    /// text, varchar, name: byte-wise (C collation).
    Text,
    /// uuid: canonical lower-case text orders like the bytes.
    Uuid,
    /// date, timestamp, timestamptz (ISO output, UTC).
    Temporal,
    /// Anything else: equality of canonical text only.
    Other,
}

impl Kind {
    /// The kind of type `type_oid`.
    pub fn of(type_oid: u32) -> Self {
        match type_oid {
            20 | 21 | 23 | 26 => Self::Int,
            700 | 701 => Self::Float,
            1700 => Self::Numeric,
            16 => Self::Bool,
            25 | 1043 | 19 => Self::Text,
            2950 => Self::Uuid,
            1082 | 1114 | 1184 => Self::Temporal,
            _ => Self::Other,
        }
    }

    /// Whether `<`, `<=`, `>`, `>=` are supported.
    pub fn ordered(self) -> bool {
        self != Self::Other
    }

    /// Compares two canonical texts of this kind (`None`: one of them does not parse).
    pub fn compare(self, a: &str, b: &str) -> Option<Ordering> {
        match self {
            Self::Int => Some(a.parse::<i64>().ok()?.cmp(&b.parse::<i64>().ok()?)),
            Self::Float => Some(float_cmp(a.parse().ok()?, b.parse().ok()?)),
            Self::Numeric => numeric_cmp(a, b),
            Self::Temporal => Some(temporal_key(a)?.cmp(&temporal_key(b)?)),
            Self::Bool | Self::Text | Self::Uuid | Self::Other => {
                Some(a.as_bytes().cmp(b.as_bytes()))
            }
        }
    }
}

/// Postgres's float order: NaN equals NaN and is above everything; -0 equals 0.
fn float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Compares two numeric outputs exactly (no float rounding): `NaN` above everything, then `Infinity`.
fn numeric_cmp(a: &str, b: &str) -> Option<Ordering> {
    fn rank(s: &str) -> Option<i8> {
        Some(match s {
            "NaN" => 3,
            "Infinity" => 2,
            "-Infinity" => 0,
            _ => 1,
        })
    }
    let (ra, rb) = (rank(a)?, rank(b)?);
    if ra != 1 || rb != 1 {
        return Some(ra.cmp(&rb));
    }
    let parse = |s: &str| -> Option<(bool, String, String)> {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty()
            || !int.bytes().all(|c| c.is_ascii_digit())
            || !frac.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let int = int.trim_start_matches('0').to_owned();
        let frac = frac.trim_end_matches('0').to_owned();
        let zero = int.is_empty() && frac.is_empty();
        Some((neg && !zero, int, frac))
    };
    let (na, ia, fa) = parse(a)?;
    let (nb, ib, fb) = parse(b)?;
    let magnitude = ia
        .len()
        .cmp(&ib.len())
        .then_with(|| ia.cmp(&ib))
        .then_with(|| fa.cmp(&fb));
    Some(match (na, nb) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
    })
}

/// A sortable key for a date or timestamp printed with DateStyle ISO in UTC (`2026-11-28 04:20:31.414569+00`,
/// `0044-03-15 BC`, `infinity`). Past the year, the fixed-width ISO text sorts like the time it names (`31+00`
/// before `31.4+00`: `+` sorts before `.`).
fn temporal_key(s: &str) -> Option<(i8, i64, &str)> {
    match s {
        "-infinity" => return Some((0, 0, "")),
        "infinity" => return Some((2, 0, "")),
        _ => {}
    }
    let (body, bc) = match s.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (s, false),
    };
    let dash = body.find('-')?;
    let year: i64 = body[..dash].parse().ok()?;
    // Year 1 BC is astronomical year 0.
    let year = if bc { 1 - year } else { year };
    Some((1, year, &body[dash..]))
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`.
    Eq,
    /// `<>` / `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            Self::Eq => "=",
            Self::Ne => "<>",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
        }
    }

    /// The operator with its operands swapped (`1 < x` is `x > 1`).
    pub fn flipped(self) -> Self {
        match self {
            Self::Lt => Self::Gt,
            Self::Le => Self::Ge,
            Self::Gt => Self::Lt,
            Self::Ge => Self::Le,
            other => other,
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Self::Eq => o == Ordering::Equal,
            Self::Ne => o != Ordering::Equal,
            Self::Lt => o == Ordering::Less,
            Self::Le => o != Ordering::Greater,
            Self::Gt => o == Ordering::Greater,
            Self::Ge => o != Ordering::Less,
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, Self::Eq | Self::Ne)
    }
}

/// A column a filter refers to, with what comparing and casting it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Col {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// `format_type()` of the column (for casts in SQL).
    pub type_name: String,
    /// How its values compare.
    pub kind: Kind,
}

impl Col {
    /// From a catalog column.
    pub fn of(c: &Column) -> Self {
        Self {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_name: c.type_name.clone(),
            kind: Kind::of(c.type_oid),
        }
    }
}

/// A predicate over one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// All of them (an empty list is true).
    And(Vec<Expr>),
    /// Any of them (an empty list is false).
    Or(Vec<Expr>),
    /// Negation (unknown stays unknown).
    Not(Box<Expr>),
    /// `column op value`; a `None` value is the NULL literal (always unknown).
    Cmp {
        /// The column.
        column: Col,
        /// The operator.
        op: CmpOp,
        /// The literal (canonical text once canonicalised).
        value: Option<String>,
    },
    /// `column IN (values)` with SQL's semantics: a NULL in the list makes a non-match unknown.
    In {
        /// The column.
        column: Col,
        /// The literals.
        values: Vec<Option<String>>,
    },
    /// `column IS [NOT] NULL`.
    IsNull {
        /// The column.
        column: Col,
        /// `IS NOT NULL`.
        negated: bool,
    },
}

impl Expr {
    fn retained_bytes(&self) -> usize {
        const STRING: usize = std::mem::size_of::<Option<String>>();
        let node = std::mem::size_of::<Expr>();
        let col = |c: &Col| c.name.len() + c.type_name.len() + 2 * STRING;
        node + match self {
            Self::And(list) | Self::Or(list) => list.iter().map(Self::retained_bytes).sum(),
            Self::Not(inner) => inner.retained_bytes(),
            Self::Cmp { column, value, .. } => col(column) + value.as_ref().map_or(0, String::len),
            Self::In { column, values } => {
                col(column)
                    + values
                        .iter()
                        .map(|v| STRING + v.as_ref().map_or(0, String::len))
                        .sum::<usize>()
            }
            Self::IsNull { column, .. } => col(column),
        }
    }
}

/// SQL's truth values, plus "the row does not carry this column" (an old row without full replica identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    True,
    False,
    /// SQL NULL.
    Unknown,
    /// A column the row does not carry.
    Missing,
}

impl Truth {
    fn from_bool(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }

    fn not(self) -> Self {
        match self {
            Self::True => Self::False,
            Self::False => Self::True,
            other => other,
        }
    }
}

impl Expr {
    fn eval<'a>(&self, get: &impl Fn(&str) -> Option<Option<&'a str>>) -> Truth {
        match self {
            Self::And(parts) => {
                let mut acc = Truth::True;
                for p in parts {
                    match p.eval(get) {
                        Truth::False => return Truth::False,
                        Truth::Missing => acc = Truth::Missing,
                        Truth::Unknown if acc == Truth::True => acc = Truth::Unknown,
                        _ => {}
                    }
                }
                acc
            }
            Self::Or(parts) => {
                let mut acc = Truth::False;
                for p in parts {
                    match p.eval(get) {
                        Truth::True => return Truth::True,
                        Truth::Missing => acc = Truth::Missing,
                        Truth::Unknown if acc == Truth::False => acc = Truth::Unknown,
                        _ => {}
                    }
                }
                acc
            }
            Self::Not(inner) => inner.eval(get).not(),
            Self::IsNull { column, negated } => match get(&column.name) {
                None => Truth::Missing,
                Some(v) => Truth::from_bool(v.is_none() != *negated),
            },
            Self::Cmp { column, op, value } => match get(&column.name) {
                None => Truth::Missing,
                Some(None) => Truth::Unknown,
                Some(Some(have)) => match value {
                    None => Truth::Unknown,
                    Some(want) => match column.kind.compare(have, want) {
                        Some(o) => Truth::from_bool(op.holds(o)),
                        None => Truth::Unknown,
                    },
                },
            },
            Self::In { column, values } => match get(&column.name) {
                None => Truth::Missing,
                Some(None) => Truth::Unknown,
                Some(Some(have)) => {
                    let mut acc = Truth::False;
                    for v in values {
                        match v {
                            None => acc = Truth::Unknown,
                            Some(want) => {
                                if column.kind.compare(have, want) == Some(Ordering::Equal) {
                                    return Truth::True;
                                }
                            }
                        }
                    }
                    acc
                }
            },
        }
    }

    fn literals<'s>(&'s self, out: &mut Vec<(&'s Col, &'s str)>) {
        match self {
            Self::And(parts) | Self::Or(parts) => parts.iter().for_each(|p| p.literals(out)),
            Self::Not(inner) => inner.literals(out),
            Self::IsNull { .. } => {}
            Self::Cmp { column, value, .. } => {
                if let Some(v) = value {
                    out.push((column, v));
                }
            }
            Self::In { column, values } => {
                for v in values.iter().flatten() {
                    out.push((column, v));
                }
            }
        }
    }

    fn literals_mut<'s>(&'s mut self, out: &mut Vec<(&'s Col, &'s mut String)>) {
        match self {
            Self::And(parts) | Self::Or(parts) => {
                parts.iter_mut().for_each(|p| p.literals_mut(out))
            }
            Self::Not(inner) => inner.literals_mut(out),
            Self::IsNull { .. } => {}
            Self::Cmp { column, value, .. } => {
                if let Some(v) = value.as_mut() {
                    out.push((&*column, v));
                }
            }
            Self::In { column, values } => {
                for v in values.iter_mut().flatten() {
                    out.push((&*column, v));
                }
            }
        }
    }

    fn write_sql(&self, sql: &mut String, params: &mut Vec<SqlParam>, first: usize) {
        let next = |params: &Vec<SqlParam>| params.len() + first;
        match self {
            Self::And(parts) | Self::Or(parts) => {
                if parts.is_empty() {
                    sql.push_str(if matches!(self, Self::And(_)) {
                        "true"
                    } else {
                        "false"
                    });
                    return;
                }
                let joiner = if matches!(self, Self::And(_)) {
                    " and "
                } else {
                    " or "
                };
                sql.push('(');
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(joiner);
                    }
                    p.write_sql(sql, params, first);
                }
                sql.push(')');
            }
            Self::Not(inner) => {
                sql.push_str("(not ");
                inner.write_sql(sql, params, first);
                sql.push(')');
            }
            Self::IsNull { column, negated } => {
                sql.push_str(&format!(
                    "({} is {}null)",
                    quote_ident(&column.name),
                    if *negated { "not " } else { "" }
                ));
            }
            Self::Cmp { column, op, value } => {
                let Some(value) = value else {
                    sql.push_str("null::boolean");
                    return;
                };
                let n = next(params);
                params.push(SqlParam::Text(value.clone()));
                let ident = quote_ident(&column.name);
                if column.kind == Kind::Other {
                    // Canonical text on both sides, exactly what the live path compares.
                    sql.push_str(&format!(
                        "({} {} ${n}::text)",
                        output_text_sql(&ident, column.type_oid),
                        op.sql()
                    ));
                } else {
                    let collate = if column.kind == Kind::Text && op.is_ordering() {
                        " collate \"C\""
                    } else {
                        ""
                    };
                    sql.push_str(&format!(
                        "({ident} {} ${n}::text::{}{collate})",
                        op.sql(),
                        column.type_name
                    ));
                }
            }
            Self::In { column, values } => {
                if values.is_empty() {
                    sql.push_str("false");
                    return;
                }
                let n = next(params);
                params.push(SqlParam::List(values.clone()));
                let ident = quote_ident(&column.name);
                if column.kind == Kind::Other {
                    sql.push_str(&format!(
                        "({} = any(${n}::text[]))",
                        output_text_sql(&ident, column.type_oid)
                    ));
                } else {
                    sql.push_str(&format!(
                        "({ident} = any(${n}::text[]::{}[]))",
                        column.type_name
                    ));
                }
            }
        }
    }

    fn canonical_text(&self, out: &mut String) {
        // A stable rendering of the predicate (after canonicalisation): the shape endpoint's definition hash.
        match self {
            Self::And(parts) | Self::Or(parts) => {
                out.push_str(if matches!(self, Self::And(_)) {
                    "and("
                } else {
                    "or("
                });
                for p in parts {
                    p.canonical_text(out);
                    out.push(',');
                }
                out.push(')');
            }
            Self::Not(inner) => {
                out.push_str("not(");
                inner.canonical_text(out);
                out.push(')');
            }
            Self::IsNull { column, negated } => {
                out.push_str(&format!("isnull({:?},{negated})", column.name));
            }
            Self::Cmp { column, op, value } => {
                out.push_str(&format!("cmp({:?},{op:?},{value:?})", column.name));
            }
            Self::In { column, values } => {
                out.push_str(&format!("in({:?},{values:?})", column.name))
            }
        }
    }
}

/// A bind parameter of the filter's SQL: a text value, or a text array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlParam {
    /// A literal (`$n::text::<type>`).
    Text(String),
    /// An `IN` list (`$n::text[]::<type>[]`); `None` is NULL.
    List(Vec<Option<String>>),
}

/// A subscription's filter; empty = every row of the user's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Boxed: a filter is part of every subscription (one per connection, mostly idle, most without a filter).
    expr: Option<Box<Expr>>,
    canonical: bool,
}

/// Why a `where` clause was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

impl Filter {
    /// A filter from a predicate (values not yet canonical).
    pub fn from_expr(expr: Expr) -> Self {
        Self {
            expr: Some(Box::new(expr)),
            canonical: false,
        }
    }

    /// About how many bytes of memory the filter holds (its literals, column descriptions and nodes): what a
    /// subscription is charged against its user's `--max-filter-bytes-per-user`. 0 for no filter.
    pub fn retained_bytes(&self) -> usize {
        self.expr.as_deref().map_or(0, Expr::retained_bytes)
    }

    /// Parses the WebSocket's JSON form (values not yet canonical). `column` finds a column of the table.
    pub fn parse<'c>(
        value: Option<&Value>,
        column: impl Fn(&str) -> Option<&'c Column>,
    ) -> Result<Self, FilterError> {
        let Some(value) = value else {
            return Ok(Self::default());
        };
        if value.is_null() {
            return Ok(Self::default());
        }
        let obj = value
            .as_object()
            .ok_or_else(|| FilterError("`where` must be an object".into()))?;
        let mut parts = Vec::with_capacity(obj.len());
        for (name, v) in obj {
            let Some(col) = column(name) else {
                return Err(FilterError(format!("unknown column `{name}` in `where`")));
            };
            if name == "owner_id" {
                return Err(FilterError(
                    "`owner_id` cannot be filtered: a subscription is always yours only".into(),
                ));
            }
            let col = Col::of(col);
            let values = match v {
                Value::Null => {
                    parts.push(Expr::IsNull {
                        column: col,
                        negated: false,
                    });
                    continue;
                }
                Value::Object(o) => {
                    let list = o
                        .get("in")
                        .and_then(Value::as_array)
                        .filter(|_| o.len() == 1)
                        .ok_or_else(|| {
                            FilterError(format!("`{name}`: use a value or {{\"in\": [...]}}"))
                        })?;
                    if list.len() > MAX_IN_VALUES {
                        return Err(FilterError(format!(
                            "`{name}`: at most {MAX_IN_VALUES} values in `in`"
                        )));
                    }
                    list.iter()
                        .map(|x| scalar_text(name, x))
                        .collect::<Result<Vec<_>, _>>()?
                }
                other => {
                    parts.push(match scalar_text(name, other)? {
                        Some(text) => Expr::Cmp {
                            column: col,
                            op: CmpOp::Eq,
                            value: Some(text),
                        },
                        None => Expr::IsNull {
                            column: col,
                            negated: false,
                        },
                    });
                    continue;
                }
            };
            // The JSON form's `null` inside an `in` list matches NULL (unlike SQL's IN).
            let has_null = values.iter().any(Option::is_none);
            let in_list = Expr::In {
                column: col.clone(),
                values: values.into_iter().filter(Option::is_some).collect(),
            };
            parts.push(if has_null {
                Expr::Or(vec![
                    in_list,
                    Expr::IsNull {
                        column: col,
                        negated: false,
                    },
                ])
            } else {
                in_list
            });
        }
        Ok(if parts.is_empty() {
            Self::default()
        } else {
            Self::from_expr(Expr::And(parts))
        })
    }

    /// The predicate (`None`: every row).
    pub fn expr(&self) -> Option<&Expr> {
        self.expr.as_deref()
    }

    /// Whether the values were canonicalised through Postgres already.
    pub fn is_canonical(&self) -> bool {
        self.canonical || self.expr.is_none()
    }

    /// Whether a row matches. `get(column)` returns `None` when the row does not carry that column (e.g. an old
    /// key without it): then, unless the rest decides, the answer is unknown (`None`).
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<Option<&'a str>>) -> Option<bool> {
        let Some(expr) = &self.expr else {
            return Some(true);
        };
        match expr.eval(&get) {
            Truth::True => Some(true),
            Truth::False | Truth::Unknown => Some(false),
            Truth::Missing => None,
        }
    }

    /// The literals to canonicalise, grouped by the column type they are cast to: `(type name, type OID, texts)`.
    pub fn literals_by_type(&self) -> Vec<(String, u32, Vec<String>)> {
        let mut lits = Vec::new();
        if let Some(e) = &self.expr {
            e.literals(&mut lits);
        }
        let mut groups: Vec<(String, u32, Vec<String>)> = Vec::new();
        for (col, text) in lits {
            match groups.iter_mut().find(|g| g.0 == col.type_name) {
                Some(g) => g.2.push(text.to_owned()),
                None => groups.push((col.type_name.clone(), col.type_oid, vec![text.to_owned()])),
            }
        }
        groups
    }

    /// The filter with its literals replaced by `canonical` (the texts of [`Filter::literals_by_type`], each group
    /// cast and printed by Postgres, in the same order).
    pub fn with_canonical(&self, canonical: &[Vec<String>]) -> Result<Self, FilterError> {
        let mut expr = self.expr.clone();
        let mut lits = Vec::new();
        if let Some(e) = expr.as_mut() {
            e.literals_mut(&mut lits);
        }
        let mut types: Vec<String> = Vec::new();
        let mut used: Vec<usize> = Vec::new();
        for (col, text) in lits {
            let g = match types.iter().position(|t| *t == col.type_name) {
                Some(g) => g,
                None => {
                    types.push(col.type_name.clone());
                    used.push(0);
                    types.len() - 1
                }
            };
            let value = canonical
                .get(g)
                .and_then(|group| group.get(used[g]))
                .ok_or_else(|| FilterError("canonicalisation returned too few values".into()))?;
            used[g] += 1;
            *text = value.clone();
        }
        Ok(Self {
            expr,
            canonical: true,
        })
    }

    /// The filter as SQL with bind parameters numbered from `$first` (`true` for an empty filter).
    pub fn to_sql(&self, first: usize) -> (String, Vec<SqlParam>) {
        let mut sql = String::new();
        let mut params = Vec::new();
        match &self.expr {
            None => sql.push_str("true"),
            Some(e) => e.write_sql(&mut sql, &mut params, first),
        }
        (sql, params)
    }

    /// A stable text of the predicate, for comparing definitions.
    pub fn canonical_text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.expr {
            e.canonical_text(&mut out);
        }
        out
    }
}

fn scalar_text(column: &str, v: &Value) -> Result<Option<String>, FilterError> {
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(FilterError(format!(
                "`{column}`: values must be strings, numbers, booleans or null"
            )));
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(name: &str, type_oid: u32, type_name: &str) -> Column {
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

    fn columns() -> Vec<Column> {
        vec![
            col("work_id", 2950, "uuid"),
            col("kind", 25, "text"),
            col("page", 23, "integer"),
            col("owner_id", 2950, "uuid"),
            col("tags", 1009, "text[]"),
        ]
    }

    #[test]
    fn relative_time_words_are_found_in_time_literals_only() {
        use crate::db::pg_type::{DATE, INT4, TEXT, TIME, TIMESTAMP, TIMESTAMPTZ};
        for (oid, text) in [
            (TIMESTAMPTZ, "yesterday"),
            (TIMESTAMPTZ, "NOW"),
            (DATE, "today"),
            (TIMESTAMP, "tomorrow 10:00"),
            (TIME, "now"),
            (TIMESTAMPTZ, " Yesterday+01"),
        ] {
            assert!(is_relative_time(oid, text), "{oid} {text}");
        }
        for (oid, text) in [
            (TIMESTAMPTZ, "2026-12-01 10:00:00+00"),
            (TIMESTAMPTZ, "infinity"),
            (TIMESTAMPTZ, "epoch"),
            (TIMESTAMPTZ, "2026-12-01 10:00 America/Noronha"),
            (TEXT, "yesterday"),
            (INT4, "now"),
        ] {
            assert!(!is_relative_time(oid, text), "{oid} {text}");
        }
    }

    fn parse(v: Value) -> Result<Filter, FilterError> {
        let cols = columns();
        let f = Filter::parse(Some(&v), |n| cols.iter().find(|c| c.name == n))?;
        Ok(f)
    }

    #[test]
    fn parses_equality_in_and_null() {
        let f = parse(json!({"work_id": "a", "kind": {"in": ["x", "y"]}, "page": null})).unwrap();
        let row = |k: &str| -> Option<Option<&str>> {
            match k {
                "work_id" => Some(Some("a")),
                "kind" => Some(Some("y")),
                "page" => Some(None),
                _ => None,
            }
        };
        assert_eq!(f.matches(row), Some(true));
        let other = |k: &str| -> Option<Option<&str>> {
            if k == "kind" { Some(Some("z")) } else { row(k) }
        };
        assert_eq!(f.matches(other), Some(false));
        let partial = |k: &str| -> Option<Option<&str>> { if k == "kind" { None } else { row(k) } };
        assert_eq!(f.matches(partial), None);
        // `null` inside `in` matches NULL.
        let f = parse(json!({"page": {"in": [1, null]}})).unwrap();
        assert_eq!(f.matches(|_| Some(None)), Some(true));
        assert_eq!(f.matches(|_| Some(Some("1"))), Some(true));
        assert_eq!(f.matches(|_| Some(Some("2"))), Some(false));
        assert_eq!(
            parse(json!({"page": {"in": []}}))
                .unwrap()
                .matches(|_| Some(Some("1"))),
            Some(false)
        );
    }

    #[test]
    fn rejects_bad_clauses() {
        assert!(parse(json!([1])).is_err());
        assert!(parse(json!({"nope": 1})).is_err());
        assert!(parse(json!({"owner_id": "x"})).is_err());
        assert!(parse(json!({"kind": {"eq": 1}})).is_err());
        assert!(parse(json!({"kind": [1]})).is_err());
        assert_eq!(Filter::parse(None, |_| None).unwrap(), Filter::default());
        assert_eq!(Filter::default().matches(|_| None), Some(true));
    }

    #[test]
    fn typed_comparisons() {
        use Ordering::*;
        assert_eq!(Kind::Int.compare("10", "9"), Some(Greater));
        assert_eq!(Kind::Text.compare("10", "9"), Some(Less));
        assert_eq!(Kind::Float.compare("-0", "0"), Some(Equal));
        assert_eq!(Kind::Float.compare("NaN", "Infinity"), Some(Greater));
        assert_eq!(Kind::Float.compare("NaN", "NaN"), Some(Equal));
        assert_eq!(Kind::Numeric.compare("1.50", "1.5"), Some(Equal));
        assert_eq!(Kind::Numeric.compare("-2.1", "-2.05"), Some(Less));
        assert_eq!(Kind::Numeric.compare("10", "9.999"), Some(Greater));
        assert_eq!(Kind::Numeric.compare("0.000", "-0"), Some(Equal));
        assert_eq!(Kind::Numeric.compare("NaN", "Infinity"), Some(Greater));
        assert_eq!(Kind::Numeric.compare("-Infinity", "-99999"), Some(Less));
        assert_eq!(
            Kind::Temporal.compare("2026-11-28 04:20:31+00", "2026-11-28 04:20:31.4+00"),
            Some(Less)
        );
        assert_eq!(
            Kind::Temporal.compare("0044-03-15 BC", "0001-01-01"),
            Some(Less)
        );
        assert_eq!(
            Kind::Temporal.compare("0002-01-01 BC", "0001-01-01 BC"),
            Some(Less)
        );
        assert_eq!(
            Kind::Temporal.compare("infinity", "12026-01-01"),
            Some(Greater)
        );
        assert_eq!(
            Kind::Temporal.compare("12026-01-01", "9999-12-31"),
            Some(Greater)
        );
        assert_eq!(Kind::Int.compare("x", "1"), None);
    }

    #[test]
    fn three_valued_logic() {
        let page = Col::of(&col("page", 23, "integer"));
        let lt5 = Expr::Cmp {
            column: page.clone(),
            op: CmpOp::Lt,
            value: Some("5".into()),
        };
        let null_page = |_: &str| -> Option<Option<&str>> { Some(None) };
        // NOT (page < 5) with page NULL: unknown, so no match either way.
        assert_eq!(
            Filter::from_expr(lt5.clone()).matches(null_page),
            Some(false)
        );
        assert_eq!(
            Filter::from_expr(Expr::Not(Box::new(lt5.clone()))).matches(null_page),
            Some(false)
        );
        // IN with a NULL element: unknown unless a value matches.
        let in_null = Expr::In {
            column: page.clone(),
            values: vec![Some("1".into()), None],
        };
        assert_eq!(
            Filter::from_expr(in_null.clone()).matches(|_| Some(Some("1"))),
            Some(true)
        );
        assert_eq!(
            Filter::from_expr(Expr::Not(Box::new(in_null))).matches(|_| Some(Some("2"))),
            Some(false)
        );
        // OR: true wins over unknown.
        let or = Expr::Or(vec![
            lt5,
            Expr::IsNull {
                column: page,
                negated: false,
            },
        ]);
        assert_eq!(Filter::from_expr(or).matches(null_page), Some(true));
    }

    #[test]
    fn sql_and_canonical_values() {
        let f = parse(json!({"work_id": "0B7C", "page": {"in": [1, 2]}, "tags": "{a}"})).unwrap();
        assert!(!f.is_canonical());
        let groups = f.literals_by_type();
        // JSON objects iterate in key order.
        assert_eq!(
            groups,
            vec![
                ("integer".into(), 23, vec!["1".into(), "2".into()]),
                ("text[]".into(), 1009, vec!["{a}".into()]),
                ("uuid".into(), 2950, vec!["0B7C".into()]),
            ]
        );
        let canonical = f
            .with_canonical(&[
                vec!["1".into(), "2".into()],
                vec!["{a}".into()],
                vec!["0b7c".into()],
            ])
            .unwrap();
        assert!(canonical.is_canonical());
        let (sql, params) = canonical.to_sql(2);
        assert_eq!(
            sql,
            "((\"page\" = any($2::text[]::integer[])) and ((\"tags\")::text = $3::text) and (\"work_id\" = $4::text::uuid))"
        );
        assert_eq!(
            params,
            vec![
                SqlParam::List(vec![Some("1".into()), Some("2".into())]),
                SqlParam::Text("{a}".into()),
                SqlParam::Text("0b7c".into()),
            ]
        );
        assert!(f.with_canonical(&[]).is_err());
        assert_eq!(Filter::default().to_sql(2).0, "true");
    }
}
