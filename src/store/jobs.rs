//! The durable job queue and the schedules' state.
//!
//! A job is a record in `JOBS` plus exactly one place that says what happens to it next:
//! `JOBS_DUE` (waiting for its run-at time, indexed per owner so one plugin config's backlog
//! cannot hide another's jobs), `JOBS_LEASED` (claimed by the running server), or nothing (it
//! waits for parent jobs, or it is dead or cancelled and kept for inspection). Succeeded jobs
//! are deleted; their idempotency keys outlive them in `JOB_KEYS` for the retention window.
//! Every transition is one redb transaction, and a job's completion commits together with the
//! follow-up jobs it enqueued.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::exports::{apply_progress, ExportProgress, EXPORTS};
use super::{Store, StoreError, META};
use crate::store::PluginConfigId;

/// Job id → encoded [`Job`].
const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// (owner, run-at ms, job id): jobs waiting for their time. Owner 0 is the appliance itself.
const JOBS_DUE: TableDefinition<(u64, i64, u128), ()> = TableDefinition::new("jobs_due");
/// Job id → ms when the running server claimed it.
const JOBS_LEASED: TableDefinition<u128, i64> = TableDefinition::new("jobs_leased");
/// Idempotency key → (job id, ms when the key was first used).
const JOB_KEYS: TableDefinition<&str, (u128, i64)> = TableDefinition::new("job_keys");
/// Job id → requested [`Control`], for jobs that are running.
const JOB_CONTROL: TableDefinition<u128, u8> = TableDefinition::new("job_control");
/// (plugin config, cadence) → encoded [`ScheduleState`].
const SCHEDULES: TableDefinition<(u64, u8), &[u8]> = TableDefinition::new("schedules");
/// The last ingest position whose after-write deliveries are queued.
const DELIVERED_THROUGH: &str = "delivered_through";

const FORMAT: u8 = 1;
/// Attempts remembered in a job's history.
const HISTORY_LEN: usize = 20;

pub type JobId = Uuid;

/// How often a schedule runs; slots are aligned to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cadence {
    Minute,
    Hour,
    Day,
}

impl Cadence {
    pub const ALL: [Cadence; 3] = [Cadence::Minute, Cadence::Hour, Cadence::Day];

    pub fn seconds(self) -> i64 {
        match self {
            Cadence::Minute => 60,
            Cadence::Hour => 3_600,
            Cadence::Day => 86_400,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cadence::Minute => "minute",
            Cadence::Hour => "hour",
            Cadence::Day => "day",
        }
    }

    fn code(self) -> u8 {
        match self {
            Cadence::Minute => 0,
            Cadence::Hour => 1,
            Cadence::Day => 2,
        }
    }

    fn from_code(code: u8) -> Option<Cadence> {
        Cadence::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// What a job does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobKind {
    /// Does nothing: the queue's own cost, for benchmarks and checks.
    Noop,
    /// A plugin's named job (`run-job`).
    Plugin {
        config: PluginConfigId,
        name: String,
    },
    /// One slot of a plugin config's `run-every-*` schedule; `slot` is its start, unix seconds.
    Schedule {
        config: PluginConfigId,
        cadence: Cadence,
        slot: i64,
    },
    /// Stored events (the payload) handed to a plugin's `on-event`/`export-events`.
    Deliver { config: PluginConfigId },
    /// One page of a historical export; the payload holds the range and the next page's cursor.
    ExportPage { config: PluginConfigId, export: u64 },
}

impl JobKind {
    /// The plugin config this job belongs to, or 0 for the appliance's own jobs.
    pub fn owner(&self) -> u64 {
        match self {
            JobKind::Noop => 0,
            JobKind::Plugin { config, .. }
            | JobKind::Schedule { config, .. }
            | JobKind::Deliver { config }
            | JobKind::ExportPage { config, .. } => *config,
        }
    }

