//! The shapes an event takes between modules: as captured and queued ([`IngestBatch`]) and as
//! stored ([`StoredEvent`]).
//!
//! Owns: those types and the versioned encoding of an ingest batch in the queue.
//! Must never: do I/O or hold behaviour beyond encoding; transformations live in `pipeline`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::TeamId;

/// Format version of an encoded [`IngestBatch`].
pub const INGEST_FORMAT: u8 = 1;

/// The accepted events of one capture request (or one source message), exactly as they will be
/// replayed after a crash: everything the pipeline needs is fixed here, so processing the same
/// batch twice gives the same result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IngestBatch {
    pub v: u8,
    pub team_id: TeamId,
    /// When the server received the request: the `now` of PostHog's timestamp rules.
    pub received_at: DateTime<Utc>,
    /// The client IP of the request, if known.
    pub ip: Option<String>,
    /// The client's send time (body `sent_at` or query `_`), for clock-skew correction.
    pub sent_at: Option<DateTime<Utc>>,
    /// Event objects as the client sent them, each with a valid `uuid` assigned.
    pub events: Vec<Map<String, Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid ingest batch: {0}")]
    Json(#[from] serde_json::Error),
    #[error("ingest batch format {0} is unknown to this build (it knows {INGEST_FORMAT})")]
    Version(u8),
}

impl IngestBatch {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising maps of JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<IngestBatch, DecodeError> {
        let batch: IngestBatch = serde_json::from_slice(bytes)?;
        if batch.v != INGEST_FORMAT {
            return Err(DecodeError::Version(batch.v));
        }
        Ok(batch)
    }
}

/// An event as written to a sink: the columns of PostHog's event tables.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub uuid: Uuid,
    pub event: String,
    pub properties: Map<String, Value>,
    pub timestamp: DateTime<Utc>,
    pub team_id: TeamId,
    pub distinct_id: String,
    pub elements_chain: String,
}
