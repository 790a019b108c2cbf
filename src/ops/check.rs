//! `appliance check`: whether the appliance can start with this configuration on this machine,
//! as one finding per line. systemd runs it before every start (`ExecStartPre=`), so a broken
//! setup stops with its reason in the journal instead of a crash loop.
//!
//! Owns: the checks of the data directory (kind, permissions, free space, store layout, the
//! SQLite schema, installed plugin files against their checksums), of the files settings name
//! (GeoIP database, backup directory) and the reachability of the external services a setting
//! names explicitly (Postgres, ClickHouse, Kafka, Redis).
//! Must never: change what it checks (no directory, table or file is created, no migration
//! applied), or wait on a service past [`CONNECT_TIMEOUT`].

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{Config, Source};
use crate::plugins::plugin_dir;
use crate::sinks::sqlite::{schema_state, SchemaState};
use crate::store::{free_space, Store, STATE_FILE};

/// How long one service may take to accept a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The appliance cannot start, or would lose or refuse data: `check` exits non-zero.
    Problem,
    /// Worth knowing; start-up goes ahead.
    Warning,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

/// What `check` found, in the order it looked.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub findings: Vec<Finding>,
    /// What was checked and found fine, for the closing line.
    pub passed: Vec<String>,
}

impl CheckReport {
    fn problem(&mut self, text: String) {
        self.findings.push(Finding {
            severity: Severity::Problem,
            text,
        });
    }

    fn warning(&mut self, text: String) {
        self.findings.push(Finding {
            severity: Severity::Warning,
            text,
        });
    }

    pub fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .count()
    }
}

/// Runs every check against a configuration that parsed (a setting that does not parse is the
/// caller's configuration error).
pub fn check(config: &Config, services: bool) -> CheckReport {
    let mut report = CheckReport::default();
    if check_data_dir(config, &mut report) {
        check_state(&config.data_dir, &mut report);
        // The Postgres sink's schema is checked by its own migrations when it connects.
        if config
            .sinks
            .kinds
            .contains(&crate::config::SinkKind::Sqlite)
        {
            check_events_db(&config.sqlite_path, &mut report);
        }
    }
    check_named_files(config, &mut report);
    if services {
        check_services(config, &mut report);
    }
    report
}

/// The data directory itself; false if nothing inside it can be checked.
fn check_data_dir(config: &Config, report: &mut CheckReport) -> bool {
    let dir = &config.data_dir;
    let shown = dir.display();
    if !dir.exists() {
        match dir.ancestors().skip(1).find(|a| a.is_dir()) {
            Some(parent) if writable(parent) => {
                report
                    .passed
                    .push(format!("DATA_DIR {shown} (created at start)"));
            }
            Some(parent) => report.problem(format!(
                "DATA_DIR {shown} does not exist and cannot be created: {} is not writable",
                parent.display()
            )),
            None => report.problem(format!("DATA_DIR {shown} does not exist")),
        }
        return false;
    }
    if !dir.is_dir() {
        report.problem(format!("DATA_DIR {shown} is not a directory"));
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o002 != 0 {
                report.problem(format!(
                    "DATA_DIR {shown} is writable by every user (mode {mode:o}); it holds secrets and plugin configs: chmod 700 {shown}"
                ));
            } else if mode & 0o077 != 0 {
                report.warning(format!(
                    "DATA_DIR {shown} is readable by other users (mode {mode:o}); it holds secrets and plugin configs: chmod 700 {shown}"
                ));
            }
        }
    }
    if !writable(dir) {
        report.problem(format!("DATA_DIR {shown} is not writable by this user"));
        return false;
    }
    let floor = config.data_min_free_bytes;
    match free_space(dir) {
        Some(free) if free < floor => report.problem(format!(
            "DATA_DIR {shown} has {} MiB free, below DATA_DIR_MIN_FREE_MB={} (capture would answer 503)",
            free >> 20,
            floor >> 20
        )),
        Some(free) => report
            .passed
            .push(format!("DATA_DIR {shown} ({} MiB free)", free >> 20)),
        None => report.warning(format!("cannot read the free space of DATA_DIR {shown}")),
    }
    true
}

/// Whether this user can create a file in `dir` (tried, not inferred from the mode bits, which
/// say nothing about root, ACLs or a read-only mount).
fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".appliance-check-{}", std::process::id()));
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .is_ok();
    if made {
        let _ = std::fs::remove_file(&probe);
    }
    made
}

