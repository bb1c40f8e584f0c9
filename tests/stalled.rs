//! Clients that stop reading: a thousand streams that never read while a writer keeps changing
//! their buckets pin no more than their bounded buffers — the server's memory levels off however
//! much more changes — and a client that reads keeps receiving every change.

use support::process::{Killed, free_port, rss_kib, wait_ready};
use support::{seed, service};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use walsync_client::{Connector, SyncClient, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_walsync-cli");
const STALLED: usize = 1_000;
/// The sync core's buffer per stream (`sync.buffer_bytes`).
const BUFFER_BYTES: u64 = 64 << 10;
/// hyper's write buffer per connection (`server.write_buffer_bytes`, its default).
const WRITE_BUFFER_BYTES: u64 = 64 << 10;
/// Bytes of each new description: one data line of about this size per change per stream.
const ROW_BYTES: usize = 48 << 10;

fn description_of(state: &walsync_client::ClientState) -> Option<String> {
    let rows = state.rows();
    let data = rows.get(&("projects".to_owned(), "1".to_owned()))?;
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v["description"].as_str().map(str::to_owned)
}

/// Changes project 1's description `n` times (a row of u1's buckets), each time waiting until
/// the reading client holds it; returns each change's commit-to-client time.
async fn change(
    s: &seed::Setup,
    reader: &mut SyncClient,
    from: usize,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    for i in from..from + n {
        let marker = format!("change {i}:");
        let text = format!("{marker}{}", "x".repeat(ROW_BYTES));
        let at = Instant::now();
        s.sql
            .execute(
                "UPDATE projects SET description = $1 WHERE id = 1",
                &[&text],
            )
            .await?;
        reader
            .until(service::WAIT, |st| {
                description_of(st).is_some_and(|d| d.starts_with(&marker))
            })
            .await?;
        took.push(at.elapsed());
    }
    Ok(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_pin_only_their_buffers() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    let port = free_port()?;
    let config = s.dir.path().join("walsync.toml");
    std::fs::write(
        &config,
        format!(
            "rules = \"{rules}\"\n[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\n[storage]\ndir = \"{dir}\"\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\nmax_streams_per_user = {streams}\n\
             [auth]\nsecret = \"{secret}\"\naudience = [\"{audience}\"]\n\
             [sync]\nbuffer_bytes = {BUFFER_BYTES}\nstall_timeout_seconds = 3600\n",
            rules = seed::RULES_PATH,
            url = s.url,
            slot = s.slot,
            dir = s.dir.path().join("store").display(),
            streams = STALLED + 10,
            secret = service::SECRET,
            audience = service::AUDIENCE,
        ),
    )?;
    let serve = Killed(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = serve.0.id();
    wait_ready(port).await?;
    let token = service::token("u1");
    let url = format!("http://127.0.0.1:{port}");
    // The test cluster defers WAL flushes (synchronous_commit off: up to 200 ms); the writer
    // commits as a production database does, so the times below are the service's own.
    s.sql.batch_execute("SET synchronous_commit = on").await?;
    let mut reader = SyncClient::new(Connector::new(&url, Transport::Http, &token)?, "reader");
    reader
        .until(service::WAIT, |st| {
            st.rows()
                .contains_key(&("projects".to_owned(), "1".to_owned()))
        })
        .await?;
    let alone = change(&s, &mut reader, 0, 10).await?;

    // A thousand streams of the same user that send their request and never read a byte.
    let request = format!(
        "POST /sync/stream HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        socket.write_all(request.as_bytes()).await?;
        stalled.push(socket);
    }
    // Every stalled stream fills its socket and its buffer with a few changes.
    let warm = change(&s, &mut reader, 10, 10).await?;
    let before = rss_kib(pid)?;
    let first = change(&s, &mut reader, 20, 20).await?;
    let middle = rss_kib(pid)?;
    let second = change(&s, &mut reader, 40, 20).await?;
    let after = rss_kib(pid)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let median = |d: &[Duration]| {
        let mut d = d.to_vec();
        d.sort();
        d[d.len() / 2]
    };
    println!(
        "server rss: {:.0} MiB with the stalled streams, {:.0} MiB after 20 more changes, {:.0} MiB after 40; \
         commit to reader, median: {:?} alone, {:?} / {:?} / {:?} beside {STALLED} stalled streams",
        mib(before),
        mib(middle),
        mib(after),
        median(&alone),
        median(&warm),
        median(&first),
        median(&second),
    );
    // Each stalled stream holds at most the core's buffer, the connection's write buffer, the
    // line beyond each and the one its stream is waiting to buffer, with a quarter more for the
    // allocator: 40 changes of 48 KiB each (about 2 GB sent to streams that read nothing) do
    // not add up.
    let bound_kib =
        STALLED as u64 * (BUFFER_BYTES + WRITE_BUFFER_BYTES + 3 * ROW_BYTES as u64) / 1024 * 5 / 4;
    assert!(
        after.saturating_sub(before) <= bound_kib,
        "memory grew {:.0} MiB over 40 changes (bound {:.0} MiB)",
        mib(after.saturating_sub(before)),
        mib(bound_kib)
    );
    // And it has levelled off: the second twenty changes add far less than a change's worth per
    // stream.
    let per_change_kib = STALLED as u64 * ROW_BYTES as u64 / 1024;
    assert!(
        after.saturating_sub(middle) < per_change_kib,
        "memory still grows: {:.0} MiB over the last 20 changes",
        mib(after.saturating_sub(middle))
    );
    drop(stalled);
    drop(serve);
    Ok(())
}
