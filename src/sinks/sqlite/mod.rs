//! The embedded SQLite sink: one file, WAL, one writer connection, `synchronous=FULL`, and a
//! checkpointer thread with a connection of its own.
//!
//! Owns: the schema (`migrations/sqlite`, applied by refinery), the batch write with its queue
//! position in one transaction, copying the log into the file beside the writer, and reading
//! stored events back (exports, rebuilt deliveries).
//! Must never: commit rows without their position, or a position without its rows.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rusqlite::{params, Connection, OptionalExtension};

mod persons;

use super::{
    EventReader, Role, Sink, SinkError, SinkFuture, SinkWrite, StoredEvent, StoredRows, Written,
};
use crate::event::{timestamp_text, EventRow};
use crate::store::QueuedBatch;

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

const NAME: &str = "sqlite";
const FOLLOWER_KEY: &str = "sqlite:follow";
/// How often, at most, the checkpointer copies the write-ahead log into the file while the
/// writer commits: a page that many batches rewrite (the distinct-id index's) is copied once
/// per interval, not once per batch.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// The writer's own checkpoint: a log copied beside a writer that commits all the time is never
/// wholly copied when the writer starts its next transaction, so it is not started again from
/// its beginning; the writer's checkpoint past this much log (cheap, as the checkpointer has
/// copied most of it) lets it start again. Measured under full load, the log file stayed
/// within 340 MiB.
const CHECKPOINT_LOG_BYTES: i64 = 256 << 20;

pub struct SqliteSink {
    conn: Arc<Mutex<Connection>>,
    /// Tells the checkpointer that the writer committed.
    committed: SyncSender<()>,
    path: PathBuf,
    /// The name its position is kept under: the lead's is the ingest queue's, a follower's the
    /// follow log's.
    position_key: &'static str,
}

fn open_error(path: &Path, e: impl std::fmt::Display) -> SinkError {
    SinkError::Open {
        sink: NAME,
        target: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Opens the database file, creating its directory, and sets the pragmas the sink relies on.
fn connect(path: &Path) -> Result<Connection, SinkError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, e))?;
    }
    let conn = Connection::open(path).map_err(|e| open_error(path, e))?;
    // 16 KiB pages, set before anything is written, so only a new file takes them (an existing
    // file keeps its size until a VACUUM): a row with its person columns is about 2 KiB, and
    // with 4 KiB pages every second insert starts a page; measured, the insert cost about a
    // third more CPU. FULL: a committed batch survives power loss, which the queue trimmer
    // relies on. A large page cache and memory-mapped reads keep index look-ups out of read(2)
    // calls.
    conn.execute_batch(
        "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=10000; PRAGMA cache_size=-65536; PRAGMA mmap_size=1073741824;",
    )
    .map_err(|e| open_error(path, e))?;
    // The checkpointer copies the log beside the writer; the writer checkpoints itself only past
    // this much log (instead of SQLite's 1,000 pages). The setting counts pages, whose size
    // depends on the file.
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |row| row.get(0))
        .map_err(|e| open_error(path, e))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        CHECKPOINT_LOG_BYTES / page_size.max(512),
    )
    .map_err(|e| open_error(path, e))?;
    Ok(conn)
}

/// Applies the SQL migrations under `migrations/sqlite`; returns how many were applied now.
pub fn migrate(path: &Path) -> Result<usize, SinkError> {
    let mut conn = connect(path)?;
    apply_migrations(&mut conn)
}

fn apply_migrations(conn: &mut Connection) -> Result<usize, SinkError> {
    let report = embedded::migrations::runner()
        .run(conn)
        .map_err(|e| SinkError::Migrate {
            sink: NAME,
            detail: e.to_string(),
        })?;
    Ok(report.applied_migrations().len())
}

/// How an existing events database's schema stands against the migrations this build has.
#[derive(Debug, PartialEq, Eq)]
pub enum SchemaState {
    /// Every migration this build knows is applied.
    Current,
    /// Older: start-up (or `--migrate`) applies the rest.
    Behind { applied: u32, known: u32 },
    /// Written by a newer build: this one must not touch it.
    Ahead { applied: u32, known: u32 },
}

/// Reads an events database's applied migrations without changing anything.
pub fn schema_state(path: &Path) -> Result<SchemaState, String> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let applied: Option<i64> = conn
        .query_row(
            "SELECT max(version) FROM refinery_schema_history",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?
        .flatten();
    let applied = applied.unwrap_or(0) as u32;
    let known = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0) as u32;
    Ok(match applied.cmp(&known) {
        std::cmp::Ordering::Equal => SchemaState::Current,
        std::cmp::Ordering::Less => SchemaState::Behind { applied, known },
        std::cmp::Ordering::Greater => SchemaState::Ahead { applied, known },
    })
}

