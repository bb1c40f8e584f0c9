use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One column value of a replicated row, decoded from PostgreSQL's text form by its type.
///
/// Types without an exact JSON counterpart keep PostgreSQL's own text: `numeric` (to keep every
/// digit), dates, times, intervals, uuids and any type walsync does not know. `json` and `jsonb`
/// keep the text PostgreSQL printed too (byte for byte for `json`, the canonical text for
/// `jsonb`): nothing rounds a number, sorts keys or merges duplicate keys, and no value
/// PostgreSQL stores (a number beyond `f64`, deep nesting, a lone surrogate escape) can fail to
/// decode. Only rules that look inside a value parse it ([`Value::json`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// A finite `float4`/`float8`; NaN and infinities arrive as `Text`, since JSON has no form for
    /// them.
    Float(f64),
    Text(String),
    /// JSON text, as PostgreSQL printed it (or as a rule built it).
    #[serde(
        serialize_with = "json_text::serialize",
        deserialize_with = "json_text::deserialize"
    )]
    Json(String),
    Bytes(Vec<u8>),
    Array(Vec<Value>),
}

impl Value {
    /// A JSON value from a parsed one (a rule's result, a token's claim).
    pub fn from_json(j: &serde_json::Value) -> Value {
        Value::Json(j.to_string())
    }

    /// The parsed form of a `Json` value, for rules that look inside it: `None` for any other
    /// value, and for JSON text serde_json cannot hold (nesting past its depth limit).
    pub fn json(&self) -> Option<serde_json::Value> {
        match self {
            Value::Json(text) => serde_json::from_str(text).ok(),
            _ => None,
        }
    }

    /// The value as JSON text: [`Value::to_json`]'s form, except that JSON values (also inside
    /// arrays) are written as the text they hold, so nothing in them is rounded or reordered.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Value::Json(text) => out.push_str(text),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_json().to_string()),
        }
    }

    /// The value as JSON. Bytes become PostgreSQL's hex text (`\x0a0b`), as `bytea` prints; JSON
    /// text serde_json cannot parse stays a JSON string of that text.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Text(s) => J::String(s.clone()),
            Value::Json(text) => {
                serde_json::from_str(text).unwrap_or_else(|_| J::String(text.clone()))
            }
            Value::Bytes(b) => J::String(bytea_hex(b)),
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
        }
    }
}

/// `Json` values in serde forms (the store's JSON records of earlier versions): written and read
/// as the JSON they hold, as those versions wrote them.
mod json_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(j) => j.serialize(s),
            Err(_) => text.serialize(s),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(serde_json::Value::deserialize(d)?.to_string())
    }
}

fn bytea_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

/// A PostgreSQL timestamp as sent on the replication protocol: microseconds since
/// 2000-01-01 00:00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

/// Seconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

impl PgTimestamp {
    pub fn now() -> PgTimestamp {
        PgTimestamp::from(SystemTime::now())
    }

    pub fn to_system_time(self) -> SystemTime {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        if self.0 >= 0 {
            epoch + Duration::from_micros(self.0.unsigned_abs())
        } else {
            epoch - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

impl From<SystemTime> for PgTimestamp {
    fn from(t: SystemTime) -> PgTimestamp {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        match t.duration_since(epoch) {
            Ok(d) => PgTimestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => PgTimestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_forms() {
        let v = Value::Array(vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(-3),
            Value::Float(1.5),
            Value::Text("12.50".into()),
            Value::Json("{\"a\": 1}".into()),
            Value::Bytes(vec![0, 0xab]),
        ]);
        assert_eq!(
            v.to_json(),
            json!([null, true, -3, 1.5, "12.50", {"a": 1}, "\\x00ab"])
        );
        let mut text = String::new();
        v.write_json(&mut text);
        assert_eq!(
            text,
            "[null,true,-3,1.5,\"12.50\",{\"a\": 1},\"\\\\x00ab\"]"
        );
    }

    #[test]
    fn json_text_is_kept_whole() {
        // Numbers beyond f64, long decimals, key order and duplicate keys, deep nesting.
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        for text in [
            "{\"big\": 12345678901234567890123}",
            "0.1000000000000000055511151231257827",
            "{\"b\": 1, \"a\": 2, \"b\": 3}",
            "1e400",
            "\"\\ud83d\"",
            deep.as_str(),
        ] {
            let v = Value::Json(text.to_owned());
            let mut out = String::new();
            Value::Array(vec![v.clone()]).write_json(&mut out);
            assert_eq!(out, format!("[{text}]"));
            // Earlier versions' JSON records read back as the JSON they held.
            let json = serde_json::to_string(&Value::Json("{\"a\":[1,2]}".into())).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&json).unwrap(),
                Value::Json("{\"a\":[1,2]}".into())
            );
        }
        assert_eq!(Value::Json(deep).json(), None, "past serde_json's depth");
    }

    #[test]
    fn timestamp_epoch() {
        let t = PgTimestamp(0).to_system_time();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).ok(),
            Some(Duration::from_secs(946_684_800))
        );
        assert_eq!(PgTimestamp::from(t), PgTimestamp(0));
        let before = PgTimestamp(-1_500_000);
        assert_eq!(PgTimestamp::from(before.to_system_time()), before);
    }
}
