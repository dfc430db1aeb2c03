//! TLS termination through the real server: SNI, the default certificate, ALPN,
//! X-Forwarded-Proto and Secure cookies, and certificate errors.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Writes a self-signed certificate for `names` and its key; returns the cert's DER.
fn make_cert(dir: &Path, file: &str, names: &[&str]) -> Vec<u8> {
    let made =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), made.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{file}.key")),
        made.signing_key.serialize_pem(),
    )
    .unwrap();
    made.cert.der().to_vec()
}

/// Accepts any certificate: the tests look at which one was presented.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(client_config(alpn)))
}

fn client_config(alpn: &[&[u8]]) -> rustls::ClientConfig {
    client_config_for(alpn, rustls::DEFAULT_VERSIONS)
}

fn client_config_for(
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A client's session store that counts the TLS 1.3 tickets servers give it.
#[derive(Debug)]
struct CountingTickets {
    store: rustls::client::ClientSessionMemoryCache,
    given: AtomicUsize,
}

impl Default for CountingTickets {
    fn default() -> Self {
        CountingTickets {
            store: rustls::client::ClientSessionMemoryCache::new(16),
            given: AtomicUsize::new(0),
        }
    }
}

impl rustls::client::ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.store.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.store.kx_hint(name)
    }
    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.store.set_tls12_session(name, value)
    }
    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.store.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.store.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.given.fetch_add(1, Ordering::SeqCst);
        self.store.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.store.take_tls13_ticket(name)
    }
}