/// What a copy of the events database holds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct EventsSummary {
    /// The queue position the copy has stored everything through.
    pub sink_position: u64,
    pub events: u64,
    /// The last migration applied.
    pub migrations: u32,
}

/// Summarises a copy of the events database.
pub fn describe_copy(conn: &Connection) -> Result<EventsSummary, String> {
    let read = || -> rusqlite::Result<EventsSummary> {
        let position: Option<i64> = conn
            .query_row(
                "SELECT position FROM appliance_sink_position WHERE sink = ?1",
                [NAME],
                |row| row.get(0),
            )
            .optional()?;
        let events: i64 = conn.query_row("SELECT count(*) FROM posthog_event", [], |r| r.get(0))?;
        let migrations: Option<i64> = conn
            .query_row(
                "SELECT max(version) FROM refinery_schema_history",
                [],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        Ok(EventsSummary {
            sink_position: position.unwrap_or(0) as u64,
            events: events as u64,
            migrations: migrations.unwrap_or(0) as u32,
        })
    };
    read().map_err(|e| e.to_string())
}

impl SqliteSink {
    /// Opens (and migrates) the database as the lead sink.
    pub fn open(path: &Path) -> Result<SqliteSink, SinkError> {
        SqliteSink::open_as(path, Role::Lead)
    }

    pub fn open_as(path: &Path, role: Role) -> Result<SqliteSink, SinkError> {
        let mut conn = connect(path)?;
        apply_migrations(&mut conn)?;
        Ok(SqliteSink {
            conn: Arc::new(Mutex::new(conn)),
            committed: start_checkpointer(path)?,
            path: path.to_owned(),
            position_key: role.position_key(NAME, FOLLOWER_KEY),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` with the connection on the blocking pool.
    fn with_conn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> SinkFuture<'_, T> {
        let conn = self.conn.clone();
        Box::pin(async move {
            let fail = |detail: String| SinkError::Write { sink: NAME, detail };
            tokio::task::spawn_blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| fail("connection lock poisoned".into()))?;
                work(&mut guard).map_err(|e| match e.sqlite_error_code() {
                    // What SQLite refuses whatever the moment: a constraint, a value too big.
                    Some(
                        rusqlite::ErrorCode::ConstraintViolation
                        | rusqlite::ErrorCode::TooBig
                        | rusqlite::ErrorCode::TypeMismatch,
                    ) => SinkError::Refused {
                        sink: NAME,
                        detail: e.to_string(),
                    },
                    _ => fail(e.to_string()),
                })
            })
            .await
            .map_err(|e| fail(e.to_string()))?
        })
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn position(&self) -> SinkFuture<'_, u64> {
        let key = self.position_key;
        self.with_conn(move |conn| {
            let position: Option<i64> = conn
                .query_row(
                    "SELECT position FROM appliance_sink_position WHERE sink = ?1",
                    [key],
                    |row| row.get(0),
                )
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            Ok(position.unwrap_or(0) as u64)
        })
    }

    fn write(&self, write: SinkWrite, position: u64) -> SinkFuture<'_, Written> {
        let key = self.position_key;
        let committed = self.committed.clone();
        self.with_conn(move |conn| {
            let created_at = timestamp_text(Utc::now());
            let tx = conn.transaction()?;
            let mut written = Written::default();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO posthog_event (uuid, event, properties, elements_chain, timestamp, team_id, distinct_id, created_at, queue_position,
                        person_id, person_properties, person_created_at, person_mode)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT(team_id, uuid) DO UPDATE SET queue_position = excluded.queue_position
                     WHERE posthog_event.queue_position = excluded.queue_position",
                )?;
                let mut uuid_text = uuid::Uuid::encode_buffer();
                let mut person_text = uuid::Uuid::encode_buffer();
                let no_columns = Vec::new();
                // A row already stored by this batch (an earlier, partial attempt: the halves of
                // a refused write) counts as this write's; a key twice in one write, once.
                let mut keys = std::collections::HashSet::new();
                for (index, queued) in write.batches.iter().enumerate() {
                    let batch = &queued.batch;
                    let columns = write.columns.get(index).unwrap_or(&no_columns);
                    let mut inserted = Vec::with_capacity(batch.events.len());
                    for (at, e) in batch.events.iter().enumerate() {
                        if !keys.insert((batch.team_id, e.uuid)) {
                            inserted.push(false);
                            continue;
                        }
                        let person = columns.get(at);
                        let changed = insert.execute(params![
                            &*e.uuid.hyphenated().encode_lower(&mut uuid_text),
                            e.event,
                            e.properties,
                            e.elements_chain,
                            timestamp_text(e.timestamp),
                            batch.team_id as i64,
                            e.distinct_id,
                            created_at,
                            queued.seq as i64,
                            person.map(|p| &*p.person_id.hyphenated().encode_lower(&mut person_text)),
                            person.map_or("{}", |p| &*p.person_properties),
                            person.map(|p| timestamp_text(p.person_created_at)),
                            person.map_or("full", |p| p.person_mode.as_str()),
                        ])?;
                        inserted.push(changed == 1);
                    }
                    written.inserted.push(inserted);
                }
                persons::write(&tx, &write.persons)?;
                tx.execute(
                    "INSERT INTO appliance_sink_position (sink, position) VALUES (?1, ?2)
                     ON CONFLICT(sink) DO UPDATE SET position = MAX(position, excluded.position)",
                    params![key, position as i64],
                )?;
            }
            tx.commit()?;
            // Full: a wake-up is waiting already.
            let _ = committed.try_send(());
            Ok(written)
        })
    }

    fn stored_rows(&self, batches: Arc<Vec<QueuedBatch>>) -> SinkFuture<'_, StoredRows> {
        self.with_conn(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT event, distinct_id, properties, timestamp, elements_chain
                 FROM posthog_event WHERE team_id = ?1 AND uuid = ?2 AND queue_position = ?3",
            )?;
            let mut uuid_text = uuid::Uuid::encode_buffer();
            let mut out = Vec::with_capacity(batches.len());
            for queued in batches.iter() {
                let mut rows = Vec::with_capacity(queued.batch.events.len());
                for e in &queued.batch.events {
                    let uuid = &*e.uuid.hyphenated().encode_lower(&mut uuid_text);
                    let params = params![queued.batch.team_id as i64, uuid, queued.seq as i64];
                    let row = select
                        .query_row(params, |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, String>(3)?,
                                r.get::<_, String>(4)?,
                            ))
                        })
                        .optional()?;
                    rows.push(
                        row.map(|(event, distinct_id, properties, time, elements_chain)| {
                            EventRow {
                                uuid: e.uuid,
                                event,
                                distinct_id,
                                properties,
                                // Stored by this sink in its own fixed format; the queued time is the
                                // same instant should the text ever not parse.
                                timestamp: chrono::DateTime::parse_from_rfc3339(&time)
                                    .map(|t| t.with_timezone(&Utc))
                                    .unwrap_or(e.timestamp),
                                elements_chain,
                            }
                        }),
                    );
                }
                out.push(rows);
            }
            Ok(out)
        })
    }
}

/// Starts the thread that copies the write-ahead log into the database file while the writer
/// goes on writing, so a commit never waits for a checkpoint of its own (the copy costs about
/// as much as the writing, and on a small box the other core is often idle). It checkpoints
/// after a commit, at most once per [`CHECKPOINT_INTERVAL`], `PASSIVE` (never waiting for the
/// writer), and ends when the sink is dropped. Answers the sender the writer wakes it with.
fn start_checkpointer(path: &Path) -> Result<SyncSender<()>, SinkError> {
    let conn = connect(path)?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut last = Instant::now();
            while woken.recv().is_ok() {
                let due = last + CHECKPOINT_INTERVAL;
                while let Some(left) = due.checked_duration_since(Instant::now()) {
                    if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(left) {
                        return;
                    }
                }
                if let Err(e) = checkpoint(&conn) {
                    tracing::warn!(file = %shown, error = %e, "checkpointing the events database failed; the writer checkpoints past its limit");
                }
                last = Instant::now();
            }
        })
        .map_err(|e| open_error(path, e))?;
    Ok(wake)
}

/// One checkpoint beside the writer: `PASSIVE`, copying the log as it stands without waiting
/// for the writer. (Not `RESTART`, which would reset the log: measured, it waits for a writer
/// that commits all the time while the log grows, and then holds the writer back.)
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

impl SqliteSink {
    /// A read-only connection of its own, so export reads never wait for the writer's lock.
    fn reader(&self) -> Result<Connection, SinkError> {
        let conn =
            Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| read_error(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| read_error(e.to_string()))?;
        Ok(conn)
    }
}

fn read_error(detail: String) -> SinkError {
    SinkError::Read { sink: NAME, detail }
}

impl EventReader for SqliteSink {
    fn count_events(&self, team: u64, from: &str, to: &str) -> Result<u64, SinkError> {
        let count: i64 = self
            .reader()?
            .query_row(
                "SELECT count(*) FROM posthog_event
                 WHERE team_id = ?1 AND timestamp >= ?2 AND timestamp < ?3",
                params![team as i64, from, to],
                |row| row.get(0),
            )
            .map_err(|e| read_error(e.to_string()))?;
        Ok(count as u64)
    }

    fn read_events(
        &self,
        team: u64,
        range: (&str, &str),
        after: Option<&(String, i64)>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, SinkError> {
        let conn = self.reader()?;
        let (after_time, after_id) = after.cloned().unwrap_or_default();
        let mut statement = conn
            .prepare_cached(
                "SELECT id, uuid, event, distinct_id, team_id, timestamp, properties, elements_chain
                 FROM posthog_event
                 WHERE team_id = ?1 AND timestamp >= ?2 AND timestamp < ?3
                   AND (timestamp > ?4 OR (timestamp = ?4 AND id > ?5))
                 ORDER BY timestamp, id
                 LIMIT ?6",
            )
            .map_err(|e| read_error(e.to_string()))?;
        let rows = statement
            .query_map(
                params![team as i64, range.0, range.1, after_time, after_id, limit],
                stored_event,
            )
            .map_err(|e| read_error(e.to_string()))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| read_error(e.to_string()))
    }

    fn latest_events(&self, team: u64, limit: u32) -> Result<Vec<StoredEvent>, SinkError> {
        let conn = self.reader()?;
        let mut statement = conn
            .prepare_cached(
                "SELECT id, uuid, event, distinct_id, team_id, timestamp, properties, elements_chain
                 FROM posthog_event WHERE team_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| read_error(e.to_string()))?;
        let rows = statement
            .query_map(params![team as i64, limit], stored_event)
            .map_err(|e| read_error(e.to_string()))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| read_error(e.to_string()))
    }
}

/// A row of the columns both readers select, in their order.
fn stored_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        row_id: row.get(0)?,
        uuid: row.get(1)?,
        event: row.get(2)?,
        distinct_id: row.get(3)?,
        team_id: row.get::<_, i64>(4)? as u64,
        timestamp: row.get(5)?,
        properties: row.get(6)?,
        elements_chain: row.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> i64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_file_takes_16_kib_pages_and_the_writer_checkpoints_past_256_mib_of_log() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("events.sqlite3")).unwrap();
        assert_eq!(pragma(&conn, "page_size"), 16384);
        assert_eq!(pragma(&conn, "wal_autocheckpoint"), 16384);
    }

    #[test]
    fn an_existing_file_keeps_its_pages_and_still_checkpoints_past_256_mib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite3");
        let old = Connection::open(&path).unwrap();
        old.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=WAL; CREATE TABLE t (x);")
            .unwrap();
        drop(old);
        let conn = connect(&path).unwrap();
        assert_eq!(pragma(&conn, "page_size"), 4096);
        assert_eq!(pragma(&conn, "wal_autocheckpoint"), 65536);
    }

    /// Two thousand events of 1 KiB at queue position `seq`: a few MiB of log, far below the
    /// writer's own limit.
    fn events_of_a_kib(seq: u64) -> SinkWrite {
        let properties = format!("{{\"padding\":\"{}\"}}", "x".repeat(1024));
        let events = (0..2_000u128)
            .map(|n| EventRow {
                uuid: uuid::Uuid::from_u128(u128::from(seq) * 10_000 + n),
                event: "$pageview".into(),
                distinct_id: format!("user-{n}"),
                properties: properties.clone(),
                timestamp: Utc::now(),
                elements_chain: String::new(),
            })
            .collect();
        SinkWrite {
            batches: Arc::new(vec![QueuedBatch {
                seq,
                batch: crate::event::IngestBatch {
                    team_id: 1,
                    received_at: Utc::now(),
                    sent_at: None,
                    ip: None,
                    events,
                },
            }]),
            columns: Arc::new(Vec::new()),
            persons: Arc::new(crate::person::PersonUpdates::default()),
        }
    }

    #[tokio::test]
    async fn the_log_is_copied_into_the_file_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite3");
        let sink = SqliteSink::open(&path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let written = sink.write(events_of_a_kib(1), 1).await.unwrap();
        assert_eq!(written.count(), 2_000);
        // The rows went to the log; the writer leaves a log this small to the checkpointer,
        // which copies it within its interval (the file grows by the rows' pages).
        let deadline = Instant::now() + CHECKPOINT_INTERVAL * 10;
        loop {
            let size = std::fs::metadata(&path).unwrap().len();
            if size > before + (2 << 20) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the database file stayed at {size} bytes (from {before}): the log was not checkpointed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // And the writer goes on after it: the next batch is stored as well.
        let next = sink.write(events_of_a_kib(2), 2).await.unwrap();
        assert_eq!(next.count(), 2_000);
        assert_eq!(sink.position().await.unwrap(), 2);
    }
}
