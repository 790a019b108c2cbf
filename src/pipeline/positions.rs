//! The pipeline's positions in the ingest queue, reasoned about in one place.
//!
//! Three marks, each a queue sequence number that only moves forward, each committed where what
//! it stands for commits:
//! - `sink`: the last batch the sink has stored, written in the sink's own transaction with the
//!   rows (so it can never run ahead of them);
//! - `delivered`: the last batch whose after-write deliveries are queued, written in the redb
//!   transaction that queues them (and by every trim, which follows both);
//! - the queue's start: everything through `min(sink, delivered)` may be trimmed.
//!
//! At start-up reading begins after the lower of the two. A batch at or below `sink` was stored
//! by an earlier run: it never goes through the plugins again; if its deliveries were not yet
//! queued they are rebuilt from the rows the sink stored for it. A batch above `sink` is
//! processed and written, and its deliveries are queued unless `delivered` already covers it
//! (the sink was reset under a running queue).

/// What to do with a batch read from the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Run the plugins and write it to the sink; queue its deliveries if `deliver`.
    Process { deliver: bool },
    /// The sink has it already: rebuild its deliveries from the stored rows.
    Redeliver,
    /// Stored and delivered: nothing to do (it is only waiting to be trimmed).
    Done,
}

/// The marks as the pipeline knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positions {
    pub sink: u64,
    pub delivered: u64,
}

impl Positions {
    /// The marks found at start-up.
    pub fn at_start(sink: u64, delivered: u64) -> Positions {
        Positions { sink, delivered }
    }

    /// Where reading starts: after the lower mark.
    pub fn read_after(&self) -> u64 {
        self.sink.min(self.delivered)
    }

    /// Through where the queue may be trimmed.
    pub fn trimmable(&self) -> u64 {
        self.sink.min(self.delivered)
    }

    pub fn plan(&self, seq: u64) -> Plan {
        match (seq <= self.sink, seq <= self.delivered) {
            (false, delivered) => Plan::Process {
                deliver: !delivered,
            },
            (true, false) => Plan::Redeliver,
            (true, true) => Plan::Done,
        }
    }

    /// The sink stored everything through `seq`.
    pub fn stored(&mut self, seq: u64) {
        self.sink = self.sink.max(seq);
    }

    /// Deliveries are queued for everything through `seq`.
    pub fn delivered(&mut self, seq: u64) {
        self.delivered = self.delivered.max(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_the_sink_holds_are_never_processed_again() {
        // A crash after the sink stored 10 but before deliveries were queued past 7.
        let p = Positions::at_start(10, 7);
        assert_eq!(p.read_after(), 7);
        assert_eq!(p.plan(8), Plan::Redeliver);
        assert_eq!(p.plan(10), Plan::Redeliver);
        assert_eq!(p.plan(11), Plan::Process { deliver: true });
        assert_eq!(p.trimmable(), 7);
    }

    #[test]
    fn a_reset_sink_is_refilled_without_delivering_twice() {
        let p = Positions::at_start(0, 5);
        assert_eq!(p.read_after(), 0);
        assert_eq!(p.plan(3), Plan::Process { deliver: false });
        assert_eq!(p.plan(6), Plan::Process { deliver: true });
    }

    #[test]
    fn marks_only_move_forward() {
        let mut p = Positions::at_start(4, 4);
        p.stored(9);
        p.stored(6);
        p.delivered(8);
        p.delivered(2);
        assert_eq!((p.sink, p.delivered), (9, 8));
        assert_eq!(p.trimmable(), 8);
        assert_eq!(p.plan(8), Plan::Done);
        assert_eq!(p.plan(9), Plan::Redeliver);
    }
}
