//! The appliance's own durable state, in one redb file under the data directory.
//!
//! Owns: the redb `Database`, its table definitions and the encoding of every value kept there
//! (each value carries a format version). Holds teams and their project tokens, the ingest
//! queue with its sequence counter, installed plugins, plugin configs, plugin storage and logs,
//! the job queue and the schedules' state.
//! Must never: be bypassed. No other module opens the file or names a redb table; callers ask
//! for typed operations ("append these batches", "read after this position").

mod dead_letters;
mod deferred;
mod exports;
mod follow;
mod ingest;
mod jobs;
mod notes;
mod persons;
mod plugin_data;
mod plugins;
mod positions;
mod secrets;
mod snapshot;
mod teams;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

pub use crate::ids::{JobId, PluginConfigId, PluginId, TeamId};
pub use dead_letters::DeadLetter;
pub use exports::{Export, ExportProgress, ExportState, PageCursor};
pub use follow::{FollowColumns, FollowPerson, FollowRecord};
pub use ingest::{IngestStats, QueueRead, QueuedBatch, ReadLimits, Unreadable};
pub use jobs::{
    Attempt, Cadence, Claimed, Control, Job, JobKind, JobState, JobStats, JobTables, NewJob,
    Outcome, ScheduleState, ScheduleTables, WriteDone,
};
pub use persons::{PersonView, PersonsReader, MAX_WARNINGS_PER_TEAM, SEEN_GENERATION_EVENTS};
pub use plugin_data::{PluginLogEntry, StorageQuota};
pub use plugins::{PluginConfig, PluginRecord};
pub use positions::QuarantinedRecord;
pub use snapshot::SnapshotInfo;
pub use teams::{Team, TeamChange};

/// Name of the redb file inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Small counters and markers, by name.
pub(in crate::store) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The state file's id (a uuid in two halves), kept in `META`.
const STATE_ID_HIGH: &str = "state_id_high";
const STATE_ID_LOW: &str = "state_id_low";
/// Version of the table layout as a whole, kept in `META`.
const LAYOUT_VERSION_KEY: &str = "layout_version";
const LAYOUT_VERSION: u64 = 1;

/// Errors from the state store. Each keeps redb's own message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is in use by another appliance process that opened it exclusively"
    )]
    InUse { path: PathBuf },
    #[error("cannot open the state file {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("state store transaction failed: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("state store table error: {0}")]
    Table(#[from] redb::TableError),
    #[error("state store I/O error: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("state store commit failed: {0}")]
    Commit(#[from] redb::CommitError),
    #[error("the state file was written by a newer appliance (layout {found}, this build knows {known})")]
    NewerLayout { found: u64, known: u64 },
    #[error("corrupt value in the state store ({what}): {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The operation does not fit the state of what it names (a job already dead, a token
    /// already taken).
    #[error("{0}")]
    Conflict(String),
    /// What the operation names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A value the store refuses to keep (a malformed token).
    #[error("{0}")]
    Invalid(String),
    /// The state file is being reopened after a storage failure (a full disk); retry later.
    #[error(
        "the state store is unavailable after a storage failure (is the disk full?); retrying"
    )]
    Unavailable,
}

/// A handle on the state store; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` while the file is being reopened after a storage failure.
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    data_dir: PathBuf,
    /// Set when a transaction failed for a storage reason (a full disk, an I/O error): redb
    /// refuses every later transaction until the file is reopened, so the next one reopens it.
    failed: AtomicBool,
    /// When the last reopening was tried, so a disk still full is not hammered.
    last_reopen: Mutex<Option<Instant>>,
    /// Bytes of records in the ingest queue (mirrors the `META` counter this process keeps).
    queued_bytes: AtomicU64,
    /// Free bytes on the data directory's disk, as last read.
    free_bytes: AtomicU64,
    /// Bytes of each team's deferred batches (mirrors the table this process keeps).
    deferred: Mutex<std::collections::BTreeMap<TeamId, u64>>,
}

/// How much room the appliance has: what capture checks before accepting more.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Room {
    pub queued_bytes: u64,
    pub free_disk_bytes: u64,
}

/// How often a failed store may try to reopen its file.
const REOPEN_EVERY: Duration = Duration::from_millis(500);

