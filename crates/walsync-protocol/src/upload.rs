//! Uploads: the request (the PowerSync client's own CRUD entries) and its results, as JSON
//! (`POST /write`) and as protobuf (`walsync.v1.Sync/Upload`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pb;

/// `POST /write`: `{client_id, batch: [{tx_id, ops: [CrudEntry.toJSON(), …]}]}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct UploadRequest {
    pub client_id: String,
    pub batch: Vec<ClientTransaction>,
}

/// One client transaction: applied in one PostgreSQL transaction, all or nothing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClientTransaction {
    /// The client's transaction id; without one (a CRUD batch not from one transaction) the
    /// first op's id identifies it for retries.
    #[serde(default)]
    pub tx_id: Option<i64>,
    pub ops: Vec<CrudEntry>,
}

impl ClientTransaction {
    /// What identifies this transaction among its client's: retried uploads carry the same.
    pub fn key(&self) -> String {
        match (self.tx_id, self.ops.first()) {
            (Some(tx), _) => format!("tx:{tx}"),
            (None, Some(op)) => format!("op:{}", op.op_id),
            (None, None) => "empty".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CrudOp {
    /// The whole row as the client has it: inserted, or replacing the columns it names.
    Put,
    /// The columns it names, of an existing row.
    Patch,
    Delete,
}

/// `CrudEntry.toJSON()`: `{op_id, op, type, id, tx_id?, data?, old?, metadata?}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CrudEntry {
    pub op_id: i64,
    pub op: CrudOp,
    #[serde(rename = "type")]
    pub table: String,
    pub id: String,
    #[serde(default)]
    pub tx_id: Option<i64>,
    #[serde(default)]
    pub data: Option<Map<String, Value>>,
    /// The values the client edited from (a table with `trackPrevious`).
    #[serde(default)]
    pub old: Option<Map<String, Value>>,
    #[serde(default)]
    pub metadata: Option<String>,
}

/// What happened to a client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Written; the client may drop it from its queue.
    Applied,
    /// Final: denied, invalid or refused by the database. Kept whole in the dead letters;
    /// retrying gives the same answer.
    Rejected,
    /// Not written, for a reason that passes (PostgreSQL unreachable, a serialization
    /// failure, overload): send it again after `retry_after_ms`.
    Retryable,
}

/// The result of one client transaction.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TxResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_id: Option<i64>,
    pub status: Status,
    /// A stable code for a rejected or retryable transaction (`denied`, `invalid`,
    /// `not_found`, `constraint_violation`, `invalid_value`, `rejected_by_database`,
    /// `database_unavailable`, `not_attempted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The op that was refused, when one op was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// This transaction had been received before: the result is the one given then, and
    /// nothing was written again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// Fields the server had changed too since the client read them, and how each was decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictNote>,
}

/// A field of an applied op that the server had changed too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConflictNote {
    pub op_id: i64,
    pub column: String,
    /// `client` (its value was written), `server` (the server's stays) or `manual` (the
    /// server's stays and the conflict is stored for a person to decide).
    pub outcome: String,
}

impl TxResult {
    /// Applied, nothing more to say.
    pub fn applied(tx_id: Option<i64>) -> TxResult {
        TxResult {
            tx_id,
            status: Status::Applied,
            code: None,
            message: None,
            op_id: None,
            retry_after_ms: None,
            replayed: false,
            conflicts: Vec::new(),
        }
    }
}

/// The answer to an upload: a result per transaction, in order, and a write checkpoint that
/// the client's own stream passes once it holds these writes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct UploadReply {
    pub results: Vec<TxResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<String>,
}

fn json_object(field: &str, text: Option<String>) -> Result<Option<Map<String, Value>>, String> {
    text.map(|t| serde_json::from_str(&t).map_err(|e| format!("{field} is not a JSON object: {e}")))
        .transpose()
}

fn object_text(map: Option<Map<String, Value>>) -> Option<String> {
    map.map(|m| Value::Object(m).to_string())
}

impl TryFrom<pb::UploadRequest> for UploadRequest {
    type Error = String;

