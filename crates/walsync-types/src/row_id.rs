//! A source row's identity within its table.

/// The values of a row's key columns, in key order, as one value the store keys rows by.
///
/// Its encoded form, which this type alone writes and reads, is a JSON array of each key value's
/// text (`["42"]`, `["7","a"]`, `[null]`): text, so that every key type has one form and no
/// value can forge a separator. Stores may key a single integer more compactly
/// ([`RowId::as_int`], [`RowId::from_int`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowId(String);

impl RowId {
    /// The id of a row whose key columns have these texts (`None`: SQL NULL), in key order.
    /// `None` when there are no key columns.
    pub fn from_key_texts<S: AsRef<str>>(
        parts: impl IntoIterator<Item = Option<S>>,
    ) -> Option<RowId> {
        let mut key = Vec::with_capacity(16);
        key.push(b'[');
        for part in parts {
            if key.len() > 1 {
                key.push(b',');
            }
            match part {
                // Writing a str into a Vec cannot fail.
                Some(t) => serde_json::to_writer(&mut key, t.as_ref()).unwrap_or_default(),
                None => key.extend_from_slice(b"null"),
            }
        }
        if key.len() == 1 {
            return None;
        }
        key.push(b']');
        String::from_utf8(key).ok().map(RowId)
    }

    /// The id of a row with a single integer key.
    pub fn from_int(i: i64) -> RowId {
        RowId(format!("[\"{i}\"]"))
    }

    /// An id in its encoded form, as [`RowId::as_str`] gave it (read back from storage).
    pub fn from_encoded(text: impl AsRef<str>) -> RowId {
        RowId(text.as_ref().to_owned())
    }

    /// The encoded form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The integer of an id that is exactly one canonical integer (as [`RowId::from_int`] writes
    /// it): `["42"]` and `["-1"]`, not `["042"]`, `["-0"]` or a number beyond `i64`.
    pub fn as_int(&self) -> Option<i64> {
        let digits = self.0.strip_prefix("[\"")?.strip_suffix("\"]")?;
        let unsigned = digits.strip_prefix('-').unwrap_or(digits);
        let canonical = !unsigned.is_empty()
            && unsigned.bytes().all(|b| b.is_ascii_digit())
            && (unsigned == "0" || !unsigned.starts_with('0'))
            && digits != "-0";
        if canonical { digits.parse().ok() } else { None }
    }
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_texts_encode_as_a_json_array_and_integers_come_back() {
        let id = RowId::from_key_texts([Some("42")]).unwrap();
        assert_eq!(id.as_str(), "[\"42\"]");
        assert_eq!(id.as_int(), Some(42));
        assert_eq!(id, RowId::from_int(42));
        let composite = RowId::from_key_texts([Some("7"), None, Some("a\"b")]).unwrap();
        assert_eq!(composite.as_str(), "[\"7\",null,\"a\\\"b\"]");
        assert_eq!(composite.as_int(), None);
        assert_eq!(
            RowId::from_key_texts(std::iter::empty::<Option<&str>>()),
            None
        );
    }

    #[test]
    fn only_canonical_integers_are_integers() {
        for (text, int) in [
            ("[\"0\"]", Some(0)),
            ("[\"-5\"]", Some(-5)),
            ("[\"9223372036854775807\"]", Some(i64::MAX)),
            ("[\"-9223372036854775808\"]", Some(i64::MIN)),
            ("[\"-0\"]", None),
            ("[\"007\"]", None),
            ("[\"99999999999999999999\"]", None),
            ("[\"\"]", None),
            ("[\"1\",\"2\"]", None),
            ("9", None),
        ] {
            assert_eq!(RowId::from_encoded(text).as_int(), int, "{text}");
        }
        for i in [i64::MIN, -1, 0, 1, i64::MAX] {
            assert_eq!(RowId::from_int(i).as_int(), Some(i));
        }
    }
}