/// Memory redb may hold as its page cache. Its default is 1 GiB, which a growing ingest queue
/// fills (pages written once and read once by the pipeline), so the state file's cache, not the
/// data, set the appliance's peak memory under overload. The interior pages every lookup
/// re-touches fit many times over; the rest is read through the OS's page cache.
/// (128 MiB: 64 MiB cost capture 5–15 % in back-to-back runs; 128 MiB cost nothing measurable.)
pub const CACHE_BYTES: usize = 128 << 20;

fn open_database(path: &Path) -> Result<Database, StoreError> {
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .set_concurrency_mode(ConcurrencyMode::MultiWriter)
        .create(path)
        .map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.to_owned(),
            },
            source => StoreError::Open {
                path: path.to_owned(),
                source,
            },
        })
}

impl StoreError {
    /// True for failures of the storage itself (full disk, I/O), after which redb refuses every
    /// transaction until the file is reopened.
    fn is_storage_failure(&self) -> bool {
        let storage = |e: &redb::StorageError| {
            matches!(
                e,
                redb::StorageError::Io(_) | redb::StorageError::PreviousIo
            )
        };
        match self {
            StoreError::Storage(e) => storage(e),
            StoreError::Transaction(redb::TransactionError::Storage(e)) => storage(e),
            StoreError::Commit(redb::CommitError::Storage(e)) => storage(e),
            StoreError::Table(redb::TableError::Storage(e)) => storage(e),
            _ => false,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the state file under `data_dir`.
    ///
    /// The file is opened in redb's multi-writer mode so that CLI commands such as
    /// `appliance team create` work while the server runs; redb serialises the writers.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        create_private_dir(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STATE_FILE);
        let db = open_database(&path)?;
        let store = Store {
            inner: Arc::new(Inner {
                db: RwLock::new(Some(Arc::new(db))),
                path,
                data_dir: data_dir.to_owned(),
                failed: AtomicBool::new(false),
                last_reopen: Mutex::new(None),
                queued_bytes: AtomicU64::new(0),
                free_bytes: AtomicU64::new(u64::MAX),
                deferred: Mutex::default(),
            }),
        };
        store.initialise()?;
        store.set_queued_bytes(store.ingest_stats()?.queued_bytes);
        store.load_deferred_bytes()?;
        store.refresh_free_space();
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The database, reopened first if a storage failure latched it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if self.inner.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        self.inner
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Reopens the file after a storage failure (at most every [`REOPEN_EVERY`]): redb latches
    /// the first failed write and refuses every transaction after it, so once space returns
    /// only a fresh handle works again. What was committed before the failure is kept.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut last = self
            .inner
            .last_reopen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.inner.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        if last.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return Err(StoreError::Unavailable);
        }
        *last = Some(Instant::now());
        // Let go of the failed handle; transactions still running on it end on their own.
        let old = self
            .inner
            .db
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(old);
        match open_database(&self.inner.path) {
            Ok(db) => {
                *self.inner.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                self.inner.failed.store(false, Ordering::Release);
                tracing::warn!(path = %self.inner.path.display(), "the state file was reopened after a storage failure");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "the state file cannot be reopened yet; retrying");
                Err(StoreError::Unavailable)
            }
        }
    }

    /// Notes a storage failure, so the next transaction reopens the file.
    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            if e.is_storage_failure() && !self.inner.failed.swap(true, Ordering::AcqRel) {
                tracing::error!(error = %e, "the state store failed to write; it reopens the file at the next transaction");
            }
        }
        result
    }

    /// A write transaction.
    fn write(&self) -> Result<WriteTransaction, StoreError> {
        let db = self.db()?;
        self.noted(db.begin_write().map_err(StoreError::from))
    }

    /// Commits `txn`; a storage failure latches the store for reopening.
    fn commit(&self, txn: WriteTransaction) -> Result<(), StoreError> {
        self.noted(txn.commit().map_err(StoreError::from))
    }

    /// Reads the free space of the data directory's disk (called on a clock by the server).
    pub fn refresh_free_space(&self) {
        if let Some(free) = free_space(&self.inner.data_dir) {
            self.inner.free_bytes.store(free, Ordering::Relaxed);
        }
    }

    fn set_queued_bytes(&self, bytes: u64) {
        self.inner.queued_bytes.store(bytes, Ordering::Relaxed);
    }

    /// What capture checks before accepting more: the queue's size and the disk's free space.
    pub fn room(&self) -> Room {
        Room {
            queued_bytes: self.inner.queued_bytes.load(Ordering::Relaxed),
            free_disk_bytes: self.inner.free_bytes.load(Ordering::Relaxed),
        }
    }

    /// Creates every table and checks the layout version, so readers never meet a missing table.
    fn initialise(&self) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(LAYOUT_VERSION_KEY)?.map(|v| v.value());
            match found {
                Some(found) if found > LAYOUT_VERSION => {
                    return Err(StoreError::NewerLayout {
                        found,
                        known: LAYOUT_VERSION,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert(LAYOUT_VERSION_KEY, LAYOUT_VERSION)?;
                }
            }
            if meta.get(STATE_ID_HIGH)?.is_none() {
                let id = uuid::Uuid::new_v4().as_u64_pair();
                meta.insert(STATE_ID_HIGH, id.0)?;
                meta.insert(STATE_ID_LOW, id.1)?;
            }
            teams::create_tables(&txn)?;
            ingest::create_tables(&txn)?;
            plugins::create_tables(&txn)?;
            plugin_data::create_tables(&txn)?;
            secrets::create_tables(&txn)?;
            notes::create_tables(&txn)?;
            jobs::create_tables(&txn)?;
            exports::create_tables(&txn)?;
            positions::create_tables(&txn)?;
            deferred::create_tables(&txn)?;
            persons::create_tables(&txn)?;
            follow::create_tables(&txn)?;
            dead_letters::create_tables(&txn)?;
        }
        ingest::init_queued_bytes(&txn)?;
        self.commit(txn)?;
        Ok(())
    }

    /// This state file's own id, made when it was created (a backup restored keeps it): a sink
    /// shared by several boxes tells their positions apart by it.
    pub fn state_id(&self) -> Result<uuid::Uuid, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        Ok(uuid::Uuid::from_u64_pair(
            meta_get(&meta, STATE_ID_HIGH)?,
            meta_get(&meta, STATE_ID_LOW)?,
        ))
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db()?;
        self.noted(db.begin_read().map_err(StoreError::from))
    }
}

