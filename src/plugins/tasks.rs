//! Plugins' work outside the event chain: their jobs, their schedules, and the after-write
//! deliveries to `on-event`/`export-events`, each run by the job queue as a job.
//!
//! Owns: turning a queued job into a plugin call ([`PluginRunner`]), which configs want which
//! schedules ([`PluginSchedules`]), the delivery jobs for stored events ([`deliveries`]), and the
//! pages of historical exports (each page job reads the next page from the sink, hands it to the
//! plugin, and queues the following page with its completion).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::chain::to_wit;
use super::host::JobContext;
use super::idle::IdleInstances;
use super::runtime::{CallError, Exports, Instance, WitEvent};
use super::{Catalog, Entry};
use crate::event::{timestamp_text, EventRow, IngestBatch};
use crate::jobs::{Done, InternalRunner, RunError, Runner, StopFlags};
use crate::schedule::{ScheduleSource, Wanted};
use crate::sinks::{EventReader, StoredEvent};
use crate::store::{
    Cadence, ExportProgress, ExportState, Job, JobKind, NewJob, PageCursor, PluginConfigId, TeamId,
};

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

/// Teams with at least one enabled config that implements `on-event` or `export-events`.
pub fn exporting_teams(catalog: &Catalog) -> Result<HashSet<TeamId>, super::PluginError> {
    let (_, entries) = catalog.enabled()?;
    Ok(entries
        .iter()
        .filter(|e| is_exporter(e))
        .map(|e| e.config.team_id)
        .collect())
}

fn is_exporter(entry: &Entry) -> bool {
    entry
        .info
        .exports
        .intersects(Exports::ON_EVENT | Exports::EXPORT_EVENTS)
}

/// Stored events of one batch to hand to its team's exporting plugins.
pub struct ToDeliver<'a> {
    pub team_id: TeamId,
    pub ip: Option<&'a str>,
    pub rows: Vec<&'a EventRow>,
}

impl<'a> ToDeliver<'a> {
    /// The `rows` of `batch` as the sink stored them.
    pub fn of(batch: &'a IngestBatch, rows: impl Iterator<Item = &'a EventRow>) -> ToDeliver<'a> {
        ToDeliver {
            team_id: batch.team_id,
            ip: batch.ip.as_deref(),
            rows: rows.collect(),
        }
    }
}

