//! The connection settings and pool of the Postgres sink: the URL as libpq reads it, TLS as its
//! `sslmode` asks (`tls.rs`), and the pool's deadlines.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::NoTls;

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
        let mut tls =
            TlsPolicy::from_params(split.sslmode.as_deref(), split.sslrootcert.as_deref())?;
        let mut config =
            tokio_postgres::Config::from_str(&split.rest).map_err(|e| e.to_string())?;
        if only_unix_sockets(&config) {
            // libpq ignores `sslmode` on Unix-domain sockets (there is no host name to check,
            // and the kernel carries the bytes); tokio-postgres would try a TLS handshake
            // with the socket's directory as the server name and fail.
            tls = TlsPolicy::Off;
        }
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

/// Whether every host of `config` is a Unix-domain socket directory (`host=/run/postgresql`).
fn only_unix_sockets(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => true,
            _ => false,
        })
}

/// A pool that connects on first use, with TLS as `sslmode` asks ([`TlsPolicy`]).
pub fn pool(target: &PostgresTarget) -> Result<Pool, SinkError> {
    let open_error = |detail: String| SinkError::Open {
        sink: NAME,
        target: target.redacted(),
        detail,
    };
    let config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match target.tls {
        // No connector at all: tokio-postgres asks the connector for the host's name before
        // it looks at the mode, and a socket directory is no name rustls accepts.
        TlsPolicy::Off => Manager::from_config(target.config.clone(), NoTls, config),
        _ => {
            let tls = target.tls.connector().map_err(open_error)?;
            Manager::from_config(target.config.clone(), tls, config)
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_socket_is_never_asked_for_tls() {
        let socket = PostgresTarget::parse("postgres://u@%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(socket.tls, TlsPolicy::Off);
        let required =
            PostgresTarget::parse("host=/tmp port=5433 dbname=x sslmode=require").unwrap();
        assert_eq!(required.tls, TlsPolicy::Off);
        let dir =
            PostgresTarget::parse("postgres://appliance@%2Ftmp%2F.tmpAbC12:5999/events").unwrap();
        assert_eq!(dir.tls, TlsPolicy::Off, "{:?}", dir.config.get_hosts());
        let tcp = PostgresTarget::parse("postgres://u@db.example/db").unwrap();
        assert_eq!(tcp.tls, TlsPolicy::Unverified { required: false });
        let mixed = PostgresTarget::parse("host=/tmp,db.example dbname=x sslmode=require").unwrap();
        assert_eq!(mixed.tls, TlsPolicy::Unverified { required: true });
    }
}
