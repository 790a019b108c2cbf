//! The settings table: every setting's name, default, kind of value and meaning, in the order
//! `--help` lists them (the seed's table first, then the appliance's own), and the check each
//! value must pass.

use std::net::IpAddr;

use super::ConfigError;

/// How the value of a setting is checked.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Text,
    Bool,
    /// An unsigned integer within an inclusive range.
    Int {
        min: u64,
        max: u64,
    },
    Url {
        schemes: &'static [&'static str],
    },
    Base64,
    LogLevel,
    Host,
    /// An IANA time zone name.
    TimeZone,
    /// Comma-separated networks in CIDR notation.
    Networks,
    /// One of a few words.
    Choice {
        choices: &'static [&'static str],
    },
}

/// One row of the settings table.
pub struct Setting {
    pub name: &'static str,
    /// The default as written in `--help`; `None` means unset.
    pub default: Option<&'static str>,
    pub help: &'static str,
    pub(super) kind: Kind,
}

const fn setting(
    name: &'static str,
    default: Option<&'static str>,
    kind: Kind,
    help: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        help,
        kind,
    }
}

const PG: Kind = Kind::Url {
    schemes: &["postgres", "postgresql"],
};
const REDIS: Kind = Kind::Url {
    schemes: &["redis", "rediss", "redis+unix", "unix"],
};
const fn int(min: u64, max: u64) -> Kind {
    Kind::Int { min, max }
}
const PORT: Kind = int(0, 65535);
const COUNT: Kind = int(0, u32::MAX as u64);
const POSITIVE: Kind = int(1, u32::MAX as u64);

