//! The store's job operations, each one durable transaction: enqueue, finish-and-claim,
//! recover leases, checkpoints, stop requests, re-queue, reads for the CLI and `/api/`.

use redb::{ReadableTable, ReadableTableMetadata};
use uuid::Uuid;

use super::super::{decode_value, Store, StoreError};
use super::tables::{
    earliest, first_due_per_owner, JOBS, JOBS_DUE, JOBS_FINAL, JOBS_LEASED, JOB_CONTROL, JOB_KEYS,
    JOB_OWNER_COUNTS,
};
use super::{Claimed, Control, Job, JobId, JobState, JobStats, JobTables, NewJob, Outcome};
use crate::ids::TeamId;

fn insert_all(
    txn: &redb::WriteTransaction,
    jobs: Vec<NewJob>,
    now_ms: i64,
    key_retention_ms: i64,
) -> Result<Vec<JobId>, StoreError> {
    let mut tables = JobTables::open(txn, now_ms)?;
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        ids.push(tables.insert(job, key_retention_ms)?);
    }
    Ok(ids)
}

/// What a lead sink write completes, committed with its deliveries: the delivery mark moves to
/// `delivered`, the `undefer`red batches it processed are removed, the person changes apply, and
/// the follow log record for the follower sinks is appended.
pub struct WriteDone<'a> {
    pub delivered: u64,
    pub undefer: &'a [(TeamId, u64)],
    pub persons: &'a crate::person::PersonUpdates,
    pub follow: Option<&'a super::super::FollowRecord>,
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
        let txn = self.write()?;
        let ids = insert_all(&txn, jobs, now_ms, key_retention_ms)?;
        self.commit(txn)?;
        Ok(ids)
    }

    /// Queues the pipeline's after-write deliveries in one transaction with everything else the
    /// lead write completes (see [`WriteDone`]).
    pub fn commit_deliveries(
        &self,
        jobs: Vec<NewJob>,
        now_ms: i64,
        key_retention_ms: i64,
        done: WriteDone<'_>,
    ) -> Result<Vec<JobId>, StoreError> {
        let WriteDone {
            delivered,
            undefer,
            persons,
            follow,
        } = done;
        let txn = self.write()?;
        if let Some(record) = follow {
            super::super::follow::append(&txn, record)?;
        }
        let ids = insert_all(&txn, jobs, now_ms, key_retention_ms)?;
        super::super::persons::apply(&txn, persons)?;
        super::super::positions::mark_delivered(&txn, delivered)?;
        let teams = super::super::deferred::undefer(&txn, undefer)?;
        let queued = follow
            .is_some()
            .then(|| super::super::ingest::adjust_queued_bytes(&txn, 0))
            .transpose()?;
        self.commit(txn)?;
        self.set_deferred_bytes(teams);
        if let Some(queued) = queued {
            self.set_queued_bytes(queued);
        }
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
        let txn = self.write()?;
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
        self.commit(txn)?;
        Ok(claimed)
    }

    /// The earliest run-at of the jobs waiting for their time, read without writing.
    pub fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let txn = self.read()?;
        let due = txn.open_table(JOBS_DUE)?;
        Ok(earliest(&first_due_per_owner(&due)?))
    }

    /// Puts every claimed job back in the queue, noting the interruption without counting an
    /// attempt (a stop of the server is not the job's failure): called by a server at start-up,
    /// when every claim left in the file belongs to a process that died.
    pub fn recover_leases(&self, now_ms: i64, retry_at_ms: i64) -> Result<usize, StoreError> {
        let txn = self.write()?;
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
                    Outcome::Interrupted { retry_at_ms },
                    0,
                )?;
            }
            ids.len()
        };
        self.commit(txn)?;
        Ok(recovered)
    }

    /// Saves a running job's checkpoint durably.
    pub fn save_job_checkpoint(
        &self,
        id: JobId,
        state: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let mut job = tables.get(id)?.ok_or_else(|| {
                StoreError::NotFound(format!("no job {id} is kept (succeeded jobs are not kept)"))
            })?;
            job.checkpoint = Some(state.to_owned());
            job.updated_ms = now_ms;
            tables.put(&job)?;
        }
        self.commit(txn)?;
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
        let txn = self.write()?;
        let state = {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let job = tables.get(id)?.ok_or_else(|| {
                StoreError::NotFound(format!("no job {id} is kept (succeeded jobs are not kept)"))
            })?;
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
        self.commit(txn)?;
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
        let txn = self.write()?;
        {
            let mut tables = JobTables::open(&txn, now_ms)?;
            let mut job = tables.get(id)?.ok_or_else(|| {
                StoreError::NotFound(format!("no job {id} is kept (succeeded jobs are not kept)"))
            })?;
            if !job.state.is_final() {
                return Err(StoreError::Conflict(format!(
                    "job {id} is {}; only dead or cancelled jobs can be re-queued",
                    job.state.name()
                )));
            }
            tables.finals.remove((job.updated_ms, id.as_u128()))?;
            job.state = JobState::Scheduled;
            job.attempts = 0;
            job.run_at_ms = now_ms;
            job.updated_ms = now_ms;
            job.waiting_on = 0;
            tables.put(&job)?;
            tables.count_live(job.kind.owner(), 1)?;
            tables.make_due(&job)?;
        }
        self.commit(txn)?;
        Ok(())
    }

    /// The job an idempotency key names, if the key was first used within `retention_ms`.
    pub fn job_for_key(
        &self,
        key: &str,
        now_ms: i64,
        retention_ms: i64,
    ) -> Result<Option<JobId>, StoreError> {
        let txn = self.read()?;
        let keys = txn.open_table(JOB_KEYS)?;
        Ok(keys
            .get(key)?
            .map(|v| v.value())
            .filter(|(_, first_ms)| now_ms - first_ms < retention_ms)
            .map(|(id, _)| Uuid::from_u128(id)))
    }

    /// Jobs of `owner` (a plugin config) that may still run: scheduled, retrying, waiting or
    /// running.
    pub fn live_jobs_of(&self, owner: u64) -> Result<u64, StoreError> {
        let txn = self.read()?;
        Ok(txn
            .open_table(JOB_OWNER_COUNTS)?
            .get(owner)?
            .map_or(0, |n| n.value()))
    }

    /// Deletes dead and cancelled jobs last changed before `before_ms` (their retention is
    /// over); returns how many.
    pub fn purge_final_jobs(&self, before_ms: i64) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let removed = {
            let mut finals = txn.open_table(JOBS_FINAL)?;
            let mut jobs = txn.open_table(JOBS)?;
            let mut removed = 0;
            for row in finals.extract_from_if(..(before_ms, 0u128), |_, _| true)? {
                let (key, _) = row?;
                let (_, id) = key.value();
                jobs.remove(id)?;
                removed += 1;
            }
            removed
        };
        self.commit(txn)?;
        Ok(removed)
    }

    /// A job as it is now, if it is still kept.
    pub fn job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let txn = self.read()?;
        let jobs = txn.open_table(JOBS)?;
        let leased = txn.open_table(JOBS_LEASED)?;
        let Some(bytes) = jobs.get(id.as_u128())? else {
            return Ok(None);
        };
        let mut job: Job = decode_value("job", bytes.value())?;
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
            let mut job: Job = decode_value("job", bytes.value())?;
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
        let txn = self.write()?;
        let removed = {
            let mut keys = txn.open_table(JOB_KEYS)?;
            let mut removed = 0;
            for row in keys.extract_if(|_, (_, first_ms)| first_ms < before_ms)? {
                row?;
                removed += 1;
            }
            removed
        };
        self.commit(txn)?;
        Ok(removed)
    }
}
