//! Processes that share a store in PostgreSQL: the replicator's election (a process that would
//! replicate waits as a standby until it holds the store's write lock) and how the others learn
//! of new checkpoints (`LISTEN` to the channel every commit notifies, with a poll beside it
//! for a notification lost with its connection).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use walsync_source::PgConfig;
use walsync_storage::{KvStore, StorageError, StoreRead};
use walsync_sync::SyncCore;

/// How often a standby asks for the write lock.
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// Waits until this process holds the store's write lock: `false` when stopped first.
pub async fn lead(
    store: Arc<KvStore>,
    mut stop: watch::Receiver<bool>,
) -> Result<bool, StorageError> {
    let mut told = false;
    loop {
        let s = store.clone();
        let led = tokio::task::spawn_blocking(move || s.try_lead())
            .await
            .map_err(|e| StorageError::Engine(e.to_string()))?;
        match led {
            Ok(true) => {
                if told {
                    tracing::info!("took over replication: this process now writes the store");
                }
                return Ok(true);
            }
            Ok(false) if !told => {
                tracing::info!("standing by: another walsync process replicates into the store");
                told = true;
            }
            Ok(false) => {}
            // The storage database does not answer now: asked again.
            Err(e) => tracing::warn!(error = %e, "cannot ask for the store's write lock"),
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_POLL) => {}
            _ = stopped(&mut stop) => return Ok(false),
        }
    }
}

/// Pokes the sync core whenever the store may hold a new checkpoint, and keeps `served` true
/// while it holds one clients may be given. Runs until `stop`.
pub async fn follow(
    pg: PgConfig,
    channel: String,
    store: Arc<KvStore>,
    core: Arc<SyncCore<KvStore>>,
    served: Arc<AtomicBool>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let poll = poll.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
        let listening = match pg.connect_listening(notes_tx).await {
            Ok(client) => {
                let sql = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
                match client.batch_execute(&sql).await {
                    Ok(()) => Some(client),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for the store's commits; polling");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for the store's commits; polling");
                None
            }
        };
        // A new connection may have missed notifications: look now.
        core.notify_checkpoint();
        loop {
            tokio::select! {
                note = notes.recv(), if listening.is_some() => match note {
                    Some(_) => core.notify_checkpoint(),
                    // The connection closed: made again.
                    None => break,
                },
                _ = ticks.tick() => {
                    core.notify_checkpoint();
                    let s = store.clone();
                    if let Ok(Ok(cp)) = tokio::task::spawn_blocking(move || s.checkpoint()).await {
                        served.store(cp.snapshot_complete, Ordering::Relaxed);
                    }
                    if listening.is_none() {
                        break;
                    }
                },
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

/// Returns once `stop` is set (its guard not held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
