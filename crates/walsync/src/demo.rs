//! `walsync demo`: the whole pipeline on a throwaway PostgreSQL, in one command.
//!
//! It starts PostgreSQL (`wal_level=logical`), loads the seed app's schema, sample data and sync
//! rules, runs the replicator, and lets simulated interviewers edit responses, move assessments
//! and change project memberships. A "client" per user follows along: at each checkpoint it
//! resolves the user's buckets, applies the new ops, verifies every bucket's checksum, and prints
//! what changed. (The HTTP and gRPC sync API will let real clients do the same.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::watch;
use walsync_replicator::{Progress, ReplicatorConfig};
use walsync_rules::{RequestContext, SyncRules};
use walsync_source::{PgConfig, SourceConfig};
use walsync_storage::conformance::ClientBucket;
use walsync_storage::{EmbeddedStore, StoreRead, request_buckets};
use walsync_testkit::{Cluster, ClusterOptions};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

const SCHEMA: &str = include_str!("../../../examples/seed/schema.sql");
const RULES: &str = include_str!("../../../examples/seed/sync_rules.yaml");
const USERS: &[&str] = &["ada", "grace", "linus"];
const SAMPLE: &str = "
INSERT INTO projects (id, name, organization_name) VALUES
  (1, 'Platform migration', 'Acme'), (2, 'Data strategy', 'Globex'), (3, 'Security review', 'Initech');
INSERT INTO project_members (project_id, user_id, role) VALUES
  (1, 'ada', 'owner'), (1, 'grace', 'editor'), (2, 'grace', 'owner'), (3, 'linus', 'owner');
INSERT INTO stakeholders (id, user_id, name, title) VALUES
  (1, 'ada', 'Ada L.', 'CTO'), (2, 'grace', 'Grace H.', 'Architect'), (3, 'linus', 'Linus T.', 'Lead');
INSERT INTO assessments (id, project_id, phase, tier) SELECT i, 1 + i % 3, 'discovery', 'tier-1' FROM generate_series(1, 6) i;
INSERT INTO assessment_responses (assessment_id, project_id, question_id, question_text, answer)
  SELECT 1 + i % 6, 1 + (1 + i % 6) % 3, 'q' || i, 'Question ' || i, 'first answer' FROM generate_series(1, 60) i;
";

/// A user's view, kept the way a client keeps it.
#[derive(Default)]
struct Client {
    buckets: BTreeMap<String, ClientBucket>,
    checkpoint: u64,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    println!("starting a throwaway PostgreSQL (wal_level=logical) ...");
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(SCHEMA).await?;
    sql.batch_execute(SAMPLE).await?;
    sql.batch_execute("SELECT setval(pg_get_serial_sequence(t, 'id'), 1000) FROM unnest(ARRAY['projects','project_members','stakeholders','assessments','assessment_responses','teams','sow_section_approvals']) t;").await?;
    println!(
        "PostgreSQL: {}  (seed schema and sample data loaded)",
        db.url
    );

    let rules = Arc::new(SyncRules::from_yaml(RULES)?);
    let dir = tempfile::Builder::new().prefix("walsync-demo-").tempdir()?;
    let store = Arc::new(EmbeddedStore::open(dir.path())?);
    let mut source = SourceConfig::new(db.url.parse::<PgConfig>()?, "walsync_demo", "walsync");
    source.create_publication = Some(walsync_source::PublicationScope::Tables(
        rules
            .tables()
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress_tx, _progress) = watch::channel(Progress::default());
    let replicator = tokio::spawn(walsync_replicator::run(
        ReplicatorConfig::new(source),
        rules.clone(),
        store.clone(),
        stop_rx,
        progress_tx,
    ));
    println!(
        "replicator: store in {}, rules from examples/seed/sync_rules.yaml",
        dir.path().display()
    );
    println!(
        "interviewers {USERS:?} start editing; each line below is what one user's client sees at a checkpoint.\n"
    );

    let writer = tokio::spawn(interviewers(db.url.clone()));
    let mut clients: BTreeMap<&str, Client> =
        USERS.iter().map(|u| (*u, Client::default())).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if args
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        if replicator.is_finished() {
            break;
        }
        let cp = store.checkpoint()?;
        if !cp.snapshot_complete {
            continue;
        }
        for (user, client) in clients.iter_mut() {
            follow(&store, &rules, user, client, cp.op_id)?;
        }
    }
    writer.abort();
    stop_tx.send(true)?;
    match replicator.await? {
        Ok(()) => {}
        Err(e) => println!("replicator stopped: {e}"),
    }
    println!("\nstopped; the throwaway PostgreSQL and the store are removed.");
    Ok(())
}

