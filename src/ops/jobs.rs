//! Job operations: list, show, enqueue a plugin's job, cancel, terminate, and retry a dead
//! letter (which wakes the workers, also those of a server in another process).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::plugins::team_config;
use super::{time_text, OpError, Ops};
use crate::jobs::{now_ms, JobQueue};
use crate::plugins::host::DEFAULT_JOB_ATTEMPTS;
use crate::store::{
    Control, Job, JobId, JobKind, JobState, JobStats, NewJob, PluginConfig, Store, TeamId,
};

/// Jobs listed when the operator does not say how many.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Most jobs one bulk enqueue takes (they are committed in one transaction and held in memory
/// until then).
pub const MAX_BULK_JOBS: usize = 100_000;

/// A job as the CLI and `/api/` show it.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    /// The plugin config it belongs to; none for the appliance's own jobs.
    pub plugin_config: Option<u64>,
    pub state: &'static str,
    pub attempts: u32,
    pub max_attempts: u32,
    pub run_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub waiting_on: u32,
    pub checkpoint: Option<String>,
    pub last_error: Option<String>,
    pub history: Vec<serde_json::Value>,
    pub payload: String,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> JobView {
        JobView {
            id: job.id.to_string(),
            kind: job.kind.label(),
            plugin_config: Some(job.kind.owner()).filter(|o| *o != 0),
            state: job.state.name(),
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            run_at: time_text(job.run_at_ms),
            created_at: time_text(job.created_ms),
            updated_at: time_text(job.updated_ms),
            waiting_on: job.waiting_on,
            checkpoint: job.checkpoint.clone(),
            last_error: job.last_error().map(str::to_owned),
            history: job
                .history
                .iter()
                .map(|a| serde_json::json!({"at": time_text(a.at_ms), "error": a.error}))
                .collect(),
            payload: job.payload.chars().take(2000).collect(),
        }
    }
}

/// A job an operator queues for a plugin.
#[derive(Clone, Debug)]
pub struct JobRequest {
    pub name: String,
    /// JSON text.
    pub payload: String,
    pub idempotency_key: Option<String>,
    pub delay_ms: u64,
    pub max_attempts: Option<u32>,
    /// Deadline of each attempt; 0 for the appliance's task deadline.
    pub timeout_ms: u64,
}

/// A job as `POST …/jobs` and `appliance jobs enqueue --from` take it: the payload is JSON
/// itself, not text; a misspelt field is refused rather than ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

impl From<JobSpec> for JobRequest {
    fn from(spec: JobSpec) -> JobRequest {
        JobRequest {
            name: spec.name,
            payload: spec.payload.to_string(),
            idempotency_key: spec.idempotency_key,
            delay_ms: spec.delay_ms,
            max_attempts: spec.max_attempts,
            timeout_ms: 0,
        }
    }
}

/// Most bytes of one bulk enqueue (the file, or the payloads of a list): all of it is held in
/// memory and committed in one transaction.
pub const MAX_BULK_BYTES: usize = 64 << 20;

/// Reads jobs given one JSON object per line (blank lines skipped), at most [`MAX_BULK_JOBS`]
/// and [`MAX_BULK_BYTES`]; an unreadable line is refused with its number, and no line is read
/// past what could be a job.
pub fn read_job_lines(mut input: impl std::io::BufRead) -> Result<Vec<JobRequest>, OpError> {
    use std::io::{BufRead, Read};
    let longest = crate::jobs::MAX_JOB_PAYLOAD_BYTES + 4096;
    let (mut jobs, mut total, mut line, mut n) = (Vec::new(), 0usize, Vec::new(), 0usize);
    loop {
        line.clear();
        n += 1;
        let read = (&mut input)
            .take(longest as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| OpError::Malformed(format!("line {n}: {e}")))?;
        if read == 0 {
            return Ok(jobs);
        }
        if line.len() > longest {
            return Err(OpError::Malformed(format!(
                "line {n} is longer than a job can be ({longest} bytes)"
            )));
        }
        total += line.len();
        if total > MAX_BULK_BYTES {
            return Err(OpError::Malformed(format!(
                "more than {MAX_BULK_BYTES} bytes of jobs: split the file"
            )));
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| OpError::Malformed(format!("line {n} is not UTF-8")))?;
        if text.trim().is_empty() {
            continue;
        }
        if jobs.len() == MAX_BULK_JOBS {
            return Err(OpError::Malformed(format!(
                "more than {MAX_BULK_JOBS} jobs: split the file"
            )));
        }
        let spec: JobSpec =
            serde_json::from_str(text).map_err(|e| OpError::Malformed(format!("line {n}: {e}")))?;
        jobs.push(JobRequest::from(spec));
    }
}

/// Reads a job id as operators type it.
pub fn parse_job_id(text: &str) -> Result<JobId, OpError> {
    text.trim()
        .parse::<Uuid>()
        .map_err(|_| OpError::Malformed(format!("{text:?} is not a job id")))
}

/// Reads a job state name as operators type it.
pub fn parse_job_state(text: &str) -> Result<JobState, OpError> {
    JobState::parse(text).ok_or_else(|| {
        OpError::Malformed(format!(
            "unknown state {text:?}: scheduled, waiting, running, retrying, dead or cancelled"
        ))
    })
}

