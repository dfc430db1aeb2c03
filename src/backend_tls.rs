//! TLS to backends: the rustls client side of an upstream's `tls`.
//!
//! Certificates are verified against the system's roots, or against the CA file
//! given instead (a private CA is the common case between a balancer and its
//! replicas). The name checked, and sent as SNI, is `server_name` when given,
//! otherwise each backend's own host (a DNS name, or an IP address checked
//! against the certificate's IP SANs). `insecure_skip_verify` accepts any
//! certificate: for test rigs only, and logged as such at load.
//!
//! Everything that can fail (files, roots) fails when the config is read, so a
//! bad CA file is a config error and never a runtime surprise.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// An upstream's `tls`, read and ready.
#[derive(Clone)]
pub struct BackendTls {
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
    /// Offer h2 by ALPN; a backend that picks it gets HTTP/2. Default true.
    pub http2: bool,
    /// The trusted roots as read, so that a reload notices a changed CA file.
    roots: Vec<CertificateDer<'static>>,
    /// For proxied requests: ALPN h2 (when `http2`) and http/1.1.
    proxy: Arc<ClientConfig>,
    /// For health probes, which speak HTTP/1.1 only.
    probe: Arc<ClientConfig>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("http2", &self.http2)
            .finish()
    }
}

impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.server_name == other.server_name
            && self.insecure_skip_verify == other.insecure_skip_verify
            && self.http2 == other.http2
            && self.roots == other.roots
    }
}

impl BackendTls {
    /// Reads the CA file (or the system roots) and builds the client configurations.
    pub fn new(
        ca: Option<&Path>,
        server_name: Option<String>,
        insecure_skip_verify: bool,
        http2: bool,
    ) -> Result<BackendTls, String> {
        if let Some(name) = &server_name {
            ServerName::try_from(name.as_str())
                .map_err(|_| format!("`{name}` is not a DNS name or IP address"))?;
        }
        let roots = match (ca, insecure_skip_verify) {
            (_, true) => Vec::new(),
            (Some(path), false) => read_ca(path)?,
            (None, false) => system_roots()?,
        };
        let build = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, String> {
            let provider = Arc::new(crate::tls::crypto::default_provider());
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let mut config = if insecure_skip_verify {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                    .with_no_client_auth()
            } else {
                let mut store = RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
                if added == 0 {
                    return Err(match ca {
                        Some(path) => format!("{} holds no usable CA certificate", path.display()),
                        None => "no usable system CA certificates".to_string(),
                    });
                }
                builder.with_root_certificates(store).with_no_client_auth()
            };
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        let proxy = if http2 {
            build(&[b"h2", b"http/1.1"])?
        } else {
            build(&[b"http/1.1"])?
        };
        let probe = build(&[b"http/1.1"])?;
        Ok(BackendTls {
            ca: ca.map(Path::to_path_buf),
            server_name,
            insecure_skip_verify,
            http2,
            roots,
            proxy,
            probe,
        })
    }

    /// The name checked and sent as SNI for the backend at `address` (`host:port`).
    pub fn name_for(&self, address: &str) -> Result<ServerName<'static>, String> {
        let host = self.server_name.as_deref().unwrap_or_else(|| host(address));
        ServerName::try_from(host.to_string()).map_err(|_| {
            format!("`{host}` cannot be checked against a certificate: give tls.server_name")
        })
    }

    /// The connectors for proxied requests and for health probes, with `name`
    /// from `name_for` (checked when the config was read).
    pub fn connectors(&self, name: ServerName<'static>) -> (Connector, Connector) {
        let proxy = Connector {
            config: self.proxy.clone(),
            name: name.clone(),
        };
        let probe = Connector {
            config: self.probe.clone(),
            name,
        };
        (proxy, probe)
    }
}

/// The host part of `host:port`, without IPv6 brackets.
fn host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))
}

fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(String::new, |e| format!(": {e}"));
        return Err(format!(
            "no system CA certificates found{why}; give `ca` (or install ca-certificates)"
        ));
    }
    Ok(found.certs)
}

/// Opens TLS sessions to one backend.
#[derive(Clone, Debug)]
pub struct Connector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Connector {
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
    }
}

/// Whether a session negotiated HTTP/2.
pub fn is_h2(stream: &TlsStream<TcpStream>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Accepts any certificate, still checking that the handshake is signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_an_address() {
        assert_eq!(host("10.0.0.1:8080"), "10.0.0.1");
        assert_eq!(host("app.internal:443"), "app.internal");
        assert_eq!(host("[::1]:8443"), "::1");
    }

    #[test]
    fn a_bad_server_name_or_ca_file_is_refused() {
        let err = BackendTls::new(None, Some("not a name".into()), true, true).unwrap_err();
        assert!(err.contains("not a DNS name"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "nothing here\n").unwrap();
        let err = BackendTls::new(Some(&ca), None, false, true).unwrap_err();
        assert!(err.contains("no usable CA certificate"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = BackendTls::new(Some(&missing), None, false, true).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }
}
