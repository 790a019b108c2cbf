//! Configuration: every setting the appliance reads from its environment, parsed and validated
//! once at start-up into a [`Config`].
//!
//! Owns: the table of settings (name, default, meaning), which is the single source for both
//! parsing and the `--help` listing; the validation rules; the start-up report of settings that
//! select components this build does not have yet.
//! Must never: read the environment anywhere else, or let a bad value through with a fallback.
//! A bad value is a [`ConfigError`] naming the variable, the value and what is allowed.

mod cluster;
mod limits;
mod settings;
mod sinks;
mod sources;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cluster::{ClusterSettings, LeaseSettings};
pub use limits::{CaptureLimits, JobSettings, PluginLimits, PluginQuotas, ServeLimits};
use settings::{check, log_filter};
pub use settings::{parse_bool, settings_help, Setting, SETTINGS};
pub use sinks::{split_tls_params, ClickHouseSettings, SinkKind, SinkSettings, SplitUrl};
pub use sources::{CelerySettings, KafkaSettings, TeamsFromPostgres};

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
    /// The sink events are written to, and its connection.
    pub sinks: SinkSettings,
    /// The Celery source, when `REDIS_URL` is set and `CELERY_SOURCE` is on.
    pub celery: Option<CelerySettings>,
    /// The Kafka source, when `KAFKA_ENABLED`.
    pub kafka: Option<KafkaSettings>,
    /// PostHog's `posthog_team` as the list of teams, when `TEAMS_FROM_POSTGRES`.
    pub teams_from_postgres: Option<TeamsFromPostgres>,
    /// This box's name in a group of boxes and the schedule lease.
    pub cluster: ClusterSettings,
    pub web_enabled: bool,
    pub web_host: IpAddr,
    pub web_port: u16,
    pub admin_host: IpAddr,
    pub admin_port: u16,
    /// Limits of the capture listener's connections.
    pub http: ServeLimits,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub idle: bool,
    pub trust_proxy: bool,
    pub capture: CaptureLimits,
    pub ingest_channel_capacity: usize,
    /// Most bytes of events waiting in the ingest queue.
    pub ingest_max_queue_bytes: u64,
    /// Free space kept on the data directory's disk.
    pub data_min_free_bytes: u64,
    pub ingest_commit_max_requests: usize,
    pub sink_batch_events: usize,
    pub sink_batch_bytes: usize,
    pub sink_linger: Duration,
    pub plugin_limits: PluginLimits,
    /// Operator's allow-list for plugin HTTP; empty means whatever plugins declare.
    pub plugin_allowed_hosts: Vec<String>,
    /// What one plugin config may use of storage, cache, logs, jobs and the network.
    pub plugin_quotas: PluginQuotas,
    pub shutdown_timeout: Duration,
    pub worker_concurrency: usize,
    pub jobs: JobSettings,
    /// Where day slots of schedules start.
    pub schedule_timezone: chrono_tz::Tz,
    pub disable_mmdb: bool,
    /// How many distinct ids (and as many persons) the person step keeps in memory.
    pub distinct_id_lru_size: usize,
    /// The GeoIP database named by the operator, if any.
    pub geoip_mmdb: Option<PathBuf>,
    /// Failure points armed for a crash test.
    pub failpoints: Vec<String>,
    /// Every setting's effective value, by name.
    raw: BTreeMap<&'static str, Option<String>>,
    /// Names set explicitly in the environment or the env file (not defaulted).
    explicit: Vec<&'static str>,
    /// Names whose value came from the env file.
    from_file: Vec<&'static str>,
    pub backup: BackupSchedule,
}

/// The daily backup, when `BACKUP_DIR` is set.
#[derive(Clone, Debug)]
pub struct BackupSchedule {
    pub dir: Option<PathBuf>,
    pub keep: usize,
    pub hour: u32,
}

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Default,
    EnvFile,
    Environment,
}

/// The configuration file the `.deb` installs, read when `APPLIANCE_ENV_FILE` is not set.
pub const PACKAGE_ENV_FILE: &str = "/etc/appliance/appliance.env";

