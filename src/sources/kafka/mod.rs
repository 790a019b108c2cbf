//! The Kafka source: the messages PostHog's capture writes to `KAFKA_CONSUMPTION_TOPIC`, read
//! by an `rdkafka` consumer in the consumer group `KAFKA_CONSUMER_GROUP`.
//!
//! A round takes what has arrived (up to [`MAX_MESSAGES`] / [`MAX_BYTES`]), turns each message
//! into a batch, makes the batches durable through the ingest writer, sends unreadable messages
//! to the dead-letter topic with their partition, offset and reason, and only then commits the
//! round's offsets. A restart (or a rebalance) re-reads at most the round that was not
//! committed; the events' uuids make that idempotent. While the ingest queue is over its budget
//! the consumer's partitions are paused, so nothing piles up in memory.
//!
//! Owns: the consumer and the dead-letter producer. Must never: commit an offset past a message
//! that is not durable or dead-lettered, or hold more than a round and librdkafka's bounded
//! prefetch in memory.

mod message;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::ingest::{IngestError, IngestHandle};
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
pub use message::{parse, KafkaEvent};

/// Messages taken in one round.
const MAX_MESSAGES: usize = 1_000;
/// Bytes of messages taken in one round.
const MAX_BYTES: usize = 16 << 20;
/// How long a round waits for more messages after the first.
const GATHER: Duration = Duration::from_millis(20);
/// librdkafka's prefetch per partition set, in KiB (its default is 64 MiB).
const PREFETCH_KIB: &str = "16384";

/// The client settings both the consumer and the dead-letter producer start from.
fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.hosts);
    if settings.client_cert.is_some() || settings.trusted_cert.is_some() {
        config.set("security.protocol", "ssl");
        for (key, pem) in [
            ("ssl.certificate.pem", &settings.client_cert),
            ("ssl.key.pem", &settings.client_key),
            ("ssl.ca.pem", &settings.trusted_cert),
        ] {
            if let Some(pem) = pem {
                config.set(key, pem);
            }
        }
    }
    config
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the ingest queue: {0}")]
    Ingest(#[from] IngestError),
    #[error("the state file: {0}")]
    Store(String),
    #[error("the dead-letter topic: {0}")]
    DeadLetter(String),
}

pub struct KafkaSource {
    pub settings: KafkaSettings,
    pub store: Store,
    pub ingest: IngestHandle,
    pub normalizer: super::Normalizer,
    pub room: super::RoomLimits,
}

/// What became of one message.
enum Outcome {
    Batch(Vec<u8>),
    Dead(String),
}

