//! The single door into the durable ingest queue: a group-commit writer.
//!
//! Owns: the bounded channel that capture (and later the Kafka and Celery sources) hand encoded
//! batches to, and the one writer thread that folds whatever is waiting into a single redb
//! transaction, commits it once, and only then answers every submitter.
//! Must never: answer a submitter before its batch is committed, or queue without bound (a full
//! channel is refused at once so capture can answer 503 with `Retry-After`).

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::store::Store;

/// Why a batch was not made durable. Every variant is retryable by the client.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the ingest queue is full")]
    Busy,
    #[error("the appliance is shutting down")]
    Closed,
    #[error("could not persist events: {0}")]
    Storage(String),
}

struct Pending {
    encoded: Vec<u8>,
    reply: oneshot::Sender<Result<u64, IngestError>>,
}

/// What submitters hold. Dropping every handle lets the writer finish and exit.
#[derive(Clone)]
pub struct IngestHandle {
    tx: mpsc::Sender<Pending>,
}

impl IngestHandle {
    /// Queues one encoded batch and waits for the commit that makes it durable; returns its
    /// sequence number.
    pub async fn submit(&self, encoded: Vec<u8>) -> Result<u64, IngestError> {
        self.enqueue(encoded)
            .map_err(|refused| refused.error)?
            .durable()
            .await
    }

    /// Queues one encoded batch now, behind every batch queued before it (batches enqueued one
    /// after another get rising sequence numbers); the answer waits for its commit. A batch
    /// the queue cannot take comes back with the reason, to be tried again without a copy.
    pub fn enqueue(&self, encoded: Vec<u8>) -> Result<Enqueued, NotQueued> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Pending { encoded, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(p) => NotQueued {
                    error: IngestError::Busy,
                    encoded: p.encoded,
                },
                mpsc::error::TrySendError::Closed(p) => NotQueued {
                    error: IngestError::Closed,
                    encoded: p.encoded,
                },
            })?;
        Ok(Enqueued(answer))
    }
}

/// A batch [`IngestHandle::enqueue`] could not queue, and why.
pub struct NotQueued {
    pub error: IngestError,
    pub encoded: Vec<u8>,
}

/// A batch in the writer's queue, waiting for the commit that makes it durable.
pub struct Enqueued(oneshot::Receiver<Result<u64, IngestError>>);

impl Enqueued {
    /// Waits for the commit; returns the batch's sequence number.
    pub async fn durable(self) -> Result<u64, IngestError> {
        self.0.await.map_err(|_| IngestError::Closed)?
    }
}

/// Starts the writer thread. `committed` is notified after every commit, so the pipeline wakes.
pub fn start(
    store: Store,
    capacity: usize,
    max_requests_per_commit: usize,
    committed: Arc<Notify>,
) -> std::io::Result<(IngestHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(capacity);
    let thread = std::thread::Builder::new()
        .name("ingest-writer".into())
        .spawn(move || run_writer(store, rx, max_requests_per_commit, committed))?;
    Ok((IngestHandle { tx }, thread))
}

fn run_writer(store: Store, mut rx: mpsc::Receiver<Pending>, max: usize, committed: Arc<Notify>) {
    let mut group: Vec<Pending> = Vec::with_capacity(max);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < max {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let encoded: Vec<Vec<u8>> = group
            .iter_mut()
            .map(|p| std::mem::take(&mut p.encoded))
            .collect();
        match store.append_ingest(&encoded) {
            Ok(last) => {
                let first_seq = last + 1 - group.len() as u64;
                for (i, p) in group.drain(..).enumerate() {
                    let _ = p.reply.send(Ok(first_seq + i as u64));
                }
                committed.notify_one();
            }
            Err(e) => {
                tracing::error!(error = %e, requests = group.len(), "ingest commit failed; requests answered 503");
                let message = e.to_string();
                for p in group.drain(..) {
                    let _ = p.reply.send(Err(IngestError::Storage(message.clone())));
                }
            }
        }
    }
    tracing::debug!("ingest writer stopped: every submitter is gone");
}
