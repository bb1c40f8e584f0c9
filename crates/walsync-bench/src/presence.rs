//! `walsync-bench presence`: presence fan-out against a `walsync serve` child process.
//!
//! U users in R rooms (a project's bucket each, U/R members a room), each with one gRPC
//! `Presence` stream (streams share HTTP/2 connections, as gRPC clients do) that joins its room
//! and watches it. Then, for each target rate, members send ephemeral messages carrying their
//! send time for a fixed window; every watcher of the room receives each. Reported: messages
//! delivered per second and the latency from send to delivery (p50/p95/p99), with the server's
//! memory. Client and server share this machine's cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use walsync_protocol::pb;
use walsync_testkit::{Cluster, ClusterOptions};

use crate::sync::{TABLES, channels, percentile, start_server, token, wait_ready};

#[derive(Debug, Args)]
pub(crate) struct PresenceArgs {
    /// Connected users, each one presence stream.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Rooms (projects); users are spread over them evenly.
    #[arg(long, default_value_t = 1_000)]
    rooms: usize,
    /// Messages sent per second, in all, one run each.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000,20000")]
    rates: Vec<u64>,
    /// Seconds each rate runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
}

pub(crate) fn run(args: PresenceArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// What the receiving side counts.
#[derive(Default)]
struct Received {
    delivered: AtomicU64,
    /// Send-to-delivery latencies in microseconds, of the run being measured.
    latencies: std::sync::Mutex<Vec<u64>>,
}

async fn bench(args: PresenceArgs) -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let sql = db.connect().await?;
    sql.batch_execute(TABLES).await?;
    sql.batch_execute(&format!(
        "INSERT INTO projects SELECT i, 'room' FROM generate_series(1, {r}) i;
         INSERT INTO members SELECT 'c' || i, 1 + i % {r} FROM generate_series(0, {u} - 1) i;",
        r = args.rooms,
        u = args.users,
    ))
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("walsync-bench-presence-")
        .tempdir()?;
    let server = start_server(dir.path(), &db.url)?;
    wait_ready(&server.url).await?;
    println!(
        "walsync-bench presence: {} (server: `walsync serve` child process; clients: gRPC Presence streams in this process)\n",
        super::machine_facts()
    );

    let epoch = Instant::now();
    let received = Arc::new(Received::default());
    let conns = channels(&server.url, args.users.div_ceil(args.per_connection.max(1))).await?;
    let rss_before = server.rss_kib();
    let mut senders = Vec::with_capacity(args.users);
    let opened = Instant::now();
    for i in 0..args.users {
        let channel = conns[i / args.per_connection.max(1)].clone();
        let room = format!("user_projects[{}]", 1 + i % args.rooms);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PresenceAction>(64);
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|a| (a, rx)) },
            );
        let mut client = pb::sync_client::SyncClient::new(channel);
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token(&format!("c{i}"))?).parse()?,
        );
        let action = |action: &str, state: &str| pb::PresenceAction {
            action: action.into(),
            client_id: format!("c{i}"),
            room: room.clone(),
            state_json: state.into(),
            data_json: String::new(),
        };
        tx.send(action("join", &format!("{{\"i\":{i}}}"))).await?;
        tx.send(action("watch", "")).await?;
        let mut events = client.presence(req).await?.into_inner();
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = events.message().await {
                // Only messages count; their data is the send time in µs since `epoch`.
                let Some(at) = event.json.find("\"data\":") else {
                    continue;
                };
                let sent: u64 = event.json[at + 7..]
                    .trim_end_matches('}')
                    .parse()
                    .unwrap_or(0);
                let now = epoch.elapsed().as_micros() as u64;
                received.delivered.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut l) = received.latencies.lock() {
                    l.push(now.saturating_sub(sent));
                }
            }
        });
        senders.push(tx);
    }
    let open_secs = opened.elapsed().as_secs_f64();
    // Every join reached its room's watchers before the runs begin.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = server.rss_kib();
    println!(
        "{} users joined and watching {} rooms in {open_secs:.1} s over {} HTTP/2 connections; server RSS {:.0} MiB before, {:.0} MiB after ({:.1} KiB a user)\n",
        args.users,
        args.rooms,
        conns.len(),
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
        rss_open.saturating_sub(rss_before) as f64 / args.users.max(1) as f64
    );
    println!(
        "| users | rooms | members a room | target sends/s | sent | delivered | delivered/s | p50 ms | p95 ms | p99 ms | max ms | server RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let senders = Arc::new(senders);
    for &rate in &args.rates {
        received.delivered.store(0, Ordering::Relaxed);
        if let Ok(mut l) = received.latencies.lock() {
            l.clear();
        }
        // Sending tasks, each a share of the rate, in ticks of 10 ms.
        let tasks = 4usize;
        let started = Instant::now();
        let window = Duration::from_secs(args.seconds);
        let sent = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for t in 0..tasks {
            let senders = senders.clone();
            let sent = sent.clone();
            handles.push(tokio::spawn(async move {
                let per_tick = rate as f64 / tasks as f64 / 100.0;
                let mut owed = 0.0;
                let mut next_user = t;
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while started.elapsed() < window {
                    tick.tick().await;
                    owed += per_tick;
                    while owed >= 1.0 {
                        owed -= 1.0;
                        let user = next_user % senders.len();
                        next_user += tasks;
                        let data = epoch.elapsed().as_micros().to_string();
                        let action = pb::PresenceAction {
                            action: "message".into(),
                            client_id: String::new(),
                            room: format!("user_projects[{}]", 1 + user % args.rooms),
                            state_json: String::new(),
                            data_json: data,
                        };
                        if senders[user].try_send(action).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for h in handles {
            h.await?;
        }
        // Deliveries still in flight arrive within a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let delivered = received.delivered.load(Ordering::Relaxed);
        let mut lat = received
            .latencies
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        lat.sort_unstable();
        println!(
            "| {} | {} | {} | {rate} | {} | {delivered} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} MiB |",
            args.users,
            args.rooms,
            args.users / args.rooms.max(1),
            sent.load(Ordering::Relaxed),
            delivered as f64 / (elapsed - 1.0).max(0.001),
            percentile(&lat, 0.50),
            percentile(&lat, 0.95),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
            server.rss_kib() as f64 / 1024.0
        );
    }
    Ok(())
}
