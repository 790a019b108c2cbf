//! The ingest queue: capture requests' accepted events, durable before they are acknowledged.
//!
//! Rows are keyed by a sequence number that only grows (kept in `META`, so it never goes back
//! even when the queue is trimmed empty); sinks remember the last sequence they committed.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{meta_get, Store, StoreError, META};
use crate::event::IngestBatch;

/// Sequence → encoded [`IngestBatch`].
pub(in crate::store) const INGEST: TableDefinition<u64, &[u8]> = TableDefinition::new("ingest");
pub(in crate::store) const NEXT_SEQ: &str = "ingest_next_seq";
/// Bytes of the records in the queue, kept with every append and trim.
const QUEUED_BYTES: &str = "ingest_queued_bytes";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(INGEST)?;
    Ok(())
}

/// Starts the queue's byte counter if this file has none yet (called with no table open).
pub(super) fn init_queued_bytes(txn: &WriteTransaction) -> Result<(), StoreError> {
    let table = txn.open_table(INGEST)?;
    let mut meta = txn.open_table(META)?;
    if meta.get(QUEUED_BYTES)?.is_none() {
        // A queue written before the counter existed: count it once.
        let mut bytes = 0u64;
        for row in table.iter()? {
            bytes += row?.1.value().len() as u64;
        }
        meta.insert(QUEUED_BYTES, bytes)?;
    }
    Ok(())
}

/// Moves the queue's byte counter by `delta` in `txn`; returns the new count.
pub(super) fn adjust_queued_bytes(txn: &WriteTransaction, delta: i64) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let bytes = meta_get(&meta, QUEUED_BYTES)?.saturating_add_signed(delta);
    meta.insert(QUEUED_BYTES, bytes)?;
    Ok(bytes)
}

/// A batch read back from the queue with its position.
#[derive(Clone, Debug)]
pub struct QueuedBatch {
    pub seq: u64,
    pub batch: IngestBatch,
}

/// A queue record that could not be decoded (to be quarantined, not retried forever).
#[derive(Debug, PartialEq)]
pub struct Unreadable {
    pub seq: u64,
    pub reason: String,
}

/// What one read of the queue returned, in queue order.
#[derive(Debug, Default)]
pub struct QueueRead {
    pub batches: Vec<QueuedBatch>,
    pub unreadable: Vec<Unreadable>,
    /// The position of the last record read, readable or not.
    pub last: Option<u64>,
    /// Bytes of the records read.
    pub bytes: usize,
}

/// How much one read may return: it stops once either is reached (after at least one record).
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    pub events: usize,
    pub bytes: usize,
}

/// How much is waiting in the queue.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct IngestStats {
    /// Batches not yet trimmed (some may already be in the sink).
    pub queued_batches: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// The sequence number the last appended batch received (0 if none ever).
    pub last_seq: u64,
}

