//! Which sink the events go to: `SINKS`, or what the configured databases imply.

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

/// The chosen sink and what it connects to.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub kind: SinkKind,
    /// `DATABASE_URL` when it was set (it has a default for the seed's sake, which is never
    /// used to connect).
    pub postgres_url: Option<String>,
}

/// Resolves `SINKS` against the databases configured. Unset, it is `postgres` when
/// `DATABASE_URL` is set, else `sqlite`.
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
    let kind = match sinks {
        None => match database_url {
            Some(_) => SinkKind::Postgres,
            None => SinkKind::Sqlite,
        },
        Some(list) => {
            let mut chosen: Vec<SinkKind> = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let kind = match name.to_ascii_lowercase().as_str() {
                    "sqlite" => SinkKind::Sqlite,
                    "postgres" | "postgresql" => SinkKind::Postgres,
                    "clickhouse" => {
                        return Err(refuse("the ClickHouse sink is not built yet".into()))
                    }
                    _ => return Err(refuse("expected sqlite or postgres".into())),
                };
                if !chosen.contains(&kind) {
                    chosen.push(kind);
                }
            }
            match chosen.as_slice() {
                [] => return Err(refuse("expected sqlite or postgres".into())),
                [one] => *one,
                _ => {
                    return Err(refuse(
                        "one sink at a time: writing to several at once is not built yet".into(),
                    ))
                }
            }
        }
    };
    if kind == SinkKind::Postgres && database_url.is_none() {
        return Err(refuse(
            "postgres needs DATABASE_URL (the database to write to)".into(),
        ));
    }
    Ok(SinkSettings {
        kind,
        postgres_url: database_url.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_unless_a_database_is_given() {
        assert_eq!(resolve(None, None).unwrap().kind, SinkKind::Sqlite);
        let pg = resolve(None, Some("postgres://u:p@db/x")).unwrap();
        assert_eq!(pg.kind, SinkKind::Postgres);
        let both = resolve(Some("sqlite"), Some("postgres://db/x")).unwrap();
        assert_eq!(both.kind, SinkKind::Sqlite);
    }

    #[test]
    fn refusals_say_why() {
        let err = resolve(Some("postgres"), None).unwrap_err();
        assert!(err.allowed.contains("DATABASE_URL"), "{err}");
        let err = resolve(Some("sqlite,postgres"), Some("postgres://db/x")).unwrap_err();
        assert!(err.allowed.contains("one sink at a time"), "{err}");
        let err = resolve(Some("mongo"), None).unwrap_err();
        assert_eq!(err.name, "SINKS");
        let err = resolve(None, Some("postgres://u:secret@db/x?sslmode=sometimes")).unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
