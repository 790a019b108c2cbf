//! Installed plugins, the plugin configs that enable them per team, and what plugins keep:
//! their storage and their logs. Every change bumps a generation counter, which running
//! pipelines watch to reload (hot reload).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::ids::{PluginConfigId, PluginId, TeamId};

pub(in crate::store) const PLUGINS: TableDefinition<u64, &[u8]> = TableDefinition::new("plugins");
pub(in crate::store) const PLUGIN_CONFIGS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("plugin_configs");
const NEXT_PLUGIN_ID: &str = "next_plugin_id";
const NEXT_PLUGIN_CONFIG_ID: &str = "next_plugin_config_id";
const GENERATION: &str = "plugins_generation";

/// An installed plugin: its manifest and the hash of its component file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub id: PluginId,
    pub name: String,
    /// plugin.json as installed.
    #[serde(with = "crate::codec::json_text")]
    pub manifest: serde_json::Value,
    pub sha256: String,
    pub installed_at: DateTime<Utc>,
}

/// A plugin enabled (or not) for a team, at a place in its chain, with config values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginConfig {
    pub id: PluginConfigId,
    pub team_id: TeamId,
    pub plugin_id: PluginId,
    pub enabled: bool,
    pub order: i64,
    pub config: BTreeMap<String, String>,
    pub updated_at: DateTime<Utc>,
}

/// Every record of a table of versioned JSON values, in id order.
fn all_records<T: DeserializeOwned>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter()? {
        out.push(decode_value(what, row?.1.value())?);
    }
    Ok(out)
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PLUGINS)?;
    txn.open_table(PLUGIN_CONFIGS)?;
    Ok(())
}

fn bump_generation(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let next = meta_get(&meta, GENERATION)? + 1;
    meta.insert(GENERATION, next)?;
    Ok(())
}

fn next_id(txn: &WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let id = meta_get(&meta, key)?.max(1);
    meta.insert(key, id + 1)?;
    Ok(id)
}

impl Store {
    /// Changes whenever plugins or plugin configs change.
    pub fn plugins_generation(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        meta_get(&txn.open_table(META)?, GENERATION)
    }

    /// Records an installed plugin; installing a plugin of the same name replaces it in place
    /// (same id, so its configs follow the new version).
    pub fn install_plugin(
        &self,
        name: &str,
        manifest: serde_json::Value,
        sha256: &str,
    ) -> Result<PluginRecord, StoreError> {
        // Read and write in one transaction, so two installs cannot both create the plugin.
        let txn = self.write()?;
        let existing = all_records::<PluginRecord>(&txn.open_table(PLUGINS)?, "plugin")?
            .into_iter()
            .find(|p| p.name == name);
        let record = PluginRecord {
            id: match &existing {
                Some(p) => p.id,
                None => next_id(&txn, NEXT_PLUGIN_ID)?,
            },
            name: name.to_owned(),
            manifest,
            sha256: sha256.to_owned(),
            installed_at: Utc::now(),
        };
        txn.open_table(PLUGINS)?
            .insert(record.id, encode_value(&record).as_slice())?;
        bump_generation(&txn)?;
        self.commit(txn)?;
        Ok(record)
    }

    pub fn list_plugins(&self) -> Result<Vec<PluginRecord>, StoreError> {
        let txn = self.read()?;
        all_records(&txn.open_table(PLUGINS)?, "plugin")
    }

    /// Creates or updates the team's config of a plugin.
    pub fn upsert_plugin_config(
        &self,
        team_id: TeamId,
        plugin_id: PluginId,
        enabled: bool,
        order: Option<i64>,
        config: Option<BTreeMap<String, String>>,
    ) -> Result<PluginConfig, StoreError> {
        // Read and write in one transaction, so concurrent changes (the CLI, the API, the pipeline
        // disabling a failing config) cannot create two configs for one team and plugin.
        let txn = self.write()?;
        let current: Vec<PluginConfig> =
            all_records(&txn.open_table(PLUGIN_CONFIGS)?, "plugin config")?;
        let existing = current
            .iter()
            .find(|c| c.team_id == team_id && c.plugin_id == plugin_id)
            .cloned();
        let next_order = current
            .iter()
            .filter(|c| c.team_id == team_id)
            .map(|c| c.order + 1)
            .max()
            .unwrap_or(1);
        let record = PluginConfig {
            id: match &existing {
                Some(c) => c.id,
                None => next_id(&txn, NEXT_PLUGIN_CONFIG_ID)?,
            },
            team_id,
            plugin_id,
            enabled,
            order: order
                .or(existing.as_ref().map(|c| c.order))
                .unwrap_or(next_order),
            config: config.or(existing.map(|c| c.config)).unwrap_or_default(),
            updated_at: Utc::now(),
        };
        txn.open_table(PLUGIN_CONFIGS)?
            .insert(record.id, encode_value(&record).as_slice())?;
        bump_generation(&txn)?;
        self.commit(txn)?;
        Ok(record)
    }

    pub fn list_plugin_configs(&self) -> Result<Vec<PluginConfig>, StoreError> {
        let txn = self.read()?;
        all_records(&txn.open_table(PLUGIN_CONFIGS)?, "plugin config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_configs_storage_and_logs_are_kept_per_config() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g0 = store.plugins_generation().unwrap();
        let first = store
            .install_plugin("Filter", serde_json::json!({"v": 1}), "aa")
            .unwrap();
        let again = store
            .install_plugin("Filter", serde_json::json!({"v": 2}), "bb")
            .unwrap();
        assert_eq!(first.id, again.id, "reinstalling by name keeps the id");
        assert_eq!(store.list_plugins().unwrap(), vec![again.clone()]);
        assert!(
            store.plugins_generation().unwrap() > g0,
            "changes bump the generation"
        );

        let a = store
            .upsert_plugin_config(
                1,
                again.id,
                true,
                None,
                Some([("k".into(), "v".into())].into()),
            )
            .unwrap();
        let b = store
            .upsert_plugin_config(2, again.id, true, Some(5), None)
            .unwrap();
        let a2 = store
            .upsert_plugin_config(1, again.id, false, None, None)
            .unwrap();
        assert_eq!(
            (a2.id, a2.order, a2.config.clone(), a2.enabled),
            (a.id, a.order, a.config.clone(), false)
        );
        assert_eq!(b.order, 5);
        assert_eq!(store.list_plugin_configs().unwrap().len(), 2);
    }
}
