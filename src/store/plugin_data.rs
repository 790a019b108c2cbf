//! What plugins keep: each plugin config's storage (with its usage counted, so quotas are
//! checked without a scan) and its log lines (kept up to a number per config and for a number of
//! days, read newest first in pages).

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{decode_value, encode_value, meta_get, Store, StoreError, META};
use crate::ids::PluginConfigId;

/// (plugin config, key) → value.
pub(in crate::store) const PLUGIN_STORAGE: TableDefinition<(u64, &str), &str> =
    TableDefinition::new("plugin_storage");
/// Plugin config → (keys, bytes of keys and values) in its storage.
pub(in crate::store) const STORAGE_USAGE: TableDefinition<u64, (u64, u64)> =
    TableDefinition::new("plugin_storage_usage");
/// (plugin config, sequence) → encoded [`PluginLogEntry`].
pub(in crate::store) const PLUGIN_LOGS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("plugin_logs");
/// Plugin config → log lines kept.
pub(in crate::store) const LOG_COUNTS: TableDefinition<u64, u64> =
    TableDefinition::new("plugin_log_counts");
const NEXT_LOG_SEQ: &str = "next_plugin_log_seq";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginLogEntry {
    pub at: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

/// How much one plugin config may keep in storage.
#[derive(Clone, Copy, Debug)]
pub struct StorageQuota {
    pub max_keys: u64,
    pub max_bytes: u64,
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PLUGIN_STORAGE)?;
    txn.open_table(STORAGE_USAGE)?;
    txn.open_table(PLUGIN_LOGS)?;
    txn.open_table(LOG_COUNTS)?;
    Ok(())
}

