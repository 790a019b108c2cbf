//! The appliance's own durable state, in one redb file under the data directory.
//!
//! Owns: the redb `Database`, its table definitions and the encoding of every value kept there
//! (each value carries a format version). Holds teams and their project tokens, the ingest
//! queue with its sequence counter, installed plugins, plugin configs, plugin storage and logs,
//! the job queue and the schedules' state.
//! Must never: be bypassed. No other module opens the file or names a redb table; callers ask
//! for typed operations ("append these batches", "read after this position").

mod exports;
mod ingest;
mod jobs;
mod plugins;
mod positions;
mod secrets;
mod teams;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition};

pub use crate::ids::{JobId, PluginConfigId, PluginId, TeamId};
pub use exports::{Export, ExportProgress, ExportState, PageCursor};
pub use ingest::{IngestStats, QueueRead, QueuedBatch, ReadLimits, Unreadable};
pub use jobs::{
    Attempt, Cadence, Claimed, Control, Job, JobKind, JobState, JobStats, JobTables, NewJob,
    Outcome, ScheduleState, ScheduleTables,
};
pub use plugins::{PluginConfig, PluginLogEntry, PluginRecord};
pub use positions::QuarantinedRecord;
pub use teams::Team;

/// Name of the redb file inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Small counters and markers, by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
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
}

/// A handle on the state store; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state file under `data_dir`.
    ///
    /// The file is opened in redb's multi-writer mode so that CLI commands such as
    /// `appliance team create` work while the server runs; redb serialises the writers.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(STATE_FILE);
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse { path: path.clone() }
                }
                source => StoreError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let store = Store {
            db: Arc::new(db),
            path,
        };
        store.initialise()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates every table and checks the layout version, so readers never meet a missing table.
    fn initialise(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
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
            teams::create_tables(&txn)?;
            ingest::create_tables(&txn)?;
            plugins::create_tables(&txn)?;
            secrets::create_tables(&txn)?;
            jobs::create_tables(&txn)?;
            exports::create_tables(&txn)?;
            positions::create_tables(&txn)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(self.db.begin_read()?)
    }
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
