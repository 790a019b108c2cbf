//! The connection settings and pool of the Postgres sink: the URL as libpq reads it, TLS as its
//! `sslmode` asks (`tls.rs`), and the pool's deadlines.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};

use super::tls::TlsPolicy;
use super::NAME;
use crate::sinks::SinkError;

/// Connections the sink keeps: one writer, and readers for exports and the admin page.
const POOL_SIZE: usize = 4;
/// How long establishing a connection may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may wait for a free connection.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed `DATABASE_URL`.
#[derive(Clone)]
pub struct PostgresTarget {
    config: tokio_postgres::Config,
    tls: TlsPolicy,
    redacted: String,
}

impl std::fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PostgresTarget {
    /// Parses a `postgres://` URL (or libpq key=value string); the error says why it is not one.
    pub fn parse(url: &str) -> Result<PostgresTarget, String> {
        let split = crate::config::split_tls_params(url)?;
        let tls = TlsPolicy::from_params(split.sslmode.as_deref(), split.sslrootcert.as_deref())?;
        let mut config =
            tokio_postgres::Config::from_str(&split.rest).map_err(|e| e.to_string())?;
        config.ssl_mode(tls.ssl_mode());
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("appliance");
        }
        Ok(PostgresTarget {
            config,
            tls,
            redacted: crate::config::redact_url(url),
        })
    }

    /// The URL without its password.
    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }
}

/// A pool that connects on first use, with TLS as `sslmode` asks ([`TlsPolicy`]).
pub fn pool(target: &PostgresTarget) -> Result<Pool, SinkError> {
    let open_error = |detail: String| SinkError::Open {
        sink: NAME,
        target: target.redacted(),
        detail,
    };
    let tls = target.tls.connector().map_err(open_error)?;
    let manager = Manager::from_config(
        target.config.clone(),
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .timeouts(Timeouts {
            wait: Some(WAIT_TIMEOUT),
            create: Some(CONNECT_TIMEOUT),
            recycle: Some(CONNECT_TIMEOUT),
        })
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| open_error(e.to_string()))
}
