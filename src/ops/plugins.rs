//! Plugin operations: install (folder, archive or upload), list, enable with config values,
//! disable, logs and storage.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::{OpError, Ops};
use crate::plugins::manifest::{Manifest, ManifestError};
use crate::plugins::{self, PluginError};
use crate::store::{PluginConfig, PluginLogEntry, PluginRecord, Store, TeamId};

/// An installed plugin by name or id.
pub fn find(store: &Store, name_or_id: &str) -> Result<PluginRecord, OpError> {
    store
        .list_plugins()?
        .into_iter()
        .find(|p| p.name == name_or_id || p.id.to_string() == name_or_id)
        .ok_or_else(|| OpError::NotFound(format!("no installed plugin is called {name_or_id:?}")))
}

/// The team's config of `record`.
pub fn config_of(
    store: &Store,
    team: TeamId,
    record: &PluginRecord,
) -> Result<PluginConfig, OpError> {
    store
        .list_plugin_configs()?
        .into_iter()
        .find(|c| c.team_id == team && c.plugin_id == record.id)
        .ok_or_else(|| OpError::NotFound(format!("{} has no config for team {team}", record.name)))
}

/// The team's config of the plugin named `plugin`, with the plugin.
pub fn team_config(
    store: &Store,
    team: TeamId,
    plugin: &str,
) -> Result<(PluginRecord, PluginConfig), OpError> {
    let record = find(store, plugin)?;
    let config = config_of(store, team, &record)?;
    Ok((record, config))
}

/// A plugin as operators see it, its configs' secret values masked.
#[derive(Debug, Serialize)]
pub struct PluginView {
    pub id: u64,
    pub name: String,
    pub version: String,
    pub manifest: Value,
    pub sha256: String,
    pub installed_at: chrono::DateTime<chrono::Utc>,
    pub configs: Vec<ConfigView>,
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub id: u64,
    pub team_id: TeamId,
    pub enabled: bool,
    pub order: i64,
    pub config: Value,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// What a plugin upload carries: plugin.json and the component, or an archive of both.
pub enum Upload {
    Parts { manifest: Value, wasm: Vec<u8> },
    Archive(Vec<u8>),
}

impl Ops {
    /// Installs the plugin at `path`: a folder or a `.tar.gz`/`.zip` archive of one.
    pub fn install_plugin_path(&self, path: &Path) -> Result<PluginRecord, OpError> {
        let runtime = self.runtime()?;
        Ok(plugins::install(
            &self.store,
            &runtime,
            &self.data_dir,
            path,
        )?)
    }

    /// Installs an uploaded plugin.
    pub fn install_plugin_upload(&self, upload: Upload) -> Result<PluginRecord, OpError> {
        let runtime = self.runtime()?;
        let record = match upload {
            Upload::Archive(bytes) => plugins::install_archive(
                &self.store,
                &runtime,
                &self.data_dir,
                Path::new("the uploaded archive"),
                &bytes,
            )?,
            Upload::Parts { manifest, wasm } => {
                let manifest = Manifest::parse(&manifest.to_string()).map_err(PluginError::from)?;
                plugins::install_parts(&self.store, &runtime, &self.data_dir, manifest, &wasm)?
            }
        };
        Ok(record)
    }

    /// Installed plugins with their configs.
    pub fn list_plugins(&self) -> Result<Vec<PluginView>, OpError> {
        let configs = self.store.list_plugin_configs()?;
        Ok(self
            .store
            .list_plugins()?
            .into_iter()
            .map(|p| PluginView {
                configs: configs
                    .iter()
                    .filter(|c| c.plugin_id == p.id)
                    .map(|c| ConfigView {
                        id: c.id,
                        team_id: c.team_id,
                        enabled: c.enabled,
                        order: c.order,
                        config: masked(&c.config, &p.manifest),
                        updated_at: c.updated_at,
                    })
                    .collect(),
                id: p.id,
                version: p.manifest["version"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                name: p.name,
                manifest: p.manifest,
                sha256: p.sha256,
                installed_at: p.installed_at,
            })
            .collect())
    }

    /// Enables `plugin` for `team` with config values checked against its schema.
    pub fn enable_plugin(
        &self,
        team: TeamId,
        plugin: &str,
        given: &BTreeMap<String, String>,
        order: Option<i64>,
    ) -> Result<(PluginRecord, PluginConfig), OpError> {
        if !self.store.list_teams()?.iter().any(|t| t.id == team) {
            return Err(OpError::NotFound(format!("no team {team}")));
        }
        let record = find(&self.store, plugin)?;
        let manifest: Manifest = serde_json::from_value(record.manifest.clone())
            .map_err(|e| PluginError::Manifest(ManifestError::Parse(e.to_string())))?;
        // A secret left out (or empty) keeps the value stored before: pages and lists never show
        // secrets, so re-enabling must not ask for them again.
        let mut given = given.clone();
        if let Ok(existing) = config_of(&self.store, team, &record) {
            for field in manifest.config.iter().filter(|f| f.secret) {
                let missing = given.get(&field.key).is_none_or(|v| v.is_empty());
                if let (true, Some(kept)) = (missing, existing.config.get(&field.key)) {
                    given.insert(field.key.clone(), kept.clone());
                }
            }
        }
        let values = manifest
            .validate_config(&given)
            .map_err(PluginError::from)?;
        let config = self
            .store
            .upsert_plugin_config(team, record.id, true, order, Some(values))?;
        Ok((record, config))
    }

    pub fn disable_plugin(&self, team: TeamId, plugin: &str) -> Result<PluginConfig, OpError> {
        let (record, _) = team_config(&self.store, team, plugin)?;
        Ok(self
            .store
            .upsert_plugin_config(team, record.id, false, None, None)?)
    }

    /// What the team's config of `plugin` logged: newest first, at most `limit` lines, older
    /// than line `before` if given (each line comes with its number, to ask for the next page).
    pub fn plugin_logs(
        &self,
        team: TeamId,
        plugin: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, PluginLogEntry)>, OpError> {
        let (_, config) = team_config(&self.store, team, plugin)?;
        Ok(self.store.plugin_logs(config.id, before, limit)?)
    }

    /// What the team's config of `plugin` keeps in storage.
    pub fn plugin_storage(
        &self,
        team: TeamId,
        plugin: &str,
    ) -> Result<Vec<(String, String)>, OpError> {
        let (_, config) = team_config(&self.store, team, plugin)?;
        Ok(self.store.plugin_storage_all(config.id)?)
    }
}

/// Config values of fields marked `secret` are not shown.
fn masked(config: &BTreeMap<String, String>, manifest: &Value) -> Value {
    let secret = |key: &str| {
        manifest["config"].as_array().is_some_and(|fields| {
            fields
                .iter()
                .any(|f| f["key"] == key && f["secret"] == true)
        })
    };
    config
        .iter()
        .map(|(k, v)| {
            let shown = if secret(k) {
                json!("••••")
            } else {
                json!(v)
            };
            (k.clone(), shown)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
