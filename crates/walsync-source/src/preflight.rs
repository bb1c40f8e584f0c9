//! Checks that the database is ready for walsync, with errors that say what to change.

use tokio_postgres::Client;
use walsync_types::Lsn;

use crate::config::{PublicationScope, SourceConfig};
use crate::error::{Result, SourceError};

/// The state of the configured slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    Present {
        active_pid: Option<i32>,
        confirmed_flush: Option<Lsn>,
        wal_status: Option<String>,
    },
}

/// Checks `wal_level`, the REPLICATION privilege, the publication (creating it if configured)
/// and its tables' replica identities.
pub async fn check_database(client: &Client, config: &SourceConfig) -> Result<()> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SourceError::Preflight(format!(
            "wal_level is {wal_level:?}, walsync needs \"logical\": run ALTER SYSTEM SET wal_level = logical \
             and restart PostgreSQL"
        )));
    }
    // pgoutput sends text in the server's encoding; walsync reads UTF-8.
    let encoding: String = client.query_one("SHOW server_encoding", &[]).await?.get(0);
    if encoding != "UTF8" {
        return Err(SourceError::Preflight(format!(
            "the database's server_encoding is {encoding:?}, walsync needs \"UTF8\": pgoutput sends \
             text in the server's encoding. Create the database WITH ENCODING 'UTF8' (and dump and \
             restore the data into it)"
        )));
    }
    let row = client
        .query_one("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(SourceError::Preflight(format!(
            "role {user:?} may not replicate: run ALTER ROLE \"{user}\" WITH REPLICATION"
        )));
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await?
        .is_some();
    if !exists {
        match &config.create_publication {
            Some(scope) => create_publication(client, &config.publication, scope).await?,
            None => {
                return Err(SourceError::Preflight(format!(
                    "publication {:?} does not exist: run CREATE PUBLICATION \"{}\" FOR TABLE ... (or FOR ALL TABLES), \
                     or let walsync create it",
                    config.publication, config.publication
                )));
            }
        }
    }
    check_required_tables(client, config).await?;
    check_replica_identity(client, &config.publication).await?;
    check_partitions(client, &config.publication).await
}

