//! Merges in the person step: `$identify`, `$create_alias` and `$merge_dangerously` join two
//! distinct ids into one person (PostHog's `person-merge-service.ts`): the survivor is the
//! event's own distinct id's person, an identified person is not merged into another unless
//! the event says so, and the merged person's version is one past the higher of the two.

use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use super::{NextVersion, PersonProcessor, PersonState, Working};
use crate::event::EventRow;
use crate::ids::TeamId;
use crate::person::rules::{self, PropertyUpdate};
use crate::person::{person_uuid, DistinctId, Person, PersonChange};

impl<S: PersonState> PersonProcessor<'_, S> {
    /// `other` (the anonymous id or alias) joins the person of the event's own distinct id.
    /// Answers the person the event then belongs to, if the merge decided it.
    pub(super) fn merge(
        &mut self,
        team: TeamId,
        row: &EventRow,
        other: &str,
        update: &PropertyUpdate,
    ) -> Result<Option<Working>, S::Error> {
        let into = row.distinct_id.as_str();
        for (illegal, fine) in [(into, other), (other, into)] {
            if rules::is_illegal_distinct_id(illegal) {
                self.warn(
                    team,
                    "cannot_merge_with_illegal_distinct_id",
                    json!({"illegalDistinctId": illegal, "otherDistinctId": fine, "eventUuid": row.uuid}),
                    row.timestamp,
                );
                return Ok(None);
            }
        }
        let target = self.person_of(team, into)?;
        let source = self.person_of(team, other)?;
        let working = match (target, source) {
            (Some(target), Some(source)) if target.uuid == source.uuid => identified(target),
            (Some(target), Some(source)) => {
                if source.is_identified && row.event != "$merge_dangerously" {
                    self.warn(
                        team,
                        "cannot_merge_already_identified",
                        json!({"sourcePersonDistinctId": other, "targetPersonDistinctId": into, "eventUuid": row.uuid}),
                        row.timestamp,
                    );
                    return Ok(None);
                }
                self.merge_people(team, target, source)?
            }
            (Some(person), None) => {
                self.add_distinct_id(team, other, person.uuid)?;
                identified(person)
            }
            (None, Some(person)) => {
                self.add_distinct_id(team, into, person.uuid)?;
                identified(person)
            }
            (None, None) => {
                // The uuid of the anonymous id's placeholder person if its events were stored
                // personless, so they already point at this person.
                let other_personless = self.personless(team, other)?.is_some();
                let first = if other_personless { other } else { into };
                let person =
                    Arc::new(self.new_person(team, row, update, person_uuid(team, first), true));
                for id in [into, other] {
                    let version = u64::from(id != first && self.personless(team, id)?.is_some());
                    self.set_distinct_id(team, id, person.uuid, version);
                }
                if other_personless {
                    self.updates
                        .personless
                        .insert((team, other.to_owned()), true);
                }
                Working {
                    person,
                    next: NextVersion::New,
                    changed: true,
                }
            }
        };
        Ok(Some(working))
    }

    /// Points `id` at `person` as a new distinct id: version 0, or 1 if events of the id were
    /// stored personless under its placeholder uuid (so sinks override those).
    fn add_distinct_id(&mut self, team: TeamId, id: &str, person: Uuid) -> Result<(), S::Error> {
        let was_personless = self.personless(team, id)?.is_some();
        self.set_distinct_id(team, id, person, u64::from(was_personless));
        if was_personless {
            self.updates.personless.insert((team, id.to_owned()), true);
        }
        Ok(())
    }

    fn set_distinct_id(&mut self, team: TeamId, id: &str, person: Uuid, version: u64) {
        self.updates
            .distinct_ids
            .insert((team, id.to_owned()), Some(DistinctId { person, version }));
    }

    /// PostHog's `mergePeople`: `source`'s distinct ids move to `target`, properties of
    /// `target` win, the older `created_at` stays, and `source` is deleted.
    fn merge_people(
        &mut self,
        team: TeamId,
        target: Arc<Person>,
        source: Arc<Person>,
    ) -> Result<Working, S::Error> {
        let mut merged = (*target).clone();
        for (mine, theirs) in [
            (&mut merged.properties, &source.properties),
            (
                &mut merged.properties_last_operation,
                &source.properties_last_operation,
            ),
            (
                &mut merged.properties_last_updated_at,
                &source.properties_last_updated_at,
            ),
        ] {
            let mut combined = theirs.clone();
            combined.extend(std::mem::take(mine));
            *mine = combined;
        }
        merged.created_at = target.created_at.min(source.created_at);
        merged.is_identified = true;
        for id in self.distinct_ids_of(team, source.uuid)? {
            let version = self.distinct_id(team, &id)?.map_or(0, |d| d.version + 1);
            self.set_distinct_id(team, &id, target.uuid, version);
        }
        self.updates.persons.insert(
            (team, source.uuid),
            PersonChange::Deleted {
                version: source.version,
            },
        );
        Ok(Working {
            next: NextVersion::Merged(target.version.max(source.version) + 1),
            person: Arc::new(merged),
            changed: true,
        })
    }
}

/// The person, marked identified (a change if it was not).
fn identified(mut person: Arc<Person>) -> Working {
    let changed = !person.is_identified;
    if changed {
        Arc::make_mut(&mut person).is_identified = true;
    }
    Working {
        next: NextVersion::After(person.version),
        person,
        changed,
    }
}
