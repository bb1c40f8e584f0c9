//! The source's public face: start it, read batches of events, report what is durable, stop it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};
use walsync_types::Lsn;

use crate::config::SourceConfig;
use crate::error::{Result, SourceError};
use crate::event::SourceEvent;
use crate::preflight;
use crate::reader::{Batch, Reader};

/// Batches in flight between the reader and the consumer. With batches of about two thousand
/// events this bounds the reader's lead to some tens of thousands of rows.
const CHANNEL_BATCHES: usize = 16;

/// Where the consumer stands, from its own durable state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// The position up to which the consumer holds everything (the last acknowledged LSN), or
    /// `None` when it holds nothing and needs the initial copy.
    pub durable: Option<Lsn>,
    /// The consumer recorded a [`SourceEvent::SlotCreated`] for the configured slot. Only then
    /// may the source drop an existing slot of that name to start afresh.
    pub owns_slot: bool,
}

/// Starts reading.
#[derive(Debug)]
pub struct Source;

impl Source {
    /// Checks the database (failing with a clear error if it is not ready), then starts the
    /// reader on its own thread with a current-thread runtime, where it runs fastest.
    pub async fn start(config: SourceConfig, resume: Resume) -> Result<SourceStream> {
        let client = config.pg.connect().await?;
        preflight::check_database(&client, &config).await?;
        drop(client);

        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let (stop_tx, stop_rx) = watch::channel(false);
        let durable = Arc::new(AtomicU64::new(resume.durable.map_or(0, |l| l.0)));
        let abandon = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut reader = Reader::new(config, tx, durable.clone(), stop_rx, resume);
        reader.abandon = abandon.clone();
        let thread = std::thread::Builder::new()
            .name("walsync-wal-reader".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(reader.run()),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the wal reader runtime");
                        let _ = reader.out.try_send(Err(SourceError::Io(e)));
                    }
                }
            })
            .map_err(SourceError::Io)?;
        Ok(SourceStream {
            rx,
            durable,
            stop: stop_tx,
            abandon,
            thread: Some(thread),
        })
    }
}

/// The running source. Dropping it stops the reader.
#[derive(Debug)]
pub struct SourceStream {
    rx: mpsc::Receiver<Batch>,
    durable: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    /// Set by [`SourceStream::abandon`]: the reader drops its connection instead of ending it.
    abandon: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Reports durability from anywhere; see [`SourceStream::ack`].
#[derive(Debug, Clone)]
pub struct Acker(Arc<AtomicU64>);

impl Acker {
    pub fn ack(&self, durable: Lsn) {
        self.0.fetch_max(durable.0, Ordering::AcqRel);
    }
}

impl SourceStream {
    /// The next batch of events, in WAL order. `None` once the reader has stopped; a definite
    /// error is the last item before that.
    pub async fn next_batch(&mut self) -> Option<Result<Vec<SourceEvent>>> {
        self.rx.recv().await
    }

    /// The next batch if one is ready now, without waiting: lets a consumer group many small
    /// transactions into one storage commit while more are already waiting.
    pub fn try_next_batch(&mut self) -> Option<Result<Vec<SourceEvent>>> {
        self.rx.try_recv().ok()
    }

    /// Everything up to `durable` (a `Commit`'s `end_lsn`, or `SnapshotEnd`'s point) is safe
    /// in the consumer's storage. The source reports no more than this to PostgreSQL.
    pub fn ack(&self, durable: Lsn) {
        self.durable.fetch_max(durable.0, Ordering::AcqRel);
    }

    pub fn acker(&self) -> Acker {
        Acker(self.durable.clone())
    }

    /// Stops in an orderly way: the last durable position is reported, streaming ends with
    /// CopyDone, and the reader thread exits.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        // Keep draining so that a reader blocked on a full channel sees the stop.
        while self.rx.recv().await.is_some() {}
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl SourceStream {
    /// Stops without the orderly end: the connection is dropped at once. PostgreSQL sends a
    /// transaction whole once it began, however long, so an orderly stop in the middle of a
    /// huge one waits for the rest of it; a consumer that will read it again from its durable
    /// position needs none of it. What was acknowledged was reported already.
    pub async fn abandon(self) {
        self.abandon.store(true, Ordering::Release);
        self.stop().await;
    }
}

impl Drop for SourceStream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
