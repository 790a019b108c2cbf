//! Each team's chain of `process-event` plugins: run in order over a queued batch, events kept
//! in the plugins' form from the first plugin to the last, each plugin's output checked, a
//! failing plugin logged and skipped (its events go on unchanged), and a plugin that keeps
//! failing disabled.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::catalog::{Catalog, Entry};
use super::runtime::{CallError, Exports, Instance, WitEvent};
use super::{log_error, PluginError, DISABLE_AFTER_FAILURES};
use crate::event::{timestamp_text, EventRow, IngestBatch};
use crate::store::{PluginConfig, PluginConfigId, TeamId};

/// One plugin config in a team's chain.
struct Slot {
    entry: Arc<Entry>,
    instance: Option<Instance>,
    consecutive_failures: u32,
}

/// The `process-event` chains of every team, as the store describes them.
pub struct Chains {
    catalog: Arc<Catalog>,
    generation: Option<u64>,
    teams: HashMap<TeamId, Vec<Slot>>,
}

impl Chains {
    pub fn new(catalog: Arc<Catalog>) -> Chains {
        Chains {
            catalog,
            generation: None,
            teams: HashMap::new(),
        }
    }

    /// Rebuilds the chains if plugins or configs changed since the last look. Calls already made
    /// finished on the old instances; the next batch uses the new ones.
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
            // An unchanged config keeps its live instance (and its plugin's in-memory state).
            let slot = match old.remove(&entry.config.id) {
                Some(slot) if Arc::ptr_eq(&slot.entry, &entry) => slot,
                _ => Slot {
                    entry: entry.clone(),
                    instance: None,
                    consecutive_failures: 0,
                },
            };
            self.teams
                .entry(entry.config.team_id)
                .or_default()
                .push(slot);
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// True when a team has at least one enabled `process-event` plugin.
    pub fn has_chain(&self, team_id: TeamId) -> bool {
        self.teams
            .get(&team_id)
            .is_some_and(|slots| !slots.is_empty())
    }

    /// Runs the team's chain over one queued batch, in order. Failures leave events unchanged.
    ///
    /// Events are converted to the plugins' form once, stay in it from the first plugin to the
    /// last, and are converted back once: each plugin's output is checked against its input
    /// without re-parsing what it left unchanged.
    pub fn process(&mut self, batch: &mut IngestBatch) {
        let Some(slots) = self.teams.get_mut(&batch.team_id) else {
            return;
        };
        let mut chain = ChainEvents {
            keys: batch.events.iter().map(|e| (e.uuid, e.timestamp)).collect(),
            events: batch
                .events
                .iter()
                .map(|e| to_wit(e, batch.team_id, batch.ip.as_deref()))
                .collect(),
            team_id: batch.team_id,
        };
        let mut disabled = Vec::new();
        for slot in slots.iter_mut() {
            if chain.events.is_empty() {
                break;
            }
            run_slot(&self.catalog, slot, &mut chain);
            if slot.consecutive_failures >= DISABLE_AFTER_FAILURES {
                disabled.push(slot.entry.config.clone());
            }
        }
        batch.events = chain.into_rows();
        for config in disabled {
            self.disable(config);
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
        log_error(store, config.id, message);
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

fn run_slot(catalog: &Catalog, slot: &mut Slot, chain: &mut ChainEvents) {
    let mut instance = match slot.instance.take() {
        Some(i) => i,
        None => match catalog.start(&slot.entry, None) {
            Ok(i) => i,
            Err(e) => {
                slot.consecutive_failures += 1;
                log_error(
                    catalog.store(),
                    slot.entry.config.id,
                    format!("{} could not start: {e}", slot.entry.plugin_name),
                );
                return;
            }
        },
    };
    if !instance
        .info
        .exports
        .intersects(Exports::PROCESS_EVENT | Exports::PROCESS_EVENT_BATCH)
    {
        slot.instance = Some(instance);
        return;
    }
    let outcome = instance.process_batch(&chain.events);
    let keep_instance = match outcome {
        Ok(results) if results.len() == chain.events.len() => {
            slot.consecutive_failures = 0;
            let mut kept = ChainEvents {
                keys: Vec::with_capacity(results.len()),
                events: Vec::with_capacity(results.len()),
                team_id: chain.team_id,
            };
            let inputs = chain.events.drain(..).zip(chain.keys.drain(..));
            for ((input, key), result) in inputs.zip(results) {
                let Some(changed) = result else {
                    continue;
                };
                match check_changed(changed, &input, key, chain.team_id) {
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
    instance.host().flush_logs();
    // After a trap, timeout or memory blow-up the instance's state is unknown: start afresh.
    if keep_instance {
        slot.instance = Some(instance);
    }
}

/// A batch's events on their way through a chain: in the plugins' form, with each event's uuid
/// and timestamp as the store holds them (unchanged by the chain, or checked when changed).
struct ChainEvents {
    events: Vec<WitEvent>,
    keys: Vec<(Uuid, DateTime<Utc>)>,
    team_id: TeamId,
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

/// Accepts a plugin's changed event only if it is still a valid event of the same team and uuid;
/// what it left as it was is not checked again.
fn check_changed(
    e: WitEvent,
    input: &WitEvent,
    key: (Uuid, DateTime<Utc>),
    team_id: TeamId,
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
    let timestamp = if e.timestamp == input.timestamp {
        key.1
    } else {
        DateTime::parse_from_rfc3339(&e.timestamp)
            .map_err(|_| format!("the timestamp {:?} is not RFC 3339", e.timestamp))?
            .with_timezone(&Utc)
    };
    if e.properties != input.properties {
        // Checked without building the object: it is stored as text.
        let is_object = e.properties.trim_start().starts_with('{')
            && serde_json::from_str::<serde::de::IgnoredAny>(&e.properties).is_ok();
        if !is_object {
            return Err("the properties are not a JSON object".into());
        }
    }
    Ok((e, (key.0, timestamp)))
}
