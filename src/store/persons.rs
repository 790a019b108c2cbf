//! Persons, distinct ids, personless ids, group types, groups and ingestion warnings.
//!
//! Written only by [`apply`], inside the pipeline's delivery transaction (so the persons always
//! stand exactly at the delivery mark: a batch's person changes and the pipeline's progress
//! past it commit together), by the deletion an operator asks for, and by [`Store::import_persons`]
//! (persons another box moved on in a shared store, committed before the step that reads them,
//! so a replay after a crash reads them too).

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use uuid::Uuid;

use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use std::collections::BTreeSet;

use crate::ids::TeamId;
use crate::person::{DistinctId, Group, IngestionWarning, Person, PersonChange, PersonUpdates};

/// (team, person uuid) → [`Person`].
pub(in crate::store) const PERSONS: TableDefinition<(u64, u128), &[u8]> =
    TableDefinition::new("persons");
/// (team, distinct id) → [`DistinctId`].
pub(in crate::store) const DISTINCT_IDS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("distinct_ids");
/// (team, person uuid, distinct id): the distinct ids of each person.
pub(in crate::store) const PERSON_DISTINCT_IDS: TableDefinition<(u64, u128, &str), ()> =
    TableDefinition::new("person_distinct_ids");
/// (team, distinct id) → merged (1) or not (0): ids seen on personless events.
pub(in crate::store) const PERSONLESS_IDS: TableDefinition<(u64, &str), u8> =
    TableDefinition::new("personless_distinct_ids");
/// (team, group type) → its index (0–4).
pub(in crate::store) const GROUP_TYPES: TableDefinition<(u64, &str), u8> =
    TableDefinition::new("group_types");
/// (team, group type index, group key) → [`Group`].
pub(in crate::store) const GROUPS: TableDefinition<(u64, u8, &str), &[u8]> =
    TableDefinition::new("groups");
/// (team, sequence) → [`IngestionWarning`]; the oldest go past [`MAX_WARNINGS_PER_TEAM`].
pub(in crate::store) const WARNINGS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("ingestion_warnings");
const NEXT_WARNING: &str = "next_ingestion_warning";
/// (team, event uuid): the events the person step processed, in two generations of at most
/// [`SEEN_GENERATION_EVENTS`] each; when the current one fills, the older is dropped whole.
pub(in crate::store) const SEEN_A: TableDefinition<(u64, u128), ()> =
    TableDefinition::new("person_events_seen_a");
pub(in crate::store) const SEEN_B: TableDefinition<(u64, u128), ()> =
    TableDefinition::new("person_events_seen_b");
/// Which of the two is current (0: A), and how many events it holds.
const SEEN_CURRENT: &str = "person_events_seen_current";
const SEEN_COUNT: &str = "person_events_seen_count";
/// Events remembered per generation: an event resent within the last 500,000 to 1,000,000
/// events never changes a person twice (PostHog has no such guard; SDK retries come within
/// seconds).
pub const SEEN_GENERATION_EVENTS: u64 = 500_000;

/// (team, distinct id): persons an operator asked to delete, carried out by the pipeline in
/// order with the events (so no event processed before it sees the person gone, and none after
/// sees it still there).
pub(in crate::store) const PERSON_DELETIONS: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("person_deletions");

/// Ingestion warnings kept per team: a flood of bad events keeps only the newest.
pub const MAX_WARNINGS_PER_TEAM: usize = 1_000;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PERSONS)?;
    txn.open_table(DISTINCT_IDS)?;
    txn.open_table(PERSON_DISTINCT_IDS)?;
    txn.open_table(PERSONLESS_IDS)?;
    txn.open_table(GROUP_TYPES)?;
    txn.open_table(GROUPS)?;
    txn.open_table(WARNINGS)?;
    txn.open_table(PERSON_DELETIONS)?;
    txn.open_table(SEEN_A)?;
    txn.open_table(SEEN_B)?;
    Ok(())
}

