//! Which sinks the events go to: `SINKS`, or what the configured databases imply.

use std::str::FromStr;

use super::ConfigError;

/// A store the pipeline writes events to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// The embedded SQLite file (`SQLITE_PATH`).
    Sqlite,
    /// PostHog's tables in the Postgres database of `DATABASE_URL`.
    Postgres,
    /// PostHog's tables in the ClickHouse server of `CLICKHOUSE_HOST` (a follower only).
    ClickHouse,
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Sqlite => "sqlite",
            SinkKind::Postgres => "postgres",
            SinkKind::ClickHouse => "clickhouse",
        }
    }
}

/// The chosen sinks, the lead first, and what they connect to.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    /// Never empty; the first leads, the others follow.
    pub kinds: Vec<SinkKind>,
    /// `DATABASE_URL` when it was set (it has a default for the seed's sake, which is never
    /// used to connect).
    pub postgres_url: Option<String>,
    /// Where the ClickHouse sink writes (its settings have defaults; used only when chosen).
    pub clickhouse: ClickHouseSettings,
    /// `NODE_ID`: a sink shared by several boxes keeps this box's position under it.
    pub node: Option<String>,
    /// `SHARED_PERSONS`: the leading Postgres sink is the boxes' shared person store, and
    /// writes persons only over the versions their step read.
    pub shared_persons: bool,
}

/// The ClickHouse server's HTTP interface and account (`CLICKHOUSE_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClickHouseSettings {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    /// The least time between two writes unless a full batch waits.
    pub flush_interval: std::time::Duration,
}

impl ClickHouseSettings {
    /// From `CLICKHOUSE_HOST`, `CLICKHOUSE_PORT` (8123, or 8443 when secure) and
    /// `CLICKHOUSE_SECURE`.
    pub fn new(host: &str, port: Option<u16>, secure: bool) -> ClickHouseSettings {
        let (scheme, default_port) = if secure {
            ("https", 8443)
        } else {
            ("http", 8123)
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        ClickHouseSettings {
            url: format!("{scheme}://{host}:{}", port.unwrap_or(default_port)),
            database: "default".into(),
            user: "default".into(),
            password: None,
            flush_interval: std::time::Duration::from_secs(1),
        }
    }
}

/// libpq's `sslmode` values.
const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// A Postgres URL with libpq's TLS parameters taken out (tokio-postgres knows only some of
/// their values): the appliance applies them itself.
#[derive(Debug, PartialEq, Eq)]
pub struct SplitUrl {
    /// The URL (or key=value string) without `sslmode` and `sslrootcert`.
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Where libpq looks for the server's socket when a URL names no host (Debian's build).
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Splits `sslmode` and `sslrootcert` out of a `postgres://` URL or a libpq key=value string;
/// a URL without a host gets its socket directory as the host, as libpq reads it.
pub fn split_tls_params(url: &str) -> Result<SplitUrl, String> {
    let (mut sslmode, mut sslrootcert) = (None, None);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        let no_host = parsed.host_str().is_none_or(str::is_empty);
        let mut kept = Vec::new();
        let (mut socket_dirs, mut socket_port) = (None, None);
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "sslmode" => sslmode = Some(value.into_owned()),
                "sslrootcert" => sslrootcert = Some(value.into_owned()),
                "host" if no_host => socket_dirs = Some(value.into_owned()),
                "port" if no_host => socket_port = Some(value.into_owned()),
                _ => kept.push((key.into_owned(), value.into_owned())),
            }
        }
        if no_host {
            // libpq's `postgresql:///db` and `postgresql:///db?host=/run/postgresql`: the host
            // is a socket directory, which tokio-postgres takes only in the URL's host part.
            let dirs = socket_dirs.unwrap_or_else(|| DEFAULT_SOCKET_DIR.to_owned());
            parsed
                .set_host(Some(&dirs.replace('/', "%2F")))
                .map_err(|e| format!("host {dirs:?}: {e}"))?;
            // With the host in the URL, so must the port be: tokio-postgres counts a `port`
            // parameter as a second one.
            if let Some(port) = socket_port {
                let port = port
                    .parse()
                    .map_err(|_| format!("port {port:?} is no port"))?;
                parsed
                    .set_port(Some(port))
                    .map_err(|()| format!("port {port} cannot be set"))?;
            }
        }
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        return Ok(SplitUrl {
            rest: parsed.to_string(),
            sslmode,
            sslrootcert,
        });
    }
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        if let Some(mode) = word.strip_prefix("sslmode=") {
            sslmode = Some(mode.trim_matches('\'').to_owned());
        } else if let Some(root) = word.strip_prefix("sslrootcert=") {
            sslrootcert = Some(root.trim_matches('\'').to_owned());
        } else {
            kept.push(word);
        }
    }
    Ok(SplitUrl {
        rest: kept.join(" "),
        sslmode,
        sslrootcert,
    })
}

