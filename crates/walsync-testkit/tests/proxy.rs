//! The fault proxy does to an echo server's connections what each fault says.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use walsync_testkit::{Fault, FaultProxy};

/// An echo server; reports each connection's end (`true` for EOF) on the channel.
async fn echo() -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (ended, ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break ended.send(true),
                        Err(_) => break ended.send(false),
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break ended.send(false);
                            }
                        }
                    }
                }
            });
        }
    });
    Ok((addr, ends))
}

async fn round_trip(s: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<Duration> {
    let at = Instant::now();
    s.write_all(bytes).await?;
    let mut back = vec![0u8; bytes.len()];
    s.read_exact(&mut back).await?;
    anyhow::ensure!(back == bytes, "echoed bytes differ");
    Ok(at.elapsed())
}

#[tokio::test]
async fn delay_and_bandwidth_shape_the_bytes() -> anyhow::Result<()> {
    let (upstream, _) = echo().await?;
    let proxy = FaultProxy::start(upstream).await?;
    let mut s = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut s, b"hello").await?;
    proxy.set(Fault::Delay(Duration::from_millis(100)));
    let took = round_trip(&mut s, b"slow").await?;
    assert!(
        took >= Duration::from_millis(200),
        "two legs of 100 ms: {took:?}"
    );
    // 64 KiB at 64 KiB/s each way: about a second there and another back, pipelined.
    proxy.set(Fault::Bandwidth(64 * 1024));
    let took = round_trip(&mut s, &vec![7u8; 64 * 1024]).await?;
    assert!(took >= Duration::from_millis(900), "capped: {took:?}");
    proxy.set(Fault::None);
    round_trip(&mut s, b"fast again").await?;
    Ok(())
}

#[tokio::test]
async fn a_partition_holds_bytes_and_connections_until_it_heals() -> anyhow::Result<()> {
    let (upstream, _) = echo().await?;
    let proxy = FaultProxy::start(upstream).await?;
    let mut open = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut open, b"before").await?;
    proxy.set(Fault::BlackHole);
    open.write_all(b"during").await?;
    let mut fresh = TcpStream::connect(proxy.addr()).await?;
    fresh.write_all(b"new").await?;
    let mut buf = [0u8; 6];
    assert!(
        timeout(Duration::from_millis(300), open.read_exact(&mut buf))
            .await
            .is_err(),
        "bytes crossed a partition"
    );
    proxy.set(Fault::None);
    open.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"during");
    let mut buf = [0u8; 3];
    fresh.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"new");
    Ok(())
}

#[tokio::test]
async fn half_open_closes_upstream_and_leaves_the_client_hanging() -> anyhow::Result<()> {
    let (upstream, mut ends) = echo().await?;
    let proxy = FaultProxy::start(upstream).await?;
    let mut s = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut s, b"before").await?;
    proxy.set(Fault::HalfOpen);
    let ended = timeout(Duration::from_secs(5), ends.recv()).await?;
    assert!(ended.is_some(), "the upstream saw its connection end");
    // The client can still write, and hears nothing: no data, no EOF, no reset.
    s.write_all(b"anyone?").await?;
    let mut buf = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(300), s.read(&mut buf))
            .await
            .is_err(),
        "the client heard something"
    );
    Ok(())
}

#[tokio::test]
async fn a_cut_resets_open_connections_and_new_ones_work() -> anyhow::Result<()> {
    let (upstream, _) = echo().await?;
    let proxy = FaultProxy::start(upstream).await?;
    let mut s = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut s, b"before").await?;
    proxy.cut();
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(5), s.read(&mut buf)).await?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the connection survived: {read:?}"
    );
    let mut again = TcpStream::connect(proxy.addr()).await?;
    round_trip(&mut again, b"after").await?;
    assert_eq!(proxy.accepted(), 2);
    Ok(())
}
