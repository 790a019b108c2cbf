//! Each team's chain of `process-event` plugins: run in order over a queued batch, events kept
//! in the plugins' form from the first plugin to the last, each plugin's output checked (a valid
//! event of the same team and uuid, within capture's size and nesting limits), a failing plugin
//! logged and skipped (its events go on unchanged), and a plugin that keeps failing disabled.
//!
//! One team's plugins cannot hold back another team's events: instances are made and `setup`
//! run off the pipeline's path (a warm-up thread per config, within `PLUGIN_SETUP_TIMEOUT_MS`),
//! and each config has a time budget per minute (`PLUGIN_TIME_BUDGET_MS_PER_MINUTE`). While a
//! team's chain is warming up or over budget, [`Chains::readiness`] says so and the pipeline
//! sets that team's batches aside (deferred) instead of waiting; other teams' events flow on.
//! A replaced or disabled config's instance is torn down, off the path too.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::catalog::{Catalog, Entry};
use super::runtime::{CallError, Exports, Instance, WitEvent};
use super::{PluginError, DISABLE_AFTER_FAILURES};
use crate::event::properties::{with_each_key_once, NotAnObject};
use crate::event::{json_depth_within, timestamp_text, EventRow, IngestBatch, MAX_JSON_DEPTH};
use crate::store::{PluginConfig, PluginConfigId, TeamId};

/// PostHog's longest event name and distinct id, in characters.
const MAX_NAME_CHARS: usize = 200;
/// How long a config whose start failed is skipped before it is tried again, at most.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Whether a team's batches can go through its chain now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// No `process-event` plugin: the events go on as they are.
    NoChain,
    Ready,
    /// Not now (a plugin is starting, or over its time budget): set the batches aside.
    Wait(String),
}

/// A config's allowance of call time, refilled continuously (a token bucket in milliseconds).
struct TimeBudget {
    available_ms: f64,
    refilled: Instant,
    per_minute_ms: f64,
    /// When it last went over, so the operator is told once per spell.
    reported_over: bool,
}

impl TimeBudget {
    fn new(per_minute: Duration) -> TimeBudget {
        let ms = per_minute.as_secs_f64() * 1000.0;
        TimeBudget {
            available_ms: ms,
            refilled: Instant::now(),
            per_minute_ms: ms,
            reported_over: false,
        }
    }

    fn refill(&mut self) {
        let elapsed = self.refilled.elapsed().as_secs_f64();
        self.refilled = Instant::now();
        self.available_ms =
            (self.available_ms + elapsed * self.per_minute_ms / 60.0).min(self.per_minute_ms);
    }

    fn spend(&mut self, took: Duration) {
        self.refill();
        self.available_ms -= took.as_secs_f64() * 1000.0;
    }

    fn over(&mut self) -> bool {
        self.refill();
        self.available_ms <= 0.0
    }
}

/// Where a config's instance is.
enum Life {
    /// Not started (or discarded after a trap): start it when next needed.
    Cold,
    /// Being made and set up on its warm-up thread.
    Warming(mpsc::Receiver<Result<Instance, CallError>>),
    Ready(Box<Instance>),
    /// Its start failed: skipped (its events go on unchanged) until `until`.
    Failed {
        until: Instant,
    },
}

/// One plugin config in a team's chain.
struct Slot {
    entry: Arc<Entry>,
    life: Life,
    consecutive_failures: u32,
    budget: TimeBudget,
}

/// The `process-event` chains of every team, as the store describes them.
pub struct Chains {
    catalog: Arc<Catalog>,
    generation: Option<u64>,
    teams: HashMap<TeamId, Vec<Slot>>,
    budget_per_minute: Duration,
}

impl Chains {
    pub fn new(catalog: Arc<Catalog>) -> Chains {
        let budget_per_minute = catalog.policy().quotas.time_budget_per_minute;
        Chains {
            catalog,
            generation: None,
            teams: HashMap::new(),
            budget_per_minute,
        }
    }