/// Resolves `SINKS` against the databases configured. Unset, it is `sqlite`, followed by
/// `postgres` when `DATABASE_URL` is set and `clickhouse` when `CLICKHOUSE_HOST` is.
pub(super) fn resolve(
    sinks: Option<&str>,
    database_url: Option<&str>,
    clickhouse: Option<ClickHouseSettings>,
) -> Result<SinkSettings, ConfigError> {
    let refuse = |allowed: String| ConfigError {
        name: "SINKS",
        value: sinks.unwrap_or_default().to_owned(),
        allowed,
    };
    if let Some(url) = database_url {
        let refuse = |e: String| ConfigError {
            name: "DATABASE_URL",
            value: crate::config::redact_url(url),
            allowed: format!("a Postgres connection URL: {e}"),
        };
        let split = split_tls_params(url).map_err(refuse)?;
        if let Some(mode) = &split.sslmode {
            if !SSL_MODES.contains(&mode.as_str()) {
                return Err(refuse(format!(
                    "sslmode={mode} is not one of {}",
                    SSL_MODES.join(", ")
                )));
            }
        }
        tokio_postgres::Config::from_str(&split.rest).map_err(|e| refuse(e.to_string()))?;
    }
    let kinds = match sinks {
        None => {
            let mut kinds = vec![SinkKind::Sqlite];
            if database_url.is_some() {
                kinds.push(SinkKind::Postgres);
            }
            if clickhouse.is_some() {
                kinds.push(SinkKind::ClickHouse);
            }
            kinds
        }
        Some(list) => {
            let mut chosen: Vec<SinkKind> = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let kind = match name.to_ascii_lowercase().as_str() {
                    "sqlite" => SinkKind::Sqlite,
                    "postgres" | "postgresql" => SinkKind::Postgres,
                    "clickhouse" => SinkKind::ClickHouse,
                    _ => return Err(refuse(EXPECTED.into())),
                };
                if !chosen.contains(&kind) {
                    chosen.push(kind);
                }
            }
            if chosen.is_empty() {
                return Err(refuse(EXPECTED.into()));
            }
            chosen
        }
    };
    if kinds.contains(&SinkKind::Postgres) && database_url.is_none() {
        return Err(refuse(
            "postgres needs DATABASE_URL (the database to write to)".into(),
        ));
    }
    if kinds.first() == Some(&SinkKind::ClickHouse) {
        return Err(refuse(
            "clickhouse can only follow: list sqlite or postgres first (SINKS=sqlite,clickhouse); \
             ClickHouse cannot say which rows a write inserted, which after-write deliveries need"
                .into(),
        ));
    }
    Ok(SinkSettings {
        kinds,
        postgres_url: database_url.map(str::to_owned),
        clickhouse: clickhouse.unwrap_or_else(|| ClickHouseSettings::new("localhost", None, false)),
        node: None,
        shared_persons: false,
    })
}

const EXPECTED: &str = "expected sqlite, postgres and/or clickhouse, comma-separated";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_leads_unless_sinks_says_otherwise() {
        use SinkKind::*;
        assert_eq!(resolve(None, None, None).unwrap().kinds, [Sqlite]);
        let both = resolve(None, Some("postgres://u:p@db/x"), None).unwrap();
        assert_eq!(both.kinds, [Sqlite, Postgres]);
        let ch = ClickHouseSettings::new("ch", None, false);
        let all = resolve(None, Some("postgres://u:p@db/x"), Some(ch.clone())).unwrap();
        assert_eq!(all.kinds, [Sqlite, Postgres, ClickHouse]);
        assert_eq!(all.clickhouse.url, "http://ch:8123");
        let pg = resolve(Some("postgres"), Some("postgres://db/x"), None).unwrap();
        assert_eq!(pg.kinds, [Postgres]);
        let order = resolve(
            Some("postgres, sqlite,postgres"),
            Some("postgres://db/x"),
            None,
        )
        .unwrap();
        assert_eq!(order.kinds, [Postgres, Sqlite]);
        let secure = ClickHouseSettings::new("::1", None, true);
        assert_eq!(secure.url, "https://[::1]:8443");
    }

    #[test]
    fn refusals_say_why() {
        let err = resolve(Some("postgres"), None, None).unwrap_err();
        assert!(err.allowed.contains("DATABASE_URL"), "{err}");
        let err = resolve(Some("clickhouse,sqlite"), None, None).unwrap_err();
        assert!(err.allowed.contains("can only follow"), "{err}");
        let err = resolve(Some("mongo"), None, None).unwrap_err();
        assert_eq!(err.name, "SINKS");
        let err = resolve(Some(" , "), None, None).unwrap_err();
        assert_eq!(err.name, "SINKS");
        let split = split_tls_params(
            "postgres://u:p@db/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a",
        )
        .unwrap();
        assert_eq!(split.rest, "postgres://u:p@db/x?application_name=a");
        assert_eq!(split.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(split.sslrootcert.as_deref(), Some("/ca.pem"));
        let split = split_tls_params("host=db sslmode=require dbname=x").unwrap();
        assert_eq!(
            (split.rest.as_str(), split.sslmode.as_deref()),
            ("host=db dbname=x", Some("require"))
        );
        assert!(resolve(None, Some("postgres://db/x?sslmode=verify-full"), None).is_ok());
        for (url, host) in [
            (
                "postgresql:///x",
                "postgresql://%2Fvar%2Frun%2Fpostgresql/x",
            ),
            (
                "postgres:///x?user=u&host=/tmp&port=5433",
                "postgres://%2Ftmp:5433/x?user=u",
            ),
            (
                "postgres:///x?host=/tmp&sslmode=disable",
                "postgres://%2Ftmp/x",
            ),
        ] {
            assert_eq!(split_tls_params(url).unwrap().rest, host, "{url}");
            assert!(resolve(None, Some(url), None).is_ok(), "{url}");
        }
        let err = resolve(
            None,
            Some("postgres://u:secret@db/x?sslmode=sometimes"),
            None,
        )
        .unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
