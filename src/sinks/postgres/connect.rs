//! The connection settings and pool of the Postgres sink: the URL as libpq reads it, TLS when
//! it asks for it (`sslmode`), and the pool's deadlines.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::config::SslMode;

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
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("appliance");
        }
        Ok(PostgresTarget {
            config,
            redacted: crate::config::redact_url(url),
        })
    }

    /// The URL without its password.
    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }
}

/// A pool that connects on first use, over TLS when `sslmode` is `prefer` (libpq's default)
/// or `require`, verifying the server against the system's roots.
pub(super) fn pool(target: &PostgresTarget) -> Result<Pool, SinkError> {
    let open_error = |detail: String| SinkError::Open {
        sink: NAME,
        target: target.redacted(),
        detail,
    };
    let tls = tls_connector(target.config.get_ssl_mode()).map_err(open_error)?;
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

fn tls_connector(mode: SslMode) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if mode != SslMode::Disable {
        // Unreadable system certificates leave the store empty: a TLS connection then fails
        // with a precise error, while `sslmode=prefer` still falls back to plain text.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}
