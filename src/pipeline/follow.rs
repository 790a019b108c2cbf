//! Followers: the sinks after the first in `SINKS`. The pipeline writes to the lead sink; each
//! lead write is kept in the follow log ([`record`]) in the transaction that completes it, and
//! each follower copies the log into its own store at its own pace, with its own position
//! (the log's sequence, recorded in the follower's own transaction where it has one).
//!
//! Owns: turning a lead write into a log record, and the follower's loop (read the log after its
//! position, write, retry with backoff, trim what every follower has).
//! Must never: skip a record, or hold back the lead or another follower: a follower that is
//! down only lets the log grow, within the ingest queue's budget.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::backoff::Backoff;
use super::{PipelineStatus, Prepared};
use crate::person::{Person, PersonChange, PersonColumns, PersonUpdates};
use crate::shutdown::Shutdown;
use crate::sinks::{Sink, SinkWrite, Written};
use crate::store::{FollowColumns, FollowPerson, FollowRecord, QueuedBatch, ReadLimits, Store};

/// While caught up, a follower looks at the log this often even without a wake-up.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The follow log record of a lead write: the events it inserted (and the stored rows of
/// batches it redelivered after a crash), their person columns and the sink-side person changes.
/// An event the lead already held (a client's resend, say) is left out: the followers got it
/// with the write that stored it, and a follower that keeps the last copy of a row (ClickHouse)
/// must not take the resend's. `None` when the write changed nothing a sink holds.
pub(super) fn record(prepared: &Prepared, written: &Written) -> Option<FollowRecord> {
    let mut record = FollowRecord::default();
    for ((queued, rows), columns) in prepared
        .redeliver
        .iter()
        .zip(&prepared.redeliver_rows)
        .zip(&prepared.redeliver_columns)
    {
        let mut batch = queued.batch.clone();
        batch.events = rows.iter().flatten().cloned().collect();
        record.batches.push((queued.seq, batch));
        record.columns.push(columns.iter().map(to_record).collect());
    }
    for (index, queued) in prepared.process.iter().enumerate() {
        let columns = prepared
            .columns
            .get(index)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let inserted = written
            .inserted
            .get(index)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let is_new = |at: usize| inserted.get(at).copied().unwrap_or(false);
        let mut batch = queued.batch.clone();
        batch.events = (queued.batch.events.iter().enumerate())
            .filter(|(at, _)| is_new(*at))
            .map(|(_, event)| event.clone())
            .collect();
        record.batches.push((queued.seq, batch));
        record.columns.push(
            (columns.iter().enumerate())
                .filter(|(at, _)| is_new(*at))
                .map(|(_, c)| to_record(c))
                .collect(),
        );
    }
    let persons = &prepared.persons;
    record.persons = persons
        .persons
        .iter()
        .map(|((team, uuid), change)| match change {
            PersonChange::Upsert(person) => {
                (*team, *uuid, FollowPerson::Upsert(Person::clone(person)))
            }
            PersonChange::Deleted { version } => {
                (*team, *uuid, FollowPerson::Deleted { version: *version })
            }
        })
        .collect();
    record.distinct_ids = persons
        .distinct_ids
        .iter()
        .map(|((team, id), now)| (*team, id.clone(), now.clone()))
        .collect();
    record.group_types = persons
        .group_types
        .iter()
        .map(|((team, name), index)| (*team, name.clone(), *index))
        .collect();
    record.groups = persons
        .groups
        .iter()
        .map(|((team, index, key), group)| (*team, *index, key.clone(), group.clone()))
        .collect();
    let events: usize = record.batches.iter().map(|(_, b)| b.events.len()).sum();
    (events > 0 || persons.touches_sinks()).then_some(record)
}

fn to_record(columns: &PersonColumns) -> FollowColumns {
    FollowColumns {
        person_id: columns.person_id,
        person_properties: columns.person_properties.to_string(),
        person_created_at: columns.person_created_at,
        person_mode: columns.person_mode,
    }
}

