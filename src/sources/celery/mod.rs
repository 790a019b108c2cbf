//! The Celery-over-Redis source: PostHog's `process_event_with_plugins` tasks from the Redis
//! list `PLUGINS_CELERY_QUEUE` (Celery's Redis transport: the producer `LPUSH`es, a consumer
//! takes from the other end).
//!
//! Each message is moved atomically (`BLMOVE`/`LMOVE`) to a processing list of this source's
//! own, turned into a batch, made durable through the ingest writer, and only then removed from
//! the processing list. At start the processing list is worked off first: a message a crash
//! left there is taken again, and its uuid (the event's own, or derived from the task id) makes
//! the second delivery the same event. A message that cannot be read goes to a dead-letter list
//! with the reason.
//!
//! Owns: the connection, the lists, the loop. Must never: remove a message from the processing
//! list before its batch is durable, or take more than [`MAX_MESSAGES`] / [`MAX_BYTES`] at once.

mod message;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use crate::config::CelerySettings;
use crate::event::IngestBatch;
use crate::ingest::{IngestError, IngestHandle};
use crate::jobs::JobQueue;
use crate::ops::jobs::{enabled_config, enqueue_for_config, JobRequest};
use crate::ops::OpError;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError, Team};
pub use message::{decode, plugin_job, process_event, Task, TaskEvent, TaskJob, PROCESS_EVENT};

/// PostHog's task that asks a plugin config to run a job (from its app's plugin page).
pub const PLUGIN_JOB: &str = "posthog.tasks.plugins.plugin_job";

/// Messages taken in one round.
const MAX_MESSAGES: usize = 200;
/// Bytes of messages taken in one round (a round stops taking once past it).
const MAX_BYTES: usize = 16 << 20;
/// A message larger than this is not read: it goes to the dead letters.
const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Dead letters kept in Redis, newest first.
const DEAD_KEEP: isize = 10_000;
/// How long one `BLMOVE` waits for a message (short, so shutdown is seen).
const POLL: f64 = 1.0;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the ingest queue: {0}")]
    Ingest(#[from] IngestError),
    #[error("the state file: {0}")]
    Store(String),
}

pub struct CelerySource {
    pub settings: CelerySettings,
    pub store: Store,
    /// Where `plugin_job` tasks queue their jobs.
    pub jobs: JobQueue,
    pub ingest: IngestHandle,
    pub normalizer: super::Normalizer,
    pub room: super::RoomLimits,
}

/// What became of one taken message.
enum Outcome {
    Batch(IngestBatch),
    Job(TaskJob),
    Dead(String),
}

impl CelerySource {
    /// Consumes until shutdown begins; reconnects with backoff when Redis goes away.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut retry = super::Retry::default();
        let mut recovering = true;
        while !shutdown.is_draining() {
            let result = self.consume(&mut recovering, &mut shutdown).await;
            if shutdown.is_draining() {
                return;
            }
            if let Err(e) = result {
                retry.after("the Celery source", e, &mut shutdown).await;
            }
        }
    }

    async fn consume(
        &self,
        recovering: &mut bool,
        shutdown: &mut Shutdown,
    ) -> Result<(), SourceError> {
        let client = redis::Client::open(self.settings.redis_url.as_str())?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(
            Duration::from_secs_f64(POLL) + Duration::from_secs(10),
        ));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (processing, queue) = (self.settings.processing_list(), &self.settings.queue);
        while !shutdown.is_draining() {
            let taken = if *recovering {
                // What a crash left in the processing list, oldest first, before anything new.
                let left: Vec<Vec<u8>> = redis::cmd("LRANGE")
                    .arg(&processing)
                    .arg(-(MAX_MESSAGES as isize))
                    .arg(-1)
                    .query_async(&mut con)
                    .await?;
                if left.is_empty() {
                    *recovering = false;
                    continue;
                }
                tracing::warn!(
                    messages = left.len(),
                    "taking again Celery messages a stop left unfinished"
                );
                left.into_iter().rev().collect()
            } else {
                super::wait_for_room(&self.store, self.room, shutdown).await;
                self.take(&mut con, queue, &processing).await?
            };
            if taken.is_empty() {
                continue;
            }
            self.handle(&mut con, taken, shutdown).await?;
        }
        Ok(())
    }

    /// Moves up to a round's worth of messages to the processing list (waiting for the first);
    /// while the ingest queue is over its budget, nothing is taken.
    async fn take(
        &self,
        con: &mut MultiplexedConnection,
        queue: &str,
        processing: &str,
    ) -> Result<Vec<Vec<u8>>, SourceError> {
        let first: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(queue)
            .arg(processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(POLL)
            .query_async(con)
            .await?;
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let mut bytes = first.len();
        let mut taken = vec![first];
        while taken.len() < MAX_MESSAGES && bytes < MAX_BYTES {
            let next: Option<Vec<u8>> = redis::cmd("LMOVE")
                .arg(queue)
                .arg(processing)
                .arg("RIGHT")
                .arg("LEFT")
                .query_async(con)
                .await?;
            let Some(next) = next else { break };
            bytes += next.len();
            taken.push(next);
        }
        Ok(taken)
    }

    /// Makes the taken messages' events durable, sets aside those that cannot be read, then
    /// removes them all from the processing list.
    async fn handle(
        &self,
        con: &mut MultiplexedConnection,
        taken: Vec<Vec<u8>>,
        shutdown: &mut Shutdown,
    ) -> Result<(), SourceError> {
        let raws = Arc::new(taken);
        let outcomes = super::judge_all(
            raws.clone(),
            self.store.clone(),
            self.normalizer.clone(),
            outcome,
        )
        .await
        .map_err(SourceError::Store)?;
        let mut pending = Vec::new();
        let mut jobs = Vec::new();
        let mut dead = Vec::new();
        let dead_letter = |reason: String, raw: &[u8]| {
            tracing::warn!(reason = %reason, "a Celery message cannot be run; it goes to the dead letters");
            json!({"reason": reason, "at": Utc::now().to_rfc3339(),
                   "message": String::from_utf8_lossy(raw)})
            .to_string()
        };
        for (raw, outcome) in raws.iter().zip(outcomes) {
            match outcome {
                Outcome::Batch(batch) => pending.push(batch.encode()),
                Outcome::Job(job) => jobs.push((job, raw)),
                Outcome::Dead(reason) => dead.push(dead_letter(reason, raw)),
            }
        }
        super::submit_durably(&self.ingest, pending, shutdown).await?;
        for (job, raw) in jobs {
            if let Err(reason) = self.queue_job(job).await? {
                dead.push(dead_letter(reason, raw));
            }
        }
        crate::failpoint::hit("celery.before_ack");
        let mut pipe = redis::pipe();
        for letter in &dead {
            pipe.cmd("LPUSH")
                .arg(self.settings.dead_list())
                .arg(letter)
                .ignore();
        }
        if !dead.is_empty() {
            pipe.cmd("LTRIM")
                .arg(self.settings.dead_list())
                .arg(0)
                .arg(DEAD_KEEP - 1)
                .ignore();
        }
        for raw in raws.iter() {
            pipe.cmd("LREM")
                .arg(self.settings.processing_list())
                .arg(1)
                .arg(raw.as_slice())
                .ignore();
        }
        pipe.query_async::<()>(con).await?;
        Ok(())
    }
}

