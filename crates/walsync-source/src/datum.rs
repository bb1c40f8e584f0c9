//! Turns PostgreSQL's text output of a column into a typed [`Value`].
//!
//! Both the replication stream and the initial copy read values in text form under the same
//! session settings ([`crate::connect::SESSION_OPTIONS`]: ISO dates in UTC, hex `bytea`,
//! shortest-exact floats), so a value decodes to the same [`Value`] whichever way it came.

mod array;

use tokio_postgres::types::{Kind, Type};
use walsync_types::Value;

use crate::codec::TupleValue;

/// A column of a decoded row: a value, or "unchanged" for a TOASTed column an UPDATE did not
/// touch (the stored copy of the row has its value).
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Value(Value),
    UnchangedToast,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column of type {type_name} has a value that is not valid {type_name} text")]
pub struct DatumError {
    pub type_name: String,
}

/// Decodes one wire value of a column of type `type_oid`. Never fails: a value that does not
/// decode is kept as PostgreSQL's text, and the error says why (the caller logs it), so that no
/// value PostgreSQL stores can stop replication.
pub fn decode_tuple_value(type_oid: u32, v: &TupleValue) -> (Datum, Option<DatumError>) {
    match v {
        TupleValue::Null => (Datum::Value(Value::Null), None),
        TupleValue::UnchangedToast => (Datum::UnchangedToast, None),
        TupleValue::Text(b) => {
            let (v, e) = decode_text_or_keep(type_oid, b);
            (Datum::Value(v), e)
        }
        // walsync never asks pgoutput for binary values; keep them as bytes rather than fail.
        TupleValue::Binary(b) => (Datum::Value(Value::Bytes(b.to_vec())), None),
    }
}

/// [`decode_text`], or, for text that does not decode as its type, that text itself (as
/// PostgreSQL printed it) with the reason.
pub fn decode_text_or_keep(type_oid: u32, text: &[u8]) -> (Value, Option<DatumError>) {
    match decode_text(type_oid, text) {
        Ok(v) => (v, None),
        Err(e) => (
            Value::Text(String::from_utf8_lossy(text).into_owned()),
            Some(e),
        ),
    }
}

/// Decodes PostgreSQL's text output of a value of type `type_oid`.
pub fn decode_text(type_oid: u32, text: &[u8]) -> Result<Value, DatumError> {
    let ty = Type::from_oid(type_oid);
    let err = || DatumError {
        type_name: ty
            .as_ref()
            .map_or_else(|| type_oid.to_string(), |t| t.name().to_owned()),
    };
    let s = std::str::from_utf8(text).map_err(|_| err())?;
    let Some(ty) = &ty else {
        // A type walsync does not know (an enum, a domain over text, an extension's type): its
        // text form is what the application sees from psql too.
        return Ok(Value::Text(s.to_owned()));
    };
    if let Kind::Array(element) = ty.kind() {
        // `int2vector` and `oidvector` print as space-separated lists, not array literals.
        if matches!(*ty, Type::INT2_VECTOR | Type::OID_VECTOR) {
            return Ok(Value::Text(s.to_owned()));
        }
        // `box` is the one built-in type whose array elements are separated by `;` (its text
        // holds commas).
        let delimiter = if *element == Type::BOX { b';' } else { b',' };
        let element = element.oid();
        return match array::parse(s, delimiter, &|item| decode_text(element, item.as_bytes())) {
            Ok(Some(v)) => Ok(v),
            // Lower bounds other than 1 have no JSON form: PostgreSQL's text keeps them.
            Ok(None) => Ok(Value::Text(s.to_owned())),
            Err(e) => Err(e.unwrap_or_else(err)),
        };
    }
    if let Kind::Domain(base) = ty.kind() {
        return decode_text(base.oid(), text);
    }
    scalar(ty, s).ok_or_else(err)
}

fn scalar(ty: &Type, s: &str) -> Option<Value> {
    Some(match *ty {
        Type::BOOL => Value::Bool(match s {
            "t" => true,
            "f" => false,
            _ => return None,
        }),
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID | Type::XID => Value::Int(s.parse().ok()?),
        Type::FLOAT4 | Type::FLOAT8 => {
            let f: f64 = s.parse().ok()?;
            if f.is_finite() {
                Value::Float(f)
            } else {
                Value::Text(s.to_owned())
            }
        }
        // Kept as printed (see `Value::Json`): PostgreSQL has validated it.
        Type::JSON | Type::JSONB => Value::Json(s.to_owned()),
        Type::BYTEA => Value::Bytes(parse_hex_bytea(s)?),
        _ => Value::Text(s.to_owned()),
    })
}