/// Creates a directory (and its parents) readable by the owner only, whatever the umask: the
/// data directory holds secrets and plugin configs.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Takes the data directory's server lock (`server.lock`), held for as long as the returned
/// file lives; `Ok(None)` if another process holds it. One server per data directory, and no
/// restore under a running one.
pub fn try_lock_data_dir(data_dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    create_private_dir(data_dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("server.lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Free bytes for an unprivileged writer on the disk holding `dir`.
pub fn free_space(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
}

/// A random token: `prefix` and 43 alphanumerics (PostHog's shape for project tokens).
pub(crate) fn random_token(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..43)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

/// Format version of every value this build writes to the state file.
const VALUE_FORMAT: u8 = 1;

/// A value as the state file keeps it (see [`crate::codec`]).
fn encode_value<T: serde::Serialize>(value: &T) -> Vec<u8> {
    crate::codec::encode(VALUE_FORMAT, value)
}

/// Reads a value written by [`encode_value`]. Teams, plugins and plugin logs written before the
/// shared codec were versioned JSON (`{"v":1,…}`); those still read.
fn decode_value<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { what, detail };
    if bytes.first() == Some(&b'{') {
        #[derive(serde::Deserialize)]
        struct Legacy<T> {
            v: u8,
            #[serde(flatten)]
            value: T,
        }
        let legacy: Legacy<T> =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        return match legacy.v {
            1 => Ok(legacy.value),
            v => Err(corrupt(format!("unknown JSON format version {v}"))),
        };
    }
    crate::codec::decode(VALUE_FORMAT, bytes).map_err(|e| corrupt(e.to_string()))
}

/// Reads a counter from `META`, or 0.
fn meta_get(
    table: &impl redb::ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<u64, StoreError> {
    Ok(table.get(key)?.map(|v| v.value()).unwrap_or(0))
}