    /// A short label for lists and logs.
    pub fn label(&self) -> String {
        match self {
            JobKind::Noop => "noop".into(),
            JobKind::Plugin { name, .. } => format!("job {name}"),
            JobKind::Schedule { cadence, slot, .. } => {
                let at = chrono::DateTime::from_timestamp(*slot, 0)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_default();
                format!("run-every-{} {at}", cadence.name())
            }
            JobKind::Deliver { .. } => "deliver".into(),
            JobKind::ExportPage { export, .. } => format!("historical export {export}"),
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its run-at time.
    Scheduled,
    /// Waiting for the jobs it runs after.
    Waiting,
    /// Claimed by the server (running, or about to).
    Running,
    /// Failed, and waiting to try again.
    Retrying,
    /// Out of attempts, or failed permanently: a dead letter, kept and re-queueable.
    Dead,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        [
            JobState::Scheduled,
            JobState::Waiting,
            JobState::Running,
            JobState::Retrying,
            JobState::Dead,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.name() == text)
    }

    fn is_final(self) -> bool {
        matches!(self, JobState::Dead | JobState::Cancelled)
    }
}

/// One failed attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: i64,
    pub error: String,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    /// JSON text.
    pub payload: String,
    /// The stored state; a claimed job shows as [`JobState::Running`] when read back.
    pub state: JobState,
    pub run_at_ms: i64,
    /// Attempts that ended without success so far.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Deadline of one attempt; 0 for none.
    pub timeout_ms: u64,
    pub idempotency_key: Option<String>,
    /// State the job saved to resume from.
    pub checkpoint: Option<String>,
    pub history: Vec<Attempt>,
    /// Parent jobs that have not yet succeeded.
    pub waiting_on: u32,
    /// Jobs that wait for this one.
    pub dependents: Vec<JobId>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A job to enqueue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub id: JobId,
    pub kind: JobKind,
    pub payload: String,
    pub run_at_ms: i64,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    pub idempotency_key: Option<String>,
    /// Jobs that must succeed first (fan-in); ids unknown or already gone count as done.
    pub after: Vec<JobId>,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done: the job is removed and its follow-ups are enqueued (and a historical export's
    /// progress recorded), in the same transaction.
    Succeeded {
        follow_ups: Vec<NewJob>,
        export: Option<ExportProgress>,
    },
    /// Try again at `retry_at_ms` if attempts remain; otherwise a dead letter.
    Retry {
        error: String,
        retry_at_ms: i64,
    },
    /// Failed permanently: a dead letter at once.
    Failed {
        error: String,
    },
    Cancelled {
        reason: String,
    },
    /// Never started (the server is stopping): back to the queue, no attempt counted.
    Released,
}

/// A request to stop a running job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Stop at the next checkpoint or host call.
    Cancel,
    /// Stop now.
    Terminate,
}

impl Control {
    fn code(self) -> u8 {
        match self {
            Control::Cancel => 1,
            Control::Terminate => 2,
        }
    }
    fn from_code(code: u8) -> Control {
        if code == 2 {
            Control::Terminate
        } else {
            Control::Cancel
        }
    }
}

/// What one claim transaction handed out, and when the next waiting job is due.
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub next_due_ms: Option<i64>,
}

/// Counts for status pages.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct JobStats {
    /// Scheduled or retrying.
    pub queued: u64,
    pub running: u64,
    pub total: u64,
}

/// A schedule: the plugin config and how often it runs.
pub type ScheduleKey = (PluginConfigId, Cadence);

/// A schedule's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Start (unix seconds) of the last slot handed to a job.
    pub last_slot: i64,
    /// That slot's job, while it may still run.
    pub job: Option<JobId>,
}

/// A value as stored: the format version, then postcard.
pub(super) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    let out = vec![FORMAT];
    postcard::to_extend(value, out).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

pub(super) fn decode<T: for<'a> Deserialize<'a>>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| StoreError::Corrupt {
            what,
            detail: e.to_string(),
        }),
        _ => Err(StoreError::Corrupt {
            what,
            detail: "unknown format version".into(),
        }),
    }
}

/// Each owner that has jobs waiting for their time, with its earliest run-at: one look-up per
/// owner, jumping from one owner's range to the next.
fn first_due_per_owner(
    due: &impl ReadableTable<(u64, i64, u128), ()>,
) -> Result<Vec<(u64, i64)>, StoreError> {
    let mut owners = Vec::new();
    let mut from = 0u64;
    loop {
        let first = due
            .range((from, i64::MIN, 0u128)..)?
            .next()
            .transpose()?
            .map(|(k, _)| k.value());
        let Some((owner, run_at, _)) = first else {
            return Ok(owners);
        };
        owners.push((owner, run_at));
        match owner.checked_add(1) {
            Some(next) => from = next,
            None => return Ok(owners),
        }
    }
}

