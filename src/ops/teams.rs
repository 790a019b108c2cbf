//! Team operations: create (with a chosen or random project token), list, change (rename,
//! rotate the token, anonymise IPs); the admin API token.

use super::{OpError, Ops};
use crate::store::{Team, TeamChange, TeamId};

impl Ops {
    /// Creates a team; a token is generated unless one is given.
    pub fn create_team(&self, name: &str, token: Option<&str>) -> Result<Team, OpError> {
        Ok(self.store.create_team(name, token)?)
    }

    pub fn list_teams(&self) -> Result<Vec<Team>, OpError> {
        Ok(self.store.list_teams()?)
    }

    /// Renames a team, rotates its token or switches IP anonymisation; capture sees the change
    /// within a second.
    pub fn update_team(&self, id: TeamId, change: &TeamChange) -> Result<Team, OpError> {
        Ok(self.store.update_team(id, change)?)
    }

    /// The token `/api/` requires, created on first use; and whether it was created now.
    pub fn api_token(&self) -> Result<(String, bool), OpError> {
        Ok(self.store.admin_api_token()?)
    }

    /// Replaces the admin API token; the old one stops working at once.
    pub fn rotate_api_token(&self) -> Result<String, OpError> {
        Ok(self.store.rotate_admin_api_token()?)
    }
}
