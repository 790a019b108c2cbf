//! Persons, distinct ids and groups as PostHog keeps them, and PostHog's pure rules for
//! updating them from events ([`rules`], [`process`]).
//!
//! Owns: the shapes of a person, a distinct id, a group and an ingestion warning; the columns an
//! event row gets from its person ([`PersonColumns`]); the changes one step of processing makes
//! ([`PersonUpdates`]), which the state store commits and every sink writes in its own shape.
//! Must never: do I/O. [`process::PersonProcessor`] reads and changes state only through the
//! [`process::PersonState`] its caller gives it, so the same events on the same state always
//! give the same persons and versions.

pub mod process;
pub mod rules;
#[cfg(test)]
mod scenarios;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ids::TeamId;

/// PostHog's namespace for person uuids derived from a distinct id
/// (`plugin-server/src/worker/ingestion/person-uuid.ts`).
pub const PERSON_UUID_NAMESPACE: Uuid = Uuid::from_u128(0x932979b4_65c3_4424_8467_0b66ec27bc22);

/// The uuid PostHog gives a new person (and a personless event's placeholder person):
/// v5 of `"{team}:{distinct_id}"`.
pub fn person_uuid(team: TeamId, distinct_id: &str) -> Uuid {
    Uuid::new_v5(
        &PERSON_UUID_NAMESPACE,
        format!("{team}:{distinct_id}").as_bytes(),
    )
}

/// The `created_at` of the placeholder person of personless events (PostHog's
/// `processPersonlessStep`): 1970-01-01T00:00:05Z.
pub fn placeholder_created_at() -> DateTime<Utc> {
    DateTime::from_timestamp(5, 0).unwrap_or_default()
}

/// PostHog's largest person (and group) properties object, as JSON text; an update that would
/// grow past it is refused with a warning.
pub const MAX_PROPERTIES_BYTES: usize = 512 * 1024;
/// At most this many group types per team (PostHog's `MAX_GROUP_TYPES_PER_TEAM`).
pub const MAX_GROUP_TYPES: u8 = 5;

/// A person, as `posthog_person` holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub uuid: Uuid,
    #[serde(with = "json_map")]
    pub properties: Map<String, Value>,
    /// Per property: `set` or `set_once`, the operation that last wrote it.
    #[serde(with = "json_map")]
    pub properties_last_operation: Map<String, Value>,
    /// Per property: when it was last written (the writing event's timestamp).
    #[serde(with = "json_map")]
    pub properties_last_updated_at: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    /// Rises by one per change (a merge: one past the higher of the two persons).
    pub version: u64,
    pub is_identified: bool,
    /// `properties` as JSON text, made at most once per state of the person.
    #[serde(skip)]
    pub text: TextCache,
}

impl Person {
    /// The properties as JSON text (what most events show as their `person_properties`).
    pub fn properties_text(&self) -> Arc<str> {
        self.text
            .0
            .get_or_init(|| Arc::from(serde_json::to_string(&self.properties).unwrap_or_default()))
            .clone()
    }
}

/// A person's properties text, made once: empty in a clone (a person is cloned to be changed)
/// and never part of equality or the stored form. Whoever changes `properties` in place
/// resets it (`TextCache::default()`).
#[derive(Default)]
pub struct TextCache(OnceLock<Arc<str>>);

impl TextCache {
    /// A cache holding `text`, the properties' text as serde_json writes it.
    pub fn of(text: Arc<str>) -> Self {
        TextCache(OnceLock::from(text))
    }
}

impl Clone for TextCache {
    fn clone(&self) -> Self {
        TextCache::default()
    }
}

impl PartialEq for TextCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for TextCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextCache")
    }
}

/// Where a distinct id points, and how often it has moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistinctId {
    pub person: Uuid,
    pub version: u64,
}

/// A person as a store shared by several boxes holds it (PostHog's `posthog_person`), with the
/// distinct ids pointing at it there: what a box imports when another box has moved on.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedPerson {
    pub team: TeamId,
    pub person: Person,
    pub distinct_ids: Vec<(String, DistinctId)>,
}

/// What one step names that a store shared by several boxes may hold newer: distinct ids
/// (each event's own, a merge's second), the teams (for their group types), and the groups
/// `$groupidentify` events change, by type name and key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedWanted {
    pub ids: Vec<(TeamId, String)>,
    pub teams: Vec<TeamId>,
    pub groups: Vec<(TeamId, String, String)>,
}

impl SharedWanted {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.teams.is_empty() && self.groups.is_empty()
    }
}

/// What the shared store holds of a [`SharedWanted`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedState {
    pub persons: Vec<SharedPerson>,
    /// The teams' group types and their indexes.
    pub group_types: Vec<(TeamId, String, u8)>,
    /// The groups found, by team, type index and key.
    pub groups: Vec<(TeamId, u8, String, Group)>,
}

