//! Schedules: `run-every-minute`, `run-every-hour` and `run-every-day` of every enabled plugin
//! config that exports them, each slot run as its own job.
//!
//! Owns: which slots are due. Minute and hour slots are UTC's, day slots start at midnight in
//! `SCHEDULE_TIMEZONE` (UTC by default); a schedule's state (the last slot handed
//! to a job, and that job) lives in redb and changes in the same transaction that enqueues the
//! slot's job, so a slot is queued once even across a crash. After downtime every missed hourly
//! and daily slot runs once, oldest first, up to a cap; missed minute slots coalesce into one
//! run. A slot is not queued while the previous slot's job may still run (no overlap).
//! With `SCHEDULE_LEASE` (several boxes in a group), only the box holding the lease queues
//! slots, and only slots it claimed in the shared store first ([`lease`]).
//! The loop that ticks every second is `scheduler.rs`.
//! Must never: run a plugin's code (the job queue does), or read the wall clock in the slot
//! arithmetic and `tick`: the time comes from the caller (the loop), so tests drive it.

pub mod lease;
mod scheduler;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, TimeZone};
use chrono_tz::Tz;

pub use scheduler::Scheduler;

use crate::store::{Cadence, JobKind, NewJob, PluginConfigId, ScheduleState, Store, StoreError};

/// Missed hourly slots run after downtime, at most this many (the most recent ones).
pub const CATCH_UP_HOURS: i64 = 24;
/// Missed daily slots run after downtime, at most this many.
pub const CATCH_UP_DAYS: i64 = 7;
/// Attempts of one slot's run.
pub const SLOT_ATTEMPTS: u32 = 3;

/// The start (unix seconds) of the slot of `cadence` that contains `now_s`: minutes and hours
/// are UTC's (so no hour is skipped or doubled when clocks change), days start at midnight in
/// `tz`.
pub fn slot_of(cadence: Cadence, now_s: i64, tz: Tz) -> i64 {
    match cadence {
        Cadence::Minute | Cadence::Hour => now_s.div_euclid(cadence.seconds()) * cadence.seconds(),
        Cadence::Day => day_start(now_s, tz),
    }
}

/// The first instant of the local day in `tz` that contains `now_s`.
fn day_start(now_s: i64, tz: Tz) -> i64 {
    let utc_day = now_s.div_euclid(86_400) * 86_400;
    let Some(now) = DateTime::from_timestamp(now_s, 0) else {
        return utc_day;
    };
    let date = now.with_timezone(&tz).date_naive();
    let Some(midnight) = date.and_hms_opt(0, 0, 0) else {
        return utc_day;
    };
    // Where a clock change skips midnight, the day starts at its first local time that exists.
    (0..=180)
        .step_by(15)
        .find_map(|minutes| {
            tz.from_local_datetime(&(midnight + TimeDelta::minutes(minutes)))
                .earliest()
        })
        .map_or(utc_day, |start| start.timestamp())
}

/// The slot before `slot`.
fn preceding(cadence: Cadence, slot: i64, tz: Tz) -> i64 {
    match cadence {
        Cadence::Day => slot_of(Cadence::Day, slot - 1, tz),
        _ => slot - cadence.seconds(),
    }
}

/// The slot after `slot`.
fn following(cadence: Cadence, slot: i64, tz: Tz) -> i64 {
    match cadence {
        // A local day lasts 23 to 25 hours; two hours past the next midnight is in the next day.
        Cadence::Day => slot_of(Cadence::Day, slot + 86_400 + 7_200, tz),
        _ => slot + cadence.seconds(),
    }
}

/// The slot to queue next for a schedule whose last queued slot is `last`, or `None` if it is
/// up to date.
pub fn next_slot(cadence: Cadence, last: Option<i64>, now_s: i64, tz: Tz) -> Option<i64> {
    let current = slot_of(cadence, now_s, tz);
    let Some(last) = last else {
        // A new schedule runs its current slot at once.
        return Some(current);
    };
    if last >= current {
        return None;
    }
    match cadence {
        // Missed minutes are not worth replaying one by one: one run stands for all of them.
        Cadence::Minute => Some(current),
        Cadence::Hour => {
            Some(following(cadence, last, tz).max(current - (CATCH_UP_HOURS - 1) * 3_600))
        }
        Cadence::Day => {
            let oldest = slot_of(cadence, now_s - (CATCH_UP_DAYS - 1) * 86_400, tz);
            Some(following(cadence, last, tz).max(oldest))
        }
    }
}

