//! The pipeline's marks in the state file: how far after-write deliveries are queued, and the
//! queue records set aside because they cannot be read.
//!
//! The positions of the ingest queue move forward only, and each lives where it commits:
//! a sink's position in the sink's own transaction (with its rows), the delivery mark here, in
//! the transaction that queues the deliveries (and in every trim, which follows both), and the
//! queue's start in the trim itself. `pipeline::positions` is the one place that reasons about
//! them together.

use chrono::Utc;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::ingest::INGEST;
use super::{decode_value, encode_value, Store, StoreError, META};

/// The last ingest position whose after-write deliveries are queued.
const DELIVERED_THROUGH: &str = "delivered_through";
/// Queue position → encoded [`QuarantinedRecord`]: queue records that could not be decoded.
pub(in crate::store) const QUARANTINE: TableDefinition<u64, &[u8]> =
    TableDefinition::new("ingest_quarantine");
/// Quarantined records kept at most; the oldest go first (the count is still reported).
const QUARANTINE_KEEP: u64 = 1_000;
const QUARANTINED_TOTAL: &str = "ingest_quarantined_total";

/// A queue record set aside because it could not be decoded, kept for inspection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedRecord {
    pub position: u64,
    pub reason: String,
    pub at: chrono::DateTime<Utc>,
    /// The record's bytes as they were found.
    pub bytes: Vec<u8>,
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(QUARANTINE)?;
    Ok(())
}

/// Records that every ingest position through `position` has its deliveries queued.
pub(super) fn mark_delivered(txn: &WriteTransaction, position: u64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let current = meta.get(DELIVERED_THROUGH)?.map(|v| v.value()).unwrap_or(0);
    if position > current {
        meta.insert(DELIVERED_THROUGH, position)?;
    }
    Ok(())
}

impl Store {
    /// The last ingest position whose deliveries are queued (0 for none yet).
    pub fn delivered_position(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        super::meta_get(&txn.open_table(META)?, DELIVERED_THROUGH)
    }

    /// Moves the queue record at `position` into the quarantine with `reason`, so the pipeline
    /// can go on past it. Returns false if no record is there (already moved).
    pub fn quarantine_ingest(&self, position: u64, reason: &str) -> Result<bool, StoreError> {
        let txn = self.write()?;
        let moved = {
            let mut ingest = txn.open_table(INGEST)?;
            let bytes = ingest.remove(position)?.map(|v| v.value().to_vec());
            match bytes {
                None => false,
                Some(bytes) => {
                    super::ingest::adjust_queued_bytes(&txn, -(bytes.len() as i64))?;
                    let record = QuarantinedRecord {
                        position,
                        reason: reason.to_owned(),
                        at: Utc::now(),
                        bytes,
                    };
                    let mut quarantine = txn.open_table(QUARANTINE)?;
                    quarantine.insert(position, encode_value(&record).as_slice())?;
                    while quarantine.len()? > QUARANTINE_KEEP {
                        if quarantine.pop_first()?.is_none() {
                            break;
                        }
                    }
                    let mut meta = txn.open_table(META)?;
                    let total = super::meta_get(&meta, QUARANTINED_TOTAL)? + 1;
                    meta.insert(QUARANTINED_TOTAL, total)?;
                    true
                }
            }
        };
        self.commit(txn)?;
        self.set_queued_bytes(self.ingest_stats()?.queued_bytes);
        Ok(moved)
    }

    /// How many queue records were ever quarantined, and the most recent ones kept (newest first,
    /// at most `limit`).
    pub fn quarantined(&self, limit: usize) -> Result<(u64, Vec<QuarantinedRecord>), StoreError> {
        let txn = self.read()?;
        let total = super::meta_get(&txn.open_table(META)?, QUARANTINED_TOTAL)?;
        let table = txn.open_table(QUARANTINE)?;
        let mut kept = Vec::new();
        for row in table.iter()?.rev().take(limit) {
            kept.push(decode_value("quarantined record", row?.1.value())?);
        }
        Ok((total, kept))
    }
}