/// Connects with `sni` (an IP address sends none); the certificate presented and the ALPN chosen.
async fn handshake(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> (
    Vec<u8>,
    Option<Vec<u8>>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = client(alpn).connect(name, tcp).await.unwrap();
    let (_, conn) = tls.get_ref();
    let cert = conn.peer_certificates().unwrap()[0].to_vec();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    (cert, alpn, tls)
}

struct Setup {
    _dir: tempfile::TempDir,
    default: Vec<u8>,
    api: Vec<u8>,
    wild: Vec<u8>,
}

/// The test certificates, and a config serving `b` on a TLS listener with them.
fn tls_config(b: &TestBackend) -> (Setup, String) {
    let dir = tempfile::tempdir().unwrap();
    let default = make_cert(dir.path(), "default", &["default.example.test"]);
    let api = make_cert(dir.path(), "api", &["api.example.test"]);
    let wild = make_cert(dir.path(), "wild", &["*.apps.example.test"]);
    let tls = format!(
        "    tls:\n      certificates:\n        - {{ cert: {d}/default.pem, key: {d}/default.key }}\n        - {{ cert: {d}/api.pem, key: {d}/api.key }}\n        - {{ cert: {d}/wild.pem, key: {d}/wild.key }}\n",
        d = dir.path().display()
    );
    let yaml = simple_config(&[b]).replace("    routes:", &format!("{tls}    routes:"));
    (
        Setup {
            _dir: dir,
            default,
            api,
            wild,
        },
        yaml,
    )
}

/// `Balancer::start`, which blocks until it listens, off the async runtime.
async fn start(yaml: &str) -> Balancer {
    let yaml = yaml.to_string();
    tokio::task::spawn_blocking(move || Balancer::start(&yaml))
        .await
        .unwrap()
}

/// Stops the balancer (a blocking wait) off the async runtime.
async fn stop(lb: Balancer) {
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_unknown_names_get_the_first() {
    let b = TestBackend::start("a");
    let (certs, yaml) = tls_config(&b);
    let lb = start(&yaml).await;
    assert_eq!(
        handshake(lb.addr, "api.example.test", &[]).await.0,
        certs.api
    );
    assert_eq!(
        handshake(lb.addr, "x.apps.example.test", &[]).await.0,
        certs.wild
    );
    assert_eq!(
        handshake(lb.addr, "a.b.apps.example.test", &[]).await.0,
        certs.default
    );
    assert_eq!(
        handshake(lb.addr, "unknown.example.test", &[]).await.0,
        certs.default
    );
    assert_eq!(handshake(lb.addr, "127.0.0.1", &[]).await.0, certs.default);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_and_http1_over_tls_reach_the_backend_as_https() {
    use http_body_util::BodyExt;
    let b = TestBackend::start("a");
    let (_certs, yaml) = tls_config(&b);
    let yaml = yaml.replace(
        "    backends:\n",
        "    sticky: { secret: s }\n    backends:\n",
    );
    let lb = start(&yaml).await;

    let (_, alpn, stream) = handshake(lb.addr, "api.example.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let mut send = h2_client(stream).await;
    let req = http::Request::get("https://api.example.test/x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"a"
    );
    let seen = b.requests().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], "api.example.test");

    let (_, alpn, stream) = handshake(lb.addr, "api.example.test", &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(stream, "api.example.test", "/y").await, 200);
    stop(lb).await;
}

#[test]
fn a_bad_key_or_missing_certificate_is_a_config_error_with_its_path() {
    let b = TestBackend::start("a");
    let (certs, yaml) = tls_config(&b);
    let dir = certs._dir.path();
    std::fs::write(
        dir.join("api.key"),
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = bascule::config::decode(&yaml, dir).unwrap_err();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].path.ends_with("tls.certificates[1]"), "{err:?}");
    assert!(err[0].message.contains("api.key"), "{err:?}");
    let missing = yaml.replace("wild.pem", "nowhere.pem");
    let err = bascule::config::decode(&missing, dir).unwrap_err();
    assert!(
        err.iter().any(|p| p.message.contains("nowhere.pem")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_certificate_and_keeps_open_connections() {
    use http_body_util::BodyExt;
    let b = TestBackend::start("a");
    let (certs, yaml) = tls_config(&b);
    let dir = certs._dir.path().to_path_buf();
    let lb = start(&yaml).await;
    let (cert, _, open) = handshake(lb.addr, "api.example.test", &[b"http/1.1"]).await;
    assert_eq!(cert, certs.api);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(open))
            .await
            .unwrap();
    tokio::spawn(conn);

    // New files for api.example.test, then a reload.
    let renewed = make_cert(&dir, "api2", &["api.example.test"]);
    let swapped = yaml
        .replace("api.pem", "api2.pem")
        .replace("api.key", "api2.key");
    let config = bascule::config::decode(&swapped, &dir).unwrap();
    lb.server().reload(config).unwrap();

    assert_eq!(handshake(lb.addr, "api.example.test", &[]).await.0, renewed);
    // The connection opened before the reload still serves requests.
    for _ in 0..3 {
        let req = http::Request::get("/")
            .header("host", "api.example.test")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        // HTTP/1.1 takes one request at a time: wait until the previous one is done.
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"a"
        );
    }
    stop(lb).await;
}

#[test]
fn a_redirect_https_listener_sends_clients_to_https() {
    let yaml = "listeners:\n  - bind: 127.0.0.1:0\n    redirect_https: true\nupstreams:\n  app: { backends: [127.0.0.1:1] }\n";
    let lb = Balancer::start(yaml);
    let r = http1(lb.addr, "GET", "/cart?item=3", &[]);
    assert_eq!(r.status, 301);
    // http1() sends Host: 127.0.0.1:PORT; the port is dropped for https's 443.
    assert_eq!(r.headers["location"], "https://127.0.0.1/cart?item=3");
    assert!(r.body.starts_with("301 Moved Permanently"));
}

/// One HTTP/1.1 GET over an open connection; the reply's status.
async fn get_over<S>(stream: S, host: &str, path: &str) -> http::StatusCode
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap().status()
}

/// The TLS version a client offering `versions` agrees with the listener at
/// `addr`, after an exchange that reaches the backend; `None` if the handshake fails.
async fn agreed_version(
    addr: SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Option<rustls::ProtocolVersion> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config_for(&[], versions)));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("default.example.test").unwrap();
    let tls = connector.connect(name, tcp).await.ok()?;
    let version = tls.get_ref().1.protocol_version();
    assert_eq!(get_over(tls, "default.example.test", "/").await, 200);
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_limit_the_tls_versions_a_listener_offers() {
    use rustls::version::{TLS12, TLS13};
    use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
    let b = TestBackend::start("a");
    let (_certs, yaml) = tls_config(&b);

    // By default both: a client that can, gets TLS 1.3.
    let lb = start(&yaml).await;
    assert_eq!(
        agreed_version(lb.addr, &[&TLS13, &TLS12]).await,
        Some(TLSv1_3)
    );
    assert_eq!(agreed_version(lb.addr, &[&TLS12]).await, Some(TLSv1_2));
    stop(lb).await;

    let only = |protocols: &str| {
        yaml.replace(
            "    routes:",
            &format!("      protocols: [{protocols}]\n    routes:"),
        )
    };
    let lb = start(&only("TLSv1.3")).await;
    assert_eq!(
        agreed_version(lb.addr, &[&TLS13, &TLS12]).await,
        Some(TLSv1_3)
    );
    assert_eq!(agreed_version(lb.addr, &[&TLS12]).await, None);
    stop(lb).await;

    let lb = start(&only("TLSv1.2")).await;
    assert_eq!(
        agreed_version(lb.addr, &[&TLS13, &TLS12]).await,
        Some(TLSv1_2)
    );
    assert_eq!(agreed_version(lb.addr, &[&TLS13]).await, None);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_bad_key_keeps_serving_the_old_certificate() {
    let b = TestBackend::start("a");
    let (certs, yaml) = tls_config(&b);
    let dir = certs._dir.path().to_path_buf();
    let lb = start(&yaml).await;
    std::fs::write(
        dir.join("broken.key"),
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let path = dir.join("bascule.yaml");
    std::fs::write(&path, yaml.replace("api.key", "broken.key")).unwrap();
    lb.server().reload_from(&path);

    let admin = lb.admin();
    let status = tokio::task::spawn_blocking(move || status_json(admin))
        .await
        .unwrap();
    assert_eq!(status["last_reload"]["result"], "failure", "{status}");
    let error = status["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("broken.key"), "{error}");
    assert_eq!(
        handshake(lb.addr, "api.example.test", &[]).await.0,
        certs.api
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resume_in_turn_and_across_a_reload_on_one_ticket_per_handshake() {
    use rustls::HandshakeKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBackend::start("a");
    let (certs, yaml) = tls_config(&b);
    let lb = start(&yaml).await;
    // One client configuration, so one client session store, for every connection.
    let tickets = Arc::new(CountingTickets::default());
    let mut config = client_config(&[b"http/1.1"]);
    config.resumption = rustls::client::Resumption::store(tickets.clone());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = |connector: tokio_rustls::TlsConnector| async move {
        let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        let name = ServerName::try_from("api.example.test").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind();
        // A whole exchange, so that the tickets sent after the handshake are read.
        tls.write_all(b"GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await.unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200"));
        kind
    };
    assert_eq!(connect(connector.clone()).await, Some(HandshakeKind::Full));
    // One ticket per handshake, and it is enough to resume one connection after another.
    assert_eq!(tickets.given.load(Ordering::SeqCst), 1);
    assert_eq!(
        connect(connector.clone()).await,
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(tickets.given.load(Ordering::SeqCst), 2);
    let config = bascule::config::decode(&yaml, certs._dir.path()).unwrap();
    lb.server().reload(config).unwrap();
    assert_eq!(
        connect(connector.clone()).await,
        Some(HandshakeKind::Resumed)
    );
    stop(lb).await;
}

/// Reads from `tls` until `n` replies with the test backend's one-byte body have come.
async fn read_replies<S: tokio::io::AsyncRead + Unpin>(tls: &mut S, n: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(5).filter(|w| w == b"\r\n\r\na").count() < n {
        let read = tls.read(&mut buf).await.unwrap();
        assert!(read > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..read]);
    }
    got
}

/// Idle TLS keep-alive connections give hyper's buffers back between requests,
/// as plain ones do (server.rs parks both): 1 000 of them, each after one
/// request, hold the TLS session but not the 20-odd KiB hyper keeps for a
/// connection it serves. Parked, they serve again, pipelined requests included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_keep_alive_connections_hold_no_buffers() {
    use tokio::io::AsyncWriteExt;
    let b = TestBackend::start("a");
    let (_certs, yaml) = tls_config(&b);
    let p = tokio::task::spawn_blocking(move || Process::start(&yaml))
        .await
        .unwrap();
    let addr = p.addrs[0];
    let request = b"GET / HTTP/1.1\r\nHost: default.example.test\r\n\r\n";
    for _ in 0..20 {
        let (_, _, mut tls) = handshake(addr, "default.example.test", &[b"http/1.1"]).await;
        tls.write_all(request).await.unwrap();
        read_replies(&mut tls, 1).await;
    }
    let baseline = p.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let (_, _, mut tls) = handshake(addr, "default.example.test", &[b"http/1.1"]).await;
        tls.write_all(request).await.unwrap();
        assert!(read_replies(&mut tls, 1).await.starts_with(b"HTTP/1.1 200"));
        idle.push(tls);
    }
    // Parking starts a few milliseconds into the idle wait.
    wait_until(
        std::time::Duration::from_secs(10),
        "idle connections to give their buffers back",
        || p.rss_kib().saturating_sub(baseline) / 1000 <= 20,
    );
    let per_conn = p.rss_kib().saturating_sub(baseline) / 1000;
    eprintln!("{per_conn} KiB per idle TLS connection");
    for tls in idle.iter_mut().take(50) {
        let mut two = request.to_vec();
        two.extend_from_slice(request);
        tls.write_all(&two).await.unwrap();
        let got = read_replies(tls, 2).await;
        assert_eq!(got.windows(12).filter(|w| w == b"HTTP/1.1 200").count(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_comes_before_the_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBackend::start("a");
    let (_certs, yaml) = tls_config(&b);
    let yaml = yaml.replace("    tls:\n", "    proxy_protocol: true\n    tls:\n");
    let lb = start(&yaml).await;
    let mut tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 443\r\n")
        .await
        .unwrap();
    let name = ServerName::try_from("api.example.test").unwrap();
    let mut tls = client(&[]).connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
    assert_eq!(b.requests()[0].headers["x-forwarded-for"], "192.0.2.7");
    // Without the header, the handshake gets nowhere.
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let name = ServerName::try_from("api.example.test").unwrap();
    assert!(client(&[]).connect(name, tcp).await.is_err());
    stop(lb).await;
}