/// A slot of a schedule: its config, cadence and start (unix seconds).
pub type Slot = (PluginConfigId, Cadence, i64);

/// What a group of boxes decided about this box's schedules (see [`lease`]).
#[derive(Debug, Default)]
pub struct Gate {
    /// Slots up to these were handed out already (by another box, or by this one).
    pub floors: HashMap<(PluginConfigId, Cadence), i64>,
    /// When given, only these slots may be queued; the others due are held back.
    pub allow: Option<HashSet<Slot>>,
}

/// What a tick did.
#[derive(Debug, Default)]
pub struct Ticked {
    pub queued: Vec<Slot>,
    /// Due, but not in the gate's `allow`.
    pub held_back: Vec<Slot>,
}

/// Brings the stored schedules in line with `wanted` (the enabled configs' cadences) and queues
/// each schedule's next due slot, at `now_ms`. Returns the jobs queued.
pub fn tick(
    store: &Store,
    wanted: &[(PluginConfigId, Cadence)],
    now_ms: i64,
    timeout_ms: u64,
    tz: Tz,
) -> Result<Vec<Slot>, StoreError> {
    tick_gated(store, wanted, now_ms, timeout_ms, tz, &Gate::default()).map(|t| t.queued)
}

/// [`tick`] within what `gate` allows.
pub fn tick_gated(
    store: &Store,
    wanted: &[(PluginConfigId, Cadence)],
    now_ms: i64,
    timeout_ms: u64,
    tz: Tz,
    gate: &Gate,
) -> Result<Ticked, StoreError> {
    let now_s = now_ms.div_euclid(1000);
    store.update_schedules(now_ms, |tables| {
        let mut ticked = Ticked::default();
        let existing = tables.all()?;
        for ((config, cadence), _) in &existing {
            if !wanted.contains(&(*config, *cadence)) {
                tables.remove(*config, *cadence)?;
            }
        }
        for &(config, cadence) in wanted {
            let state = existing
                .iter()
                .find(|(key, _)| *key == (config, cadence))
                .map(|(_, s)| *s);
            if let Some(job) = state.and_then(|s| s.job) {
                if tables.jobs.is_live(job)? {
                    continue;
                }
            }
            let floor = gate.floors.get(&(config, cadence)).copied();
            let last = [state.map(|s| s.last_slot), floor]
                .into_iter()
                .flatten()
                .max();
            let Some(slot) = next_slot(cadence, last, now_s, tz) else {
                continue;
            };
            if gate
                .allow
                .as_ref()
                .is_some_and(|allow| !allow.contains(&(config, cadence, slot)))
            {
                ticked.held_back.push((config, cadence, slot));
                continue;
            }
            let job = tables.jobs.insert(
                NewJob {
                    id: uuid::Uuid::now_v7(),
                    kind: JobKind::Schedule {
                        config,
                        cadence,
                        slot,
                    },
                    payload: "null".into(),
                    run_at_ms: now_ms,
                    max_attempts: SLOT_ATTEMPTS,
                    timeout_ms,
                    idempotency_key: None,
                    after: Vec::new(),
                },
                0,
            )?;
            tables.set(
                config,
                cadence,
                &ScheduleState {
                    last_slot: slot,
                    job: Some(job),
                },
            )?;
            ticked.queued.push((config, cadence, slot));
        }
        Ok(ticked)
    })
}

/// A schedule that should exist now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub config: PluginConfigId,
    pub cadence: Cadence,
    /// Its name across a group of boxes (config ids are each box's own): team, plugin, cadence.
    pub name: String,
}

