//! The rows the ClickHouse sink inserts, in PostHog's column types, and the deduplication
//! token of each insert.
//!
//! Owns: turning a [`SinkWrite`] into `events`, `person`, `person_distinct_id2` and `groups`
//! rows the way PostHog's plugin server fills them, and naming an insert by its content.
//! Must never: make a token that depends on anything but the rows (a retried write must carry
//! the token of its first attempt), or copy an event's text where borrowing it will do.

use std::collections::HashSet;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::person::{PersonChange, PersonMode};
use crate::sinks::SinkWrite;

/// PostHog's deleted person row is this far past the person's last version, so that it wins
/// over every row the person had (`generateKafkaPersonUpdateMessage`: "version + 100").
const DELETED_VERSION_STEP: u64 = 100;

/// One `events` row.
#[derive(clickhouse::Row, Serialize)]
pub struct EventRow<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    pub uuid: Uuid,
    pub event: &'a str,
    pub properties: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub timestamp: DateTime<Utc>,
    pub team_id: i64,
    pub distinct_id: &'a str,
    pub elements_chain: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::uuid")]
    pub person_id: Uuid,
    /// Whole seconds, as PostHog writes it (`ClickHouseSecondPrecision`).
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub person_created_at: DateTime<Utc>,
    pub person_properties: &'a str,
    /// PostHog's current plugin server leaves the group columns empty (the `$group_N`
    /// columns, materialized from the properties, are what queries read).
    pub group0_properties: &'a str,
    pub group1_properties: &'a str,
    pub group2_properties: &'a str,
    pub group3_properties: &'a str,
    pub group4_properties: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub group0_created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub group1_created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub group2_created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub group3_created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub group4_created_at: DateTime<Utc>,
    /// `Enum8('full' = 0, 'propertyless' = 1, 'force_upgrade' = 2)`.
    pub person_mode: i8,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub _timestamp: DateTime<Utc>,
    /// The batch's position in the ingest queue.
    pub _offset: u64,
}

/// One `person` row.
#[derive(clickhouse::Row, Serialize)]
pub struct PersonRow<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    pub id: Uuid,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub created_at: DateTime<Utc>,
    pub team_id: i64,
    pub properties: &'a str,
    pub is_identified: i8,
    pub is_deleted: i8,
    pub version: u64,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub _timestamp: DateTime<Utc>,
    pub _offset: u64,
}

/// One `person_distinct_id2` row.
#[derive(clickhouse::Row, Serialize)]
pub struct DistinctIdRow<'a> {
    pub team_id: i64,
    pub distinct_id: &'a str,
    #[serde(with = "clickhouse::serde::uuid")]
    pub person_id: Uuid,
    pub is_deleted: i8,
    pub version: i64,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub _timestamp: DateTime<Utc>,
    pub _offset: u64,
    pub _partition: u64,
}

/// One `groups` row.
#[derive(clickhouse::Row, Serialize)]
pub struct GroupRow<'a> {
    pub group_type_index: u8,
    pub group_key: &'a str,
    #[serde(with = "clickhouse::serde::chrono::datetime64::millis")]
    pub created_at: DateTime<Utc>,
    pub team_id: i64,
    pub group_properties: String,
    #[serde(with = "clickhouse::serde::chrono::datetime")]
    pub _timestamp: DateTime<Utc>,
    pub _offset: u64,
}

fn mode(mode: PersonMode) -> i8 {
    match mode {
        PersonMode::Full => 0,
        PersonMode::Propertyless => 1,
        PersonMode::ForceUpgrade => 2,
    }
}

fn whole_seconds(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::seconds(1)).unwrap_or(at)
}

/// The events of `write` (the first of each (team, uuid); a later one is a duplicate), and for
/// each batch which of its events are among them.
pub fn events(write: &SinkWrite, now: DateTime<Utc>) -> (Vec<EventRow<'_>>, Vec<Vec<bool>>) {
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    let mut kept = Vec::with_capacity(write.batches.len());
    for (index, queued) in write.batches.iter().enumerate() {
        let columns = write.columns.get(index).map(Vec::as_slice).unwrap_or(&[]);
        let team = queued.batch.team_id as i64;
        let mut batch_kept = Vec::with_capacity(queued.batch.events.len());
        for (at, e) in queued.batch.events.iter().enumerate() {
            let first = seen.insert((team, e.uuid));
            batch_kept.push(first);
            if !first {
                continue;
            }
            let person = columns.get(at);
            rows.push(EventRow {
                uuid: e.uuid,
                event: &e.event,
                properties: &e.properties,
                timestamp: e.timestamp,
                team_id: team,
                distinct_id: &e.distinct_id,
                elements_chain: &e.elements_chain,
                created_at: now,
                person_id: person.map_or(Uuid::nil(), |p| p.person_id),
                person_created_at: whole_seconds(
                    person.map_or(DateTime::UNIX_EPOCH, |p| p.person_created_at),
                ),
                person_properties: person.map_or("{}", |p| &p.person_properties),
                group0_properties: "",
                group1_properties: "",
                group2_properties: "",
                group3_properties: "",
                group4_properties: "",
                group0_created_at: DateTime::UNIX_EPOCH,
                group1_created_at: DateTime::UNIX_EPOCH,
                group2_created_at: DateTime::UNIX_EPOCH,
                group3_created_at: DateTime::UNIX_EPOCH,
                group4_created_at: DateTime::UNIX_EPOCH,
                person_mode: mode(person.map_or(PersonMode::Full, |p| p.person_mode)),
                _timestamp: now,
                _offset: queued.seq,
            });
        }
        kept.push(batch_kept);
    }
    (rows, kept)
}

