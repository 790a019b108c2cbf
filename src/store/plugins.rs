//! Installed plugins, the plugin configs that enable them per team, and what plugins keep:
//! their storage and their logs. Every change bumps a generation counter, which running
//! pipelines watch to reload (hot reload).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::ids::{PluginConfigId, PluginId, TeamId};

const PLUGINS: TableDefinition<u64, &[u8]> = TableDefinition::new("plugins");
const PLUGIN_CONFIGS: TableDefinition<u64, &[u8]> = TableDefinition::new("plugin_configs");
/// (plugin config, key) → value.
const PLUGIN_STORAGE: TableDefinition<(u64, &str), &str> = TableDefinition::new("plugin_storage");
/// (plugin config, sequence) → encoded [`PluginLogEntry`].
const PLUGIN_LOGS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("plugin_logs");
const NEXT_PLUGIN_ID: &str = "next_plugin_id";
const NEXT_PLUGIN_CONFIG_ID: &str = "next_plugin_config_id";
const NEXT_LOG_SEQ: &str = "next_plugin_log_seq";
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginLogEntry {
    pub at: DateTime<Utc>,
    pub level: String,
    pub message: String,
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
    txn.open_table(PLUGIN_STORAGE)?;
    txn.open_table(PLUGIN_LOGS)?;
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

    pub fn plugin_storage_get(
        &self,
        config: PluginConfigId,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(PLUGIN_STORAGE)?;
        let value = table.get((config, key))?.map(|v| v.value().to_owned());
        Ok(value)
    }

    /// Everything a plugin config keeps in storage, by key.
    pub fn plugin_storage_all(
        &self,
        config: PluginConfigId,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(PLUGIN_STORAGE)?;
        let mut out = Vec::new();
        for row in table.range((config, "")..(config + 1, ""))? {
            let (key, value) = row?;
            out.push((key.value().1.to_owned(), value.value().to_owned()));
        }
        Ok(out)
    }

    pub fn plugin_storage_set(
        &self,
        config: PluginConfigId,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut table = txn.open_table(PLUGIN_STORAGE)?;
            match value {
                Some(v) => {
                    table.insert((config, key), v)?;
                }
                None => {
                    table.remove((config, key))?;
                }
            }
        }
        self.commit(txn)?;
        Ok(())
    }

    /// Appends log entries of a plugin config in one transaction.
    pub fn append_plugin_logs(
        &self,
        config: PluginConfigId,
        entries: &[PluginLogEntry],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let txn = self.write()?;
        {
            let mut meta = txn.open_table(META)?;
            let mut seq = meta_get(&meta, NEXT_LOG_SEQ)?.max(1);
            let mut table = txn.open_table(PLUGIN_LOGS)?;
            for entry in entries {
                let bytes = encode_value(entry);
                table.insert((config, seq), bytes.as_slice())?;
                seq += 1;
            }
            meta.insert(NEXT_LOG_SEQ, seq)?;
        }
        self.commit(txn)?;
        Ok(())
    }

    pub fn plugin_logs(&self, config: PluginConfigId) -> Result<Vec<PluginLogEntry>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(PLUGIN_LOGS)?;
        let mut out = Vec::new();
        for row in table.range((config, 0)..=(config, u64::MAX))? {
            out.push(decode_value("plugin log", row?.1.value())?);
        }
        Ok(out)
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

        store
            .plugin_storage_set(a.id, "key", Some("for a"))
            .unwrap();
        assert_eq!(
            store.plugin_storage_get(a.id, "key").unwrap().as_deref(),
            Some("for a")
        );
        assert_eq!(
            store.plugin_storage_get(b.id, "key").unwrap(),
            None,
            "storage is per config"
        );
        store.plugin_storage_set(a.id, "key", None).unwrap();
        assert_eq!(store.plugin_storage_get(a.id, "key").unwrap(), None);

        let entry = |m: &str| PluginLogEntry {
            at: Utc::now(),
            level: "info".into(),
            message: m.into(),
        };
        store
            .append_plugin_logs(a.id, &[entry("a1"), entry("a2")])
            .unwrap();
        store.append_plugin_logs(b.id, &[entry("b1")]).unwrap();
        let messages: Vec<String> = store
            .plugin_logs(a.id)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(messages, vec!["a1", "a2"]);
    }
}
