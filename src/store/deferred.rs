//! Batches set aside while their team's plugins cannot take them (starting, or over their time
//! budget), so other teams' events flow on. A deferred batch is a copy of its queue record, kept
//! by (team, queue position) until the pipeline has processed it, stored it and queued its
//! deliveries; the queue itself is trimmed as usual. Each team's deferred bytes are counted (in
//! this process's memory too, for capture to check cheaply), so one team's backlog has a bound.

use std::collections::{BTreeMap, HashSet};

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::ingest::{QueuedBatch, ReadLimits, Unreadable};
use super::{Store, StoreError};
use crate::event::IngestBatch;
use crate::ids::TeamId;

/// (team, queue position) → encoded [`IngestBatch`].
pub(in crate::store) const DEFERRED: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("deferred_batches");
/// Team → bytes of its deferred batches.
pub(in crate::store) const DEFERRED_BYTES: TableDefinition<u64, u64> =
    TableDefinition::new("deferred_bytes");

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(DEFERRED)?;
    txn.open_table(DEFERRED_BYTES)?;
    Ok(())
}

/// Removes deferred batches in `txn` (their processing is complete); returns the teams' bytes
/// after.
pub(super) fn undefer(
    txn: &WriteTransaction,
    batches: &[(TeamId, u64)],
) -> Result<BTreeMap<TeamId, u64>, StoreError> {
    let mut table = txn.open_table(DEFERRED)?;
    let mut bytes = txn.open_table(DEFERRED_BYTES)?;
    let mut after = BTreeMap::new();
    for (team, seq) in batches {
        let removed = table
            .remove((*team, *seq))?
            .map_or(0, |v| v.value().len() as u64);
        let left = bytes
            .get(*team)?
            .map_or(0, |b| b.value())
            .saturating_sub(removed);
        if left == 0 {
            bytes.remove(*team)?;
        } else {
            bytes.insert(*team, left)?;
        }
        after.insert(*team, left);
    }
    Ok(after)
}

impl Store {
    /// Sets batches aside, each with its encoded form, in one transaction.
    pub fn defer_batches(&self, batches: &[(u64, IngestBatch)]) -> Result<(), StoreError> {
        if batches.is_empty() {
            return Ok(());
        }
        let txn = self.write()?;
        let mut after = BTreeMap::new();
        {
            let mut table = txn.open_table(DEFERRED)?;
            let mut bytes = txn.open_table(DEFERRED_BYTES)?;
            for (seq, batch) in batches {
                let encoded = batch.encode();
                let old = table
                    .insert((batch.team_id, *seq), encoded.as_slice())?
                    .map_or(0, |v| v.value().len() as u64);
                let total =
                    bytes.get(batch.team_id)?.map_or(0, |b| b.value()) - old + encoded.len() as u64;
                bytes.insert(batch.team_id, total)?;
                after.insert(batch.team_id, total);
            }
        }
        self.commit(txn)?;
        self.set_deferred_bytes(after);
        Ok(())
    }

    /// The queue positions of every deferred batch (read at start-up, so the pipeline does not
    /// process them from the queue again).
    pub fn deferred_positions(&self) -> Result<HashSet<u64>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEFERRED)?;
        let mut out = HashSet::new();
        for row in table.iter()? {
            out.insert(row?.0.value().1);
        }
        Ok(out)
    }

    /// Teams with deferred batches, and their bytes.
    pub fn deferred_teams(&self) -> BTreeMap<TeamId, u64> {
        self.inner
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes of `team`'s deferred batches.
    pub fn deferred_bytes(&self, team: TeamId) -> u64 {
        self.inner
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&team)
            .copied()
            .unwrap_or(0)
    }

    /// `team`'s oldest deferred batches, within `limits`; undecodable ones are returned as such.
    pub fn read_deferred(
        &self,
        team: TeamId,
        limits: ReadLimits,
    ) -> Result<(Vec<QueuedBatch>, Vec<Unreadable>), StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEFERRED)?;
        let (mut batches, mut unreadable) = (Vec::new(), Vec::new());
        let (mut events, mut bytes) = (0, 0);
        for row in table.range((team, 0)..=(team, u64::MAX))? {
            let (key, value) = row?;
            let seq = key.value().1;
            bytes += value.value().len();
            match IngestBatch::decode(value.value()) {
                Ok(batch) => {
                    events += batch.events.len();
                    batches.push(QueuedBatch { seq, batch });
                }
                Err(e) => unreadable.push(Unreadable {
                    seq,
                    reason: format!("not a readable deferred batch: {e}"),
                }),
            }
            if events >= limits.events || bytes >= limits.bytes {
                break;
            }
        }
        Ok((batches, unreadable))
    }

    /// Loads the teams' deferred bytes into memory (at open).
    pub(super) fn load_deferred_bytes(&self) -> Result<(), StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEFERRED_BYTES)?;
        let mut loaded = BTreeMap::new();
        for row in table.iter()? {
            let (team, bytes) = row?;
            loaded.insert(team.value(), bytes.value());
        }
        *self
            .inner
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(())
    }

    pub(super) fn set_deferred_bytes(&self, teams: BTreeMap<TeamId, u64>) {
        let mut deferred = self
            .inner
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (team, bytes) in teams {
            if bytes == 0 {
                deferred.remove(&team);
            } else {
                deferred.insert(team, bytes);
            }
        }
    }
}