fn remember_seen(
    txn: &WriteTransaction,
    seen: &BTreeSet<(TeamId, Uuid)>,
) -> Result<(), StoreError> {
    if seen.is_empty() {
        return Ok(());
    }
    let mut meta = txn.open_table(META)?;
    let mut current = meta_get(&meta, SEEN_CURRENT)?;
    let mut count = meta_get(&meta, SEEN_COUNT)?;
    if count >= SEEN_GENERATION_EVENTS {
        // The older generation goes, whole; the current one becomes the older.
        let older = if current == 0 { SEEN_B } else { SEEN_A };
        txn.delete_table(older)?;
        txn.open_table(older)?;
        current = 1 - current;
        count = 0;
        meta.insert(SEEN_CURRENT, current)?;
    }
    let mut table = txn.open_table(if current == 0 { SEEN_A } else { SEEN_B })?;
    for (team, event) in seen {
        table.insert((*team, event.as_u128()), ())?;
    }
    meta.insert(SEEN_COUNT, count + seen.len() as u64)?;
    Ok(())
}

/// Writes one step's person changes.
pub(super) fn apply(txn: &WriteTransaction, updates: &PersonUpdates) -> Result<(), StoreError> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut persons = txn.open_table(PERSONS)?;
    let mut distinct_ids = txn.open_table(DISTINCT_IDS)?;
    let mut index = txn.open_table(PERSON_DISTINCT_IDS)?;
    for ((team, uuid), change) in &updates.persons {
        match change {
            PersonChange::Upsert(person) => {
                persons.insert((*team, uuid.as_u128()), encode_value(&**person).as_slice())?;
            }
            PersonChange::Deleted { .. } => {
                persons.remove((*team, uuid.as_u128()))?;
            }
        }
    }
    for ((team, id), now) in &updates.distinct_ids {
        let before = distinct_ids
            .get((*team, id.as_str()))?
            .map(|v| decode_value::<DistinctId>("distinct id", v.value()))
            .transpose()?;
        if let Some(before) = before {
            index.remove((*team, before.person.as_u128(), id.as_str()))?;
        }
        match now {
            Some(now) => {
                distinct_ids.insert((*team, id.as_str()), encode_value(now).as_slice())?;
                index.insert((*team, now.person.as_u128(), id.as_str()), ())?;
            }
            None => {
                distinct_ids.remove((*team, id.as_str()))?;
            }
        }
    }
    let mut personless = txn.open_table(PERSONLESS_IDS)?;
    for ((team, id), merged) in &updates.personless {
        personless.insert((*team, id.as_str()), u8::from(*merged))?;
    }
    let mut group_types = txn.open_table(GROUP_TYPES)?;
    for ((team, name), index) in &updates.group_types {
        group_types.insert((*team, name.as_str()), *index)?;
    }
    let mut groups = txn.open_table(GROUPS)?;
    for ((team, index, key), group) in &updates.groups {
        groups.insert(
            (*team, *index, key.as_str()),
            encode_value(group).as_slice(),
        )?;
    }
    remember_seen(txn, &updates.seen)?;
    let mut deletions = txn.open_table(PERSON_DELETIONS)?;
    for (team, id) in &updates.deletions_done {
        deletions.remove((*team, id.as_str()))?;
    }
    add_warnings(txn, &updates.warnings)
}

fn add_warnings(
    txn: &WriteTransaction,
    warnings: &[(TeamId, IngestionWarning)],
) -> Result<(), StoreError> {
    if warnings.is_empty() {
        return Ok(());
    }
    let mut meta = txn.open_table(META)?;
    let mut next = meta_get(&meta, NEXT_WARNING)?;
    let mut table = txn.open_table(WARNINGS)?;
    let mut teams = std::collections::BTreeSet::new();
    for (team, warning) in warnings {
        next += 1;
        table.insert((*team, next), encode_value(warning).as_slice())?;
        teams.insert(*team);
    }
    meta.insert(NEXT_WARNING, next)?;
    for team in teams {
        let kept = table.range((team, 0)..=(team, u64::MAX))?.count();
        if kept > MAX_WARNINGS_PER_TEAM {
            let oldest: Vec<u64> = table
                .range((team, 0)..=(team, u64::MAX))?
                .take(kept - MAX_WARNINGS_PER_TEAM)
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for seq in oldest {
                table.remove((team, seq))?;
            }
        }
    }
    Ok(())
}

