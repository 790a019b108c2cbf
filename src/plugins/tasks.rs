//! Plugins' work outside the event chain: their jobs, their schedules, and the after-write
//! deliveries to `on-event`/`export-events`, each run by the job queue as a job.
//!
//! Owns: turning a queued job into a plugin call ([`PluginRunner`]), which configs want which
//! schedules ([`PluginSchedules`]), and the delivery jobs for stored events ([`deliveries`]).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::host::JobContext;
use super::runtime::{CallError, Exports, WitEvent};
use super::{log_error, to_wit, Catalog};
use crate::event::IngestBatch;
use crate::jobs::{InternalRunner, RunError, Runner, StopFlags};
use crate::schedule::ScheduleSource;
use crate::store::{Cadence, Job, JobKind, NewJob, PluginConfigId};

/// Events handed to one delivery job at most (PostHog's exports buffered about this many).
pub const DELIVERY_CHUNK: usize = 500;
/// Attempts of a delivery before it becomes a dead letter.
pub const DELIVERY_ATTEMPTS: u32 = 10;

/// A stored event in a delivery job's payload.
#[derive(Serialize, Deserialize)]
struct DeliveredEvent {
    uuid: String,
    event: String,
    distinct_id: String,
    team_id: u64,
    timestamp: String,
    /// A JSON object, as text.
    properties: String,
    elements_chain: String,
    ip: Option<String>,
}

impl From<WitEvent> for DeliveredEvent {
    fn from(e: WitEvent) -> DeliveredEvent {
        DeliveredEvent {
            uuid: e.uuid,
            event: e.event,
            distinct_id: e.distinct_id,
            team_id: e.team_id,
            timestamp: e.timestamp,
            properties: e.properties,
            elements_chain: e.elements_chain,
            ip: e.ip,
        }
    }
}

impl From<DeliveredEvent> for WitEvent {
    fn from(e: DeliveredEvent) -> WitEvent {
        WitEvent {
            uuid: e.uuid,
            event: e.event,
            distinct_id: e.distinct_id,
            team_id: e.team_id,
            timestamp: e.timestamp,
            properties: e.properties,
            elements_chain: e.elements_chain,
            ip: e.ip,
        }
    }
}

/// The delivery jobs for batches just written to the sink: for each enabled config of the
/// batch's team that implements `on-event` or `export-events`, the events in chunks.
pub fn deliveries(
    catalog: &Catalog,
    batches: &[IngestBatch],
) -> Result<Vec<NewJob>, super::PluginError> {
    let (_, entries) = catalog.enabled()?;
    let exporters: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.info
                .exports
                .intersects(Exports::ON_EVENT | Exports::EXPORT_EVENTS)
        })
        .collect();
    let mut jobs = Vec::new();
    if exporters.is_empty() {
        return Ok(jobs);
    }
    let now = crate::jobs::now_ms();
    let timeout_ms = catalog.runtime().limits.task.as_millis() as u64;
    for batch in batches {
        for entry in exporters
            .iter()
            .filter(|e| e.config.team_id == batch.team_id)
        {
            for chunk in batch.events.chunks(DELIVERY_CHUNK) {
                let events: Vec<DeliveredEvent> = chunk
                    .iter()
                    .map(|row| DeliveredEvent::from(to_wit(row, batch)))
                    .collect();
                jobs.push(NewJob {
                    id: uuid::Uuid::now_v7(),
                    kind: JobKind::Deliver {
                        config: entry.config.id,
                    },
                    payload: serde_json::to_string(&events).unwrap_or_else(|_| "[]".into()),
                    run_at_ms: now,
                    max_attempts: DELIVERY_ATTEMPTS,
                    timeout_ms,
                    idempotency_key: None,
                    after: Vec::new(),
                });
            }
        }
    }
    Ok(jobs)
}

/// Runs plugin jobs, schedule slots and deliveries on fresh instances of the plugin.
pub struct PluginRunner {
    pub catalog: Arc<Catalog>,
}

impl Runner for PluginRunner {
    fn run(&self, job: &Job, stop: &Arc<StopFlags>) -> Result<Vec<NewJob>, RunError> {
        let config = match &job.kind {
            JobKind::Noop => return InternalRunner.run(job, stop),
            JobKind::Plugin { config, .. }
            | JobKind::Schedule { config, .. }
            | JobKind::Deliver { config }
            | JobKind::ExportPage { config, .. } => *config,
        };
        let entry = self
            .catalog
            .entry(config)
            .map_err(|e| RunError::Retry(e.to_string()))?
            .ok_or_else(|| {
                RunError::Failed(format!(
                    "plugin config {config} is not enabled (re-queue the job once it is)"
                ))
            })?;
        let deadline = match job.timeout_ms {
            0 => self.catalog.runtime().limits.task,
            ms => Duration::from_millis(ms),
        };
        let context = JobContext {
            id: job.id,
            checkpoint: job.checkpoint.clone(),
            stop: stop.clone(),
            follow_ups: Vec::new(),
        };
        let mut instance = self
            .catalog
            .start(&entry, Some(context))
            .map_err(|e| failure(&self.catalog, config, job, "could not start", e))?;
        let result = match &job.kind {
            JobKind::Plugin { name, .. } => instance.run_job(name, &job.payload, deadline),
            JobKind::Schedule { cadence, .. } => instance.run_every(*cadence, deadline),
            JobKind::Deliver { .. } => {
                let events: Vec<DeliveredEvent> = serde_json::from_str(&job.payload)
                    .map_err(|e| RunError::Failed(format!("unreadable delivery payload: {e}")))?;
                let events: Vec<WitEvent> = events.into_iter().map(WitEvent::from).collect();
                instance.deliver(&events, deadline)
            }
            JobKind::ExportPage { .. } | JobKind::Noop => Err(CallError::Failed(
                "historical exports are not available in this build".into(),
            )),
        };
        let follow_ups = instance
            .host()
            .job
            .as_mut()
            .map(|j| std::mem::take(&mut j.follow_ups))
            .unwrap_or_default();
        instance.host().flush_logs();
        match result {
            Ok(()) => Ok(follow_ups),
            Err(e) => Err(failure(&self.catalog, config, job, "failed", e)),
        }
    }
}

/// Logs a failed attempt against the plugin config and says whether to retry.
fn failure(
    catalog: &Catalog,
    config: PluginConfigId,
    job: &Job,
    what: &str,
    e: CallError,
) -> RunError {
    let message = format!("{} ({}) {what}: {e}", job.kind.label(), job.id);
    log_error(catalog.store(), config, message.clone());
    match e {
        CallError::Failed(_) => RunError::Failed(message),
        _ => RunError::Retry(message),
    }
}

/// The schedules the enabled plugin configs ask for, by their exports.
pub struct PluginSchedules {
    pub catalog: Arc<Catalog>,
}

impl ScheduleSource for PluginSchedules {
    fn wanted(&self) -> Result<Vec<(PluginConfigId, Cadence)>, String> {
        let (_, entries) = self.catalog.enabled().map_err(|e| e.to_string())?;
        let mut wanted = Vec::new();
        for entry in entries {
            for (cadence, export) in [
                (Cadence::Minute, Exports::RUN_EVERY_MINUTE),
                (Cadence::Hour, Exports::RUN_EVERY_HOUR),
                (Cadence::Day, Exports::RUN_EVERY_DAY),
            ] {
                if entry.info.exports.contains(export) {
                    wanted.push((entry.config.id, cadence));
                }
            }
        }
        Ok(wanted)
    }
}
