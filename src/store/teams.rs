//! Teams (PostHog projects) and their project tokens.

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::ids::TeamId;

/// Team records by id ([`Team`]).
pub(in crate::store) const TEAMS: TableDefinition<u64, &[u8]> = TableDefinition::new("teams");
/// Project token → team id.
pub(in crate::store) const TEAM_TOKENS: TableDefinition<&str, u64> =
    TableDefinition::new("team_tokens");
const NEXT_TEAM_ID: &str = "next_team_id";
/// Changes whenever a team changes (renamed, token rotated, IPs anonymised): capture's cache of
/// tokens watches it.
const GENERATION: &str = "teams_generation";

/// What an operator changes about a team.
#[derive(Clone, Debug, Default)]
pub struct TeamChange {
    pub name: Option<String>,
    pub anonymize_ips: Option<bool>,
    /// A new random project token; the old one stops working.
    pub rotate_token: bool,
}

/// A team (PostHog calls it a project): events are stored under its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    /// The public project token SDKs send (`phc_…`).
    pub api_token: String,
    pub created_at: DateTime<Utc>,
    /// When set, the request IP is not recorded as `$ip`.
    pub anonymize_ips: bool,
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(TEAMS)?;
    txn.open_table(TEAM_TOKENS)?;
    Ok(())
}

/// A new random project token in PostHog's shape: `phc_` and 43 alphanumerics.
pub fn generate_token() -> String {
    super::random_token("phc_")
}

/// Checks a token chosen by the operator (for example one kept from a PostHog install).
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.starts_with("phx_") {
        return Err("tokens starting with phx_ are personal API keys, not project tokens".into());
    }
    if token.len() < 8 || token.len() > 200 {
        return Err("a project token must be 8 to 200 characters long".into());
    }
    if !token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("a project token may hold only letters, digits, '_' and '-'".into());
    }
    Ok(())
}

/// A team's name: what the admin page and the CLI show.
fn validate_team_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err("a team name must be 1 to 200 characters long".into());
    }
    Ok(())
}

impl Store {
    /// Creates a team; a token is generated unless one is given.
    pub fn create_team(&self, name: &str, token: Option<&str>) -> Result<Team, StoreError> {
        validate_team_name(name).map_err(StoreError::Invalid)?;
        let token = match token {
            Some(t) => {
                validate_token(t).map_err(StoreError::Invalid)?;
                t.to_owned()
            }
            None => generate_token(),
        };
        let txn = self.write()?;
        let team = {
            let mut tokens = txn.open_table(TEAM_TOKENS)?;
            if let Some(existing) = tokens.get(token.as_str())? {
                return Err(StoreError::Conflict(format!(
                    "the token is already used by team {}",
                    existing.value()
                )));
            }
            let mut meta = txn.open_table(META)?;
            let id = meta_get(&meta, NEXT_TEAM_ID)?.max(1);
            meta.insert(NEXT_TEAM_ID, id + 1)?;
            let team = Team {
                id,
                name: name.to_owned(),
                api_token: token.clone(),
                created_at: Utc::now(),
                anonymize_ips: false,
            };
            txn.open_table(TEAMS)?
                .insert(id, encode_value(&team).as_slice())?;
            tokens.insert(token.as_str(), id)?;
            team
        };
        self.commit(txn)?;
        Ok(team)
    }

