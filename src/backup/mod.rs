//! `appliance backup` and `restore`: one archive (`.tar.zst`) of everything the appliance owns,
//! taken while the server runs, verified by checksums, restored into a new data directory.
//!
//! Owns: what goes into an archive and in which order (the state file's snapshot first, then
//! the events database, plugins and the configuration file), its manifest, verification,
//! restoring, and pruning of scheduled backups.
//! Must never: stop capture for longer than a commit (the state is copied from one read
//! transaction, the events with SQLite's online backup); leave a half-written archive under
//! the final name; restore over a directory a server is running on.
//!
//! Why the state file goes first: every event acknowledged before the backup started is then
//! either in the state file's ingest queue (not yet stored by the sink) or was trimmed from it,
//! which happens only after the sink committed it, before the events database is copied. The
//! events database may also hold later events; a restored server moves its queue positions
//! past the sink's (see `Store::ensure_sequence_after`) and the sink's `(team_id, uuid)` key
//! keeps any event from being stored twice.

mod archive;
mod restore;
pub mod scheduled;

use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::OpenFlags;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::store::{SnapshotInfo, Store, StoreError};

pub use archive::verify;
pub use restore::{restore, RestoreReport, RestoreTarget};

/// Version of the archive layout this build writes and reads.
pub const FORMAT: u32 = 1;
/// The state file's name inside an archive.
const STATE_ENTRY: &str = "state.redb";
/// The events database's name inside an archive.
const EVENTS_ENTRY: &str = "events.sqlite3";
/// The configuration file's name inside an archive.
const ENV_ENTRY: &str = "appliance.env";
/// Plugins' components, by content hash, inside an archive.
const PLUGINS_ENTRY: &str = "plugins";
/// Names of scheduled backups: a prefix, the UTC time, the extension.
const SCHEDULED_PREFIX: &str = "appliance-";
const EXTENSION: &str = ".tar.zst";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the events database {path}: {detail}")]
    Events { path: PathBuf, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The archive is damaged, truncated or not an appliance backup.
    #[error("{archive} is not a sound backup: {detail}")]
    Corrupt { archive: PathBuf, detail: String },
    /// The restore target is in use or not empty.
    #[error("{0}")]
    Refused(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// One file of an archive, with the checksum that `verify` and `restore` check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The first entry of every archive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub appliance_version: String,
    pub created_at: String,
    /// The state file's snapshot: its tables, rows and ingest queue.
    pub state: SnapshotInfo,
    /// The events database's copy: the queue position it holds everything through, and rows.
    pub events: EventsInfo,
    pub files: Vec<FileEntry>,
}

pub use crate::sinks::sqlite::EventsSummary as EventsInfo;

/// What a backup reads.
pub struct Sources<'a> {
    pub store: &'a Store,
    pub data_dir: &'a Path,
    pub sqlite_path: &'a Path,
    /// The configuration file the appliance read (`APPLIANCE_ENV_FILE`), if any.
    pub env_file: Option<&'a Path>,
}

impl<'a> Sources<'a> {
    /// What the configuration names, with `env_file` its `APPLIANCE_ENV_FILE` (borrowed from the
    /// caller, which owns the path).
    pub fn of(store: &'a Store, config: &'a Config, env_file: Option<&'a Path>) -> Sources<'a> {
        Sources {
            store,
            data_dir: &config.data_dir,
            sqlite_path: &config.sqlite_path,
            env_file,
        }
    }
}

/// What a backup is doing, for a progress display.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// A stage began.
    Stage(&'static str),
    /// Rows of the state file copied so far.
    Rows(u64),
    /// Bytes written to the archive so far.
    Written(u64),
}

/// Writes a backup of `sources` to `target` (through a temporary name, renamed when complete).
pub fn create(
    sources: &Sources,
    target: &Path,
    progress: &mut dyn FnMut(Step),
) -> Result<Manifest, BackupError> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::store::create_private_dir(parent).map_err(io(format!(
        "cannot create the backup directory {}",
        parent.display()
    )))?;
    let staging = tempfile::Builder::new()
        .prefix(".appliance-backup-")
        .tempdir_in(parent)
        .map_err(io(format!(
            "cannot stage the backup in {}",
            parent.display()
        )))?;

    // The state first: see the module's documentation for why the order matters.
    progress(Step::Stage("state"));
    let state = sources
        .store
        .snapshot_into(&staging.path().join(STATE_ENTRY), &mut |rows| {
            progress(Step::Rows(rows))
        })?;
    progress(Step::Stage("events"));
    let events_copy = staging.path().join(EVENTS_ENTRY);
    let events = copy_events(sources.sqlite_path, &events_copy)?;

