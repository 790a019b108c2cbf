//! Persons shared by several boxes (`SHARED_PERSONS`): before each step, the persons its events
//! name (and the teams' group types, and the groups `$groupidentify` events change) are read
//! from the shared Postgres, and those another box has moved on (a newer version, a distinct
//! id merged elsewhere, an id or a group type this box has never seen) are imported.
//!
//! An import is committed to the state file before the step reads it, so a replay of the step
//! after a crash reads the same persons. Nothing a step not yet committed changed is imported
//! over: this box is the one moving those on, and what the shared store holds of them is older.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use uuid::Uuid;

use super::PersonEngine;
use crate::event::properties::EventProperties;
use crate::ids::TeamId;
use crate::person::process::{identified_group, is_merge_event, merge_other};
use crate::person::{Group, PersonChange, PersonUpdates, SharedPerson, SharedState, SharedWanted};
use crate::store::{PersonsReader, QueuedBatch, StoreError};

impl PersonEngine {
    /// What `batches` name that the shared store may hold newer: the distinct ids (each event's
    /// own, and the second id of a merge) that no step waiting for its commit touches, the
    /// teams, and the groups of `$groupidentify` events.
    pub fn wanted(&self, batches: &[QueuedBatch]) -> SharedWanted {
        let (mut ids, mut teams, mut groups) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for queued in batches {
            let team = queued.batch.team_id;
            teams.insert(team);
            for row in &queued.batch.events {
                ids.insert((team, row.distinct_id.clone()));
                if is_merge_event(&row.event) || row.event == "$groupidentify" {
                    let (_, read) = EventProperties::read(&row.properties, |key| {
                        matches!(
                            key,
                            "$anon_distinct_id" | "alias" | "$group_type" | "$group_key"
                        )
                    });
                    if let Some(other) = merge_other(&row.event, &read) {
                        ids.insert((team, other));
                    }
                    if let Some((group_type, key)) = identified_group(&row.event, &read) {
                        groups.insert((team, group_type, key));
                    }
                }
            }
        }
        SharedWanted {
            ids: ids
                .into_iter()
                .filter(|key| !self.pending_touches_id(key))
                .collect(),
            teams: teams.into_iter().collect(),
            groups: groups.into_iter().collect(),
        }
    }

    /// Imports what `shared` holds otherwise than this box's committed state; returns how many
    /// persons and groups were taken.
    pub fn import(&mut self, shared: SharedState) -> Result<usize, StoreError> {
        if shared == SharedState::default() {
            return Ok(0);
        }
        let reader = self.store.persons_reader()?;
        let mut imported = PersonUpdates::default();
        self.import_persons(&reader, shared.persons, &mut imported)?;
        self.import_groups(&reader, shared.group_types, shared.groups, &mut imported)?;
        drop(reader);
        let count = imported
            .persons
            .values()
            .filter(|c| matches!(c, PersonChange::Upsert(_)))
            .count()
            + imported.groups.len();
        self.store.import_persons(&imported)?;
        self.cache(imported);
        Ok(count)
    }

    fn import_persons(
        &self,
        reader: &PersonsReader,
        shared: Vec<SharedPerson>,
        imported: &mut PersonUpdates,
    ) -> Result<(), StoreError> {
        // Persons whose ids moved to an imported one: gone here too once none is left.
        let mut left: BTreeMap<(TeamId, Uuid), BTreeSet<String>> = BTreeMap::new();
        for found in shared {
            let team = found.team;
            let key = (team, found.person.uuid);
            if self.pending_touches_person(&key) || !self.is_newer(reader, &found)? {
                continue;
            }
            let local = reader.person(team, found.person.uuid)?;
            if local.is_none_or(|l| l.version <= found.person.version) {
                imported
                    .persons
                    .insert(key, PersonChange::Upsert(Arc::new(found.person.clone())));
            }
            for (id, now) in found.distinct_ids {
                let id_key = (team, id);
                if self.pending_touches_id(&id_key) {
                    continue;
                }
                let before = reader.distinct_id(team, &id_key.1)?;
                match before {
                    Some(before)
                        if before.version > now.version
                            || self.pending_touches_person(&(team, before.person)) =>
                    {
                        continue
                    }
                    Some(before) if before.person != now.person => {
                        left.entry((team, before.person))
                            .or_default()
                            .insert(id_key.1.clone());
                    }
                    _ => {}
                }
                imported.distinct_ids.insert(id_key, Some(now));
            }
        }
        for ((team, uuid), moved) in left {
            let key = (team, uuid);
            if imported.persons.contains_key(&key) || self.pending_touches_person(&key) {
                continue;
            }
            let remaining = reader.distinct_ids_of(team, uuid)?;
            if remaining.iter().all(|id| moved.contains(id)) {
                let version = reader.person(team, uuid)?.map_or(0, |p| p.version);
                imported
                    .persons
                    .insert(key, PersonChange::Deleted { version });
            }
        }
        Ok(())
    }

