//! A TCP fault proxy for tests: placed between walsync and PostgreSQL, or between clients and
//! walsync, it forwards bytes both ways until told to hurt them.
//!
//! Faults ([`Fault`]) apply to every connection, open or new, from the moment they are set:
//! - `Delay`: each chunk is delivered that long after it was read (latency, not a rate limit);
//! - `Bandwidth`: at most that many bytes per second each way;
//! - `BlackHole`: a partition. Nothing moves either way and new connections wait unconnected;
//!   like TCP across a real partition, what was sent meanwhile arrives once healed, unless a
//!   side gave up and closed first;
//! - `HalfOpen`: the far side vanished without a word. The proxy closes its upstream socket and
//!   then swallows whatever the client sends and answers nothing, so the client sees a connection
//!   that is open and silent (as after a peer's machine dies), while the upstream sees it closed.
//!
//! [`FaultProxy::cut`] resets every open connection at once (RST, not FIN).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to the bytes it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    Delay(Duration),
    /// Bytes per second, each way, per connection.
    Bandwidth(u64),
    BlackHole,
    HalfOpen,
}

/// A proxy listening on a loopback port, forwarding to `upstream`. Dropping it stops accepting
/// and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Bumped by [`FaultProxy::cut`]; a connection ends when it differs from the one it began in.
    cuts: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Bytes read at once; small enough that a bandwidth cap is smooth.
const CHUNK: usize = 16 * 1024;

impl FaultProxy {
    /// Starts forwarding from a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (fault, _) = watch::channel(Fault::None);
        let (cuts, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let fault = fault.subscribe();
            let cuts = cuts.subscribe();
            let accepted = accepted.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_nodelay(true);
                    tokio::spawn(connection(client, upstream, fault.clone(), cuts.clone()));
                }
            }
        });
        Ok(FaultProxy {
            addr,
            fault,
            cuts,
            accepted,
            task,
        })
    }

    /// Where clients connect instead of `upstream`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Applies `fault` to every connection from now on ([`Fault::None`] heals).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Resets every open connection; new ones are forwarded as before.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    mut cuts: watch::Receiver<u64>,
) {
    let began = *cuts.borrow_and_update();
    // A partition holds new connections unconnected until it heals; a vanished far side
    // answers none.
    let connected = async {
        let f = fault
            .wait_for(|f| *f != Fault::BlackHole)
            .await
            .map(|f| *f)
            .ok()?;
        if f == Fault::HalfOpen {
            return Some(None);
        }
        Some(TcpStream::connect(upstream).await.ok())
    };
    let server = tokio::select! {
        s = connected => s,
        _ = cuts.wait_for(|n| *n != began) => None,
    };
    let mut server = match server {
        Some(Some(server)) => server,
        Some(None) => return swallow(client, cuts, began).await,
        None => return reset(client),
    };
    let _ = server.set_nodelay(true);
    let ended = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, fault.clone());
        let down = pump(server_read, client_write, fault.clone());
        let mut half_open = fault.clone();
        tokio::select! {
            _ = async { tokio::join!(up, down) } => Ended::Closed,
            _ = cuts.wait_for(|n| *n != began) => Ended::Cut,
            _ = half_open.wait_for(|f| *f == Fault::HalfOpen) => Ended::HalfOpen,
        }
    };
    match ended {
        Ended::Closed => {}
        Ended::Cut => {
            reset(client);
            reset(server);
        }
        Ended::HalfOpen => {
            reset(server);
            swallow(client, cuts, began).await;
        }
    }
}

enum Ended {
    Closed,
    Cut,
    HalfOpen,
}

/// Reads and discards what the client sends, answering nothing, until it closes or is cut.
async fn swallow(mut client: TcpStream, mut cuts: watch::Receiver<u64>, began: u64) {
    let mut buf = vec![0u8; CHUNK];
    let drained = async {
        while let Ok(n) = client.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        () = drained => {}
        _ = cuts.wait_for(|n| *n != began) => {}
    }
    reset(client);
}

/// Copies `from` to `to` under the current fault until `from` ends, then shuts `to` down.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    fault: watch::Receiver<Fault>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let mut reader_fault = fault.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Nothing is read across a partition, so the sender's buffers fill as over a real one.
            if reader_fault
                .wait_for(|f| *f != Fault::BlackHole)
                .await
                .is_err()
            {
                break;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let mut writer_fault = fault;
    let writer = async move {
        while let Some((read_at, chunk)) = rx.recv().await {
            // Whatever was read before a partition waits for it to heal.
            let Ok(f) = writer_fault
                .wait_for(|f| *f != Fault::BlackHole)
                .await
                .map(|f| *f)
            else {
                return;
            };
            if let Fault::Delay(d) = f {
                tokio::time::sleep_until(read_at + d).await;
            }
            // A chunk takes its time on the wire before it arrives.
            if let Fault::Bandwidth(rate) = f {
                let seconds = chunk.len() as f64 / rate.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Closes with RST rather than FIN, as a crashed peer or a dropped route looks.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