fn earliest(owners: &[(u64, i64)]) -> Option<i64> {
    owners.iter().map(|&(_, run_at)| run_at).min()
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(JOBS)?;
    txn.open_table(JOBS_DUE)?;
    txn.open_table(JOBS_LEASED)?;
    txn.open_table(JOB_KEYS)?;
    txn.open_table(JOB_CONTROL)?;
    txn.open_table(SCHEDULES)?;
    Ok(())
}

/// The job tables of one write transaction, with the queue's rules as methods.
pub struct JobTables<'txn> {
    jobs: Table<'txn, u128, &'static [u8]>,
    due: Table<'txn, (u64, i64, u128), ()>,
    leased: Table<'txn, u128, i64>,
    keys: Table<'txn, &'static str, (u128, i64)>,
    control: Table<'txn, u128, u8>,
    exports: Table<'txn, u64, &'static [u8]>,
    now_ms: i64,
}

impl<'txn> JobTables<'txn> {
    pub(super) fn open(
        txn: &'txn WriteTransaction,
        now_ms: i64,
    ) -> Result<JobTables<'txn>, StoreError> {
        Ok(JobTables {
            jobs: txn.open_table(JOBS)?,
            due: txn.open_table(JOBS_DUE)?,
            leased: txn.open_table(JOBS_LEASED)?,
            keys: txn.open_table(JOB_KEYS)?,
            control: txn.open_table(JOB_CONTROL)?,
            exports: txn.open_table(EXPORTS)?,
            now_ms,
        })
    }

    fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_u128())? {
            Some(bytes) => Ok(Some(decode("job", bytes.value())?)),
            None => Ok(None),
        }
    }

    fn put(&mut self, job: &Job) -> Result<(), StoreError> {
        self.jobs
            .insert(job.id.as_u128(), encode("job", job)?.as_slice())?;
        Ok(())
    }

    fn make_due(&mut self, job: &Job) -> Result<(), StoreError> {
        self.due
            .insert((job.kind.owner(), job.run_at_ms, job.id.as_u128()), ())?;
        Ok(())
    }

    /// Adds a job, or returns the id of the job its idempotency key already names (within
    /// `key_retention_ms`).
    pub fn insert(&mut self, new: NewJob, key_retention_ms: i64) -> Result<JobId, StoreError> {
        if let Some(key) = &new.idempotency_key {
            if let Some(existing) = self.keys.get(key.as_str())? {
                let (id, first_ms) = existing.value();
                if self.now_ms - first_ms < key_retention_ms {
                    return Ok(Uuid::from_u128(id));
                }
            }
            self.keys
                .insert(key.as_str(), (new.id.as_u128(), self.now_ms))?;
        }
        let mut waiting_on = 0;
        for parent_id in &new.after {
            let Some(mut parent) = self.get(*parent_id)? else {
                continue;
            };
            if parent.state == JobState::Cancelled {
                continue;
            }
            parent.dependents.push(new.id);
            self.put(&parent)?;
            waiting_on += 1;
        }
        let job = Job {
            id: new.id,
            kind: new.kind,
            payload: new.payload,
            state: if waiting_on > 0 {
                JobState::Waiting
            } else {
                JobState::Scheduled
            },
            run_at_ms: new.run_at_ms,
            attempts: 0,
            max_attempts: new.max_attempts.max(1),
            timeout_ms: new.timeout_ms,
            idempotency_key: new.idempotency_key,
            checkpoint: None,
            history: Vec::new(),
            waiting_on,
            dependents: Vec::new(),
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
        };
        self.put(&job)?;
        if waiting_on == 0 {
            self.make_due(&job)?;
        }
        Ok(job.id)
    }

    /// True while the job may still run (queued, waiting, running or retrying).
    pub fn is_live(&self, id: JobId) -> Result<bool, StoreError> {
        Ok(self.get(id)?.is_some_and(|j| !j.state.is_final()))
    }

    /// Claims up to `max` due jobs, taking from each owner in turn and at most as many as
    /// `owner_room` allows for it (owners not listed have no limit).
    fn claim(
        &mut self,
        max: usize,
        owner_room: &dyn Fn(u64) -> usize,
    ) -> Result<Claimed, StoreError> {
        let mut claimed = Claimed::default();
        let mut taken: HashMap<u64, usize> = HashMap::new();
        // Visit owners that have due jobs, in turn, until `max` jobs are taken.
        let owners = first_due_per_owner(&self.due)?;
        let mut progress = true;
        while claimed.jobs.len() < max && progress {
            progress = false;
            for &(owner, _) in &owners {
                let room =
                    owner_room(owner).saturating_sub(taken.get(&owner).copied().unwrap_or(0));
                if room == 0 || claimed.jobs.len() >= max {
                    continue;
                }
                let want = room.min(max - claimed.jobs.len()).min(64);
                let keys: Vec<(u64, i64, u128)> = self
                    .due
                    .range((owner, i64::MIN, 0u128)..=(owner, self.now_ms, u128::MAX))?
                    .take(want)
                    .map(|row| row.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()?;
                for key in &keys {
                    self.due.remove(key)?;
                    let id = Uuid::from_u128(key.2);
                    if let Some(mut job) = self.get(id)? {
                        self.leased.insert(key.2, self.now_ms)?;
                        job.state = JobState::Running;
                        claimed.jobs.push(job);
                        *taken.entry(owner).or_default() += 1;
                        progress = true;
                    }
                }
            }
        }
        claimed.next_due_ms = earliest(&first_due_per_owner(&self.due)?);
        Ok(claimed)
    }

    /// Applies how a claimed job's attempt ended.
    fn finish(
        &mut self,
        id: JobId,
        outcome: Outcome,
        key_retention_ms: i64,
    ) -> Result<(), StoreError> {
        self.leased.remove(id.as_u128())?;
        self.control.remove(id.as_u128())?;
        let Some(mut job) = self.get(id)? else {
            return Ok(());
        };
        job.updated_ms = self.now_ms;
        match outcome {
            Outcome::Succeeded { follow_ups, export } => {
                self.jobs.remove(id.as_u128())?;
                if let Some(progress) = export {
                    apply_progress(&mut self.exports, progress, self.now_ms)?;
                }
                for dependent in job.dependents.clone() {
                    self.parent_succeeded(dependent)?;
                }
                for new in follow_ups {
                    self.insert(new, key_retention_ms)?;
                }
            }
            Outcome::Retry { error, retry_at_ms } => {
                self.record_failure(&mut job, error);
                if job.attempts >= job.max_attempts {
                    job.state = JobState::Dead;
                    self.put(&job)?;
                } else {
                    job.state = JobState::Retrying;
                    job.run_at_ms = retry_at_ms;
                    self.put(&job)?;
                    self.make_due(&job)?;
                }
            }
            Outcome::Failed { error } => {
                self.record_failure(&mut job, error);
                job.state = JobState::Dead;
                self.put(&job)?;
            }
            Outcome::Cancelled { reason } => {
                self.cancel_tree(job, reason)?;
            }
            Outcome::Released => {
                self.make_due(&job)?;
            }
        }
        Ok(())
    }

    fn record_failure(&mut self, job: &mut Job, error: String) {
        job.attempts += 1;
        job.history.push(Attempt {
            at_ms: self.now_ms,
            error,
        });
        if job.history.len() > HISTORY_LEN {
            job.history.remove(0);
        }
    }

    fn parent_succeeded(&mut self, id: JobId) -> Result<(), StoreError> {
        let Some(mut job) = self.get(id)? else {
            return Ok(());
        };
        job.waiting_on = job.waiting_on.saturating_sub(1);
        if job.waiting_on == 0 && job.state == JobState::Waiting {
            job.state = JobState::Scheduled;
            job.run_at_ms = job.run_at_ms.max(self.now_ms);
            self.make_due(&job)?;
        }
        self.put(&job)
    }

    /// Cancels a job that is not running, and every job waiting for it.
    fn cancel_tree(&mut self, job: Job, reason: String) -> Result<(), StoreError> {
        let mut pending = vec![(job, reason)];
        while let Some((mut job, reason)) = pending.pop() {
            self.due
                .remove((job.kind.owner(), job.run_at_ms, job.id.as_u128()))?;
            job.state = JobState::Cancelled;
            job.updated_ms = self.now_ms;
            job.note(reason);
            for dependent in &job.dependents {
                if let Some(child) = self.get(*dependent)? {
                    if !child.state.is_final() && self.leased.get(dependent.as_u128())?.is_none() {
                        pending
                            .push((child, format!("job {} it waited for was cancelled", job.id)));
                    }
                }
            }
            self.put(&job)?;
        }
        Ok(())
    }
}

