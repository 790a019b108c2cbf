//! The Postgres sink: PostHog's Postgres tables in a database the operator runs
//! (`DATABASE_URL`), written through a small connection pool.
//!
//! Owns: the schema (`migrations/postgres`, applied by refinery on the first connection), the
//! batch write (an `INSERT … SELECT FROM unnest(…)` with every column bound as an array, made
//! again with `ON CONFLICT (team_id, uuid)` only when a key is already there; the persons and
//! the position in the same transaction), and reading stored events back (exports, rebuilt
//! deliveries).
//! Must never: commit rows without their position, or a position without its rows; wait on the
//! server without a deadline (a stalled server is an error the pipeline retries, not a hang).

mod connect;
mod persons;
mod read;
mod shared;
mod text;
mod tls;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{Role, Sink, SinkError, SinkFuture, SinkWrite, StoredRows, Written};
use crate::event::EventRow;
use crate::person::{SharedState, SharedWanted};
use crate::store::QueuedBatch;
pub use connect::{pool, PostgresTarget};
use text::{json_safe, text_safe};

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

const NAME: &str = "postgres";
const FOLLOWER_KEY: &str = "postgres:follow";

/// The longest one request to the server may take before it counts as failed (and is retried
/// by the pipeline with backoff): a stalled server must not stall the appliance unnoticed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

pub struct PostgresSink {
    pool: Pool,
    /// Where the sink writes, without the password (for messages).
    target: String,
    /// Set once the migrations have been applied on this run.
    migrated: OnceCell<()>,
    /// The runtime the blocking readers ([`super::EventReader`]) run their queries on.
    runtime: tokio::runtime::Handle,
    /// The name its position is kept under (see [`Role`]), with `NODE_ID` when set.
    position_key: String,
    /// The state file whose queue the position counts in ([`crate::store::Store::state_id`]).
    state: Uuid,
    /// Whether boxes share their persons here (`SHARED_PERSONS`): a person, distinct id or
    /// deletion is then written only over the version its step read ([`SinkError::Conflict`]).
    shared_persons: bool,
}

/// An error with its causes: tokio-postgres and the pool put the server's words ("duplicate
/// key…", "invalid peer certificate…") in the source, not in the message.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

fn write_error(e: impl std::error::Error + 'static) -> SinkError {
    SinkError::Write {
        sink: NAME,
        detail: describe(&e),
    }
}

/// A failed statement of a write: refused when the server says the data is at fault (SQLSTATE
/// class 22, data exception, or 23, integrity constraint violation), else a write error to retry.
fn statement_error(e: tokio_postgres::Error) -> SinkError {
    let class = e.code().map(|c| &c.code()[..2]);
    if matches!(class, Some("22" | "23")) {
        SinkError::Refused {
            sink: NAME,
            detail: describe(&e),
        }
    } else {
        write_error(e)
    }
}

fn read_error(e: impl std::error::Error + 'static) -> SinkError {
    SinkError::Read {
        sink: NAME,
        detail: describe(&e),
    }
}

/// Applies the SQL migrations under `migrations/postgres`; returns how many were applied now.
pub async fn migrate(target: &PostgresTarget) -> Result<usize, SinkError> {
    let sink = PostgresSink::open(target, Role::Lead, None, Uuid::nil())?;
    sink.apply_migrations().await
}

impl PostgresSink {
    /// Builds the pool; connects only when first used, so a server that is down at start-up is
    /// retried by the pipeline like one that goes down later. Must be called inside the runtime.
    /// Its position is kept under `node` (`NODE_ID`) when given, for the state file `state`.
    pub fn open(
        target: &PostgresTarget,
        role: Role,
        node: Option<&str>,
        state: Uuid,
    ) -> Result<PostgresSink, SinkError> {
        let key = role.position_key(NAME, FOLLOWER_KEY);
        Ok(PostgresSink {
            pool: connect::pool(target)?,
            target: target.redacted(),
            migrated: OnceCell::new(),
            runtime: tokio::runtime::Handle::current(),
            position_key: match node {
                Some(node) => format!("{key}@{node}"),
                None => key.to_owned(),
            },
            state,
            shared_persons: false,
        })
    }

    /// Makes this sink the boxes' shared person store.
    pub fn with_shared_persons(mut self, shared: bool) -> Self {
        self.shared_persons = shared;
        self
    }

