//! Pure: the shape endpoint's SQL `where` (Electric's `where` + `params[n]`) parsed into the filter model.
//!
//! `sqlparser` (PostgreSQL dialect) parses the text; this module accepts only this grammar and refuses everything
//! else with a message (a 400 for the client, never a 500):
//!
//! ```text
//! expr  := expr AND expr | expr OR expr | NOT expr | ( expr )
//!        | col op value | value op col          op: = <> != < <= > >=
//!        | col [NOT] IN ( value, … )            at most 1000 values
//!        | col IS [NOT] NULL
//!        | col                                  a boolean column (`col = true`)
//! col   := name | "quoted name"                 bare names fold to lower case, as in Postgres
//! value := 'text' ('' escapes) | number | -number | true | false | NULL | $n (params[n])
//! ```
//!
//! Values are never pasted into SQL: they become bind parameters, cast to the column's type by Postgres
//! (filter.rs). Ordering comparisons need a column type with an exact order on both sides (filter.rs, [`Kind`]).

use std::collections::BTreeMap;

use sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, Ident, InTarget, UnaryOperator, Value as SqlValue,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use super::filter::{CmpOp, Col, Expr, Filter, FilterError, Kind, MAX_IN_VALUES};
use crate::db::catalog::Column;

/// Longest `where` accepted, in bytes.
pub const MAX_WHERE_BYTES: usize = 16 * 1024;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 50;

/// Parses `sql` with `params` (`params[n]` = the value of `$n`) against the table's columns.
pub fn parse_where<'c>(
    sql: &str,
    params: &BTreeMap<usize, String>,
    column: impl Fn(&str) -> Option<&'c Column>,
) -> Result<Filter, FilterError> {
    if sql.len() > MAX_WHERE_BYTES {
        return Err(FilterError(format!(
            "`where` is longer than {MAX_WHERE_BYTES} bytes"
        )));
    }
    if sql.trim().is_empty() {
        return Ok(Filter::default());
    }
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(MAX_DEPTH)
        .try_with_sql(sql)
        .map_err(|e| FilterError(format!("`where` is not valid SQL: {e}")))?;
    let parsed = parser
        .parse_expr()
        .map_err(|e| FilterError(format!("`where` is not valid SQL: {e}")))?;
    let rest = parser.peek_token();
    if rest.token != Token::EOF {
        return Err(FilterError(format!(
            "`where` must be one boolean expression; unexpected `{}`",
            rest.token
        )));
    }
    let mut b = Builder {
        params,
        column: &column,
        values: 0,
    };
    Ok(Filter::from_expr(b.predicate(&parsed)?))
}

struct Builder<'a, F> {
    params: &'a BTreeMap<usize, String>,
    column: &'a F,
    values: usize,
}