/// One write for a follower from consecutive log records: their batches in order, and their
/// person changes, a later record's state winning.
fn sink_write(records: Vec<(u64, FollowRecord)>) -> SinkWrite {
    let (mut batches, mut columns) = (Vec::new(), Vec::new());
    let mut persons = PersonUpdates::default();
    for (_, record) in records {
        for ((seq, batch), batch_columns) in record.batches.into_iter().zip(record.columns) {
            batches.push(QueuedBatch { seq, batch });
            columns.push(
                batch_columns
                    .into_iter()
                    .map(|c| PersonColumns {
                        person_id: c.person_id,
                        person_properties: Arc::from(c.person_properties),
                        person_created_at: c.person_created_at,
                        person_mode: c.person_mode,
                    })
                    .collect(),
            );
        }
        for (team, uuid, person) in record.persons {
            let change = match person {
                FollowPerson::Upsert(person) => PersonChange::Upsert(Arc::new(person)),
                FollowPerson::Deleted { version } => PersonChange::Deleted { version },
            };
            persons.persons.insert((team, uuid), change);
        }
        for (team, id, now) in record.distinct_ids {
            persons.distinct_ids.insert((team, id), now);
        }
        for (team, name, index) in record.group_types {
            persons.group_types.insert((team, name), index);
        }
        for (team, index, key, group) in record.groups {
            persons.groups.insert((team, index, key), group);
        }
    }
    SinkWrite {
        batches: Arc::new(batches),
        columns: Arc::new(columns),
        persons: Arc::new(persons),
    }
}

/// The positions of every follower, so that the log is trimmed behind the slowest.
#[derive(Default)]
pub struct FollowMarks {
    positions: std::sync::Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
}

impl FollowMarks {
    fn slot(&self, sink: &'static str) -> Arc<AtomicU64> {
        let mut positions = self
            .positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        positions.entry(sink).or_default().clone()
    }

