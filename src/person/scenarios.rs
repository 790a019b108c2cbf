//! PostHog's person scenarios, run through the processor against an in-memory state.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::process::{PersonProcessor, PersonState};
use super::rules::add_auto_person_properties;
use super::*;
use crate::event::EventRow;

/// The committed state: what the store would hold.
#[derive(Default)]
struct Memory {
    persons: BTreeMap<(TeamId, Uuid), Person>,
    ids: BTreeMap<(TeamId, String), DistinctId>,
    personless: BTreeMap<(TeamId, String), bool>,
    group_types: BTreeMap<(TeamId, String), u8>,
    groups: BTreeMap<(TeamId, u8, String), Group>,
    warnings: Vec<IngestionWarning>,
    seen: std::collections::BTreeSet<(TeamId, Uuid)>,
    /// Events run so far: each gets the next uuid and minute.
    next: u128,
}

impl PersonState for Memory {
    type Error = Infallible;
    fn distinct_id(&mut self, team: TeamId, id: &str) -> Result<Option<DistinctId>, Infallible> {
        Ok(self.ids.get(&(team, id.to_owned())).cloned())
    }
    fn person(&mut self, team: TeamId, uuid: Uuid) -> Result<Option<Arc<Person>>, Infallible> {
        Ok(self.persons.get(&(team, uuid)).cloned().map(Arc::new))
    }
    fn distinct_ids_of(&mut self, team: TeamId, uuid: Uuid) -> Result<Vec<String>, Infallible> {
        Ok(self
            .ids
            .iter()
            .filter(|((t, _), d)| *t == team && d.person == uuid)
            .map(|((_, id), _)| id.clone())
            .collect())
    }
    fn personless(&mut self, team: TeamId, id: &str) -> Result<Option<bool>, Infallible> {
        Ok(self.personless.get(&(team, id.to_owned())).copied())
    }
    fn group_types(&mut self, team: TeamId) -> Result<Vec<(String, u8)>, Infallible> {
        Ok(self
            .group_types
            .iter()
            .filter(|((t, _), _)| *t == team)
            .map(|((_, n), i)| (n.clone(), *i))
            .collect())
    }
    fn group(&mut self, team: TeamId, index: u8, key: &str) -> Result<Option<Group>, Infallible> {
        Ok(self.groups.get(&(team, index, key.to_owned())).cloned())
    }
    fn seen(&mut self, team: TeamId, event: Uuid) -> Result<bool, Infallible> {
        Ok(self.seen.contains(&(team, event)))
    }
}

impl Memory {
    fn commit(&mut self, u: PersonUpdates) {
        for (k, c) in u.persons {
            match c {
                PersonChange::Upsert(p) => {
                    self.persons.insert(k, (*p).clone());
                }
                PersonChange::Deleted { .. } => {
                    self.persons.remove(&k);
                }
            }
        }
        for (k, d) in u.distinct_ids {
            match d {
                Some(d) => self.ids.insert(k, d),
                None => self.ids.remove(&k),
            };
        }
        self.personless.extend(u.personless);
        self.group_types.extend(u.group_types);
        self.groups.extend(u.groups);
        self.warnings.extend(u.warnings.into_iter().map(|(_, w)| w));
        self.seen.extend(u.seen);
    }

    /// Runs events one at a time, committing after each (as separate batches would).
    fn run(&mut self, events: &[(&str, &str, Value)]) -> Vec<Option<(EventRow, PersonColumns)>> {
        let mut out = Vec::new();
        for (name, id, props) in events {
            self.next += 1;
            let mut row = EventRow {
                uuid: Uuid::from_u128(self.next),
                event: (*name).into(),
                distinct_id: (*id).into(),
                properties: props.to_string(),
                timestamp: at(self.next as i64 - 1),
                elements_chain: String::new(),
            };
            let mut p = PersonProcessor::new(self);
            let Ok(found) = p.process(1, &mut row);
            let updates = p.updates;
            self.commit(updates);
            out.push(found.map(|c| (row, c)));
        }
        out
    }

    fn person_of(&self, id: &str) -> &Person {
        let d = &self.ids[&(1, id.to_owned())];
        &self.persons[&(1, d.person)]
    }
}

fn at(minutes: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000, 0).unwrap() + Duration::minutes(minutes)
}

