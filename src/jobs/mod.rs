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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pipeline::DrainSignal;
use crate::store::{
    Control, ExportProgress, Job, JobId, JobKind, NewJob, Outcome, Store, StoreError,
};

/// How long a cancelled job may take to notice before it is terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// How often running jobs' stop requests are looked for in the store (the CLI writes them there).
const CONTROL_POLL: Duration = Duration::from_millis(200);
/// Without a wake-up, the queue is looked at this often (jobs enqueued by another process).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often idempotency keys past their retention are forgotten.
const KEY_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Most jobs claimed in one transaction.
const MAX_CLAIM: usize = 1024;
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// Milliseconds since the Unix epoch, the queue's clock.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How the queue behaves; from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct JobSettings {
    /// Jobs that run at once.
    pub slots: usize,
    /// Jobs of one plugin config that may be claimed at once.
    pub per_plugin_config: usize,
    /// Delay before the first retry; doubled for each further one.
    pub retry_base: Duration,
    /// How long an idempotency key keeps deduplicating.
    pub key_retention: Duration,
}

impl JobSettings {
    /// When the attempt after `attempts` failed ones should run: exponential backoff with
    /// jitter (between half and all of the delay), so a burst of failures does not retry in step.
    pub fn retry_at_ms(&self, attempts: u32, now_ms: i64) -> i64 {
        let exponent = attempts.saturating_sub(1).min(20);
        let delay = self
            .retry_base
            .saturating_mul(1u32 << exponent)
            .min(RETRY_MAX);
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
        now_ms + jittered.as_millis() as i64
    }
}

/// Enqueues jobs and wakes the workers. Cheap to clone.
#[derive(Clone)]
pub struct JobQueue {
    store: Store,
    wake: Arc<Notify>,
    pub settings: JobSettings,
}