    /// Group types this box does not have as the store has them, and groups the store holds
    /// at a higher version (or the same one with other properties), unless a pending step
    /// changed them.
    fn import_groups(
        &self,
        reader: &PersonsReader,
        group_types: Vec<(TeamId, String, u8)>,
        groups: Vec<(TeamId, u8, String, Group)>,
        imported: &mut PersonUpdates,
    ) -> Result<(), StoreError> {
        let mut known: BTreeMap<TeamId, Vec<(String, u8)>> = BTreeMap::new();
        for (team, name, index) in group_types {
            let pending = self
                .pending
                .iter()
                .any(|(_, layer)| layer.group_types.contains_key(&(team, name.clone())));
            if pending {
                continue;
            }
            let types = match known.entry(team) {
                std::collections::btree_map::Entry::Occupied(found) => found.into_mut(),
                std::collections::btree_map::Entry::Vacant(empty) => {
                    empty.insert(reader.group_types(team)?)
                }
            };
            let here = types.iter().any(|(n, i)| *n == name && *i == index);
            if !here {
                imported.group_types.insert((team, name), index);
            }
        }
        for (team, index, key, group) in groups {
            let at = (team, index, key);
            if self
                .pending
                .iter()
                .any(|(_, layer)| layer.groups.contains_key(&at))
            {
                continue;
            }
            let local = reader.group(team, index, &at.2)?;
            let differs = local.is_none_or(|l| {
                l.version < group.version
                    || (l.version == group.version && l.properties != group.properties)
            });
            if differs {
                imported.groups.insert(at, group);
            }
        }
        Ok(())
    }

    /// Whether the shared store holds `found` otherwise than this box: its person unknown here,
    /// at a higher version, or at the same version with other properties (written over by hand,
    /// or by a box that lost a race before conflicts were checked); or one of its ids unknown
    /// here or on another person at no higher version. The shared store is the truth: this box
    /// only ever commits what the store took.
    fn is_newer(&self, reader: &PersonsReader, found: &SharedPerson) -> Result<bool, StoreError> {
        let local = reader.person(found.team, found.person.uuid)?;
        let person_differs = local.is_none_or(|l| {
            l.version < found.person.version
                || (l.version == found.person.version && l.properties != found.person.properties)
        });
        if person_differs {
            return Ok(true);
        }
        for (id, now) in &found.distinct_ids {
            match reader.distinct_id(found.team, id)? {
                None => return Ok(true),
                Some(before) if before.person != now.person && before.version <= now.version => {
                    return Ok(true)
                }
                Some(_) => {}
            }
        }
        Ok(false)
    }

    fn pending_touches_id(&self, key: &(TeamId, String)) -> bool {
        self.pending
            .iter()
            .any(|(_, layer)| layer.distinct_ids.contains_key(key))
    }