    fn try_from(req: pb::UploadRequest) -> Result<UploadRequest, String> {
        let batch = req
            .batch
            .into_iter()
            .map(|tx| {
                let ops = tx
                    .ops
                    .into_iter()
                    .map(|e| {
                        let op = e.op.parse()?;
                        Ok(CrudEntry {
                            op_id: e.op_id,
                            op,
                            table: e.r#type,
                            id: e.id,
                            tx_id: e.tx_id,
                            data: json_object("data_json", e.data_json)?,
                            old: json_object("old_json", e.old_json)?,
                            metadata: e.metadata,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(ClientTransaction {
                    tx_id: tx.tx_id,
                    ops,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(UploadRequest {
            client_id: req.client_id,
            batch,
        })
    }
}

impl From<UploadRequest> for pb::UploadRequest {
    fn from(req: UploadRequest) -> pb::UploadRequest {
        pb::UploadRequest {
            client_id: req.client_id,
            batch: req
                .batch
                .into_iter()
                .map(|tx| pb::ClientTransaction {
                    tx_id: tx.tx_id,
                    ops: tx
                        .ops
                        .into_iter()
                        .map(|e| pb::CrudEntry {
                            op_id: e.op_id,
                            op: e.op.as_str().into(),
                            r#type: e.table,
                            id: e.id,
                            tx_id: e.tx_id,
                            data_json: object_text(e.data),
                            old_json: object_text(e.old),
                            metadata: e.metadata,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Applied, Status::Rejected, Status::Retryable];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Rejected => "rejected",
            Status::Retryable => "retryable",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Status, String> {
        Status::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

impl CrudOp {
    pub const ALL: [CrudOp; 3] = [CrudOp::Put, CrudOp::Patch, CrudOp::Delete];

    /// The name in a CRUD entry (`PUT`, `PATCH`, `DELETE`).
    pub fn as_str(self) -> &'static str {
        match self {
            CrudOp::Put => "PUT",
            CrudOp::Patch => "PATCH",
            CrudOp::Delete => "DELETE",
        }
    }
}

impl std::str::FromStr for CrudOp {
    type Err = String;

    fn from_str(s: &str) -> Result<CrudOp, String> {
        CrudOp::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown op {s:?}: PUT, PATCH or DELETE"))
    }
}

impl From<UploadReply> for pb::UploadReply {
    fn from(reply: UploadReply) -> pb::UploadReply {
        pb::UploadReply {
            results: reply
                .results
                .into_iter()
                .map(|r| pb::TxResult {
                    tx_id: r.tx_id,
                    status: r.status.as_str().into(),
                    code: r.code,
                    message: r.message,
                    op_id: r.op_id,
                    retry_after_ms: r.retry_after_ms,
                    replayed: r.replayed,
                    conflicts: r
                        .conflicts
                        .into_iter()
                        .map(|c| pb::ConflictNote {
                            op_id: c.op_id,
                            column: c.column,
                            outcome: c.outcome,
                        })
                        .collect(),
                })
                .collect(),
            write_checkpoint: reply.write_checkpoint.and_then(|w| w.parse().ok()),
        }
    }
}

impl TryFrom<pb::UploadReply> for UploadReply {
    type Error = String;

    fn try_from(reply: pb::UploadReply) -> Result<UploadReply, String> {
        let results = reply
            .results
            .into_iter()
            .map(|r| {
                Ok(TxResult {
                    tx_id: r.tx_id,
                    status: r.status.parse()?,
                    code: r.code,
                    message: r.message,
                    op_id: r.op_id,
                    retry_after_ms: r.retry_after_ms,
                    replayed: r.replayed,
                    conflicts: r
                        .conflicts
                        .into_iter()
                        .map(|c| ConflictNote {
                            op_id: c.op_id,
                            column: c.column,
                            outcome: c.outcome,
                        })
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(UploadReply {
            results,
            write_checkpoint: reply.write_checkpoint.map(|w| w.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_powersync_upload_survives_both_encodings() {
        let json = r#"{"client_id":"c1","batch":[
            {"tx_id":7,"ops":[
                {"op_id":1,"op":"PUT","type":"teams","id":"9","tx_id":7,"data":{"name":"n","tags":["a",null],"n":12345678901234567}},
                {"op_id":2,"op":"PATCH","type":"teams","id":"9","data":{"name":"m"},"old":{"name":"n"},"metadata":"{\"by\":\"ui\"}"},
                {"op_id":3,"op":"DELETE","type":"teams","id":"9"}]},
            {"ops":[{"op_id":4,"op":"DELETE","type":"teams","id":"10"}]}]}"#;
        let request: UploadRequest = serde_json::from_str(json).expect("parses");
        assert_eq!(request.batch[0].key(), "tx:7");
        assert_eq!(request.batch[1].key(), "op:4");
        let back = UploadRequest::try_from(pb::UploadRequest::from(request.clone()))
            .expect("converts back");
        assert_eq!(back, request);
        let bad = pb::UploadRequest {
            client_id: "c".into(),
            batch: vec![pb::ClientTransaction {
                tx_id: None,
                ops: vec![pb::CrudEntry {
                    op: "UPSERT".into(),
                    ..Default::default()
                }],
            }],
        };
        assert!(UploadRequest::try_from(bad).is_err());
    }
}
