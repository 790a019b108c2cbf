//! The schedules' progress: one row per (plugin config, cadence), changed in the same
//! transaction as the job queue, so a slot's job and the record of its slot commit together.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::super::{decode_value, encode_value, Store, StoreError};
use super::{Cadence, JobTables, ScheduleKey, ScheduleState};
use crate::ids::PluginConfigId;

/// (plugin config, cadence) → encoded [`ScheduleState`].
pub(in crate::store) const SCHEDULES: TableDefinition<(u64, u8), &[u8]> =
    TableDefinition::new("schedules");

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SCHEDULES)?;
    Ok(())
}

/// The schedule tables of one write transaction.
pub struct ScheduleTables<'txn> {
    schedules: Table<'txn, (u64, u8), &'static [u8]>,
    pub jobs: JobTables<'txn>,
}

impl ScheduleTables<'_> {
    pub fn all(&self) -> Result<Vec<(ScheduleKey, ScheduleState)>, StoreError> {
        let mut out = Vec::new();
        for row in self.schedules.iter()? {
            let (key, value) = row?;
            let (config, code) = key.value();
            if let Some(cadence) = Cadence::from_code(code) {
                out.push(((config, cadence), decode_value("schedule", value.value())?));
            }
        }
        Ok(out)
    }

    pub fn set(
        &mut self,
        config: PluginConfigId,
        cadence: Cadence,
        state: &ScheduleState,
    ) -> Result<(), StoreError> {
        self.schedules
            .insert((config, cadence.code()), encode_value(state).as_slice())?;
        Ok(())
    }

    pub fn remove(&mut self, config: PluginConfigId, cadence: Cadence) -> Result<(), StoreError> {
        self.schedules.remove((config, cadence.code()))?;
        Ok(())
    }
}

impl Store {
    /// Every schedule's progress, for the admin page.
    pub fn list_schedules(&self) -> Result<Vec<(ScheduleKey, ScheduleState)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(SCHEDULES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let (config, code) = key.value();
            if let Some(cadence) = Cadence::from_code(code) {
                out.push(((config, cadence), decode_value("schedule", value.value())?));
            }
        }
        Ok(out)
    }

    /// Runs `update` over the schedules and the job queue in one durable transaction.
    pub fn update_schedules<T>(
        &self,
        now_ms: i64,
        update: impl FnOnce(&mut ScheduleTables<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.write()?;
        let result = {
            let mut tables = ScheduleTables {
                schedules: txn.open_table(SCHEDULES)?,
                jobs: JobTables::open(&txn, now_ms)?,
            };
            update(&mut tables)?
        };
        self.commit(txn)?;
        Ok(result)
    }
}
