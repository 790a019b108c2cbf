//! Sinks: where processed events are stored. SQLite is built in and the default; Postgres and
//! ClickHouse join behind the same trait.
//!
//! Owns: the [`Sink`] contract and each implementation's schema, connection and batch write.
//! Must never: acknowledge a batch it has not durably committed, or store an event twice: every
//! write is idempotent on the event uuid and records, in the same transaction where the store is
//! transactional, the queue position it has reached.

pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::event::IngestBatch;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink}: cannot open {target}: {detail}")]
    Open {
        sink: &'static str,
        target: String,
        detail: String,
    },
    #[error("{sink}: migration failed: {detail}")]
    Migrate { sink: &'static str, detail: String },
    #[error("{sink}: write failed: {detail}")]
    Write { sink: &'static str, detail: String },
}

pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// A store of events that the pipeline writes to in batches.
pub trait Sink: Send + Sync {
    fn name(&self) -> &'static str;

    /// The last ingest-queue position this sink has durably committed (0 if none).
    fn position(&self) -> SinkFuture<'_, u64>;

    /// Writes the events of `batches` and records `position` as reached, atomically where the
    /// store allows. Events whose uuid is already stored are skipped.
    fn write(&self, batches: Arc<Vec<IngestBatch>>, position: u64) -> SinkFuture<'_, ()>;
}
