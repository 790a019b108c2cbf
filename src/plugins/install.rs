//! Installing a plugin: from a folder (plugin.json beside its component) or a `.tar.gz`/`.zip`
//! archive of one, checked against the contract and started once before it is recorded.

use std::path::Path;
use std::sync::Arc;

use super::archive;
use super::host::cache::new_cache;
use super::host::{HostState, NetworkPolicy, PluginScope};
use super::manifest::Manifest;
use super::runtime::{Instance, Loaded, Runtime};
use super::{plugin_dir, PluginError};
use crate::config::PluginQuotas;
use crate::geoip::GeoIp;
use crate::store::{PluginRecord, Store};

/// Installs the plugin at `path`: a folder holding plugin.json and its component, or a
/// `.tar.gz` or `.zip` archive of one.
pub fn install(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    path: &Path,
) -> Result<PluginRecord, PluginError> {
    if !path.is_dir() {
        let bytes = std::fs::read(path)
            .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", path.display())))?;
        return install_archive(store, runtime, data_dir, path, &bytes);
    }
    let manifest_path = path.join("plugin.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", manifest_path.display())))?;
    let manifest = Manifest::parse(&text)?;
    let wasm_path = path.join(&manifest.main);
    let wasm = std::fs::read(&wasm_path)
        .map_err(|e| PluginError::Io(format!("cannot read {}: {e}", wasm_path.display())))?;
    install_parts(store, runtime, data_dir, manifest, &wasm)
}

/// Installs the plugin in a `.tar.gz` or `.zip` archive's bytes; `name` names it in errors.
pub fn install_archive(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    name: &Path,
    bytes: &[u8],
) -> Result<PluginRecord, PluginError> {
    let files = archive::read(name, bytes)?;
    let folder = archive::manifest_folder(name, &files)?;
    let text = files
        .get(&folder.join("plugin.json"))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let manifest = Manifest::parse(&text)?;
    let wasm = files.get(&folder.join(&manifest.main)).ok_or_else(|| {
        PluginError::InvalidArchive(format!(
            "{}: the archive has no {} beside plugin.json",
            name.display(),
            manifest.main
        ))
    })?;
    install_parts(store, runtime, data_dir, manifest, wasm)
}

/// Installs a plugin from its manifest and component bytes: compiles the component against the
/// contract, loads it once (a plugin that cannot even start is refused now), keeps the component
/// under the data directory by hash, and records the plugin.
pub fn install_parts(
    store: &Store,
    runtime: &Runtime,
    data_dir: &Path,
    manifest: Manifest,
    wasm: &[u8],
) -> Result<PluginRecord, PluginError> {
    let loaded = runtime.load(wasm)?;
    let defaults = manifest
        .validate_config(&Default::default())
        .unwrap_or_default();
    probe(runtime, store, &loaded, defaults)?;
    let dir = plugin_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| PluginError::Io(format!("{}: {e}", dir.display())))?;
    let target = dir.join(format!("{}.wasm", loaded.sha256));
    std::fs::write(&target, wasm)
        .map_err(|e| PluginError::Io(format!("{}: {e}", target.display())))?;
    let manifest_json =
        serde_json::to_value(&manifest).map_err(|e| PluginError::Io(e.to_string()))?;
    Ok(store.install_plugin(&manifest.name, manifest_json, &loaded.sha256)?)
}

/// An instance of `loaded` that reaches nothing (no config id, storage of its own, jobs or
/// GeoIP), to see that the component starts and ask what it implements.
pub(super) fn probe(
    runtime: &Runtime,
    store: &Store,
    loaded: &Loaded,
    config: std::collections::BTreeMap<String, String>,
) -> Result<Instance, PluginError> {
    let scope = PluginScope {
        config_id: 0,
        config,
        allowed_hosts: Vec::new(),
        store: store.clone(),
        cache: new_cache(64 * 1024),
        jobs: None,
        job_names: Vec::new(),
        job_timeout: runtime.limits.task,
        geoip: Arc::new(GeoIp::disabled()),
        quotas: Arc::new(PluginQuotas::default()),
        network: NetworkPolicy::new(Vec::new()),
    };
    runtime
        .instantiate(loaded, HostState::new(scope, runtime.limits.memory_bytes))
        .map_err(|e| PluginError::Instantiate(e.to_string()))
}