    fn pending_touches_person(&self, key: &(TeamId, Uuid)) -> bool {
        self.pending
            .iter()
            .any(|(_, layer)| layer.persons.contains_key(key))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::{json, Value};

    use super::*;
    use crate::event::{EventRow, IngestBatch};
    use crate::person::{person_uuid, DistinctId, Person};
    use crate::store::Store;

    const TEAM: TeamId = 1;

    fn batch(seq: u64, events: &[(&str, &str, Value)]) -> QueuedBatch {
        QueuedBatch {
            seq,
            batch: IngestBatch {
                team_id: TEAM,
                received_at: Utc::now(),
                sent_at: None,
                ip: None,
                events: events
                    .iter()
                    .map(|(event, distinct_id, properties)| EventRow {
                        uuid: Uuid::now_v7(),
                        event: (*event).into(),
                        distinct_id: (*distinct_id).into(),
                        properties: properties.to_string(),
                        timestamp: Utc::now(),
                        elements_chain: String::new(),
                    })
                    .collect(),
            },
        }
    }

    /// Runs one step at `seq` and commits it, as the write stage does after the sink write.
    fn step_and_commit(engine: &mut PersonEngine, store: &Store, queued: QueuedBatch) {
        let seq = queued.seq;
        let step = engine.process(&mut [queued], seq).unwrap();
        store.import_persons(&step.updates).unwrap();
        engine.committed(seq);
    }

    fn found(persons: Vec<SharedPerson>) -> SharedState {
        SharedState {
            persons,
            ..SharedState::default()
        }
    }

    fn props(value: Value) -> serde_json::Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_person_another_box_merged_is_imported_and_the_next_event_is_its() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut engine = PersonEngine::new(store.clone(), 100);
        let anon_set = json!({"$set": {"device": "phone"}});
        step_and_commit(&mut engine, &store, batch(1, &[("e", "anon", anon_set)]));
        let (anon, user) = (person_uuid(TEAM, "anon"), person_uuid(TEAM, "user"));

        // Another box merged anon into user's person.
        let merged = SharedPerson {
            team: TEAM,
            person: Person {
                uuid: user,
                properties: props(json!({"device": "phone", "plan": "pro"})),
                properties_last_operation: props(json!({})),
                properties_last_updated_at: props(json!({})),
                created_at: Utc::now(),
                version: 3,
                is_identified: true,
                text: Default::default(),
            },
            distinct_ids: vec![
                (
                    "user".into(),
                    DistinctId {
                        person: user,
                        version: 0,
                    },
                ),
                (
                    "anon".into(),
                    DistinctId {
                        person: user,
                        version: 1,
                    },
                ),
            ],
        };
        let next = batch(2, &[("e", "anon", json!({"$set": {"seen": true}}))]);
        assert_eq!(
            engine.wanted(std::slice::from_ref(&next)).ids,
            vec![(TEAM, "anon".to_owned())]
        );
        assert_eq!(engine.import(found(vec![merged.clone()])).unwrap(), 1);
        // Imported already: a second look finds nothing newer.
        assert_eq!(engine.import(found(vec![merged])).unwrap(), 0);

        let step = engine.process(&mut [next], 2).unwrap();
        assert_eq!(step.columns[0][0].person_id, user);
        let Some(PersonChange::Upsert(now)) = step.updates.persons.get(&(TEAM, user)) else {
            panic!("user's person changed: {:?}", step.updates.persons)
        };
        assert_eq!(now.version, 4);
        assert_eq!(now.properties["plan"], "pro");
        assert_eq!(now.properties["seen"], true);
        let reader = store.persons_reader().unwrap();
        assert!(
            reader.person(TEAM, anon).unwrap().is_none(),
            "anon's own person is gone"
        );
    }

    #[test]
    fn nothing_a_pending_step_changed_is_imported_so_its_replay_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut engine = PersonEngine::new(store.clone(), 100);
        let mut pending = [batch(1, &[("e", "u", json!({"$set": {"a": 1}}))])];
        let step = engine.process(&mut pending, 1).unwrap();
        let written = step.updates.clone();

        // The sink holds the pending step's person (its own write) before the step commits.
        let uuid = person_uuid(TEAM, "u");
        let Some(PersonChange::Upsert(person)) = written.persons.get(&(TEAM, uuid)) else {
            panic!("u's person made")
        };
        let own = SharedPerson {
            team: TEAM,
            person: (**person).clone(),
            distinct_ids: vec![(
                "u".into(),
                DistinctId {
                    person: uuid,
                    version: 0,
                },
            )],
        };
        let next = batch(2, &[("e", "u", json!({}))]);
        assert!(engine.wanted(&[next]).ids.is_empty());
        assert_eq!(engine.import(found(vec![own])).unwrap(), 0);

        // A crash before the commit: the step is recomputed from the stored rows, over the
        // committed state, and gives the same changes.
        let rows = pending[0].batch.events.clone();
        let mut after_crash = PersonEngine::new(store, 100);
        let replayed = after_crash.recompute(vec![(TEAM, rows)], 1).unwrap();
        assert_eq!(replayed.updates.persons, written.persons);
        assert_eq!(replayed.updates.distinct_ids, written.distinct_ids);
    }
}