    progress(Step::Stage("plugins"));
    let mut files = vec![
        describe(staging.path(), STATE_ENTRY)?,
        describe(staging.path(), EVENTS_ENTRY)?,
    ];
    for wasm in plugin_components(sources.data_dir)? {
        let name = format!("{PLUGINS_ENTRY}/{}", file_name(&wasm));
        let staged = staging.path().join(&name);
        std::fs::create_dir_all(staging.path().join(PLUGINS_ENTRY))
            .map_err(io("cannot stage the plugins"))?;
        std::fs::copy(&wasm, &staged).map_err(io(format!("cannot copy {}", wasm.display())))?;
        files.push(describe(staging.path(), &name)?);
    }
    if let Some(env) = sources.env_file.filter(|p| p.exists()) {
        std::fs::copy(env, staging.path().join(ENV_ENTRY))
            .map_err(io(format!("cannot copy {}", env.display())))?;
        files.push(describe(staging.path(), ENV_ENTRY)?);
    }
    let manifest = Manifest {
        format: FORMAT,
        appliance_version: env!("CARGO_PKG_VERSION").to_owned(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        state,
        events,
        files,
    };
    progress(Step::Stage("archive"));
    archive::write(staging.path(), &manifest, target, progress)?;
    Ok(manifest)
}

/// Copies the events database with SQLite's online backup, in one step: one read transaction,
/// so writers (WAL) go on and the copy never restarts.
fn copy_events(source: &Path, target: &Path) -> Result<EventsInfo, BackupError> {
    let fail = |e: rusqlite::Error| BackupError::Events {
        path: source.to_owned(),
        detail: e.to_string(),
    };
    if !source.exists() {
        // Never started: the copy is an empty, migrated database.
        crate::sinks::sqlite::migrate(target).map_err(|e| BackupError::Events {
            path: source.to_owned(),
            detail: e.to_string(),
        })?;
        let copy = rusqlite::Connection::open(target).map_err(fail)?;
        copy.execute_batch("PRAGMA journal_mode=DELETE;")
            .map_err(fail)?;
        return crate::sinks::sqlite::describe_copy(&copy).map_err(|detail| BackupError::Events {
            path: source.to_owned(),
            detail,
        });
    }
    let from = rusqlite::Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    from.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(fail)?;
    let mut to = rusqlite::Connection::open(target).map_err(fail)?;
    {
        let backup = rusqlite::backup::Backup::new(&from, &mut to).map_err(fail)?;
        loop {
            match backup.step(-1).map_err(fail)? {
                rusqlite::backup::StepResult::Done => break,
                // The source is locked by a writer for a moment: try again.
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
    // A copy on its own needs no WAL file beside it.
    to.execute_batch("PRAGMA journal_mode=DELETE;")
        .map_err(fail)?;
    crate::sinks::sqlite::describe_copy(&to).map_err(|detail| BackupError::Events {
        path: source.to_owned(),
        detail,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The installed plugin components (`plugins/<sha256>.wasm`); the compiled cache is rebuilt.
fn plugin_components(data_dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let dir = crate::plugins::plugin_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("cannot list {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(io("cannot list the plugins"))?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The size and checksum of `name` under `dir`.
fn describe(dir: &Path, name: &str) -> Result<FileEntry, BackupError> {
    let path = dir.join(name);
    let mut file =
        std::fs::File::open(&path).map_err(io(format!("cannot read {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        path: name.to_owned(),
        bytes,
        sha256: format!("{:x}", hasher.finalize()),
    })
}

/// The file name a scheduled backup taken at `at` gets.
pub fn scheduled_name(at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{SCHEDULED_PREFIX}{}{EXTENSION}",
        at.format("%Y%m%dT%H%M%SZ")
    )
}

/// The scheduled backups in `dir`, oldest first.
pub fn scheduled_backups(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = file_name(p);
            name.starts_with(SCHEDULED_PREFIX) && name.ends_with(EXTENSION)
        })
        .collect();
    // The names hold the time in a sortable form.
    found.sort();
    found
}

/// Deletes the oldest scheduled backups in `dir` beyond the newest `keep`; returns them.
pub fn prune(dir: &Path, keep: usize) -> Vec<PathBuf> {
    let all = scheduled_backups(dir);
    let excess = all.len().saturating_sub(keep);
    all.into_iter()
        .take(excess)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
}