/// One checkpoint for one user's client: buckets added and removed, new ops applied, checksums
/// verified against the server's.
fn follow(
    store: &EmbeddedStore,
    rules: &SyncRules,
    user: &str,
    client: &mut Client,
    at: u64,
) -> anyhow::Result<()> {
    if at == client.checkpoint {
        return Ok(());
    }
    let request = RequestContext {
        user_id: user.to_owned(),
        ..Default::default()
    };
    let buckets: BTreeSet<String> = request_buckets(store, rules, &request, at)?
        .into_iter()
        .collect();
    let removed: Vec<String> = client
        .buckets
        .keys()
        .filter(|b| !buckets.contains(*b))
        .cloned()
        .collect();
    for b in &removed {
        client.buckets.remove(b);
    }
    let mut changed = Vec::new();
    let states = store.bucket_states(&buckets.iter().cloned().collect::<Vec<_>>())?;
    for (b, state) in buckets.iter().zip(states) {
        let added = !client.buckets.contains_key(b);
        let local = client.buckets.entry(b.clone()).or_default();
        let before = local.last_op_id;
        local.catch_up_to(store, b, at);
        let state = state.unwrap_or_default();
        anyhow::ensure!(
            local.checksum == state.checksum,
            "{user}: checksum of {b} differs from the server's"
        );
        if added && client.checkpoint > 0 {
            changed.push(format!("added {b} ({} rows)", local.rows.len()));
        } else if local.last_op_id != before {
            changed.push(format!("{b} ({} rows)", local.rows.len()));
        }
    }
    let rows: usize = client.buckets.values().map(|c| c.rows.len()).sum();
    if !changed.is_empty() || !removed.is_empty() {
        let mut line = format!(
            "checkpoint {at:>5}  {user:<6} {} buckets, {rows:>3} rows, checksums ok",
            buckets.len()
        );
        if !changed.is_empty() {
            line.push_str(&format!("; {}", changed.join(", ")));
        }
        if !removed.is_empty() {
            line.push_str(&format!("; removed {}", removed.join(", ")));
        }
        println!("{line}");
    }
    client.checkpoint = at;
    Ok(())
}

/// Simulated interviewers: mostly answers, sometimes an assessment moving to another project, a
/// member joining or leaving.
async fn interviewers(url: String) -> anyhow::Result<()> {
    let (sql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut n: u64 = 0;
    loop {
        n += 1;
        let stmt = match n % 10 {
            3 => format!("UPDATE assessments SET project_id = {} WHERE id = {}", 1 + n % 3, 1 + n % 6),
            // User k joins the project after their own, as a viewer (and leaves again at 9).
            6 => format!(
                "INSERT INTO project_members (project_id, user_id, role) VALUES ({}, '{}', 'viewer') ON CONFLICT DO NOTHING",
                1 + (n / 10 + 1) % 3,
                USERS[(n / 10 % 3) as usize]
            ),
            9 => "DELETE FROM project_members WHERE role = 'viewer' AND id = (SELECT min(id) FROM project_members WHERE role = 'viewer')".to_owned(),
            _ => format!(
                "UPDATE assessment_responses SET answer = 'answer {n}', _last_modified_by = '{}' WHERE id = {}",
                USERS[(n % 3) as usize],
                1 + n % 60
            ),
        };
        sql.batch_execute(&stmt).await?;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}
