//! Secrets the appliance generates for itself, such as the admin API token.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{Store, StoreError};

pub(in crate::store) const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
const ADMIN_API_TOKEN: &str = "admin_api_token";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SECRETS)?;
    Ok(())
}

/// Cookieless salts kept: today's, and two days either side for events stamped in other days.
const COOKIELESS_SALT_DAYS_KEPT: i64 = 3;

impl Store {
    /// The cookieless-mode salt of `day` (16 random bytes, hex in the secrets table), created on
    /// first use; salts more than a few days from `day` are deleted, so a visitor's id cannot be
    /// recomputed once its day is gone.
    pub fn cookieless_salt(&self, day: chrono::NaiveDate) -> Result<[u8; 16], StoreError> {
        let key = format!("cookieless_salt:{day}");
        let parse = |text: &str| -> Option<[u8; 16]> {
            let mut out = [0u8; 16];
            for (i, byte) in out.iter_mut().enumerate() {
                *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
            }
            Some(out)
        };
        {
            let txn = self.read()?;
            let table = txn.open_table(SECRETS)?;
            if let Some(salt) = table.get(key.as_str())?.and_then(|v| parse(v.value())) {
                return Ok(salt);
            }
        }
        let txn = self.write()?;
        let salt = {
            let mut table = txn.open_table(SECRETS)?;
            let existing = table.get(key.as_str())?.and_then(|v| parse(v.value()));
            match existing {
                Some(salt) => salt,
                None => {
                    let salt: [u8; 16] = rand::random();
                    let text: String = salt.iter().map(|b| format!("{b:02x}")).collect();
                    table.insert(key.as_str(), text.as_str())?;
                    salt
                }
            }
        };
        {
            let mut table = txn.open_table(SECRETS)?;
            let stale: Vec<String> = table
                .range("cookieless_salt:".."cookieless_salt;")?
                .filter_map(|row| row.ok())
                .map(|(k, _)| k.value().to_owned())
                .filter(|k| {
                    k.strip_prefix("cookieless_salt:")
                        .and_then(|d| d.parse::<chrono::NaiveDate>().ok())
                        .is_none_or(|d| (d - day).num_days().abs() > COOKIELESS_SALT_DAYS_KEPT)
                })
                .collect();
            for k in stale {
                table.remove(k.as_str())?;
            }
        }
        self.commit(txn)?;
        Ok(salt)
    }

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
