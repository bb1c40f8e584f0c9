//! The catalog walsync holds of the writable tables: read once PostgreSQL first answers, and
//! again when a write finds it out of date (a column renamed, added or retyped since).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::types::Type;

use super::{Uploads, bookkeeping, check_sql};
use crate::WriteError;
use crate::catalog::{self, TableInfo};
use crate::config::AuthorizationMode;

/// The catalog as read at one moment, with PostgreSQL's description of the tables' columns
/// then (see [`catalog::fingerprint`]).
#[derive(Debug, Clone)]
pub(super) struct Catalog {
    tables: Arc<BTreeMap<String, TableInfo>>,
    fingerprint: String,
}

impl Uploads {
    pub(crate) async fn catalog(&self) -> Result<Arc<BTreeMap<String, TableInfo>>, WriteError> {
        if let Some(c) = self.held() {
            return Ok(c.tables.clone());
        }
        let _loading = self.loading.lock().await;
        // Another request may have loaded it while this one waited.
        if let Some(c) = self.held() {
            return Ok(c.tables.clone());
        }
        let catalog = self.read_catalog().await?;
        let tables = catalog.tables.clone();
        self.hold(catalog);
        Ok(tables)
    }

    /// The catalog read again when the tables' columns changed in PostgreSQL since `seen` was
    /// read; `None` when they did not (the caller keeps what it has: the write is at fault).
    pub(super) async fn reread_catalog(
        &self,
        seen: &Arc<BTreeMap<String, TableInfo>>,
    ) -> Option<Arc<BTreeMap<String, TableInfo>>> {
        let _loading = self.loading.lock().await;
        let fingerprint = match self.held() {
            Some(c) if !Arc::ptr_eq(&c.tables, seen) => return Some(c.tables.clone()),
            Some(c) => Some(c.fingerprint.clone()),
            None => None,
        };
        let client = self.pool.get().await.ok()?;
        let now = catalog::fingerprint(&client, seen).await.ok();
        drop(client);
        if now.is_some() && now == fingerprint {
            return None;
        }
        match self.read_catalog().await {
            Ok(catalog) => {
                tracing::info!("the catalog of writable tables was read again");
                let tables = catalog.tables.clone();
                self.hold(catalog);
                Some(tables)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the catalog of writable tables again");
                None
            }
        }
    }

    fn held(&self) -> Option<Arc<Catalog>> {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn hold(&self, catalog: Catalog) {
        *self.tables.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(catalog));
    }

    async fn read_catalog(&self) -> Result<Catalog, WriteError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| WriteError::Unreachable(e.to_string()))?;
        // walsync's own tables first: the conflicts table may be writable.
        self.create_bookkeeping(&client).await?;
        let mut tables = BTreeMap::new();
        for name in self.rules.keys() {
            let info = catalog::load(&client, name)
                .await
                .map_err(WriteError::Catalog)?;
            tables.insert(name.clone(), info);
        }
        if self.config.mode == AuthorizationMode::PostgresRls {
            bookkeeping::create_auth_uid(&client).await?;
        }
        for (name, rules) in &self.rules {
            let info = &tables[name];
            for (operation, p) in [
                ("insert", &rules.insert),
                ("update", &rules.update),
                ("delete", &rules.delete),
            ] {
                if let Some(p) = p {
                    client
                        .prepare_typed(&check_sql(info, p), &[Type::TEXT; 4])
                        .await
                        .map_err(|e| WriteError::Predicate {
                            table: name.clone(),
                            operation,
                            problem: e
                                .as_db_error()
                                .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                        })?;
                }
            }
        }
        let fingerprint = catalog::fingerprint(&client, &tables)
            .await
            .map_err(WriteError::Catalog)?;
        Ok(Catalog {
            tables: Arc::new(tables),
            fingerprint,
        })
    }
}
