//! Where the queue sources read: PostHog's Celery queue in Redis and its Kafka topic.

use super::ConfigError;

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

/// The Kafka source's settings; `KAFKA_HOSTS` is required.
pub(super) fn kafka_settings(
    get: &dyn Fn(&str) -> String,
    hosts: Option<String>,
) -> Result<KafkaSettings, ConfigError> {
    use base64::Engine;
    let hosts = hosts.ok_or_else(|| ConfigError {
        name: "KAFKA_HOSTS",
        value: String::new(),
        allowed: "the Kafka brokers (host:port, comma-separated) when KAFKA_ENABLED is true".into(),
    })?;
    // Checked as base64 by the settings table already.
    let pem = |name: &str| {
        let text = get(name);
        (!text.is_empty())
            .then(|| {
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .ok()
            })
            .flatten()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    };
    let extra = get("KAFKA_CONSUMER_CONFIG");
    let mut pairs = Vec::new();
    for pair in extra.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| ConfigError {
            name: "KAFKA_CONSUMER_CONFIG",
            value: extra.clone(),
            allowed: "librdkafka properties as name=value, comma-separated".into(),
        })?;
        pairs.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(KafkaSettings {
        hosts,
        topic: get("KAFKA_CONSUMPTION_TOPIC"),
        group: get("KAFKA_CONSUMER_GROUP"),
        dead_letter_topic: get("KAFKA_DEAD_LETTER_TOPIC"),
        client_cert: pem("KAFKA_CLIENT_CERT_B64"),
        client_key: pem("KAFKA_CLIENT_CERT_KEY_B64"),
        trusted_cert: pem("KAFKA_TRUSTED_CERT_B64"),
        extra: pairs,
    })
}
