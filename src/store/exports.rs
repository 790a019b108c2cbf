//! Historical exports: an operator's request to hand a plugin config the stored events between
//! two times. The pages run as a chain of `ExportPage` jobs; this record is their progress, and
//! it changes in the same transaction as the completion of the page job that made the progress.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::jobs::{JobKind, JobTables, NewJob};
use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::ids::{JobId, PluginConfigId, TeamId};

/// Export id → encoded [`Export`].
pub(in crate::store) const EXPORTS: TableDefinition<u64, &[u8]> = TableDefinition::new("exports");
const NEXT_EXPORT_ID: &str = "next_export_id";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportState {
    Running,
    Done,
    Cancelled,
}

impl ExportState {
    pub fn name(self) -> &'static str {
        match self {
            ExportState::Running => "running",
            ExportState::Done => "done",
            ExportState::Cancelled => "cancelled",
        }
    }
}

/// A historical export and how far it has got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub id: u64,
    pub config: PluginConfigId,
    pub team: TeamId,
    /// Event timestamps from (inclusive) and to (exclusive), unix ms.
    pub from_ms: i64,
    pub to_ms: i64,
    pub page_size: u32,
    pub state: ExportState,
    /// Events in the range, once the first page has counted them.
    pub total: Option<u64>,
    /// Events handed to the plugin by completed pages.
    pub done: u64,
    /// The page job that runs next (or ran last).
    pub job: Option<JobId>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What a completed page job reports, applied with its completion.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportProgress {
    pub export: u64,
    pub total: Option<u64>,
    pub done: u64,
    /// The next page's job, or `None` when this was the last page.
    pub next_job: Option<JobId>,
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(EXPORTS)?;
    Ok(())
}

/// Applies a page's progress; a cancelled export stays cancelled.
pub(super) fn apply_progress(
    table: &mut Table<'_, u64, &'static [u8]>,
    progress: ExportProgress,
    now_ms: i64,
) -> Result<(), StoreError> {
    let Some(bytes) = table.get(progress.export)?.map(|b| b.value().to_vec()) else {
        return Ok(());
    };
    let mut export: Export = decode_value("export", &bytes)?;
    export.total = progress.total.or(export.total);
    export.done = progress.done;
    export.updated_ms = now_ms;
    if export.state == ExportState::Running {
        export.job = progress.next_job.or(export.job);
        if progress.next_job.is_none() {
            export.state = ExportState::Done;
        }
    }
    table.insert(export.id, encode_value(&export).as_slice())?;
    Ok(())
}

/// The payload of a page job: where the page starts and what came before.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PageCursor {
    /// (timestamp text, row id) of the last event of the previous page.
    pub after: Option<(String, i64)>,
    pub done: u64,
    pub total: Option<u64>,
}

impl Store {
    /// Records an export and queues its first page, in one transaction.
    pub fn start_export(
        &self,
        config: PluginConfigId,
        team: TeamId,
        range_ms: (i64, i64),
        page_size: u32,
        timeout_ms: u64,
        now_ms: i64,
    ) -> Result<Export, StoreError> {
        let txn = self.write()?;
        let export = {
            let id = {
                let mut meta = txn.open_table(META)?;
                let id = meta_get(&meta, NEXT_EXPORT_ID)?.max(1);
                meta.insert(NEXT_EXPORT_ID, id + 1)?;
                id
            };
            let mut jobs = JobTables::open(&txn, now_ms)?;
            let job = jobs.insert(
                NewJob {
                    id: uuid::Uuid::now_v7(),
                    kind: JobKind::ExportPage { config, export: id },
                    payload: serde_json::to_string(&PageCursor::default())
                        .unwrap_or_else(|_| "{}".into()),
                    run_at_ms: now_ms,
                    max_attempts: 10,
                    timeout_ms,
                    idempotency_key: None,
                    after: Vec::new(),
                },
                0,
            )?;
            let export = Export {
                id,
                config,
                team,
                from_ms: range_ms.0,
                to_ms: range_ms.1,
                page_size: page_size.max(1),
                state: ExportState::Running,
                total: None,
                done: 0,
                job: Some(job),
                created_ms: now_ms,
                updated_ms: now_ms,
            };
            drop(jobs);
            txn.open_table(EXPORTS)?
                .insert(id, encode_value(&export).as_slice())?;
            export
        };
        self.commit(txn)?;
        Ok(export)
    }

    pub fn export(&self, id: u64) -> Result<Option<Export>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(EXPORTS)?;
        let value = table.get(id)?;
        value.map(|b| decode_value("export", b.value())).transpose()
    }

    pub fn list_exports(&self) -> Result<Vec<Export>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(EXPORTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            out.push(decode_value("export", row?.1.value())?);
        }
        Ok(out)
    }

    /// Marks an export cancelled; its next page does not run (a page already running is asked
    /// to stop by the caller, through the job queue).
    pub fn cancel_export(&self, id: u64, now_ms: i64) -> Result<Export, StoreError> {
        let txn = self.write()?;
        let export = {
            let mut table = txn.open_table(EXPORTS)?;
            let bytes = table
                .get(id)?
                .map(|b| b.value().to_vec())
                .ok_or_else(|| StoreError::NotFound(format!("no export {id}")))?;
            let mut export: Export = decode_value("export", &bytes)?;
            if export.state != ExportState::Running {
                return Err(StoreError::Conflict(format!(
                    "export {id} is already {}",
                    export.state.name()
                )));
            }
            export.state = ExportState::Cancelled;
            export.updated_ms = now_ms;
            table.insert(id, encode_value(&export).as_slice())?;
            export
        };
        self.commit(txn)?;
        Ok(export)
    }
}