#[test]
fn anonymous_browsing_then_login_keeps_one_person() {
    let mut m = Memory::default();
    let out = m.run(&[
        (
            "$pageview",
            "anon",
            json!({"$browser": "Firefox", "$set": {"plan": "free"}}),
        ),
        (
            "$identify",
            "user@x",
            json!({"$anon_distinct_id": "anon", "$set": {"email": "user@x"}}),
        ),
        ("$pageview", "user@x", json!({})),
    ]);
    let anon_person = person_uuid(1, "anon");
    for event in &out {
        assert_eq!(event.as_ref().unwrap().1.person_id, anon_person);
    }
    let p = m.person_of("user@x");
    assert_eq!(p.uuid, anon_person);
    assert!(p.is_identified);
    assert_eq!(p.properties["plan"], "free");
    assert_eq!(p.properties["email"], "user@x");
    assert_eq!(p.properties["$initial_browser"], "Firefox");
    // Created by the first event, changed by the identify; the last event changed nothing.
    assert_eq!(p.version, 1);
    assert_eq!(m.ids[&(1, "user@x".into())].version, 0);
    let (row, cols) = out[1].clone().unwrap();
    let shown: Value = serde_json::from_str(&cols.person_properties).unwrap();
    assert_eq!(shown["email"], "user@x");
    assert_eq!(cols.person_mode, PersonMode::Full);
    assert!(row.properties.contains("$anon_distinct_id"));
}

#[test]
fn two_devices_then_login_merge_into_the_users_person() {
    let mut m = Memory::default();
    m.run(&[
        (
            "$pageview",
            "phone",
            json!({"$set": {"a": "phone", "p": 1}}),
        ),
        ("$identify", "user", json!({"$anon_distinct_id": "phone"})),
        (
            "$pageview",
            "laptop",
            json!({"$set": {"a": "laptop", "l": 1}}),
        ),
        ("$identify", "user", json!({"$anon_distinct_id": "laptop"})),
    ]);
    let p = m.person_of("laptop").clone();
    assert_eq!(
        p.uuid,
        person_uuid(1, "phone"),
        "the user's person survives"
    );
    assert_eq!(m.person_of("user").uuid, p.uuid);
    assert_eq!(p.properties["a"], "phone", "the target's properties win");
    assert_eq!(p.properties["l"], 1);
    assert_eq!(p.created_at, at(0), "the older created_at stays");
    assert!(!m.persons.contains_key(&(1, person_uuid(1, "laptop"))));
    // phone person: 0 created, 1 identified; laptop person: 0; merged: max(1, 0) + 1.
    assert_eq!(p.version, 2);
    assert_eq!(
        m.ids[&(1, "laptop".into())].version,
        1,
        "a moved id's version rises"
    );
}

#[test]
fn an_identified_person_is_not_merged_except_dangerously() {
    let mut m = Memory::default();
    m.run(&[
        ("$identify", "alice", json!({"$anon_distinct_id": "a-anon"})),
        ("$identify", "bob", json!({"$anon_distinct_id": "b-anon"})),
        ("$create_alias", "alice", json!({"alias": "bob"})),
    ]);
    assert_ne!(m.person_of("alice").uuid, m.person_of("bob").uuid);
    assert_eq!(
        m.warnings.last().unwrap().kind,
        "cannot_merge_already_identified"
    );
    m.run(&[("$merge_dangerously", "alice", json!({"alias": "bob"}))]);
    assert_eq!(m.person_of("alice").uuid, m.person_of("bob").uuid);
}

#[test]
fn illegal_ids_never_merge() {
    let mut m = Memory::default();
    let out = m.run(&[
        ("$pageview", "null", json!({})),
        ("$identify", "user", json!({"$anon_distinct_id": "null"})),
        (
            "$identify",
            "user",
            json!({"$anon_distinct_id": "'anonymous'"}),
        ),
    ]);
    assert!(
        out.iter().all(Option::is_some),
        "the events are still stored"
    );
    assert_ne!(m.person_of("null").uuid, m.person_of("user").uuid);
    assert_eq!(m.warnings.len(), 2);
    assert_eq!(m.warnings[0].kind, "cannot_merge_with_illegal_distinct_id");
    let details: Value = serde_json::from_str(&m.warnings[0].details).unwrap();
    assert_eq!(details["illegalDistinctId"], "null");
}