/// The state file (layout version) and the plugin components it lists.
fn check_state(data_dir: &Path, report: &mut CheckReport) {
    if !data_dir.join(STATE_FILE).exists() {
        report.passed.push("state (created at start)".into());
        return;
    }
    let store = match Store::open(data_dir) {
        Ok(store) => store,
        Err(e) => {
            report.problem(format!("the state file cannot be opened: {e}"));
            return;
        }
    };
    let plugins = match store.list_plugins() {
        Ok(plugins) => plugins,
        Err(e) => {
            report.problem(format!("the state file cannot be read: {e}"));
            return;
        }
    };
    let dir = plugin_dir(data_dir);
    let mut intact = 0;
    for plugin in &plugins {
        let file = dir.join(format!("{}.wasm", plugin.sha256));
        match std::fs::read(&file) {
            Err(e) => report.problem(format!(
                "plugin {:?}: its component {} cannot be read ({e}); install the plugin again",
                plugin.name,
                file.display()
            )),
            Ok(bytes) if format!("{:x}", Sha256::digest(&bytes)) != plugin.sha256 => report
                .problem(format!(
                    "plugin {:?}: its component {} does not match its checksum (damaged); install the plugin again",
                    plugin.name,
                    file.display()
                )),
            Ok(_) => intact += 1,
        }
    }
    report
        .passed
        .push(format!("state ({intact} plugin components intact)"));
}

/// The SQLite events database's schema against this build's migrations.
fn check_events_db(path: &Path, report: &mut CheckReport) {
    if !path.exists() {
        report
            .passed
            .push("events database (created at start)".into());
        return;
    }
    match schema_state(path) {
        Ok(SchemaState::Current) => report.passed.push("events database".into()),
        Ok(SchemaState::Behind { applied, known }) => report.passed.push(format!(
            "events database (schema {applied}, migrated to {known} at start)"
        )),
        Ok(SchemaState::Ahead { applied, known }) => report.problem(format!(
            "the events database {} has schema version {applied}, newer than this build knows ({known}): run the newer appliance or restore a backup",
            path.display()
        )),
        Err(e) => report.problem(format!(
            "the events database {} cannot be read: {e}",
            path.display()
        )),
    }
}

/// Files and directories that settings name.
fn check_named_files(config: &Config, report: &mut CheckReport) {
    if let (false, Some(path)) = (config.disable_mmdb, &config.geoip_mmdb) {
        match maxminddb::Reader::open_readfile(path) {
            Ok(_) => report.passed.push("GEOIP_MMDB_PATH".into()),
            // Not a reason to stop: events flow without GeoIP, and the file is loaded when a
            // readable one appears.
            Err(e) => report.warning(format!(
                "GEOIP_MMDB_PATH {} cannot be opened as a MaxMind database ({e}); events get no GeoIP properties until it can",
                path.display()
            )),
        }
    }
    if let Some(dir) = &config.backup.dir {
        let ok = if dir.is_dir() {
            writable(dir)
        } else {
            !dir.exists()
                && dir
                    .ancestors()
                    .skip(1)
                    .find(|a| a.is_dir())
                    .is_some_and(writable)
        };
        if ok {
            report.passed.push("BACKUP_DIR".into());
        } else {
            report.problem(format!(
                "BACKUP_DIR {} is not a directory this user can write to",
                dir.display()
            ));
        }
    }
}

