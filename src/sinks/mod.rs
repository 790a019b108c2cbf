//! Sinks: where processed events are stored. SQLite is built in and the default; Postgres and
//! ClickHouse join behind the same trait.
//!
//! Owns: the [`Sink`] contract and each implementation's schema, connection and batch write.
//! Must never: acknowledge a batch it has not durably committed, or store an event twice: every
//! write is idempotent on the event's (team, uuid) and records, in the same transaction where the
//! store is transactional, the queue position it has reached.

pub mod clickhouse;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::{SinkKind, SinkSettings};
use crate::event::EventRow;
use crate::person::{PersonColumns, PersonUpdates, SharedState, SharedWanted};
use crate::store::{QueuedBatch, Store};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: cannot open {target}: {detail}")]
    Open {
        sink: &'static str,
        target: String,
        detail: String,
    },
    #[error("{sink}: migration failed: {detail}")]
    Migrate { sink: &'static str, detail: String },
    #[error("{sink}: write failed: {detail}")]
    Write { sink: &'static str, detail: String },
    /// The sink refuses what was written (a value out of its type's range, a constraint it
    /// violates): trying again cannot help; the pipeline finds the event and sets it aside.
    #[error("{sink} refuses the data: {detail}")]
    Refused { sink: &'static str, detail: String },
    #[error("{sink}: read failed: {detail}")]
    Read { sink: &'static str, detail: String },
    /// The sink's position belongs to another appliance (two boxes given one `NODE_ID`):
    /// writing would skip the other's events, so nothing is written.
    #[error("{sink}: {detail}")]
    Taken { sink: &'static str, detail: String },
    /// A person store shared by several boxes holds persons another box changed after this
    /// write's person step read them: nothing was written, and the step is to be made again over
    /// what the store holds now.
    #[error("{sink}: {detail}")]
    Conflict { sink: &'static str, detail: String },
}

/// How both SQL sinks upsert a person: a row already at a newer version (a replay) is left
/// alone.
pub(crate) const PERSON_UPSERT: &str = "ON CONFLICT (team_id, uuid) DO UPDATE SET
    created_at = excluded.created_at,
    properties_last_updated_at = excluded.properties_last_updated_at,
    properties_last_operation = excluded.properties_last_operation,
    properties = excluded.properties,
    is_identified = excluded.is_identified,
    version = excluded.version
    WHERE excluded.version >= coalesce(posthog_person.version, 0)";

/// A stored event read back (for historical exports).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// The sink's own row id: with the timestamp, the position of a page.
    pub row_id: i64,
    pub uuid: String,
    pub event: String,
    pub distinct_id: String,
    pub team_id: u64,
    /// As stored: RFC 3339 UTC with microseconds, so text order is time order.
    pub timestamp: String,
    pub properties: String,
    pub elements_chain: String,
}

/// Reads stored events back in (timestamp, row id) order. Called from blocking threads.
pub trait EventReader: Send + Sync {
    /// Events of `team` with `from <= timestamp < to` (timestamps as stored text).
    fn count_events(&self, team: u64, from: &str, to: &str) -> Result<u64, SinkError>;
    /// Up to `limit` of those events after `after` (timestamp, row id).
    fn read_events(
        &self,
        team: u64,
        range: (&str, &str),
        after: Option<&(String, i64)>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, SinkError>;
    /// The `limit` events of `team` stored last, newest first (the admin page's live tail).
    fn latest_events(&self, team: u64, limit: u32) -> Result<Vec<StoredEvent>, SinkError>;
}

pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// A store of events that the pipeline writes to in batches.
pub trait Sink: Send + Sync {
    fn name(&self) -> &'static str;

    /// The last ingest-queue position this sink has durably committed (0 if none).
    fn position(&self) -> SinkFuture<'_, u64>;

    /// Writes the events of `write` with their person columns, and its persons, distinct ids
    /// and groups, and records `position` as reached, atomically where the store allows.
    /// Events whose (team, uuid) is already stored are skipped; the answer says which events
    /// this write inserted.
    fn write(&self, write: SinkWrite, position: u64) -> SinkFuture<'_, Written>;

    /// For each event of `batches`, the row as stored, if the batch's own write inserted it
    /// (after a crash, the deliveries of a stored batch are rebuilt from these).
    fn stored_rows(&self, batches: Arc<Vec<QueuedBatch>>) -> SinkFuture<'_, StoredRows>;

    /// The end of a write that began and may not have finished (a sink without transactions
    /// recognises a retried write only when it holds exactly the same events): the next write
    /// must end there. `None` for a transactional sink.
    fn unfinished_write(&self) -> SinkFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }

    /// What this sink holds of `wanted` (persons with every distinct id pointing at them, the
    /// teams' group types, groups), when boxes share it as their person store
    /// (`SHARED_PERSONS`); a sink that cannot be one holds nothing.
    fn shared_state(&self, wanted: Arc<SharedWanted>) -> SinkFuture<'_, SharedState> {
        let _ = wanted;
        Box::pin(async { Ok(SharedState::default()) })
    }

    /// Whether writing events it already holds stores nothing twice (its rows are unique by
    /// (team, uuid)). A sink without that (ClickHouse) is never sent an event twice on purpose.
    fn deduplicates_by_key(&self) -> bool {
        true
    }

    /// The least time between two writes that are not full (a sink that prefers few large
    /// writes waits to gather more).
    fn min_write_interval(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// One write: processed batches, each event's person columns, and the person changes.
#[derive(Clone, Debug, Default)]
pub struct SinkWrite {
    pub batches: Arc<Vec<QueuedBatch>>,
    /// For each batch, each event's person columns.
    pub columns: Arc<Vec<Vec<PersonColumns>>>,
    pub persons: Arc<PersonUpdates>,
}

/// Which events of each written batch were inserted (false: the sink already held that event).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    pub inserted: Vec<Vec<bool>>,
}

impl Written {
    pub fn count(&self) -> usize {
        self.inserted.iter().flatten().filter(|i| **i).count()
    }
}

/// For each batch, each event's stored row if that batch inserted it.
pub type StoredRows = Vec<Vec<Option<EventRow>>>;

/// A sink's place in the configuration: the first in `SINKS` leads (the pipeline writes to it
/// and follows its answers), the others follow (they copy the follow log of the lead's writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Lead,
    Follower,
}

impl Role {
    /// The name a sink keeps its position under: a lead's is a position in the ingest queue, a
    /// follower's one in the follow log, so a database never mistakes one for the other.
    fn position_key(self, lead: &'static str, follower: &'static str) -> &'static str {
        match self {
            Role::Lead => lead,
            Role::Follower => follower,
        }
    }
}

/// An opened sink, with where it writes (for the start-up log; no password).
pub struct OpenedSink {
    pub sink: Arc<dyn Sink>,
    /// How its events are read back; `None` for a sink that only follows.
    pub events: Option<Arc<dyn EventReader>>,
    pub target: String,
}

/// The configured sinks: the lead, whose events the appliance reads back, and the followers.
pub struct OpenedSinks {
    pub lead: OpenedSink,
    /// The lead's reader (every sink that can lead reads back).
    pub events: Arc<dyn EventReader>,
    pub followers: Vec<OpenedSink>,
}

/// Opens the configured sinks. SQLite is opened and migrated now; Postgres connects (and
/// migrates) on first use, so that a server that is still starting is waited for, not fatal.
/// Must be called inside the runtime.
pub fn open(
    settings: &SinkSettings,
    sqlite_path: &Path,
    store: &Store,
) -> Result<OpenedSinks, SinkError> {
    let mut opened = Vec::with_capacity(settings.kinds.len());
    for (index, kind) in settings.kinds.iter().enumerate() {
        let role = if index == 0 {
            Role::Lead
        } else {
            Role::Follower
        };
        opened.push(open_one(*kind, role, settings, sqlite_path, store)?);
    }
    let mut opened = opened.into_iter();
    let lead = match opened.next() {
        Some(lead) => lead,
        None => open_one(SinkKind::Sqlite, Role::Lead, settings, sqlite_path, store)?,
    };
    let events = lead.events.clone().ok_or_else(|| SinkError::Open {
        sink: lead.sink.name(),
        target: lead.target.clone(),
        detail: "this sink cannot lead: it cannot read its events back".into(),
    })?;
    Ok(OpenedSinks {
        lead,
        events,
        followers: opened.collect(),
    })
}

fn open_one(
    kind: SinkKind,
    role: Role,
    settings: &SinkSettings,
    sqlite_path: &Path,
    store: &Store,
) -> Result<OpenedSink, SinkError> {
    match kind {
        SinkKind::Sqlite => {
            let sink = Arc::new(sqlite::SqliteSink::open_as(sqlite_path, role)?);
            Ok(OpenedSink {
                sink: sink.clone(),
                events: Some(sink),
                target: sqlite_path.display().to_string(),
            })
        }
        SinkKind::ClickHouse => {
            let sink = clickhouse::ClickHouseSink::open(&settings.clickhouse, store.clone(), role)?;
            Ok(OpenedSink {
                target: sink.target().to_owned(),
                sink: Arc::new(sink),
                events: None,
            })
        }
        SinkKind::Postgres => {
            let url = settings.postgres_url.as_deref().unwrap_or_default();
            let target =
                postgres::PostgresTarget::parse(url).map_err(|detail| SinkError::Open {
                    sink: "postgres",
                    target: crate::config::redact_url(url),
                    detail,
                })?;
            let state = store.state_id().map_err(|e| SinkError::Open {
                sink: "postgres",
                target: target.redacted(),
                detail: format!("the state file's id: {e}"),
            })?;
            let sink = Arc::new(
                postgres::PostgresSink::open(&target, role, settings.node.as_deref(), state)?
                    .with_shared_persons(role == Role::Lead && settings.shared_persons),
            );
            Ok(OpenedSink {
                target: sink.target().to_owned(),
                sink: sink.clone(),
                events: Some(sink),
            })
        }
    }
}
