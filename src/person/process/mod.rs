//! One event's person step, as PostHog's ingestion does it: personless events, merges
//! (`$identify`, `$create_alias`, `$merge_dangerously`), the property update, then groups
//! (`$groups`, `$groupidentify`).
//!
//! Sources: `person-state.ts`, `person-merge-service.ts`, `processPersonlessStep.ts`,
//! `groups.ts` and `create-event.ts` of PostHog's plugin server (notes §3). Where versions of
//! PostHog differ, the current one is followed: the survivor of a merge is the event's own
//! distinct id's person, its version is one past the higher of the two, and properties that
//! only describe the device do not make an update on their own.

use chrono::{DateTime, Duration, Utc};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use uuid::Uuid;

use super::rules::{self, Properties, PropertyUpdate};
use super::{
    person_uuid, placeholder_created_at, DistinctId, Group, IngestionWarning, Person, PersonChange,
    PersonColumns, PersonMode, PersonUpdates, TextCache, MAX_GROUP_TYPES, MAX_PROPERTIES_BYTES,
};
use crate::event::properties::{Edit, EventProperties};
use crate::event::EventRow;
use crate::ids::TeamId;

mod groups;

pub use groups::identified_group;
mod merge;

/// Whether the person step reads (and may change) `key` of an event's properties: the keys
/// PostHog's person and group rules look at.
fn is_read_key(key: &str) -> bool {
    matches!(
        key,
        "$process_person_profile"
            | "$set"
            | "$set_once"
            | "$unset"
            | "$anon_distinct_id"
            | "alias"
            | "$is_server"
            | "$groups"
            | "$group_type"
            | "$group_key"
            | "$group_set"
            | "$group_0"
            | "$group_1"
            | "$group_2"
            | "$group_3"
            | "$group_4"
    ) || rules::EVENT_TO_PERSON_PROPERTIES.contains(&key)
}

/// The persons, distinct ids and groups as they stand before the step: what the processor
/// reads. Its own changes it keeps in its [`PersonUpdates`] and reads from there first.
pub trait PersonState {
    type Error;
    fn distinct_id(&mut self, team: TeamId, id: &str) -> Result<Option<DistinctId>, Self::Error>;
    fn person(&mut self, team: TeamId, uuid: Uuid) -> Result<Option<Arc<Person>>, Self::Error>;
    /// The distinct ids pointing at a person.
    fn distinct_ids_of(&mut self, team: TeamId, uuid: Uuid) -> Result<Vec<String>, Self::Error>;
    /// `Some(is_merged)` if the id was seen on a personless event.
    fn personless(&mut self, team: TeamId, id: &str) -> Result<Option<bool>, Self::Error>;
    /// The team's group types and their indexes.
    fn group_types(&mut self, team: TeamId) -> Result<Vec<(String, u8)>, Self::Error>;
    fn group(&mut self, team: TeamId, index: u8, key: &str) -> Result<Option<Group>, Self::Error>;
    /// Whether an event with this uuid was processed already.
    fn seen(&mut self, team: TeamId, event: Uuid) -> Result<bool, Self::Error>;
}

/// Events that a personless event may not be.
const PERSON_EVENTS: [&str; 4] = [
    "$identify",
    "$create_alias",
    "$merge_dangerously",
    "$groupidentify",
];

/// Runs the person step over events, in order, against `state`.
pub struct PersonProcessor<'s, S: PersonState> {
    state: &'s mut S,
    pub updates: PersonUpdates,
}

/// How a person's version moves when this event's changes are written.
#[derive(Clone, Copy)]
enum NextVersion {
    /// Created by this event: version 0.
    New,
    /// Existing: one past what it had.
    After(u64),
    /// Merged: one past the higher of the two persons.
    Merged(u64),
}

/// The person an event is about, while the event changes it.
struct Working {
    person: Arc<Person>,
    next: NextVersion,
    changed: bool,
}

