//! The read stage's step: one read of the queue, turned into what the sink writes next.
//!
//! Records the sink already holds only have their deliveries rebuilt; records that cannot be
//! read are quarantined; the rest go through their team's plugin chain, unless the chain cannot
//! take them now (starting, or over its time budget) or the team already has batches waiting:
//! then they are deferred, copied aside in the store so other teams' events flow on. Deferred
//! batches of a team whose chain is ready again are taken back, oldest first, in the same step.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::positions::{Plan, Positions};
use super::{Pipeline, Prepared, StepError};
use crate::event::{EventRow, IngestBatch};
use crate::ids::TeamId;
use crate::person::{PersonColumns, PersonUpdates, SharedState};
use crate::plugins::Readiness;
use crate::sinks::StoredRows;
use crate::store::{QueuedBatch, StoreError};

/// What the person step gives: the batches to write, their person columns, every change, and
/// the person columns of the stored rows recomputed after a crash.
type PersonStep = (
    Vec<QueuedBatch>,
    Vec<Vec<PersonColumns>>,
    PersonUpdates,
    Vec<Vec<PersonColumns>>,
);

/// Operators' person deletions carried out per step, at most.
const MAX_DELETIONS_PER_STEP: usize = 100;

/// What the plugin chains made of one read.
struct Chained {
    /// Batches to write, in queue order, with whether to deliver each.
    process: Vec<(QueuedBatch, bool)>,
    /// Batches set aside, with why.
    defer: Vec<QueuedBatch>,
    /// Teams with deferred batches whose chain can take them now.
    drainable: Vec<TeamId>,
}

impl Pipeline {
    /// Reads the records after `position` and the deferred batches that can go on; `None` when
    /// there is nothing to do. `deferred` holds the positions of the batches set aside.
    pub(super) async fn prepare(
        &self,
        start: &Positions,
        position: u64,
        deferred: &mut HashSet<u64>,
    ) -> Result<Option<Prepared>, StepError> {
        let store = self.store.clone();
        let limits = self.read_limits;
        let (read, deletions) = tokio::task::spawn_blocking(move || {
            let read = store.read_ingest_after(position, limits)?;
            Ok::<_, StoreError>((read, store.person_deletions(MAX_DELETIONS_PER_STEP)?))
        })
        .await??;
        let deletions = self
            .persons
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .not_in_flight(deletions);
        for bad in &read.unreadable {
            self.quarantine(bad.seq, &bad.reason).await?;
        }
        let (mut redeliver, mut candidates) = (Vec::new(), Vec::new());
        for queued in read.batches {
            if deferred.contains(&queued.seq) {
                continue;
            }
            match start.plan(queued.seq) {
                Plan::Process { deliver } => candidates.push((queued, deliver)),
                Plan::Redeliver => redeliver.push(queued),
                Plan::Done => {}
            }
        }
        let backlog = self.store.deferred_teams();
        let chained = self.run_chains(candidates, backlog).await?;
        if !chained.defer.is_empty() {
            let store = self.store.clone();
            let batches: Vec<(u64, IngestBatch)> = chained
                .defer
                .into_iter()
                .map(|q| (q.seq, q.batch))
                .collect();
            deferred.extend(batches.iter().map(|(seq, _)| *seq));
            tokio::task::spawn_blocking(move || store.defer_batches(&batches)).await??;
        }
        let mut process = chained.process;
        let mut undefer = Vec::new();
        for team in chained.drainable {
            self.take_back(team, deferred, &mut process, &mut redeliver, &mut undefer)
                .await?;
        }
        // Taken back: no longer waiting, though removed from the store only when the write
        // stage commits their deliveries.
        for (_, seq) in &undefer {
            deferred.remove(seq);
        }
        let last = read.last.unwrap_or(position);
        if read.last.is_none()
            && process.is_empty()
            && redeliver.is_empty()
            && undefer.is_empty()
            && deletions.is_empty()
        {
            return Ok(None);
        }
        let events = process
            .iter()
            .map(|(q, _)| q)
            .chain(&redeliver)
            .map(|q| q.batch.events.len())
            .sum();
        let (process, deliver): (Vec<_>, Vec<_>) = process.into_iter().unzip();
        let redeliver_rows = if redeliver.is_empty() {
            Vec::new()
        } else {
            self.sink.stored_rows(Arc::new(redeliver.clone())).await?
        };
        let (process, columns, persons, redeliver_columns) = self
            .person_step(process, &redeliver, &redeliver_rows, deletions, last)
            .await?;
        Ok(Some(Prepared {
            redeliver,
            redeliver_rows,
            redeliver_columns,
            process: Arc::new(process),
            columns: Arc::new(columns),
            persons: Arc::new(persons),
            deliver,
            undefer,
            last,
            events,
        }))
    }