/// Which (plugin config, cadence) pairs should have a schedule now.
pub trait ScheduleSource: Send + Sync + 'static {
    /// An error leaves every schedule as it is until the next tick.
    fn wanted(&self) -> Result<Vec<Wanted>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JobState, Outcome};

    const HOUR: i64 = 3_600_000;
    const MINUTE: i64 = 60_000;
    /// 2026-11-26T00:00:00Z.
    const T0: i64 = 1_795_651_200_000;

    /// Claims the queued schedule jobs and returns their slots (unix seconds).
    fn claim_slots(store: &Store, now: i64) -> Vec<(i64, crate::store::JobId)> {
        store
            .finish_and_claim(Vec::new(), now, 0, 100, &|_| usize::MAX)
            .unwrap()
            .jobs
            .into_iter()
            .filter_map(|j| match j.kind {
                JobKind::Schedule { slot, .. } => Some((slot, j.id)),
                _ => None,
            })
            .collect()
    }

    fn succeed(store: &Store, id: crate::store::JobId, now: i64) {
        store
            .finish_and_claim(
                vec![(
                    id,
                    Outcome::Succeeded {
                        follow_ups: vec![],
                        export: None,
                    },
                )],
                now,
                0,
                0,
                &|_| 0,
            )
            .unwrap();
    }

    #[test]
    fn a_new_schedule_runs_its_current_slot_once_and_never_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wanted = [(1, Cadence::Hour)];
        tick(&store, &wanted, T0 + 10 * MINUTE, 1000, chrono_tz::UTC).unwrap();
        let slots = claim_slots(&store, T0 + 10 * MINUTE);
        assert_eq!(slots.iter().map(|s| s.0).collect::<Vec<_>>(), [T0 / 1000]);
        // The run is still going when the next hour starts: nothing new is queued.
        assert!(
            tick(&store, &wanted, T0 + 61 * MINUTE, 1000, chrono_tz::UTC)
                .unwrap()
                .is_empty()
        );
        assert!(claim_slots(&store, T0 + 61 * MINUTE).is_empty());
        succeed(&store, slots[0].1, T0 + 62 * MINUTE);
        // Now the 01:00 slot is queued, once.
        tick(&store, &wanted, T0 + 62 * MINUTE, 1000, chrono_tz::UTC).unwrap();
        tick(&store, &wanted, T0 + 62 * MINUTE, 1000, chrono_tz::UTC).unwrap();
        let slots = claim_slots(&store, T0 + 62 * MINUTE);
        assert_eq!(
            slots.iter().map(|s| s.0).collect::<Vec<_>>(),
            [T0 / 1000 + 3600]
        );
        succeed(&store, slots[0].1, T0 + 63 * MINUTE);
        assert!(
            tick(&store, &wanted, T0 + 70 * MINUTE, 1000, chrono_tz::UTC)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn missed_hourly_slots_run_once_each_in_order_and_minutes_coalesce() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wanted = [(1, Cadence::Hour), (2, Cadence::Minute)];
        tick(&store, &wanted, T0, 1000, chrono_tz::UTC).unwrap();
        for (_, id) in claim_slots(&store, T0) {
            succeed(&store, id, T0);
        }
        // Down from 00:00 to 05:30.
        let back = T0 + 5 * HOUR + 30 * MINUTE;
        let mut ran_hours = Vec::new();
        let mut ran_minutes = Vec::new();
        for _ in 0..20 {
            tick(&store, &wanted, back, 1000, chrono_tz::UTC).unwrap();
            let slots = store
                .finish_and_claim(Vec::new(), back, 0, 100, &|_| usize::MAX)
                .unwrap()
                .jobs;
            if slots.is_empty() {
                break;
            }
            for job in slots {
                if let JobKind::Schedule { cadence, slot, .. } = job.kind {
                    match cadence {
                        Cadence::Hour => ran_hours.push(slot),
                        _ => ran_minutes.push(slot),
                    }
                }
                succeed(&store, job.id, back);
            }
        }
        let hours: Vec<i64> = (1..=5).map(|h| T0 / 1000 + h * 3600).collect();
        assert_eq!(ran_hours, hours, "each missed hour once, oldest first");
        assert_eq!(ran_minutes, [back / 1000], "330 missed minutes run once");
    }

    #[test]
    fn catch_up_is_capped_and_a_crash_mid_slot_does_not_queue_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wanted = [(1, Cadence::Hour)];
        tick(&store, &wanted, T0, 1000, chrono_tz::UTC).unwrap();
        for (_, id) in claim_slots(&store, T0) {
            succeed(&store, id, T0);
        }
        let back = T0 + 100 * HOUR;
        tick(&store, &wanted, back, 1000, chrono_tz::UTC).unwrap();
        let slots = claim_slots(&store, back);
        assert_eq!(slots[0].0, back / 1000 - (CATCH_UP_HOURS - 1) * 3600);

        // The server dies while that slot runs.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(tick(&store, &wanted, back, 1000, chrono_tz::UTC)
            .unwrap()
            .is_empty());
        store.recover_leases(back, back).unwrap();
        assert!(tick(&store, &wanted, back, 1000, chrono_tz::UTC)
            .unwrap()
            .is_empty());
        let again = claim_slots(&store, back);
        assert_eq!(again, slots, "the same job, same slot, runs again");
        let job = store.job(again[0].1).unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
    }

    #[test]
    fn a_gate_holds_back_unclaimed_slots_and_its_floors_skip_slots_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wanted = [(1, Cadence::Hour)];
        let utc = chrono_tz::UTC;
        let plan = Gate {
            floors: HashMap::new(),
            allow: Some(HashSet::new()),
        };
        let ticked = tick_gated(&store, &wanted, T0 + 10 * MINUTE, 1000, utc, &plan).unwrap();
        assert!(ticked.queued.is_empty());
        assert_eq!(ticked.held_back, [(1, Cadence::Hour, T0 / 1000)]);
        assert!(
            claim_slots(&store, T0 + 10 * MINUTE).is_empty(),
            "nothing queued"
        );
        // Another box handed out the slots up to 02:00: at 02:30 nothing is due here.
        let floors = HashMap::from([((1, Cadence::Hour), T0 / 1000 + 7_200)]);
        let handed_out = Gate {
            floors: floors.clone(),
            allow: None,
        };
        let ticked = tick_gated(&store, &wanted, T0 + 150 * MINUTE, 1000, utc, &handed_out);
        assert!(ticked.unwrap().queued.is_empty());
        // At 03:10 the 03:00 slot, claimed, is queued.
        let claimed = Gate {
            floors,
            allow: Some(HashSet::from([(1, Cadence::Hour, T0 / 1000 + 10_800)])),
        };
        let ticked = tick_gated(&store, &wanted, T0 + 190 * MINUTE, 1000, utc, &claimed).unwrap();
        assert_eq!(ticked.queued, [(1, Cadence::Hour, T0 / 1000 + 10_800)]);
        assert_eq!(preceding(Cadence::Hour, T0 / 1000, utc), T0 / 1000 - 3_600);
    }

    #[test]
    fn disabling_a_config_removes_its_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        tick(&store, &[(1, Cadence::Day)], T0, 1000, chrono_tz::UTC).unwrap();
        tick(&store, &[], T0, 1000, chrono_tz::UTC).unwrap();
        let left = store.update_schedules(T0, |t| t.all()).unwrap();
        assert!(left.is_empty());
    }
}