/// A person with everything that points at it, as `appliance persons show` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PersonView {
    pub team_id: TeamId,
    pub person: Person,
    pub distinct_ids: Vec<(String, u64)>,
}

/// Reads persons, distinct ids and groups in one read transaction (the pipeline's person step
/// takes one per batch for what its cache does not hold), with every table opened once.
pub struct PersonsReader {
    persons: ReadOnlyTable<(u64, u128), &'static [u8]>,
    distinct_ids: ReadOnlyTable<(u64, &'static str), &'static [u8]>,
    person_ids: ReadOnlyTable<(u64, u128, &'static str), ()>,
    personless: ReadOnlyTable<(u64, &'static str), u8>,
    group_types: ReadOnlyTable<(u64, &'static str), u8>,
    groups: ReadOnlyTable<(u64, u8, &'static str), &'static [u8]>,
    seen: [ReadOnlyTable<(u64, u128), ()>; 2],
}

impl PersonsReader {
    fn open(txn: &ReadTransaction) -> Result<PersonsReader, StoreError> {
        Ok(PersonsReader {
            persons: txn.open_table(PERSONS)?,
            distinct_ids: txn.open_table(DISTINCT_IDS)?,
            person_ids: txn.open_table(PERSON_DISTINCT_IDS)?,
            personless: txn.open_table(PERSONLESS_IDS)?,
            group_types: txn.open_table(GROUP_TYPES)?,
            groups: txn.open_table(GROUPS)?,
            seen: [txn.open_table(SEEN_A)?, txn.open_table(SEEN_B)?],
        })
    }

    pub fn seen(&self, team: TeamId, event: Uuid) -> Result<bool, StoreError> {
        for table in &self.seen {
            if table.get((team, event.as_u128()))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn distinct_id(&self, team: TeamId, id: &str) -> Result<Option<DistinctId>, StoreError> {
        let found = self.distinct_ids.get((team, id))?;
        found
            .map(|v| decode_value("distinct id", v.value()))
            .transpose()
    }

    pub fn person(&self, team: TeamId, uuid: Uuid) -> Result<Option<Person>, StoreError> {
        let found = self.persons.get((team, uuid.as_u128()))?;
        found.map(|v| decode_value("person", v.value())).transpose()
    }

    pub fn distinct_ids_of(&self, team: TeamId, uuid: Uuid) -> Result<Vec<String>, StoreError> {
        let key = uuid.as_u128();
        let mut ids = Vec::new();
        for row in self.person_ids.range((team, key, "")..)? {
            let (k, _) = row?;
            let (t, p, id) = k.value();
            if t != team || p != key {
                break;
            }
            ids.push(id.to_owned());
        }
        Ok(ids)
    }

    pub fn personless(&self, team: TeamId, id: &str) -> Result<Option<bool>, StoreError> {
        let found = self.personless.get((team, id))?;
        Ok(found.map(|v| v.value() != 0))
    }

    pub fn group_types(&self, team: TeamId) -> Result<Vec<(String, u8)>, StoreError> {
        let mut types = Vec::new();
        for row in self.group_types.range((team, "")..)? {
            let (k, v) = row?;
            let (t, name) = k.value();
            if t != team {
                break;
            }
            types.push((name.to_owned(), v.value()));
        }
        types.sort_by_key(|(_, index)| *index);
        Ok(types)
    }

    pub fn group(&self, team: TeamId, index: u8, key: &str) -> Result<Option<Group>, StoreError> {
        let found = self.groups.get((team, index, key))?;
        found.map(|v| decode_value("group", v.value())).transpose()
    }
}

impl Store {
    pub fn persons_reader(&self) -> Result<PersonsReader, StoreError> {
        PersonsReader::open(&self.read()?)
    }

    /// The person a distinct id points at, with all its distinct ids.
    pub fn person_view(&self, team: TeamId, id: &str) -> Result<Option<PersonView>, StoreError> {
        let reader = self.persons_reader()?;
        let Some(found) = reader.distinct_id(team, id)? else {
            return Ok(None);
        };
        let Some(person) = reader.person(team, found.person)? else {
            return Ok(None);
        };
        let mut distinct_ids = Vec::new();
        for id in reader.distinct_ids_of(team, person.uuid)? {
            let version = reader.distinct_id(team, &id)?.map_or(0, |d| d.version);
            distinct_ids.push((id, version));
        }
        Ok(Some(PersonView {
            team_id: team,
            person,
            distinct_ids,
        }))
    }

    /// The team's ingestion warnings, newest first, at most `limit`.
    pub fn ingestion_warnings(
        &self,
        team: TeamId,
        limit: usize,
    ) -> Result<Vec<IngestionWarning>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(WARNINGS)?;
        let mut out = Vec::new();
        for row in table.range((team, 0)..=(team, u64::MAX))?.rev().take(limit) {
            let (_, v) = row?;
            out.push(decode_value("ingestion warning", v.value())?);
        }
        Ok(out)
    }

    /// Calls `each` with every event the person step remembers having seen (to rebuild an
    /// in-memory filter in front of [`PersonsReader::seen`]).
    pub fn each_seen_event(&self, mut each: impl FnMut(TeamId, Uuid)) -> Result<(), StoreError> {
        let txn = self.read()?;
        for table in [SEEN_A, SEEN_B] {
            for row in txn.open_table(table)?.iter()? {
                let (key, _) = row?;
                let (team, event) = key.value();
                each(team, Uuid::from_u128(event));
            }
        }
        Ok(())
    }

    /// Keeps warnings found outside the person step (capture's).
    pub fn add_ingestion_warnings(
        &self,
        warnings: &[(TeamId, IngestionWarning)],
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        add_warnings(&txn, warnings)?;
        self.commit(txn)
    }

    /// Commits persons and distinct ids taken from a store shared with other boxes, before the
    /// person step that reads them: the journal that keeps a replay of that step exact.
    pub fn import_persons(&self, imported: &PersonUpdates) -> Result<(), StoreError> {
        if imported.is_empty() {
            return Ok(());
        }
        let txn = self.write()?;
        apply(&txn, imported)?;
        self.commit(txn)
    }

    /// Asks the pipeline to delete the person of `distinct_id` (see [`PERSON_DELETIONS`]).
    pub fn request_person_deletion(&self, team: TeamId, id: &str) -> Result<(), StoreError> {
        let txn = self.write()?;
        txn.open_table(PERSON_DELETIONS)?.insert((team, id), ())?;
        self.commit(txn)
    }

    /// Deletions asked for and not yet carried out, oldest key first, at most `limit`.
    pub fn person_deletions(&self, limit: usize) -> Result<Vec<(TeamId, String)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(PERSON_DELETIONS)?;
        let mut out = Vec::new();
        for row in table.iter()?.take(limit) {
            let (k, _) = row?;
            let (team, id) = k.value();
            out.push((team, id.to_owned()));
        }
        Ok(out)
    }

    /// Counts of what the person tables hold (for `/_ready` and tests).
    pub fn person_counts(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.read()?;
        let persons = txn.open_table(PERSONS)?.len()?;
        let ids = txn.open_table(DISTINCT_IDS)?.len()?;
        Ok((persons, ids))
    }
}