impl CelerySource {
    /// Queues a `plugin_job` task's job (durably; the task id is its idempotency key, so a task
    /// taken again queues nothing more). The inner error is why the task cannot be run; the
    /// outer one, a state file that failed (the message is then taken again).
    async fn queue_job(&self, job: TaskJob) -> Result<Result<(), String>, SourceError> {
        let (store, queue) = (self.store.clone(), self.jobs.clone());
        let queued = tokio::task::spawn_blocking(move || {
            let config = enabled_config(&store, job.team_id, job.config_id)?;
            let request = JobRequest {
                name: job.name,
                payload: job.payload,
                idempotency_key: Some(format!("celery:{}", job.task_id)),
                delay_ms: 0,
                max_attempts: None,
                timeout_ms: 0,
            };
            enqueue_for_config(&queue, &config, vec![request])
        })
        .await
        .map_err(|e| SourceError::Store(e.to_string()))?;
        match queued {
            Ok(_) => {
                self.jobs.wake();
                Ok(Ok(()))
            }
            Err(e @ (OpError::NotFound(_) | OpError::Malformed(_) | OpError::Invalid(_))) => {
                Ok(Err(e.to_string()))
            }
            Err(e) => Err(SourceError::Store(e.to_string())),
        }
    }
}

/// One message as a batch of one event, a job to queue, or the reason it is neither; fails only
/// when the state file cannot be read (the message is then taken again).
fn outcome(
    raw: &[u8],
    store: &Store,
    normalizer: &super::Normalizer,
) -> Result<Outcome, StoreError> {
    if raw.len() > MAX_MESSAGE_BYTES {
        return Ok(Outcome::Dead(format!(
            "the message is {} bytes, more than {MAX_MESSAGE_BYTES}",
            raw.len()
        )));
    }
    let task = match decode(raw) {
        Ok(task) => task,
        Err(reason) => return Ok(Outcome::Dead(reason)),
    };
    if task.name == PLUGIN_JOB {
        return Ok(match plugin_job(&task) {
            Ok(job) => Outcome::Job(job),
            Err(reason) => Outcome::Dead(reason),
        });
    }
    if task.name != PROCESS_EVENT {
        return Ok(Outcome::Dead(format!(
            "task {} is not one this source runs",
            task.name
        )));
    }
    let event = match process_event(&task) {
        Ok(event) => event,
        Err(reason) => return Ok(Outcome::Dead(reason)),
    };
    let team: Team = match store.team(event.team_id) {
        Ok(team) => team,
        Err(StoreError::NotFound(_)) => {
            return Ok(Outcome::Dead(format!("no team {}", event.team_id)))
        }
        Err(e) => return Err(e),
    };
    let arrival = super::Arrival {
        ip: event.ip,
        now: event.now,
        sent_at: event.sent_at,
        event: event.event,
    };
    Ok(match normalizer.batch(&team, arrival) {
        Ok(batch) => Outcome::Batch(batch),
        Err(reason) => Outcome::Dead(reason),
    })
}
