//! The job tables of one write transaction and the queue's rules as methods: insert (with
//! idempotency keys and fan-in), claim (fair across owners, within each owner's room), finish
//! (success with follow-ups, retry, dead letter, cancel), and cancelling a tree of dependents.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use uuid::Uuid;

use super::super::exports::{apply_progress, EXPORTS};
use super::super::{decode_value, encode_value, StoreError};
use super::{Attempt, Claimed, Job, JobId, JobState, NewJob, Outcome, HISTORY_LEN};

/// Job id → encoded [`Job`].
pub(in crate::store) const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// (owner, run-at ms, job id): jobs waiting for their time. Owner 0 is the appliance itself.
pub(in crate::store) const JOBS_DUE: TableDefinition<(u64, i64, u128), ()> =
    TableDefinition::new("jobs_due");
/// Job id → ms when the running server claimed it.
pub(in crate::store) const JOBS_LEASED: TableDefinition<u128, i64> =
    TableDefinition::new("jobs_leased");
/// Idempotency key → (job id, ms when the key was first used).
pub(in crate::store) const JOB_KEYS: TableDefinition<&str, (u128, i64)> =
    TableDefinition::new("job_keys");
/// Job id → requested [`super::Control`], for jobs that are running.
pub(in crate::store) const JOB_CONTROL: TableDefinition<u128, u8> =
    TableDefinition::new("job_control");
/// Owner → jobs of it that may still run (scheduled, retrying, waiting, running): what the
/// per-config job quota counts.
pub(in crate::store) const JOB_OWNER_COUNTS: TableDefinition<u64, u64> =
    TableDefinition::new("job_owner_counts");
/// (ms of the last change, job id) of dead and cancelled jobs, for their retention.
pub(in crate::store) const JOBS_FINAL: TableDefinition<(i64, u128), ()> =
    TableDefinition::new("jobs_final");
/// What a job's history says when the server stopped while it ran.
pub(super) const INTERRUPTED: &str =
    "the server stopped while the job ran (crash, kill or shutdown deadline)";
/// Server stops a job may see before it is taken for the cause and becomes a dead letter.
pub(super) const MAX_INTERRUPTIONS: usize = 10;

/// Each owner that has jobs waiting for their time, with its earliest run-at: one look-up per
/// owner, jumping from one owner's range to the next.
pub(super) fn first_due_per_owner(
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

pub(super) fn earliest(owners: &[(u64, i64)]) -> Option<i64> {
    owners.iter().map(|&(_, run_at)| run_at).min()
}

pub(in crate::store) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    let jobs = txn.open_table(JOBS)?;
    txn.open_table(JOBS_DUE)?;
    txn.open_table(JOBS_LEASED)?;
    txn.open_table(JOB_KEYS)?;
    txn.open_table(JOB_CONTROL)?;
    let mut counts = txn.open_table(JOB_OWNER_COUNTS)?;
    let mut finals = txn.open_table(JOBS_FINAL)?;
    // A file written before the counts and the final index: build them once.
    if counts.is_empty()? && finals.is_empty()? && !jobs.is_empty()? {
        let mut live: HashMap<u64, u64> = HashMap::new();
        for row in jobs.iter()? {
            let (id, bytes) = row?;
            let job: Job = decode_value("job", bytes.value())?;
            if job.state.is_final() {
                finals.insert((job.updated_ms, id.value()), ())?;
            } else {
                *live.entry(job.kind.owner()).or_default() += 1;
            }
        }
        for (owner, n) in live {
            counts.insert(owner, n)?;
        }
    }
    super::schedules::create_tables(txn)
}

/// The job tables of one write transaction, with the queue's rules as methods.
pub struct JobTables<'txn> {
    pub(super) jobs: Table<'txn, u128, &'static [u8]>,
    pub(super) due: Table<'txn, (u64, i64, u128), ()>,
    pub(super) leased: Table<'txn, u128, i64>,
    pub(super) keys: Table<'txn, &'static str, (u128, i64)>,
    pub(super) control: Table<'txn, u128, u8>,
    pub(super) owner_counts: Table<'txn, u64, u64>,
    pub(super) finals: Table<'txn, (i64, u128), ()>,
    pub(super) exports: Table<'txn, u64, &'static [u8]>,
    pub(super) now_ms: i64,
}

