//! Faults of the network between walsync and PostgreSQL and between clients and walsync, made
//! by the testkit's fault proxy while the application writes (the seed workload and whole
//! transactions of many rows), and PostgreSQL itself restarted mid-transaction and mid-stream.
//! Each time: clients never see a checksum fail, an op repeated or part of a transaction, and
//! at the end hold exactly what the rules select from PostgreSQL for them (`converge`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::converge::{self, Atomic, Followers};
use support::{seed, service};
use walsync::Service;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_server::ServerConfig;
use walsync_testkit::{Cluster, ClusterOptions, Fault, FaultProxy};

use converge::APPLICATION as TEAMS;

/// How long the partition between walsync and PostgreSQL lasts (`WALSYNC_PARTITION_SECONDS`).
fn partition() -> Duration {
    let seconds = std::env::var("WALSYNC_PARTITION_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

/// A client for each seed user at `url`, over HTTP and gRPC in turn.
fn clients(url: &str, tag: &str) -> anyhow::Result<Vec<(String, SyncClient)>> {
    let mut out = Vec::new();
    for (i, user) in walsync_testkit::seed::USERS.iter().enumerate() {
        let transport = if i % 2 == 0 {
            Transport::Http
        } else {
            Transport::Grpc
        };
        let connector = Connector::new(url, transport, &service::token(user))?;
        out.push((
            (*user).to_owned(),
            SyncClient::new(connector, &format!("{tag}{i}")),
        ));
    }
    Ok(out)
}

/// `url` with its port replaced by `port`.
fn through(url: &str, from: u16, port: u16) -> String {
    url.replace(&format!("127.0.0.1:{from}/"), &format!("127.0.0.1:{port}/"))
}

/// Waits for `what` to hold, for at most `wait`.
async fn until(
    what: &str,
    wait: Duration,
    mut cond: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    while !cond().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Between walsync and PostgreSQL: a partition of 30 s, a server that vanishes without a word
/// (half-open: only walsync's receive timeout can tell), connections reset again and again, a
/// slow link and a thin one. walsync says it is not ready while it cannot replicate, keeps
/// serving what it has, and converges once the network heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_a_vanished_server_and_cuts_toward_postgres_lose_nothing() -> anyhow::Result<()>
{
    let Some(pg_port) = walsync_testkit::shared().port() else {
        eprintln!("skipped: WALSYNC_TEST_PG_URL is set, and this test needs a local cluster");
        return Ok(());
    };
    walsync_client::install_crypto();
    let s = seed::setup().await?;
    let proxy = FaultProxy::start(([127, 0, 0, 1], pg_port).into()).await?;
    let mut config = service::config(&s, ServerConfig::default());
    config.postgres.url = through(&s.url, pg_port, proxy.port());
    config.postgres.receive_timeout_seconds = 4;
    let service = Service::start(config).await?;
    let url = service.url();
    service::until_ready_is(&url, 200, service::WAIT).await?;

    let done = Arc::new(AtomicBool::new(false));
    let app = seed::application(s.url.clone(), done.clone());
    let followers = Followers::start(clients(&url, "c")?, Some(TEAMS));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A partition: the replication connection goes quiet, walsync gives it up after its receive
    // timeout and cannot make another, so it says it is not ready; it stays up meanwhile.
    proxy.set(Fault::BlackHole);
    let partitioned = tokio::time::Instant::now();
    let why = service::until_ready_is(&url, 503, partition()).await?;
    eprintln!(
        "not ready {:?} into the partition: {why}",
        partitioned.elapsed()
    );
    let live = reqwest::get(format!("{url}/health/live")).await?;
    assert!(live.status().is_success());
    tokio::time::sleep(partition().saturating_sub(partitioned.elapsed())).await;
    proxy.set(Fault::None);
    service::until_ready_is(&url, 200, Duration::from_secs(60)).await?;

    // PostgreSQL vanishes without a word: its walsender sees the connection close, walsync
    // sees silence, and only its receive timeout ends the wait.
    let accepted = proxy.accepted();
    proxy.set(Fault::HalfOpen);
    until(
        "walsync gives up a silent connection and tries a new one",
        Duration::from_secs(30),
        async || proxy.accepted() > accepted,
    )
    .await?;
    proxy.set(Fault::None);
    service::until_ready_is(&url, 200, Duration::from_secs(60)).await?;

    // Connections reset over and over, then a slow link and a thin one.
    for _ in 0..5 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    proxy.set(Fault::Delay(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::Bandwidth(64 * 1024));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::None);

    done.store(true, Ordering::Relaxed);
    let rounds = app.await??;
    let mut clients = followers.end().await?;
    converge::converged(&s, &mut clients, Duration::from_secs(90)).await?;
    let connects: Vec<u64> = clients.iter().map(|(_, c)| c.connects).collect();
    eprintln!(
        "{rounds} rounds; {} connections to postgres through the proxy; client connects {connects:?}",
        proxy.accepted()
    );
    assert!(rounds > 10, "the application kept writing");
    service.stop().await;
    Ok(())
}

/// Between clients and walsync: a slow link, a thin one, resets, a partition and a vanished
/// client. Clients behind the bad network resume with what they hold and converge; clients on a
/// good one keep up meanwhile; a vanished client's streams end on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_bad_network_converge_and_others_keep_up() -> anyhow::Result<()> {
    walsync_client::install_crypto();
    let s = seed::setup().await?;
    let service = Service::start(service::config(&s, ServerConfig::default())).await?;
    let url = service.url();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    let proxy = FaultProxy::start(addr).await?;
    let proxied = format!("http://{}", proxy.addr());
    service::until_ready_is(&url, 200, service::WAIT).await?;

    let done = Arc::new(AtomicBool::new(false));
    let app = seed::application(s.url.clone(), done.clone());
    let far = Followers::start(clients(&proxied, "far")?, Some(TEAMS));
    let mut near = clients(&url, "near")?;

    for fault in [
        Fault::Delay(Duration::from_millis(100)),
        Fault::Bandwidth(16 * 1024),
        Fault::BlackHole,
    ] {
        proxy.set(fault);
        // Clients on a good link keep up whatever happens to the others.
        // (a write checkpoint asked for now reaches each of them while the application writes).
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (user, client) in &mut near {
            let asked = client.write_checkpoint().await?;
            client
                .until(service::WAIT, |st| {
                    st.write_checkpoint().is_some_and(|w| w >= asked)
                })
                .await
                .map_err(|e| anyhow::anyhow!("{user} during {fault:?}: {e}"))?;
        }
        proxy.set(Fault::None);
        for _ in 0..3 {
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // The clients behind the proxy vanish: the server sees their connections end and lets
    // their streams go.
    let far_clients = far.end().await?;
    let streams = || service::metric(&url, "walsync_sync_connections");
    // The near clients' four streams are open; the far clients open theirs.
    let far = Followers::start(far_clients, Some(TEAMS));
    until("the far clients stream again", service::WAIT, async || {
        streams().await.is_ok_and(|n| n == 8.0)
    })
    .await?;
    proxy.set(Fault::HalfOpen);
    until(
        "the server lets a vanished client's streams go",
        service::WAIT,
        async || streams().await.is_ok_and(|n| n == 4.0),
    )
    .await?;
    let mut far_clients = far.end().await?;
    proxy.set(Fault::None);
    // Their liveness timer would notice the silence; here they are told to reconnect.
    for (_, c) in &mut far_clients {
        c.disconnect();
    }

    done.store(true, Ordering::Relaxed);
    app.await??;
    far_clients.extend(near);
    converge::converged(&s, &mut far_clients, Duration::from_secs(90)).await?;
    service.stop().await;
    Ok(())
}

/// PostgreSQL crashes (immediate shutdown) while walsync reads a transaction of many rows, and
/// again under the running workload: walsync reconnects, reads the slot again from what it made
/// durable, and no client ever holds part of a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_transaction_and_mid_stream_loses_nothing() -> anyhow::Result<()> {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: WALSYNC_TEST_PG_URL is set, and this test restarts its own cluster");
        return Ok(());
    }
    walsync_client::install_crypto();
    let cluster = Cluster::start(ClusterOptions::default())?;
    let db = cluster.fresh_database().await?;
    let mut s = seed::setup_in(&db).await?;
    let mut config = service::config(&s, ServerConfig::default());
    config.postgres.receive_timeout_seconds = 10;
    let service = Service::start(config).await?;
    let url = service.url();
    service::until_ready_is(&url, 200, service::WAIT).await?;
    const BIG: usize = 20_000;
    let big = Atomic {
        object_type: "teams",
        field: "_last_modified_by",
        prefix: "big-",
        size: BIG,
    };
    let followers = Followers::start(clients(&url, "c")?, Some(big.clone()));
    let followers_small = Followers::start(clients(&url, "d")?, Some(TEAMS));

    for (i, wait_ms) in [20u64, 150, 400].into_iter().enumerate() {
        s.sql
            .batch_execute(&format!(
                "INSERT INTO teams (project_id, name, _last_modified_by)
                 SELECT 1, repeat('x', 100) || i, 'big-{i}' FROM generate_series(1, {BIG}) i"
            ))
            .await?;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        cluster.crash_restart()?;
        s.reconnect().await?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let app = seed::application(s.url.clone(), done.clone());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.crash_restart()?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    let rounds = app.await??;
    let mut clients = followers.end().await?;
    clients.extend(followers_small.end().await?);
    converge::converged(&s, &mut clients, Duration::from_secs(90)).await?;
    for (user, c) in &clients {
        big.holds(c.state())
            .map_err(|e| anyhow::anyhow!("{user}: {e}"))?;
    }
    eprintln!("{rounds} rounds of the application between the crashes");
    service.stop().await;
    Ok(())
}