/// The delivery jobs for stored events: for each enabled config of the events' team that
/// implements `on-event` or `export-events`, the events in chunks.
pub fn delivery_jobs(
    catalog: &Catalog,
    items: &[ToDeliver<'_>],
) -> Result<Vec<NewJob>, super::PluginError> {
    let (_, entries) = catalog.enabled()?;
    let exporters: Vec<_> = entries.iter().filter(|e| is_exporter(e)).collect();
    let mut jobs = Vec::new();
    if exporters.is_empty() {
        return Ok(jobs);
    }
    let now = crate::jobs::now_ms();
    let timeout_ms = catalog.runtime().limits.task.as_millis() as u64;
    for item in items.iter().filter(|i| !i.rows.is_empty()) {
        for entry in exporters
            .iter()
            .filter(|e| e.config.team_id == item.team_id)
        {
            for chunk in item.rows.chunks(DELIVERY_CHUNK) {
                let events: Vec<DeliveredEvent> = chunk
                    .iter()
                    .map(|row| DeliveredEvent::from(to_wit(row, item.team_id, item.ip)))
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

/// Runs plugin jobs, schedule slots, deliveries and export pages, each as one call on an
/// instance of the plugin config kept between jobs ([`IdleInstances`]).
pub struct PluginRunner {
    catalog: Arc<Catalog>,
    /// Where historical exports read stored events from.
    events: Option<Arc<dyn EventReader>>,
    idle: IdleInstances,
    /// The enabled configs as last read, and when: reading them costs a read transaction, whose
    /// file locks (redb's, for the CLI beside the server) cost more than a no-op job.
    enabled: Mutex<Option<EnabledView>>,
}

/// When the enabled configs were read, the catalog's generation then, and the configs.
type EnabledView = (Instant, u64, Vec<Arc<Entry>>);

/// How stale the runner's view of the enabled configs may be: a config changed or disabled
/// reaches jobs within this time.
const ENABLED_FRESH_FOR: Duration = Duration::from_millis(100);

impl Runner for PluginRunner {
    fn run(&self, job: &Job, stop: &Arc<StopFlags>) -> Result<Done, RunError> {
        let config = match &job.kind {
            JobKind::Noop => return InternalRunner.run(job, stop),
            JobKind::Plugin { config, .. }
            | JobKind::Schedule { config, .. }
            | JobKind::Deliver { config }
            | JobKind::ExportPage { config, .. } => *config,
        };
        let (generation, entries) = self.enabled()?;
        let entry = entries
            .iter()
            .find(|e| e.config.id == config)
            .cloned()
            .ok_or_else(|| {
                RunError::Failed(format!(
                    "plugin config {config} is not enabled (re-queue the job once it is)"
                ))
            })?;
        let deadline = match job.timeout_ms {
            0 => self.catalog.runtime().limits.task,
            ms => Duration::from_millis(ms),
        };
        let mut instance = match self.idle.take(&entry, generation, &entries) {
            Some(instance) => instance,
            None => self
                .catalog
                .start(&entry, None)
                .map_err(|e| failure(&self.catalog, config, job, "could not start", e))?,
        };
        instance.host().job = Some(JobContext {
            id: job.id,
            checkpoint: job.checkpoint.clone(),
            stop: stop.clone(),
            follow_ups: Vec::new(),
        });
        let mut export = None;
        let mut pages = Vec::new();
        let result = match &job.kind {
            JobKind::ExportPage { export: id, .. } => self
                .export_page(job, *id, &entry, &mut instance, deadline)
                .map(|page| {
                    if let Some((progress, next)) = page {
                        export = Some(progress);
                        pages.extend(next);
                    }
                }),
            JobKind::Plugin { name, .. } => instance
                .run_job(name, &job.payload, deadline)
                .map_err(|e| failure(&self.catalog, config, job, "failed", e)),
            JobKind::Schedule { cadence, .. } => instance
                .run_every(*cadence, deadline)
                .map_err(|e| failure(&self.catalog, config, job, "failed", e)),
            JobKind::Deliver { .. } => deliver(&mut instance, &job.payload, deadline)
                .map_err(|e| failure(&self.catalog, config, job, "failed", e)),
            JobKind::Noop => Ok(()),
        };
        let mut follow_ups = instance
            .host()
            .job
            .take()
            .map(|j| j.follow_ups)
            .unwrap_or_default();
        instance.host().end_call();
        if instance.reusable() {
            self.idle.put(entry, instance);
        }
        follow_ups.extend(pages);
        result.map(|()| Done { follow_ups, export })
    }
}

/// Hands a delivery job's events to the plugin.
fn deliver(instance: &mut Instance, payload: &str, deadline: Duration) -> Result<(), CallError> {
    let events: Vec<DeliveredEvent> = serde_json::from_str(payload)
        .map_err(|e| CallError::Failed(format!("unreadable delivery payload: {e}")))?;
    let events: Vec<WitEvent> = events.into_iter().map(WitEvent::from).collect();
    instance.deliver(&events, deadline)
}

impl PluginRunner {
    /// Runs `catalog`'s plugins, keeping up to `keep_idle` instances between jobs.
    pub fn new(
        catalog: Arc<Catalog>,
        events: Option<Arc<dyn EventReader>>,
        keep_idle: usize,
    ) -> PluginRunner {
        PluginRunner {
            catalog,
            events,
            idle: IdleInstances::new(keep_idle),
            enabled: Mutex::new(None),
        }
    }

    /// The catalog's generation and enabled configs, read again when older than
    /// [`ENABLED_FRESH_FOR`].
    fn enabled(&self) -> Result<(u64, Vec<Arc<Entry>>), RunError> {
        let mut cached = self.enabled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((read_at, generation, entries)) = &*cached {
            if read_at.elapsed() < ENABLED_FRESH_FOR {
                return Ok((*generation, entries.clone()));
            }
        }
        let (generation, entries) = self
            .catalog
            .enabled()
            .map_err(|e| RunError::Retry(e.to_string()))?;
        *cached = Some((Instant::now(), generation, entries.clone()));
        Ok((generation, entries))
    }

    /// Hands one page of a historical export to the plugin. Returns the progress and the next
    /// page's job (none after the last page), or `None` if the export was cancelled.
    fn export_page(
        &self,
        job: &Job,
        export_id: u64,
        entry: &Entry,
        instance: &mut Instance,
        deadline: Duration,
    ) -> Result<Option<(ExportProgress, Option<NewJob>)>, RunError> {
        let store = self.catalog.store();
        let export = store
            .export(export_id)
            .map_err(|e| RunError::Retry(e.to_string()))?
            .ok_or_else(|| RunError::Failed(format!("export {export_id} is not recorded")))?;
        if export.state != ExportState::Running {
            return Ok(None);
        }
        if !entry
            .info
            .exports
            .intersects(Exports::EXPORT_EVENTS | Exports::ON_EVENT)
        {
            return Err(RunError::Failed(format!(
                "{} implements neither export-events nor on-event",
                entry.plugin_name
            )));
        }
        let reader = self
            .events
            .as_ref()
            .ok_or_else(|| RunError::Failed("no event store to read from".into()))?;
        let cursor: PageCursor = serde_json::from_str(&job.payload)
            .map_err(|e| RunError::Failed(format!("unreadable export cursor: {e}")))?;
        let time = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(timestamp_text)
                .unwrap_or_default()
        };
        let (from, to) = (time(export.from_ms), time(export.to_ms));
        let read_failed = |e: crate::sinks::SinkError| RunError::Retry(e.to_string());
        let total = match cursor.total {
            Some(total) => total,
            None => reader
                .count_events(export.team, &from, &to)
                .map_err(read_failed)?,
        };
        let page = reader
            .read_events(
                export.team,
                (&from, &to),
                cursor.after.as_ref(),
                export.page_size,
            )
            .map_err(read_failed)?;
        if !page.is_empty() {
            let events: Vec<WitEvent> = page.iter().map(stored_to_wit).collect();
            instance
                .deliver(&events, deadline)
                .map_err(|e| failure(&self.catalog, export.config, job, "failed", e))?;
        }
        let done = cursor.done + page.len() as u64;
        let next = match page.last() {
            Some(last) if page.len() as u32 >= export.page_size => Some(NewJob {
                id: uuid::Uuid::now_v7(),
                kind: job.kind.clone(),
                payload: serde_json::to_string(&PageCursor {
                    after: Some((last.timestamp.clone(), last.row_id)),
                    done,
                    total: Some(total),
                })
                .unwrap_or_default(),
                run_at_ms: crate::jobs::now_ms(),
                max_attempts: job.max_attempts,
                timeout_ms: job.timeout_ms,
                idempotency_key: None,
                after: Vec::new(),
            }),
            _ => None,
        };
        let progress = ExportProgress {
            export: export_id,
            total: Some(total),
            done,
            next_job: next.as_ref().map(|j| j.id),
        };
        Ok(Some((progress, next)))
    }
}

fn stored_to_wit(e: &StoredEvent) -> WitEvent {
    WitEvent {
        uuid: e.uuid.clone(),
        event: e.event.clone(),
        distinct_id: e.distinct_id.clone(),
        team_id: e.team_id,
        timestamp: e.timestamp.clone(),
        properties: e.properties.clone(),
        elements_chain: e.elements_chain.clone(),
        ip: None,
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
    catalog.log_error(config, message.clone());
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
    fn wanted(&self) -> Result<Vec<Wanted>, String> {
        let (_, entries) = self.catalog.enabled().map_err(|e| e.to_string())?;
        let mut wanted = Vec::new();
        for entry in entries {
            for (cadence, export) in [
                (Cadence::Minute, Exports::RUN_EVERY_MINUTE),
                (Cadence::Hour, Exports::RUN_EVERY_HOUR),
                (Cadence::Day, Exports::RUN_EVERY_DAY),
            ] {
                if entry.info.exports.contains(export) {
                    wanted.push(Wanted {
                        config: entry.config.id,
                        cadence,
                        name: format!(
                            "{}/{}/{}",
                            entry.config.team_id,
                            entry.plugin_name,
                            cadence.name()
                        ),
                    });
                }
            }
        }
        Ok(wanted)
    }
}