impl KafkaSource {
    /// Consumes until shutdown begins; a failing round is retried with backoff (its offsets
    /// were not committed, so it is read again).
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut retry = super::Retry::default();
        while !shutdown.is_draining() {
            let result = self.consume(&mut shutdown).await;
            if shutdown.is_draining() {
                return;
            }
            if let Err(e) = result {
                retry.after("the Kafka source", e, &mut shutdown).await;
            }
        }
    }

    async fn consume(&self, shutdown: &mut Shutdown) -> Result<(), SourceError> {
        let mut config = client_config(&self.settings);
        config
            .set("group.id", &self.settings.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("queued.max.messages.kbytes", PREFETCH_KIB);
        for (key, value) in &self.settings.extra {
            config.set(key, value);
        }
        let consumer: Arc<BaseConsumer> = Arc::new(config.create()?);
        let producer: FutureProducer = client_config(&self.settings)
            .set("message.timeout.ms", "30000")
            .create()?;
        consumer.subscribe(&[&self.settings.topic])?;
        // librdkafka is polled by a thread of its own that hands messages over a bounded
        // channel: the async stream consumer stalled here with messages fetched but never
        // yielded (about 37,000 into a 100,000-message topic), a blocking poll does not.
        let (tx, mut messages) = tokio::sync::mpsc::channel(MAX_MESSAGES);
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (consumer, stop) = (consumer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("kafka-poll".into())
                .spawn(move || poll(&consumer, &stop, &tx))
                .map_err(|e| SourceError::Store(format!("cannot start the Kafka thread: {e}")))?
        };
        let result = async {
            while !shutdown.is_draining() {
                let first = tokio::select! {
                    message = messages.recv() => match message {
                        Some(message) => message?,
                        None => break,
                    },
                    _ = shutdown.changed() => break,
                };
                let round = gather(&mut messages, first).await?;
                tracing::debug!(messages = round.len(), "a Kafka round is taken");
                self.handle(&consumer, &producer, round, shutdown).await?;
            }
            Ok(())
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        drop(messages);
        let _ = tokio::task::spawn_blocking(move || poller.join()).await;
        consumer.unsubscribe();
        result
    }

    async fn handle(
        &self,
        consumer: &BaseConsumer,
        producer: &FutureProducer,
        round: Vec<OwnedMessage>,
        shutdown: &mut Shutdown,
    ) -> Result<(), SourceError> {
        let payloads: Vec<Vec<u8>> = round
            .iter()
            .map(|m| m.payload().unwrap_or_default().to_vec())
            .collect();
        let outcomes = super::judge_all(
            Arc::new(payloads),
            self.store.clone(),
            self.normalizer.clone(),
            outcome,
        )
        .await
        .map_err(SourceError::Store)?;
        let mut batches = Vec::new();
        for (message, outcome) in round.iter().zip(outcomes) {
            match outcome {
                Outcome::Batch(encoded) => batches.push(encoded),
                Outcome::Dead(reason) => self.dead_letter(producer, message, &reason).await?,
            }
        }
        // While the ingest queue is over its budget, nothing more is fetched.
        if self.room.exceeded(&self.store) {
            let assignment = consumer.assignment()?;
            consumer.pause(&assignment)?;
            super::wait_for_room(&self.store, self.room, shutdown).await;
            consumer.resume(&assignment)?;
        }
        super::submit_durably(&self.ingest, batches, shutdown).await?;
        crate::failpoint::hit("kafka.before_commit");
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for message in &round {
            let key = (message.topic().to_owned(), message.partition());
            let after = message.offset() + 1;
            let entry = next.entry(key).or_insert(after);
            *entry = (*entry).max(after);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            offsets.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        }
        consumer.commit(&offsets, CommitMode::Async)?;
        tracing::debug!(
            messages = round.len(),
            "a Kafka round is durable and committed"
        );
        Ok(())
    }

    /// Sends `message` to the dead-letter topic with its partition, offset and `reason`, and
    /// waits until the broker has it.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        message: &OwnedMessage,
        reason: &str,
    ) -> Result<(), SourceError> {
        tracing::warn!(
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "a Kafka message cannot be read; it goes to the dead-letter topic"
        );
        let (partition, offset) = (
            message.partition().to_string(),
            message.offset().to_string(),
        );
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "offset",
                value: Some(&offset),
            })
            .insert(Header {
                key: "reason",
                value: Some(reason),
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.settings.dead_letter_topic)
            .payload(message.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| SourceError::DeadLetter(e.to_string()))
    }
}

/// Polls `consumer` until `stop`, handing each message (or error) to `to`; waits while `to`
/// is full, so at most a round waits beside librdkafka's own bounded prefetch.
fn poll(
    consumer: &BaseConsumer,
    stop: &AtomicBool,
    to: &tokio::sync::mpsc::Sender<KafkaResult<OwnedMessage>>,
) {
    while !stop.load(Ordering::Relaxed) {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            if to.blocking_send(message.map(|m| m.detach())).is_err() {
                return;
            }
        }
    }
}

/// The first message and what else arrives within [`GATHER`], up to a round's limits.
async fn gather(
    messages: &mut tokio::sync::mpsc::Receiver<KafkaResult<OwnedMessage>>,
    first: OwnedMessage,
) -> Result<Vec<OwnedMessage>, SourceError> {
    let mut bytes = first.payload().map_or(0, <[u8]>::len);
    let mut round = vec![first];
    let deadline = tokio::time::Instant::now() + GATHER;
    while round.len() < MAX_MESSAGES && bytes < MAX_BYTES {
        match tokio::time::timeout_at(deadline, messages.recv()).await {
            Ok(Some(message)) => {
                let message = message?;
                bytes += message.payload().map_or(0, <[u8]>::len);
                round.push(message);
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(round)
}

/// One message as an encoded batch, or the reason it cannot be one; fails only when the state
/// file cannot be read.
fn outcome(
    payload: &[u8],
    store: &Store,
    normalizer: &super::Normalizer,
) -> Result<Outcome, StoreError> {
    let event = match parse(payload) {
        Ok(event) => event,
        Err(reason) => return Ok(Outcome::Dead(reason)),
    };
    let team = match (&event.token, event.team_id) {
        (Some(token), _) => store.team_by_token(token)?,
        (None, Some(id)) => match store.team(id) {
            Ok(team) => Some(team),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        },
        (None, None) => None,
    };
    let Some(team) = team else {
        return Ok(Outcome::Dead("no team has this token or id".into()));
    };
    let arrival = super::Arrival {
        ip: event.ip,
        now: event.now,
        sent_at: event.sent_at,
        event: event.event,
    };
    Ok(match normalizer.batch(&team, arrival) {
        Ok(batch) => Outcome::Batch(batch.encode()),
        Err(reason) => Outcome::Dead(reason),
    })
}