impl<'txn> JobTables<'txn> {
    pub(in crate::store) fn open(
        txn: &'txn WriteTransaction,
        now_ms: i64,
    ) -> Result<JobTables<'txn>, StoreError> {
        Ok(JobTables {
            jobs: txn.open_table(JOBS)?,
            due: txn.open_table(JOBS_DUE)?,
            leased: txn.open_table(JOBS_LEASED)?,
            keys: txn.open_table(JOB_KEYS)?,
            control: txn.open_table(JOB_CONTROL)?,
            owner_counts: txn.open_table(JOB_OWNER_COUNTS)?,
            finals: txn.open_table(JOBS_FINAL)?,
            exports: txn.open_table(EXPORTS)?,
            now_ms,
        })
    }

    pub(super) fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_u128())? {
            Some(bytes) => Ok(Some(decode_value("job", bytes.value())?)),
            None => Ok(None),
        }
    }

    pub(super) fn put(&mut self, job: &Job) -> Result<(), StoreError> {
        self.jobs
            .insert(job.id.as_u128(), encode_value(job).as_slice())?;
        Ok(())
    }

    /// Moves the count of `owner`'s jobs that may still run.
    pub(super) fn count_live(&mut self, owner: u64, delta: i64) -> Result<(), StoreError> {
        let now = self.owner_counts.get(owner)?.map_or(0, |n| n.value());
        let next = now.saturating_add_signed(delta);
        if next == 0 {
            self.owner_counts.remove(owner)?;
        } else {
            self.owner_counts.insert(owner, next)?;
        }
        Ok(())
    }

    /// After a failed or interrupted attempt: a dead letter if `dead`, else due again at
    /// `retry_at_ms`.
    fn retry_or_bury(
        &mut self,
        mut job: Job,
        dead: bool,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        if dead {
            job.state = JobState::Dead;
            self.put_final(&job)
        } else {
            job.state = JobState::Retrying;
            job.run_at_ms = retry_at_ms;
            self.put(&job)?;
            self.make_due(&job)
        }
    }

    /// Stores a job that has just become dead or cancelled, indexed for its retention.
    fn put_final(&mut self, job: &Job) -> Result<(), StoreError> {
        self.put(job)?;
        self.finals.insert((job.updated_ms, job.id.as_u128()), ())?;
        self.count_live(job.kind.owner(), -1)
    }

    pub(super) fn make_due(&mut self, job: &Job) -> Result<(), StoreError> {
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
        self.count_live(job.kind.owner(), 1)?;
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
    pub(super) fn claim(
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
    pub(super) fn finish(
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
                self.count_live(job.kind.owner(), -1)?;
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
                let spent = job.attempts >= job.max_attempts;
                self.retry_or_bury(job, spent, retry_at_ms)?;
            }
            Outcome::Failed { error } => {
                self.record_failure(&mut job, error);
                job.state = JobState::Dead;
                self.put_final(&job)?;
            }
            Outcome::Interrupted { retry_at_ms } => {
                // A stop of the server is not the job's failure: no attempt is counted. Only a
                // job that keeps being interrupted is suspected and set aside.
                job.note(INTERRUPTED.into());
                let interruptions = job
                    .history
                    .iter()
                    .filter(|a| a.error == INTERRUPTED)
                    .count();
                let suspected = interruptions >= MAX_INTERRUPTIONS;
                if suspected {
                    job.note(format!(
                        "interrupted by {interruptions} server stops; set aside as a dead letter in case it causes them"
                    ));
                }
                self.retry_or_bury(job, suspected, retry_at_ms)?;
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

    pub(super) fn record_failure(&mut self, job: &mut Job, error: String) {
        job.attempts += 1;
        job.history.push(Attempt {
            at_ms: self.now_ms,
            error,
        });
        if job.history.len() > HISTORY_LEN {
            job.history.remove(0);
        }
    }

    pub(super) fn parent_succeeded(&mut self, id: JobId) -> Result<(), StoreError> {
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
    pub(super) fn cancel_tree(&mut self, job: Job, reason: String) -> Result<(), StoreError> {
        let mut pending = vec![(job, reason)];
        while let Some((mut job, reason)) = pending.pop() {
            self.due
                .remove((job.kind.owner(), job.run_at_ms, job.id.as_u128()))?;
            let was_live = !job.state.is_final();
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
            if was_live {
                self.put_final(&job)?;
            } else {
                self.put(&job)?;
            }
        }
        Ok(())
    }
}
