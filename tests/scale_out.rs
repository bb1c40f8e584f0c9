//! Scale-out on PostgreSQL: two replicator candidates and three API nodes, each a `walsync
//! serve` process on loopback, share one store in a storage database of its own, while the
//! application writes a mixed workload and clients over both transports stream from the API
//! nodes. The active replicator is SIGKILLed (the standby takes over), the new one's session
//! with the storage database is ended (it waits and takes the lock again), then an API node (its
//! clients move to the others and resume with what they hold: op ids and checksums live in the
//! shared store, so no duplicate and no gap), and a write checkpoint asked of one node reaches
//! the client's stream on another, and a member of a presence room on one node is seen by a
//! watcher on another. The clients check every checkpoint's checksums and
//! that no op comes at or below what they hold; at the end every client holds exactly what the
//! rules select from PostgreSQL for its user.
//!
//! `WALSYNC_SOAK_SECONDS=600 cargo test -p walsync-tests --test scale_out` for the long variant
//! (API nodes keep taking checkpoints for that long before the kills).

use std::sync::Arc;
use std::time::Duration;

use support::process::{Killed, free_port, serve_with, token, wait_ready};
use support::{converge, seed, service};
use walsync_client::{Connector, SyncClient, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");

struct Node {
    port: u16,
    process: Killed,
}

fn start(
    s: &seed::Setup,
    storage: &str,
    role: &str,
    dir: &std::path::Path,
    log: &std::fs::File,
) -> anyhow::Result<Node> {
    let port = free_port()?;
    let process = serve_with(
        BIN,
        s,
        &dir.join(format!("unused-{port}")),
        port,
        log,
        &[
            ("WALSYNC__STORAGE__POSTGRES__URL", storage),
            ("WALSYNC__STORAGE__POSTGRES__POLL_MS", "200"),
            // Members of presence rooms whose node died leave the others this soon.
            ("WALSYNC__SYNC__PRESENCE__TIMEOUT_SECONDS", "2"),
        ],
        &["--role", role],
    )?;
    Ok(Node { port, process })
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The op id of the first checkpoint a new stream of `u1` gets from the node on `port`.
async fn first_checkpoint(port: u16) -> anyhow::Result<u64> {
    let connector = Connector::new(&url(port), Transport::Http, &token("u1")?)?;
    let mut lines = connector
        .open(walsync_protocol::SyncRequest::default())
        .await?;
    while let Some(line) = futures_util::StreamExt::next(&mut lines).await {
        if let walsync_protocol::Line::Checkpoint(c) = line? {
            return Ok(c.last_op_id);
        }
    }
    anyhow::bail!("the stream ended before its first checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_and_api_nodes_fail_over_without_loss_or_repeat() -> anyhow::Result<()> {
    let soak: u64 = std::env::var("WALSYNC_SOAK_SECONDS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3);
    let s = seed::setup().await?;
    let storage = walsync_testkit::shared().fresh_database().await?;
    let dir = tempfile::tempdir()?;
    let log = std::fs::File::create(dir.path().join("nodes.log"))?;
    let dump_log = |what: &str| {
        eprintln!(
            "{what}\n{}",
            std::fs::read_to_string(dir.path().join("nodes.log")).unwrap_or_default()
        );
    };
    walsync_client::install_crypto();

    let first = start(&s, &storage.url, "replicator", dir.path(), &log)?;
    if let Err(e) = wait_ready(first.port).await {
        dump_log("the first replicator never became ready");
        return Err(e);
    }
    let standby = start(&s, &storage.url, "replicator", dir.path(), &log)?;
    let mut apis = Vec::new();
    for _ in 0..3 {
        apis.push(start(&s, &storage.url, "api", dir.path(), &log)?);
    }
    for api in &apis {
        wait_ready(api.port).await?;
    }
    // Who replicates says so; API nodes and the standby report no replication state (else
    // they would say "connecting" forever, and alert).
    const LEADING: &str = "walsync_replicator_leading";
    const STATE: &str = "walsync_replication_state";
    anyhow::ensure!(service::metric(&url(first.port), LEADING).await? == 1.0);
    anyhow::ensure!(service::metric(&url(first.port), STATE).await? == 1.0);
    for node in apis.iter().chain([&standby]) {
        anyhow::ensure!(service::metric(&url(node.port), LEADING).await? == 0.0);
        anyhow::ensure!(service::metric(&url(node.port), STATE).await? == 0.0);
    }

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work = seed::application(s.url.clone(), done.clone());
    // Clients spread over the API nodes, both transports.
    let mut clients: Vec<(String, SyncClient)> = Vec::new();
    for (i, user) in ["u1", "u2", "u3", "u4", "u1", "u2"].into_iter().enumerate() {
        let transport = if i % 2 == 0 {
            Transport::Http
        } else {
            Transport::Grpc
        };
        let port = apis[i % apis.len()].port;
        let connector = Connector::new(&url(port), transport, &token(user)?)?;
        clients.push((
            user.to_owned(),
            SyncClient::new(connector, &format!("c{i}")),
        ));
    }
    let followers = converge::Followers::start(clients, Some(converge::APPLICATION));
    // Throughout, every API node takes each new checkpoint of the store: a stream opened on it
    // starts at or after the checkpoint the store had a moment before.
    let (storage_sql, conn) = tokio_postgres::connect(&storage.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let soak_end = std::time::Instant::now() + Duration::from_secs(soak);
    let mut looks = 0;
    while std::time::Instant::now() < soak_end || looks == 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stored: i64 = storage_sql
            .query_one(
                "SELECT (convert_from(value, 'UTF8')::json->>'op_id')::bigint \
                 FROM walsync_store.meta WHERE key = convert_to('checkpoint', 'UTF8')",
                &[],
            )
            .await?
            .get(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        for api in &apis {
            let seen = first_checkpoint(api.port).await?;
            anyhow::ensure!(
                seen >= stored as u64,
                "an API node served checkpoint {seen}, older than the store's {stored} of half a second before"
            );
        }
        looks += 1;
    }

    // The active replicator dies: the standby takes the store's write lock and the slot. The
    // slot never confirmed more than the shared store holds, before and after.
    let shared = walsync_storage::KvStore::open_postgres(
        walsync_storage::connect_without_tls(&storage.url),
        "walsync_store",
        1,
    )?;
    let mut first = first;
    first.process.0.kill()?;
    first.process.0.wait()?;
    service::ack_rule_held_in(&s, &shared).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while service::metric(&url(standby.port), LEADING).await? != 1.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the standby never said it replicates"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The new replicator's session with the storage database ends (a restart of that server,
    // an administrator): it waits, takes the lock again (nobody else wants it) and goes on.
    let ended: i64 = storage_sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND ((classid::bigint << 32) | objid::bigint) \
                 = hashtext('walsync store walsync_store')::bigint",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        ended, 1,
        "the active replicator held the store's write lock"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    service::ack_rule_held_in(&s, &shared).await?;
    let mut clients = followers
        .end()
        .await
        .inspect_err(|_| dump_log("after the replicator's death"))?;

    // An API node dies: its clients move to the others, with what they hold.
    let gone = apis.remove(1);
    drop(gone);
    for (i, (user, client)) in clients.iter_mut().enumerate() {
        let transport = client.connector().transport();
        let port = apis[i % apis.len()].port;
        *client.connector_mut() = Connector::new(&url(port), transport, &token(user)?)?;
    }
    let followers = converge::Followers::start(clients, Some(converge::APPLICATION));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut clients = followers
        .end()
        .await
        .inspect_err(|_| dump_log("after the api node's death"))?;

    done.store(true, std::sync::atomic::Ordering::Relaxed);
    work.await??;
    let converged = converge::converged(&s, &mut clients, Duration::from_secs(60)).await;
    let text = std::fs::read_to_string(dir.path().join("nodes.log")).unwrap_or_default();
    if converged.is_err() {
        dump_log("never converged");
    }
    converged?;
    // A write checkpoint asked of one node reaches the client's stream on another (a load
    // balancer sends the request where it likes).
    let (user, client) = &mut clients[0];
    let asked = Connector::new(&url(apis[1].port), Transport::Http, &token(user)?)?
        .write_checkpoint("c0")
        .await?;
    client
        .until(Duration::from_secs(30), |st| {
            st.write_checkpoint().is_some_and(|w| w >= asked)
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!("the write checkpoint asked of another node never came: {e}")
        })?;

    // Presence across nodes: u2 watches the room of a project of theirs on one node, u1 joins
    // it, says something and leaves on another.
    const ROOM: &str = "user_projects[900]";
    s.sql
        .batch_execute(
            "INSERT INTO projects (id, name) VALUES (900, 'presence');
             INSERT INTO project_members (project_id, user_id, role)
               VALUES (900, 'u1', 'editor'), (900, 'u2', 'editor');",
        )
        .await?;
    async fn next(
        events: &mut walsync_client::PresenceEvents,
    ) -> anyhow::Result<serde_json::Value> {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(Some(e)) => Ok(e?),
            Ok(None) => anyhow::bail!("the watch ended"),
            Err(_) => anyhow::bail!("no presence event from another node"),
        }
    }
    let watcher = Connector::new(&url(apis[1].port), Transport::Http, &token("u2")?)?;
    // Once the membership reached the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut watch = loop {
        match watcher.presence_watch(ROOM).await {
            Ok(w) => break w,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    anyhow::ensure!(next(&mut watch).await?["type"] == "members");
    let u1 = Connector::new(&url(apis[0].port), Transport::Http, &token("u1")?)?;
    u1.presence_post(&serde_json::json!({"action": "join", "client_id": "laptop", "room": ROOM, "state": {"status": "typing"}}))
        .await?;
    let joined = next(&mut watch).await?;
    anyhow::ensure!(
        joined["type"] == "join" && joined["member"]["state"]["status"] == "typing",
        "{joined}"
    );
    u1.presence_post(&serde_json::json!({"action": "message", "client_id": "laptop", "room": ROOM, "data": "hello"}))
        .await?;
    anyhow::ensure!(next(&mut watch).await?["data"] == "hello");
    u1.presence_post(&serde_json::json!({"action": "leave", "client_id": "laptop", "room": ROOM}))
        .await?;
    let left = next(&mut watch).await?;
    anyhow::ensure!(
        left["type"] == "leave" && left["reason"] == "left",
        "{left}"
    );
    // u1 joins again, and its node dies: the other nodes let it go after the timeout.
    u1.presence_post(
        &serde_json::json!({"action": "join", "client_id": "laptop", "room": ROOM, "state": {}}),
    )
    .await?;
    anyhow::ensure!(next(&mut watch).await?["type"] == "join");
    // A node that starts now learns of u1 from the others (u1 heartbeats meanwhile, so that it
    // stays within the short presence timeout).
    let beating = {
        let u1 = u1.clone();
        tokio::spawn(async move {
            loop {
                let _ = u1
                    .presence_post(
                        &serde_json::json!({"action": "heartbeat", "client_id": "laptop"}),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let late = start(&s, &storage.url, "api", dir.path(), &log)?;
    wait_ready(late.port).await?;
    let late_watcher = Connector::new(&url(late.port), Transport::Http, &token("u2")?)?;
    // At most eight watches, a second apart (a user may hold ten streams at once).
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let mut w = late_watcher.presence_watch(ROOM).await?;
        let members = next(&mut w).await?;
        if members["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["user_id"] == "u1"))
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a node started later never learned of u1: {members}"
        );
        drop(w);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    beating.abort();
    drop(late);
    let dead = apis.remove(0);
    drop(dead);
    let gone = next(&mut watch).await?;
    anyhow::ensure!(
        gone["type"] == "leave" && gone["reason"] == "timeout" && gone["user_id"] == "u1",
        "{gone}"
    );
    assert!(
        text.contains("standing by: another walsync process replicates into the store"),
        "the second replicator stood by"
    );
    assert!(
        text.contains("took over replication"),
        "the standby took over"
    );
    if std::env::var_os("WALSYNC_SHOW_LOG").is_some() {
        dump_log("the nodes' log");
    }
    drop(standby);
    Ok(())
}