impl Job {
    /// The last error, kept as the final history entry's text.
    pub fn last_error(&self) -> Option<&str> {
        self.history.last().map(|a| a.error.as_str())
    }

    /// Adds a line to the history without counting an attempt.
    fn note(&mut self, text: String) {
        self.history.push(Attempt {
            at_ms: self.updated_ms,
            error: text,
        });
        if self.history.len() > HISTORY_LEN {
            self.history.remove(0);
        }
    }
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
                out.push(((config, cadence), decode("schedule", value.value())?));
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
        self.schedules.insert(
            (config, cadence.code()),
            encode("schedule", state)?.as_slice(),
        )?;
        Ok(())
    }

    pub fn remove(&mut self, config: PluginConfigId, cadence: Cadence) -> Result<(), StoreError> {
        self.schedules.remove((config, cadence.code()))?;
        Ok(())
    }
}

impl Store {
    /// Enqueues jobs in one durable transaction; returns each job's id (an idempotency key
    /// already used within `key_retention_ms` returns the earlier job's id instead).
    pub fn enqueue_jobs(
        &self,
        jobs: Vec<NewJob>,
        now_ms: i64,
        key_retention_ms: i64,
    ) -> Result<Vec<JobId>, StoreError> {
        self.enqueue_jobs_marking(jobs, now_ms, key_retention_ms, None)
    }