/// Every table the consumer reads is in the publication, which publishes every kind of change.
async fn check_required_tables(client: &Client, config: &SourceConfig) -> Result<()> {
    let name = &config.publication;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let row = client
        .query_one(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(SourceError::Preflight(format!(
            "publication {name:?} does not publish every kind of change: run ALTER PUBLICATION {quoted} \
             SET (publish = 'insert, update, delete, truncate')"
        )));
    }
    let published: std::collections::BTreeSet<String> = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&String> = config
        .required_tables
        .iter()
        .filter(|t| !published.contains(*t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if config.create_publication.is_none() {
        let list: Vec<&str> = missing.iter().map(|t| t.as_str()).collect();
        return Err(SourceError::Preflight(format!(
            "publication {name:?} does not include {}, which the sync rules read: run ALTER PUBLICATION {quoted} \
             ADD TABLE {} (or let walsync extend it)",
            list.join(", "),
            list.join(", ")
        )));
    }
    for table in missing {
        // Resolve through regclass so that a table that does not exist fails here, clearly.
        let resolved: Option<String> = client
            .query_opt("SELECT to_regclass($1)::text", &[table])
            .await?
            .and_then(|r| r.get(0));
        let Some(resolved) = resolved else {
            return Err(SourceError::Preflight(format!(
                "table {table:?}, which the sync rules read, does not exist"
            )));
        };
        tracing::info!(publication = %name, table = %resolved, "adding a table the sync rules read to the publication");
        client
            .batch_execute(&format!("ALTER PUBLICATION {quoted} ADD TABLE {resolved}"))
            .await?;
    }
    Ok(())
}

/// Partitions published under their own names: their rows would reach the rules as the
/// partitions', not the partitioned table's the rules name.
async fn check_partitions(client: &Client, publication: &str) -> Result<()> {
    let rows = client
        .query(
            "SELECT format('%I.%I', p.schemaname, p.tablename) \
             FROM pg_publication_tables p \
             JOIN pg_publication pb ON pb.pubname = p.pubname \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND c.relispartition AND NOT pb.pubviaroot \
             ORDER BY 1",
            &[&publication],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Err(SourceError::Preflight(format!(
        "publication {publication:?} publishes partitions under their own names ({}), so their rows would not \
         reach rules that name the partitioned table: run ALTER PUBLICATION \"{}\" SET (publish_via_partition_root = true)",
        names.join(", "),
        publication.replace('"', "\"\"")
    )))
}

async fn create_publication(client: &Client, name: &str, scope: &PublicationScope) -> Result<()> {
    let target = match scope {
        PublicationScope::AllTables => "ALL TABLES".to_owned(),
        PublicationScope::Tables(tables) if tables.is_empty() => {
            return Err(SourceError::Config(
                "create_publication names no tables".into(),
            ));
        }
        PublicationScope::Tables(tables) => {
            let mut names = Vec::new();
            for t in tables {
                // Resolve through regclass so that a misspelt table fails here, clearly.
                let row = client
                    .query_opt("SELECT to_regclass($1)::text", &[t])
                    .await?
                    .and_then(|r| r.get::<_, Option<String>>(0));
                names.push(row.ok_or_else(|| {
                    SourceError::Preflight(format!(
                        "table {t:?} named for publication {name:?} does not exist"
                    ))
                })?);
            }
            format!("TABLE {}", names.join(", "))
        }
    };
    tracing::info!(publication = name, "creating publication");
    client
        .batch_execute(&format!(
            // Partitioned tables publish as themselves, as the rules name them.
            "CREATE PUBLICATION \"{}\" FOR {target} WITH (publish_via_partition_root = true)",
            name.replace('"', "\"\"")
        ))
        .await?;
    Ok(())
}

/// Published tables whose updates and deletes PostgreSQL refuses: no primary key and default
/// identity, or identity NOTHING.
async fn check_replica_identity(client: &Client, publication: &str) -> Result<()> {
    let rows = client
        .query(
            "SELECT format('%I.%I', p.schemaname, p.tablename) \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
               (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
             ORDER BY 1",
            &[&publication],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    Err(SourceError::Preflight(format!(
        "published tables without a primary key or replica identity: {}; PostgreSQL rejects their updates \
         and deletes while they are published. Add a primary key, or run ALTER TABLE ... REPLICA IDENTITY FULL",
        names.join(", ")
    )))
}

/// Looks the slot up; a slot of another plugin or database is an error.
pub async fn slot_state(client: &Client, slot: &str) -> Result<SlotState> {
    let row = client
        .query_opt(
            "SELECT plugin, database, current_database(), active_pid, confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(SlotState::Missing);
    };
    let plugin: Option<String> = row.get(0);
    let database: Option<String> = row.get(1);
    let current: String = row.get(2);
    if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
        return Err(SourceError::Preflight(format!(
            "slot {slot:?} exists but is not a pgoutput slot of database {current:?} (plugin {plugin:?}, database \
             {database:?}): configure another slot name"
        )));
    }
    let confirmed: Option<String> = row.get(4);
    Ok(SlotState::Present {
        active_pid: row.get(3),
        confirmed_flush: confirmed.and_then(|s| s.parse().ok()),
        wal_status: row.get(5),
    })
}

/// Drops a slot walsync owns, waiting for a previous reader of it to go away.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    tracing::info!(slot, "dropping walsync's own slot");
    for _ in 0..100 {
        if let SlotState::Present {
            active_pid: Some(pid),
            ..
        } = slot_state(client, slot).await?
        {
            // Our own earlier connection may still be exiting; end it rather than wait for the
            // server's timeout.
            client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => match SourceError::from(e) {
                SourceError::Server { code, .. } if code == "55006" => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                SourceError::Server { code, .. } if code == "42704" => return Ok(()),
                e => return Err(e),
            },
        }
    }
    Err(SourceError::Preflight(format!(
        "slot {slot:?} stays in use by another connection"
    )))
}
