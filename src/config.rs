//! Configuration: every setting the appliance reads from its environment, parsed and validated
//! once at start-up into a [`Config`].
//!
//! Owns: the table of settings (name, default, meaning), which is the single source for both
//! parsing and the `--help` listing; the validation rules; the start-up report of settings that
//! select components this build does not have yet.
//! Must never: read the environment anywhere else, or let a bad value through with a fallback.
//! A bad value is a [`ConfigError`] naming the variable, the value and what is allowed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the value of a setting is checked.
#[derive(Clone, Copy, Debug)]
enum Kind {
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
}

/// One row of the settings table.
pub struct Setting {
    pub name: &'static str,
    /// The default as written in `--help`; `None` means unset.
    pub default: Option<&'static str>,
    pub help: &'static str,
    kind: Kind,
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
    setting("DATABASE_URL", Some("postgres://localhost:5432/posthog"), PG, "Postgres database URL (Postgres sink; not built yet, events go to SQLite)"),
    setting("REDIS_URL", Some("redis://localhost"), REDIS, "Redis store URL (Celery source; not built yet)"),
    setting("BASE_DIR", Some("."), Kind::Text, "base path for resolving local plugins"),
    setting("WORKER_CONCURRENCY", Some("0"), COUNT, "number of concurrent workers; 0 means all cores"),
    setting("TASKS_PER_WORKER", Some("10"), POSITIVE, "number of parallel tasks per worker"),
    setting("REDIS_POOL_MIN_SIZE", Some("1"), POSITIVE, "minimum number of Redis connections"),
    setting("REDIS_POOL_MAX_SIZE", Some("3"), POSITIVE, "maximum number of Redis connections"),
    setting("SCHEDULE_TIMEZONE", Some("UTC"), Kind::TimeZone, "time zone whose midnight starts run-every-day slots (minute and hour slots follow UTC)"),
    setting("SCHEDULE_LOCK_TTL", Some("60"), POSITIVE, "how many seconds to hold the lock for the schedule"),
    setting("CELERY_DEFAULT_QUEUE", Some("celery"), Kind::Text, "Celery outgoing queue"),
    setting("PLUGINS_CELERY_QUEUE", Some("posthog-plugins"), Kind::Text, "Celery incoming queue"),
    setting("PLUGINS_RELOAD_PUBSUB_CHANNEL", Some("reload-plugins"), Kind::Text, "Redis channel for reload events"),
    setting("CLICKHOUSE_HOST", Some("localhost"), Kind::Host, "ClickHouse host (ClickHouse sink; not built yet)"),
    setting("CLICKHOUSE_DATABASE", Some("default"), Kind::Text, "ClickHouse database"),
    setting("CLICKHOUSE_USER", Some("default"), Kind::Text, "ClickHouse username"),
    setting("CLICKHOUSE_PASSWORD", None, Kind::Text, "ClickHouse password"),
    setting("CLICKHOUSE_CA", None, Kind::Text, "ClickHouse CA certs"),
    setting("CLICKHOUSE_SECURE", Some("false"), Kind::Bool, "whether to secure ClickHouse connection"),
    setting("KAFKA_ENABLED", Some("false"), Kind::Bool, "consume events from Kafka (Kafka source; not built yet)"),
    setting("KAFKA_HOSTS", None, Kind::Text, "comma-delimited Kafka hosts"),
    setting("KAFKA_CONSUMPTION_TOPIC", Some("events_plugin_ingestion"), Kind::Text, "Kafka incoming events topic"),
    setting("KAFKA_CLIENT_CERT_B64", None, Kind::Base64, "Kafka certificate in Base64"),
    setting("KAFKA_CLIENT_CERT_KEY_B64", None, Kind::Base64, "Kafka certificate key in Base64"),
    setting("KAFKA_TRUSTED_CERT_B64", None, Kind::Base64, "Kafka trusted CA in Base64"),
    setting("KAFKA_PRODUCER_MAX_QUEUE_SIZE", Some("20"), POSITIVE, "Kafka producer batch max size before flushing"),
    setting("KAFKA_FLUSH_FREQUENCY_MS", Some("500"), POSITIVE, "Kafka producer batch max duration before flushing"),
    setting("KAFKA_MAX_MESSAGE_BATCH_SIZE", Some("900000"), POSITIVE, "Kafka producer batch max size in bytes before flushing"),
    setting("DISABLE_WEB", Some("false"), Kind::Bool, "disable the web server (capture, health, admin). The seed defaulted to true; here the web server is the front door, so it is on unless disabled"),
    setting("WEB_PORT", Some("3008"), PORT, "port for the web server; 0 picks a free port"),
    setting("WEB_HOSTNAME", Some("0.0.0.0"), Kind::Host, "address for the web server to listen on"),
    setting("LOG_LEVEL", Some("info"), Kind::LogLevel, "minimum log level: none, error, warn, info, log (= info), debug, trace"),
    setting("SENTRY_DSN", None, Kind::Text, "Sentry ingestion URL (not built yet)"),
    setting("STATSD_HOST", None, Kind::Host, "StatsD host - integration disabled if not provided (not built yet)"),
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
    setting("DATA_DIR", Some("./data"), Kind::Text, "directory holding the appliance's state (redb) and the embedded SQLite event store"),
    setting("SQLITE_PATH", None, Kind::Text, "path of the SQLite event store; default DATA_DIR/events.sqlite3"),
    setting("TRUST_PROXY", Some("false"), Kind::Bool, "take the client IP from X-Forwarded-For (set only behind a proxy you run)"),
    setting("CAPTURE_MAX_BODY_BYTES", Some("20971520"), int(1024, 1 << 30), "largest capture request body accepted, in bytes (413 above)"),
    setting("CAPTURE_MAX_DECOMPRESSED_BYTES", Some("67108864"), int(1024, 1 << 32), "largest capture payload after decompression, in bytes (413 above)"),
    setting("CAPTURE_MAX_EVENT_BYTES", Some("1048576"), int(256, 1 << 30), "largest single event, in bytes of JSON; larger events are rejected"),
    setting("INGEST_CHANNEL_CAPACITY", Some("4096"), int(1, 1 << 20), "capture requests that may wait for the group commit before capture answers 503"),
    setting("INGEST_COMMIT_MAX_REQUESTS", Some("2048"), int(1, 1 << 20), "most capture requests folded into one redb commit"),
    setting("SINK_BATCH_EVENTS", Some("20000"), int(1, 1 << 20), "most events the pipeline writes to the sink in one transaction"),
    setting("SINK_BATCH_BYTES", Some("33554432"), int(65536, 1 << 30), "most bytes of queued events the pipeline reads into one sink transaction (bounds its memory whatever the events' size)"),
    setting("SINK_LINGER_MS", Some("200"), int(0, 60_000), "how long the pipeline lets a part-filled batch fill before writing it (fewer, larger sink transactions)"),
    setting("PLUGIN_MEMORY_MB", Some("64"), int(1, 4096), "memory limit of each plugin instance, in MiB"),
    setting("PLUGIN_PROCESS_EVENT_TIMEOUT_MS", Some("500"), int(1, 600_000), "deadline of one process-event call (a batch of events) of one plugin"),
    setting("JOBS_PER_PLUGIN_CONFIG", Some("4"), POSITIVE, "jobs of one plugin config that may run at once, so one plugin cannot take every slot"),
    setting("JOB_RETRY_BASE_MS", Some("1000"), int(1, 3_600_000), "delay before a failed job's first retry; doubled for each further one (with jitter), at most an hour"),
    setting("JOB_KEY_RETENTION_HOURS", Some("24"), int(1, 8_760), "how long a job's idempotency key keeps deduplicating"),
    setting("PLUGIN_TASK_TIMEOUT_SECS", Some("30"), int(1, 86_400), "deadline of plugin setup, scheduled tasks, jobs and exports"),
    setting("APPLIANCE_FAILPOINTS", None, Kind::Text, "for crash tests only: comma-separated failure points at which the process aborts (pipeline.after_sink_write)"),
    setting("PLUGIN_ALLOWED_HOSTS", None, Kind::Text, "comma-separated hosts plugins may fetch from; unset: any host a plugin declares in its plugin.json"),
    setting("SHUTDOWN_TIMEOUT_SECS", Some("30"), int(0, 3600), "on SIGTERM, how long to keep flushing the queue to the sink before exiting"),
];

