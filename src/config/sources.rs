//! Where the queue sources read: PostHog's Celery queue in Redis and its Kafka topic.

/// The Celery source's Redis list (`REDIS_URL`, `PLUGINS_CELERY_QUEUE`).
#[derive(Clone, Debug)]
pub struct CelerySettings {
    pub redis_url: String,
    pub queue: String,
}

impl CelerySettings {
    /// The list a taken message waits on until its batch is durable.
    pub fn processing_list(&self) -> String {
        format!("{}.appliance.processing", self.queue)
    }

    /// The list of messages that could not be read, with the reason.
    pub fn dead_list(&self) -> String {
        format!("{}.appliance.dead", self.queue)
    }
}

/// The Kafka source's brokers, topic and group (`KAFKA_*`).
#[derive(Clone, Debug, Default)]
pub struct KafkaSettings {
    pub hosts: String,
    pub topic: String,
    pub group: String,
    pub dead_letter_topic: String,
    /// PEM texts (the seed's `KAFKA_*_B64` settings, decoded): with them the connection is TLS.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub trusted_cert: Option<String>,
    /// Extra librdkafka properties (`KAFKA_CONSUMER_CONFIG`: `name=value,…`), for tuning.
    pub extra: Vec<(String, String)>,
}

/// Teams from PostHog's database (`TEAMS_FROM_POSTGRES` with `DATABASE_URL`), reloaded on
/// PostHog's Redis channel when `REDIS_URL` is set.
#[derive(Clone, Debug)]
pub struct TeamsFromPostgres {
    pub url: String,
    pub reload_redis_url: Option<String>,
    pub reload_channel: String,
}