    /// [`Store::enqueue_jobs`], also recording that deliveries are queued through `delivered`.
    pub fn enqueue_jobs_marking(
        &self,
        jobs: Vec<NewJob>,
        now_ms: i64,
        key_retention_ms: i64,
        delivered: Option<u64>,
    ) -> Result<Vec<JobId>, StoreError> {
        let txn = self.db.begin_write()?;
        let ids = {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let mut ids = Vec::with_capacity(jobs.len());
            for job in jobs {
                ids.push(tables.insert(job, key_retention_ms)?);
            }
            ids
        };
        if let Some(position) = delivered {
            mark_delivered(&txn, position)?;
        }
        txn.commit()?;
        Ok(ids)
    }

    /// Applies finished attempts and claims up to `max` due jobs, in one durable transaction.
    pub fn finish_and_claim(
        &self,
        finished: Vec<(JobId, Outcome)>,
        now_ms: i64,
        key_retention_ms: i64,
        max: usize,
        owner_room: &dyn Fn(u64) -> usize,
    ) -> Result<Claimed, StoreError> {
        let txn = self.db.begin_write()?;
        let claimed = {
            let mut tables = JobTables::open(&txn, now_ms)?;
            for (id, outcome) in finished {
                tables.finish(id, outcome, key_retention_ms)?;
            }
            if max > 0 {
                tables.claim(max, owner_room)?
            } else {
                Claimed::default()
            }
        };
        txn.commit()?;
        Ok(claimed)
    }