/// A setting whose value was refused. Displayed as the one line start-up stops with.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}={value:?}: {allowed}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub allowed: String,
}

/// The validated configuration. Fields the running code uses are typed; the rest stay as text in
/// `raw` so that `--help` and the start-up report can show them.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub sqlite_path: PathBuf,
    pub web_enabled: bool,
    pub web_host: IpAddr,
    pub web_port: u16,
    pub log_filter: String,
    pub idle: bool,
    pub trust_proxy: bool,
    pub capture: CaptureLimits,
    pub ingest_channel_capacity: usize,
    pub ingest_commit_max_requests: usize,
    pub sink_batch_events: usize,
    pub sink_batch_bytes: usize,
    pub sink_linger: Duration,
    pub plugin_limits: PluginLimits,
    /// Operator's allow-list for plugin HTTP; empty means whatever plugins declare.
    pub plugin_allowed_hosts: Vec<String>,
    pub shutdown_timeout: Duration,
    pub worker_concurrency: usize,
    pub jobs: JobSettings,
    /// Where day slots of schedules start.
    pub schedule_timezone: chrono_tz::Tz,
    pub disable_mmdb: bool,
    /// The GeoIP database named by the operator, if any.
    pub geoip_mmdb: Option<PathBuf>,
    /// Failure points armed for a crash test.
    pub failpoints: Vec<String>,
    /// Every setting's effective value, by name.
    raw: BTreeMap<&'static str, Option<String>>,
    /// Names set explicitly in the environment (not defaulted).
    explicit: Vec<&'static str>,
}