impl<'a, 'c, F: Fn(&str) -> Option<&'c Column>> Builder<'a, F> {
    fn predicate(&mut self, e: &SqlExpr) -> Result<Expr, FilterError> {
        match e {
            SqlExpr::Nested(inner) => self.predicate(inner),
            SqlExpr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => Ok(Expr::And(vec![
                    self.predicate(left)?,
                    self.predicate(right)?,
                ])),
                BinaryOperator::Or => Ok(Expr::Or(vec![
                    self.predicate(left)?,
                    self.predicate(right)?,
                ])),
                other => {
                    let op = match other {
                        BinaryOperator::Eq => CmpOp::Eq,
                        BinaryOperator::NotEq => CmpOp::Ne,
                        BinaryOperator::Lt => CmpOp::Lt,
                        BinaryOperator::LtEq => CmpOp::Le,
                        BinaryOperator::Gt => CmpOp::Gt,
                        BinaryOperator::GtEq => CmpOp::Ge,
                        other => return Err(unsupported(&format!("the operator `{other}`"))),
                    };
                    self.comparison(left, op, right)
                }
            },
            SqlExpr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => Ok(Expr::Not(Box::new(self.predicate(expr)?))),
            SqlExpr::IsNull(inner) | SqlExpr::IsNotNull(inner) => Ok(Expr::IsNull {
                column: self.column(inner)?,
                negated: matches!(e, SqlExpr::IsNotNull(_)),
            }),
            SqlExpr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let column = self.column(expr)?;
                if list.len() > MAX_IN_VALUES {
                    return Err(FilterError(format!(
                        "at most {MAX_IN_VALUES} values in an `IN` list"
                    )));
                }
                let values = list
                    .iter()
                    .map(|v| self.value(v))
                    .collect::<Result<Vec<_>, _>>()?;
                let in_list = Expr::In { column, values };
                Ok(if *negated {
                    Expr::Not(Box::new(in_list))
                } else {
                    in_list
                })
            }
            SqlExpr::Identifier(_) | SqlExpr::CompoundIdentifier(_) => {
                let column = self.column(e)?;
                if column.kind != Kind::Bool {
                    return Err(FilterError(format!(
                        "`{}` is not a boolean column; compare it with a value",
                        column.name
                    )));
                }
                Ok(Expr::Cmp {
                    column,
                    op: CmpOp::Eq,
                    value: Some("true".into()),
                })
            }
            other => Err(unsupported(&format!("`{other}`"))),
        }
    }

    fn comparison(
        &mut self,
        left: &SqlExpr,
        op: CmpOp,
        right: &SqlExpr,
    ) -> Result<Expr, FilterError> {
        let (column, op, value) = if is_column(left) {
            (self.column(left)?, op, self.value(right)?)
        } else if is_column(right) {
            (self.column(right)?, op.flipped(), self.value(left)?)
        } else {
            return Err(FilterError(
                "a comparison needs a column on one side and a value on the other".into(),
            ));
        };
        if op != CmpOp::Eq && op != CmpOp::Ne && !column.kind.ordered() {
            return Err(FilterError(format!(
                "`{}` ({}) supports only =, <>, IN and IS [NOT] NULL",
                column.name, column.type_name
            )));
        }
        Ok(Expr::Cmp { column, op, value })
    }

    fn column(&self, e: &SqlExpr) -> Result<Col, FilterError> {
        let ident = match e {
            SqlExpr::Nested(inner) => return self.column(inner),
            SqlExpr::Identifier(ident) => ident,
            SqlExpr::CompoundIdentifier(parts) => {
                return Err(FilterError(format!(
                    "`{}`: name columns without a table or schema",
                    parts
                        .iter()
                        .map(|p| p.value.as_str())
                        .collect::<Vec<_>>()
                        .join(".")
                )));
            }
            other => return Err(FilterError(format!("expected a column, found `{other}`"))),
        };
        let name = identifier(ident);
        (self.column)(&name)
            .map(Col::of)
            .ok_or_else(|| FilterError(format!("unknown column `{name}` in `where`")))
    }

    /// A literal or parameter as text (`None`: NULL).
    fn value(&mut self, e: &SqlExpr) -> Result<Option<String>, FilterError> {
        self.values += 1;
        if self.values > MAX_IN_VALUES * 2 {
            return Err(FilterError("too many values in `where`".into()));
        }
        match e {
            SqlExpr::Nested(inner) => self.value(inner),
            SqlExpr::Value(v) => match &v.value {
                SqlValue::SingleQuotedString(s) => Ok(Some(s.clone())),
                SqlValue::Number(n, _) => Ok(Some(n.clone())),
                SqlValue::Boolean(b) => Ok(Some(b.to_string())),
                SqlValue::Null => Ok(None),
                SqlValue::Placeholder(p) => {
                    let n: usize = p
                        .strip_prefix('$')
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| {
                            FilterError(format!("unsupported placeholder `{p}`; use $1, $2, …"))
                        })?;
                    self.params.get(&n).cloned().map(Some).ok_or_else(|| {
                        FilterError(format!("`where` uses ${n} but `params[{n}]` is missing"))
                    })
                }
                other => Err(unsupported(&format!("the value `{other}`"))),
            },
            SqlExpr::UnaryOp {
                op: op @ (UnaryOperator::Minus | UnaryOperator::Plus),
                expr,
            } => match &**expr {
                SqlExpr::Value(v) => match &v.value {
                    SqlValue::Number(n, _) => Ok(Some(if *op == UnaryOperator::Minus {
                        format!("-{n}")
                    } else {
                        n.clone()
                    })),
                    other => Err(unsupported(&format!("a sign before `{other}`"))),
                },
                other => Err(unsupported(&format!("a sign before `{other}`"))),
            },
            other => Err(FilterError(format!(
                "expected a value ('text', a number, true, false, NULL or $n), found `{other}`"
            ))),
        }
    }
}

fn is_column(e: &SqlExpr) -> bool {
    match e {
        SqlExpr::Nested(inner) => is_column(inner),
        SqlExpr::Identifier(_) | SqlExpr::CompoundIdentifier(_) => true,
        _ => false,
    }
}

