//! Historical export operations: start, list, show, cancel.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::plugins::team_config;
use super::{OpError, Ops};
use crate::jobs::now_ms;
use crate::store::{Control, Export, TeamId};

/// Events handed to the plugin per page of a historical export, unless the operator says.
pub const EXPORT_PAGE_SIZE: u32 = 500;

/// An export as the CLI and `/api/` show it, with the state of its page job.
#[derive(Debug, Serialize)]
pub struct ExportView {
    pub id: u64,
    pub plugin_config: u64,
    pub team: TeamId,
    pub from: String,
    pub to: String,
    pub state: &'static str,
    pub total: Option<u64>,
    pub done: u64,
    pub page_size: u32,
    pub page_job: Option<String>,
    pub page_job_state: Option<&'static str>,
}

impl Ops {
    /// Starts a historical export of the team's stored events with `from <= timestamp < to` to
    /// its config of `plugin`.
    pub fn start_export(
        &self,
        team: TeamId,
        plugin: &str,
        range: (DateTime<Utc>, DateTime<Utc>),
        page_size: Option<u32>,
    ) -> Result<ExportView, OpError> {
        let (record, config) = team_config(&self.store, team, plugin)?;
        if !config.enabled {
            return Err(OpError::Conflict(format!(
                "{} is disabled for team {team}; enable it first",
                record.name
            )));
        }
        if range.0 >= range.1 {
            return Err(OpError::Malformed(format!(
                "the export range is empty: from {} is not before to {}",
                range.0, range.1
            )));
        }
        let export = self.store.start_export(
            config.id,
            team,
            (range.0.timestamp_millis(), range.1.timestamp_millis()),
            page_size.unwrap_or(EXPORT_PAGE_SIZE).clamp(1, 100_000),
            self.plugin_limits.task.as_millis() as u64,
            now_ms(),
        )?;
        self.queue.wake();
        self.export_view(&export)
    }

    pub fn list_exports(&self) -> Result<Vec<ExportView>, OpError> {
        self.store
            .list_exports()?
            .iter()
            .map(|e| self.export_view(e))
            .collect()
    }

    pub fn show_export(&self, id: u64) -> Result<ExportView, OpError> {
        let export = self
            .store
            .export(id)?
            .ok_or_else(|| OpError::NotFound(format!("no export {id}")))?;
        self.export_view(&export)
    }

    /// Cancels a historical export: no further page starts, and a page running now is asked to
    /// stop.
    pub fn cancel_export(&self, id: u64) -> Result<ExportView, OpError> {
        let now = now_ms();
        let export = self.store.cancel_export(id, now)?;
        if let Some(job) = export.job {
            // The page job may have finished already; only a live one is asked to stop.
            if let Err(e) = self.store.control_job(job, Control::Cancel, now) {
                tracing::debug!(export = id, error = %e, "no page job to stop");
            }
        }
        self.export_view(&export)
    }

    fn export_view(&self, export: &Export) -> Result<ExportView, OpError> {
        let time = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        };
        let page_job_state = match export.job {
            Some(id) => self.store.job(id)?.map(|j| j.state.name()),
            None => None,
        };
        Ok(ExportView {
            id: export.id,
            plugin_config: export.config,
            team: export.team,
            from: time(export.from_ms),
            to: time(export.to_ms),
            state: export.state.name(),
            total: export.total,
            done: export.done,
            page_size: export.page_size,
            page_job: export.job.map(|j| j.to_string()),
            page_job_state,
        })
    }
}
