//! TLS to Postgres with libpq's `sslmode` meanings, which tokio-postgres only partly knows:
//! `disable`; `allow` and `prefer` (libpq's default: TLS if the server offers it) and `require`
//! encrypt without checking the certificate (as libpq does without a root certificate);
//! `verify-ca` checks the chain against `sslrootcert` (or the system's roots); `verify-full` also
//! checks that the certificate names the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;

/// What the connection does about TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    Off,
    /// Encrypt when possible (`allow`, `prefer`) or always (`require`), certificate unchecked.
    Unverified {
        required: bool,
    },
    /// Encrypt, and check the certificate against `roots` (the system's when `None`); with
    /// `host`, also that it names the host.
    Verified {
        roots: Option<PathBuf>,
        host: bool,
    },
}

impl TlsPolicy {
    /// The policy of `sslmode` (libpq's `prefer` when absent) with `sslrootcert`.
    pub fn from_params(mode: Option<&str>, root: Option<&str>) -> Result<TlsPolicy, String> {
        let roots = root.map(PathBuf::from);
        Ok(match mode.unwrap_or("prefer") {
            "disable" => TlsPolicy::Off,
            "allow" | "prefer" => TlsPolicy::Unverified { required: false },
            // libpq: with a root certificate, `require` checks the chain as `verify-ca` does.
            "require" if roots.is_some() => TlsPolicy::Verified { roots, host: false },
            "require" => TlsPolicy::Unverified { required: true },
            "verify-ca" => TlsPolicy::Verified { roots, host: false },
            "verify-full" => TlsPolicy::Verified { roots, host: true },
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    /// The mode tokio-postgres negotiates with.
    pub fn ssl_mode(&self) -> SslMode {
        match self {
            TlsPolicy::Off => SslMode::Disable,
            TlsPolicy::Unverified { required: false } => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The connector for this policy.
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self {
            TlsPolicy::Off | TlsPolicy::Unverified { .. } => Arc::new(Unchecked(provider.clone())),
            TlsPolicy::Verified { roots, host } => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots.as_deref())?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                if *host {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// The certificates of `file` (PEM), or the system's roots.
fn root_store(file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system certificate rustls cannot use is skipped, as libpq would not use it.
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no root certificates to check the server's certificate against".into());
    }
    Ok(roots)
}

/// `require` and `prefer`: the session is encrypted, the certificate is not checked (libpq's
/// meaning of those modes); the handshake's signatures still are.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate is not
/// compared with the host.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_mean_what_they_mean_to_libpq() {
        let policy = |mode: Option<&str>, root| TlsPolicy::from_params(mode, root).unwrap();
        assert_eq!(
            policy(None, None),
            TlsPolicy::Unverified { required: false }
        );
        assert_eq!(policy(Some("disable"), None).ssl_mode(), SslMode::Disable);
        assert_eq!(
            policy(Some("require"), None),
            TlsPolicy::Unverified { required: true }
        );
        assert_eq!(
            policy(Some("require"), Some("/ca.pem")),
            TlsPolicy::Verified {
                roots: Some("/ca.pem".into()),
                host: false
            }
        );
        assert_eq!(
            policy(Some("verify-full"), None),
            TlsPolicy::Verified {
                roots: None,
                host: true
            }
        );
        assert_eq!(policy(Some("verify-ca"), None).ssl_mode(), SslMode::Require);
        assert!(TlsPolicy::from_params(Some("sometimes"), None).is_err());
    }
}