    /// How far every follower has stored (0 until each has reported).
    fn slowest(&self) -> u64 {
        let positions = self
            .positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        positions
            .values()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// One follower sink's writer.
pub struct Follower {
    pub store: Store,
    pub sink: Arc<dyn Sink>,
    pub limits: ReadLimits,
    pub status: Arc<PipelineStatus>,
    /// Notified after each lead write.
    pub wake: Arc<Notify>,
    /// Shared by every follower of this run.
    pub marks: Arc<FollowMarks>,
}

impl Follower {
    /// Copies the follow log into the sink until shutdown; while draining, until caught up.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mark = self.marks.slot(self.sink.name());
        let Some((mut position, mut unfinished)) = self.start(&mut shutdown).await else {
            return;
        };
        mark.store(position, Ordering::Relaxed);
        let mut backoff = Backoff::default();
        let gather = self.sink.min_write_interval();
        // Shortly after boot the monotonic clock may not reach back a whole interval.
        let mut last_write = tokio::time::Instant::now()
            .checked_sub(gather)
            .unwrap_or_else(tokio::time::Instant::now);
        loop {
            if shutdown.deadline_passed() {
                return;
            }
            self.status.beat();
            // A write that may have reached the sink before a crash is repeated exactly.
            let through = unfinished.unwrap_or(u64::MAX);
            let (store, after, limits) = (self.store.clone(), position, self.limits);
            let read = tokio::task::spawn_blocking(move || {
                store.read_follow_after(after, through, limits)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            let records = match read {
                Ok(records) => records,
                Err(e) => {
                    backoff
                        .wait(&self.status, "reading the follow log", e, &mut shutdown)
                        .await;
                    continue;
                }
            };
            let Some(last) = records.last().map(|(seq, _)| *seq) else {
                if shutdown.is_draining() {
                    return;
                }
                // Idle: dead letters an operator asked to resend go now.
                if let Err(e) = super::isolate::resend(&*self.sink, &self.store).await {
                    tracing::warn!(error = %e, "resending dead letters failed; will retry");
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            };
            let write = sink_write(records);
            let total: usize = write.batches.iter().map(|q| q.batch.events.len()).sum();
            let due = last_write + gather;
            if total < self.limits.events
                && unfinished.is_none()
                && !shutdown.is_draining()
                && tokio::time::Instant::now() < due
            {
                // Not a full write: the log has until the interval is over to fill it.
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            last_write = tokio::time::Instant::now();
            let (sink, started) = (self.sink.name(), std::time::Instant::now());
            let result =
                super::isolate::write_setting_aside(&*self.sink, &self.store, write, last).await;
            let stored = result.as_ref().ok().map(|w| w.count());
            self.status
                .record_write(sink, started.elapsed(), total, stored);
            match result {
                Ok(_) => {
                    backoff.reset();
                    unfinished = None;
                    position = last;
                    mark.store(position, Ordering::Relaxed);
                    self.status.set_positions(position, position);
                    self.status.set_error(None);
                    let (store, through) = (self.store.clone(), self.marks.slowest());
                    if let Ok(Err(e)) =
                        tokio::task::spawn_blocking(move || store.trim_follow_through(through))
                            .await
                    {
                        tracing::warn!(error = %e, "trimming the follow log failed; will retry");
                    }
                }
                Err(e) => {
                    let what = format!("writing to the {} sink", self.sink.name());
                    if shutdown.is_draining() {
                        // What is left waits in the log for the next start: a follower that
                        // cannot write must not hold the shutdown to its deadline.
                        tracing::warn!(error = %e, "{what} failed while stopping; the rest is copied at the next start");
                        return;
                    }
                    backoff.wait(&self.status, &what, e, &mut shutdown).await
                }
            }
        }
    }

    /// The follower's position and the end of a write it may not have finished, asked until it
    /// answers; the log's numbering is moved past it should the state file be older than the
    /// follower's copy.
    async fn start(&self, shutdown: &mut Shutdown) -> Option<(u64, Option<u64>)> {
        let mut backoff = Backoff::default();
        loop {
            if shutdown.deadline_passed() {
                return None;
            }
            let asked = match self.sink.position().await {
                Ok(position) => self.sink.unfinished_write().await.map(|u| (position, u)),
                Err(e) => Err(e),
            };
            match asked {
                Ok((position, unfinished)) => {
                    let store = self.store.clone();
                    let moved = tokio::task::spawn_blocking(move || {
                        store.ensure_follow_sequence_after(position)
                    })
                    .await;
                    if let Ok(Ok(true)) = moved {
                        tracing::warn!(
                            sink = self.sink.name(),
                            position,
                            "the sink is ahead of the follow log (a restore?); new records are numbered after it"
                        );
                    }
                    self.status.set_positions(position, position);
                    self.status.set_error(None);
                    return Some((position, unfinished.filter(|end| *end > position)));
                }
                Err(e) => {
                    let what = format!("reading the {} sink's position", self.sink.name());
                    if shutdown.is_draining() {
                        return None;
                    }
                    backoff.wait(&self.status, &what, e, shutdown).await
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::person::DistinctId;

    #[test]
    fn consecutive_records_make_one_write_with_the_later_state_winning() {
        let id = |person: u128, version| {
            Some(DistinctId {
                person: uuid::Uuid::from_u128(person),
                version,
            })
        };
        let first = FollowRecord {
            distinct_ids: vec![(1, "a".into(), id(1, 0)), (1, "b".into(), id(2, 0))],
            ..FollowRecord::default()
        };
        let second = FollowRecord {
            distinct_ids: vec![(1, "b".into(), id(1, 1))],
            ..FollowRecord::default()
        };
        let write = sink_write(vec![(1, first), (2, second)]);
        let ids = &write.persons.distinct_ids;
        assert_eq!(ids.get(&(1, "a".into())), Some(&id(1, 0)));
        assert_eq!(
            ids.get(&(1, "b".into())),
            Some(&id(1, 1)),
            "the merge that came later"
        );
    }
}
