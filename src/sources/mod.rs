//! Sources besides HTTP capture: queues a PostHog installation (or anything speaking its
//! formats) feeds. Each turns messages into `IngestBatch`es through the same ingest writer as
//! capture and acknowledges a message only once its batch is durable.
//!
//! Owns: reading the queues, their message formats, acknowledgement after durability, and the
//! dead letters of messages that cannot be read.
//! Must never: acknowledge a message before its events are durable, hold more than a bounded
//! number of messages in memory, or stop on a message it cannot read.

pub mod celery;