/// Limits applied to every plugin call.
#[derive(Clone, Copy, Debug)]
pub struct PluginLimits {
    pub memory_bytes: usize,
    /// Deadline of `process-event` calls (per batch call).
    pub process_event: Duration,
    /// Deadline of setup, scheduled tasks, jobs and exports.
    pub task: Duration,
}

/// How the job queue behaves.
#[derive(Clone, Copy, Debug)]
pub struct JobSettings {
    /// Jobs that run at once.
    pub slots: usize,
    /// Jobs of one plugin config that may be claimed at once.
    pub per_plugin_config: usize,
    /// Delay before the first retry; doubled for each further one.
    pub retry_base: Duration,
    /// How long an idempotency key keeps deduplicating.
    pub key_retention: Duration,
}

/// Limits applied by capture to each request.
#[derive(Clone, Copy, Debug)]
pub struct CaptureLimits {
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_event_bytes: usize,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(std::env::vars())
    }

    /// Builds a configuration from `(name, value)` pairs; unknown names are ignored.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let given: BTreeMap<String, String> = vars.into_iter().collect();
        let mut raw = BTreeMap::new();
        let mut explicit = Vec::new();
        for s in SETTINGS {
            let value = match given.get(s.name) {
                // An empty variable means "unset", as shells and unit files commonly write it.
                Some(v) if !v.is_empty() => {
                    explicit.push(s.name);
                    Some(v.clone())
                }
                _ => s.default.map(str::to_owned),
            };
            if let Some(v) = &value {
                check(s, v)?;
            }
            raw.insert(s.name, value);
        }
        let get = |name: &str| raw.get(name).cloned().flatten().unwrap_or_default();
        let num = |name: &str| get(name).parse::<u64>().unwrap_or(0);
        let flag = |name: &str| parse_bool(&get(name)).unwrap_or(false);

        let data_dir = PathBuf::from(get("DATA_DIR"));
        let sqlite_path = match raw.get("SQLITE_PATH").cloned().flatten() {
            Some(p) => PathBuf::from(p),
            None => data_dir.join("events.sqlite3"),
        };
        let web_host: IpAddr =
            resolve_listen_host(&get("WEB_HOSTNAME")).map_err(|allowed| ConfigError {
                name: "WEB_HOSTNAME",
                value: get("WEB_HOSTNAME"),
                allowed,
            })?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let config = Config {
            data_dir,
            sqlite_path,
            web_enabled: !flag("DISABLE_WEB"),
            web_host,
            web_port: num("WEB_PORT") as u16,
            log_filter: log_filter(&get("LOG_LEVEL")),
            idle: flag("PLUGIN_SERVER_IDLE"),
            trust_proxy: flag("TRUST_PROXY"),
            capture: CaptureLimits {
                max_body_bytes: num("CAPTURE_MAX_BODY_BYTES") as usize,
                max_decompressed_bytes: num("CAPTURE_MAX_DECOMPRESSED_BYTES") as usize,
                max_event_bytes: num("CAPTURE_MAX_EVENT_BYTES") as usize,
            },
            ingest_channel_capacity: num("INGEST_CHANNEL_CAPACITY") as usize,
            ingest_commit_max_requests: num("INGEST_COMMIT_MAX_REQUESTS") as usize,
            sink_batch_events: num("SINK_BATCH_EVENTS") as usize,
            sink_batch_bytes: num("SINK_BATCH_BYTES") as usize,
            sink_linger: Duration::from_millis(num("SINK_LINGER_MS")),
            plugin_limits: PluginLimits {
                memory_bytes: (num("PLUGIN_MEMORY_MB") as usize) << 20,
                process_event: Duration::from_millis(num("PLUGIN_PROCESS_EVENT_TIMEOUT_MS")),
                task: Duration::from_secs(num("PLUGIN_TASK_TIMEOUT_SECS")),
            },
            plugin_allowed_hosts: get("PLUGIN_ALLOWED_HOSTS")
                .split(',')
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .collect(),
            shutdown_timeout: Duration::from_secs(num("SHUTDOWN_TIMEOUT_SECS")),
            worker_concurrency: match num("WORKER_CONCURRENCY") {
                0 => cores,
                n => n as usize,
            },
            jobs: JobSettings {
                slots: match num("WORKER_CONCURRENCY") {
                    0 => cores,
                    n => n as usize,
                } * num("TASKS_PER_WORKER").max(1) as usize,
                per_plugin_config: num("JOBS_PER_PLUGIN_CONFIG").max(1) as usize,
                retry_base: Duration::from_millis(num("JOB_RETRY_BASE_MS")),
                key_retention: Duration::from_secs(num("JOB_KEY_RETENTION_HOURS") * 3600),
            },
            schedule_timezone: get("SCHEDULE_TIMEZONE")
                .trim()
                .parse()
                .unwrap_or(chrono_tz::UTC),
            disable_mmdb: flag("DISABLE_MMDB"),
            geoip_mmdb: raw
                .get("GEOIP_MMDB_PATH")
                .cloned()
                .flatten()
                .map(PathBuf::from),
            failpoints: get("APPLIANCE_FAILPOINTS")
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            raw: raw.clone(),
            explicit,
        };
        if config.capture.max_decompressed_bytes < config.capture.max_event_bytes {
            return Err(ConfigError {
                name: "CAPTURE_MAX_EVENT_BYTES",
                value: get("CAPTURE_MAX_EVENT_BYTES"),
                allowed: format!(
                    "at most CAPTURE_MAX_DECOMPRESSED_BYTES ({})",
                    config.capture.max_decompressed_bytes
                ),
            });
        }
        Ok(config)
    }

    /// The effective value of a setting, as text.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.raw.get(name).and_then(|v| v.as_deref())
    }

    /// Lines describing settings that ask for components this build does not have, so that
    /// start-up says so instead of silently ignoring them.
    pub fn unbuilt_components(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let set = |name: &str| self.explicit.contains(&name);
        let on = |name: &str| self.value(name).and_then(parse_bool).unwrap_or(false);
        if on("KAFKA_ENABLED") || set("KAFKA_HOSTS") {
            notes.push("KAFKA_ENABLED/KAFKA_HOSTS: the Kafka source is not built yet; events arrive over HTTP capture only".to_owned());
        }
        if set("DATABASE_URL") {
            notes.push("DATABASE_URL: the Postgres sink is not built yet; events are stored in the embedded SQLite database".to_owned());
        }
        if set("REDIS_URL") {
            notes.push(
                "REDIS_URL: the Celery-over-Redis source is not built yet; Redis is not used"
                    .to_owned(),
            );
        }
        if set("CLICKHOUSE_HOST") {
            notes.push("CLICKHOUSE_HOST: the ClickHouse sink is not built yet; events are stored in the embedded SQLite database".to_owned());
        }
        if set("STATSD_HOST") {
            notes.push("STATSD_HOST: StatsD export is not built yet".to_owned());
        }
        if set("SENTRY_DSN") {
            notes.push("SENTRY_DSN: Sentry reporting is not built yet".to_owned());
        }
        if on("CAPTURE_INTERNAL_METRICS") {
            notes.push(
                "CAPTURE_INTERNAL_METRICS: internal metrics are not captured as events yet"
                    .to_owned(),
            );
        }
        notes
    }
}

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

