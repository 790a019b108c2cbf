//! The group part of the person step: `$groups` to `$group_N` through the team's group type
//! indexes (at most five types), and `$groupidentify` to a group with its properties and version
//! (PostHog's `groups.ts`).

use serde_json::{json, Map, Value};

use super::{id_text, json_len, Edit, PersonProcessor, PersonState};
use crate::event::EventRow;
use crate::ids::TeamId;
use crate::person::rules::{self, Properties, PropertyUpdate};
use crate::person::{Group, MAX_GROUP_TYPES, MAX_PROPERTIES_BYTES};

/// The group (type name and key) a `$groupidentify` event sets properties of.
pub fn identified_group(event: &str, properties: &Map<String, Value>) -> Option<(String, String)> {
    if event != "$groupidentify" {
        return None;
    }
    let group_type = properties.get("$group_type").map(id_text)?;
    let key = properties
        .get("$group_key")
        .filter(|v| !v.is_null())
        .map(id_text)?;
    Some((group_type, key))
}

impl<S: PersonState> PersonProcessor<'_, S> {
    /// `$groups` to `$group_N`, and `$groupidentify` to a group; records in `edit` which
    /// properties it added or changed.
    pub(super) fn groups(
        &mut self,
        team: TeamId,
        row: &EventRow,
        properties: &mut Map<String, Value>,
        edit: &mut Edit,
    ) -> Result<(), S::Error> {
        if let Some((group_type, key)) = identified_group(&row.event, properties) {
            if let Some(index) = self.group_type_index(team, &group_type, row)? {
                let set = match properties.get("$group_set") {
                    Some(Value::Object(set)) => set.clone(),
                    _ => Map::new(),
                };
                self.upsert_group(team, index, key, set, row)?;
            }
        }
        let Some(Value::Object(groups)) = properties.get("$groups").cloned() else {
            return Ok(());
        };
        for (group_type, key) in groups {
            if let Some(index) = self.group_type_index(team, &group_type, row)? {
                let name = format!("$group_{index}");
                if properties.get(&name) != Some(&key) {
                    let was_there = properties.insert(name.clone(), key).is_some();
                    edit.wrote(&name, was_there);
                }
            }
        }
        Ok(())
    }

    fn group_type_index(
        &mut self,
        team: TeamId,
        group_type: &str,
        row: &EventRow,
    ) -> Result<Option<u8>, S::Error> {
        let mut known = self.state.group_types(team)?;
        known.extend(
            self.updates
                .group_types
                .iter()
                .filter(|((t, _), _)| *t == team)
                .map(|((_, name), index)| (name.clone(), *index)),
        );
        if let Some((_, index)) = known.iter().find(|(name, _)| name == group_type) {
            return Ok(Some(*index));
        }
        let next = known.len() as u8;
        if next >= MAX_GROUP_TYPES {
            // One warning per event, however many new types its `$groups` names.
            let uuid = row.uuid.to_string();
            let warned = self.updates.warnings.last().is_some_and(|(t, w)| {
                *t == team && w.kind == "group_type_limit_reached" && w.details.contains(&uuid)
            });
            if warned {
                return Ok(None);
            }
            self.warn(
                team,
                "group_type_limit_reached",
                json!({"groupType": group_type, "eventUuid": row.uuid}),
                row.timestamp,
            );
            return Ok(None);
        }
        self.updates
            .group_types
            .insert((team, group_type.to_owned()), next);
        Ok(Some(next))
    }

    fn upsert_group(
        &mut self,
        team: TeamId,
        index: u8,
        key: String,
        set: Map<String, Value>,
        row: &EventRow,
    ) -> Result<(), S::Error> {
        let existing = match self.updates.groups.get(&(team, index, key.clone())) {
            Some(group) => Some(group.clone()),
            None => self.state.group(team, index, &key)?,
        };
        let update = PropertyUpdate::set_only(&set);
        let group = match existing {
            Some(mut group) => {
                let target = Properties {
                    values: &mut group.properties,
                    last_operation: &mut group.properties_last_operation,
                    last_updated_at: &mut group.properties_last_updated_at,
                };
                // Every group property triggers an update ($groupidentify is a person event).
                if !rules::apply_update(target, &update, "$identify", row.timestamp) {
                    return Ok(());
                }
                group.version += 1;
                group
            }
            None => {
                let mut group = Group {
                    properties: Map::new(),
                    properties_last_operation: Map::new(),
                    properties_last_updated_at: Map::new(),
                    created_at: row.timestamp,
                    version: 1,
                };
                let target = Properties {
                    values: &mut group.properties,
                    last_operation: &mut group.properties_last_operation,
                    last_updated_at: &mut group.properties_last_updated_at,
                };
                rules::apply_update(target, &update, "$identify", row.timestamp);
                group
            }
        };
        if json_len(&group.properties) > MAX_PROPERTIES_BYTES {
            self.warn(
                team,
                "group_properties_size_violation",
                json!({"groupKey": key, "eventUuid": row.uuid}),
                row.timestamp,
            );
            return Ok(());
        }
        self.updates.groups.insert((team, index, key), group);
        Ok(())
    }
}
