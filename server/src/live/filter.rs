//! Pure: a subscription's `where` clause.
//!
//! `{"work_id": "…", "kind": {"in": ["note", "highlight"]}, "page": null}`: each key a column, ANDed; a scalar
//! means equality, `{"in": [...]}` membership, `null` "is null". Values are compared as Postgres's text output of
//! the column's type, after canonicalising the client's values through Postgres itself at subscribe time
//! (`'0B7C…'::uuid::text` is lowercase), so the live path compares exactly what the snapshot query matched.
//! The owner is never part of it: every subscription is limited to the token's user on top of the filter.

use serde_json::Value;

/// One condition: the column's text must be one of `values` (`None` = SQL NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Column name.
    pub column: String,
    /// Accepted values (canonical text); `None` matches NULL.
    pub values: Vec<Option<String>>,
}

/// An AND of conditions; empty = every row of the user's table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The conditions.
    pub conditions: Vec<Condition>,
}

/// Why a `where` clause was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

/// Most values one `in` list may hold.
pub const MAX_IN_VALUES: usize = 1000;

impl Filter {
    /// Parses the client's JSON (values not yet canonical). `has_column` validates column names.
    pub fn parse(
        value: Option<&Value>,
        has_column: impl Fn(&str) -> bool,
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
        let mut conditions = Vec::with_capacity(obj.len());
        for (column, v) in obj {
            if !has_column(column) {
                return Err(FilterError(format!("unknown column `{column}` in `where`")));
            }
            if column == "owner_id" {
                return Err(FilterError(
                    "`owner_id` cannot be filtered: a subscription is always yours only".into(),
                ));
            }
            let values = match v {
                Value::Object(o) => {
                    let list = o
                        .get("in")
                        .and_then(Value::as_array)
                        .filter(|_| o.len() == 1)
                        .ok_or_else(|| {
                            FilterError(format!("`{column}`: use a value or {{\"in\": [...]}}"))
                        })?;
                    if list.len() > MAX_IN_VALUES {
                        return Err(FilterError(format!(
                            "`{column}`: at most {MAX_IN_VALUES} values in `in`"
                        )));
                    }
                    list.iter()
                        .map(|x| scalar_text(column, x))
                        .collect::<Result<Vec<_>, _>>()?
                }
                other => vec![scalar_text(column, other)?],
            };
            conditions.push(Condition {
                column: column.clone(),
                values,
            });
        }
        Ok(Self { conditions })
    }

    /// Whether a row matches. `get(column)` returns `None` when the row does not carry that column (e.g. an old
    /// key without it): then the answer is unknown (`None`).
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<Option<&'a str>>) -> Option<bool> {
        let mut unknown = false;
        for c in &self.conditions {
            match get(&c.column) {
                None => unknown = true,
                Some(v) => {
                    if !c.values.iter().any(|want| want.as_deref() == v) {
                        return Some(false);
                    }
                }
            }
        }
        if unknown { None } else { Some(true) }
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

    #[test]
    fn parses_equality_in_and_null() {
        let f = Filter::parse(
            Some(&json!({"work_id": "a", "kind": {"in": ["x", "y"]}, "page": null})),
            |_| true,
        )
        .unwrap();
        assert_eq!(f.conditions.len(), 3);
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
    }

    #[test]
    fn rejects_bad_clauses() {
        assert!(Filter::parse(Some(&json!([1])), |_| true).is_err());
        assert!(Filter::parse(Some(&json!({"nope": 1})), |c| c != "nope").is_err());
        assert!(Filter::parse(Some(&json!({"owner_id": "x"})), |_| true).is_err());
        assert!(Filter::parse(Some(&json!({"a": {"eq": 1}})), |_| true).is_err());
        assert!(Filter::parse(Some(&json!({"a": [1]})), |_| true).is_err());
        assert_eq!(Filter::parse(None, |_| true).unwrap(), Filter::default());
        assert_eq!(Filter::default().matches(|_| None), Some(true));
    }
}