    /// The person step: first the batches the sink stored before a crash (recomputed from its
    /// rows, whose person changes were not committed), then operators' deletions, then the
    /// batches to write. Returns the batches, their columns, all the changes, and the columns of
    /// the stored rows.
    async fn person_step(
        &self,
        process: Vec<QueuedBatch>,
        redeliver: &[QueuedBatch],
        redeliver_rows: &StoredRows,
        deletions: Vec<(TeamId, String)>,
        last: u64,
    ) -> Result<PersonStep, StepError> {
        let stored: Vec<(TeamId, Vec<EventRow>)> = redeliver
            .iter()
            .zip(redeliver_rows)
            .map(|(q, rows)| (q.batch.team_id, rows.iter().flatten().cloned().collect()))
            .collect();
        let engine = self.persons.clone();
        let started = std::time::Instant::now();
        let shared = self.shared_persons;
        let (mut updates, stored_columns, mut process, wanted) =
            tokio::task::spawn_blocking(move || {
                let mut engine = engine
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let (mut updates, stored_columns) = if stored.is_empty() {
                    (PersonUpdates::default(), Vec::new())
                } else {
                    let step = engine.recompute(stored, last)?;
                    (step.updates, step.columns)
                };
                if !deletions.is_empty() {
                    updates.extend(engine.delete(&deletions, last)?);
                }
                // Named after the replayed steps are pending, so that what they changed is
                // not imported over.
                let wanted = (shared && !process.is_empty()).then(|| engine.wanted(&process));
                Ok::<_, StoreError>((updates, stored_columns, process, wanted))
            })
            .await??;
        let shared = match wanted {
            Some(wanted) => self.sink.shared_state(Arc::new(wanted)).await?,
            None => SharedState::default(),
        };
        let engine = self.persons.clone();
        let step = tokio::task::spawn_blocking(move || {
            let mut engine = engine
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let imported = engine.import(shared)?;
            if imported > 0 {
                metrics::counter!(crate::telemetry::names::PERSONS_IMPORTED)
                    .increment(imported as u64);
            }
            let step = engine.process(&mut process, last)?;
            updates.extend(step.updates);
            Ok::<_, StoreError>((process, step.columns, updates, stored_columns))
        })
        .await??;
        metrics::histogram!(crate::telemetry::names::PERSON_STEP_SECONDS)
            .record(started.elapsed().as_secs_f64());
        Ok(step)
    }

