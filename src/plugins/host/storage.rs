//! `storage`: a plugin config's persistent key-value store. What one call sets and deletes is
//! kept here and committed in one transaction when the call ends; reads see the call's own
//! writes. Each `set` is checked against the config's quota (keys, bytes of keys and values,
//! value size) as it is made, and the commit checks again (another instance of the same config
//! may have written meanwhile), so the quota holds.

use std::collections::BTreeMap;

use super::super::runtime::bindings::appliance::plugin::storage;
use super::HostState;
use crate::store::StorageQuota;

/// Longest storage key.
const MAX_KEY_BYTES: usize = 1024;

/// The current call's writes (`None` deletes) and what they change of the config's usage.
#[derive(Default)]
pub struct PendingWrites {
    writes: BTreeMap<String, Option<String>>,
    /// (keys, bytes) stored when the call first wrote, plus the changes since.
    usage: Option<(i64, i64)>,
}

impl HostState {
    fn quota(&self) -> StorageQuota {
        let q = &self.scope.quotas;
        StorageQuota {
            max_keys: q.storage_max_keys,
            max_bytes: q.storage_max_bytes,
        }
    }

    /// The stored value of `key` as this call sees it.
    fn current(&mut self, key: &str) -> Result<Option<String>, String> {
        if let Some(pending) = self.writes.writes.get(key) {
            return Ok(pending.clone());
        }
        self.scope
            .store
            .plugin_storage_get(self.scope.config_id, key)
            .map_err(|e| format!("storage failed: {e}"))
    }

    /// Records `value` (or a deletion) at `key`, checking the quota.
    fn stage(&mut self, key: String, value: Option<String>) -> Result<(), String> {
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "the key is {} bytes, more than {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        if let Some(v) = &value {
            let max = self.scope.quotas.storage_max_value_bytes;
            if v.len() > max {
                return Err(format!(
                    "the value is {} bytes, more than PLUGIN_STORAGE_MAX_VALUE_BYTES ({max})",
                    v.len()
                ));
            }
        }
        let old = self.current(&key)?;
        let (mut keys, mut bytes) = match self.writes.usage {
            Some(usage) => usage,
            None => {
                let (keys, bytes) = self
                    .scope
                    .store
                    .plugin_storage_usage(self.scope.config_id)
                    .map_err(|e| format!("storage failed: {e}"))?;
                (keys as i64, bytes as i64)
            }
        };
        let size = |v: &Option<String>| v.as_ref().map_or(0, |v| (key.len() + v.len()) as i64);
        keys += i64::from(value.is_some()) - i64::from(old.is_some());
        bytes += size(&value) - size(&old);
        let quota = self.quota();
        if value.is_some() && keys > quota.max_keys as i64 {
            return Err(format!(
                "this plugin config's storage holds {} keys, its limit (PLUGIN_STORAGE_MAX_KEYS)",
                quota.max_keys
            ));
        }
        if value.is_some() && bytes > quota.max_bytes as i64 {
            return Err(format!(
                "this plugin config's storage would hold {bytes} bytes, more than its limit of {} (PLUGIN_STORAGE_MAX_BYTES)",
                quota.max_bytes
            ));
        }
        self.writes.usage = Some((keys, bytes));
        self.writes.writes.insert(key, value);
        Ok(())
    }
}

/// Commits the call's writes in one transaction; returns a log line if some were refused.
pub(super) fn commit(state: &mut HostState) -> Option<String> {
    let pending = std::mem::take(&mut state.writes);
    if pending.writes.is_empty() {
        return None;
    }
    let writes: Vec<(String, Option<String>)> = pending.writes.into_iter().collect();
    match state
        .scope
        .store
        .plugin_storage_apply(state.scope.config_id, &writes, state.quota())
    {
        Ok(0) => None,
        Ok(refused) => Some(format!(
            "{refused} storage writes were refused at commit: another instance of this plugin config filled its quota meanwhile"
        )),
        Err(e) => {
            tracing::warn!(config = state.scope.config_id, error = %e, "cannot commit plugin storage");
            Some(format!("storage writes of this call were lost: {e}"))
        }
    }
}

impl storage::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        match self.current(&key) {
            Ok(value) => value,
            Err(e) => {
                self.log("error", format!("storage.get({key:?}) failed: {e}"));
                None
            }
        }
    }

    fn set(&mut self, key: String, value: String) -> Result<(), String> {
        self.stage(key.clone(), Some(value)).inspect_err(|e| {
            self.log("error", format!("storage.set({key:?}) refused: {e}"));
        })
    }

    fn delete(&mut self, key: String) {
        if let Err(e) = self.stage(key.clone(), None) {
            self.log("error", format!("storage.delete({key:?}) failed: {e}"));
        }
    }
}