/// The persons of `write`: their new state, or PostHog's deletion row.
pub fn persons<'a>(
    write: &'a SinkWrite,
    texts: &'a [String],
    now: DateTime<Utc>,
) -> Vec<PersonRow<'a>> {
    write
        .persons
        .persons
        .iter()
        .zip(texts)
        .map(|(((team, uuid), change), text)| match change {
            PersonChange::Upsert(person) => PersonRow {
                id: *uuid,
                created_at: person.created_at,
                team_id: *team as i64,
                properties: text,
                is_identified: i8::from(person.is_identified),
                is_deleted: 0,
                version: person.version,
                _timestamp: now,
                _offset: 0,
            },
            PersonChange::Deleted { version } => PersonRow {
                id: *uuid,
                created_at: DateTime::UNIX_EPOCH,
                team_id: *team as i64,
                properties: "{}",
                is_identified: 0,
                is_deleted: 1,
                version: version.saturating_add(DELETED_VERSION_STEP),
                _timestamp: now,
                _offset: 0,
            },
        })
        .collect()
}

/// Each person's properties as JSON text, in the order of [`persons`].
pub fn person_texts(write: &SinkWrite) -> Vec<String> {
    write
        .persons
        .persons
        .values()
        .map(|change| match change {
            PersonChange::Upsert(person) => person.properties_text().to_string(),
            PersonChange::Deleted { .. } => String::new(),
        })
        .collect()
}

/// The distinct ids of `write` that point to a person. An id whose person was deleted has no
/// row: its person's deletion row hides it, as PostHog's queries join the two.
pub fn distinct_ids(write: &SinkWrite, now: DateTime<Utc>) -> Vec<DistinctIdRow<'_>> {
    write
        .persons
        .distinct_ids
        .iter()
        .filter_map(|((team, id), target)| {
            let target = target.as_ref()?;
            Some(DistinctIdRow {
                team_id: *team as i64,
                distinct_id: id,
                person_id: target.person,
                is_deleted: 0,
                version: target.version as i64,
                _timestamp: now,
                _offset: 0,
                _partition: 0,
            })
        })
        .collect()
}

/// The groups of `write`.
pub fn groups(write: &SinkWrite, now: DateTime<Utc>) -> Vec<GroupRow<'_>> {
    write
        .persons
        .groups
        .iter()
        .map(|((team, index, key), group)| GroupRow {
            group_type_index: *index,
            group_key: key,
            created_at: group.created_at,
            team_id: *team as i64,
            group_properties: serde_json::Value::Object(group.properties.clone()).to_string(),
            _timestamp: now,
            _offset: 0,
        })
        .collect()
}

/// What identifies a row's content for the deduplication token.
pub trait Keyed {
    fn key(&self) -> String;
}

impl Keyed for EventRow<'_> {
    fn key(&self) -> String {
        format!("{}:{}", self.team_id, self.uuid)
    }
}

impl Keyed for PersonRow<'_> {
    fn key(&self) -> String {
        let (team, id, version) = (self.team_id, self.id, self.version);
        format!("{team}:{id}:{version}:{}", self.is_deleted)
    }
}

impl Keyed for DistinctIdRow<'_> {
    fn key(&self) -> String {
        let (team, id, person) = (self.team_id, self.distinct_id, self.person_id);
        format!("{team}:{id}:{person}:{}", self.version)
    }
}

impl Keyed for GroupRow<'_> {
    fn key(&self) -> String {
        let (team, index, key) = (self.team_id, self.group_type_index, self.group_key);
        format!("{team}:{index}:{key}:{}", self.group_properties)
    }
}

/// Names an insert by its table and the identity of its rows: a retry of the same write
/// carries the same token, and ClickHouse drops it as a duplicate.
pub fn token(table: &str, keys: impl Iterator<Item = String>) -> String {
    let mut hash = Sha256::new();
    hash.update(table.as_bytes());
    for key in keys {
        hash.update([0]);
        hash.update(key.as_bytes());
    }
    let digest = hash.finalize();
    format!(
        "appliance-{table}-{}",
        digest
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}