#[cfg(test)]
mod time_zone_tests {
    use super::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).unwrap().timestamp()
    }

    #[test]
    fn days_start_at_local_midnight_through_clock_changes() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Winter: Berlin's midnight is 23:00 UTC the day before.
        assert_eq!(
            slot_of(Cadence::Day, at("2026-11-26T10:00:00Z"), berlin),
            at("2026-11-25T23:00:00Z")
        );
        // 25 October 2026 has 25 hours in Berlin: the next day still starts at its midnight.
        let long_day = slot_of(Cadence::Day, at("2026-10-25T12:00:00Z"), berlin);
        assert_eq!(long_day, at("2026-10-24T22:00:00Z"));
        assert_eq!(
            following(Cadence::Day, long_day, berlin),
            at("2026-10-25T23:00:00Z")
        );
        // 29 March 2026 has 23 hours.
        let short_day = slot_of(Cadence::Day, at("2026-03-29T12:00:00Z"), berlin);
        assert_eq!(short_day, at("2026-03-28T23:00:00Z"));
        assert_eq!(
            following(Cadence::Day, short_day, berlin),
            at("2026-03-29T22:00:00Z")
        );
        // Hours stay UTC's: none is skipped or doubled when the clocks change.
        let hour = slot_of(Cadence::Hour, at("2026-10-25T01:30:00Z"), berlin);
        assert_eq!(hour, at("2026-10-25T01:00:00Z"));
        assert_eq!(
            following(Cadence::Hour, hour, berlin),
            at("2026-10-25T02:00:00Z")
        );
    }

    #[test]
    fn missed_local_days_run_once_each_across_a_clock_change() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let mut last = Some(slot_of(Cadence::Day, at("2026-10-23T12:00:00Z"), berlin));
        let now = at("2026-10-27T12:00:00Z");
        let mut ran = Vec::new();
        while let Some(slot) = next_slot(Cadence::Day, last, now, berlin) {
            ran.push(slot);
            last = Some(slot);
        }
        assert_eq!(
            ran,
            [
                at("2026-10-23T22:00:00Z"),
                at("2026-10-24T22:00:00Z"),
                at("2026-10-25T23:00:00Z"),
                at("2026-10-26T23:00:00Z"),
            ]
        );
    }
}
