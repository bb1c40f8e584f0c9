//! Which LSN may be reported to PostgreSQL as flushed: the ack rule.
//!
//! **Invariant (ack rule).** The position reported as flushed is never ahead of the end of the
//! last transaction the consumer has made durable. PostgreSQL may discard WAL before the
//! reported position, and after a restart it resumes streaming from there, so reporting more
//! than is durable loses data, and reporting less only re-sends transactions that the
//! consumer's replay check skips (see `Resume`).
//!
//! One refinement keeps the slot moving when nothing published changes: a keepalive says how far
//! the server has decoded. A keepalive received *between* transactions, once every transaction
//! emitted before it is durable, vouches that nothing before its position is still owed to us,
//! so its position may be reported. A keepalive received inside a transaction vouches for
//! nothing (the transaction's commit may lie behind it).

use walsync_types::Lsn;

/// What the reader knows about progress. Pure state: the reader updates it, and
/// [`AckState::flush_position`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckState {
    /// What the consumer reported durable.
    pub durable: Lsn,
    /// The end of the last commit (or snapshot point) handed to the consumer.
    pub emitted: Lsn,
    /// The last keepalive position seen between transactions, with `emitted` as it was then.
    pub idle_point: Option<(Lsn, Lsn)>,
    /// The position last reported, which never moves back.
    pub reported: Lsn,
}

impl AckState {
    /// Starting from a durable position (or the slot's consistent point on a fresh start).
    pub fn new(start: Lsn) -> AckState {
        AckState {
            durable: start,
            emitted: start,
            idle_point: None,
            reported: start,
        }
    }

    /// A keepalive with the server's position `wal_end` arrived; `in_transaction` says whether
    /// it came between a `Begin` and its `Commit`.
    pub fn on_keepalive(&mut self, wal_end: Lsn, in_transaction: bool) {
        if !in_transaction {
            self.idle_point = Some((wal_end, self.emitted));
        }
    }

    pub fn on_emitted(&mut self, end: Lsn) {
        self.emitted = self.emitted.max(end);
    }

    pub fn on_durable(&mut self, durable: Lsn) {
        self.durable = self.durable.max(durable);
    }

    /// The position to report as flushed now.
    pub fn flush_position(&self) -> Lsn {
        let mut ack = self.durable;
        if let Some((wal_end, emitted_then)) = self.idle_point
            && self.durable >= emitted_then
        {
            ack = ack.max(wal_end);
        }
        ack.max(self.reported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reports_only_what_is_durable() {
        let mut s = AckState::new(Lsn(100));
        s.on_emitted(Lsn(200));
        assert_eq!(s.flush_position(), Lsn(100));
        s.on_durable(Lsn(200));
        assert_eq!(s.flush_position(), Lsn(200));
    }

    #[test]
    fn idle_keepalive_advances_once_earlier_work_is_durable() {
        let mut s = AckState::new(Lsn(100));
        s.on_emitted(Lsn(200));
        s.on_keepalive(Lsn(500), false);
        assert_eq!(
            s.flush_position(),
            Lsn(100),
            "transaction up to 200 is not durable yet"
        );
        s.on_durable(Lsn(200));
        assert_eq!(s.flush_position(), Lsn(500));
    }

    #[test]
    fn keepalive_inside_a_transaction_vouches_for_nothing() {
        let mut s = AckState::new(Lsn(100));
        s.on_keepalive(Lsn(900), true);
        assert_eq!(s.flush_position(), Lsn(100));
    }

    #[test]
    fn never_moves_back() {
        let mut s = AckState::new(Lsn(100));
        s.reported = Lsn(300);
        assert_eq!(s.flush_position(), Lsn(300));
    }

    proptest! {
        /// Whatever happens, the reported position never passes a transaction that was emitted
        /// and is not yet durable.
        #[test]
        fn ack_never_passes_an_undurable_emitted_commit(steps in proptest::collection::vec((0..4u8, 1..50u64, any::<bool>()), 1..60)) {
            let mut s = AckState::new(Lsn(0));
            let mut wal = 0u64;
            let mut emitted: Vec<u64> = Vec::new();
            let mut durable = 0u64;
            for (kind, delta, flag) in steps {
                wal += delta;
                match kind {
                    0 => { s.on_emitted(Lsn(wal)); emitted.push(wal); }
                    1 => s.on_keepalive(Lsn(wal), flag),
                    2 => if let Some(&e) = emitted.iter().find(|&&e| e > durable) { durable = e; s.on_durable(Lsn(e)); },
                    _ => {}
                }
                let ack = s.flush_position();
                s.reported = ack;
                let first_undurable = emitted.iter().find(|&&e| e > durable);
                if let Some(&e) = first_undurable {
                    prop_assert!(ack.0 < e, "acked {} past undurable commit ending {}", ack.0, e);
                }
            }
        }
    }
}