    /// Runs the chains over the batches that can go now, and sorts out the rest.
    async fn run_chains(
        &self,
        candidates: Vec<(QueuedBatch, bool)>,
        backlog: BTreeMap<TeamId, u64>,
    ) -> Result<Chained, StepError> {
        let chains = self.plugins.clone();
        let status = self.status.clone();
        let chained = tokio::task::spawn_blocking(move || {
            let mut chains = chains.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(e) = chains.refresh() {
                tracing::error!(error = %e, "cannot reload plugin configs; keeping the previous chains");
            }
            let mut out = Chained {
                process: Vec::with_capacity(candidates.len()),
                defer: Vec::new(),
                drainable: Vec::new(),
            };
            // A team with batches waiting keeps its order: its new batches wait behind them.
            let mut waiting: HashSet<TeamId> = backlog.keys().copied().collect();
            let mut reasons = BTreeMap::new();
            for (mut queued, deliver) in candidates {
                let team = queued.batch.team_id;
                if waiting.contains(&team) {
                    out.defer.push(queued);
                    continue;
                }
                match chains.readiness(team) {
                    Readiness::NoChain => out.process.push((queued, deliver)),
                    Readiness::Ready => {
                        chains.process(&mut queued.batch);
                        out.process.push((queued, deliver));
                    }
                    Readiness::Wait(why) => {
                        waiting.insert(team);
                        reasons.insert(team, why);
                        out.defer.push(queued);
                    }
                }
            }
            for team in backlog.keys() {
                match chains.readiness(*team) {
                    Readiness::NoChain | Readiness::Ready if !reasons.contains_key(team) => {
                        out.drainable.push(*team)
                    }
                    Readiness::Wait(why) => {
                        reasons.insert(*team, why);
                    }
                    _ => {}
                }
            }
            status.set_waiting(reasons);
            out
        })
        .await?;
        Ok(chained)
    }

    /// Takes `team`'s oldest deferred batches back (of those still in `deferred`: not taken back
    /// by an earlier step): those the sink already holds (a crash after their write) only get
    /// their deliveries rebuilt; the others go through the chain, as long as it stays ready.
    async fn take_back(
        &self,
        team: TeamId,
        deferred: &HashSet<u64>,
        process: &mut Vec<(QueuedBatch, bool)>,
        redeliver: &mut Vec<QueuedBatch>,
        undefer: &mut Vec<(TeamId, u64)>,
    ) -> Result<(), StepError> {
        let store = self.store.clone();
        let limits = self.read_limits;
        let (batches, unreadable) =
            tokio::task::spawn_blocking(move || store.read_deferred(team, limits)).await??;
        // Batches taken back by an earlier step whose write is not committed yet stay with it.
        let batches: Vec<QueuedBatch> = batches
            .into_iter()
            .filter(|q| deferred.contains(&q.seq))
            .collect();
        let unreadable = unreadable.into_iter().filter(|u| deferred.contains(&u.seq));
        for bad in unreadable {
            tracing::error!(team, position = bad.seq, reason = %bad.reason, "a deferred batch cannot be read; it is dropped");
            self.status.count_quarantined();
            undefer.push((team, bad.seq));
        }
        if batches.is_empty() {
            return Ok(());
        }
        let stored: StoredRows = self.sink.stored_rows(Arc::new(batches.clone())).await?;
        let mut fresh = Vec::new();
        for (queued, rows) in batches.into_iter().zip(stored) {
            if rows.iter().any(Option::is_some) {
                undefer.push((team, queued.seq));
                redeliver.push(queued);
            } else {
                fresh.push(queued);
            }
        }
        let chains = self.plugins.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let mut chains = chains
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut taken = Vec::new();
            for mut queued in fresh {
                match chains.readiness(team) {
                    Readiness::Ready => chains.process(&mut queued.batch),
                    Readiness::NoChain => {}
                    Readiness::Wait(_) => break,
                }
                taken.push(queued);
            }
            taken
        })
        .await?;
        for queued in taken {
            undefer.push((team, queued.seq));
            process.push((queued, true));
        }
        Ok(())
    }

    /// Sets an unreadable queue record aside, visibly, so the events after it flow.
    pub(super) async fn quarantine(&self, seq: u64, reason: &str) -> Result<(), StepError> {
        tracing::error!(
            position = seq,
            reason,
            "an ingest queue record cannot be read; it is quarantined and the pipeline goes on"
        );
        let store = self.store.clone();
        let why = reason.to_owned();
        tokio::task::spawn_blocking(move || store.quarantine_ingest(seq, &why)).await??;
        self.status.count_quarantined();
        Ok(())
    }
}