    /// Rebuilds the chains if plugins or configs changed since the last look. An unchanged
    /// config keeps its instance; the instance of one replaced or disabled is torn down.
    pub fn refresh(&mut self) -> Result<(), PluginError> {
        let (generation, entries) = self.catalog.enabled()?;
        if self.generation == Some(generation) {
            return Ok(());
        }
        let mut old: HashMap<PluginConfigId, Slot> = self
            .teams
            .drain()
            .flat_map(|(_, slots)| slots)
            .map(|s| (s.entry.config.id, s))
            .collect();
        for entry in entries {
            if !entry
                .info
                .exports
                .intersects(Exports::PROCESS_EVENT | Exports::PROCESS_EVENT_BATCH)
            {
                continue;
            }
            let slot = match old.remove(&entry.config.id) {
                Some(slot) if Arc::ptr_eq(&slot.entry, &entry) => slot,
                previous => {
                    if let Some(previous) = previous {
                        tear_down(previous);
                    }
                    Slot {
                        entry: entry.clone(),
                        life: Life::Cold,
                        consecutive_failures: 0,
                        budget: TimeBudget::new(self.budget_per_minute),
                    }
                }
            };
            self.teams
                .entry(entry.config.team_id)
                .or_default()
                .push(slot);
        }
        for (_, gone) in old {
            tear_down(gone);
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// Whether `team`'s batches can go through its chain now; starts (off the path) the
    /// instances it needs.
    pub fn readiness(&mut self, team: TeamId) -> Readiness {
        let Some(slots) = self.teams.get_mut(&team) else {
            return Readiness::NoChain;
        };
        if slots.is_empty() {
            return Readiness::NoChain;
        }
        let mut waiting = Vec::new();
        for slot in slots.iter_mut() {
            advance(&self.catalog, slot);
            match &slot.life {
                Life::Warming(_) => waiting.push(format!(
                    "{} (config {}) is starting",
                    slot.entry.plugin_name, slot.entry.config.id
                )),
                Life::Ready(_) if slot.budget.over() => {
                    if !slot.budget.reported_over {
                        slot.budget.reported_over = true;
                        let message = format!(
                            "used its time budget (PLUGIN_TIME_BUDGET_MS_PER_MINUTE, {} ms a minute); the team's events wait until it refills",
                            self.budget_per_minute.as_millis()
                        );
                        tracing::warn!(config = slot.entry.config.id, team, "plugin {message}");
                        self.catalog.log_error(slot.entry.config.id, message);
                    }
                    waiting.push(format!(
                        "{} (config {}) is over its time budget",
                        slot.entry.plugin_name, slot.entry.config.id
                    ));
                }
                Life::Ready(_) => slot.budget.reported_over = false,
                Life::Cold | Life::Failed { .. } => {}
            }
        }
        if waiting.is_empty() {
            Readiness::Ready
        } else {
            Readiness::Wait(waiting.join("; "))
        }
    }

    /// Runs the team's chain over one queued batch, in order. Failures leave events unchanged.
    /// Call after [`Chains::readiness`] said `Ready`.
    ///
    /// Events are converted to the plugins' form once, stay in it from the first plugin to the
    /// last, and are converted back once: each plugin's output is checked against its input
    /// without re-parsing what it left unchanged.
    pub fn process(&mut self, batch: &mut IngestBatch) {
        let Some(slots) = self.teams.get_mut(&batch.team_id) else {
            return;
        };
        let max_event_bytes = self.catalog.policy().quotas.max_event_bytes;
        let mut chain = ChainEvents {
            keys: batch.events.iter().map(|e| (e.uuid, e.timestamp)).collect(),
            events: batch
                .events
                .iter()
                .map(|e| to_wit(e, batch.team_id, batch.ip.as_deref()))
                .collect(),
            team_id: batch.team_id,
            max_event_bytes,
        };
        let mut disabled = Vec::new();
        for slot in slots.iter_mut() {
            if chain.events.is_empty() {
                break;
            }
            run_slot(slot, &mut chain);
            if slot.consecutive_failures >= DISABLE_AFTER_FAILURES {
                disabled.push(slot.entry.config.clone());
            }
        }
        batch.events = chain.into_rows();
        for config in disabled {
            self.disable(config);
        }
    }

    /// Tears every instance down (the server is stopping), each within its deadline, together.
    pub fn shut_down(&mut self) {
        let tearing: Vec<_> = self
            .teams
            .drain()
            .flat_map(|(_, slots)| slots)
            .filter_map(tear_down)
            .collect();
        for thread in tearing {
            let _ = thread.join();
        }
    }

    fn disable(&mut self, config: PluginConfig) {
        let store = self.catalog.store();
        let message = format!("disabled after {DISABLE_AFTER_FAILURES} consecutive failures; fix the cause and enable it again");
        tracing::error!(
            config = config.id,
            team = config.team_id,
            "plugin config {message}"
        );
        self.catalog.log_error(config.id, message);
        if let Err(e) =
            store.upsert_plugin_config(config.team_id, config.plugin_id, false, None, None)
        {
            tracing::error!(error = %e, "cannot disable the failing plugin config");
        }
        if let Some(slots) = self.teams.get_mut(&config.team_id) {
            slots.retain(|s| s.entry.config.id != config.id);
        }
    }
}

/// Moves a slot's instance along: a cold one starts warming, a finished warm-up becomes ready
/// (or failed, counted and logged), a failed one is tried again after its backoff.
fn advance(catalog: &Arc<Catalog>, slot: &mut Slot) {
    loop {
        let next = match &slot.life {
            Life::Cold => Life::Warming(warm_up(catalog, &slot.entry)),
            Life::Warming(started) => match started.try_recv() {
                Ok(Ok(instance)) => Life::Ready(Box::new(instance)),
                Ok(Err(e)) => {
                    slot.consecutive_failures += 1;
                    catalog.log_error(
                        slot.entry.config.id,
                        format!("{} could not start: {e}", slot.entry.plugin_name),
                    );
                    let backoff = Duration::from_secs(1 << slot.consecutive_failures.min(6))
                        .min(RESTART_BACKOFF_MAX);
                    Life::Failed {
                        until: Instant::now() + backoff,
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => Life::Cold,
            },
            Life::Failed { until } if Instant::now() >= *until => Life::Cold,
            Life::Ready(_) | Life::Failed { .. } => return,
        };
        slot.life = next;
    }
}

/// Makes and sets up an instance of `entry` on a thread of its own.
fn warm_up(
    catalog: &Arc<Catalog>,
    entry: &Arc<Entry>,
) -> mpsc::Receiver<Result<Instance, CallError>> {
    let (tx, rx) = mpsc::channel();
    let (catalog, entry) = (catalog.clone(), entry.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("plugin-setup-{}", entry.config.id))
        .spawn(move || {
            let _ = tx.send(catalog.start(&entry, None));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a plugin's warm-up thread");
    }
    rx
}

/// Runs `teardown` on a slot's live instance, on a thread of its own (its deadline bounds it).
fn tear_down(slot: Slot) -> Option<std::thread::JoinHandle<()>> {
    let Life::Ready(mut instance) = slot.life else {
        return None;
    };
    let name = slot.entry.plugin_name.clone();
    std::thread::Builder::new()
        .name(format!("plugin-teardown-{}", slot.entry.config.id))
        .spawn(move || {
            if let Err(e) = instance.teardown() {
                instance.host().log("error", format!("{name} teardown {e}"));
                instance.host().end_call();
            }
        })
        .ok()
}

fn run_slot(slot: &mut Slot, chain: &mut ChainEvents) {
    let Life::Ready(instance) = &mut slot.life else {
        // Failed to start: skipped, its events go on unchanged.
        return;
    };
    let started = Instant::now();
    let outcome = instance.process_batch(&chain.events);
    slot.budget.spend(started.elapsed());
    let keep_instance = match outcome {
        Ok(results) if results.len() == chain.events.len() => {
            slot.consecutive_failures = 0;
            let mut kept = ChainEvents {
                keys: Vec::with_capacity(results.len()),
                events: Vec::with_capacity(results.len()),
                team_id: chain.team_id,
                max_event_bytes: chain.max_event_bytes,
            };
            let inputs = chain.events.drain(..).zip(chain.keys.drain(..));
            for ((input, key), result) in inputs.zip(results) {
                let Some(changed) = result else {
                    continue;
                };
                match check_changed(changed, &input, key, chain.team_id, chain.max_event_bytes) {
                    Ok((event, key)) => {
                        kept.events.push(event);
                        kept.keys.push(key);
                    }
                    Err(problem) => {
                        instance.host().log(
                            "error",
                            format!("process-event returned an invalid event for {}: {problem}; the event continues unchanged", key.0),
                        );
                        kept.events.push(input);
                        kept.keys.push(key);
                    }
                }
            }
            *chain = kept;
            true
        }
        Ok(results) => {
            slot.consecutive_failures += 1;
            instance.host().log(
                "error",
                format!(
                    "process-event-batch returned {} results for {} events ({}); the events continue unchanged",
                    results.len(),
                    chain.events.len(),
                    chain.uuid_list()
                ),
            );
            true
        }
        Err(e) => {
            slot.consecutive_failures += 1;
            let fatal = matches!(
                e,
                CallError::Timeout(_) | CallError::OutOfMemory(_) | CallError::Trap(_)
            );
            instance.host().log(
                "error",
                format!(
                    "process-event {e} on events {}; they continue unchanged",
                    chain.uuid_list()
                ),
            );
            !fatal
        }
    };
    instance.host().end_call();
    // After a trap, timeout or memory blow-up the instance's state is unknown: start afresh.
    if !keep_instance {
        slot.life = Life::Cold;
    }
}

/// A batch's events on their way through a chain: in the plugins' form, with each event's uuid
/// and timestamp as the store holds them (unchanged by the chain, or checked when changed).
struct ChainEvents {
    events: Vec<WitEvent>,
    keys: Vec<(Uuid, DateTime<Utc>)>,
    team_id: TeamId,
    max_event_bytes: usize,
}

impl ChainEvents {
    /// The event uuids, for a log line; built only when a call failed.
    fn uuid_list(&self) -> String {
        let uuids: Vec<String> = self.keys.iter().map(|k| k.0.to_string()).collect();
        uuids.join(", ")
    }

    fn into_rows(self) -> Vec<EventRow> {
        self.events
            .into_iter()
            .zip(self.keys)
            .map(|(e, (uuid, timestamp))| EventRow {
                uuid,
                event: e.event,
                distinct_id: e.distinct_id,
                properties: e.properties,
                timestamp,
                elements_chain: e.elements_chain,
            })
            .collect()
    }
}

/// An event in the plugins' form.
pub(super) fn to_wit(row: &EventRow, team_id: TeamId, ip: Option<&str>) -> WitEvent {
    WitEvent {
        uuid: row.uuid.to_string(),
        event: row.event.clone(),
        distinct_id: row.distinct_id.clone(),
        team_id,
        timestamp: timestamp_text(row.timestamp),
        properties: row.properties.clone(),
        elements_chain: row.elements_chain.clone(),
        ip: ip.map(str::to_owned),
    }
}

/// Accepts a plugin's changed event only if it is still a valid event of the same team and uuid,
/// within capture's limits (size, nesting, name and distinct id length); what it left as it was
/// is not checked again.
fn check_changed(
    mut e: WitEvent,
    input: &WitEvent,
    key: (Uuid, DateTime<Utc>),
    team_id: TeamId,
    max_event_bytes: usize,
) -> Result<(WitEvent, (Uuid, DateTime<Utc>)), String> {
    if e.uuid != input.uuid {
        return Err(format!("the uuid changed to {:?}", e.uuid));
    }
    if e.team_id != team_id {
        return Err(format!("the team changed to {}", e.team_id));
    }
    if e.event.trim().is_empty() {
        return Err("the event name is empty".into());
    }
    if e.distinct_id.trim().is_empty() {
        return Err("the distinct_id is empty".into());
    }
    if e.event.chars().count() > MAX_NAME_CHARS || e.distinct_id.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "the event name or distinct_id is longer than {MAX_NAME_CHARS} characters"
        ));
    }
    let size = e.event.len() + e.distinct_id.len() + e.properties.len() + e.elements_chain.len();
    if size > max_event_bytes {
        return Err(format!(
            "the event is {size} bytes, more than CAPTURE_MAX_EVENT_BYTES ({max_event_bytes})"
        ));
    }
    let timestamp = if e.timestamp == input.timestamp {
        key.1
    } else {
        DateTime::parse_from_rfc3339(&e.timestamp)
            .map_err(|_| format!("the timestamp {:?} is not RFC 3339", e.timestamp))?
            .with_timezone(&Utc)
    };
    if e.properties != input.properties {
        // Checked without building the object: it is stored as text.
        if !json_depth_within(&e.properties, MAX_JSON_DEPTH) {
            return Err(format!(
                "the properties are nested deeper than {MAX_JSON_DEPTH} levels"
            ));
        }
        // A key given twice counts once, with its last value, as capture keeps it (the steps
        // after this one read text the appliance wrote as having no repeated key).
        match with_each_key_once(&e.properties) {
            Err(NotAnObject) => return Err("the properties are not a JSON object".into()),
            Ok(Some(once)) => e.properties = once,
            Ok(None) => {}
        }
    }
    Ok((e, (key.0, timestamp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_event_keeps_each_property_once_with_its_last_value() {
        let row = EventRow {
            uuid: Uuid::now_v7(),
            event: "e".into(),
            distinct_id: "d".into(),
            properties: r#"{"a":1}"#.into(),
            timestamp: Utc::now(),
            elements_chain: String::new(),
        };
        let input = to_wit(&row, 7, None);
        let key = (row.uuid, row.timestamp);
        let mut changed = input.clone();
        changed.properties = r#"{"a": 1, "b": 2, "a": 3}"#.into();
        let (kept, _) = check_changed(changed, &input, key, 7, 1 << 20).unwrap();
        assert_eq!(kept.properties, r#"{"a":3,"b":2}"#);
        let mut changed = input.clone();
        changed.properties = r#"{"a": 1, "b": 2}"#.into();
        let (kept, _) = check_changed(changed, &input, key, 7, 1 << 20).unwrap();
        assert_eq!(kept.properties, r#"{"a": 1, "b": 2}"#, "left as it came");
        let mut changed = input.clone();
        changed.properties = "[1]".into();
        assert!(check_changed(changed, &input, key, 7, 1 << 20).is_err());
    }
}