/// Every setting, in the order `--help` lists them: the seed's table first, then the
/// appliance's own.
pub const SETTINGS: &[Setting] = &[
    // The seed's table (PostHog plugin server README).
    setting("DATABASE_URL", Some("postgres://localhost:5432/posthog"), PG, "Postgres database URL: set, events also go to PostHog's tables in this database (the Postgres sink; see SINKS); libpq's sslmode picks TLS"),
    setting("REDIS_URL", Some("redis://localhost"), REDIS, "Redis URL: set, PostHog's Celery tasks are consumed from PLUGINS_CELERY_QUEUE there (the Celery source; see CELERY_SOURCE)"),
    setting("TEAMS_FROM_POSTGRES", Some("false"), Kind::Bool, "beside a PostHog app: the teams, their tokens and anonymize_ips come from posthog_team in DATABASE_URL (PostHog's database; events then go there only if SINKS names postgres), refreshed on PLUGINS_RELOAD_PUBSUB_CHANNEL when REDIS_URL is set and every minute"),
    setting("CELERY_SOURCE", None, Kind::Bool, "consume PostHog's process_event_with_plugins Celery tasks when REDIS_URL is set; unset: yes unless KAFKA_ENABLED (as the seed's plugin server)"),
    setting("BASE_DIR", Some("."), Kind::Text, "base path for resolving local plugins"),
    setting("WORKER_CONCURRENCY", Some("0"), COUNT, "number of concurrent workers; 0 means all cores"),
    setting("TASKS_PER_WORKER", Some("10"), POSITIVE, "number of parallel tasks per worker"),
    setting("REDIS_POOL_MIN_SIZE", Some("1"), POSITIVE, "minimum number of Redis connections"),
    setting("REDIS_POOL_MAX_SIZE", Some("3"), POSITIVE, "maximum number of Redis connections"),
    setting("SCHEDULE_TIMEZONE", Some("UTC"), Kind::TimeZone, "time zone whose midnight starts run-every-day slots (minute and hour slots follow UTC)"),
    setting("SCHEDULE_LOCK_TTL", Some("60"), POSITIVE, "how many seconds to hold the lock for the schedule (SCHEDULE_LEASE=redis: a box that stops renewing it loses it after this long, and another box runs the schedules)"),
    setting("CELERY_DEFAULT_QUEUE", Some("celery"), Kind::Text, "Celery outgoing queue"),
    setting("PLUGINS_CELERY_QUEUE", Some("posthog-plugins"), Kind::Text, "Celery incoming queue"),
    setting("PLUGINS_RELOAD_PUBSUB_CHANNEL", Some("reload-plugins"), Kind::Text, "Redis channel for reload events"),
    setting("CLICKHOUSE_HOST", Some("localhost"), Kind::Host, "ClickHouse host: set, events, persons and groups also go to PostHog's ClickHouse tables there over HTTP (the ClickHouse sink, always a follower; see SINKS)"),
    setting("CLICKHOUSE_DATABASE", Some("default"), Kind::Text, "ClickHouse database"),
    setting("CLICKHOUSE_USER", Some("default"), Kind::Text, "ClickHouse username"),
    setting("CLICKHOUSE_PASSWORD", None, Kind::Text, "ClickHouse password"),
    setting("CLICKHOUSE_CA", None, Kind::Text, "ClickHouse CA certs (not supported: a secure connection checks the server against the system's trusted roots)"),
    setting("CLICKHOUSE_SECURE", Some("false"), Kind::Bool, "whether to secure ClickHouse connection (HTTPS)"),
    setting("CLICKHOUSE_PORT", None, PORT, "ClickHouse HTTP port; unset: 8123, or 8443 when CLICKHOUSE_SECURE"),
    setting("CLICKHOUSE_FLUSH_INTERVAL_MS", Some("1000"), int(0, 60_000), "the ClickHouse sink writes at most once per this many milliseconds unless a full batch is waiting (ClickHouse prefers few large inserts)"),
    setting("KAFKA_ENABLED", Some("false"), Kind::Bool, "consume the events PostHog's capture writes to KAFKA_CONSUMPTION_TOPIC (the Kafka source; needs KAFKA_HOSTS)"),
    setting("KAFKA_HOSTS", None, Kind::Text, "comma-delimited Kafka hosts"),
    setting("KAFKA_CONSUMPTION_TOPIC", Some("events_plugin_ingestion"), Kind::Text, "Kafka incoming events topic"),
    setting("KAFKA_CLIENT_CERT_B64", None, Kind::Base64, "Kafka certificate in Base64"),
    setting("KAFKA_CLIENT_CERT_KEY_B64", None, Kind::Base64, "Kafka certificate key in Base64"),
    setting("KAFKA_TRUSTED_CERT_B64", None, Kind::Base64, "Kafka trusted CA in Base64"),
    setting("KAFKA_CONSUMER_GROUP", Some("appliance-ingestion"), Kind::Text, "the Kafka consumer group: appliances in one group split the topic's partitions"),
    setting("KAFKA_DEAD_LETTER_TOPIC", Some("events_dead_letter_queue"), Kind::Text, "where Kafka messages that cannot be read go, with their partition, offset and reason as headers"),
    setting("KAFKA_CONSUMER_CONFIG", None, Kind::Text, "extra librdkafka consumer properties, name=value, comma-separated (for tuning, e.g. session.timeout.ms=10000)"),
    setting("KAFKA_PRODUCER_MAX_QUEUE_SIZE", Some("20"), POSITIVE, "Kafka producer batch max size before flushing"),
    setting("KAFKA_FLUSH_FREQUENCY_MS", Some("500"), POSITIVE, "Kafka producer batch max duration before flushing"),
    setting("KAFKA_MAX_MESSAGE_BATCH_SIZE", Some("900000"), POSITIVE, "Kafka producer batch max size in bytes before flushing"),
    setting("DISABLE_WEB", Some("false"), Kind::Bool, "disable the web server (capture, health, admin). The seed defaulted to true; here the web server is the front door, so it is on unless disabled"),
    setting("WEB_PORT", Some("3008"), PORT, "port for the web server; 0 picks a free port"),
    setting("WEB_HOSTNAME", Some("0.0.0.0"), Kind::Host, "address for the web server to listen on"),
    setting("ADMIN_HOSTNAME", Some("127.0.0.1"), Kind::Host, "address of the admin listener: the management API (/api/), health and readiness; loopback keeps it off the network (reach it through an SSH tunnel or a proxy you run)"),
    setting("ADMIN_PORT", Some("3009"), PORT, "port of the admin listener; 0 picks a free port"),
    setting("LOG_LEVEL", Some("info"), Kind::LogLevel, "minimum log level: none, error, warn, info, log (= info), debug, trace"),
    setting("LOG_FORMAT", Some("auto"), Kind::Choice { choices: &["auto", "text", "json"] }, "log lines as text or as JSON objects; auto: JSON when stderr is the systemd journal, else text"),
    setting("SENTRY_DSN", None, Kind::Text, "Sentry ingestion URL (not built yet)"),
    setting("STATSD_HOST", None, Kind::Host, "StatsD host: the metrics of /metrics are also sent there; unset, StatsD is not used"),
    setting("STATSD_PORT", Some("8125"), PORT, "StatsD port"),
    setting("STATSD_PREFIX", Some("plugin-server."), Kind::Text, "StatsD prefix"),
    setting("DISABLE_MMDB", Some("false"), Kind::Bool, "whether to disable MMDB IP location capabilities"),
    setting("GEOIP_MMDB_PATH", None, Kind::Text, "MaxMind DB file (GeoLite2/GeoIP2 City layout) for locating IPs; unset means GeoLite2-City.mmdb in DATA_DIR if it is there"),
    setting("INTERNAL_MMDB_SERVER_PORT", Some("0"), PORT, "kept for compatibility: the MMDB is read in-process, no internal server is started"),
    setting("DISTINCT_ID_LRU_SIZE", Some("10000"), POSITIVE, "size of persons distinct ID LRU cache"),
    setting("PLUGIN_SERVER_IDLE", Some("false"), Kind::Bool, "start idle, processing nothing (same as --idle)"),
    setting("CAPTURE_INTERNAL_METRICS", Some("false"), Kind::Bool, "whether to capture internal metrics as events (not built yet)"),
    setting("PISCINA_USE_ATOMICS", Some("true"), Kind::Bool, "kept for compatibility; has no effect (no Piscina here)"),
    setting("PISCINA_ATOMICS_TIMEOUT", Some("5000"), POSITIVE, "kept for compatibility; has no effect (no Piscina here)"),
    // The appliance's own.
    setting("APPLIANCE_ENV_FILE", None, Kind::Text, "file of NAME=value lines read at start; the environment wins over it; it is part of backups. Unset: /etc/appliance/appliance.env (the .deb's) if it exists; empty: no file"),
    setting("NODE_ID", None, Kind::Text, "this box's name when several boxes share a Kafka consumer group and a sink: a shared Postgres keeps each box's position under its name, and the schedule lease is held under it (letters, digits, '.', '_', '-'; at most 64). Unset: one box"),
    setting("SCHEDULE_LEASE", Some("none"), Kind::Choice { choices: &["none", "redis"] }, "redis: the boxes of a group take turns running the schedules, one at a time, under a lease of SCHEDULE_LOCK_TTL seconds in REDIS_URL (the seed's Redlock), and each slot is recorded there so that no slot runs twice (needs NODE_ID); none: this box runs its schedules itself"),
    setting("SHARED_PERSONS", Some("false"), Kind::Bool, "true: the boxes of a group share their persons through the leading Postgres sink: before each batch of events, the persons they name are read from posthog_person and posthog_persondistinctid, and those another box has moved on (merged, changed, or never seen here) are taken, so a merge made on one box holds on the others; needs postgres first in SINKS. false: each box keeps its own persons"),
    setting("DATA_DIR", Some("./data"), Kind::Text, "directory holding the appliance's state (redb) and the embedded SQLite event store"),
    setting("SINKS", None, Kind::Text, "the sinks events are written to, comma-separated: sqlite, postgres, clickhouse. The first leads: the pipeline writes to it, after-write deliveries and exports follow it; the others copy its writes, each at its own pace. ClickHouse can only follow (it cannot say which rows a write inserted). Unset: sqlite, then postgres when DATABASE_URL is set, then clickhouse when CLICKHOUSE_HOST is set"),
    setting("SQLITE_PATH", None, Kind::Text, "path of the SQLite event store; default DATA_DIR/events.sqlite3"),
    setting("TRUST_PROXY", Some("false"), Kind::Bool, "take the client IP from X-Forwarded-For (set only behind a proxy you run)"),
    setting("CAPTURE_MAX_BODY_BYTES", Some("20971520"), int(1024, 1 << 30), "largest capture request body accepted, in bytes (413 above)"),
    setting("CAPTURE_MAX_DECOMPRESSED_BYTES", Some("67108864"), int(1024, 1 << 32), "largest capture payload after decompression, in bytes (413 above)"),
    setting("CAPTURE_MAX_EVENT_BYTES", Some("1048576"), int(256, 1 << 30), "largest single event, in bytes of JSON; larger events are rejected"),
    setting("CAPTURE_MAX_EVENTS_PER_REQUEST", Some("10000"), int(1, 1_000_000), "most events one capture request may hold (413 above); PostHog's SDKs send batches of at most a few hundred"),
    setting("CAPTURE_MAX_INFLIGHT_BYTES", Some("268435456"), int(1 << 20, 1 << 40), "memory capture may use at once for request bodies and their decoded events; a request that cannot get its share within a second is answered 503"),
    setting("CAPTURE_BODY_TIMEOUT_SECS", Some("30"), int(1, 3600), "a request body must arrive within this many seconds (408 after)"),
    setting("CAPTURE_RATE_LIMIT_PER_IP", Some("0"), COUNT, "capture requests per second one client address may make (429 above, with Retry-After); 0 for no limit"),
    setting("CAPTURE_RATE_LIMIT_PER_TOKEN", Some("0"), COUNT, "events per second one project token may send (429 above, with Retry-After); 0 for no limit"),
    setting("HTTP_HEADER_TIMEOUT_SECS", Some("10"), int(1, 3600), "a request's headers must arrive within this many seconds, and an idle keep-alive connection is closed after it"),
    setting("HTTP_MAX_CONNECTIONS", Some("1024"), int(1, 1_000_000), "connections the capture listener keeps open at once; more are closed on accept"),
    setting("HTTP_MAX_CONNECTIONS_PER_IP", Some("128"), COUNT, "connections one client address may keep open at once on the capture listener; 0 for no per-address limit (it does not apply with TRUST_PROXY)"),
    setting("INGEST_MAX_QUEUE_BYTES", Some("1073741824"), int(1 << 20, 1 << 50), "most bytes of events waiting in the ingest queue for the sink; past it capture answers 503 with Retry-After"),
    setting("DATA_DIR_MIN_FREE_MB", Some("256"), int(0, 1 << 30), "free space kept on the data directory's disk; below it capture answers 503 with Retry-After"),
    setting("INGEST_CHANNEL_CAPACITY", Some("4096"), int(1, 1 << 20), "capture requests that may wait for the group commit before capture answers 503"),
    setting("INGEST_COMMIT_MAX_REQUESTS", Some("2048"), int(1, 1 << 20), "most capture requests folded into one redb commit"),
    setting("SINK_BATCH_EVENTS", Some("20000"), int(1, 1 << 20), "most events the pipeline writes to the sink in one transaction"),
    setting("SINK_BATCH_BYTES", Some("33554432"), int(65536, 1 << 30), "most bytes of queued events the pipeline reads into one sink transaction (bounds its memory whatever the events' size)"),
    setting("SINK_LINGER_MS", Some("200"), int(0, 60_000), "how long the pipeline lets a part-filled batch fill before writing it (fewer, larger sink transactions)"),
    setting("PLUGIN_MEMORY_MB", Some("64"), int(1, 4096), "memory limit of each plugin instance, in MiB"),
    setting("PLUGIN_PROCESS_EVENT_TIMEOUT_MS", Some("500"), int(1, 600_000), "deadline of one process-event call (a batch of events) of one plugin"),
    setting("JOBS_PER_PLUGIN_CONFIG", Some("4"), POSITIVE, "jobs of one plugin config that may run at once, so one plugin cannot take every slot"),
    setting("JOB_RETRY_BASE_MS", Some("1000"), int(1, 3_600_000), "delay before a failed job's first retry; doubled for each further one (with jitter), at most an hour"),
    setting("JOB_IDLE_POLL_MS", Some("5000"), int(10, 3_600_000), "how often idle job workers look at the queue without a wake-up (the CLI wakes them through a socket in the data directory; this bounds a lost wake-up)"),
    setting("JOB_KEY_RETENTION_HOURS", Some("24"), int(1, 8_760), "how long a job's idempotency key keeps deduplicating"),
    setting("PLUGIN_TASK_TIMEOUT_SECS", Some("30"), int(1, 86_400), "deadline of plugin setup, scheduled tasks, jobs and exports"),
    setting("APPLIANCE_FAILPOINTS", None, Kind::Text, "for crash tests only: comma-separated failure points at which the process aborts (pipeline.after_sink_write, postgres.before_position, clickhouse.before_position, celery.before_ack, kafka.before_commit), or, given as NAME=pause:MS, pauses each time (pipeline.before_sink_write)"),
    setting("PLUGIN_ALLOWED_HOSTS", None, Kind::Text, "comma-separated hosts plugins may fetch from; unset: any host a plugin declares in its plugin.json"),
    setting("PLUGIN_ALLOWED_NETWORKS", None, Kind::Networks, "comma-separated networks (CIDR) plugins may reach although they are loopback, link-local or private, such as 10.0.0.0/8; unset: only public addresses"),
    setting("PLUGIN_SETUP_TIMEOUT_MS", Some("5000"), int(1, 600_000), "deadline of a plugin's setup; it runs off the pipeline's path, the team's events waiting for it"),
    setting("PLUGIN_TIME_BUDGET_MS_PER_MINUTE", Some("15000"), int(1, 60_000), "time one plugin config may spend in process-event calls per minute; past it the team's events wait (deferred) while other teams' flow"),
    setting("PLUGIN_DEFERRED_MAX_BYTES", Some("67108864"), int(1 << 20, 1 << 40), "bytes of one team's events that may wait for its plugins; past it capture answers that team 503"),
    setting("PLUGIN_STORAGE_MAX_BYTES", Some("10485760"), int(1024, 1 << 40), "storage one plugin config may keep, keys and values, in bytes"),
    setting("PLUGIN_STORAGE_MAX_KEYS", Some("100000"), int(1, 1 << 32), "keys one plugin config may keep in storage"),
    setting("PLUGIN_STORAGE_MAX_VALUE_BYTES", Some("1048576"), int(16, 1 << 30), "largest storage value, in bytes"),
    setting("PLUGIN_CACHE_MAX_BYTES", Some("16777216"), int(1024, 1 << 40), "memory one plugin config's cache may use; the least recently used entries are evicted past it"),
    setting("PLUGIN_LOG_LINE_MAX_BYTES", Some("4096"), int(64, 1 << 20), "longest plugin log line kept; longer ones are cut"),
    setting("PLUGIN_LOG_LINES_PER_CALL", Some("1000"), int(1, 1 << 20), "log lines one plugin call may write; the rest are counted in one line"),
    setting("PLUGIN_LOG_MAX_LINES", Some("10000"), int(1, 1 << 32), "log lines kept per plugin config; older ones are dropped"),
    setting("PLUGIN_LOG_RETENTION_DAYS", Some("7"), int(1, 3650), "days plugin log lines are kept"),
    setting("PLUGIN_MAX_QUEUED_JOBS", Some("10000"), int(1, 1 << 32), "jobs one plugin config may have queued (scheduled, retrying or waiting) at once"),
    setting("PLUGIN_MAX_JOBS_PER_CALL", Some("1000"), int(1, 1 << 20), "jobs one plugin call may queue"),
    setting("PLUGIN_FETCH_MAX_BYTES", Some("4194304"), int(1024, 1 << 30), "largest http.fetch response body, read as it streams"),
    setting("JOB_DEAD_LETTER_RETENTION_DAYS", Some("7"), int(1, 3650), "days dead and cancelled jobs (delivery jobs hold copies of events) are kept before they are purged"),
    setting("SHUTDOWN_TIMEOUT_SECS", Some("30"), int(0, 3600), "on SIGTERM, how long to keep flushing the queue to the sink before exiting"),
    setting("BACKUP_DIR", None, Kind::Text, "directory for a daily backup (appliance-<time>.tar.zst, as `appliance backup` writes); unset, no scheduled backup"),
    setting("BACKUP_KEEP", Some("7"), int(1, 1000), "scheduled backups kept in BACKUP_DIR; older ones are deleted"),
    setting("BACKUP_HOUR", Some("3"), int(0, 23), "hour of the day (SCHEDULE_TIMEZONE) from which the daily backup runs; a day missed while stopped is made up at the next start"),
];