impl<'s, S: PersonState> PersonProcessor<'s, S> {
    pub fn new(state: &'s mut S) -> Self {
        PersonProcessor {
            state,
            updates: PersonUpdates::default(),
        }
    }

    /// Processes one event: its properties are rewritten as PostHog stores them, and the answer
    /// is its person columns, or `None` if the event is dropped (with a warning).
    pub fn process(
        &mut self,
        team: TeamId,
        row: &mut EventRow,
    ) -> Result<Option<PersonColumns>, S::Error> {
        if self.updates.seen.contains(&(team, row.uuid)) || self.state.seen(team, row.uuid)? {
            return self.seen_before(team, row).map(Some);
        }
        self.updates.seen.insert((team, row.uuid));
        // Only the keys the rules read are parsed; the text keeps the rest.
        let (entries, mut properties) = EventProperties::read(&row.properties, is_read_key);
        let personless = properties.get("$process_person_profile") == Some(&Value::Bool(false));
        // Writing the properties' text again costs as much as reading it: only what changed is.
        let mut edit = Edit::new();
        let columns = if personless {
            if PERSON_EVENTS.contains(&row.event.as_str()) {
                self.warn(
                    team,
                    "invalid_event_when_process_person_profile_is_false",
                    json!({"eventUuid": row.uuid, "event": row.event, "distinctId": row.distinct_id}),
                    row.timestamp,
                );
                return Ok(None);
            }
            for key in ["$set", "$set_once", "$unset"] {
                edit.remove(&mut properties, key);
            }
            self.personless_columns(team, row)?
        } else {
            edit.remove(&mut properties, "$process_person_profile");
            add_auto_person_properties(row, &entries, &mut properties, &mut edit);
            self.full(team, row, &properties)?
        };
        self.groups(team, row, &mut properties, &mut edit)?;
        if personless {
            for index in 0..MAX_GROUP_TYPES {
                edit.remove(&mut properties, &format!("$group_{index}"));
            }
        }
        let written = edit.apply(&entries, &properties);
        drop(entries);
        if let Some(written) = written {
            row.properties = written;
        }
        Ok(Some(columns))
    }

    /// The columns of an event processed before: its person as it stands, unchanged (a sink
    /// that keeps the first copy of an event drops this one anyway).
    fn seen_before(&mut self, team: TeamId, row: &EventRow) -> Result<PersonColumns, S::Error> {
        Ok(match self.person_of(team, &row.distinct_id)? {
            Some(person) => PersonColumns {
                person_id: person.uuid,
                person_properties: person.properties_text(),
                person_created_at: person.created_at,
                person_mode: PersonMode::Full,
            },
            None => PersonColumns {
                person_id: person_uuid(team, &row.distinct_id),
                person_properties: "{}".into(),
                person_created_at: placeholder_created_at(),
                person_mode: PersonMode::Propertyless,
            },
        })
    }

    /// PostHog's person deletion: the person of `distinct_id` is deleted and all its distinct
    /// ids freed (a later event of one of them starts a new person). Answers whether there was
    /// a person.
    pub fn delete_person(&mut self, team: TeamId, distinct_id: &str) -> Result<bool, S::Error> {
        self.updates
            .deletions_done
            .push((team, distinct_id.to_owned()));
        let Some(person) = self.person_of(team, distinct_id)? else {
            return Ok(false);
        };
        for id in self.distinct_ids_of(team, person.uuid)? {
            self.updates.distinct_ids.insert((team, id), None);
        }
        self.updates.persons.insert(
            (team, person.uuid),
            PersonChange::Deleted {
                version: person.version,
            },
        );
        Ok(true)
    }