/// A column name as Postgres resolves it: quoted names verbatim, bare names in lower case.
pub fn identifier(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn unsupported(what: &str) -> FilterError {
    FilterError(format!(
        "{what} is not supported in `where`: use comparisons (= <> < <= > >=), IN, IS [NOT] NULL, AND, OR, NOT \
         and parentheses over the table's columns"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> Vec<Column> {
        let col = |name: &str, type_oid, type_name: &str| Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid,
            base_type_oid: type_oid,
            not_null: false,
            generated: false,
            identity_always: false,
        };
        vec![
            col("title", 25, "text"),
            col("year", 23, "integer"),
            col("favorite", 16, "boolean"),
            col("owner_id", 2950, "uuid"),
            col("authors", 3802, "jsonb"),
            col("Mixed", 25, "text"),
        ]
    }

    fn parse(sql: &str, params: &[(usize, &str)]) -> Result<Filter, FilterError> {
        let cols = columns();
        let params: BTreeMap<usize, String> =
            params.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        parse_where(sql, &params, |n| cols.iter().find(|c| c.name == n))
    }

    fn row<'a>(
        pairs: &'a [(&'a str, Option<&'a str>)],
    ) -> impl Fn(&str) -> Option<Option<&'a str>> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
    }

    #[test]
    fn the_grammar() {
        let f = parse(
            r#"(year >= 2000 AND year < $1 OR "Mixed" = 'it''s') AND NOT favorite AND title IS NOT NULL AND TITLE IN ('a', 'b')"#,
            &[(1, "2020")],
        )
        .unwrap();
        let base = [
            ("year", Some("2010")),
            ("Mixed", Some("no")),
            ("favorite", Some("f")),
            ("title", Some("a")),
        ];
        assert_eq!(f.matches(row(&base)), Some(true));
        let mut r = base;
        r[0].1 = Some("2020");
        assert_eq!(f.matches(row(&r)), Some(false));
        r[1].1 = Some("it's");
        assert_eq!(f.matches(row(&r)), Some(true));
        r[3].1 = Some("c");
        assert_eq!(f.matches(row(&r)), Some(false));
        // Literal on the left flips the operator.
        let f = parse("2000 < year", &[]).unwrap();
        assert_eq!(f.matches(row(&[("year", Some("2001"))])), Some(true));
        assert_eq!(f.matches(row(&[("year", Some("1999"))])), Some(false));
        let f = parse("year <> -5 and title not in ('x')", &[]).unwrap();
        assert_eq!(
            f.matches(row(&[("year", Some("-4")), ("title", Some("y"))])),
            Some(true)
        );
        assert_eq!(parse("", &[]).unwrap(), Filter::default());
        // The owner may be named: the scope is added on top anyway.
        assert!(parse("owner_id = '00000000-0000-0000-0000-000000000001'", &[]).is_ok());
        // Equality on jsonb is fine, ordering is not.
        assert!(parse("authors = '[]'", &[]).is_ok());
    }

    #[test]
    fn outside_the_grammar_is_an_error() {
        for (sql, needle) in [
            ("nope = 1", "unknown column `nope`"),
            ("Mixed = 'x'", "unknown column `mixed`"),
            ("title = $2", "params[2]"),
            ("title LIKE 'a%'", "not supported"),
            ("year + 1 = 2", "column on one side"),
            ("title = upper('a')", "expected a value"),
            ("year = year", "expected a value"),
            ("authors < '[]'", "supports only"),
            ("title", "not a boolean column"),
            ("works.title = 'a'", "without a table"),
            ("title = 'a'; drop table works", "one boolean expression"),
            ("title = 'a' garbage", "one boolean expression"),
            ("(select true)", "not supported"),
            ("title = 'a", "not valid SQL"),
            ("year = 1::int", "expected a value"),
            ("title = $0", "placeholder"),
            ("year IN (select 1)", "not supported"),
        ] {
            let err = parse(sql, &[]).unwrap_err().0;
            assert!(err.contains(needle), "{sql}: {err}");
        }
        let deep = format!("{}true{}", "(".repeat(200), ")".repeat(200));
        assert!(parse(&deep, &[]).is_err());
        let long = format!("title IN ({})", vec!["'x'"; 1001].join(","));
        assert!(parse(&long, &[]).is_err());
    }
}
