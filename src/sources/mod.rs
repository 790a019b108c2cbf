//! Sources besides HTTP capture: queues a PostHog installation (or anything speaking its
//! formats) feeds. Each turns messages into `IngestBatch`es through the same ingest writer as
//! capture and acknowledges a message only once its batch is durable.
//!
//! Owns: reading the queues, their message formats, acknowledgement after durability, and the
//! dead letters of messages that cannot be read.
//! Must never: acknowledge a message before its events are durable, hold more than a bounded
//! number of messages in memory, or stop on a message it cannot read.

pub mod celery;
pub mod kafka;
pub mod teams;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::capture::DailySalts;
use crate::event::normalize::{normalize_tree, RequestContext};
use crate::event::IngestBatch;
use crate::geoip::GeoIp;
use crate::ingest::{IngestError, IngestHandle, NotQueued};
use crate::shutdown::Shutdown;
use crate::store::{Store, Team};

/// What every source needs to turn a message's event into a batch as capture would.
#[derive(Clone)]
pub struct Normalizer {
    pub geoip: std::sync::Arc<GeoIp>,
    pub salts: std::sync::Arc<DailySalts>,
    pub max_event_bytes: usize,
}

/// One event that arrived through a queue, with what its producer said about its request.
pub struct Arrival {
    pub ip: Option<String>,
    /// When PostHog's capture received it (the `now` of the clock-skew correction).
    pub now: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub event: Map<String, Value>,
}

impl Normalizer {
    /// The batch of one event for `team`, normalised as capture normalises (GeoIP, the team's
    /// `anonymize_ips`, cookieless ids); refused, with the reason, when it is too large.
    pub fn batch(&self, team: &Team, arrival: Arrival) -> Result<IngestBatch, String> {
        let size = serde_json::to_vec(&arrival.event).map_or(0, |v| v.len());
        if size > self.max_event_bytes {
            return Err(format!(
                "the event is {size} bytes of JSON, more than the limit of {}",
                self.max_event_bytes
            ));
        }
        let ctx = RequestContext {
            received_at: arrival.now,
            sent_at: arrival.sent_at,
            ip: arrival.ip.as_deref(),
            anonymize_ips: team.anonymize_ips,
            geoip: Some(&self.geoip),
            default_event: None,
            cookieless: Some((team.id, &*self.salts)),
        };
        let (row, _) = normalize_tree(&ctx, arrival.event);
        Ok(IngestBatch {
            team_id: team.id,
            received_at: arrival.now,
            sent_at: arrival.sent_at,
            ip: arrival.ip.filter(|_| !team.anonymize_ips),
            events: vec![row],
        })
    }
}

/// The wait between tries of a source that failed (Redis or Kafka away, the queue closing):
/// doubling from 100 ms to 5 s.
pub struct Retry {
    wait: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            wait: Duration::from_millis(100),
        }
    }
}

impl Retry {
    /// Reports the failure of `source` and waits before its next try; the start of shutdown
    /// cuts the wait short.
    pub async fn after(
        &mut self,
        source: &str,
        error: impl std::fmt::Display,
        shutdown: &mut Shutdown,
    ) {
        tracing::error!(error = %error, retry_in_ms = self.wait.as_millis() as u64, "{source} failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(self.wait) => {}
            _ = shutdown.changed() => {}
        }
        self.wait = (self.wait * 2).min(FULL_QUEUE_WAIT_MAX);
    }
}

/// A time in a queued message: RFC 3339, Python's `isoformat()` without a zone (UTC), or
/// kombu's tagged datetime (`{"__type__": "datetime", "__value__": …}`); empty or null is none.
pub fn message_time(value: Option<&Value>) -> Result<Option<DateTime<Utc>>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|t| Some(t.to_utc()))
            .or_else(|_| {
                chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                    .map(|t| Some(t.and_utc()))
            })
            .map_err(|_| format!("{text:?} is not a time")),
        Some(Value::Object(tagged))
            if tagged.get("__type__").and_then(Value::as_str) == Some("datetime") =>
        {
            message_time(tagged.get("__value__"))
        }
        Some(other) => Err(format!("{other} is not a time")),
    }
}

/// What `judge` makes of each message, worked out on the blocking pool (it reads the state
/// file and normalises); fails, with the reason, when the state file cannot be read.
pub async fn judge_all<T: Send + 'static>(
    messages: std::sync::Arc<Vec<Vec<u8>>>,
    store: Store,
    normalizer: Normalizer,
    judge: fn(&[u8], &Store, &Normalizer) -> Result<T, crate::store::StoreError>,
) -> Result<Vec<T>, String> {
    tokio::task::spawn_blocking(move || {
        messages
            .iter()
            .map(|message| judge(message, &store, &normalizer))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The room capture keeps (`INGEST_MAX_QUEUE_BYTES`, `DATA_MIN_FREE_BYTES`); a source waits
/// for it as capture answers 503.
#[derive(Clone, Copy, Debug)]
pub struct RoomLimits {
    pub max_queue_bytes: u64,
    pub min_free_bytes: u64,
}

impl RoomLimits {
    /// Whether the queue is over its budget or the disk under its floor now.
    pub fn exceeded(&self, store: &Store) -> bool {
        let room = store.room();
        room.queued_bytes >= self.max_queue_bytes || room.free_disk_bytes < self.min_free_bytes
    }
}

/// Waits while the queue is over its budget or the disk under its floor (the messages wait in
/// their source); returns whether it waited. Stops waiting when shutdown begins.
pub async fn wait_for_room(store: &Store, limits: RoomLimits, shutdown: &mut Shutdown) -> bool {
    if !limits.exceeded(store) {
        return false;
    }
    tracing::warn!("the ingest queue is over its budget or the disk is low; the source waits");
    while limits.exceeded(store) && !shutdown.is_draining() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => {}
        }
    }
    true
}

/// The longest wait between two tries of a full ingest queue.
const FULL_QUEUE_WAIT_MAX: Duration = Duration::from_secs(5);

/// Submits every encoded batch, in the order given, and returns once each is durable. The
/// order is the source's (a Kafka partition's, a Redis list's): one distinct id's events reach
/// the person step in the order PostHog would apply them. A full queue is waited out (the
/// messages stay in their source, not in memory); fails when the writer has closed, or when
/// shutdown's deadline passes while the queue is still full.
pub async fn submit_durably(
    ingest: &IngestHandle,
    pending: Vec<Vec<u8>>,
    shutdown: &mut Shutdown,
) -> Result<(), IngestError> {
    let mut wait = Duration::from_millis(50);
    let mut queued = Vec::with_capacity(pending.len());
    let mut rest = pending.into_iter();
    let mut next = rest.next();
    while let Some(encoded) = next.take() {
        match ingest.enqueue(encoded) {
            Ok(enqueued) => {
                queued.push(enqueued);
                next = rest.next();
                wait = Duration::from_millis(50);
            }
            // The same batch is tried again: none after it may go first.
            Err(NotQueued {
                error: IngestError::Busy,
                encoded,
            }) => {
                next = Some(encoded);
                if shutdown.is_draining() {
                    tokio::time::sleep(wait).await;
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                if shutdown.deadline_passed() {
                    return Err(IngestError::Closed);
                }
                wait = (wait * 2).min(FULL_QUEUE_WAIT_MAX);
            }
            Err(refused) => return Err(refused.error),
        }
    }
    for enqueued in queued {
        enqueued.durable().await?;
    }
    Ok(())
}
