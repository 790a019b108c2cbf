//! Person operations: show a person by one of its distinct ids, delete it (carried out by the
//! pipeline, in order with the events), and read a team's ingestion warnings.

use super::{OpError, Ops};
use crate::person::IngestionWarning;
use crate::store::{PersonView, TeamId, MAX_WARNINGS_PER_TEAM};

impl Ops {
    /// The person `distinct_id` points at, with its properties, versions and distinct ids.
    pub fn show_person(&self, team: TeamId, distinct_id: &str) -> Result<PersonView, OpError> {
        self.store.team(team)?;
        self.store.person_view(team, distinct_id)?.ok_or_else(|| {
            OpError::NotFound(format!(
                "team {team} has no person with distinct id {distinct_id:?}"
            ))
        })
    }

    /// Asks for PostHog's person deletion: the person is removed and its distinct ids freed, in
    /// this state and in the sinks, by the pipeline within a second while the server runs (at
    /// its next start otherwise). Answers the person as it is now.
    pub fn delete_person(&self, team: TeamId, distinct_id: &str) -> Result<PersonView, OpError> {
        let person = self.show_person(team, distinct_id)?;
        self.store.request_person_deletion(team, distinct_id)?;
        Ok(person)
    }

    /// The team's ingestion warnings, newest first.
    pub fn ingestion_warnings(
        &self,
        team: TeamId,
        limit: Option<usize>,
    ) -> Result<Vec<IngestionWarning>, OpError> {
        self.store.team(team)?;
        let limit = limit.unwrap_or(100).min(MAX_WARNINGS_PER_TEAM);
        Ok(self.store.ingestion_warnings(team, limit)?)
    }
}