    /// The error of a position row another state file moves: two boxes share this database
    /// under one name, and each would skip the other's events.
    fn not_ours(&self, other: Uuid) -> SinkError {
        SinkError::Taken {
            sink: NAME,
            detail: format!(
                "the position {:?} in {} is moved by another appliance (state {other}, this one \
                 is {}): give each box that shares this database its own NODE_ID",
                self.position_key, self.target, self.state
            ),
        }
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    async fn apply_migrations(&self) -> Result<usize, SinkError> {
        let migrate_error = |detail: String| SinkError::Migrate { sink: NAME, detail };
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| migrate_error(describe(&e)))?;
        let client: &mut tokio_postgres::Client = &mut client;
        let report = embedded::migrations::runner()
            .run_async(client)
            .await
            .map_err(|e| migrate_error(describe(&e)))?;
        Ok(report.applied_migrations().len())
    }

    /// A pooled connection to a migrated database.
    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.migrated
            .get_or_try_init(|| async { self.apply_migrations().await.map(|_| ()) })
            .await?;
        self.pool.get().await.map_err(write_error)
    }

    /// Runs `work` under [`REQUEST_DEADLINE`].
    fn deadline<'a, T: Send + 'a>(
        &'a self,
        work: impl std::future::Future<Output = Result<T, SinkError>> + Send + 'a,
    ) -> SinkFuture<'a, T> {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_DEADLINE, work)
                .await
                .map_err(|_| SinkError::Write {
                    sink: NAME,
                    detail: format!(
                        "no answer from {} within {} s",
                        self.target,
                        REQUEST_DEADLINE.as_secs()
                    ),
                })?
        })
    }

    async fn write_now(&self, write: SinkWrite, position: u64) -> Result<Written, SinkError> {
        let keys = event_keys(&write);
        // The first event of each key is the one to store: a later one in the same write is a
        // duplicate (and one statement may not touch a row twice).
        let mut first = HashSet::new();
        let include: Vec<bool> = keys
            .iter()
            .flatten()
            .map(|key| first.insert(*key))
            .collect();
        let created_at = Utc::now();
        let mut client = self.client().await?;
        let mut tx = client.transaction().await.map_err(statement_error)?;
        // The persons first: a conflict in a shared person store then stops the write before
        // any row is stored, whichever way the rows go in.
        persons::write(&tx, &write.persons, self.shared_persons).await?;
        let new = if first.len() >= PARALLEL_FROM_EVENTS {
            // Two more connections insert half each, committed on their own; the transaction
            // then moves the position. A crash in between leaves rows without the position:
            // the replay finds them by their queue position and counts them as its own.
            let half = first.len() / 2;
            let mut seen = 0;
            let (left, right): (Vec<bool>, Vec<bool>) = include
                .iter()
                .map(|keep| {
                    seen += usize::from(*keep);
                    (*keep && seen <= half, *keep && seen > half)
                })
                .unzip();
            let (mut one, mut other) = (self.client().await?, self.client().await?);
            let (left, right) = (
                EventColumns::of(&write, &left),
                EventColumns::of(&write, &right),
            );
            let (a, b) = tokio::join!(
                insert_events(&mut one, &left, &created_at),
                insert_events(&mut other, &right, &created_at)
            );
            let mut new = a?;
            new.extend(b?);
            crate::failpoint::hit("postgres.before_position");
            new
        } else {
            insert_events(&mut tx, &EventColumns::of(&write, &include), &created_at).await?
        };
        let mut flat = include.iter();
        let written = Written {
            inserted: keys
                .iter()
                .map(|batch| {
                    batch
                        .iter()
                        .map(|key| flat.next().copied().unwrap_or(false) && new.contains(key))
                        .collect()
                })
                .collect(),
        };
        let record = tx
            .prepare_cached(
                "INSERT INTO appliance_sink_position (sink, position, state) VALUES ($1, $2, $3)
                 ON CONFLICT (sink) DO UPDATE
                 SET position = GREATEST(appliance_sink_position.position, excluded.position),
                     state = excluded.state
                 WHERE appliance_sink_position.state IS NULL
                    OR appliance_sink_position.state = excluded.state
                 RETURNING position",
            )
            .await
            .map_err(statement_error)?;
        let moved = tx
            .query_opt(
                &record,
                &[&self.position_key, &(position as i64), &self.state],
            )
            .await
            .map_err(statement_error)?;
        if moved.is_none() {
            // Dropping the transaction rolls its rows back with it; the position says whose it is.
            drop(tx);
            return Err(match self.position_now().await {
                Err(e) => e,
                Ok(_) => self.not_ours(Uuid::nil()),
            });
        }
        tx.commit().await.map_err(statement_error)?;
        Ok(written)
    }

    async fn position_now(&self) -> Result<u64, SinkError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT position, state FROM appliance_sink_position WHERE sink = $1",
                &[&self.position_key],
            )
            .await
            .map_err(read_error)?;
        let Some(row) = row else { return Ok(0) };
        match row.get::<_, Option<Uuid>>(1) {
            Some(other) if other != self.state => Err(self.not_ours(other)),
            _ => Ok(row.get::<_, i64>(0) as u64),
        }
    }

    async fn stored_rows_now(
        &self,
        batches: Arc<Vec<QueuedBatch>>,
    ) -> Result<StoredRows, SinkError> {
        let client = self.client().await?;
        let select = client
            .prepare_cached(
                "SELECT uuid, event, distinct_id, properties::text, timestamp, elements_chain
                 FROM posthog_event
                 WHERE team_id = $1 AND queue_position = $2 AND uuid = ANY($3)",
            )
            .await
            .map_err(read_error)?;
        let mut out = Vec::with_capacity(batches.len());
        for queued in batches.iter() {
            let uuids: Vec<Uuid> = queued.batch.events.iter().map(|e| e.uuid).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&(queued.batch.team_id as i64), &(queued.seq as i64), &uuids];
            let rows = client.query(&select, &params).await.map_err(read_error)?;
            let mut found: HashMap<Uuid, EventRow> = rows
                .into_iter()
                .map(|r| {
                    let row = EventRow {
                        uuid: r.get(0),
                        event: r.get(1),
                        distinct_id: r.get(2),
                        properties: r.get(3),
                        timestamp: r.get::<_, DateTime<Utc>>(4),
                        elements_chain: r.get(5),
                    };
                    (row.uuid, row)
                })
                .collect();
            out.push(
                queued
                    .batch
                    .events
                    .iter()
                    .map(|e| found.remove(&e.uuid))
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// Writes of at least this many events are inserted by two connections at once: one backend
/// inserting (parsing jsonb, maintaining the indexes) is what limits the sink on a small box.
const PARALLEL_FROM_EVENTS: usize = 200;

/// The insert of a write's events from its column arrays (see [`EventColumns`]).
macro_rules! insert_from_arrays {
    ($($tail:literal)?) => {
        concat!(
            "INSERT INTO posthog_event (uuid, event, properties, elements_chain, timestamp,
                team_id, distinct_id, created_at, queue_position, person_id,
                person_properties, person_created_at, person_mode)
             SELECT u.uuid, u.event, u.properties::jsonb, u.elements_chain, u.timestamp,
                u.team_id, u.distinct_id, $1, u.queue_position, u.person_id,
                u.person_properties::jsonb, u.person_created_at, u.person_mode
             FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                $7::int8[], $8::text[], $9::int8[], $10::uuid[], $11::text[],
                $12::timestamptz[], $13::text[]) WITH ORDINALITY
                AS u(uuid, event, properties, elements_chain, timestamp, team_id,
                distinct_id, queue_position, person_id, person_properties,
                person_created_at, person_mode, ord)
             ORDER BY u.ord"
            $(, $tail)?
        )
    };
}

