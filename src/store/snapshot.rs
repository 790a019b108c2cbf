//! A consistent copy of the whole state file, taken from one read transaction while the server
//! keeps writing: the redb half of `appliance backup`.
//!
//! Owns: the list of every table ([`copy_all`]) and the check that no table of the live file is
//! left out of a copy.
//! Must never: hold a write transaction on the live file, or produce a copy missing a table.

use std::path::Path;

use redb::{
    Database, Key, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, Value,
};

use super::{Store, StoreError};

/// Bytes copied per write transaction of the copy, so its dirty pages stay few.
const COMMIT_EVERY_BYTES: usize = 32 << 20;

/// What a snapshot holds of the ingest queue, for the backup's manifest.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// Tables copied.
    pub tables: usize,
    /// Rows copied, all tables together.
    pub rows: u64,
    /// Batches in the ingest queue (acknowledged, maybe not yet in the sink).
    pub queued_batches: u64,
    /// The last queue position handed out when the snapshot was taken.
    pub last_seq: u64,
}

impl Store {
    /// Writes every table, as one read transaction sees it, into a new state file at `target`.
    /// `progress` is told the rows copied so far.
    pub fn snapshot_into(
        &self,
        target: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SnapshotInfo, StoreError> {
        let txn = self.read()?;
        let live: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
        let copy = Database::create(target).map_err(|source| StoreError::Open {
            path: target.to_owned(),
            source,
        })?;
        let mut copier = Copier {
            from: &txn,
            to: &copy,
            copied: Vec::new(),
            rows: 0,
            progress,
        };
        copy_all(&mut copier)?;
        if let Some(missing) = live.iter().find(|name| !copier.copied.contains(name)) {
            return Err(StoreError::Conflict(format!(
                "the state file has a table `{missing}` the backup does not know; refusing an incomplete backup"
            )));
        }
        let stats = {
            let queue = txn.open_table(super::ingest::INGEST)?;
            let meta = txn.open_table(super::META)?;
            (
                queue.len()?,
                super::meta_get(&meta, super::ingest::NEXT_SEQ)?.saturating_sub(1),
            )
        };
        Ok(SnapshotInfo {
            tables: copier.copied.len(),
            rows: copier.rows,
            queued_batches: stats.0,
            last_seq: stats.1,
        })
    }
}

struct Copier<'a> {
    from: &'a ReadTransaction,
    to: &'a Database,
    copied: Vec<String>,
    rows: u64,
    progress: &'a mut dyn FnMut(u64),
}

/// Every table of the state file. A table added to the store and not here makes
/// [`Store::snapshot_into`] fail, and the backup test with it.
fn copy_all(c: &mut Copier) -> Result<(), StoreError> {
    use super::jobs::{schedules, tables as jobs};
    c.copy(super::META)?;
    c.copy(super::teams::TEAMS)?;
    c.copy(super::teams::TEAM_TOKENS)?;
    c.copy(super::secrets::SECRETS)?;
    c.copy(super::notes::NOTES)?;
    c.copy(super::ingest::INGEST)?;
    c.copy(super::positions::QUARANTINE)?;
    c.copy(super::deferred::DEFERRED)?;
    c.copy(super::deferred::DEFERRED_BYTES)?;
    c.copy(super::plugins::PLUGINS)?;
    c.copy(super::plugins::PLUGIN_CONFIGS)?;
    c.copy(super::plugin_data::PLUGIN_STORAGE)?;
    c.copy(super::plugin_data::STORAGE_USAGE)?;
    c.copy(super::plugin_data::PLUGIN_LOGS)?;
    c.copy(super::plugin_data::LOG_COUNTS)?;
    c.copy(jobs::JOBS)?;
    c.copy(jobs::JOBS_DUE)?;
    c.copy(jobs::JOBS_LEASED)?;
    c.copy(jobs::JOB_KEYS)?;
    c.copy(jobs::JOB_CONTROL)?;
    c.copy(jobs::JOB_OWNER_COUNTS)?;
    c.copy(jobs::JOBS_FINAL)?;
    c.copy(schedules::SCHEDULES)?;
    c.copy(super::exports::EXPORTS)?;
    c.copy(super::persons::PERSONS)?;
    c.copy(super::persons::DISTINCT_IDS)?;
    c.copy(super::persons::PERSON_DISTINCT_IDS)?;
    c.copy(super::persons::PERSONLESS_IDS)?;
    c.copy(super::persons::GROUP_TYPES)?;
    c.copy(super::persons::GROUPS)?;
    c.copy(super::persons::WARNINGS)?;
    c.copy(super::persons::PERSON_DELETIONS)?;
    c.copy(super::follow::FOLLOW_LOG)?;
    c.copy(super::dead_letters::SINK_DEAD_LETTERS)?;
    c.copy(super::persons::SEEN_A)?;
    c.copy(super::persons::SEEN_B)?;
    Ok(())
}

impl Copier<'_> {
    /// Copies one table (absent in the source: nothing to copy), committing every
    /// [`COMMIT_EVERY_BYTES`].
    fn copy<K: Key + 'static, V: Value + 'static>(
        &mut self,
        table: TableDefinition<K, V>,
    ) -> Result<(), StoreError> {
        let source = match self.from.open_table(table) {
            Ok(source) => source,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.copied.push(table.name().to_owned());
        let mut rows = source.iter()?;
        loop {
            let txn = self.to.begin_write()?;
            let mut more = false;
            {
                let mut target = txn.open_table(table)?;
                let mut bytes = 0usize;
                for row in rows.by_ref() {
                    let (key, value) = row?;
                    bytes += K::as_bytes(&key.value()).as_ref().len()
                        + V::as_bytes(&value.value()).as_ref().len();
                    target.insert(key.value(), value.value())?;
                    self.rows += 1;
                    if self.rows.is_multiple_of(10_000) {
                        (self.progress)(self.rows);
                    }
                    if bytes >= COMMIT_EVERY_BYTES {
                        more = true;
                        break;
                    }
                }
            }
            txn.commit()?;
            if !more {
                break;
            }
        }
        (self.progress)(self.rows);
        Ok(())
    }
}
