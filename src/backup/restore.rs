//! `appliance restore`: checks an archive end to end, then puts its files in place in a new or
//! empty data directory (or, when told, one whose server is stopped).

use std::path::{Path, PathBuf};

use super::{
    archive, io, BackupError, Manifest, ENV_ENTRY, EVENTS_ENTRY, PLUGINS_ENTRY, STATE_ENTRY,
};
use crate::store::STATE_FILE;

/// Where a restore goes.
pub struct RestoreTarget<'a> {
    pub data_dir: &'a Path,
    /// Where the events database goes (`SQLITE_PATH`, by default in the data directory).
    pub sqlite_path: &'a Path,
    /// Replace the appliance data already there (never under a running server).
    pub force: bool,
}

pub struct RestoreReport {
    pub manifest: Manifest,
    /// Where the archive's configuration file was written, if it had one.
    pub env_file: Option<PathBuf>,
}

/// The name the archive's configuration file gets in the data directory: the operator decides
/// whether it replaces the one in use.
const RESTORED_ENV: &str = "appliance.env.restored";

pub fn restore(archive: &Path, target: &RestoreTarget) -> Result<RestoreReport, BackupError> {
    // The whole archive is checked before anything is touched.
    archive::verify(archive)?;
    let data_dir = target.data_dir;
    let _lock = crate::store::try_lock_data_dir(data_dir)
        .map_err(io(format!("cannot lock {}", data_dir.display())))?
        .ok_or_else(|| {
            BackupError::Refused(format!(
                "a server is running on {}; stop it before restoring into it",
                data_dir.display()
            ))
        })?;
    let existing = existing_data(data_dir, target.sqlite_path);
    if !existing.is_empty() && !target.force {
        return Err(BackupError::Refused(format!(
            "{} already holds appliance data ({}); restore into a new directory, or pass --force to replace it",
            data_dir.display(),
            existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let staging = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(data_dir)
        .map_err(io(format!(
            "cannot stage the restore in {}",
            data_dir.display()
        )))?;
    // Read again, writing each file as its checksum is checked.
    let manifest = archive::read(archive, Some(staging.path()))?;

    for old in existing {
        std::fs::remove_file(&old).map_err(io(format!("cannot remove {}", old.display())))?;
    }
    move_file(
        &staging.path().join(STATE_ENTRY),
        &data_dir.join(STATE_FILE),
    )?;
    if let Some(parent) = target.sqlite_path.parent() {
        crate::store::create_private_dir(parent)
            .map_err(io(format!("cannot create {}", parent.display())))?;
    }
    move_file(&staging.path().join(EVENTS_ENTRY), target.sqlite_path)?;
    let plugins = crate::plugins::plugin_dir(data_dir);
    let staged_plugins = staging.path().join(PLUGINS_ENTRY);
    if staged_plugins.is_dir() {
        crate::store::create_private_dir(&plugins)
            .map_err(io(format!("cannot create {}", plugins.display())))?;
        for entry in std::fs::read_dir(&staged_plugins).map_err(io("cannot list the plugins"))? {
            let from = entry.map_err(io("cannot list the plugins"))?.path();
            let name = from.file_name().map(PathBuf::from).unwrap_or_default();
            move_file(&from, &plugins.join(name))?;
        }
    }
    let env_file = if staging.path().join(ENV_ENTRY).exists() {
        let to = data_dir.join(RESTORED_ENV);
        move_file(&staging.path().join(ENV_ENTRY), &to)?;
        Some(to)
    } else {
        None
    };
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    Ok(RestoreReport { manifest, env_file })
}

/// The appliance's files already in the target: its state, its events (with SQLite's WAL and
/// shared-memory files, which must never outlive their database) and plugin components.
fn existing_data(data_dir: &Path, sqlite_path: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let sqlite = sqlite_path.as_os_str();
    let mut candidates = vec![data_dir.join(STATE_FILE), sqlite_path.to_owned()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = sqlite.to_owned();
        name.push(suffix);
        candidates.push(PathBuf::from(name));
    }
    found.extend(candidates.into_iter().filter(|p| p.exists()));
    if let Ok(entries) = std::fs::read_dir(crate::plugins::plugin_dir(data_dir)) {
        found.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "wasm")),
        );
    }
    found
}

/// Renames `from` to `to`, copying when they are on different file systems.
fn move_file(from: &Path, to: &Path) -> Result<(), BackupError> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(io(format!("cannot put {} in place", to.display())))?;
    let file = std::fs::File::open(to).map_err(io(format!("cannot sync {}", to.display())))?;
    file.sync_all()
        .map_err(io(format!("cannot sync {}", to.display())))?;
    Ok(())
}
