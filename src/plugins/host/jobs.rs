//! `jobs`: what a plugin queues. Outside a job the jobs are queued when the call ends, all in
//! one transaction; inside a running job they are follow-ups, queued only if the job succeeds,
//! in the same transaction as its completion. Either
//! way a call queues at most `PLUGIN_MAX_JOBS_PER_CALL`, a config has at most
//! `PLUGIN_MAX_QUEUED_JOBS` queued, an idempotency key already used (by a kept job or earlier in
//! the same call) answers that job's id, and `after` must name jobs that exist.

use super::super::runtime::bindings::appliance::plugin::jobs;
use super::{HostState, DEFAULT_JOB_ATTEMPTS};
use crate::store::{JobId, JobKind, NewJob};

impl HostState {
    /// Jobs this call has queued so far (committed when it ends).
    fn queued_this_call(&self) -> &[NewJob] {
        match &self.job {
            Some(running) => &running.follow_ups,
            None => &self.pending_jobs,
        }
    }

    /// The id an idempotency key already names, among this call's jobs or in the store.
    fn job_for_key(&self, key: &str) -> Result<Option<JobId>, String> {
        if let Some(job) = self
            .queued_this_call()
            .iter()
            .find(|j| j.idempotency_key.as_deref() == Some(key))
        {
            return Ok(Some(job.id));
        }
        let retention = self
            .scope
            .jobs
            .as_ref()
            .map_or(0, |q| q.settings.key_retention.as_millis() as i64);
        self.scope
            .store
            .job_for_key(key, crate::jobs::now_ms(), retention)
            .map_err(|e| format!("cannot look up the idempotency key: {e}"))
    }

    /// Checks that every `after` id names a kept job or one queued earlier in this call.
    fn check_after(&self, after: &[JobId]) -> Result<(), String> {
        for id in after {
            let queued_here = self.queued_this_call().iter().any(|j| j.id == *id);
            if queued_here {
                continue;
            }
            let kept = self
                .scope
                .store
                .job(*id)
                .map_err(|e| format!("cannot look up job {id}: {e}"))?;
            if kept.is_none() {
                return Err(format!(
                    "`after` names job {id}, which is not queued (succeeded jobs are not kept, so there is nothing to wait for)"
                ));
            }
        }
        Ok(())
    }

    fn enqueue_checked(
        &mut self,
        name: String,
        payload: String,
        options: jobs::Options,
    ) -> Result<String, String> {
        if !self.scope.job_names.is_empty() && !self.scope.job_names.contains(&name) {
            return Err(format!(
                "this plugin declares no job named {name:?} (it declares {})",
                self.scope.job_names.join(", ")
            ));
        }
        crate::jobs::check_payload(&name, &payload)?;
        let config = self.scope.config_id;
        // Keys are per plugin config: one plugin cannot collide with another's.
        let key = options.idempotency_key.map(|k| format!("{config}:{k}"));
        if let Some(key) = &key {
            if let Some(existing) = self.job_for_key(key)? {
                return Ok(existing.to_string());
            }
        }
        let quotas = self.scope.quotas.clone();
        let this_call = self.queued_this_call().len() as u64;
        if this_call >= quotas.max_jobs_per_call as u64 {
            return Err(format!(
                "this call has queued {} jobs, its limit (PLUGIN_MAX_JOBS_PER_CALL)",
                quotas.max_jobs_per_call
            ));
        }
        let live = self
            .scope
            .store
            .live_jobs_of(config)
            .map_err(|e| format!("cannot count this plugin config's jobs: {e}"))?;
        if live + this_call >= quotas.max_queued_jobs {
            return Err(format!(
                "this plugin config has {} jobs queued, its limit (PLUGIN_MAX_QUEUED_JOBS)",
                live + this_call
            ));
        }
        let now = crate::jobs::now_ms();
        let run_at_ms = match options.when {
            jobs::When::Now => now,
            jobs::When::AfterMs(ms) => now.saturating_add(ms.min(i64::MAX as u64) as i64),
            jobs::When::At(text) => chrono::DateTime::parse_from_rfc3339(&text)
                .map_err(|_| format!("{text:?} is not an RFC 3339 time"))?
                .timestamp_millis(),
        };
        let after = options
            .after
            .iter()
            .map(|id| {
                id.parse::<JobId>()
                    .map_err(|_| format!("{id:?} is not a job id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_after(&after)?;
        let job = NewJob {
            id: uuid::Uuid::now_v7(),
            kind: JobKind::Plugin { config, name },
            payload,
            run_at_ms,
            max_attempts: options
                .max_attempts
                .unwrap_or(DEFAULT_JOB_ATTEMPTS)
                .clamp(1, 100),
            timeout_ms: self.scope.job_timeout.as_millis() as u64,
            idempotency_key: key,
            after,
        };
        let id = job.id.to_string();
        match &mut self.job {
            Some(running) => running.follow_ups.push(job),
            None if self.scope.jobs.is_some() => self.pending_jobs.push(job),
            None => return Err("there is no job queue in this process".into()),
        }
        Ok(id)
    }
}

impl jobs::Host for HostState {
    fn enqueue(
        &mut self,
        name: String,
        payload: String,
        when: jobs::When,
    ) -> Result<String, String> {
        jobs::Host::enqueue_with(
            self,
            name,
            payload,
            jobs::Options {
                when,
                idempotency_key: None,
                max_attempts: None,
                after: Vec::new(),
            },
        )
    }

    fn enqueue_with(
        &mut self,
        name: String,
        payload: String,
        options: jobs::Options,
    ) -> Result<String, String> {
        let what = name.clone();
        self.enqueue_checked(name, payload, options)
            .inspect_err(|e| {
                self.log("error", format!("jobs.enqueue({what:?}) refused: {e}"));
            })
    }

    fn current(&mut self) -> Option<String> {
        self.job.as_ref().map(|j| j.id.to_string())
    }

    fn checkpoint(&mut self) -> Option<String> {
        self.job.as_ref().and_then(|j| j.checkpoint.clone())
    }

    fn save_checkpoint(&mut self, state: String) -> Result<(), String> {
        let Some(job) = &mut self.job else {
            return Err("no job is running".into());
        };
        if job.stop.cancelled() {
            return Err("the job was cancelled; stop now".into());
        }
        let max = self.scope.quotas.storage_max_value_bytes;
        if state.len() > max {
            return Err(format!(
                "the checkpoint is {} bytes, more than PLUGIN_STORAGE_MAX_VALUE_BYTES ({max})",
                state.len()
            ));
        }
        self.scope
            .store
            .save_job_checkpoint(job.id, &state, crate::jobs::now_ms())
            .map_err(|e| format!("cannot save the checkpoint: {e}"))?;
        job.checkpoint = Some(state);
        Ok(())
    }

    fn cancelled(&mut self) -> bool {
        self.job.as_ref().is_some_and(|j| j.stop.cancelled())
    }
}

/// Queues the jobs a call (outside a job) asked for, in one transaction; returns a log line if
/// that failed.
pub(super) fn commit(state: &mut HostState) -> Option<String> {
    let jobs = std::mem::take(&mut state.pending_jobs);
    if jobs.is_empty() {
        return None;
    }
    let queue = state.scope.jobs.as_ref()?;
    let count = jobs.len();
    queue
        .enqueue(jobs)
        .err()
        .map(|e| format!("the {count} jobs this call queued were lost: {e}"))
}
