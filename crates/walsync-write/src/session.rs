//! A write transaction on a pooled connection, whose statements are prepared once per
//! connection (a cached statement saves a round trip at every use).

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row, Statement, Transaction};

use crate::pool::PgConn;

/// Statements kept per connection, at most: SQL text varies with the columns an op names.
const CACHED: usize = 1_000;

pub(crate) struct Session<'c> {
    pub(crate) t: Transaction<'c>,
    cache: &'c mut HashMap<String, Statement>,
}

/// The statement of `sql` prepared on `client`'s connection, once: from `cache` after the first
/// time.
pub(crate) async fn cached<C: GenericClient>(
    client: &C,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
    types: &[Type],
) -> Result<Statement, Error> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare_typed(sql, types).await?;
    if cache.len() >= CACHED {
        cache.clear();
    }
    cache.insert(sql.to_owned(), s.clone());
    Ok(s)
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl<'c> Session<'c> {
    pub(crate) async fn begin(conn: &'c mut PgConn) -> Result<Session<'c>, Error> {
        let (client, cache) = conn.split();
        Ok(Session {
            t: client.transaction().await?,
            cache,
        })
    }

    pub(crate) async fn commit(self) -> Result<(), Error> {
        self.t.commit().await
    }

    /// The statement of `sql`, prepared on this connection once.
    pub(crate) async fn statement(
        &mut self,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        cached(&self.t, self.cache, sql, types).await
    }

    /// A statement that failed is prepared anew next time (a table altered since can make a
    /// prepared statement fail for good).
    fn forget_on_error<T>(&mut self, sql: &str, r: Result<T, Error>) -> Result<T, Error> {
        if r.is_err() {
            self.cache.remove(sql);
        }
        r
    }

    pub(crate) async fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
        let s = self.statement(sql, &[]).await?;
        let r = self.t.execute(&s, params).await;
        self.forget_on_error(sql, r)
    }

    pub(crate) async fn query_opt(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, Error> {
        let s = self.statement(sql, &[]).await?;
        let r = self.t.query_opt(&s, params).await;
        self.forget_on_error(sql, r)
    }

    pub(crate) async fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        self.query_one_typed(sql, &[], params).await
    }

    /// As [`Session::query_one`], with the parameters' types given.
    pub(crate) async fn query_one_typed(
        &mut self,
        sql: &str,
        types: &[Type],
        params: Params<'_>,
    ) -> Result<Row, Error> {
        let s = self.statement(sql, types).await?;
        let r = self.t.query_one(&s, params).await;
        self.forget_on_error(sql, r)
    }
}