impl Store {
    /// Appends encoded batches in one durable transaction and returns the sequence number of
    /// the last. Nothing is visible, or acknowledged, unless the commit succeeds.
    pub fn append_ingest(&self, encoded: &[Vec<u8>]) -> Result<u64, StoreError> {
        let txn = self.write()?;
        let last = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(INGEST)?;
            let mut seq = meta_get(&meta, NEXT_SEQ)?.max(1);
            for bytes in encoded {
                table.insert(seq, bytes.as_slice())?;
                seq += 1;
            }
            meta.insert(NEXT_SEQ, seq)?;
            seq - 1
        };
        let added: usize = encoded.iter().map(Vec::len).sum();
        let queued = adjust_queued_bytes(&txn, added as i64)?;
        self.commit(txn)?;
        self.set_queued_bytes(queued);
        Ok(last)
    }

    /// Reads records after `after`, in order, until `limits` is reached. Records that cannot be
    /// decoded are returned as [`Unreadable`] in their place rather than failing the read.
    pub fn read_ingest_after(
        &self,
        after: u64,
        limits: ReadLimits,
    ) -> Result<QueueRead, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(INGEST)?;
        let mut out = QueueRead::default();
        let mut events = 0;
        for row in table.range(after.saturating_add(1)..)? {
            let (seq, bytes) = row?;
            let (seq, bytes) = (seq.value(), bytes.value());
            out.bytes += bytes.len();
            out.last = Some(seq);
            match IngestBatch::decode(bytes) {
                Ok(batch) => {
                    events += batch.events.len();
                    out.batches.push(QueuedBatch { seq, batch });
                }
                Err(e) => out.unreadable.push(Unreadable {
                    seq,
                    reason: format!("not a readable ingest batch: {e}"),
                }),
            }
            if events >= limits.events || out.bytes >= limits.bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes every batch up to and including `seq`: call only once every sink has durably
    /// committed them.
    pub fn trim_ingest_through(&self, seq: u64) -> Result<u64, StoreError> {
        let txn = self.write()?;
        let (removed, bytes) = {
            let mut table = txn.open_table(INGEST)?;
            let (mut removed, mut bytes) = (0, 0usize);
            for row in table.extract_from_if(..=seq, |_, _| true)? {
                bytes += row?.1.value().len();
                removed += 1;
            }
            (removed, bytes)
        };
        let queued = adjust_queued_bytes(&txn, -(bytes as i64))?;
        // Trimming follows the sink write, which follows queuing the batch's deliveries.
        super::positions::mark_delivered(&txn, seq)?;
        self.commit(txn)?;
        self.set_queued_bytes(queued);
        Ok(removed)
    }

    /// Moves the next queue position past `sink_position` if it is not already: after a
    /// restore, the sink's copy may hold batches the state file's copy never saw, and a new
    /// batch must never get a position the sink counts as stored.
    pub fn ensure_sequence_after(&self, sink_position: u64) -> Result<bool, StoreError> {
        let txn = self.write()?;
        let moved = {
            let mut meta = txn.open_table(META)?;
            let next = meta_get(&meta, NEXT_SEQ)?.max(1);
            if next <= sink_position {
                meta.insert(NEXT_SEQ, sink_position + 1)?;
                true
            } else {
                false
            }
        };
        self.commit(txn)?;
        Ok(moved)
    }

    /// When the first batch after `position` was received: how long the oldest event the sink
    /// has not stored has waited. `None` when nothing waits (or the record is unreadable).
    pub fn ingest_received_after(
        &self,
        position: u64,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(INGEST)?;
        let first = table.range(position.saturating_add(1)..)?.next();
        Ok(match first {
            Some(row) => IngestBatch::decode(row?.1.value())
                .ok()
                .map(|b| b.received_at),
            None => None,
        })
    }

    pub fn ingest_stats(&self) -> Result<IngestStats, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(INGEST)?;
        let meta = txn.open_table(META)?;
        Ok(IngestStats {
            queued_batches: table.len()?,
            queued_bytes: meta_get(&meta, QUEUED_BYTES)?,
            last_seq: meta_get(&meta, NEXT_SEQ)?.saturating_sub(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventRow;
    use std::collections::BTreeMap;

    fn batch(n: usize) -> IngestBatch {
        let time = chrono::DateTime::from_timestamp_micros(1_795_659_924_420_123).unwrap();
        IngestBatch {
            team_id: 1,
            received_at: time,
            ip: Some("127.0.0.1".into()),
            sent_at: None,
            events: (0..n)
                .map(|i| EventRow {
                    uuid: uuid::Uuid::now_v7(),
                    event: "e".into(),
                    distinct_id: "u".into(),
                    properties: format!("{{\"n\":{i}}}"),
                    timestamp: time,
                    elements_chain: String::new(),
                })
                .collect(),
        }
    }

    /// Random appends, reads, trims and reopenings against a plain in-memory model.
    #[test]
    fn queue_matches_a_simple_model_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut model: BTreeMap<u64, IngestBatch> = BTreeMap::new();
        let mut next = 1u64;
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            match rand() % 5 {
                0 | 1 => {
                    let batches: Vec<IngestBatch> = (0..(rand() % 4 + 1))
                        .map(|i| batch(i as usize + 1))
                        .collect();
                    let encoded: Vec<Vec<u8>> = batches.iter().map(IngestBatch::encode).collect();
                    let last = store.append_ingest(&encoded).unwrap();
                    for b in batches {
                        model.insert(next, b);
                        next += 1;
                    }
                    assert_eq!(last, next - 1);
                }
                2 => {
                    let after = rand() % next;
                    let max = (rand() % 6 + 1) as usize;
                    let limits = ReadLimits {
                        events: max,
                        bytes: usize::MAX,
                    };
                    let got = store.read_ingest_after(after, limits).unwrap().batches;
                    let mut want = Vec::new();
                    let mut events = 0;
                    for (seq, b) in model.range(after + 1..) {
                        want.push((*seq, b.clone()));
                        events += b.events.len();
                        if events >= max {
                            break;
                        }
                    }
                    let got: Vec<_> = got.into_iter().map(|q| (q.seq, q.batch)).collect();
                    assert_eq!(got, want);
                }
                3 => {
                    let through = rand() % next;
                    store.trim_ingest_through(through).unwrap();
                    model.retain(|seq, _| *seq > through);
                }
                _ => {
                    drop(store);
                    store = Store::open(dir.path()).unwrap();
                }
            }
            let stats = store.ingest_stats().unwrap();
            assert_eq!(stats.queued_batches, model.len() as u64);
            let bytes: usize = model.values().map(|b| b.encode().len()).sum();
            assert_eq!(stats.queued_bytes, bytes as u64);
            assert_eq!(store.room().queued_bytes, bytes as u64);
            assert_eq!(stats.last_seq, next - 1);
        }
    }
}
