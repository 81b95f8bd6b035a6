//! The pool's certificate authority and the rustls configurations built from it.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::fmt;
use std::sync::Arc;

/// Errors building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed to generate or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM block did not parse.
    #[error("invalid PEM for {what}: {reason}")]
    Pem {
        /// Which item.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind the QUIC endpoint: {0}")]
    Bind(std::io::Error),
}

/// A certificate and its private key, PEM-encoded. The key never appears in `Debug` output.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct CertBundle {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertBundle")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate authority generated for one pool. It lives only in the coordinator's memory.
pub struct PoolCa {
    cert: CertBundle,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for PoolCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCa").finish_non_exhaustive()
    }
}

impl PoolCa {
    /// Generate a fresh CA for `pool_id`.
    pub fn generate(pool_id: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("skyward pool {pool_id} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let bundle = CertBundle { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { cert: bundle, issuer: Issuer::new(params, key) })
    }

    /// The CA certificate (and key; only the certificate is ever sent anywhere).
    pub fn cert(&self) -> &CertBundle {
        &self.cert
    }

    /// Issue the coordinator's server certificate.
    pub fn issue_server(&self) -> Result<CertBundle, TlsError> {
        self.issue(crate::COORDINATOR_SERVER_NAME, &[ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// Issue a worker's certificate for `node_id`: a client certificate towards the coordinator,
    /// and in cluster mode the server certificate other workers check (name
    /// [`crate::worker_server_name`]).
    pub fn issue_worker(&self, node_id: &str) -> Result<CertBundle, TlsError> {
        self.issue(&crate::worker_server_name(node_id), &[ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth])
    }

    fn issue(&self, name: &str, usages: &[ExtendedKeyUsagePurpose]) -> Result<CertBundle, TlsError> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertBundle { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn parse_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem { what, reason: e.to_string() })
}

fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem { what, reason: e.to_string() })
}

fn roots(ca_cert_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(parse_cert(ca_cert_pem, "CA certificate")?).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(roots)
}

/// Server side: present `server`, require a client certificate signed by the CA.
pub(crate) fn server_tls(ca_cert_pem: &str, server: &CertBundle) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots(ca_cert_pem)?)).build().map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![parse_cert(&server.cert_pem, "server certificate")?], parse_key(&server.key_pem, "server key")?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(tls)
}

/// Client side: present `client`, trust only servers signed by the CA.
pub(crate) fn client_tls(ca_cert_pem: &str, client: &CertBundle) -> Result<rustls::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_client_auth_cert(vec![parse_cert(&client.cert_pem, "worker certificate")?], parse_key(&client.key_pem, "worker key")?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(tls)
}