/// A connection to each external service a setting names explicitly (a default such as
/// `DATABASE_URL=postgres://localhost:5432/posthog` is the seed's, not a request to use one).
fn check_services(config: &Config, report: &mut CheckReport) {
    let explicit = |name: &str| config.source(name) != Source::Default;
    let mut targets: Vec<(&str, Endpoint)> = Vec::new();
    if explicit("DATABASE_URL") {
        for server in config
            .value("DATABASE_URL")
            .map(postgres_servers)
            .unwrap_or_default()
        {
            targets.push(("DATABASE_URL", server));
        }
    }
    if explicit("REDIS_URL") {
        if let Some(addr) = config.value("REDIS_URL").and_then(|u| url_address(u, 6379)) {
            targets.push(("REDIS_URL", Endpoint::Tcp(addr)));
        }
    }
    if explicit("CLICKHOUSE_HOST") {
        if let Some(host) = config.value("CLICKHOUSE_HOST") {
            let secure = config
                .value("CLICKHOUSE_SECURE")
                .and_then(crate::config::parse_bool)
                .unwrap_or(false);
            let port = if secure { 8443 } else { 8123 };
            targets.push(("CLICKHOUSE_HOST", Endpoint::Tcp(with_port(host, port))));
        }
    }
    if explicit("KAFKA_HOSTS") {
        for host in config
            .value("KAFKA_HOSTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
        {
            targets.push(("KAFKA_HOSTS", Endpoint::Tcp(with_port(host, 9092))));
        }
    }
    for (setting, endpoint) in targets {
        match endpoint.connect() {
            Ok(()) => report.passed.push(format!("{setting} ({endpoint})")),
            Err(e) => report.problem(format!("{setting}: cannot connect to {endpoint}: {e}")),
        }
    }
}

/// Where a service listens.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// A Unix-domain socket (a Postgres server's is `<directory>/.s.PGSQL.<port>`).
    Socket(std::path::PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => f.write_str(addr),
            Endpoint::Socket(path) => write!(f, "the socket {}", path.display()),
        }
    }
}

impl Endpoint {
    fn connect(&self) -> Result<(), String> {
        match self {
            Endpoint::Tcp(addr) => connect(addr),
            Endpoint::Socket(path) => UnixStream::connect(path)
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Each server of a `DATABASE_URL` (a URL or libpq's key=value form, read as the sink reads
/// it), with each host's port (5432 when none is named); none if it does not parse.
fn postgres_servers(url: &str) -> Vec<Endpoint> {
    let Ok(split) = crate::config::split_tls_params(url) else {
        return Vec::new();
    };
    let Ok(config) = split.rest.parse::<tokio_postgres::Config>() else {
        return Vec::new();
    };
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(at, host)| {
            let port = ports.get(at).or(ports.first()).copied().unwrap_or(5432);
            match host {
                tokio_postgres::config::Host::Tcp(name) => Endpoint::Tcp(with_port(name, port)),
                tokio_postgres::config::Host::Unix(dir) => {
                    Endpoint::Socket(dir.join(format!(".s.PGSQL.{port}")))
                }
            }
        })
        .collect()
}

/// `host:port` of a URL, the scheme's usual port when it names none.
fn url_address(value: &str, default_port: u16) -> Option<String> {
    let url = url::Url::parse(value).ok()?;
    let host = url.host_str()?;
    let port = url.port().unwrap_or(default_port);
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

fn with_port(host: &str, port: u16) -> String {
    let bare_ipv6 = host.matches(':').count() > 1 && !host.starts_with('[');
    if bare_ipv6 {
        format!("[{host}]:{port}")
    } else if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

/// Resolves `addr` and connects to the first address that answers.
fn connect(addr: &str) -> Result<(), String> {
    let resolved: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve it ({e})"))?
        .collect();
    let mut last = String::from("it resolves to no address");
    for socket in resolved {
        match TcpStream::connect_timeout(&socket, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_the_usual_port_when_none_is_named() {
        assert_eq!(
            url_address("postgres://u:p@db.example:6543/posthog", 5432).as_deref(),
            Some("db.example:6543")
        );
        assert_eq!(
            url_address("redis://cache", 6379).as_deref(),
            Some("cache:6379")
        );
        assert_eq!(
            postgres_servers("postgres://u:p@db.example/posthog"),
            [Endpoint::Tcp("db.example:5432".into())]
        );
        assert_eq!(
            postgres_servers("postgresql:///posthog?host=/run/postgresql&port=5433"),
            [Endpoint::Socket("/run/postgresql/.s.PGSQL.5433".into())]
        );
        assert_eq!(
            postgres_servers("host=/tmp,db port=5999 dbname=x"),
            [
                Endpoint::Socket("/tmp/.s.PGSQL.5999".into()),
                Endpoint::Tcp("db:5999".into())
            ]
        );
        assert_eq!(with_port("kafka1", 9092), "kafka1:9092");
        assert_eq!(with_port("kafka1:19092", 9092), "kafka1:19092");
        assert_eq!(with_port("::1", 8123), "[::1]:8123");
    }
}
