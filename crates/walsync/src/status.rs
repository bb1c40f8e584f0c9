//! `walsync status`: a running instance's state at a glance, read from its `GET /admin/status`
//! (protected by `server.admin_token`): PostgreSQL, the slot and the WAL it holds, replication
//! and its lag, the snapshot's progress, the store, the streams. `--json` prints the endpoint's
//! JSON for scripts; `--watch N` reprints every N seconds.

// A command: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::Config;
use crate::telemetry::Status;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The instance (default: the configured listen address).
    #[arg(long)]
    url: Option<String>,
    /// The admin token (default: the configured `server.admin_token`).
    #[arg(long, env = "WALSYNC_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, default_value = "walsync.toml")]
    config: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Reprint every this many seconds until interrupted.
    #[arg(long)]
    watch: Option<u64>,
}

/// Bytes in binary units, for people.
fn bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// A terminal that keeps what is drawn on it, so that indicatif draws a bar into a line.
#[derive(Debug, Default, Clone)]
struct Drawn(std::sync::Arc<std::sync::Mutex<String>>);

impl Drawn {
    fn text(&self) -> String {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

impl indicatif::TermLike for Drawn {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    /// Keeps the last line drawn (indicatif pads it with blanks after).
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        if let Ok(mut t) = self.0.lock()
            && !s.trim().is_empty()
        {
            s.clone_into(&mut t);
        }
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `done` of `total` as an indicatif bar of `width` cells, with the counts.
fn bar(done: u64, total: u64, width: usize) -> String {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let drawn = Drawn::default();
    let target = ProgressDrawTarget::term_like(Box::new(drawn.clone()));
    let pb = ProgressBar::with_draw_target(Some(total.max(done)), target);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "[{{bar:{width}}}] {{pos}} of ~{{len}} rows ({{percent}} %)"
    )) {
        pb.set_style(style.progress_chars("#>-"));
    }
    pb.set_position(done);
    pb.abandon();
    drawn.text().trim_end().to_owned()
}

/// The status as lines for a person.
pub fn render(url: &str, s: &Status, now: u64) -> String {
    let mut out = vec![format!(
        "walsync {} at {url} (read {} s ago)",
        s.version,
        now.saturating_sub(s.checked_at)
    )];
    // One process doing everything says nothing of roles, as before there were any.
    let alone = s.role.is_empty() || (s.role == "all" && s.replicating);
    if !alone {
        out.push(format!(
            "  role         {}{}",
            s.role,
            match (s.role.as_str(), s.replicating) {
                (_, true) => ": replicates into the store",
                ("api", false) => ": serves clients from the store another process replicates into",
                (_, false) => ": standing by; another process replicates into the store",
            }
        ));
    }
    out.push(format!(
        "  postgres     {}",
        if s.source_reachable {
            "reachable"
        } else {
            "NOT REACHABLE: replication waits for it; streams serve what the store holds"
        }
    ));
    out.push(match &s.slot {
        Some(slot) => format!(
            "  slot         {}: {}, wal_status {}; lag {}; retains {} of WAL{}{}",
            slot.name,
            if slot.active { "active" } else { "inactive" },
            slot.wal_status.as_deref().unwrap_or("unknown"),
            bytes(slot.lag_bytes),
            bytes(slot.retained_wal_bytes),
            match slot.wal_budget_bytes {
                Some(budget) => format!(
                    ", {:.0} % of its {} budget",
                    slot.retained_wal_bytes as f64 * 100.0 / budget.max(1) as f64,
                    bytes(budget)
                ),
                None => String::new(),
            },
            match slot.safe_wal_size_bytes {
                Some(safe) if safe <= 0 =>
                    " — AT ITS LIMIT: the slot is about to be lost".to_owned(),
                Some(safe) => format!(
                    " ({} more before max_slot_wal_keep_size)",
                    bytes(safe as u64)
                ),
                None => " (no max_slot_wal_keep_size: the server keeps all of it)".to_owned(),
            }
        ),
        None => "  slot         none (not created yet, or lost)".to_owned(),
    });
    if !s.replicating && !s.role.is_empty() {
        out.push("  replication  not in this process".to_owned());
    } else {
        out.push(format!(
            "  replication  {}: {} rows in {} transactions ({}); lag {:.3} s",
            if s.replication.state.is_empty() {
                "unknown"
            } else {
                s.replication.state.as_str()
            },
            s.replication.rows,
            s.replication.transactions,
            bytes(s.replication.bytes),
            s.replication.lag_seconds
        ));
    }
    let copying = matches!(s.replication.state.as_str(), "snapshotting" | "rebuilding");
    out.push(if s.snapshot.complete && !copying {
        format!(
            "  snapshot     complete ({} rows copied)",
            s.snapshot.rows_copied
        )
    } else {
        match s.snapshot.rows_estimated {
            Some(total) => format!("  snapshot     {}", bar(s.snapshot.rows_copied, total, 30)),
            None => format!(
                "  snapshot     running: {} rows copied",
                s.snapshot.rows_copied
            ),
        }
    });
    out.push(format!(
        "  store        {} on disk; {} ops in {} buckets, ~{} rows",
        bytes(s.store_size_bytes),
        s.store.ops,
        s.store.buckets,
        s.store.rows
    ));
    out.push(format!("  streams      {}", s.streams));
    let u = &s.uploads;
    out.push(format!(
        "  uploads      {} applied, {} rejected ({} denied), {} to retry; {} conflicts",
        u.applied, u.rejected, u.denied, u.retryable, u.conflicts
    ));
    if s.recent_problems.is_empty() {
        out.push("  problems     none logged".to_owned());
    } else {
        out.push("  problems     (newest last)".to_owned());
        for p in &s.recent_problems {
            out.push(format!(
                "    {} s ago {}: {}",
                now.saturating_sub(p.at),
                p.level,
                p.message
            ));
        }
    }
    out.join("\n")
}

async fn fetch(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let resp = http
        .get(format!("{url}/admin/status"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("reaching {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the status")?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {message}");
    }
    Ok(body)
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config).ok();
    let url = match (&args.url, &config) {
        (Some(u), _) => u.trim_end_matches('/').to_owned(),
        (None, Some(c)) => format!("http://{}", c.server.listen),
        (None, None) => anyhow::bail!("give --url or a readable config file"),
    };
    let token = match (
        &args.token,
        config.as_ref().and_then(|c| c.server.admin_token.clone()),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.0,
        (None, None) => {
            anyhow::bail!("give --token (or WALSYNC_ADMIN_TOKEN), or set server.admin_token")
        }
    };
    walsync_client::install_crypto();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        loop {
            let body = fetch(&http, &url, &token).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                let status: Status =
                    serde_json::from_value(body).context("an unknown status form")?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if args.watch.is_some() {
                    // Clear the screen and go home, so the summary stays in place.
                    print!("\x1b[2J\x1b[H");
                }
                println!("{}", render(&url, &status, now));
            }
            let Some(every) = args.watch else {
                return anyhow::Ok(());
            };
            tokio::time::sleep(Duration::from_secs(every.max(1))).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{ReplicationStatus, SlotStatus, SnapshotStatus};

    #[test]
    fn a_status_reads_at_a_glance() {
        let s = Status {
            version: "0.1.0".into(),
            role: "all".into(),
            replicating: true,
            checked_at: 100,
            source_reachable: true,
            slot: Some(SlotStatus {
                name: "walsync".into(),
                active: true,
                wal_status: Some("reserved".into()),
                lag_bytes: 0,
                retained_wal_bytes: 3 << 20,
                safe_wal_size_bytes: None,
                wal_budget_bytes: Some(12 << 20),
            }),
            replication: ReplicationStatus {
                state: "rebuilding".into(),
                rows: 1200,
                transactions: 40,
                bytes: 2048,
                lag_seconds: 0.004,
            },
            snapshot: SnapshotStatus {
                complete: true,
                rows_copied: 250,
                rows_estimated: Some(1000),
            },
            store_size_bytes: 1536,
            store: crate::telemetry::StoreStatus {
                ops: 90,
                buckets: 4,
                rows: 80,
            },
            streams: 3,
            uploads: walsync_server::metrics::UploadTotals {
                applied: 7,
                rejected: 2,
                denied: 1,
                retryable: 0,
                conflicts: 3,
            },
            recent_problems: vec![crate::telemetry::Problem {
                at: 90,
                level: "warn".into(),
                message: "replication interrupted, reconnecting error=closed".into(),
            }],
        };
        let text = render("http://x", &s, 102);
        assert!(text.contains("(read 2 s ago)"), "{text}");
        assert!(
            text.contains(
                "walsync: active, wal_status reserved; lag 0 B; retains 3.00 MiB of WAL, 25 % of its 12.00 MiB budget"
            ),
            "{text}"
        );
        assert!(
            text.contains("snapshot     [#######>----------------------] 250 of ~1000 rows (25 %)"),
            "{text}"
        );
        assert!(
            text.contains("replication  rebuilding: 1200 rows in 40 transactions (2.00 KiB)"),
            "{text}"
        );
        assert!(
            text.contains("store        1.50 KiB on disk; 90 ops in 4 buckets, ~80 rows"),
            "{text}"
        );
        assert!(text.contains("streams      3"), "{text}");
        assert!(
            text.contains("uploads      7 applied, 2 rejected (1 denied), 0 to retry; 3 conflicts"),
            "{text}"
        );
        assert!(
            text.contains("12 s ago warn: replication interrupted, reconnecting"),
            "{text}"
        );
    }

    /// An API node says what it is and that replication is another process's.
    #[test]
    fn an_api_node_says_it_does_not_replicate() {
        let s = Status {
            version: "0.1.0".into(),
            role: "api".into(),
            replicating: false,
            checked_at: 100,
            ..Status::default()
        };
        let text = render("http://x", &s, 100);
        assert!(
            text.contains(
                "role         api: serves clients from the store another process replicates into"
            ),
            "{text}"
        );
        assert!(text.contains("replication  not in this process"), "{text}");
        let standby = Status {
            role: "replicator".into(),
            ..s
        };
        assert!(
            render("http://x", &standby, 100).contains("standing by"),
            "{standby:?}"
        );
    }
}
