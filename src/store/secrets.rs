//! Secrets the appliance generates for itself, such as the admin API token.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{Store, StoreError};

pub(in crate::store) const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
const ADMIN_API_TOKEN: &str = "admin_api_token";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SECRETS)?;
    Ok(())
}

impl Store {
    /// The token `/api/` requires (`Authorization: Bearer …`), created on first use; returns
    /// it and whether it was created now.
    pub fn admin_api_token(&self) -> Result<(String, bool), StoreError> {
        let txn = self.write()?;
        let (token, created) = {
            let mut table = txn.open_table(SECRETS)?;
            let existing = table.get(ADMIN_API_TOKEN)?.map(|v| v.value().to_owned());
            match existing {
                Some(token) => (token, false),
                None => {
                    let token = super::random_token("apa_");
                    table.insert(ADMIN_API_TOKEN, token.as_str())?;
                    (token, true)
                }
            }
        };
        self.commit(txn)?;
        Ok((token, created))
    }

    /// The admin API token as it is now, without creating one (read on every `/api/` request,
    /// so a rotation from the CLI takes effect at once).
    pub fn current_admin_api_token(&self) -> Result<Option<String>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(SECRETS)?;
        Ok(table.get(ADMIN_API_TOKEN)?.map(|v| v.value().to_owned()))
    }

    /// Replaces the admin API token with a new random one and returns it.
    pub fn rotate_admin_api_token(&self) -> Result<String, StoreError> {
        let txn = self.write()?;
        let token = super::random_token("apa_");
        txn.open_table(SECRETS)?
            .insert(ADMIN_API_TOKEN, token.as_str())?;
        self.commit(txn)?;
        Ok(token)
    }
}
