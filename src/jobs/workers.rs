//! The worker pool: long-lived slot threads that run claimed jobs, and the loop that finishes
//! attempts and claims the next jobs in one transaction, applies stop requests and recovers
//! from a failing store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{now_ms, retry_at_ms, JobQueue, JobSettings, RunError, Runner, StopFlags};
use crate::shutdown::Shutdown;
use crate::store::{Control, Job, JobId, JobKind, Outcome};

/// How long a cancelled job may take to notice before it is terminated.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// How often running jobs' stop requests are looked for in the store (the CLI writes them there).
const CONTROL_POLL: Duration = Duration::from_millis(200);
/// Most jobs claimed in one transaction.
const MAX_CLAIM: usize = 1024;
/// Jobs of one plugin config claimed ahead, as a multiple of what may run at once: a commit then
/// hands the slots enough of a busy config's jobs to keep them going until the next one, while
/// the pool still runs at most `JOBS_PER_PLUGIN_CONFIG` of them at a time.
const CLAIM_AHEAD: usize = 32;

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
/// arrive while the loop commits are recorded together in its next transaction. A slot takes
/// the first waiting job whose plugin config is below `JOBS_PER_PLUGIN_CONFIG` running jobs, so
/// jobs claimed ahead never raise how many of one config run at once.
struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
    /// Wakes the loop when attempts have ended (notifications coalesce).
    ended: Notify,
    /// Jobs of one plugin config that may run at once (internal jobs are not limited).
    per_owner: usize,
    slots: usize,
}

#[derive(Default)]
struct PoolState {
    waiting: VecDeque<(Job, Arc<StopFlags>)>,
    /// Running jobs per owner (plugin config).
    running: HashMap<u64, usize>,
    ended: Vec<Ended>,
    closing: bool,
}

impl PoolState {
    /// Takes the first waiting job its owner has room to run, and counts it as running.
    fn take_runnable(&mut self, per_owner: usize) -> Option<(Job, Arc<StopFlags>)> {
        let running = &self.running;
        let at = self.waiting.iter().position(|(job, _)| {
            let owner = job.kind.owner();
            owner == 0 || running.get(&owner).copied().unwrap_or(0) < per_owner
        })?;
        let next = self.waiting.remove(at)?;
        let owner = next.0.kind.owner();
        if owner != 0 {
            *self.running.entry(owner).or_default() += 1;
        }
        Some(next)
    }

    /// How many waiting jobs could start now, given what runs.
    fn startable(&self, per_owner: usize) -> usize {
        let mut running = self.running.clone();
        let mut startable = 0;
        for (job, _) in &self.waiting {
            let owner = job.kind.owner();
            if owner == 0 {
                startable += 1;
                continue;
            }
            let n = running.entry(owner).or_default();
            if *n < per_owner {
                *n += 1;
                startable += 1;
            }
        }
        startable
    }

    fn stopped_running(&mut self, owner: u64) {
        if let Some(n) = self.running.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&owner);
            }
        }
    }
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
            per_owner: settings.per_plugin_config.max(1),
            slots: slots.max(1),
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

    /// One slot: runs waiting jobs until the pool closes. A slot that ends a job takes the next
    /// itself, so the room its job freed is used without waking another; if it takes another
    /// config's job, it wakes one slot for the job its own may have let start.
    fn serve(&self, runner: &dyn Runner, settings: &JobSettings) {
        let mut freed: Option<u64> = None;
        loop {
            let (job, stop) = {
                let mut state = self.lock();
                loop {
                    if let Some(next) = state.take_runnable(self.per_owner) {
                        if freed.take().is_some_and(|o| o != next.0.kind.owner()) {
                            self.work.notify_one();
                        }
                        break next;
                    }
                    freed = None;
                    if state.closing {
                        return;
                    }
                    state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            let schedule = matches!(job.kind, JobKind::Schedule { .. });
            let started = std::time::Instant::now();
            let outcome = attempt(runner, &job, &stop, settings);
            record_attempt(&job.kind, started, &outcome);
            let mut state = self.lock();
            state.stopped_running(job.kind.owner());
            freed = Some(job.kind.owner());
            state.ended.push((job.id, schedule, outcome));
            drop(state);
            self.ended.notify_one();
        }
    }

    /// Queues claimed jobs and wakes as many slots as can start one now (not every slot: most
    /// of a busy config's jobs wait for its running ones, and a slot that ends a job takes the
    /// next itself).
    fn submit(&self, jobs: impl IntoIterator<Item = (Job, Arc<StopFlags>)>) {
        let mut state = self.lock();
        state.waiting.extend(jobs);
        let startable = state.startable(self.per_owner).min(self.slots);
        drop(state);
        for _ in 0..startable {
            self.work.notify_one();
        }
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
    pub async fn run(self, mut shutdown: Shutdown) {
        let settings = self.queue.settings;
        let store = self.queue.store.clone();
        let pool = match Pool::start(settings.slots, self.runner.clone(), settings) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the job slots; no jobs will run");
                return;
            }
        };
        let local_capacity = (settings.slots * 32).clamp(256, MAX_CLAIM);
        let mut held: HashMap<JobId, Held> = HashMap::new();
        let mut finished: Vec<(JobId, Outcome)> = Vec::new();
        let mut next_due: Option<i64> = Some(i64::MIN);
        let mut woken = true;
        let mut failing_since: Option<Instant> = None;
        let mut last_look = Instant::now();
        loop {
            let ended = std::mem::take(&mut pool.lock().ended);
            for (id, schedule, outcome) in ended {
                self.ended(&mut held, id, schedule, outcome, &mut finished);
            }
            let deadline = shutdown.deadline();
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
                let per_owner = settings.per_plugin_config.max(1) * CLAIM_AHEAD;
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
                settings.idle_poll
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
                _ = shutdown.changed() => {}
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
        }
        pool.close();
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

/// Counts an attempt by its kind and how it ended, and its duration.
fn record_attempt(kind: &JobKind, started: std::time::Instant, outcome: &Outcome) {
    use crate::telemetry::names;
    let kind = match kind {
        JobKind::Noop => "noop",
        JobKind::Plugin { .. } => "plugin",
        JobKind::Schedule { .. } => "schedule",
        JobKind::Deliver { .. } => "deliver",
        JobKind::ExportPage { .. } => "export",
    };
    let ended = match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Retry { .. } => "retry",
        Outcome::Failed { .. } => "failed",
        Outcome::Cancelled { .. } => "cancelled",
        Outcome::Released => "released",
        Outcome::Interrupted { .. } => "interrupted",
    };
    metrics::histogram!(names::JOB_RUN_SECONDS, "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(names::JOBS_FINISHED, "kind" => kind, "outcome" => ended).increment(1);
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
            retry_at_ms: retry_at_ms(settings, job.attempts + 1, now_ms()),
        },
        Err(RunError::Failed(error)) => Outcome::Failed { error },
    }
}