/// SQLSTATE 23505: a row with the same key is already there.
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Inserts `columns`; answers the (team, uuid) of each row this write stored, including rows a
/// previous attempt of the same batches stored (same queue position) before it could move the
/// position. A row of another batch with the same key is left alone and not answered.
///
/// A plain insert is tried first, in a transaction of its own (a savepoint inside the write's
/// transaction): almost every write holds only new events, and `ON CONFLICT … RETURNING` costs
/// the server about a tenth more per row (measured in `psql` with 100,000 real rows). Only when
/// a key is already there is the insert made again with it.
async fn insert_events(
    client: &mut impl deadpool_postgres::GenericClient,
    columns: &EventColumns<'_>,
    created_at: &DateTime<Utc>,
) -> Result<HashSet<(i64, Uuid)>, SinkError> {
    let params = columns.params(created_at);
    let attempt = client.transaction().await.map_err(statement_error)?;
    let plain = attempt
        .prepare_cached(insert_from_arrays!())
        .await
        .map_err(statement_error)?;
    match attempt.execute(&plain, &params).await {
        Ok(_) => {
            attempt.commit().await.map_err(statement_error)?;
            return Ok(columns.keys().collect());
        }
        Err(e) if is_unique_violation(&e) => {
            attempt.rollback().await.map_err(statement_error)?;
        }
        Err(e) => return Err(statement_error(e)),
    }
    let insert = client
        .prepare_cached(insert_from_arrays!(
            " ON CONFLICT (team_id, uuid) DO UPDATE SET queue_position = excluded.queue_position
             WHERE posthog_event.queue_position = excluded.queue_position
             RETURNING team_id, uuid"
        ))
        .await
        .map_err(statement_error)?;
    let rows = client
        .query(&insert, &params)
        .await
        .map_err(statement_error)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Each event's (team, uuid), batch by batch.
fn event_keys(write: &SinkWrite) -> Vec<Vec<(i64, Uuid)>> {
    write
        .batches
        .iter()
        .map(|q| {
            let team = q.batch.team_id as i64;
            q.batch.events.iter().map(|e| (team, e.uuid)).collect()
        })
        .collect()
}

/// The events of one write, column by column, for one `INSERT … SELECT FROM unnest(…)`: the
/// server takes the arrays in one round trip, with no staging table to fill and empty.
struct EventColumns<'a> {
    uuid: Vec<Uuid>,
    event: Vec<Cow<'a, str>>,
    properties: Vec<Cow<'a, str>>,
    elements_chain: Vec<Cow<'a, str>>,
    timestamp: Vec<DateTime<Utc>>,
    team_id: Vec<i64>,
    distinct_id: Vec<Cow<'a, str>>,
    queue_position: Vec<i64>,
    person_id: Vec<Option<Uuid>>,
    person_properties: Vec<Cow<'a, str>>,
    person_created_at: Vec<Option<DateTime<Utc>>>,
    person_mode: Vec<&'static str>,
}

