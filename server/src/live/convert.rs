//! Pure: Postgres text output -> JSON, identical for snapshot rows and live changes.
//!
//! Both paths see the same text: pgoutput v1 sends each value's text output, and snapshot queries select
//! `column::text` on connections with the same pinned DateStyle/IntervalStyle/extra_float_digits/bytea_output.
//! The type OID decides the JSON shape:
//!
//! | type | JSON |
//! |---|---|
//! | bool | `true` / `false` |
//! | int2, int4, int8, oid | number |
//! | float4, float8 | number (NaN / ±Infinity as strings) |
//! | json, jsonb | the JSON value itself |
//! | one-dimensional arrays | array of the element type's JSON |
//! | everything else (text, uuid, numeric, timestamps…) | string, exactly as Postgres prints it |
//!
//! numeric stays a string so no precision is lost in JavaScript.

use crate::db::pg_type::{self as oid, array_element};

/// Turns a buffer built by the writers here into a `String` without copying it. Only valid UTF-8 goes in (JSON
/// punctuation, escaped strings, and Postgres text, which the decoder checks); a lossy copy is the fallback.
pub fn into_string(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Appends `s` as a JSON string.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Most values (uuids, timestamps, names, ordinary text) need no escape: copied as they are, the same bytes
    // serde_json would write, without its per-character escape table walk and writer calls; anything else goes
    // through serde_json's escaper, straight into the buffer. The check is a fold without early exit, so it
    // compiles to a vector loop over the bytes.
    let needs_escape = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends the JSON for one value of type `type_oid` given its text output (`None` = SQL NULL).
pub fn write_value(out: &mut Vec<u8>, type_oid: u32, text: Option<&str>) {
    let Some(text) = text else {
        out.extend_from_slice(b"null");
        return;
    };
    match type_oid {
        oid::BOOL => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            if text.parse::<i64>().is_ok() {
                out.extend_from_slice(text.as_bytes());
            } else {
                write_json_str(out, text);
            }
        }
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(v) if v.is_finite() => out.extend_from_slice(text.as_bytes()),
            _ => write_json_str(out, text),
        },
        // Postgres's json/jsonb output is valid JSON already.
        oid::JSON | oid::JSONB => out.extend_from_slice(text.as_bytes()),
        other => match array_element(other)
            .and_then(|elem| parse_array(text).map(|items| (elem, items)))
        {
            Some((elem, items)) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_value(out, elem, item.as_deref());
                }
                out.push(b']');
            }
            None => write_json_str(out, text),
        },
    }
}

/// Appends a JSON object of `(name, type_oid, text)` columns.
pub fn write_row<'a>(
    out: &mut Vec<u8>,
    columns: impl Iterator<Item = (&'a str, u32, Option<&'a str>)>,
) {
    out.push(b'{');
    for (i, (name, type_oid, text)) in columns.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, name);
        out.push(b':');
        write_value(out, type_oid, text);
    }
    out.push(b'}');
}

/// SQL for the text of `expr` as the type's output function prints it: what pgoutput v1 sends for the same value,
/// so the snapshot and the live path render (and filters compare) identical text.
///
/// Not `expr::text`: a cast to text is the output function only for types without their own cast. `boolean::text`
/// is `true`/`false` where the output (and the stream) says `t`/`f` (so every `true` reached snapshot clients as
/// `false`, and a `{"favorite": true}` filter, canonicalised to `true`, never matched a live `t`); `bpchar::text`
/// drops the padding and `inet::text` adds the netmask likewise. `format('%s', …)` calls the output function for
/// any type; NULL stays NULL (format would print an empty string).
pub fn output_text_sql(expr: &str, type_oid: u32) -> String {
    match type_oid {
        // text: already its own output, and typed `text` (the snapshot reads every column as `text`).
        25 => expr.to_owned(),
        // varchar, name: the same characters as their output, but typed `varchar` / `name` until cast (left uncast,
        // one such column made every snapshot of its table fail). uuid, integers, floats, numeric, json(b),
        // timestamps, dates, arrays of these...: `::text` is the output function (no type-specific cast to text
        // exists for them) and cheaper than format().
        1043 | 19 | 2950 | 20 | 21 | 23 | 26 | 700 | 701 | 1700 | 114 | 3802 | 1082 | 1083
        | 1114 | 1184 | 1186 | 1009 | 1015 | 2951 | 1007 | 1016 | 1000 => format!("({expr})::text"),
        _ => format!("case when ({expr}) is null then null else format('%s', {expr}) end"),
    }
}

/// Parses a one-dimensional array literal such as `{a,"b c",NULL,"d\"e"}`. `None` for anything else
/// (multi-dimensional, explicit bounds), which is then sent as a string.
pub fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(items);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let item = if chars.peek() == Some(&'"') {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next()? {
                    '\\' => s.push(chars.next()?),
                    '"' => break,
                    c => s.push(c),
                }
            }
            Some(s)
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None; // nested array or stray quote
                }
                s.push(c);
                chars.next();
            }
            if s == "NULL" { None } else { Some(s) }
        };
        items.push(item);
        match chars.next() {
            None => return Some(items),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(type_oid: u32, text: Option<&str>) -> String {
        let mut out = Vec::new();
        write_value(&mut out, type_oid, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain",
            "2f1c0b9e-8d7a-4c3b-9e21-0a1b2c3d4e5f",
            "quote \" inside",
            "back\\slash",
            "tab\tand\nnewline",
            "\u{1}control",
            "del \u{7f} and ünïcödé ✓",
        ] {
            let mut out = Vec::new();
            write_json_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(json(16, Some("t")), "true");
        assert_eq!(json(16, Some("f")), "false");
        assert_eq!(json(23, Some("-42")), "-42");
        assert_eq!(json(701, Some("1.5")), "1.5");
        assert_eq!(json(701, Some("NaN")), "\"NaN\"");
        assert_eq!(json(701, Some("Infinity")), "\"Infinity\"");
        assert_eq!(json(3802, Some("{\"a\": [1, 2]}")), "{\"a\": [1, 2]}");
        assert_eq!(
            json(2950, Some("0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01")),
            "\"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01\""
        );
        assert_eq!(json(25, Some("say \"hi\"\n")), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(
            json(1700, Some("3.14159265358979323846")),
            "\"3.14159265358979323846\""
        );
        assert_eq!(json(25, None), "null");
    }

    #[test]
    fn arrays() {
        assert_eq!(json(1009, Some("{}")), "[]");
        assert_eq!(
            json(1009, Some("{a,\"b c\",NULL,\"d\\\"e\",\"NULL\"}")),
            "[\"a\",\"b c\",null,\"d\\\"e\",\"NULL\"]"
        );
        assert_eq!(json(1007, Some("{1,2,3}")), "[1,2,3]");
        assert_eq!(json(1007, Some("{{1,2},{3,4}}")), "\"{{1,2},{3,4}}\"");
        assert_eq!(
            json(1009, Some("{\"unterminated}")),
            "\"{\\\"unterminated}\""
        );
    }

    #[test]
    fn rows() {
        let mut out = Vec::new();
        write_row(
            &mut out,
            [("id", 23, Some("1")), ("t", 25, None)].into_iter(),
        );
        assert_eq!(String::from_utf8(out).unwrap(), "{\"id\":1,\"t\":null}");
    }
}