impl JobQueue {
    pub fn new(store: Store, settings: JobSettings) -> JobQueue {
        JobQueue {
            store,
            wake: Arc::new(Notify::new()),
            settings,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Enqueues in one durable transaction; returns the jobs' ids.
    pub fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, StoreError> {
        self.enqueue_marking(jobs, None)
    }

    /// [`JobQueue::enqueue`], recording in the same transaction that the pipeline's deliveries
    /// are queued through ingest position `delivered`.
    pub fn enqueue_marking(
        &self,
        jobs: Vec<NewJob>,
        delivered: Option<u64>,
    ) -> Result<Vec<JobId>, StoreError> {
        let ids =
            self.store
                .enqueue_jobs_marking(jobs, now_ms(), self.key_retention_ms(), delivered)?;
        self.wake.notify_one();
        Ok(ids)
    }

    /// Tells the workers to look at the queue now (jobs were queued by other means).
    pub fn wake(&self) {
        self.wake.notify_one();
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

/// A claimed job this process holds.
struct Held {
    owner: u64,
    stop: Arc<StopFlags>,
    cancel_asked: Option<Instant>,
}

/// A finished attempt: the job, whether it was a schedule's slot, and how it ended.
type Ended = (JobId, bool, Outcome);

/// The slots: long-lived threads that take claimed jobs from a shared local queue and report
/// back. Jobs flow without a round trip through the async loop per job, and completions that
/// arrive while the loop commits are recorded together in its next transaction.
struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
    /// Wakes the loop when attempts have ended (notifications coalesce).
    ended: Notify,
}

#[derive(Default)]
struct PoolState {
    waiting: VecDeque<(Job, Arc<StopFlags>)>,
    ended: Vec<Ended>,
    closing: bool,
}

impl Pool {
    fn start(
        slots: usize,
        runner: Arc<dyn Runner>,
        settings: JobSettings,
    ) -> std::io::Result<Arc<Pool>> {
        let pool = Arc::new(Pool {
            state: Mutex::default(),
            work: Condvar::new(),
            ended: Notify::new(),
        });
        for n in 0..slots.max(1) {
            let (pool, runner) = (pool.clone(), runner.clone());
            std::thread::Builder::new()
                .name(format!("job-slot-{n}"))
                .spawn(move || pool.serve(&*runner, &settings))?;
        }
        Ok(pool)
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One slot: runs waiting jobs until the pool closes.
    fn serve(&self, runner: &dyn Runner, settings: &JobSettings) {
        loop {
            let (job, stop) = {
                let mut state = self.lock();
                loop {
                    if let Some(next) = state.waiting.pop_front() {
                        break next;
                    }
                    if state.closing {
                        return;
                    }
                    state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            let schedule = matches!(job.kind, JobKind::Schedule { .. });
            let outcome = attempt(runner, &job, &stop, settings);
            self.lock().ended.push((job.id, schedule, outcome));
            self.ended.notify_one();
        }
    }

    fn submit(&self, jobs: impl IntoIterator<Item = (Job, Arc<StopFlags>)>) {
        let mut state = self.lock();
        state.waiting.extend(jobs);
        drop(state);
        self.work.notify_all();
    }

    fn close(&self) {
        self.lock().closing = true;
        self.work.notify_all();
    }
}

/// The worker pool: claims due jobs, runs them in its slots, records how they ended.
pub struct Workers {
    pub queue: JobQueue,
    pub runner: Arc<dyn Runner>,
    /// Told whenever a schedule's job ends, so the next slot is queued without waiting.
    pub schedule_done: Option<Arc<Notify>>,
}

impl Workers {
    /// Runs until drained: on the drain signal it stops claiming, hands back claimed jobs that
    /// have not started, and waits for running ones until the deadline (those still running then
    /// run again at the next start).
    pub async fn run(self, mut drain: DrainSignal) {
        let settings = self.queue.settings;
        let store = self.queue.store.clone();
        let pool = match Pool::start(settings.slots, self.runner.clone(), settings) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the job slots; no jobs will run");
                return;
            }
        };
        let local_capacity = (settings.slots * 8).clamp(64, MAX_CLAIM);
        let mut held: HashMap<JobId, Held> = HashMap::new();
        let mut finished: Vec<(JobId, Outcome)> = Vec::new();
        let mut next_due: Option<i64> = Some(i64::MIN);
        let mut woken = true;
        let mut failing_since: Option<Instant> = None;
        let mut last_look = Instant::now();
        // The first purge runs an interval after start-up, not during it.
        let mut last_purge = Instant::now();
        loop {
            let ended = std::mem::take(&mut pool.lock().ended);
            for (id, schedule, outcome) in ended {
                self.ended(&mut held, id, schedule, outcome, &mut finished);
            }
            let deadline = *drain.borrow();
            let stopping = deadline.is_some();
            if stopping {
                let released: Vec<(Job, Arc<StopFlags>)> = pool.lock().waiting.drain(..).collect();
                for (job, _) in released {
                    held.remove(&job.id);
                    finished.push((job.id, Outcome::Released));
                }
            }
            let room = if stopping {
                0
            } else {
                local_capacity.saturating_sub(held.len())
            };
            let due = woken || next_due.is_some_and(|t| t <= now_ms());
            if !finished.is_empty() || (room > 0 && due) {
                let mut leased: HashMap<u64, usize> = HashMap::new();
                for h in held.values() {
                    *leased.entry(h.owner).or_default() += 1;
                }
                let batch = std::mem::take(&mut finished);
                let retry_copy = batch.clone();
                let store = store.clone();
                let per_owner = settings.per_plugin_config;
                let retention = self.queue.key_retention_ms();
                let result = tokio::task::spawn_blocking(move || {
                    let room_of = |owner: u64| {
                        if owner == 0 {
                            usize::MAX
                        } else {
                            per_owner.saturating_sub(leased.get(&owner).copied().unwrap_or(0))
                        }
                    };
                    store.finish_and_claim(batch, now_ms(), retention, room, &room_of)
                })
                .await;
                match result {
                    Ok(Ok(claimed)) => {
                        failing_since = None;
                        woken = false;
                        next_due = claimed.next_due_ms;
                        let mut submitted = Vec::with_capacity(claimed.jobs.len());
                        for job in claimed.jobs {
                            let stop = Arc::<StopFlags>::default();
                            held.insert(
                                job.id,
                                Held {
                                    owner: job.kind.owner(),
                                    stop: stop.clone(),
                                    cancel_asked: None,
                                },
                            );
                            submitted.push((job, stop));
                        }
                        if !submitted.is_empty() {
                            pool.submit(submitted);
                        }
                    }
                    Ok(Err(e)) => {
                        finished = retry_copy;
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        tracing::error!(error = %e, failing_for_s = since.elapsed().as_secs(), "the job queue cannot commit; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => {
                        finished = retry_copy;
                        tracing::error!(error = %e, "the job queue's transaction task failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            if stopping && held.is_empty() && finished.is_empty() {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!(
                    running = held.len(),
                    "shutdown deadline reached with jobs running; they run again at the next start"
                );
                break;
            }
            let poll = if held.is_empty() {
                IDLE_POLL
            } else {
                CONTROL_POLL
            };
            let sleep_for = match next_due {
                Some(t) if room > 0 => {
                    Duration::from_millis((t - now_ms()).clamp(0, poll.as_millis() as i64) as u64)
                }
                _ => poll,
            };
            tokio::select! {
                _ = pool.ended.notified() => {}
                _ = self.queue.wake.notified() => woken = true,
                _ = drain.changed() => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
            // Looked at on a clock, not only when idle, so a busy pool still sees them.
            if last_look.elapsed() >= poll {
                last_look = Instant::now();
                if !held.is_empty() {
                    self.apply_stop_requests(&mut held, &pool, &mut finished)
                        .await;
                }
                // Another process (the CLI) may have enqueued: look, without writing.
                let store = store.clone();
                if let Ok(Ok(due)) = tokio::task::spawn_blocking(move || store.next_due_ms()).await
                {
                    next_due = due;
                }
            }
            if last_purge.elapsed() >= KEY_PURGE_INTERVAL {
                last_purge = Instant::now();
                self.purge_expired_keys().await;
            }
        }
        pool.close();
    }

    /// Forgets idempotency keys older than the retention window.
    async fn purge_expired_keys(&self) {
        let store = self.queue.store.clone();
        let before = now_ms() - self.queue.key_retention_ms();
        match tokio::task::spawn_blocking(move || store.purge_job_keys(before)).await {
            Ok(Ok(removed)) if removed > 0 => {
                tracing::debug!(removed, "expired idempotency keys forgotten")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot purge expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "cannot purge expired idempotency keys"),
        }
    }

    fn ended(
        &self,
        held: &mut HashMap<JobId, Held>,
        id: JobId,
        schedule: bool,
        outcome: Outcome,
        finished: &mut Vec<(JobId, Outcome)>,
    ) {
        held.remove(&id);
        finished.push((id, outcome));
        if schedule {
            if let Some(n) = &self.schedule_done {
                n.notify_one();
            }
        }
    }

    /// Reads stop requests from the store and passes them to the jobs they name; a claimed job
    /// that has not started is cancelled on the spot, and a cancelled job that has not stopped
    /// after [`CANCEL_GRACE`] is terminated.
    async fn apply_stop_requests(
        &self,
        held: &mut HashMap<JobId, Held>,
        pool: &Pool,
        finished: &mut Vec<(JobId, Outcome)>,
    ) {
        let store = self.queue.store.clone();
        let requests = match tokio::task::spawn_blocking(move || store.job_controls()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read job stop requests");
                return;
            }
            Err(_) => return,
        };
        for (id, control) in requests {
            let not_started = {
                let mut state = pool.lock();
                let position = state.waiting.iter().position(|(j, _)| j.id == id);
                position.and_then(|p| state.waiting.remove(p)).is_some()
            };
            if not_started {
                held.remove(&id);
                finished.push((
                    id,
                    Outcome::Cancelled {
                        reason: "cancelled before it started".into(),
                    },
                ));
                continue;
            }
            if let Some(h) = held.get_mut(&id) {
                if h.cancel_asked.is_none() {
                    h.cancel_asked = Some(Instant::now());
                }
                h.stop.request(control);
            }
        }
        for h in held.values() {
            if h.cancel_asked
                .is_some_and(|at| at.elapsed() >= CANCEL_GRACE)
            {
                h.stop.request(Control::Terminate);
            }
        }
    }
}

/// Runs one attempt and turns its result into what the queue records.
fn attempt(
    runner: &dyn Runner,
    job: &Job,
    stop: &Arc<StopFlags>,
    settings: &JobSettings,
) -> Outcome {
    let result = runner.run(job, stop);
    if stop.terminated() {
        return Outcome::Cancelled {
            reason: "terminated by the operator".into(),
        };
    }
    if stop.cancelled() {
        return Outcome::Cancelled {
            reason: "cancelled by the operator".into(),
        };
    }
    match result {
        Ok(done) => Outcome::Succeeded {
            follow_ups: done.follow_ups,
            export: done.export,
        },
        Err(RunError::Retry(error)) => Outcome::Retry {
            error,
            retry_at_ms: settings.retry_at_ms(job.attempts + 1, now_ms()),
        },
        Err(RunError::Failed(error)) => Outcome::Failed { error },
    }
}

/// A job as the CLI and `/api/` show it.
#[derive(Debug, serde::Serialize)]
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

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
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
