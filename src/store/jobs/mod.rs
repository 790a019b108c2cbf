//! The durable job queue and the schedules' state: what a job is ([`Job`], [`JobKind`],
//! [`JobState`]), the rules of every transition ([`tables`]), the store's job operations
//! ([`queue`]) and the schedules' progress ([`schedules`]).
//!
//! A job is a record in `JOBS` plus exactly one place that says what happens to it next:
//! `JOBS_DUE` (waiting for its run-at time, indexed per owner so one plugin config's backlog
//! cannot hide another's jobs), `JOBS_LEASED` (claimed by the running server), or nothing (it
//! waits for parent jobs, or it is dead or cancelled and kept for inspection). Succeeded jobs
//! are deleted; their idempotency keys outlive them in `JOB_KEYS` for the retention window.
//! Every transition is one redb transaction, and a job's completion commits together with the
//! follow-up jobs it enqueued.

mod queue;
pub use queue::WriteDone;
pub(in crate::store) mod schedules;
pub(in crate::store) mod tables;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use super::exports::ExportProgress;
pub use crate::ids::JobId;
use crate::ids::PluginConfigId;
pub use schedules::ScheduleTables;
pub(super) use tables::create_tables;
pub use tables::JobTables;

/// Attempts remembered in a job's history.
const HISTORY_LEN: usize = 20;

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
    /// The server stopped while it ran (found at the next start): it runs again at
    /// `retry_at_ms`, no attempt counted.
    Interrupted {
        retry_at_ms: i64,
    },
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
