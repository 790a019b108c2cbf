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
        tokio_postgres::Config::from_str(url).map_err(|e| ConfigError {
            name: "DATABASE_URL",
            value: crate::config::redact_url(url),
            allowed: format!("a Postgres connection URL: {e}"),
        })?;
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
        let err = resolve(None, Some("postgres://u:secret@db/x?sslmode=sometimes")).unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
