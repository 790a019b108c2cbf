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
}

impl SinkKind {
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Sqlite => "sqlite",
            SinkKind::Postgres => "postgres",
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

/// Splits `sslmode` and `sslrootcert` out of a `postgres://` URL or a libpq key=value string.
pub fn split_tls_params(url: &str) -> Result<SplitUrl, String> {
    let (mut sslmode, mut sslrootcert) = (None, None);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
        let mut kept = Vec::new();
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "sslmode" => sslmode = Some(value.into_owned()),
                "sslrootcert" => sslrootcert = Some(value.into_owned()),
                _ => kept.push((key.into_owned(), value.into_owned())),
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
/// `postgres` when `DATABASE_URL` is set.
pub(super) fn resolve(
    sinks: Option<&str>,
    database_url: Option<&str>,
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
            kinds
        }
        Some(list) => {
            let mut chosen: Vec<SinkKind> = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let kind = match name.to_ascii_lowercase().as_str() {
                    "sqlite" => SinkKind::Sqlite,
                    "postgres" | "postgresql" => SinkKind::Postgres,
                    "clickhouse" => {
                        return Err(refuse("the ClickHouse sink is not built yet".into()))
                    }
                    _ => {
                        return Err(refuse(
                            "expected sqlite and/or postgres, comma-separated".into(),
                        ))
                    }
                };
                if !chosen.contains(&kind) {
                    chosen.push(kind);
                }
            }
            if chosen.is_empty() {
                return Err(refuse(
                    "expected sqlite and/or postgres, comma-separated".into(),
                ));
            }
            chosen
        }
    };
    if kinds.contains(&SinkKind::Postgres) && database_url.is_none() {
        return Err(refuse(
            "postgres needs DATABASE_URL (the database to write to)".into(),
        ));
    }
    Ok(SinkSettings {
        kinds,
        postgres_url: database_url.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_leads_unless_sinks_says_otherwise() {
        use SinkKind::*;
        assert_eq!(resolve(None, None).unwrap().kinds, [Sqlite]);
        let both = resolve(None, Some("postgres://u:p@db/x")).unwrap();
        assert_eq!(both.kinds, [Sqlite, Postgres]);
        let pg = resolve(Some("postgres"), Some("postgres://db/x")).unwrap();
        assert_eq!(pg.kinds, [Postgres]);
        let order = resolve(Some("postgres, sqlite,postgres"), Some("postgres://db/x")).unwrap();
        assert_eq!(order.kinds, [Postgres, Sqlite]);
    }

    #[test]
    fn refusals_say_why() {
        let err = resolve(Some("postgres"), None).unwrap_err();
        assert!(err.allowed.contains("DATABASE_URL"), "{err}");
        let err = resolve(Some("sqlite,clickhouse"), None).unwrap_err();
        assert!(err.allowed.contains("not built yet"), "{err}");
        let err = resolve(Some("mongo"), None).unwrap_err();
        assert_eq!(err.name, "SINKS");
        let err = resolve(Some(" , "), None).unwrap_err();
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
        assert!(resolve(None, Some("postgres://db/x?sslmode=verify-full")).is_ok());
        let err = resolve(None, Some("postgres://u:secret@db/x?sslmode=sometimes")).unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
