//! TLS termination with rustls: certificates read from PEM, chosen by SNI.
//!
//! One crypto provider, aws-lc-rs: its X25519, the key exchange nearly every
//! handshake makes, takes half the time of ring's here. A listener's
//! certificates are matched by the names in their subject alternative names:
//! exact names first, then wildcards (`*.example.com` covers one label, as
//! browsers read it). A client that sends no name, or one that no certificate
//! covers, gets the listener's first certificate. ALPN offers h2 and http/1.1.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider, named once for listeners and for TLS to backends alike.
pub(crate) use rustls::crypto::aws_lc_rs as crypto;

/// One certificate of a listener, loaded and ready.
#[derive(Clone)]
pub struct Certificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The DNS names (and wildcards) it covers, lower case.
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert", &self.cert_path)
            .field("names", &self.names)
            .finish()
    }
}

impl PartialEq for Certificate {
    /// The same files with the same contents.
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.key.cert == other.key.cert
    }
}

/// Reads a PEM chain and key; the error names the file and says what is wrong.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Certificate, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("cannot read {}: {e}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "{} is not a PEM certificate chain: {e}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("{} is not a PEM private key: {e}", key_path.display()))?;
    let signing = crypto::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not match {}: {e}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    let end_entity = webpki::EndEntityCert::try_from(&certified.cert[0])
        .map_err(|e| format!("{}: unreadable certificate: {e}", cert_path.display()))?;
    let names = end_entity
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    Ok(Certificate {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        names,
        key: Arc::new(certified),
    })
}

/// Picks a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    certificates: Vec<Certificate>,
}

impl SniResolver {
    fn find(&self, name: &str) -> Option<&Certificate> {
        let name = name.to_ascii_lowercase();
        let exact = self.certificates.iter().find(|c| c.names.contains(&name));
        exact.or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.certificates
                .iter()
                .find(|c| c.names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
        })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|name| self.find(name))
            .or_else(|| self.certificates.first())?;
        Some(chosen.key.clone())
    }
}

/// A TLS version a listener may offer: the versions rustls supports, both by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tls12,
    Tls13,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tls12, Protocol::Tls13];

    /// The name in the config, as NGINX's `ssl_protocols` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tls12 => "TLSv1.2",
            Protocol::Tls13 => "TLSv1.3",
        }
    }

    fn version(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            Protocol::Tls12 => &rustls::version::TLS12,
            Protocol::Tls13 => &rustls::version::TLS13,
        }
    }
}

/// The rustls server configuration for a listener's certificates.
pub fn server_config(
    certificates: &[Certificate],
    protocols: &[Protocol],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut provider = crypto::default_provider();
    // AES-128-GCM with SHA-256 first, and the server's order wins: clients
    // (OpenSSL's among them) list AES-256 with SHA-384 first, whose key schedule
    // costs a handshake about 13% more CPU here for no practical gain in strength.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&protocols.iter().map(|p| p.version()).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            certificates: certificates.to_vec(),
        }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    // Stateless tickets: any number of clients can resume, not only as many as a
    // session cache holds. One ticket key rotator per process, so that a reload
    // (which builds a new configuration) does not force every client back to a
    // full handshake.
    static TICKETER: OnceLock<Result<Arc<dyn ProducesTickets>, String>> = OnceLock::new();
    config.ticketer = TICKETER
        .get_or_init(|| crypto::Ticketer::new().map_err(|e| e.to_string()))
        .clone()?;
    // One ticket per handshake, as Go's TLS server sends (rustls and OpenSSL send two): a
    // client resuming one connection after another gets a fresh ticket each time, and each
    // ticket costs both ends work on every connection. A new connection per request ran at 4
    // to 15% less CPU per handshake here with one.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}