/// A config's storage usage, counted once from its rows if not recorded yet.
fn usage_of(
    usage: &impl ReadableTable<u64, (u64, u64)>,
    storage: &impl ReadableTable<(u64, &'static str), &'static str>,
    config: PluginConfigId,
) -> Result<(u64, u64), StoreError> {
    if let Some(found) = usage.get(config)? {
        return Ok(found.value());
    }
    let (mut keys, mut bytes) = (0u64, 0u64);
    for row in storage.range((config, "")..(config + 1, ""))? {
        let (key, value) = row?;
        keys += 1;
        bytes += (key.value().1.len() + value.value().len()) as u64;
    }
    Ok((keys, bytes))
}

impl Store {
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

    /// (keys, bytes of keys and values) a plugin config keeps in storage.
    pub fn plugin_storage_usage(&self, config: PluginConfigId) -> Result<(u64, u64), StoreError> {
        let txn = self.read()?;
        usage_of(
            &txn.open_table(STORAGE_USAGE)?,
            &txn.open_table(PLUGIN_STORAGE)?,
            config,
        )
    }

    /// Applies a call's writes (`None` deletes) in one transaction. A write that would pass
    /// `quota` is skipped; returns how many were.
    pub fn plugin_storage_apply(
        &self,
        config: PluginConfigId,
        writes: &[(String, Option<String>)],
        quota: StorageQuota,
    ) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let refused = {
            let mut storage = txn.open_table(PLUGIN_STORAGE)?;
            let mut usage = txn.open_table(STORAGE_USAGE)?;
            let (mut keys, mut bytes) = usage_of(&usage, &storage, config)?;
            let mut refused = 0;
            for (key, value) in writes {
                let old = storage
                    .get((config, key.as_str()))?
                    .map(|v| v.value().len());
                let old_size = old.map_or(0, |len| (key.len() + len) as u64);
                match value {
                    Some(v) => {
                        let new_keys = keys + u64::from(old.is_none());
                        let new_bytes = bytes - old_size + (key.len() + v.len()) as u64;
                        if new_keys > quota.max_keys || new_bytes > quota.max_bytes {
                            refused += 1;
                            continue;
                        }
                        storage.insert((config, key.as_str()), v.as_str())?;
                        (keys, bytes) = (new_keys, new_bytes);
                    }
                    None if old.is_some() => {
                        storage.remove((config, key.as_str()))?;
                        keys -= 1;
                        bytes -= old_size;
                    }
                    None => {}
                }
            }
            usage.insert(config, (keys, bytes))?;
            refused
        };
        self.commit(txn)?;
        Ok(refused)
    }

    /// Stores one value, within `quota` (operators and tests; plugins go through their calls).
    pub fn plugin_storage_set(
        &self,
        config: PluginConfigId,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        let quota = StorageQuota {
            max_keys: u64::MAX,
            max_bytes: u64::MAX,
        };
        self.plugin_storage_apply(config, &[(key.to_owned(), value.map(str::to_owned))], quota)
            .map(|_| ())
    }

    /// Appends log entries of a plugin config in one transaction, keeping its newest
    /// `max_lines`.
    pub fn append_plugin_logs(
        &self,
        config: PluginConfigId,
        entries: &[PluginLogEntry],
        max_lines: u64,
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
                table.insert((config, seq), encode_value(entry).as_slice())?;
                seq += 1;
            }
            meta.insert(NEXT_LOG_SEQ, seq)?;
            let mut counts = txn.open_table(LOG_COUNTS)?;
            let mut kept = counts.get(config)?.map_or(0, |c| c.value()) + entries.len() as u64;
            while kept > max_lines {
                if table
                    .extract_from_if((config, 0)..=(config, u64::MAX), |_, _| true)?
                    .next()
                    .transpose()?
                    .is_none()
                {
                    break;
                }
                kept -= 1;
            }
            counts.insert(config, kept)?;
        }
        self.commit(txn)?;
        Ok(())
    }

    /// A plugin config's log lines, newest first: at most `limit`, older than sequence
    /// `before` if given. Each comes with its sequence, to ask for the next page.
    pub fn plugin_logs(
        &self,
        config: PluginConfigId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, PluginLogEntry)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(PLUGIN_LOGS)?;
        let end = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for row in table.range((config, 0)..(config, end))?.rev().take(limit) {
            let (key, value) = row?;
            out.push((key.value().1, decode_value("plugin log", value.value())?));
        }
        Ok(out)
    }

    /// Drops log lines written before `cutoff`; returns how many.
    pub fn purge_plugin_logs(&self, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
        let txn = self.write()?;
        let removed = {
            let mut table = txn.open_table(PLUGIN_LOGS)?;
            let mut counts = txn.open_table(LOG_COUNTS)?;
            let configs: Vec<u64> = counts
                .iter()?
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            let mut removed = 0;
            for config in configs {
                // Sequences grow with time, so a config's old lines are its first ones.
                let mut dropped = 0u64;
                loop {
                    let first = table
                        .range((config, 0)..=(config, u64::MAX))?
                        .next()
                        .transpose()?
                        .map(|(k, v)| (k.value(), v.value().to_vec()));
                    let Some((key, bytes)) = first else {
                        break;
                    };
                    let entry: PluginLogEntry = decode_value("plugin log", &bytes)?;
                    if entry.at >= cutoff {
                        break;
                    }
                    table.remove(key)?;
                    dropped += 1;
                }
                if dropped > 0 {
                    let kept = counts.get(config)?.map_or(0, |c| c.value());
                    counts.insert(config, kept.saturating_sub(dropped))?;
                    removed += dropped as usize;
                }
            }
            removed
        };
        self.commit(txn)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(message: &str) -> PluginLogEntry {
        PluginLogEntry {
            at: Utc::now(),
            level: "info".into(),
            message: message.into(),
        }
    }

    #[test]
    fn storage_is_per_config_counted_and_held_to_its_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.plugin_storage_set(1, "key", Some("for a")).unwrap();
        assert_eq!(
            store.plugin_storage_get(1, "key").unwrap().as_deref(),
            Some("for a")
        );
        assert_eq!(
            store.plugin_storage_get(2, "key").unwrap(),
            None,
            "per config"
        );
        assert_eq!(store.plugin_storage_usage(1).unwrap(), (1, 8));
        let quota = StorageQuota {
            max_keys: 3,
            max_bytes: 40,
        };
        let writes: Vec<(String, Option<String>)> = (0..5)
            .map(|n| (format!("k{n}"), Some("0123456789".to_owned())))
            .collect();
        let refused = store.plugin_storage_apply(1, &writes, quota).unwrap();
        assert_eq!(refused, 3, "the fourth key and over 40 bytes are refused");
        assert_eq!(store.plugin_storage_usage(1).unwrap(), (3, 32));
        store.plugin_storage_set(1, "key", None).unwrap();
        assert_eq!(store.plugin_storage_usage(1).unwrap(), (2, 24));
        assert_eq!(store.plugin_storage_all(1).unwrap().len(), 2);
    }

    #[test]
    fn logs_keep_the_newest_lines_page_newest_first_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lines: Vec<PluginLogEntry> = (0..10).map(|n| entry(&format!("a{n}"))).collect();
        store.append_plugin_logs(1, &lines, 6).unwrap();
        store.append_plugin_logs(2, &[entry("b")], 6).unwrap();
        let page = store.plugin_logs(1, None, 4).unwrap();
        let messages: Vec<&str> = page.iter().map(|(_, e)| e.message.as_str()).collect();
        assert_eq!(messages, vec!["a9", "a8", "a7", "a6"]);
        let next = store.plugin_logs(1, Some(page[3].0), 10).unwrap();
        let messages: Vec<&str> = next.iter().map(|(_, e)| e.message.as_str()).collect();
        assert_eq!(messages, vec!["a5", "a4"], "only the newest six were kept");
        let removed = store
            .purge_plugin_logs(Utc::now() + chrono::Duration::seconds(1))
            .unwrap();
        assert_eq!(removed, 7);
        assert!(store.plugin_logs(1, None, 10).unwrap().is_empty());
    }
}