impl<'a> EventColumns<'a> {
    /// The events of `write` whose flat index is set in `include`.
    fn of(write: &'a SinkWrite, include: &[bool]) -> EventColumns<'a> {
        let total = include.iter().filter(|keep| **keep).count();
        let mut flat = include.iter();
        let mut c = EventColumns {
            uuid: Vec::with_capacity(total),
            event: Vec::with_capacity(total),
            properties: Vec::with_capacity(total),
            elements_chain: Vec::with_capacity(total),
            timestamp: Vec::with_capacity(total),
            team_id: Vec::with_capacity(total),
            distinct_id: Vec::with_capacity(total),
            queue_position: Vec::with_capacity(total),
            person_id: Vec::with_capacity(total),
            person_properties: Vec::with_capacity(total),
            person_created_at: Vec::with_capacity(total),
            person_mode: Vec::with_capacity(total),
        };
        for (index, queued) in write.batches.iter().enumerate() {
            let columns = write.columns.get(index).map(Vec::as_slice).unwrap_or(&[]);
            for (at, e) in queued.batch.events.iter().enumerate() {
                if !flat.next().copied().unwrap_or(false) {
                    continue;
                }
                let person = columns.get(at);
                c.uuid.push(e.uuid);
                c.event.push(text_safe(&e.event));
                c.properties.push(json_safe(&e.properties));
                c.elements_chain.push(text_safe(&e.elements_chain));
                c.timestamp.push(e.timestamp);
                c.team_id.push(queued.batch.team_id as i64);
                c.distinct_id.push(text_safe(&e.distinct_id));
                c.queue_position.push(queued.seq as i64);
                c.person_id.push(person.map(|p| p.person_id));
                c.person_properties
                    .push(json_safe(person.map_or("{}", |p| &*p.person_properties)));
                c.person_created_at
                    .push(person.map(|p| p.person_created_at));
                c.person_mode
                    .push(person.map_or("full", |p| p.person_mode.as_str()));
            }
        }
        c
    }

    /// The (team, uuid) of each event.
    fn keys(&self) -> impl Iterator<Item = (i64, Uuid)> + '_ {
        self.team_id.iter().copied().zip(self.uuid.iter().copied())
    }

    /// The insert's parameters, `created_at` first.
    fn params<'p>(&'p self, created_at: &'p DateTime<Utc>) -> Vec<&'p (dyn ToSql + Sync)> {
        vec![
            created_at,
            &self.uuid,
            &self.event,
            &self.properties,
            &self.elements_chain,
            &self.timestamp,
            &self.team_id,
            &self.distinct_id,
            &self.queue_position,
            &self.person_id,
            &self.person_properties,
            &self.person_created_at,
            &self.person_mode,
        ]
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn position(&self) -> SinkFuture<'_, u64> {
        self.deadline(self.position_now())
    }

    fn write(&self, write: SinkWrite, position: u64) -> SinkFuture<'_, Written> {
        self.deadline(self.write_now(write, position))
    }

    fn stored_rows(&self, batches: Arc<Vec<QueuedBatch>>) -> SinkFuture<'_, StoredRows> {
        self.deadline(self.stored_rows_now(batches))
    }

    fn shared_state(&self, wanted: Arc<SharedWanted>) -> SinkFuture<'_, SharedState> {
        self.deadline(async move {
            let client = self.client().await?;
            shared::read_shared(&client, &wanted).await
        })
    }
}