fn parse_hex_bytea(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(oid: u32, s: &str) -> Value {
        decode_text(oid, s.as_bytes()).expect("decodes")
    }

    #[test]
    fn scalars() {
        assert_eq!(text(16, "t"), Value::Bool(true));
        assert_eq!(text(20, "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(text(701, "1.5"), Value::Float(1.5));
        assert_eq!(text(701, "NaN"), Value::Text("NaN".into()));
        assert_eq!(
            text(1700, "12345678901234567890.000001"),
            Value::Text("12345678901234567890.000001".into())
        );
        for json in [
            r#"{"a": [1, null]}"#,
            r#"{"big": 12345678901234567890123, "d": 0.1000000000000000055511151231257827}"#,
            r#"{"b": 1, "a": 2, "b": 3}"#,
            r#"{"x": 1e400}"#,
            r#""\ud83d""#,
        ] {
            assert_eq!(text(114, json), Value::Json(json.to_owned()), "json");
            assert_eq!(text(3802, json), Value::Json(json.to_owned()), "jsonb");
        }
        assert_eq!(text(17, "\\x00ff10"), Value::Bytes(vec![0, 0xff, 0x10]));
        assert_eq!(
            text(1184, "2024-01-02 03:04:05.5+00"),
            Value::Text("2024-01-02 03:04:05.5+00".into())
        );
        assert_eq!(text(999_999, "whatever"), Value::Text("whatever".into()));
    }

    #[test]
    fn arrays() {
        assert_eq!(
            text(1007, "{1,2,NULL}"),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Null])
        );
        assert_eq!(
            text(1009, r#"{"a b","c\"d",NULL,"NULL",e}"#),
            Value::Array(vec![
                Value::Text("a b".into()),
                Value::Text("c\"d".into()),
                Value::Null,
                Value::Text("NULL".into()),
                Value::Text("e".into()),
            ])
        );
        assert_eq!(
            text(1007, "{{1,2},{3,4}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)]),
            ])
        );
        assert_eq!(
            text(1007, "[1:2]={5,6}"),
            Value::Array(vec![Value::Int(5), Value::Int(6)])
        );
        // Other lower bounds are kept in PostgreSQL's text.
        assert_eq!(text(1007, "[0:1]={5,6}"), Value::Text("[0:1]={5,6}".into()));
        assert_eq!(
            text(1007, "[1:1][2:3]={{5,6}}"),
            Value::Text("[1:1][2:3]={{5,6}}".into())
        );
        assert_eq!(text(1007, "{}"), Value::Array(vec![]));
        // box[]: elements are separated by `;`.
        assert_eq!(
            text(1020, "{(3,4),(1,2);(6,7),(5,5)}"),
            Value::Array(vec![
                Value::Text("(3,4),(1,2)".into()),
                Value::Text("(6,7),(5,5)".into()),
            ])
        );
        // A jsonb null element is JSON, not SQL NULL.
        assert_eq!(
            text(3807, r#"{"null",NULL,"{\"a\": 1}"}"#),
            Value::Array(vec![
                Value::Json("null".into()),
                Value::Null,
                Value::Json(r#"{"a": 1}"#.into()),
            ])
        );
        // int2vector and oidvector are not array literals.
        assert_eq!(text(22, "1 2 3"), Value::Text("1 2 3".into()));
        assert_eq!(text(30, "23 25"), Value::Text("23 25".into()));
    }

    #[test]
    fn bad_text_is_an_error_not_a_panic() {
        for (oid, s) in [
            (16, "yes"),
            (23, "1.5"),
            (17, "\\x0"),
            (17, "plain"),
            (1007, "{1,2"),
            (1007, "{a}"),
        ] {
            let e = decode_text(oid, s.as_bytes()).unwrap_err();
            assert!(!e.type_name.is_empty(), "{oid} {s}");
            // Kept as PostgreSQL's text instead, with the reason.
            let (v, e) = decode_text_or_keep(oid, s.as_bytes());
            assert_eq!(v, Value::Text(s.to_owned()));
            assert!(e.is_some());
        }
    }
}
