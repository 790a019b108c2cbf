//! Jobs: the durable job queue's front ([`JobQueue`]) and the workers that run it ([`Workers`]).
//!
//! Owns: when a job runs and what happens after: claiming due jobs in batches (one redb
//! transaction finishes the attempts that ended and claims the next jobs), the slots
//! (`WORKER_CONCURRENCY` × `TASKS_PER_WORKER`) and the per-plugin-config limit, retries with
//! exponential backoff and jitter, dead letters, cancel and terminate requests (from this
//! process or from the CLI through the store), and leases: a job claimed by a server that died
//! runs again when the next server starts.
//! Must never: run a job's code on the async runtime (every attempt runs on a blocking thread,
//! so a slow job holds up nothing but its slot), or forget a job: a job leaves the store only by
//! succeeding.
//! What a job *does* is not known here: a [`Runner`] (the plugin runtime's) is handed each job.

mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

pub use crate::config::JobSettings;
use crate::store::{Control, ExportProgress, Job, JobId, JobKind, NewJob, Store, StoreError};
pub use workers::Workers;

const RETRY_MAX: Duration = Duration::from_secs(3600);

/// Largest payload of one job, from a plugin or an operator: a job carries what to do, not the
/// data it works on (each queued job is kept on disk until it ends).
pub const MAX_JOB_PAYLOAD_BYTES: usize = 1 << 20;

/// Refuses a payload past [`MAX_JOB_PAYLOAD_BYTES`] or one that is not JSON, naming the job.
pub fn check_payload(name: &str, payload: &str) -> Result<(), String> {
    if payload.len() > MAX_JOB_PAYLOAD_BYTES {
        return Err(format!(
            "the payload of job {name:?} is {} bytes; at most {MAX_JOB_PAYLOAD_BYTES}",
            payload.len()
        ));
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(payload).is_err() {
        return Err(format!("the payload of job {name:?} is not JSON"));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the queue's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// When the attempt after `attempts` failed ones should run: exponential backoff from
/// `settings.retry_base` with jitter (between half and all of the delay), so a burst of failures
/// does not retry in step.
pub fn retry_at_ms(settings: &JobSettings, attempts: u32, now_ms: i64) -> i64 {
    let exponent = attempts.saturating_sub(1).min(20);
    let delay = settings
        .retry_base
        .saturating_mul(1u32 << exponent)
        .min(RETRY_MAX);
    let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
    now_ms + jittered.as_millis() as i64
}

/// Enqueues jobs and wakes the workers. Cheap to clone.
#[derive(Clone)]
pub struct JobQueue {
    store: Store,
    wake: Arc<Notify>,
    /// Set in a process other than the server (the CLI): wake-ups go to the server on this data
    /// directory through its wake socket.
    remote: Option<std::path::PathBuf>,
    pub settings: JobSettings,
}

impl JobQueue {
    /// The queue of the server in this process.
    pub fn new(store: Store, settings: JobSettings) -> JobQueue {
        JobQueue {
            store,
            wake: Arc::new(Notify::new()),
            remote: None,
            settings,
        }
    }

    /// The queue as seen from another process (the CLI): wake-ups reach the server running on
    /// `data_dir`, if any.
    pub fn remote(store: Store, settings: JobSettings, data_dir: &std::path::Path) -> JobQueue {
        JobQueue {
            remote: Some(data_dir.to_owned()),
            ..JobQueue::new(store, settings)
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What the workers wait on; the server's wake socket notifies it too.
    pub fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Enqueues in one durable transaction; returns the jobs' ids.
    pub fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, StoreError> {
        let ids = self
            .store
            .enqueue_jobs(jobs, now_ms(), self.key_retention_ms())?;
        self.wake();
        Ok(ids)
    }

    /// Queues the pipeline's deliveries with the delivery mark and the deferred batches they
    /// complete, in one transaction (see [`Store::commit_deliveries`]).
    pub fn commit_deliveries(
        &self,
        jobs: Vec<NewJob>,
        done: crate::store::WriteDone<'_>,
    ) -> Result<Vec<JobId>, StoreError> {
        let any = !jobs.is_empty();
        let ids = self
            .store
            .commit_deliveries(jobs, now_ms(), self.key_retention_ms(), done)?;
        if any {
            self.wake();
        }
        Ok(ids)
    }

    /// Tells the workers to look at the queue now (jobs were queued or re-queued by other means).
    pub fn wake(&self) {
        self.wake.notify_one();
        if let Some(data_dir) = &self.remote {
            crate::wake::poke(data_dir);
        }
    }

    fn key_retention_ms(&self) -> i64 {
        self.settings.key_retention.as_millis() as i64
    }
}

/// Stop requests for one running job, shared with the code running it.
#[derive(Debug, Default)]
pub struct StopFlags {
    cancel: AtomicBool,
    terminate: AtomicBool,
}

impl StopFlags {
    /// Cancel was asked: stop at the next checkpoint.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    /// Terminate was asked: stop now.
    pub fn terminated(&self) -> bool {
        self.terminate.load(Ordering::Relaxed)
    }
    fn request(&self, control: Control) {
        self.cancel.store(true, Ordering::Relaxed);
        if control == Control::Terminate {
            self.terminate.store(true, Ordering::Relaxed);
        }
    }
}

/// Why an attempt did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Worth trying again (the job asked, or it trapped, timed out or could not start).
    #[error("{0}")]
    Retry(String),
    /// Will not succeed by trying again.
    #[error("{0}")]
    Failed(String),
}

/// What a successful attempt leaves behind, committed with the job's completion.
#[derive(Debug, Default)]
pub struct Done {
    pub follow_ups: Vec<NewJob>,
    pub export: Option<ExportProgress>,
}

/// Runs one attempt of a job, on a blocking thread.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, job: &Job, stop: &Arc<StopFlags>) -> Result<Done, RunError>;
}

/// The appliance's own jobs: only [`JobKind::Noop`]; anything else fails permanently.
pub struct InternalRunner;

impl Runner for InternalRunner {
    fn run(&self, job: &Job, _stop: &Arc<StopFlags>) -> Result<Done, RunError> {
        match job.kind {
            JobKind::Noop => Ok(Done::default()),
            _ => Err(RunError::Failed(format!(
                "no runner for {} jobs in this process",
                job.kind.label()
            ))),
        }
    }
}