fn check(s: &Setting, value: &str) -> Result<(), ConfigError> {
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

fn log_filter(level: &str) -> String {
    let level = LOG_LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(level))
        .map(|(_, filter)| *filter)
        .unwrap_or("info");
    format!("appliance={level},warn")
}

pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The listen address: an IP, or `localhost`. Names needing DNS are refused, since a server
/// must not start on whatever a resolver happens to answer.
fn resolve_listen_host(host: &str) -> Result<IpAddr, String> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    host.parse().map_err(|_| {
        "expected an IP address to listen on (such as 0.0.0.0, 127.0.0.1 or ::) or localhost"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_seed_except_where_the_appliance_differs() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.web_port, 3008);
        assert_eq!(c.web_host.to_string(), "0.0.0.0");
        assert!(c.web_enabled, "the web server is the front door here");
        assert_eq!(
            c.value("KAFKA_CONSUMPTION_TOPIC"),
            Some("events_plugin_ingestion")
        );
        assert_eq!(c.value("CLICKHOUSE_PASSWORD"), None);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.sqlite_path, PathBuf::from("./data/events.sqlite3"));
        assert!(c.unbuilt_components().is_empty());
    }

    #[test]
    fn a_bad_value_names_the_variable_the_value_and_what_is_allowed() {
        let err = Config::from_vars(vars(&[("WEB_PORT", "70000")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: WEB_PORT=\"70000\": expected a whole number from 0 to 65535"
        );
        let err = Config::from_vars(vars(&[("KAFKA_ENABLED", "maybe")])).unwrap_err();
        assert_eq!(err.name, "KAFKA_ENABLED");
        let err = Config::from_vars(vars(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.allowed.contains("postgres://"), "{err}");
        let err = Config::from_vars(vars(&[("LOG_LEVEL", "loud")])).unwrap_err();
        assert!(err.allowed.contains("debug"), "{err}");
        let err = Config::from_vars(vars(&[("KAFKA_TRUSTED_CERT_B64", "***")])).unwrap_err();
        assert_eq!(err.name, "KAFKA_TRUSTED_CERT_B64");
        let err = Config::from_vars(vars(&[("WEB_HOSTNAME", "example.com")])).unwrap_err();
        assert_eq!(err.name, "WEB_HOSTNAME");
        let err = Config::from_vars(vars(&[("SCHEDULE_TIMEZONE", "Mars/Olympus")])).unwrap_err();
        assert!(err.allowed.contains("Europe/Berlin"), "{err}");
        let berlin = Config::from_vars(vars(&[("SCHEDULE_TIMEZONE", "Europe/Berlin")])).unwrap();
        assert_eq!(berlin.schedule_timezone, chrono_tz::Europe::Berlin);
    }

    #[test]
    fn settings_for_unbuilt_components_are_reported() {
        let c = Config::from_vars(vars(&[
            ("KAFKA_ENABLED", "true"),
            ("DATABASE_URL", "postgres://db/x"),
        ]))
        .unwrap();
        let notes = c.unbuilt_components().join("\n");
        assert!(notes.contains("Kafka"), "{notes}");
        assert!(notes.contains("Postgres"), "{notes}");
    }

    #[test]
    fn help_lists_every_setting_with_its_default() {
        let help = settings_help();
        for s in SETTINGS {
            assert!(help.contains(s.name), "{} missing", s.name);
        }
        assert!(help.contains("WEB_PORT") && help.contains("'3008'"));
    }

    #[test]
    fn log_levels_map_to_filters() {
        let c = Config::from_vars(vars(&[("LOG_LEVEL", "log")])).unwrap();
        assert_eq!(c.log_filter, "appliance=info,warn");
        let c = Config::from_vars(vars(&[("LOG_LEVEL", "none")])).unwrap();
        assert_eq!(c.log_filter, "appliance=off,warn");
    }
}
