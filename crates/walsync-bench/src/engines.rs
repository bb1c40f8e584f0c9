//! redb against fjall on the bucket store's write pattern, to choose the embedded engine.
//!
//! Per replicated row the store reads the row's copy, appends an op to its bucket's log, writes
//! the row's copy and updates its bucket's state; a durable commit closes each group of rows.
//! Both engines do exactly that here, with the same keys and values, fsync on every commit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;
use redb::{ReadableTable, TableDefinition};

#[derive(Debug, Args)]
pub(crate) struct EngineArgs {
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Rows per durable commit.
    #[arg(long, default_value_t = 1_000)]
    rows_per_commit: u64,
    /// Rows per bucket (the replicator benchmark's rules put 400 rows in each project).
    #[arg(long, default_value_t = 400)]
    rows_per_bucket: u64,
}

const OPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ops");
const ROWS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rows");
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");

fn payloads(i: u64) -> (String, Vec<u8>, Vec<u8>) {
    let data = format!(
        r#"{{"id":{i},"assessment_id":{},"project_id":{},"question_id":"q-{:05}","question_text":"How does the organisation currently manage change across teams and tools? ({i})","answer":"We run a fortnightly review with the platform team and track outcomes in a shared log.","notes":"follow up in next session","priority":"high","answered_by":{},"answered_at":"2026-11-26 10:00:00+00"}}"#,
        i / 40,
        i / 400,
        i % 97,
        i % 50
    );
    let op = format!(
        r#"{{"k":"Put","t":"assessment_responses","i":"{i}","d":{},"c":123456789}}"#,
        serde_json::Value::String(data.clone())
    );
    let row = format!(
        r#"{{"row":{{"columns":[],"values":[]}},"data":{},"placements":[{{"bucket":"b","checksum":1}}],"lookups":[]}}"#,
        serde_json::Value::String(data)
    );
    (i.to_string(), op.into_bytes(), row.into_bytes())
}

fn redb_run(dir: &std::path::Path, a: &EngineArgs) -> anyhow::Result<(Duration, u64)> {
    let db = redb::Database::create(dir.join("bench.redb"))?;
    let t = Instant::now();
    let mut i = 0;
    while i < a.rows {
        let tx = db.begin_write()?;
        {
            let mut ops = tx.open_table(OPS)?;
            let mut rows = tx.open_table(ROWS)?;
            let mut buckets = tx.open_table(BUCKETS)?;
            let mut states: HashMap<String, u64> = HashMap::new();
            for _ in 0..a.rows_per_commit.min(a.rows - i) {
                let (id, op, row) = payloads(i);
                let bucket = format!("user_projects[{}]", i / a.rows_per_bucket);
                let _ = rows
                    .get(("public.assessment_responses", id.as_str()))?
                    .map(|v| v.value().len());
                ops.insert((bucket.as_str(), i + 1), op.as_slice())?;
                rows.insert(("public.assessment_responses", id.as_str()), row.as_slice())?;
                if !states.contains_key(&bucket) {
                    let prev = buckets
                        .get(bucket.as_str())?
                        .map(|v| v.value().len())
                        .unwrap_or(0);
                    states.insert(bucket.clone(), prev as u64);
                }
                *states.entry(bucket).or_default() += 1;
                i += 1;
            }
            for (b, n) in states {
                buckets.insert(
                    b.as_str(),
                    format!(r#"{{"checksum":1,"count":{n},"last_op_id":{i}}}"#).as_bytes(),
                )?;
            }
        }
        tx.commit()?;
    }
    let elapsed = t.elapsed();
    Ok((elapsed, std::fs::metadata(dir.join("bench.redb"))?.len()))
}

fn fjall_run(dir: &std::path::Path, a: &EngineArgs) -> anyhow::Result<(Duration, u64)> {
    let db = fjall::Database::builder(dir.join("bench.fjall")).open()?;
    let ops = db.keyspace("ops", fjall::KeyspaceCreateOptions::default)?;
    let rows = db.keyspace("rows", fjall::KeyspaceCreateOptions::default)?;
    let buckets = db.keyspace("buckets", fjall::KeyspaceCreateOptions::default)?;
    let t = Instant::now();
    let mut i = 0;
    while i < a.rows {
        let mut batch = db.batch();
        let mut states: HashMap<String, u64> = HashMap::new();
        for _ in 0..a.rows_per_commit.min(a.rows - i) {
            let (id, op, row) = payloads(i);
            let bucket = format!("user_projects[{}]", i / a.rows_per_bucket);
            let row_key = format!("public.assessment_responses\0{id}");
            let _ = rows.get(&row_key)?.map(|v| v.len());
            let mut op_key = bucket.clone().into_bytes();
            op_key.push(0);
            op_key.extend_from_slice(&(i + 1).to_be_bytes());
            batch.insert(&ops, op_key, op);
            batch.insert(&rows, row_key, row);
            if !states.contains_key(&bucket) {
                let prev = buckets.get(&bucket)?.map(|v| v.len()).unwrap_or(0);
                states.insert(bucket.clone(), prev as u64);
            }
            *states.entry(bucket).or_default() += 1;
            i += 1;
        }
        for (b, n) in states {
            batch.insert(
                &buckets,
                b,
                format!(r#"{{"checksum":1,"count":{n},"last_op_id":{i}}}"#),
            );
        }
        batch.commit()?;
        db.persist(fjall::PersistMode::SyncAll)?;
    }
    let elapsed = t.elapsed();
    Ok((elapsed, db.disk_space()?))
}

pub(crate) fn run(a: EngineArgs) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for (name, f) in [
        (
            "redb 4.6",
            redb_run as fn(&std::path::Path, &EngineArgs) -> anyhow::Result<(Duration, u64)>,
        ),
        ("fjall 3.1", fjall_run),
    ] {
        let dir = tempfile_dir()?;
        let (t, bytes) = f(dir.path(), &a)?;
        eprintln!("{name}: {:.2}s, {} MiB", t.as_secs_f64(), bytes / 1048576);
        results.push((name, t, bytes));
    }
    println!(
        "Embedded engine: the bucket store's write pattern ({} rows, durable commit every {} rows)\n",
        a.rows, a.rows_per_commit
    );
    println!("machine: {}\n", super::machine_facts());
    println!("| engine | rows/s | bytes on disk per million rows |");
    println!("|---|---:|---:|");
    for (name, t, bytes) in results {
        println!(
            "| {name} | {:.0} | {:.0} MiB |",
            a.rows as f64 / t.as_secs_f64(),
            bytes as f64 / 1048576.0 * 1e6 / a.rows as f64
        );
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("walsync-bench-")
        .tempdir()?)
}
