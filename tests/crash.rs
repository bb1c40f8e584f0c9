//! The whole `walsync serve` process SIGKILLed at random moments (during the initial snapshot,
//! during rebuilds after the slot was lost, mid-transaction, mid-upload) while the application writes a mixed workload (inserts,
//! updates, deletes, membership changes, moves between projects), a writer uploads through
//! `POST /write`, and clients over both transports stream, each reconnecting with what it holds
//! after every kill. After each kill PostgreSQL's `confirmed_flush_lsn` is at most what the
//! store had made durable; at the end every client holds exactly what the rules select from
//! PostgreSQL for its user (the clients check every checkpoint's checksums and that no op comes
//! at or below what they hold), and every upload is written exactly once.
//!
//! 20 kills in the test command; `WALSYNC_CRASH_KILLS=200 cargo test -p walsync-tests --test
//! crash` for the long variant.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::process::{free_port, serve, token, wait_ready};
use support::{converge, seed, service};
use walsync_client::{Connector, SyncClient, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_at_random_moments_loses_nothing_and_repeats_nothing() -> anyhow::Result<()> {
    let kills: usize = std::env::var("WALSYNC_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20);
    let s = seed::setup().await?;
    // A writer of its own, owner of a project nobody else's changes touch.
    s.sql
        .batch_execute(
            "INSERT INTO projects (id, name) VALUES (7, 'uploads');
             INSERT INTO project_members (project_id, user_id, role) VALUES (7, 'w1', 'owner');
             CREATE FUNCTION keep_w1() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF OLD.user_id = 'w1' THEN RETURN NULL; END IF; RETURN OLD; END $$;
             CREATE TRIGGER keep_w1 BEFORE DELETE ON project_members
               FOR EACH ROW EXECUTE FUNCTION keep_w1();",
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("store");
    let log = std::fs::File::create(dir.path().join("serve.log"))?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    walsync_client::install_crypto();

    // The application: a mixed workload for the whole run.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work = seed::application(s.url.clone(), done.clone());
    // The writer: one upload after another, each retried (same transaction id) until answered.
    let uploads = {
        let url = url.clone();
        let done = done.clone();
        let token = token("w1")?;
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?;
            let mut sent = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                let body = json!({"client_id": "writer", "batch": [{"tx_id": sent, "ops": [
                    {"op_id": sent, "op": "PUT", "type": "teams", "id": (1_000_000 + sent).to_string(),
                     "data": {"project_id": 7, "name": format!("team {sent}")}}]}]});
                loop {
                    let answer = http
                        .post(format!("{url}/write"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await;
                    if let Ok(r) = answer
                        && r.status().is_success()
                    {
                        let reply: serde_json::Value = r.json().await?;
                        match reply["results"][0]["status"].as_str() {
                            Some("applied") => break,
                            Some("rejected") => anyhow::bail!("upload {sent} rejected: {reply}"),
                            _ => {}
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            anyhow::Ok(sent)
        })
    };

    // Clients over both transports; the writer's own too.
    let mut clients: Vec<(String, SyncClient)> = Vec::new();
    for (i, user) in ["u1", "u2", "u3", "u4", "w1"].into_iter().enumerate() {
        let transport = if i % 2 == 0 {
            Transport::Http
        } else {
            Transport::Grpc
        };
        let connector = Connector::new(&url, transport, &token(user)?)?;
        clients.push((
            user.to_owned(),
            SyncClient::new(connector, &format!("c{i}")),
        ));
    }

    let mut seed_rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        seed_rng ^= seed_rng << 13;
        seed_rng ^= seed_rng >> 7;
        seed_rng ^= seed_rng << 17;
        seed_rng % n
    };
    let mut killed = 0;
    let mut rebuilds = 0;
    for life in 0..kills {
        let mut server = serve(BIN, &s, &data, port, &log, &[])?;
        // The first lives die during the initial snapshot or right after it; later ones after
        // some streaming, uploading and compacting.
        let wait = if life < 2 {
            50 + next(150)
        } else {
            100 + next(1400)
        };
        // Until the server answers, the clients keep trying to connect.
        let followers = converge::Followers::start(clients, Some(converge::APPLICATION));
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if server.0.try_wait()?.is_none() {
            server.0.kill()?;
            killed += 1;
        }
        server.0.wait()?;
        clients = followers
            .end()
            .await
            .map_err(|e| anyhow::anyhow!("after life {life}: {e}"))?;
        // The ack rule across the kill: the slot never passed what the store made durable.
        service::ack_rule_held(&s, &data)
            .await
            .map_err(|e| anyhow::anyhow!("life {life}: {e}"))?;
        // Now and then the slot is lost while walsync is down: the next lives rebuild (a new
        // slot, the tables copied anew into what the store holds) and are killed meanwhile.
        if life % 7 == 4 {
            drop_slot(&s).await?;
            rebuilds += 1;
        }
    }
    assert!(
        killed >= kills * 3 / 4,
        "the server was running when killed ({killed} of {kills})"
    );

    // Stop writing; one last life that is not killed.
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = work.await??;
    let server = serve(BIN, &s, &data, port, &log, &[])?;
    let ready = wait_ready(port).await;
    let uploaded = uploads.await??;
    if let Err(e) = ready {
        eprintln!("{}", std::fs::read_to_string(dir.path().join("serve.log"))?);
        return Err(e);
    }
    converge::converged(&s, &mut clients, Duration::from_secs(60)).await?;
    // Every upload written once: as many rows as uploads, none updated by a repeat.
    let (rows, repeated): (i64, i64) = {
        let r = s
            .sql
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE _version <> 1) FROM teams WHERE id > 1000000",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    let connects: Vec<u64> = clients.iter().map(|(_, c)| c.connects).collect();
    eprintln!(
        "{killed} kills; {rebuilds} slots lost; {rounds} workload rounds; {uploaded} uploads; client connects {connects:?}"
    );
    assert!(uploaded > 0 && connects.iter().all(|c| *c > 1));
    assert_eq!(rows as u64, uploaded, "every upload written");
    assert_eq!(repeated, 0, "no upload written twice");
    drop(server);
    Ok(())
}

/// Drops the test's slot once its walsender (of a killed server) has let it go.
async fn drop_slot(s: &seed::Setup) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = s
            .sql
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE slot_name = $1 AND NOT active",
                &[&s.slot],
            )
            .await?;
        let left: i64 = s
            .sql
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await?
            .get(0);
        if dropped > 0 || left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the killed server's walsender never let the slot go"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