    /// The earliest run-at of the jobs waiting for their time, read without writing.
    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let txn = self.read()?;
        let due = txn.open_table(JOBS_DUE)?;
        Ok(earliest(&first_due_per_owner(&due)?))
    }

    /// Puts every claimed job back in the queue, each counting a failed attempt: called by a
    /// server at start-up, when every claim left in the file belongs to a process that died.
    pub fn recover_leases(&self, now_ms: i64, retry_at_ms: i64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let recovered = {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let ids: Vec<u128> = tables
                .leased
                .iter()?
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for id in &ids {
                tables.finish(
                    Uuid::from_u128(*id),
                    Outcome::Retry {
                        error: "the server stopped before the job finished (crash, kill or shutdown deadline)".into(),
                        retry_at_ms,
                    },
                    0,
                )?;
            }
            ids.len()
        };
        txn.commit()?;
        Ok(recovered)
    }

    /// Saves a running job's checkpoint durably.
    pub fn save_job_checkpoint(
        &self,
        id: JobId,
        state: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let mut job = tables
                .get(id)?
                .ok_or_else(|| StoreError::Conflict(format!("no job {id}")))?;
            job.checkpoint = Some(state.to_owned());
            job.updated_ms = now_ms;
            tables.put(&job)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Asks a job to stop. A job that is not running is cancelled at once; a running one is
    /// told through `JOB_CONTROL`, which the server watches. Returns the job's state after.
    pub fn control_job(
        &self,
        id: JobId,
        control: Control,
        now_ms: i64,
    ) -> Result<JobState, StoreError> {
        let txn = self.db.begin_write()?;
        let state = {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let job = tables
                .get(id)?
                .ok_or_else(|| StoreError::Conflict(format!("no job {id}")))?;
            if tables.leased.get(id.as_u128())?.is_some() {
                tables.control.insert(id.as_u128(), control.code())?;
                JobState::Running
            } else if job.state.is_final() {
                return Err(StoreError::Conflict(format!(
                    "job {id} is already {}",
                    job.state.name()
                )));
            } else {
                let how = match control {
                    Control::Cancel => "cancelled by the operator",
                    Control::Terminate => "terminated by the operator",
                };
                tables.cancel_tree(job, how.into())?;
                JobState::Cancelled
            }
        };
        txn.commit()?;
        Ok(state)
    }

    /// Stop requests for running jobs.
    pub fn job_controls(&self) -> Result<Vec<(JobId, Control)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(JOB_CONTROL)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (id, code) = row?;
            out.push((
                Uuid::from_u128(id.value()),
                Control::from_code(code.value()),
            ));
        }
        Ok(out)
    }

    /// Puts a dead or cancelled job back in the queue with fresh attempts, history kept.
    pub fn requeue_job(&self, id: JobId, now_ms: i64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let mut job = tables
                .get(id)?
                .ok_or_else(|| StoreError::Conflict(format!("no job {id}")))?;
            if !job.state.is_final() {
                return Err(StoreError::Conflict(format!(
                    "job {id} is {}; only dead or cancelled jobs can be re-queued",
                    job.state.name()
                )));
            }
            job.state = JobState::Scheduled;
            job.attempts = 0;
            job.run_at_ms = now_ms;
            job.updated_ms = now_ms;
            job.waiting_on = 0;
            tables.put(&job)?;
            tables.make_due(&job)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// A job as it is now, if it is still kept.
    pub fn job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let txn = self.read()?;
        let jobs = txn.open_table(JOBS)?;
        let leased = txn.open_table(JOBS_LEASED)?;
        let Some(bytes) = jobs.get(id.as_u128())? else {
            return Ok(None);
        };
        let mut job: Job = decode("job", bytes.value())?;
        if leased.get(id.as_u128())?.is_some() {
            job.state = JobState::Running;
        }
        Ok(Some(job))
    }

    /// Kept jobs, optionally only those in `state`, at most `limit`, oldest first.
    pub fn list_jobs(&self, state: Option<JobState>, limit: usize) -> Result<Vec<Job>, StoreError> {
        let txn = self.read()?;
        let jobs = txn.open_table(JOBS)?;
        let leased = txn.open_table(JOBS_LEASED)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (id, bytes) = row?;
            let mut job: Job = decode("job", bytes.value())?;
            if leased.get(id.value())?.is_some() {
                job.state = JobState::Running;
            }
            if state.is_none_or(|s| s == job.state) {
                out.push(job);
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.sort_by_key(|j| j.created_ms);
        Ok(out)
    }

    pub fn job_stats(&self) -> Result<JobStats, StoreError> {
        let txn = self.read()?;
        Ok(JobStats {
            queued: txn.open_table(JOBS_DUE)?.len()?,
            running: txn.open_table(JOBS_LEASED)?.len()?,
            total: txn.open_table(JOBS)?.len()?,
        })
    }

    /// Forgets idempotency keys first used before `before_ms`.
    pub fn purge_job_keys(&self, before_ms: i64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut keys = txn.open_table(JOB_KEYS)?;
            let mut removed = 0;
            for row in keys.extract_if(|_, (_, first_ms)| first_ms < before_ms)? {
                row?;
                removed += 1;
            }
            removed
        };
        txn.commit()?;
        Ok(removed)
    }

    /// Runs `update` over the schedules and the job queue in one durable transaction.
    pub fn update_schedules<T>(
        &self,
        now_ms: i64,
        update: impl FnOnce(&mut ScheduleTables<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut tables = ScheduleTables {
                schedules: txn.open_table(SCHEDULES)?,
                jobs: JobTables::open(&txn, now_ms)?,
            };
            update(&mut tables)?
        };
        txn.commit()?;
        Ok(result)
    }

    /// The last ingest position whose deliveries are queued; `None` if never recorded.
    pub fn delivered_position(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.read()?;
        Ok(txn
            .open_table(META)?
            .get(DELIVERED_THROUGH)?
            .map(|v| v.value()))
    }
}