    fn personless_columns(
        &mut self,
        team: TeamId,
        row: &EventRow,
    ) -> Result<PersonColumns, S::Error> {
        if let Some(found) = self.distinct_id(team, &row.distinct_id)? {
            if let Some(person) = self.person(team, found.person)? {
                let upgrade = row.timestamp > person.created_at + Duration::minutes(1);
                return Ok(PersonColumns {
                    person_id: person.uuid,
                    person_properties: "{}".into(),
                    person_created_at: person.created_at,
                    person_mode: if upgrade {
                        PersonMode::ForceUpgrade
                    } else {
                        PersonMode::Propertyless
                    },
                });
            }
        }
        if self.personless(team, &row.distinct_id)?.is_none() {
            self.updates
                .personless
                .insert((team, row.distinct_id.clone()), false);
        }
        Ok(PersonColumns {
            person_id: person_uuid(team, &row.distinct_id),
            person_properties: "{}".into(),
            person_created_at: placeholder_created_at(),
            person_mode: PersonMode::Propertyless,
        })
    }

    fn full(
        &mut self,
        team: TeamId,
        row: &EventRow,
        properties: &Map<String, Value>,
    ) -> Result<PersonColumns, S::Error> {
        let update = PropertyUpdate::of(properties);
        let other = merge_other(&row.event, properties);
        let mut working = match other {
            Some(other) if other != row.distinct_id => self.merge(team, row, &other, &update)?,
            _ => None,
        };
        if working.is_none() {
            working = match self.distinct_id(team, &row.distinct_id)? {
                Some(found) => self.person(team, found.person)?.map(|person| Working {
                    next: NextVersion::After(person.version),
                    person,
                    changed: false,
                }),
                None => None,
            };
        }
        // Whether the event's `$set` agrees with its person's properties, where that is known
        // already.
        let (mut working, set_agrees) = match working {
            Some(w) if !rules::never_updates_person(&row.event) => {
                self.apply(team, row, w, &update)
            }
            Some(w) => (w, None),
            None => {
                let person = Arc::new(self.new_person(
                    team,
                    row,
                    &update,
                    person_uuid(team, &row.distinct_id),
                    false,
                ));
                self.updates.distinct_ids.insert(
                    (team, row.distinct_id.clone()),
                    Some(DistinctId {
                        person: person.uuid,
                        version: 0,
                    }),
                );
                let created = Working {
                    person,
                    next: NextVersion::New,
                    changed: true,
                };
                (created, None)
            }
        };
        if working.changed {
            Arc::make_mut(&mut working.person).version = match working.next {
                NextVersion::New => 0,
                NextVersion::After(v) => v + 1,
                NextVersion::Merged(v) => v,
            };
            self.updates.persons.insert(
                (team, working.person.uuid),
                PersonChange::Upsert(working.person.clone()),
            );
        }
        // PostHog's `person_properties`: the person's properties with this event's `$set` over
        // them (what a device property that did not trigger an update would have been).
        let agrees = set_agrees.unwrap_or_else(|| update.set_agrees(&working.person.properties));
        let shown = if agrees {
            working.person.properties_text()
        } else {
            Arc::from(rules::overlaid_text(&working.person.properties, update.set))
        };
        Ok(PersonColumns {
            person_id: working.person.uuid,
            person_properties: shown,
            person_created_at: working.person.created_at,
            person_mode: PersonMode::Full,
        })
    }

    /// Applies the event's property update to `working`, unless the result would be too big.
    /// Answers the person, and whether the update's `$set` agrees with its properties if that
    /// was found out on the way.
    fn apply(
        &mut self,
        team: TeamId,
        row: &EventRow,
        working: Working,
        update: &PropertyUpdate,
    ) -> (Working, Option<bool>) {
        if update.is_empty() {
            return (working, Some(true));
        }
        let effect = update.effect(&working.person.properties, &row.event);
        if !effect.changes {
            return (working, Some(effect.set_agrees));
        }
        (self.change(team, row, working, update), None)
    }

