//! The bucket vocabulary shared by the rules (which produce it), the store (which keeps it) and
//! the sync core (which reads it for a request).

use serde::{Deserialize, Serialize};

/// Where a parameter row is found: the definition and query, and the request values it matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LookupKey {
    pub definition: String,
    pub query: u32,
    pub values: Vec<String>,
}

impl LookupKey {
    /// A stable byte form for storage keys (JSON, so that no value can forge a separator).
    pub fn encode(&self) -> String {
        serde_json::to_string(&(&self.definition, self.query, &self.values)).unwrap_or_default()
    }
}

/// One row of a parameter table says: requests with this key get a bucket with these parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupEntry {
    pub key: LookupKey,
    pub parameters: Vec<serde_json::Value>,
}

/// A row's place in a bucket and the data that goes there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowOutput {
    pub bucket: String,
    pub object_type: String,
    pub object_id: String,
    /// The row's JSON text, as the op carries it and as its checksum covers it.
    pub data: String,
}

/// A bucket id: `<definition>[<JSON array of parameter values>]`.
/// The bucket id of a parameter set given as the JSON text of its array (as the store keeps
/// it, written by serde_json from the set): the same as [`bucket_id`] of the decoded set.
pub fn bucket_id_of_text(definition: &str, parameters: &str) -> String {
    let mut id = String::with_capacity(definition.len() + parameters.len());
    id.push_str(definition);
    id.push_str(parameters);
    id
}

#[cfg(test)]
mod bucket_id_tests {
    /// The text the store keeps (serde_json's encoding of the set) gives the same bucket id as
    /// the decoded set, for the values parameters take.
    #[test]
    fn a_set_and_its_stored_text_name_the_same_bucket() {
        let sets = [
            serde_json::json!([]),
            serde_json::json!([1, -7, 12345678901234_i64]),
            serde_json::json!(["u1", "ü\"\\/\n\u{0001}😀", null, true]),
            serde_json::json!([1.5, 1e-7, 0.1]),
            serde_json::json!([{"b": 1, "a": [2]}]),
        ];
        for set in sets {
            let values = set.as_array().expect("array").clone();
            let text = serde_json::to_string(&values).expect("text");
            assert_eq!(
                super::bucket_id_of_text("def", &text),
                super::bucket_id("def", &values),
                "{text}"
            );
        }
    }
}

pub fn bucket_id(definition: &str, parameters: &[serde_json::Value]) -> String {
    format!(
        "{definition}{}",
        serde_json::Value::Array(parameters.to_vec())
    )
}

/// What an op does to a row of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum OpKind {
    /// The row now holds the op's data.
    #[serde(alias = "Put")]
    Put,
    /// The row left the bucket.
    #[serde(alias = "Remove")]
    Remove,
    /// A superseded op: nothing to apply, its checksum still counts.
    #[serde(alias = "Move")]
    Move,
    /// Replaces every op up to it: the client empties the bucket, and the checksum is the sum of
    /// what it replaced.
    #[serde(alias = "Clear")]
    Clear,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "PUT",
            OpKind::Remove => "REMOVE",
            OpKind::Move => "MOVE",
            OpKind::Clear => "CLEAR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_kinds_read_in_the_protocol_form_and_in_the_store_form_of_earlier_versions() {
        for (k, s) in [
            (OpKind::Put, "PUT"),
            (OpKind::Remove, "REMOVE"),
            (OpKind::Move, "MOVE"),
            (OpKind::Clear, "CLEAR"),
        ] {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<OpKind>(&format!("\"{s}\"")).unwrap(),
                k
            );
            let legacy = format!("\"{k:?}\"");
            assert_eq!(serde_json::from_str::<OpKind>(&legacy).unwrap(), k);
            assert_eq!(k.as_str(), s);
        }
    }
}

/// A stream a sync request involves, as a checkpoint line describes it (PowerSync's Sync
/// Streams): its name, whether clients get it without subscribing, and the subscriptions to it
/// that could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDescription {
    pub name: String,
    /// Whether clients get the stream without subscribing (also when one subscribed).
    pub is_default: bool,
    pub errors: Vec<StreamError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    /// The subscription's index in the request; `None` (`"default"` in JSON) for the default
    /// subscription.
    #[serde(with = "subscription_ref")]
    pub subscription: Option<u32>,
    pub message: String,
}

/// Why a bucket is in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BucketReason {
    /// A default stream: the index into the checkpoint's `streams`.
    Default { default: u32 },
    /// An explicit subscription: the index into the request's subscriptions.
    Subscription { sub: u32 },
}

/// `"default"` or the subscription's index.
mod subscription_ref {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Ref {
        Index(u32),
        Name(String),
    }

    pub(crate) fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(i) => Ref::Index(*i),
            None => Ref::Name("default".into()),
        }
        .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(match Ref::deserialize(d)? {
            Ref::Index(i) => Some(i),
            Ref::Name(_) => None,
        })
    }
}