#[test]
fn personless_events_then_identify_reuse_the_placeholder_uuid() {
    let mut m = Memory::default();
    let out = m.run(&[
        (
            "$pageview",
            "anon",
            json!({"$process_person_profile": false, "$set": {"x": 1}, "$groups": {"org": "o1"}}),
        ),
        (
            "$identify",
            "anon",
            json!({"$process_person_profile": false}),
        ),
        (
            "$identify",
            "user",
            json!({"$anon_distinct_id": "anon", "$set": {"email": "e"}}),
        ),
    ]);
    let (row, cols) = out[0].clone().unwrap();
    assert_eq!(cols.person_mode, PersonMode::Propertyless);
    assert_eq!(&*cols.person_properties, "{}");
    assert_eq!(cols.person_created_at, placeholder_created_at());
    assert_eq!(cols.person_id, person_uuid(1, "anon"));
    let props: Value = serde_json::from_str(&row.properties).unwrap();
    assert!(props.get("$set").is_none() && props.get("$group_0").is_none());
    assert_eq!(props["$process_person_profile"], false);
    assert!(out[1].is_none(), "a personless $identify is dropped");
    assert_eq!(
        m.warnings[0].kind,
        "invalid_event_when_process_person_profile_is_false"
    );
    // Both ids new to persons, the anonymous one seen personless: its uuid is the person's.
    let p = m.person_of("user");
    assert_eq!(p.uuid, person_uuid(1, "anon"));
    assert!(m.personless[&(1, "anon".into())]);
    assert!(!p.properties.contains_key("x"));
}

#[test]
fn personless_event_of_a_known_person_is_force_upgraded_after_a_minute() {
    let mut m = Memory::default();
    let out = m.run(&[
        ("$pageview", "u", json!({"$set": {"a": 1}})),
        ("$pageview", "u", json!({"$process_person_profile": false})),
        ("$pageview", "u", json!({"$process_person_profile": false})),
    ]);
    let first = out[0].clone().unwrap().1;
    let second = out[1].clone().unwrap().1;
    let third = out[2].clone().unwrap().1;
    assert_eq!(second.person_id, first.person_id);
    assert_eq!(
        second.person_mode,
        PersonMode::Propertyless,
        "not more than a minute after"
    );
    assert_eq!(
        third.person_mode,
        PersonMode::ForceUpgrade,
        "two minutes after creation"
    );
    assert_eq!(&*third.person_properties, "{}");
}

#[test]
fn set_set_once_unset_across_events() {
    let mut m = Memory::default();
    m.run(&[
        (
            "e",
            "u",
            json!({"$set_once": {"first": 1}, "$set": {"s": 1, "gone": 1}}),
        ),
        (
            "e",
            "u",
            json!({"$set_once": {"first": 2, "second": 2}, "$set": {"s": 2}}),
        ),
        ("e", "u", json!({"$unset": ["gone"]})),
        ("e", "u", json!({"$set": {"s": 2}})),
        ("$exception", "u", json!({"$set": {"s": 3}})),
    ]);
    let p = m.person_of("u");
    assert_eq!(p.properties["first"], 1);
    assert_eq!(p.properties["second"], 2);
    assert_eq!(p.properties["s"], 2);
    assert!(!p.properties.contains_key("gone"));
    assert_eq!(
        p.version, 2,
        "created, changed, unset; the same $set and $exception change nothing"
    );
    assert_eq!(p.properties_last_operation["second"], "set_once");
}

#[test]
fn groups_get_indexes_and_groupidentify_upserts() {
    let mut m = Memory::default();
    let out = m.run(&[
        (
            "$groupidentify",
            "u",
            json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"size": 10}}),
        ),
        (
            "e",
            "u",
            json!({"$groups": {"project": "p1", "company": "acme"}}),
        ),
        (
            "$groupidentify",
            "u",
            json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"size": 11}}),
        ),
        (
            "$groupidentify",
            "u",
            json!({"$group_type": "company", "$group_key": "acme", "$group_set": {"size": 11}}),
        ),
    ]);
    let props: Value = serde_json::from_str(&out[1].clone().unwrap().0.properties).unwrap();
    assert_eq!(props["$group_0"], "acme");
    assert_eq!(props["$group_1"], "p1");
    let g = &m.groups[&(1, 0, "acme".into())];
    assert_eq!(g.properties["size"], 11);
    assert_eq!(g.version, 2);
    for i in 0..6 {
        m.run(&[("e", "u", json!({"$groups": {format!("t{i}"): "k"}}))]);
    }
    assert_eq!(m.group_types.len(), 5, "at most five group types");
    let before = m.warnings.len();
    let many: serde_json::Map<String, Value> = (0..1000)
        .map(|i| (format!("many{i}"), json!("k")))
        .collect();
    m.run(&[("e", "u", json!({"$groups": many}))]);
    assert_eq!(
        m.warnings.len(),
        before + 1,
        "one warning for an event naming many types"
    );
    assert_eq!(m.warnings.last().unwrap().kind, "group_type_limit_reached");
}