/// A group, as `posthog_group` holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    #[serde(with = "json_map")]
    pub properties: Map<String, Value>,
    #[serde(with = "json_map")]
    pub properties_last_operation: Map<String, Value>,
    #[serde(with = "json_map")]
    pub properties_last_updated_at: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    pub version: u64,
}

/// Which person columns an event row carries (PostHog's `person_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PersonMode {
    Full,
    Propertyless,
    ForceUpgrade,
}

impl PersonMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PersonMode::Full => "full",
            PersonMode::Propertyless => "propertyless",
            PersonMode::ForceUpgrade => "force_upgrade",
        }
    }
}

/// The person columns of one stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct PersonColumns {
    pub person_id: Uuid,
    /// The person's properties after this event (`{}` for a personless event), JSON text.
    pub person_properties: Arc<str>,
    pub person_created_at: DateTime<Utc>,
    pub person_mode: PersonMode,
}

/// A warning about one event, kept per team in PostHog's shape (`type`, `details`, `timestamp`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestionWarning {
    pub kind: String,
    /// JSON object text.
    pub details: String,
    pub timestamp: DateTime<Utc>,
}

/// A person's last state in one step: changed (or created), or deleted (merged away, or by an
/// operator) with the version it had.
#[derive(Clone, Debug, PartialEq)]
pub enum PersonChange {
    Upsert(Arc<Person>),
    Deleted { version: u64 },
}

/// Everything one step of person processing changed, as the last state of each thing changed:
/// the state store commits it with the pipeline's progress, and each sink writes it beside the
/// events. Each key appears once, so the order of applying them does not matter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersonUpdates {
    pub persons: BTreeMap<(TeamId, Uuid), PersonChange>,
    /// Distinct ids added or moved (`Some`), or freed by a person's deletion (`None`).
    pub distinct_ids: BTreeMap<(TeamId, String), Option<DistinctId>>,
    /// Distinct ids first seen on a personless event (`false`), or since merged (`true`).
    pub personless: BTreeMap<(TeamId, String), bool>,
    /// Group types given an index.
    pub group_types: BTreeMap<(TeamId, String), u8>,
    pub groups: BTreeMap<(TeamId, u8, String), Group>,
    pub warnings: Vec<(TeamId, IngestionWarning)>,
    /// Operators' deletion requests this step carried out (removed with the commit).
    pub deletions_done: Vec<(TeamId, String)>,
    /// The events this step processed: an event seen again (an SDK resending a request whose
    /// answer it lost, a replay) never changes a person twice.
    pub seen: BTreeSet<(TeamId, Uuid)>,
}

impl PersonUpdates {
    pub fn is_empty(&self) -> bool {
        self.warnings.is_empty()
            && self.deletions_done.is_empty()
            && self.seen.is_empty()
            && !self.touches_state()
    }

    fn touches_state(&self) -> bool {
        !self.personless.is_empty() || self.touches_sinks()
    }

    /// Whether the sinks have anything of this to write (warnings and personless ids stay in the
    /// appliance's state).
    pub fn touches_sinks(&self) -> bool {
        !(self.persons.is_empty()
            && self.distinct_ids.is_empty()
            && self.group_types.is_empty()
            && self.groups.is_empty())
    }

    /// Applies `later` on top: what it changed again, its state wins.
    pub fn extend(&mut self, later: PersonUpdates) {
        self.persons.extend(later.persons);
        self.distinct_ids.extend(later.distinct_ids);
        self.personless.extend(later.personless);
        self.group_types.extend(later.group_types);
        self.groups.extend(later.groups);
        self.warnings.extend(later.warnings);
        self.deletions_done.extend(later.deletions_done);
        self.seen.extend(later.seen);
    }
}

/// A JSON object kept as its text in binary formats (postcard cannot describe untyped JSON).
mod json_map {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    pub fn serialize<S: Serializer>(value: &Map<String, Value>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            value.serialize(s)
        } else {
            s.serialize_str(&serde_json::to_string(value).unwrap_or_default())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
        if d.is_human_readable() {
            return Map::deserialize(d);
        }
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn person_uuids_are_posthogs() {
        // uuid5(NAMESPACE, "2:my-id"), the value PostHog's person-uuid.ts gives.
        let expected = Uuid::new_v5(
            &Uuid::parse_str("932979b4-65c3-4424-8467-0b66ec27bc22").unwrap(),
            b"2:my-id",
        );
        assert_eq!(person_uuid(2, "my-id"), expected);
        assert_ne!(person_uuid(3, "my-id"), expected);
    }
}