/// The settings table as text, for `--help`: each setting on a line with its default, and what it
/// does on the next.
pub fn settings_help() -> String {
    let mut out = String::from("Settings (environment variables) and their defaults:\n");
    for s in SETTINGS {
        let default = s
            .default
            .map(|d| format!("'{d}'"))
            .unwrap_or_else(|| "unset".into());
        out.push_str(&format!(
            "  {} [default: {}]\n      {}\n",
            s.name, default, s.help
        ));
    }
    out
}

pub(super) fn check(s: &Setting, value: &str) -> Result<(), ConfigError> {
    let fail = |allowed: String| ConfigError {
        name: s.name,
        value: value.to_owned(),
        allowed,
    };
    match s.kind {
        Kind::Text => Ok(()),
        Kind::Bool => parse_bool(value)
            .map(|_| ())
            .ok_or_else(|| fail("expected true or false (also 1/0, yes/no, on/off)".into())),
        Kind::Int { min, max } => match value.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(()),
            _ => Err(fail(format!("expected a whole number from {min} to {max}"))),
        },
        Kind::Url { schemes } => {
            let scheme = value.split_once("://").map(|(scheme, _)| scheme);
            match scheme {
                Some(scheme) if schemes.contains(&scheme) => Ok(()),
                _ => Err(fail(format!(
                    "expected a URL starting with {}",
                    schemes.join("://, ") + "://"
                ))),
            }
        }
        Kind::Base64 => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(value.trim())
                .map(|_| ())
                .map_err(|e| fail(format!("expected standard Base64 ({e})")))
        }
        Kind::TimeZone => value
            .trim()
            .parse::<chrono_tz::Tz>()
            .map(|_| ())
            .map_err(|_| {
                fail("expected an IANA time zone name such as UTC or Europe/Berlin".into())
            }),
        Kind::Choice { choices } => {
            if choices.iter().any(|c| c.eq_ignore_ascii_case(value.trim())) {
                Ok(())
            } else {
                Err(fail(format!("expected one of {}", choices.join(", "))))
            }
        }
        Kind::Networks => value
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .try_for_each(|n| {
                n.parse::<ipnet::IpNet>().map(|_| ()).map_err(|_| {
                    fail(format!(
                        "{n:?} is not a network in CIDR notation, such as 10.0.0.0/8"
                    ))
                })
            }),
        Kind::LogLevel => {
            if LOG_LEVELS
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(value))
            {
                Ok(())
            } else {
                let names: Vec<_> = LOG_LEVELS.iter().map(|(n, _)| *n).collect();
                Err(fail(format!("expected one of {}", names.join(", "))))
            }
        }
        Kind::Host => {
            let ok = !value.is_empty()
                && value.len() <= 253
                && (value.parse::<IpAddr>().is_ok()
                    || value.split('.').all(|label| {
                        !label.is_empty()
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    }));
            if ok {
                Ok(())
            } else {
                Err(fail("expected a host name or an IP address".into()))
            }
        }
    }
}

/// PostHog's log levels, mapped to `tracing` filters.
const LOG_LEVELS: &[(&str, &str)] = &[
    ("none", "off"),
    ("error", "error"),
    ("warn", "warn"),
    ("info", "info"),
    ("log", "info"),
    ("debug", "debug"),
    ("trace", "trace"),
];

pub(super) fn log_filter(level: &str) -> String {
    let level = LOG_LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(level))
        .map(|(_, filter)| *filter)
        .unwrap_or("info");
    // librdkafka's own log lines (through the rdkafka crate) follow LOG_LEVEL too.
    format!("appliance={level},librdkafka={level},rdkafka={level},warn")
}

pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}