impl Ops {
    /// Kept jobs (optionally only those in `state`) and the queue's counts.
    pub fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<(JobStats, Vec<JobView>), OpError> {
        let stats = self.store.job_stats()?;
        let jobs = self.store.list_jobs(state, limit)?;
        Ok((stats, jobs.iter().map(JobView::from).collect()))
    }

    pub fn show_job(&self, id: JobId) -> Result<JobView, OpError> {
        let job = self.store.job(id)?.ok_or_else(|| {
            OpError::NotFound(format!("no job {id} is kept (succeeded jobs are not kept)"))
        })?;
        Ok(JobView::from(&job))
    }

    /// Queues the plugin's job for the team's config, as an operator asks.
    pub fn enqueue_job(
        &self,
        team: TeamId,
        plugin: &str,
        request: JobRequest,
    ) -> Result<JobId, OpError> {
        self.enqueue_jobs(team, plugin, vec![request])?
            .into_iter()
            .next()
            .ok_or_else(|| OpError::Internal("the queue returned no job id".into()))
    }

    /// Queues the plugin's jobs for the team's config, all in one transaction: either every job
    /// is queued or none is. Answers their ids in order (a job whose idempotency key is already
    /// kept answers the kept job's id).
    pub fn enqueue_jobs(
        &self,
        team: TeamId,
        plugin: &str,
        requests: Vec<JobRequest>,
    ) -> Result<Vec<JobId>, OpError> {
        let (_, config) = team_config(&self.store, team, plugin)?;
        enqueue_for_config(&self.queue, &config, requests)
    }

    /// Asks a job to stop (see [`Control`]); returns its state after: cancelled at once, or
    /// running until it notices.
    pub fn control_job(&self, id: JobId, control: Control) -> Result<JobState, OpError> {
        Ok(self.store.control_job(id, control, now_ms())?)
    }

    /// An operator's action on a job by name: `cancel`, `terminate` or `retry`.
    pub fn act_on_job(&self, id: JobId, action: &str) -> Result<JobState, OpError> {
        match action {
            "cancel" => self.control_job(id, Control::Cancel),
            "terminate" => self.control_job(id, Control::Terminate),
            "retry" => self.retry_job(id),
            other => Err(OpError::NotFound(format!(
                "no job action {other:?}: cancel, terminate or retry"
            ))),
        }
    }

    /// Puts a dead or cancelled job back in the queue with fresh attempts, and wakes the workers.
    pub fn retry_job(&self, id: JobId) -> Result<JobState, OpError> {
        self.store.requeue_job(id, now_ms())?;
        self.queue.wake();
        Ok(JobState::Scheduled)
    }
}

/// The enabled config `config` of `team`, by id (PostHog's Celery `plugin_job` names configs so).
pub fn enabled_config(store: &Store, team: TeamId, config: u64) -> Result<PluginConfig, OpError> {
    store
        .list_plugin_configs()?
        .into_iter()
        .find(|c| c.id == config && c.team_id == team && c.enabled)
        .ok_or_else(|| {
            OpError::NotFound(format!("no enabled plugin config {config} of team {team}"))
        })
}

/// Queues `requests` for `config`, all in one transaction (see [`Ops::enqueue_jobs`]).
pub fn enqueue_for_config(
    queue: &JobQueue,
    config: &PluginConfig,
    requests: Vec<JobRequest>,
) -> Result<Vec<JobId>, OpError> {
    if requests.len() > MAX_BULK_JOBS {
        return Err(OpError::Malformed(format!(
            "{} jobs in one request; at most {MAX_BULK_JOBS}",
            requests.len()
        )));
    }
    let bytes: usize = requests.iter().map(|r| r.payload.len()).sum();
    if bytes > MAX_BULK_BYTES {
        return Err(OpError::Malformed(format!(
            "{bytes} bytes of payloads in one request; at most {MAX_BULK_BYTES}"
        )));
    }
    let now = now_ms();
    let mut jobs = Vec::with_capacity(requests.len());
    for (n, request) in requests.into_iter().enumerate() {
        crate::jobs::check_payload(&request.name, &request.payload).map_err(|e| {
            OpError::Malformed(match n {
                0 => e,
                n => format!("job {}: {e}", n + 1),
            })
        })?;
        jobs.push(NewJob {
            id: Uuid::now_v7(),
            kind: JobKind::Plugin {
                config: config.id,
                name: request.name,
            },
            payload: request.payload,
            run_at_ms: now.saturating_add(request.delay_ms.min(i64::MAX as u64) as i64),
            max_attempts: request
                .max_attempts
                .unwrap_or(DEFAULT_JOB_ATTEMPTS)
                .clamp(1, 100),
            timeout_ms: request.timeout_ms,
            idempotency_key: request
                .idempotency_key
                .map(|k| format!("{}:{k}", config.id)),
            after: Vec::new(),
        });
    }
    let count = jobs.len();
    let ids = queue.enqueue(jobs)?;
    if ids.len() != count {
        return Err(OpError::Internal(format!(
            "the queue answered {} ids for {count} jobs",
            ids.len()
        )));
    }
    Ok(ids)
}