    pub fn list_teams(&self) -> Result<Vec<Team>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(TEAMS)?;
        let mut teams = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            teams.push(decode_value("team", value.value())?);
        }
        Ok(teams)
    }

    /// Team `id`, or `NotFound`.
    pub fn team(&self, id: TeamId) -> Result<Team, StoreError> {
        let txn = self.read()?;
        let teams = txn.open_table(TEAMS)?;
        let found = teams.get(id)?;
        match found {
            Some(v) => decode_value("team", v.value()),
            None => Err(StoreError::NotFound(format!("no team {id}"))),
        }
    }

    pub fn team_by_token(&self, token: &str) -> Result<Option<Team>, StoreError> {
        let txn = self.read()?;
        let Some(id) = txn.open_table(TEAM_TOKENS)?.get(token)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let teams = txn.open_table(TEAMS)?;
        let team = teams
            .get(id)?
            .map(|v| decode_value("team", v.value()))
            .transpose()?;
        Ok(team)
    }

    /// Changes whenever a team changes.
    pub fn teams_generation(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        meta_get(&txn.open_table(META)?, GENERATION)
    }

    /// Applies `change` to team `id`.
    pub fn update_team(&self, id: TeamId, change: &TeamChange) -> Result<Team, StoreError> {
        if let Some(name) = &change.name {
            validate_team_name(name).map_err(StoreError::Invalid)?;
        }
        let txn = self.write()?;
        let team = {
            let mut teams = txn.open_table(TEAMS)?;
            let mut team: Team = match teams.get(id)? {
                Some(v) => decode_value("team", v.value())?,
                None => return Err(StoreError::NotFound(format!("no team {id}"))),
            };
            if let Some(name) = &change.name {
                team.name = name.clone();
            }
            if let Some(anonymize) = change.anonymize_ips {
                team.anonymize_ips = anonymize;
            }
            if change.rotate_token {
                let mut tokens = txn.open_table(TEAM_TOKENS)?;
                tokens.remove(team.api_token.as_str())?;
                team.api_token = generate_token();
                tokens.insert(team.api_token.as_str(), id)?;
            }
            teams.insert(id, encode_value(&team).as_slice())?;
            let mut meta = txn.open_table(META)?;
            let generation = meta_get(&meta, GENERATION)?;
            meta.insert(GENERATION, generation + 1)?;
            team
        };
        self.commit(txn)?;
        Ok(team)
    }

    /// Makes the teams those of `teams` (PostHog's `posthog_team`, by id): each is created or
    /// updated with its id, name, token and `anonymize_ips`; a team of this store that is not
    /// among them keeps its record (its events and plugins) but loses its token, so capture
    /// refuses it. Returns how many teams changed.
    pub fn mirror_teams(&self, teams: &[Team]) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let changed = {
            let mut records = txn.open_table(TEAMS)?;
            let mut tokens = txn.open_table(TEAM_TOKENS)?;
            let mut changed = 0;
            let wanted: std::collections::HashMap<TeamId, &Team> =
                teams.iter().map(|t| (t.id, t)).collect();
            let mut current = Vec::new();
            for row in records.iter()? {
                let (_, value) = row?;
                current.push(decode_value::<Team>("team", value.value())?);
            }
            for team in &current {
                let keep = wanted
                    .get(&team.id)
                    .is_some_and(|w| w.api_token == team.api_token);
                if !keep && tokens.get(team.api_token.as_str())?.map(|v| v.value()) == Some(team.id)
                {
                    tokens.remove(team.api_token.as_str())?;
                    changed += usize::from(!wanted.contains_key(&team.id));
                }
            }
            for team in teams {
                let before = current.iter().find(|t| t.id == team.id);
                if before != Some(team) {
                    changed += 1;
                }
                records.insert(team.id, encode_value(team).as_slice())?;
                tokens.insert(team.api_token.as_str(), team.id)?;
            }
            let mut meta = txn.open_table(META)?;
            let highest = teams.iter().map(|t| t.id).max().unwrap_or(0);
            if meta_get(&meta, NEXT_TEAM_ID)? <= highest {
                meta.insert(NEXT_TEAM_ID, highest + 1)?;
            }
            if changed > 0 {
                let generation = meta_get(&meta, GENERATION)?;
                meta.insert(GENERATION, generation + 1)?;
            }
            changed
        };
        self.commit(txn)?;
        Ok(changed)
    }

    /// Creates the default team when there is none; returns it only if it was created now.
    pub fn ensure_default_team(&self) -> Result<Option<Team>, StoreError> {
        if !self.list_teams()?.is_empty() {
            return Ok(None);
        }
        self.create_team("Default project", None).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_teams_take_posthog_s_ids_and_tokens_and_the_others_lose_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let own = store
            .create_team("own", Some("phc_ownProjectToken00001"))
            .unwrap();
        let team = |id, token: &str, anonymize_ips| Team {
            id,
            name: format!("posthog {id}"),
            api_token: token.to_owned(),
            created_at: chrono::DateTime::UNIX_EPOCH,
            anonymize_ips,
        };
        let posthog = [team(2, "phc_two", false), team(7, "phc_seven", true)];
        let generation = store.teams_generation().unwrap();
        assert_eq!(
            store.mirror_teams(&posthog).unwrap(),
            3,
            "two new, one gone"
        );
        assert!(store.teams_generation().unwrap() > generation);
        assert_eq!(
            store.team_by_token("phc_seven").unwrap(),
            Some(posthog[1].clone())
        );
        assert_eq!(
            store.team_by_token(&own.api_token).unwrap(),
            None,
            "refused now"
        );
        assert!(store.team(own.id).is_ok(), "its record stays");
        assert_eq!(store.mirror_teams(&posthog).unwrap(), 0, "nothing changed");
        let rotated = [team(2, "phc_two_new", false), posthog[1].clone()];
        assert_eq!(store.mirror_teams(&rotated).unwrap(), 1);
        assert_eq!(store.team_by_token("phc_two").unwrap(), None);
        assert_eq!(
            store.team_by_token("phc_two_new").unwrap().map(|t| t.id),
            Some(2)
        );
        assert_eq!(
            store.create_team("next", None).unwrap().id,
            8,
            "ids go past PostHog's"
        );
    }

    #[test]
    fn teams_are_created_listed_and_found_by_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let created = store
            .ensure_default_team()
            .unwrap()
            .expect("first start creates one");
        assert!(created.api_token.starts_with("phc_") && created.api_token.len() == 47);
        assert!(store.ensure_default_team().unwrap().is_none());
        let second = store
            .create_team("shop", Some("phc_testProjectToken123"))
            .unwrap();
        assert_eq!(second.id, created.id + 1);
        assert_eq!(
            store.team_by_token("phc_testProjectToken123").unwrap(),
            Some(second.clone())
        );
        assert_eq!(store.team_by_token("phc_nope").unwrap(), None);
        let err = store
            .create_team("again", Some("phc_testProjectToken123"))
            .unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
        assert!(store.create_team("bad", Some("phx_personal123")).is_err());
        drop(store);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.list_teams().unwrap().len(), 2);
    }
}
