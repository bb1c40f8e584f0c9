//! Processes that share a store in PostgreSQL: the replicator's election (a process that would
//! replicate waits as a standby until it holds the store's write lock), how the others learn
//! of new checkpoints (`LISTEN` to the channel every commit notifies, with a poll beside it
//! for a notification lost with its connection), and what they tell each other (`NOTIFY` on
//! the store's channel with `_peers` appended: the write checkpoints their clients ask for).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use walsync_source::PgConfig;
use walsync_storage::{KvStore, StorageError};
use walsync_sync::{PeerMessage, SyncCore};
use walsync_types::quote_ident;

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

/// Pokes the sync core whenever the store may hold a new checkpoint. Runs until `stop`.
pub async fn follow(
    pg: PgConfig,
    channel: String,
    core: Arc<SyncCore<KvStore>>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let origin = tell_peers(pg.clone(), peers_channel(&channel), &core, stop.clone());
    let poll = poll.max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
        let listening = match pg.connect_listening(notes_tx).await {
            Ok(client) => {
                let sql = format!(
                    "LISTEN {}; LISTEN {}",
                    quote_ident(&channel),
                    quote_ident(&peers_channel(&channel))
                );
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
        // A new connection may have missed notifications: look now, and ask the others who is
        // in their rooms.
        core.notify_checkpoint();
        if listening.is_some() {
            core.presence_hello();
        }
        loop {
            tokio::select! {
                note = notes.recv(), if listening.is_some() => match note {
                    Some(note) if note.channel() == channel => core.notify_checkpoint(),
                    Some(note) => from_peer(&core, note.payload(), origin),
                    // The connection closed: made again.
                    None => break,
                },
                _ = ticks.tick() => {
                    core.notify_checkpoint();
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

/// The channel of the messages between processes sharing the store.
fn peers_channel(channel: &str) -> String {
    format!("{channel}_peers")
}

/// A message on the peers' channel: who sent it (a process ignores its own) and what.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    origin: u64,
    message: PeerMessage,
}

fn from_peer(core: &SyncCore<KvStore>, payload: &str, origin: u64) {
    match serde_json::from_str::<Envelope>(payload) {
        Ok(e) if e.origin == origin => {}
        Ok(e) => core.from_peer(e.message),
        Err(e) => {
            tracing::warn!(error = %e, "a message from another walsync process was not understood")
        }
    }
}

/// Sends what the core tells its peers as `NOTIFY`s, from a task of its own (a connection made
/// again when it fails; what cannot be sent meanwhile is dropped with a warning: a client
/// whose write checkpoint was lost asks again). Returns this process's origin.
fn tell_peers(
    pg: PgConfig,
    channel: String,
    core: &SyncCore<KvStore>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let origin = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PeerMessage>();
    core.set_peers(Arc::new(move |m| {
        let _ = tx.send(m);
    }));
    tokio::spawn(async move {
        let mut client = None;
        loop {
            let message = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
                _ = stopped(&mut stop) => return,
            };
            let payload = match serde_json::to_string(&Envelope { origin, message }) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode a message to other walsync processes");
                    continue;
                }
            };
            if client
                .as_ref()
                .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
            {
                client = pg.connect().await.ok();
            }
            let sent = match &client {
                Some(c) => c
                    .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                None => Err("no connection".to_owned()),
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot send a message to the other walsync processes");
                client = None;
            }
        }
    });
    origin
}