#[test]
fn an_event_seen_again_changes_nothing() {
    let mut m = Memory::default();
    m.run(&[("$pageview", "a", json!({"$set": {"device": "a"}}))]);
    m.run(&[("$identify", "u", json!({"$anon_distinct_id": "a"}))]);
    let before = m.person_of("u").clone();
    // The first event again (same uuid): its $set must not apply to the merged person.
    let mut again = EventRow {
        uuid: Uuid::from_u128(1),
        event: "$pageview".into(),
        distinct_id: "a".into(),
        properties: json!({"$set": {"device": "other"}}).to_string(),
        timestamp: at(5),
        elements_chain: String::new(),
    };
    let mut p = PersonProcessor::new(&mut m);
    let Ok(columns) = p.process(1, &mut again);
    assert!(p.updates.persons.is_empty());
    assert_eq!(columns.unwrap().person_id, before.uuid);
    assert_eq!(m.person_of("u"), &before);
}

#[test]
fn processing_the_stored_rows_again_changes_nothing() {
    // After a crash, batches are recomputed from the rows as stored (already rewritten).
    let events = [
        (
            "$pageview",
            "anon",
            json!({"$browser": "Firefox", "$groups": {"org": "o"}}),
        ),
        (
            "$identify",
            "user",
            json!({"$anon_distinct_id": "anon", "$set": {"email": "e"}}),
        ),
        ("$pageview", "x", json!({"$process_person_profile": false})),
    ];
    let mut once = Memory::default();
    let rows: Vec<EventRow> = once
        .run(&events)
        .into_iter()
        .flatten()
        .map(|(r, _)| r)
        .collect();
    let mut twice = Memory::default();
    for row in rows {
        let mut row = row.clone();
        let mut p = PersonProcessor::new(&mut twice);
        let Ok(_) = p.process(1, &mut row);
        let updates = p.updates;
        twice.commit(updates);
    }
    assert_eq!(once.persons, twice.persons);
    assert_eq!(once.ids, twice.ids);
    assert_eq!(once.personless, twice.personless);
    assert_eq!(once.group_types, twice.group_types);
}

#[test]
fn stored_events_carry_the_automatic_person_properties() {
    let mut m = Memory::default();
    let given = [
        // No `$set` of its own: the objects are made of the values' text as it came.
        json!({"$browser": "Fire\"fox\u{e9}", "$os_name": "Android", "$screen_width": 1.50}),
        // Its own `$set` wins over the automatic value; its `$set_once` is added to.
        json!({"$browser": "A", "$os": "Linux", "$set": {"$browser": "Mine"}, "$set_once": {"x": 1}}),
        // Not an object: replaced.
        json!({"$os": "Linux", "$set": "odd"}),
    ];
    for props in given {
        let mut expected = props.as_object().cloned().unwrap();
        add_auto_person_properties("$pageview", &mut expected);
        let out = m.run(&[("$pageview", "u", props)]);
        let (row, _) = out[0].clone().unwrap();
        let stored: Map<String, Value> = serde_json::from_str(&row.properties).unwrap();
        assert_eq!(stored, expected, "{}", row.properties);
    }
    let mut row = EventRow {
        uuid: Uuid::from_u128(1_000),
        event: "$pageview".into(),
        distinct_id: "v".into(),
        properties: r#"{"$screen_width": 1.50}"#.into(),
        timestamp: at(0),
        elements_chain: String::new(),
    };
    let Ok(_) = PersonProcessor::new(&mut m).process(1, &mut row);
    assert_eq!(
        row.properties,
        r#"{"$screen_width": 1.50,"$set":{"$screen_width":1.50},"$set_once":{"$initial_screen_width":1.50}}"#,
        "the value's text is copied as it came"
    );
}
