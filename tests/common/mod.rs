//! Test helpers: real backends and a real balancer on 127.0.0.1 ephemeral ports.
#![allow(dead_code)]

use rustix::process::Signal;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bascule::Server;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What a test backend saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
}

/// A backend server on its own thread and runtime. Dropping it stops it.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    /// How `/healthz` answers: `HEALTH_OK`, `HEALTH_FAIL` (500) or `HEALTH_FLAP` (alternating).
    pub health: Arc<AtomicUsize>,
    /// Answer 500 to every request but `/healthz`.
    pub fail_all: Arc<std::sync::atomic::AtomicBool>,
    /// Wait this many milliseconds before answering any request but `/healthz`.
    pub delay_ms: Arc<AtomicUsize>,
    /// `/healthz` requests answered.
    pub probes: Arc<AtomicUsize>,
    /// Requests being answered now (`/healthz` aside), and the most at once.
    pub busy: Arc<AtomicUsize>,
    pub busy_peak: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Counts a backend connection as open until dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Counted(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TestBackend {
    /// Answers:
    /// - `/slow?ms=N`: waits N ms, then replies
    /// - `/big?bytes=N`: streams N bytes of `x` in 64 KiB chunks
    /// - `/upload`: reads the whole body and replies with its length
    /// - `/status/N`: replies with status N
    /// - with `Upgrade: echo`: switches protocols and echoes bytes back
    /// - anything else: `<name>` as the body, with `X-Backend: <name>` and
    ///   `Connection: X-Private` + `X-Private: 1` + `Keep-Alive: timeout=5` to be stripped
    pub fn start(name: &str) -> TestBackend {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts on a given address, such as the one a stopped backend had.
    pub fn start_at(name: &str, addr: SocketAddr) -> TestBackend {
        Self::spawn(name, addr, None)
    }

    /// The same backend behind TLS.
    pub fn start_tls(name: &str, tls: tokio_rustls::TlsAcceptor) -> TestBackend {
        Self::spawn(name, "127.0.0.1:0".parse().unwrap(), Some(tls))
    }

    fn spawn(name: &str, addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> TestBackend {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(AtomicUsize::new(HEALTH_OK));
        let fail_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let busy_peak = Arc::new(AtomicUsize::new(0));
        let behaviour = Behaviour {
            health: health.clone(),
            fail_all: fail_all.clone(),
            delay_ms: delay_ms.clone(),
            probes: probes.clone(),
            busy: busy.clone(),
            busy_peak: busy_peak.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (name2, seen2, conns2) = (name.to_string(), seen.clone(), connections.clone());
        let open = Arc::new(AtomicUsize::new(0));
        let open2 = open.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        conns2.fetch_add(1, Ordering::SeqCst);
                        let (name, seen, behaviour) =
                            (name2.clone(), seen2.clone(), behaviour.clone());
                        let tls = tls.clone();
                        let open = Counted::count(&open2);
                        tokio::spawn(async move {
                            let _open = open;
                            let svc = service_fn(move |req| {
                                answer(name.clone(), seen.clone(), behaviour.clone(), req)
                            });
                            let builder = auto::Builder::new(TokioExecutor::new());
                            match tls {
                                None => {
                                    let io = TokioIo::new(stream);
                                    let _ = builder.serve_connection_with_upgrades(io, svc).await;
                                }
                                Some(tls) => {
                                    let Ok(stream) = tls.accept(stream).await else {
                                        return;
                                    };
                                    let io = TokioIo::new(stream);
                                    let _ = builder.serve_connection_with_upgrades(io, svc).await;
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        TestBackend {
            addr,
            name: name.to_string(),
            seen,
            connections,
            open,
            health,
            fail_all,
            delay_ms,
            probes,
            busy,
            busy_peak,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

pub const HEALTH_OK: usize = 0;
pub const HEALTH_FAIL: usize = 1;
pub const HEALTH_FLAP: usize = 2;

#[derive(Clone)]
struct Behaviour {
    health: Arc<AtomicUsize>,
    fail_all: Arc<std::sync::atomic::AtomicBool>,
    delay_ms: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
    busy_peak: Arc<AtomicUsize>,
}

async fn answer(
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Behaviour,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/healthz" {
        let n = behaviour.probes.fetch_add(1, Ordering::SeqCst);
        let ok = match behaviour.health.load(Ordering::SeqCst) {
            HEALTH_OK => true,
            HEALTH_FAIL => false,
            _ => n.is_multiple_of(2),
        };
        let mut resp = Response::new(full(if ok { "ok" } else { "failing" }));
        if !ok {
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        return Ok(resp);
    }
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let now = behaviour.busy.fetch_add(1, Ordering::SeqCst) + 1;
    behaviour.busy_peak.fetch_max(now, Ordering::SeqCst);
    let _busy = Counted(behaviour.busy.clone());
    let delay = behaviour.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    if behaviour.fail_all.load(Ordering::SeqCst) {
        let mut resp = Response::new(full(format!("{name} fails")));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(resp);
    }
    let path = req.uri().path().to_string();
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
    }
    if path == "/big" {
        let total = query(&req, "bytes").unwrap_or(1 << 20);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_stream(total, chunk);
        return Ok(Response::new(stream));
    }
    if path == "/setcookie" {
        let resp = Response::builder()
            .header("set-cookie", "app=1; Path=/")
            .body(full(name.clone()))
            .unwrap();
        return Ok(resp);
    }
    if path == "/upload" {
        let mut n = 0u64;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(n.to_string())));
    }
    if let Some(code) = path
        .split("/status/")
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        let mut resp = Response::new(full(format!("{name} says {code}")));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap();
        return Ok(resp);
    }
    let resp = Response::builder()
        .header("x-backend", &name)
        .header("connection", "X-Private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=5")
        .body(full(name.clone()))
        .unwrap();
    Ok(resp)
}

/// A body of `total` bytes, sent in `chunk`-sized frames as the reader asks for them.
fn futures_stream(total: u64, chunk: Bytes) -> Body {
    Repeat { left: total, chunk }.boxed()
}

struct Repeat {
    left: u64,
    chunk: Bytes,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.slice(..n)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// The balancer, started in-process from YAML text. Dropping it shuts it down.
pub struct Balancer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Balancer {
    pub fn start(yaml: &str) -> Balancer {
        Balancer::start_with(yaml, bascule::stack::Layers::default())
    }

    /// As `start`, with a program's own layers on its routes.
    pub fn start_with(yaml: &str, layers: bascule::stack::Layers) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bascule.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = bascule::config::load(&path)
            .unwrap_or_else(|e| panic!("bad test config:\n{e}\n{yaml}"));
        let server = Server::start_with(config, layers).unwrap();
        let addr = server.listener_addrs()[0];
        Balancer {
            server: Some(server),
            addr,
            _dir: dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn admin(&self) -> SocketAddr {
        self.server().admin_addr().unwrap()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.wait();
        }
    }
}

/// An HTTP/2 client connection on `io`, with its connection task spawned.
pub async fn h2_client<I>(
    io: I,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A YAML upstream backend list for these test backends.
pub fn backend_list(backends: &[&TestBackend]) -> String {
    backends
        .iter()
        .map(|b| format!("      - {}\n", b.addr))
        .collect()
}

/// One listener on a free port routing everything to upstream `app`.
pub fn simple_config(backends: &[&TestBackend]) -> String {
    format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends:\n{}admin:\n  bind: 127.0.0.1:0\nworkers: 2\n",
        backend_list(backends)
    )
}

/// A reply as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the reply (the
/// request carries `Connection: close`). `extra` are raw header lines.
pub fn http1(addr: SocketAddr, method: &str, path: &str, extra: &[&str]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    http1(addr, "GET", path, &[])
}

/// Sends raw bytes on a fresh connection and reads until the server closes it.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// Parses a raw HTTP/1.1 reply (Content-Length, chunked or read-to-close bodies).
pub fn parse_reply(raw: &[u8]) -> Reply {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(raw).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("incomplete reply: {:?}", String::from_utf8_lossy(raw)),
    };
    let mut map = HeaderMap::new();
    for h in resp.headers.iter() {
        map.append(
            http::header::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
            http::HeaderValue::from_bytes(h.value).unwrap(),
        );
    }
    let rest = &raw[n..];
    let body = if map.get("transfer-encoding").is_some_and(|v| v == "chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status: resp.code.unwrap(),
        headers: map,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// Reads one reply with a Content-Length body from a connection that stays
/// open; bytes that follow it (pipelined replies) stay in `buf` for the next.
pub fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Reply> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_reply(&buf[..end + 4]);
            let len: usize = head
                .headers
                .get("content-length")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return Ok(Reply { body, ..head });
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Polls `cond` every few milliseconds until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Counts how many replies came from each backend, by the body they answer with.
pub fn tally(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(get(addr, "/").body).or_insert(0) += 1;
    }
    counts
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bascule"))
}

/// The real `bascule` binary running a config file; killed on drop if still running.
pub struct Process {
    pub child: std::process::Child,
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config: PathBuf,
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts the binary and waits until it logs its bound addresses.
    pub fn start(yaml: &str) -> Process {
        Process::start_command(yaml, |config| {
            let mut command = std::process::Command::new(bin());
            command.arg("--config").arg(config);
            command
        })
    }

    /// As `start`, running the command `command` makes for the config file's path.
    pub fn start_command(
        yaml: &str,
        command: impl FnOnce(&std::path::Path) -> std::process::Command,
    ) -> Process {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bascule.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut child = command(&config)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let listeners = yaml.matches("  - bind:").count();
        let wants_admin = yaml.contains("admin:");
        let (mut addrs, mut admin) = (Vec::new(), None);
        while addrs.len() < listeners || (wants_admin && admin.is_none()) {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("bascule did not start:\n{}", log.lock().unwrap()));
            if let Some(rest) = line.split("admin listening on ").nth(1) {
                admin = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            } else if let Some(rest) = line.split("listening on ").nth(1) {
                addrs.push(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
        Process {
            child,
            addrs,
            admin,
            config,
            log,
            _dir: dir,
        }
    }

    pub fn signal(&self, sig: Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig).unwrap();
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < limit,
                "bascule did not exit:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SIGHUP: Signal = Signal::HUP;
pub const SIGINT: Signal = Signal::INT;
pub const SIGTERM: Signal = Signal::TERM;
pub const SIGUSR1: Signal = Signal::USR1;

/// A persistent HTTP/1.1 client connection, for load that reuses connections.
pub struct KeepAlive {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> Self {
        KeepAlive { addr, stream: None }
    }

    /// One GET; the reply's status and body, or an error (the connection is then dropped).
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        let result = self.exchange(path);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn exchange(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().unwrap();
        // One write: a request split over several would meet Nagle's algorithm.
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
        let reply = read_reply(s, &mut Vec::new())?;
        Ok((reply.status, reply.body))
    }
}

/// The JSON of `GET /status`.
pub fn status_json(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status").body).unwrap()
}

/// Whether `/status` shows the backend at `addr` of upstream `app` as healthy.
pub fn shown_healthy(admin: SocketAddr, addr: SocketAddr) -> bool {
    shown_healthy_in(admin, "app", addr)
}

/// Whether `/status` shows the backend at `addr` of `upstream` as healthy.
pub fn shown_healthy_in(admin: SocketAddr, upstream: &str, addr: SocketAddr) -> bool {
    let v = status_json(admin);
    v["upstreams"][upstream]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .map(|b| b["healthy"] == true)
        .unwrap()
}

/// Downloads `/big?bytes=N` on a fresh connection; the bytes read, head included.
pub fn download(addr: SocketAddr, bytes: u64) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        format!("GET /big?bytes={bytes} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Client threads sending GET / until stopped, counting requests and failures
/// (anything but a 200). `fresh` of them open a new connection per request; the
/// others keep theirs.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Requests each client has started.
    sent: Arc<Vec<AtomicUsize>>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = keep_alive + fresh;
        let sent = Arc::new(
            (0..clients)
                .map(|_| AtomicUsize::new(0))
                .collect::<Vec<_>>(),
        );
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..clients)
            .map(|i| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut keep = KeepAlive::new(addr);
                    while !stop.load(Ordering::Relaxed) {
                        sent[i].fetch_add(1, Ordering::SeqCst);
                        let status = if i < keep_alive {
                            keep.get("/").map_or(0, |(status, _)| status)
                        } else {
                            get(addr, "/").status
                        };
                        if status != 200 {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("failed with status {status}");
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            threads,
        }
    }

    pub fn sent(&self) -> usize {
        self.sent.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// Waits until every client has started a request after this call, so
    /// each request in flight at the call has had its answer.
    pub fn wait_for_in_flight(&self, what: &str) {
        let marks: Vec<usize> = self.sent.iter().map(|n| n.load(Ordering::SeqCst)).collect();
        wait_until(Duration::from_secs(20), what, || {
            self.sent
                .iter()
                .zip(&marks)
                .all(|(n, &mark)| n.load(Ordering::SeqCst) > mark)
        });
    }

    /// Waits until `n` more requests have been sent.
    pub fn wait_for(&self, n: usize, what: &str) {
        let target = self.sent() + n;
        wait_until(Duration::from_secs(20), what, || self.sent() >= target);
    }

    /// Stops the clients; (requests sent, requests failed).
    pub fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        (self.sent(), self.failed.load(Ordering::Relaxed))
    }
}

impl Drop for Load {
    /// A test that fails midway leaves no clients running against a stopped balancer.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The share of sample keys (in percent) a reload preview says would move in upstream `app`.
pub fn preview_share<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<f64> {
    lines.into_iter().find_map(|l| {
        l.strip_prefix("~ upstream app: ")?
            .split('%')
            .next()?
            .parse()
            .ok()
    })
}

/// A redis-server on a free port, without persistence; stopped on drop.
pub struct Redis {
    child: std::process::Child,
    pub port: u16,
}

impl Redis {
    /// None when redis-server is not installed (and this is not CI).
    pub fn start() -> Option<Redis> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is missing under CI: .ci/run installs it"
            );
            // Straight to the process's stderr: the test runner captures
            // `eprintln!`, and a skip must show where a person looks.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n*** SKIPPED: a Redis test, redis-server is not installed (apt-get install -y redis-server) ***\n",
            );
            return None;
        }
        Some(Self::start_on(free_port()))
    }

    pub fn start_on(port: u16) -> Redis {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let redis = Redis { child, port };
        wait_until(Duration::from_secs(10), "redis-server to answer", || {
            redis.ping()
        });
        redis
    }

    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
