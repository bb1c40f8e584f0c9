//! `GET /metrics` during a workload: replication, slot health, streams per transport, lines and
//! bytes sent, token failures and write checkpoints move as they should, every metric is
//! described, and no user id appears anywhere. (Its own test binary: the recorder is one per
//! process, so no other test's counts mix in.)

use support::{seed, service};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use walsync::Service;
use walsync_client::{Connector, SyncClient, Transport};
use walsync_server::ServerConfig;

/// Samples by name with labels (`walsync_sync_streams{transport="http"}`).
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(url: &str) -> anyhow::Result<(String, BTreeMap<String, f64>)> {
    let resp = reqwest::get(format!("{url}/metrics")).await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "GET /metrics: {}",
        resp.status()
    );
    let text = resp.text().await?;
    let samples = parse(&text);
    Ok((text, samples))
}

/// Scrapes until `done` holds, for at most 30 s.
async fn scrape_until(
    url: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> anyhow::Result<(String, BTreeMap<String, f64>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (text, samples) = scrape(url).await?;
        if done(&samples) {
            return Ok((text, samples));
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_workload() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let mut config = service::config(&s, ServerConfig::default());
    // A closed HTTP stream is noticed at the next write: keepalives every 2 s.
    config.sync.keepalive_seconds = 2;
    config.server.admin_token = Some(walsync_server::Secret("admin-secret".into()));
    let service = Service::start(config).await?;
    let url = service.url();
    walsync_client::install_crypto();
    let (_, before) = scrape(&url).await?;

    let mut http = SyncClient::new(
        Connector::new(&url, Transport::Http, &service::token("u1"))?,
        "phone",
    );
    let mut grpc = SyncClient::new(
        Connector::new(&url, Transport::Grpc, &service::token("u2"))?,
        "laptop",
    );
    for (user, c) in [("u1", &mut http), ("u2", &mut grpc)] {
        let want = service::expected_for(&s, user).await?;
        c.until(service::WAIT, |st| st.rows() == want).await?;
    }
    let refused = reqwest::Client::new()
        .post(format!("{url}/sync/stream"))
        .header("authorization", "Bearer not.a.token")
        .send()
        .await?;
    assert_eq!(refused.status().as_u16(), 401);
    http.write_checkpoint().await?;
    seed::workload(&s.sql, 5, 100).await?;
    for (user, c) in [("u1", &mut http), ("u2", &mut grpc)] {
        let want = service::expected_for(&s, user).await?;
        c.until(service::WAIT, |st| st.rows() == want).await?;
    }

    // The monitor reads the slot every second here.
    let (text, after) = scrape_until(&url, "no slot health in /metrics", |m| {
        // Compaction runs every second here too.
        value(m, "walsync_slot_active") == 1.0
            && value(m, "walsync_store_size_bytes") > 0.0
            && value(m, "walsync_compaction_runs_total") > 0.0
            && value(m, "walsync_store_ops") > 0.0
            // Updated rows leave superseded data for compaction to drop.
            && value(m, "walsync_compaction_reclaimed_bytes_total") > 0.0
    })
    .await?;
    let grew = |name: &str| value(&after, name) > value(&before, name);
    for name in [
        "walsync_replication_rows_total",
        "walsync_replication_bytes_total",
        "walsync_replication_checkpoint_latency_seconds_count",
        "walsync_replication_transactions_total",
        "walsync_replication_storage_commits_total",
        "walsync_sync_lines_sent_total{transport=\"http\"}",
        "walsync_sync_lines_sent_total{transport=\"grpc\"}",
        "walsync_sync_bytes_sent_total{transport=\"http\"}",
        "walsync_sync_bytes_sent_total{transport=\"grpc\"}",
        "walsync_auth_failures_total{reason=\"invalid\"}",
        "walsync_write_checkpoints_total{outcome=\"created\"}",
        "walsync_sync_checkpoints_total",
        "walsync_compaction_runs_total",
    ] {
        assert!(grew(name), "{name} did not grow:\n{text}");
    }
    for (name, want) in [
        ("walsync_sync_streams{transport=\"http\"}", 1.0),
        ("walsync_sync_streams{transport=\"grpc\"}", 1.0),
        ("walsync_sync_connections", 2.0),
        ("walsync_source_reachable", 1.0),
        ("walsync_replication_state{state=\"streaming\"}", 1.0),
        ("walsync_replication_state{state=\"snapshotting\"}", 0.0),
        ("walsync_snapshot_rows_estimated", 0.0),
        ("walsync_slot_wal_status{status=\"reserved\"}", 1.0),
        ("walsync_slot_wal_status{status=\"lost\"}", 0.0),
    ] {
        assert_eq!(value(&after, name), want, "{name}:\n{text}");
    }
    assert!(after.contains_key("walsync_slot_lag_bytes"), "{text}");
    assert!(
        after.contains_key("walsync_slot_retained_wal_bytes"),
        "{text}"
    );
    assert!(value(&after, "walsync_replication_lag_seconds") >= 0.0);

    // Every sample is walsync's and described; no user id is a label or a value anywhere.
    for name in after.keys() {
        let base = name.split('{').next().unwrap_or(name);
        assert!(base.starts_with("walsync_"), "{name}");
        // A summary's `_sum` and `_count` are described under the summary's own name.
        let base = ["_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let stem = base.strip_suffix(suffix)?;
                text.contains(&format!("# HELP {stem} ")).then_some(stem)
            })
            .unwrap_or(base);
        assert!(
            text.contains(&format!("# HELP {base} ")),
            "{base} has no help text"
        );
    }
    for user in ["u1", "u2", "phone", "laptop"] {
        assert!(
            !text.contains(&format!("\"{user}\"")),
            "{user} appears in /metrics"
        );
    }

    // `walsync status` reads the same instance through `/admin/status`, behind its own token.
    let admin = reqwest::Client::new();
    for token in [
        None,
        Some("admin-secre"),
        Some(service::token("u1").as_str()),
    ] {
        let mut req = admin.get(format!("{url}/admin/status"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await?.status().as_u16(), 401);
    }
    let status: serde_json::Value = admin
        .get(format!("{url}/admin/status"))
        .bearer_auth("admin-secret")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(status["source_reachable"], true, "{status}");
    assert_eq!(status["slot"]["active"], true, "{status}");
    assert_eq!(status["snapshot"]["complete"], true, "{status}");
    assert_eq!(status["streams"], 2, "{status}");
    assert!(status["replication"]["rows"].as_u64() > Some(0), "{status}");
    assert_eq!(status["replication"]["state"], "streaming", "{status}");
    assert!(status["store"]["ops"].as_u64() > Some(0), "{status}");
    assert_eq!(
        status["store"]["buckets"].as_f64(),
        Some(value(&after, "walsync_store_buckets")),
        "{status}"
    );
    let bin = env!("CARGO_BIN_EXE_walsync-cli");
    let out = std::process::Command::new(bin)
        .args(["status", "--url", &url, "--token", "admin-secret"])
        .output()?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    for part in [
        "postgres     reachable",
        "slot         ",
        ": active, wal_status reserved",
        "snapshot     complete",
        "replication  streaming: ",
        "streams      2",
        "uploads      ",
    ] {
        assert!(printed.contains(part), "{part:?} missing:\n{printed}");
    }
    let out = std::process::Command::new(bin)
        .args(["status", "--json", "--url", &url])
        .env("WALSYNC_ADMIN_TOKEN", "admin-secret")
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["slot"]["name"], status["slot"]["name"]);
    let out = std::process::Command::new(bin)
        .args(["status", "--url", &url, "--token", "wrong"])
        .output()?;
    assert!(!out.status.success());

    // A stream that ends is no longer counted.
    drop(http);
    scrape_until(&url, "the closed stream is still counted", |m| {
        value(m, "walsync_sync_streams{transport=\"http\"}") == 0.0
    })
    .await?;
    service.stop().await;
    Ok(())
}