/// Records that every ingest position through `position` has its deliveries queued.
pub(super) fn mark_delivered(txn: &WriteTransaction, position: u64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let current = meta.get(DELIVERED_THROUGH)?.map(|v| v.value()).unwrap_or(0);
    if position > current {
        meta.insert(DELIVERED_THROUGH, position)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETAIN: i64 = 3_600_000;

    fn new_job(owner: u64, run_at_ms: i64) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            kind: if owner == 0 {
                JobKind::Noop
            } else {
                JobKind::Plugin {
                    config: owner,
                    name: "j".into(),
                }
            },
            payload: "{}".into(),
            run_at_ms,
            max_attempts: 3,
            timeout_ms: 0,
            idempotency_key: None,
            after: Vec::new(),
        }
    }

    fn claim_all(store: &Store, now: i64) -> Vec<Job> {
        store
            .finish_and_claim(Vec::new(), now, RETAIN, 1000, &|_| usize::MAX)
            .unwrap()
            .jobs
    }

    fn finish(store: &Store, id: JobId, outcome: Outcome, now: i64) {
        store
            .finish_and_claim(vec![(id, outcome)], now, RETAIN, 0, &|_| 0)
            .unwrap();
    }

    #[test]
    fn a_failing_job_retries_at_its_time_then_becomes_a_dead_letter_and_can_be_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = store
            .enqueue_jobs(vec![new_job(7, 1000)], 1000, RETAIN)
            .unwrap()[0];
        assert!(claim_all(&store, 999).is_empty(), "not due yet");
        for attempt in 1..=3 {
            let now = 1000 * attempt;
            let claimed = claim_all(&store, now);
            assert_eq!(claimed.len(), 1, "attempt {attempt}");
            assert_eq!(store.job(id).unwrap().unwrap().state, JobState::Running);
            let outcome = Outcome::Retry {
                error: format!("boom {attempt}"),
                retry_at_ms: now + 1000,
            };
            finish(&store, id, outcome, now);
            assert!(claim_all(&store, now + 999).is_empty(), "backoff respected");
        }
        let dead = store.job(id).unwrap().unwrap();
        assert_eq!(dead.state, JobState::Dead);
        assert_eq!(dead.attempts, 3);
        let errors: Vec<_> = dead.history.iter().map(|a| a.error.as_str()).collect();
        assert_eq!(errors, ["boom 1", "boom 2", "boom 3"]);
        assert!(
            claim_all(&store, 10_000).is_empty(),
            "dead letters do not run"
        );
        assert_eq!(store.list_jobs(Some(JobState::Dead), 10).unwrap().len(), 1);

        store.requeue_job(id, 20_000).unwrap();
        assert_eq!(claim_all(&store, 20_000).len(), 1);
        finish(
            &store,
            id,
            Outcome::Succeeded {
                follow_ups: vec![],
                export: None,
            },
            20_000,
        );
        assert!(
            store.job(id).unwrap().is_none(),
            "succeeded jobs are removed"
        );
    }

    #[test]
    fn an_idempotency_key_deduplicates_within_its_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keyed = |key: &str| NewJob {
            idempotency_key: Some(key.into()),
            ..new_job(1, 0)
        };
        let first = store.enqueue_jobs(vec![keyed("k")], 0, RETAIN).unwrap()[0];
        let again = store
            .enqueue_jobs(vec![keyed("k"), keyed("other")], 10, RETAIN)
            .unwrap();
        assert_eq!(again[0], first);
        assert_ne!(again[1], first);
        // Even after the job succeeded and is gone, the key still answers.
        let claimed = claim_all(&store, 10);
        assert_eq!(claimed.len(), 2);
        finish(
            &store,
            first,
            Outcome::Succeeded {
                follow_ups: vec![],
                export: None,
            },
            20,
        );
        assert_eq!(
            store.enqueue_jobs(vec![keyed("k")], 30, RETAIN).unwrap()[0],
            first
        );
        // Past the retention window the key is free again.
        let later = store
            .enqueue_jobs(vec![keyed("k")], RETAIN + 1, RETAIN)
            .unwrap()[0];
        assert_ne!(later, first);
        assert_eq!(
            store.purge_job_keys(RETAIN).unwrap(),
            1,
            "only 'other' was older"
        );
    }

    #[test]
    fn a_join_runs_only_when_all_its_parents_succeeded_and_follow_ups_commit_with_success() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (new_job(1, 0), new_job(1, 0));
        let join = NewJob {
            after: vec![a.id, b.id],
            ..new_job(1, 0)
        };
        let join_id = join.id;
        store
            .enqueue_jobs(vec![a.clone(), b.clone(), join], 0, RETAIN)
            .unwrap();
        assert_eq!(
            store.job(join_id).unwrap().unwrap().state,
            JobState::Waiting
        );
        let claimed: Vec<JobId> = claim_all(&store, 0).iter().map(|j| j.id).collect();
        assert_eq!(claimed.len(), 2);
        assert!(!claimed.contains(&join_id));
        let follow_up = new_job(1, 0);
        let follow_up_id = follow_up.id;
        finish(
            &store,
            a.id,
            Outcome::Succeeded {
                follow_ups: vec![follow_up],
                export: None,
            },
            1,
        );
        let next: Vec<JobId> = claim_all(&store, 1).iter().map(|j| j.id).collect();
        assert_eq!(next, [follow_up_id], "the join still waits for b");
        finish(
            &store,
            b.id,
            Outcome::Succeeded {
                follow_ups: vec![],
                export: None,
            },
            2,
        );
        let next: Vec<JobId> = claim_all(&store, 2).iter().map(|j| j.id).collect();
        assert_eq!(next, [join_id]);

        // A failed attempt enqueues none of its follow-ups.
        let failing = store.enqueue_jobs(vec![new_job(1, 3)], 3, RETAIN).unwrap()[0];
        claim_all(&store, 3);
        finish(&store, failing, Outcome::Failed { error: "no".into() }, 3);
        assert!(claim_all(&store, 100).is_empty());
    }

    #[test]
    fn one_owner_cannot_take_every_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut jobs: Vec<NewJob> = (0..50).map(|i| new_job(5, i)).collect();
        jobs.push(new_job(6, 100));
        jobs.push(new_job(0, 200));
        store.enqueue_jobs(jobs, 0, RETAIN).unwrap();
        let room = |owner: u64| if owner == 0 { usize::MAX } else { 2 };
        let claimed = store
            .finish_and_claim(Vec::new(), 1000, RETAIN, 100, &room)
            .unwrap();
        let owners: Vec<u64> = claimed.jobs.iter().map(|j| j.kind.owner()).collect();
        assert_eq!(owners.iter().filter(|o| **o == 5).count(), 2);
        assert!(owners.contains(&6) && owners.contains(&0));
        assert_eq!(claimed.next_due_ms, Some(2), "owner 5's next job");
    }

    #[test]
    fn claims_left_by_a_dead_server_are_recovered_as_a_failed_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = store.enqueue_jobs(vec![new_job(1, 0)], 0, RETAIN).unwrap()[0];
        assert_eq!(claim_all(&store, 0).len(), 1);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(claim_all(&store, 10).is_empty(), "still leased");
        assert_eq!(store.recover_leases(10, 10).unwrap(), 1);
        let job = store.job(id).unwrap().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Retrying, 1));
        assert_eq!(claim_all(&store, 10).len(), 1);
    }

    #[test]
    fn cancelling_a_queued_job_cancels_its_dependents_and_a_running_one_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let parent = new_job(1, 1000);
        let child = NewJob {
            after: vec![parent.id],
            ..new_job(1, 0)
        };
        let (parent_id, child_id) = (parent.id, child.id);
        let running = store
            .enqueue_jobs(vec![parent, child, new_job(2, 0)], 0, RETAIN)
            .unwrap()[2];
        assert_eq!(claim_all(&store, 0).len(), 1);
        assert_eq!(
            store.control_job(parent_id, Control::Cancel, 1).unwrap(),
            JobState::Cancelled
        );
        assert_eq!(
            store.job(child_id).unwrap().unwrap().state,
            JobState::Cancelled
        );
        assert!(claim_all(&store, 5000).is_empty());
        assert_eq!(
            store.control_job(running, Control::Terminate, 2).unwrap(),
            JobState::Running
        );
        assert_eq!(
            store.job_controls().unwrap(),
            [(running, Control::Terminate)]
        );
        finish(
            &store,
            running,
            Outcome::Cancelled {
                reason: "terminated".into(),
            },
            3,
        );
        assert!(store.job_controls().unwrap().is_empty());
        assert!(store.control_job(running, Control::Cancel, 4).is_err());
    }
}