    /// Applies an update that changes something, unless the result would be too big.
    fn change(
        &mut self,
        team: TeamId,
        row: &EventRow,
        mut working: Working,
        update: &PropertyUpdate,
    ) -> Working {
        let before = working.person.clone();
        let person = Arc::make_mut(&mut working.person);
        person.text = TextCache::default();
        let target = Properties {
            values: &mut person.properties,
            last_operation: &mut person.properties_last_operation,
            last_updated_at: &mut person.properties_last_updated_at,
        };
        if !rules::apply_update(target, update, &row.event, row.timestamp) {
            working.person = before;
            return working;
        }
        let text = serde_json::to_string(&working.person.properties).unwrap_or_default();
        if text.len() > MAX_PROPERTIES_BYTES {
            self.warn(
                team,
                "person_properties_size_violation",
                json!({"personId": before.uuid, "distinctId": row.distinct_id, "eventUuid": row.uuid}),
                row.timestamp,
            );
            working.person = before;
            return working;
        }
        // Measured once, the text serves as the person's properties text too.
        Arc::make_mut(&mut working.person).text = TextCache::of(Arc::from(text));
        working.changed = true;
        working
    }

    fn new_person(
        &mut self,
        team: TeamId,
        row: &EventRow,
        update: &PropertyUpdate,
        uuid: Uuid,
        is_identified: bool,
    ) -> Person {
        let mut properties = update.set_once.clone();
        properties.extend(update.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        let stamp = Value::String(crate::event::timestamp_text(row.timestamp));
        let mut last_operation = Map::new();
        let mut last_updated_at = Map::new();
        for key in properties.keys() {
            let op = if update.set.contains_key(key) {
                "set"
            } else {
                "set_once"
            };
            last_operation.insert(key.clone(), Value::String(op.into()));
            last_updated_at.insert(key.clone(), stamp.clone());
        }
        if json_len(&properties) > MAX_PROPERTIES_BYTES {
            self.warn(
                team,
                "person_properties_size_violation",
                json!({"personId": uuid, "distinctId": row.distinct_id, "eventUuid": row.uuid}),
                row.timestamp,
            );
            properties.clear();
            last_operation.clear();
            last_updated_at.clear();
        }
        properties.insert(
            "$creator_event_uuid".into(),
            Value::String(row.uuid.to_string()),
        );
        Person {
            uuid,
            properties,
            properties_last_operation: last_operation,
            properties_last_updated_at: last_updated_at,
            created_at: row.timestamp,
            version: 0,
            is_identified,
            text: TextCache::default(),
        }
    }

    /// Records an ingestion warning.
    fn warn(&mut self, team: TeamId, kind: &str, details: Value, at: DateTime<Utc>) {
        self.updates.warnings.push((
            team,
            IngestionWarning {
                kind: kind.into(),
                details: details.to_string(),
                timestamp: at,
            },
        ));
    }

    // Reads through this step's own changes first.

    fn distinct_id(&mut self, team: TeamId, id: &str) -> Result<Option<DistinctId>, S::Error> {
        // Most steps change no distinct id: no key is made to look in an empty map.
        if self.updates.distinct_ids.is_empty() {
            return self.state.distinct_id(team, id);
        }
        match self.updates.distinct_ids.get(&(team, id.to_owned())) {
            Some(found) => Ok(found.clone()),
            None => self.state.distinct_id(team, id),
        }
    }

    fn person(&mut self, team: TeamId, uuid: Uuid) -> Result<Option<Arc<Person>>, S::Error> {
        match self.updates.persons.get(&(team, uuid)) {
            Some(PersonChange::Upsert(person)) => Ok(Some(person.clone())),
            Some(PersonChange::Deleted { .. }) => Ok(None),
            None => self.state.person(team, uuid),
        }
    }

    fn person_of(&mut self, team: TeamId, id: &str) -> Result<Option<Arc<Person>>, S::Error> {
        match self.distinct_id(team, id)? {
            Some(found) => self.person(team, found.person),
            None => Ok(None),
        }
    }

    fn personless(&mut self, team: TeamId, id: &str) -> Result<Option<bool>, S::Error> {
        if self.updates.personless.is_empty() {
            return self.state.personless(team, id);
        }
        match self.updates.personless.get(&(team, id.to_owned())) {
            Some(merged) => Ok(Some(*merged)),
            None => self.state.personless(team, id),
        }
    }

    fn distinct_ids_of(&mut self, team: TeamId, uuid: Uuid) -> Result<Vec<String>, S::Error> {
        let mut ids: Vec<String> = self
            .state
            .distinct_ids_of(team, uuid)?
            .into_iter()
            .filter(
                |id| match self.updates.distinct_ids.get(&(team, id.clone())) {
                    Some(now) => now.as_ref().is_some_and(|d| d.person == uuid),
                    None => true,
                },
            )
            .collect();
        for ((t, id), now) in &self.updates.distinct_ids {
            if *t == team && now.as_ref().is_some_and(|d| d.person == uuid) && !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        Ok(ids)
    }
}

/// Adds PostHog's automatic person properties to the event's `$set` and `$set_once`. Where
/// the event has no such object of its own, the new object's text is made of the values'
/// text as it came, rather than written again from the values.
fn add_auto_person_properties(
    row: &EventRow,
    entries: &EventProperties<'_>,
    properties: &mut Map<String, Value>,
    edit: &mut Edit,
) {
    let auto = rules::auto_person_properties(&row.event, properties);
    // Only a new object is written from the values' text; an object of the event's own is
    // added to, and nothing is written for an empty list.
    let new_object = |name: &str, list: &[(&str, usize, &Value)]| {
        !list.is_empty() && !matches!(properties.get(name), Some(Value::Object(_)))
    };
    let wanted = [("$set", &auto.set), ("$set_once", &auto.set_once)];
    let raw = if wanted.iter().any(|(name, list)| new_object(name, list)) {
        rules::find_listed(entries.raw_values(is_read_key).into_iter())
    } else {
        [None; rules::EVENT_TO_PERSON_PROPERTIES.len()]
    };
    let texts = wanted.map(|(name, list)| {
        if new_object(name, list) {
            object_text(&raw, list)
        } else {
            None
        }
    });
    for ((name, extra), text) in rules::owned_auto_properties(auto).into_iter().zip(texts) {
        let had = properties.contains_key(name);
        if rules::add_to_object(properties, name, extra) {
            match text {
                Some(text) => edit.wrote_text(name, had, text),
                None => edit.wrote(name, had),
            }
        }
    }
}

/// The text of an object of the listed event properties under new names (names that need no
/// escaping), each value's text (`raw`, by place in the list) copied as the event gave it;
/// `None` if one has no text of its own.
fn object_text(
    raw: &[Option<&RawValue>],
    list: &[(&'static str, usize, &Value)],
) -> Option<String> {
    let mut out = String::with_capacity(list.len() * 48 + 2);
    out.push('{');
    for (name, source, _) in list {
        if out.len() > 1 {
            out.push(',');
        }
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        out.push_str(raw.get(*source).copied().flatten()?.get());
    }
    out.push('}');
    Some(out)
}

/// JavaScript's `String(value)` for an id: strings as they are, other values as JSON text.
/// The events that name a second distinct id to merge with the event's own.
pub fn is_merge_event(event: &str) -> bool {
    matches!(event, "$identify" | "$create_alias" | "$merge_dangerously")
}

/// The second distinct id a merge event names (`$anon_distinct_id`, or a truthy `alias`).
pub fn merge_other(event: &str, properties: &Map<String, Value>) -> Option<String> {
    match event {
        "$identify" => properties.get("$anon_distinct_id").map(id_text),
        "$create_alias" | "$merge_dangerously" => properties
            .get("alias")
            .filter(|v| crate::event::truthy(v))
            .map(id_text),
        _ => None,
    }
}

fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_len(map: &Map<String, Value>) -> usize {
    serde_json::to_string(map).map_or(0, |s| s.len())
}
