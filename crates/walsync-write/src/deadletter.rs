//! The dead letters: rejected client transactions, kept whole with who sent them, when and
//! why; listed and replayed by the operator (`walsync writes rejected|replay`).

use serde::Serialize;

use crate::apply::{Applied, Failure, rejected};
use crate::{ClientTransaction, CrudEntry, Status, TxResult, Uploads, WriteError, Writer};

/// A rejected client transaction.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub user_id: String,
    pub client_id: String,
    /// The transaction among its client's (`tx:<tx_id>`, or `op:<first op_id>`).
    pub tx_key: String,
    pub code: String,
    pub message: String,
    pub op_id: Option<i64>,
    pub rejected_at: String,
    /// When a replay applied it.
    pub replayed_at: Option<String>,
    pub ops: Vec<CrudEntry>,
}

/// The client id replays are claimed under (with `replay:<id>` as the transaction).
const REPLAY_CLIENT: &str = "walsync-replay";

fn database(e: tokio_postgres::Error) -> WriteError {
    WriteError::Unreachable(e.to_string())
}

impl Uploads {
    async fn admin_connection(
        &self,
    ) -> Result<deadpool::managed::Object<crate::Manager>, WriteError> {
        self.connection()
            .await
            .map_err(|_| WriteError::Unreachable("no connection to postgres".into()))
    }

    /// Dead letters in the order they came, `user`'s only when given, those replayed since only
    /// with `include_replayed`; at most `limit`.
    pub async fn rejected(
        &self,
        user: Option<&str>,
        include_replayed: bool,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, WriteError> {
        self.catalog().await?;
        let client = self.admin_connection().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, user_id, client_id, tx_key, code, message, op_id, rejected_at::text, \
                            replayed_at::text, ops::text \
                     FROM {} \
                     WHERE ($1::text IS NULL OR user_id = $1) AND ($2 OR replayed_at IS NULL) \
                     ORDER BY id LIMIT $3",
                    self.sql.rejected
                ),
                &[&user, &include_replayed, &limit],
            )
            .await
            .map_err(database)?;
        rows.iter()
            .map(|r| {
                let ops: String = r.get(9);
                Ok(DeadLetter {
                    id: r.get(0),
                    user_id: r.get(1),
                    client_id: r.get(2),
                    tx_key: r.get(3),
                    code: r.get(4),
                    message: r.get(5),
                    op_id: r.get(6),
                    rejected_at: r.get(7),
                    replayed_at: r.get(8),
                    ops: serde_json::from_str(&ops).map_err(|e| {
                        WriteError::Catalog(format!(
                            "dead letter {} does not read: {e}",
                            r.get::<_, i64>(0)
                        ))
                    })?,
                })
            })
            .collect()
    }

    /// Applies dead letter `id` again, as its user with the claims it came with, after the
    /// cause was put right (a membership added, a constraint relaxed). Applied: the dead letter
    /// is marked replayed. Refused again: it stays as it is, and the result says why. A replay
    /// is claimed like any upload, so replaying twice applies once.
    pub async fn replay(&self, id: i64) -> Result<TxResult, WriteError> {
        let tables = self.catalog().await?;
        let r = &self.sql.rejected;
        let row = {
            let client = self.admin_connection().await?;
            client
                .query_opt(
                    &format!("SELECT user_id, claims::text, ops::text FROM {r} WHERE id = $1"),
                    &[&id],
                )
                .await
                .map_err(database)?
                .ok_or_else(|| WriteError::Config(format!("there is no dead letter {id}")))?
        };
        let user_id: String = row.get(0);
        let claims: serde_json::Value =
            serde_json::from_str(&row.get::<_, String>(1)).unwrap_or_default();
        let tx = ClientTransaction {
            tx_id: None,
            ops: serde_json::from_str(&row.get::<_, String>(2))
                .map_err(|e| WriteError::Catalog(format!("dead letter {id} does not read: {e}")))?,
        };
        let writer = Writer {
            user_id: &user_id,
            claims: &claims,
        };
        let outcome = match self.intents(writer, &tx, &tables) {
            Ok(intents) => {
                self.apply(
                    writer,
                    REPLAY_CLIENT,
                    &format!("replay:{id}"),
                    None,
                    &intents,
                )
                .await
            }
            Err(f) => Err(f),
        };
        let result = match outcome {
            Ok(Applied::Now(_, conflicts)) => TxResult {
                conflicts,
                ..TxResult::applied(None)
            },
            Ok(Applied::Before(r)) => TxResult {
                replayed: true,
                ..r
            },
            Err(Failure::Reject {
                code,
                message,
                op_id,
                ..
            }) => rejected(None, code, message, op_id),
            Err(f @ (Failure::Retry(_) | Failure::ReceivedBefore)) => {
                return Err(WriteError::Unreachable(f.message()));
            }
        };
        if result.status == Status::Applied {
            let client = self.admin_connection().await?;
            client
                .execute(
                    &format!(
                        "UPDATE {r} SET replayed_at = now() WHERE id = $1 AND replayed_at IS NULL"
                    ),
                    &[&id],
                )
                .await
                .map_err(database)?;
        }
        Ok(result)
    }
}