/// The `NAME=value` lines of an env file (comments, quotes and `export` as shells write them).
fn read_env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, ConfigError> {
    let refuse = |e: &dyn std::fmt::Display| ConfigError {
        name: "APPLIANCE_ENV_FILE",
        value: path.display().to_string(),
        allowed: format!("a readable file of NAME=value lines: {e}"),
    };
    let lines = dotenvy::from_path_iter(path).map_err(|e| refuse(&e))?;
    lines.map(|line| line.map_err(|e| refuse(&e))).collect()
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Reads the process environment, and the file `APPLIANCE_ENV_FILE` names for what the
    /// environment does not set.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut vars: BTreeMap<String, String> = std::env::vars().collect();
        let mut from_file = Vec::new();
        // Unset: the package's file if it is there, so that every `appliance` command on a
        // packaged box sees the service's configuration. Set but empty: no file.
        if !vars.contains_key("APPLIANCE_ENV_FILE") && Path::new(PACKAGE_ENV_FILE).exists() {
            vars.insert("APPLIANCE_ENV_FILE".into(), PACKAGE_ENV_FILE.into());
        }
        if let Some(path) = vars.get("APPLIANCE_ENV_FILE").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            for (name, value) in read_env_file(&path)? {
                if let std::collections::btree_map::Entry::Vacant(slot) = vars.entry(name) {
                    from_file.push(slot.key().clone());
                    slot.insert(value);
                }
            }
        }
        let mut config = Config::from_vars(vars)?;
        config.from_file = SETTINGS
            .iter()
            .map(|s| s.name)
            .filter(|name| from_file.iter().any(|f| f == name))
            .collect();
        Ok(config)
    }

    /// Where a setting's value came from, for the admin page's settings list.
    pub fn source(&self, name: &str) -> Source {
        if self.from_file.contains(&name) {
            Source::EnvFile
        } else if self.explicit.contains(&name) {
            Source::Environment
        } else {
            Source::Default
        }
    }

    /// The configuration file in use, if any.
    pub fn env_file(&self) -> Option<PathBuf> {
        self.value("APPLIANCE_ENV_FILE").map(PathBuf::from)
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
        let explicit_value = |name: &str| {
            explicit
                .contains(&name)
                .then(|| get(name))
                .filter(|v| !v.is_empty())
        };
        let clickhouse = {
            let port = explicit_value("CLICKHOUSE_PORT").map(|_| num("CLICKHOUSE_PORT") as u16);
            let mut settings = sinks::ClickHouseSettings::new(
                &get("CLICKHOUSE_HOST"),
                port,
                flag("CLICKHOUSE_SECURE"),
            );
            settings.database = get("CLICKHOUSE_DATABASE");
            settings.user = get("CLICKHOUSE_USER");
            settings.password = explicit_value("CLICKHOUSE_PASSWORD");
            settings.flush_interval =
                std::time::Duration::from_millis(num("CLICKHOUSE_FLUSH_INTERVAL_MS"));
            settings
        };
        let sinks_value = explicit_value("SINKS");
        let wants_clickhouse = explicit.contains(&"CLICKHOUSE_HOST")
            || sinks_value
                .as_deref()
                .is_some_and(|s| s.to_ascii_lowercase().contains("clickhouse"));
        let teams_from_postgres = if flag("TEAMS_FROM_POSTGRES") {
            let url = explicit_value("DATABASE_URL").ok_or_else(|| ConfigError {
                name: "TEAMS_FROM_POSTGRES",
                value: get("TEAMS_FROM_POSTGRES"),
                allowed: "true only with DATABASE_URL set to PostHog's database".into(),
            })?;
            Some(TeamsFromPostgres {
                url,
                reload_redis_url: explicit_value("REDIS_URL"),
                reload_channel: get("PLUGINS_RELOAD_PUBSUB_CHANNEL"),
            })
        } else {
            None
        };
        // Beside PostHog, DATABASE_URL is PostHog's own database: events go there only when
        // SINKS says so.
        let sink_database = if teams_from_postgres.is_some() && sinks_value.is_none() {
            None
        } else {
            explicit_value("DATABASE_URL")
        };
        let mut sinks = sinks::resolve(
            sinks_value.as_deref(),
            sink_database.as_deref(),
            wants_clickhouse.then_some(clickhouse),
        )?;
        let kafka = if flag("KAFKA_ENABLED") {
            Some(sources::kafka_settings(
                &get,
                explicit_value("KAFKA_HOSTS"),
            )?)
        } else {
            None
        };
        // As the seed's plugin server: the Celery source runs when Kafka does not, unless
        // CELERY_SOURCE says otherwise.
        let celery_on = if explicit.contains(&"CELERY_SOURCE") {
            flag("CELERY_SOURCE")
        } else {
            kafka.is_none()
        };
        let cluster =
            cluster::cluster_settings(&get, &explicit_value, sinks.kinds.first().copied())?;
        sinks.node = cluster.node.clone();
        sinks.shared_persons = cluster.shared_persons;
        let config = Config {
            data_dir,
            cluster,
            sqlite_path,
            sinks,
            kafka,
            teams_from_postgres,
            celery: (explicit.contains(&"REDIS_URL") && celery_on).then(|| CelerySettings {
                redis_url: get("REDIS_URL"),
                queue: get("PLUGINS_CELERY_QUEUE"),
            }),
            web_enabled: !flag("DISABLE_WEB"),
            web_host,
            web_port: num("WEB_PORT") as u16,
            admin_host: resolve_listen_host(&get("ADMIN_HOSTNAME")).map_err(|allowed| {
                ConfigError {
                    name: "ADMIN_HOSTNAME",
                    value: get("ADMIN_HOSTNAME"),
                    allowed,
                }
            })?,
            admin_port: num("ADMIN_PORT") as u16,
            log_filter: log_filter(&get("LOG_LEVEL")),
            log_format: match get("LOG_FORMAT").trim().to_ascii_lowercase().as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                // systemd sets JOURNAL_STREAM for a service whose stderr is the journal.
                _ if given.contains_key("JOURNAL_STREAM") => LogFormat::Json,
                _ => LogFormat::Text,
            },
            idle: flag("PLUGIN_SERVER_IDLE"),
            trust_proxy: flag("TRUST_PROXY"),
            capture: CaptureLimits {
                max_body_bytes: num("CAPTURE_MAX_BODY_BYTES") as usize,
                max_decompressed_bytes: num("CAPTURE_MAX_DECOMPRESSED_BYTES") as usize,
                max_event_bytes: num("CAPTURE_MAX_EVENT_BYTES") as usize,
                max_events_per_request: num("CAPTURE_MAX_EVENTS_PER_REQUEST") as usize,
                max_inflight_bytes: num("CAPTURE_MAX_INFLIGHT_BYTES") as usize,
                body_timeout: Duration::from_secs(num("CAPTURE_BODY_TIMEOUT_SECS")),
                rate_per_ip: num("CAPTURE_RATE_LIMIT_PER_IP") as u32,
                rate_per_token: num("CAPTURE_RATE_LIMIT_PER_TOKEN") as u32,
            },
            http: ServeLimits {
                max_connections: num("HTTP_MAX_CONNECTIONS") as usize,
                max_connections_per_ip: if flag("TRUST_PROXY") {
                    0
                } else {
                    num("HTTP_MAX_CONNECTIONS_PER_IP") as usize
                },
                header_timeout: Duration::from_secs(num("HTTP_HEADER_TIMEOUT_SECS")),
                // A request in flight has at most its body deadline left, plus a moment to answer.
                drain_timeout: Duration::from_secs(num("CAPTURE_BODY_TIMEOUT_SECS") + 5),
            },
            ingest_max_queue_bytes: num("INGEST_MAX_QUEUE_BYTES"),
            data_min_free_bytes: num("DATA_DIR_MIN_FREE_MB") << 20,
            ingest_channel_capacity: num("INGEST_CHANNEL_CAPACITY") as usize,
            ingest_commit_max_requests: num("INGEST_COMMIT_MAX_REQUESTS") as usize,
            sink_batch_events: num("SINK_BATCH_EVENTS") as usize,
            sink_batch_bytes: num("SINK_BATCH_BYTES") as usize,
            sink_linger: Duration::from_millis(num("SINK_LINGER_MS")),
            plugin_limits: PluginLimits {
                memory_bytes: (num("PLUGIN_MEMORY_MB") as usize) << 20,
                setup: Duration::from_millis(num("PLUGIN_SETUP_TIMEOUT_MS")),
                process_event: Duration::from_millis(num("PLUGIN_PROCESS_EVENT_TIMEOUT_MS")),
                task: Duration::from_secs(num("PLUGIN_TASK_TIMEOUT_SECS")),
            },
            plugin_quotas: PluginQuotas {
                max_event_bytes: num("CAPTURE_MAX_EVENT_BYTES") as usize,
                time_budget_per_minute: Duration::from_millis(num(
                    "PLUGIN_TIME_BUDGET_MS_PER_MINUTE",
                )),
                deferred_max_bytes: num("PLUGIN_DEFERRED_MAX_BYTES"),
                storage_max_bytes: num("PLUGIN_STORAGE_MAX_BYTES"),
                storage_max_keys: num("PLUGIN_STORAGE_MAX_KEYS"),
                storage_max_value_bytes: num("PLUGIN_STORAGE_MAX_VALUE_BYTES") as usize,
                cache_max_bytes: num("PLUGIN_CACHE_MAX_BYTES") as usize,
                log_line_max_bytes: num("PLUGIN_LOG_LINE_MAX_BYTES") as usize,
                log_lines_per_call: num("PLUGIN_LOG_LINES_PER_CALL") as usize,
                log_max_lines: num("PLUGIN_LOG_MAX_LINES"),
                log_retention: Duration::from_secs(num("PLUGIN_LOG_RETENTION_DAYS") * 86_400),
                max_queued_jobs: num("PLUGIN_MAX_QUEUED_JOBS"),
                max_jobs_per_call: num("PLUGIN_MAX_JOBS_PER_CALL") as usize,
                fetch_max_bytes: num("PLUGIN_FETCH_MAX_BYTES") as usize,
                allowed_networks: get("PLUGIN_ALLOWED_NETWORKS")
                    .split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect(),
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
                dead_retention: Duration::from_secs(num("JOB_DEAD_LETTER_RETENTION_DAYS") * 86_400),
                idle_poll: Duration::from_millis(num("JOB_IDLE_POLL_MS")),
            },
            schedule_timezone: get("SCHEDULE_TIMEZONE")
                .trim()
                .parse()
                .unwrap_or(chrono_tz::UTC),
            disable_mmdb: flag("DISABLE_MMDB"),
            distinct_id_lru_size: num("DISTINCT_ID_LRU_SIZE") as usize,
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
            backup: BackupSchedule {
                dir: raw.get("BACKUP_DIR").cloned().flatten().map(PathBuf::from),
                keep: num("BACKUP_KEEP") as usize,
                hour: num("BACKUP_HOUR") as u32,
            },
            raw: raw.clone(),
            explicit,
            from_file: Vec::new(),
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
        if set("CLICKHOUSE_CA") {
            notes.push("CLICKHOUSE_CA: a custom CA is not supported; a secure ClickHouse connection checks the server against the system's trusted roots".to_owned());
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

/// `url` with its password, if any, replaced by `***` (for messages and logs).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Fails only for URLs that cannot have a password, and this one has one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(a URL that does not parse)".to_owned(),
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
            ("SENTRY_DSN", "https://key@sentry.example/1"),
            ("CLICKHOUSE_HOST", "ch.example"),
            ("CLICKHOUSE_CA", "/etc/ch-ca.pem"),
        ]))
        .unwrap();
        let notes = c.unbuilt_components().join("\n");
        assert!(notes.contains("SENTRY_DSN"), "{notes}");
        assert!(notes.contains("CLICKHOUSE_CA"), "{notes}");
        assert_eq!(
            c.sinks.kinds.last(),
            Some(&SinkKind::ClickHouse),
            "CLICKHOUSE_HOST adds the ClickHouse sink"
        );
        assert_eq!(c.sinks.clickhouse.url, "http://ch.example:8123");
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
        assert_eq!(
            c.log_filter,
            "appliance=info,librdkafka=info,rdkafka=info,warn"
        );
        let c = Config::from_vars(vars(&[("LOG_LEVEL", "none")])).unwrap();
        assert_eq!(
            c.log_filter,
            "appliance=off,librdkafka=off,rdkafka=off,warn"
        );
    }
}
