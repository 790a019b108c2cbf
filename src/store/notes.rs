//! Small records the appliance keeps about its own operation, by name, as JSON: the last
//! scheduled backup, say. Read by the admin page, written by whoever owns the record.

use redb::{TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Store, StoreError};

pub(in crate::store) const NOTES: TableDefinition<&str, &str> = TableDefinition::new("notes");

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(NOTES)?;
    Ok(())
}

impl Store {
    /// Keeps `value` under `name`, replacing what was there.
    pub fn put_note(&self, name: &str, value: &impl Serialize) -> Result<(), StoreError> {
        let text = serde_json::to_string(value)
            .map_err(|e| StoreError::Invalid(format!("note {name}: {e}")))?;
        let txn = self.write()?;
        txn.open_table(NOTES)?.insert(name, text.as_str())?;
        self.commit(txn)
    }

    /// The record under `name`, if there is one this build can read.
    pub fn note<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(NOTES)?;
        let text = table.get(name)?.map(|v| v.value().to_owned());
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}
