use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One column value of a replicated row, decoded from PostgreSQL's text form by its type.
///
/// Types without an exact JSON counterpart keep PostgreSQL's own text: `numeric` (to keep every
/// digit), dates, times, intervals, uuids and any type walsync does not know.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// A finite `float4`/`float8`; NaN and infinities arrive as `Text`, since JSON has no form for
    /// them.
    Float(f64),
    Text(String),
    Json(serde_json::Value),
    Bytes(Vec<u8>),
    Array(Vec<Value>),
}

impl Value {
    /// The value as JSON. Bytes become PostgreSQL's hex text (`\x0a0b`), as `bytea` prints.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Text(s) => J::String(s.clone()),
            Value::Json(j) => j.clone(),
            Value::Bytes(b) => J::String(bytea_hex(b)),
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
        }
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
            Value::Json(json!({"a": 1})),
            Value::Bytes(vec![0, 0xab]),
        ]);
        assert_eq!(
            v.to_json(),
            json!([null, true, -3, 1.5, "12.50", {"a": 1}, "\\x00ab"])
        );
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
