//! One convergence checker for the tests that hurt walsync on purpose (crashes, faults, overload):
//! - for every simulated user, the rows their client holds equal what the sync rules select from
//!   PostgreSQL for that user, everything read in one snapshot (the rules' placements checked
//!   against placements computed in SQL alone);
//! - every bucket checksum verifies and no op comes at or below what a client holds: the client
//!   ([`SyncClient`]) checks both at every checkpoint, and either failure fails the test at once
//!   rather than being retried away;
//! - no client applies part of a source transaction: a client applies only whole checkpoints,
//!   and [`Atomic`] watches every checkpoint a client applies for a transaction seen in part.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use walsync_client::{ClientError, ClientState, Event, SyncClient};

use crate::seed::{self, Setup};
use crate::service::Rows;

/// A client's failure that reconnecting must not hide.
fn is_walsync_fault(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::ChecksumMismatch { .. } | ClientError::Protocol(_)
    )
}

/// What each of `users` should hold, read from PostgreSQL in one repeatable-read snapshot.
pub async fn expected(s: &Setup, users: &[&str]) -> anyhow::Result<BTreeMap<String, Rows>> {
    let (sql, conn) = tokio_postgres::connect(&s.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let all = seed::expected_in(&sql, &s.rules).await?;
    let placed = walsync_testkit::seed::expected_placements(&sql).await?;
    let by_rules: BTreeMap<_, std::collections::BTreeSet<_>> = all
        .iter()
        .map(|(b, rows)| (b.clone(), rows.keys().cloned().collect()))
        .collect();
    anyhow::ensure!(
        by_rules == placed,
        "the rules place rows where SQL does not"
    );
    let mut out = BTreeMap::new();
    for user in users {
        let mut rows = Rows::new();
        for b in walsync_testkit::seed::user_buckets(&sql, user).await? {
            if let Some(r) = all.get(&b) {
                rows.extend(r.clone());
            }
        }
        out.insert((*user).to_owned(), rows);
    }
    sql.batch_execute("COMMIT").await?;
    Ok(out)
}

/// Follows `client` until it holds `want`, reconnecting with what it holds whenever its stream
/// breaks, for at most `wait`. Says what differs when it never gets there.
pub async fn until_holds(
    user: &str,
    client: &mut SyncClient,
    want: &Rows,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.until(left, |st| st.rows() == *want).await {
            Ok(()) => return Ok(()),
            Err(e) if is_walsync_fault(&e) => anyhow::bail!("{user}'s client: {e}"),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                let got = client.state().rows();
                let missing = want.keys().filter(|k| got.get(*k) != want.get(*k)).count();
                let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
                anyhow::bail!(
                    "{user} never converged: {e}; {missing} rows missing or different, {extra} extra"
                );
            }
            // The stream broke (a server killed, a connection cut): reconnect.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Every client holds exactly what its user should, as PostgreSQL says now (call once writing
/// has stopped).
pub async fn converged(
    s: &Setup,
    clients: &mut [(String, SyncClient)],
    wait: Duration,
) -> anyhow::Result<()> {
    let users: Vec<&str> = clients.iter().map(|(u, _)| u.as_str()).collect();
    let want = expected(s, &users).await?;
    for (user, client) in clients.iter_mut() {
        until_holds(user, client, &want[user.as_str()], wait).await?;
    }
    Ok(())
}

/// Follows the stream, reconnecting with what the client holds whenever it breaks (the server
/// starting, killed, cut off, not ready yet), until `stop`; `atomic` sees every state the client
/// applies. A checksum failure or an op at or below what the client holds is a failure of
/// walsync, returned as such.
pub async fn follow(
    mut client: SyncClient,
    mut stop: watch::Receiver<bool>,
    atomic: Option<Atomic>,
) -> (SyncClient, Option<String>) {
    loop {
        let broke = tokio::select! {
            e = client.next_event() => match e {
                Ok(Event::Complete { .. }) => {
                    if let Some(check) = &atomic
                        && let Err(e) = check.holds(client.state())
                    {
                        return (client, Some(e));
                    }
                    false
                }
                Ok(_) => false,
                Err(e) if is_walsync_fault(&e) => return (client, Some(e.to_string())),
                Err(_) => true,
            },
            _ = stop.wait_for(|s| *s) => return (client, None),
        };
        if broke {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.wait_for(|s| *s) => return (client, None),
            }
        }
    }
}

/// Source transactions a test writes as groups of rows that must be seen whole: rows of
/// `object_type` whose data has `field` set to a group's tag (a text starting with `prefix`),
/// `size` rows a group, all in one bucket. A client that holds some but not all of a group's
/// rows applied part of a transaction.
#[derive(Debug, Clone)]
pub struct Atomic {
    pub object_type: &'static str,
    pub field: &'static str,
    pub prefix: &'static str,
    pub size: usize,
}

/// The transactions [`seed::application`] writes, seen whole or not at all.
pub const APPLICATION: Atomic = Atomic {
    object_type: "teams",
    field: "_last_modified_by",
    prefix: "tx-",
    size: seed::GROUP,
};

impl Atomic {
    pub fn holds(&self, state: &ClientState) -> Result<(), String> {
        let mut groups: BTreeMap<String, usize> = BTreeMap::new();
        for ((object_type, _), data) in state.rows() {
            if object_type != self.object_type {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
            if let Some(tag) = v.get(self.field).and_then(|t| t.as_str())
                && tag.starts_with(self.prefix)
            {
                *groups.entry(tag.to_owned()).or_default() += 1;
            }
        }
        match groups.iter().find(|(_, n)| **n != self.size) {
            Some((tag, n)) => Err(format!(
                "a client applied {n} of the {} rows of transaction {tag}",
                self.size
            )),
            None => Ok(()),
        }
    }
}

/// Clients followed in the background ([`follow`]) until [`Followers::end`].
#[allow(missing_debug_implementations)]
pub struct Followers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<(String, SyncClient, Option<String>)>>,
}

impl Followers {
    pub fn start(clients: Vec<(String, SyncClient)>, atomic: Option<Atomic>) -> Followers {
        let (stop, stopped) = watch::channel(false);
        let tasks = clients
            .into_iter()
            .map(|(user, c)| {
                let stopped = stopped.clone();
                let atomic = atomic.clone();
                tokio::spawn(async move {
                    let (c, failure) = follow(c, stopped, atomic).await;
                    (user, c, failure)
                })
            })
            .collect();
        Followers { stop, tasks }
    }

    /// Stops following; the clients back, or the first failure of walsync one of them saw.
    pub async fn end(self) -> anyhow::Result<Vec<(String, SyncClient)>> {
        self.stop.send_replace(true);
        let mut out = Vec::new();
        for task in self.tasks {
            let (user, c, failure) = task.await?;
            if let Some(failure) = failure {
                anyhow::bail!("{user}'s client: {failure}");
            }
            out.push((user, c));
        }
        Ok(out)
    }
}
