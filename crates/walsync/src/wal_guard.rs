//! The WAL guard: a budget for the WAL walsync's slot makes the primary keep.
//!
//! A logical slot that stops advancing (walsync stopped, stuck on a huge transaction, or held
//! back by a long-open transaction on the primary) makes PostgreSQL keep every WAL segment from
//! the slot's `restart_lsn` on, until the primary's disk is full. Past `warn_fraction` of
//! `budget_bytes` the monitor warns (a log line and `walsync_slot_over_budget`); past the budget,
//! with `drop_slot` on and a slot walsync made, it gives the slot up deliberately — ending the
//! walsender that holds it and dropping it — and says so loudly. The replicator then finds its
//! slot lost, makes it again and copies the tables anew (clients download what changed), rather
//! than letting the primary's disk fill.

use metrics::{counter, describe_counter, describe_gauge, gauge};
use serde::Deserialize;

pub const BUDGET: &str = "walsync_slot_wal_budget_bytes";
pub const OVER_BUDGET: &str = "walsync_slot_over_budget";
pub const DROPS: &str = "walsync_wal_guard_slot_drops_total";

/// The `[wal_guard]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalGuardSection {
    /// WAL the slot may make the server keep, in bytes; none: no budget.
    pub budget_bytes: Option<u64>,
    /// The share of the budget past which a warning goes out.
    pub warn_fraction: f64,
    /// Past the budget, give the slot up (only one walsync made) and rebuild from a new one.
    pub drop_slot: bool,
}

impl Default for WalGuardSection {
    fn default() -> WalGuardSection {
        WalGuardSection {
            budget_bytes: None,
            warn_fraction: 0.8,
            drop_slot: false,
        }
    }
}

/// What the guard does about a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Within,
    Warn,
    Drop,
}

/// The verdict for a slot that retains `retained` bytes; `owned`: walsync made the slot.
pub fn verdict(guard: &WalGuardSection, retained: u64, owned: bool) -> Verdict {
    let Some(budget) = guard.budget_bytes else {
        return Verdict::Within;
    };
    if retained > budget && guard.drop_slot && owned {
        Verdict::Drop
    } else if retained as f64 > budget as f64 * guard.warn_fraction.clamp(0.0, 1.0) {
        Verdict::Warn
    } else {
        Verdict::Within
    }
}

pub(crate) fn describe() {
    describe_gauge!(
        BUDGET,
        metrics::Unit::Bytes,
        "the WAL guard's budget (wal_guard.budget_bytes)"
    );
    describe_gauge!(
        OVER_BUDGET,
        "1 while the slot retains more WAL than wal_guard.warn_fraction of the budget"
    );
    describe_counter!(
        DROPS,
        "slots the WAL guard gave up to protect the primary's disk"
    );
    counter!(DROPS).increment(0);
}

/// Applies the guard to one reading of the slot; `warned` carries whether the last reading
/// warned, so that a warning is logged once per crossing.
pub(crate) async fn check(
    guard: &WalGuardSection,
    client: &tokio_postgres::Client,
    slot: &str,
    retained: u64,
    owned: bool,
    warned: &mut bool,
) {
    let Some(budget) = guard.budget_bytes else {
        return;
    };
    gauge!(BUDGET).set(budget as f64);
    let v = verdict(guard, retained, owned);
    gauge!(OVER_BUDGET).set(if v == Verdict::Within { 0.0 } else { 1.0 });
    match v {
        Verdict::Within => *warned = false,
        Verdict::Warn => {
            if !*warned {
                tracing::warn!(
                    slot,
                    retained,
                    budget,
                    "the replication slot retains WAL near or past its budget: the primary keeps it until walsync confirms it"
                );
            }
            *warned = true;
        }
        Verdict::Drop => {
            tracing::error!(
                slot,
                retained,
                budget,
                "the replication slot retains more WAL than its budget: giving it up so that the primary's disk does not fill; walsync makes it again and copies the tables anew"
            );
            match give_up(client, slot).await {
                Ok(()) => counter!(DROPS).increment(1),
                Err(e) => tracing::error!(slot, error = %e, "could not give the slot up"),
            }
        }
    }
}

/// Ends the walsender that holds `slot` and drops it (retrying while the walsender exits).
async fn give_up(client: &tokio_postgres::Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let mut last = None;
    for _ in 0..50 {
        client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await?;
        match client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return Ok(()),
            // "replication slot is active": the walsender is still on its way out.
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    match last {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_past_the_share_and_drops_only_a_slot_walsync_made() {
        let off = WalGuardSection::default();
        assert_eq!(verdict(&off, u64::MAX, true), Verdict::Within);
        let guard = WalGuardSection {
            budget_bytes: Some(1000),
            warn_fraction: 0.8,
            drop_slot: true,
        };
        assert_eq!(verdict(&guard, 800, true), Verdict::Within);
        assert_eq!(verdict(&guard, 801, true), Verdict::Warn);
        assert_eq!(verdict(&guard, 1001, true), Verdict::Drop);
        assert_eq!(
            verdict(&guard, 1001, false),
            Verdict::Warn,
            "not walsync's slot"
        );
        let warn_only = WalGuardSection {
            drop_slot: false,
            ..guard
        };
        assert_eq!(verdict(&warn_only, 5000, true), Verdict::Warn);
    }
}
