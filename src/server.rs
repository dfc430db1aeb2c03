//! Listeners, worker threads, connection serving and graceful shutdown.
//!
//! Thread per core: each worker runs a single-threaded tokio runtime and accepts
//! on its own `SO_REUSEPORT` socket for every listener, so a connection and all
//! its requests stay on the thread that accepted it, as NGINX workers do. What
//! must be global (the snapshot, round-robin position, in-flight counts, the
//! backend connection pools) is shared through atomics and `Arc`s.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::admin;
use crate::client_io::{Activity, ClientIo};
use crate::config::Config;
use crate::entry::Entry;
use crate::health::HealthChecks;
use crate::http1::{self, serve::ClientStream};
use crate::inherited::Inherited;
use crate::membership::Membership;
use crate::proxy::{self, ConnContext};
use crate::proxy_protocol;
use crate::stack::Layers;
use crate::state::{ListenerRoutes, Snapshot, State};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (listener {name}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot open the access log {}: {source}", path.display())]
    AccessLog {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// A running balancer: its threads, its sockets, and the switch that stops it.
pub struct Server {
    state: Arc<State>,
    shutdown: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    /// One per worker, for listeners that a reload adds or removes.
    commands: Vec<tokio::sync::mpsc::UnboundedSender<WorkerCommand>>,
    /// A new admin socket for the control thread, when a reload moves it.
    admin_tx: tokio::sync::mpsc::UnboundedSender<Option<std::net::TcpListener>>,
    bound: std::sync::Mutex<Bindings>,
    access_log: Option<AccessLogger>,
    /// Sockets from socket activation, for listeners at their addresses.
    inherited: Inherited,
}

/// What is bound now: (configured bind, real address) per listener, and the admin address.
struct Bindings {
    listeners: Vec<(SocketAddr, SocketAddr)>,
    admin: Option<SocketAddr>,
}

/// One listening socket handed to a worker: the configured bind (its key in the
/// snapshot) and the socket itself.
struct Bound {
    key: SocketAddr,
    socket: std::net::TcpListener,
}

/// What a reload asks of a worker.
enum WorkerCommand {
    /// Start accepting on this socket.
    Listen(Bound),
    /// Stop accepting on this listener; its connections finish their requests and close.
    Close(SocketAddr),
}

/// Binds one `SO_REUSEPORT` socket per worker for `bind`, or shares one
/// inherited at that address; also returns the real address, which differs
/// when the port was 0.
fn bind_for_workers(
    bind: SocketAddr,
    workers: usize,
    inherited: &Inherited,
) -> io::Result<(Vec<Bound>, SocketAddr)> {
    if let Some(sockets) = inherited.sockets_for(bind, workers) {
        let sockets = sockets?
            .into_iter()
            .map(|socket| Bound { key: bind, socket });
        return Ok((sockets.collect(), bind));
    }
    let mut addr = bind;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket = bind_reuseport(addr)?;
        // Port 0 asks the kernel for a port; every worker's socket must then share it.
        addr = socket.local_addr()?;
        sockets.push(Bound { key: bind, socket });
    }
    Ok((sockets, addr))
}

impl Server {
    /// Binds every listener and the admin endpoint, then starts the workers.
    /// Nothing is started if any bind fails.
    pub fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with(config, Layers::default())
    }

    /// As `start`, with `layers` added to routes (`stack.rs`), now and on every reload.
    pub fn start_with(config: Config, layers: Layers) -> Result<Server, StartError> {
        Server::start_inheriting(config, layers, Inherited::default())
    }

    /// As `start_with`, using `inherited` sockets (socket activation) for the
    /// listeners bound at their addresses, now and on every reload.
    pub fn start_inheriting(
        config: Config,
        layers: Layers,
        inherited: Inherited,
    ) -> Result<Server, StartError> {
        let workers = config.worker_count();
        let access_log = AccessLogger::start(&config.access_log, config.access_log_format)
            .map_err(|source| StartError::AccessLog {
                path: match &config.access_log {
                    crate::config::AccessLog::File(path) => path.clone(),
                    _ => "stderr".into(),
                },
                source,
            })?;

        let mut per_worker: Vec<Vec<Bound>> = (0..workers).map(|_| Vec::new()).collect();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let (sockets, addr) =
                bind_for_workers(l.bind, workers, &inherited).map_err(|source| {
                    StartError::Bind {
                        name: l.name.clone(),
                        addr: l.bind,
                        source,
                    }
                })?;
            for (worker, socket) in per_worker.iter_mut().zip(sockets) {
                worker.push(socket);
            }
            listeners.push((l.bind, addr));
        }
        let admin_socket =
            match &config.admin {
                Some(a) => Some(std::net::TcpListener::bind(a.bind).map_err(|source| {
                    StartError::Bind {
                        name: "admin".into(),
                        addr: a.bind,
                        source,
                    }
                })?),
                None => None,
            };
        let admin_addr = admin_socket.as_ref().and_then(|s| s.local_addr().ok());

        // Names are looked up before the first request, as far as the resolver answers.
        let file = Arc::new(config);
        let mut membership = Membership::new(file.clone());
        for (upstream, source, targets) in crate::discovery::resolve_new(&file, |_, _| false) {
            membership.set_answer(&upstream, &source, targets);
        }
        let snapshot = Snapshot::build_with(membership.current().clone(), None, layers);
        let state = Arc::new(State::with_membership(snapshot, membership));
        let shutdown = CancellationToken::new();
        let mut threads = Vec::new();
        let mut commands = Vec::new();
        for (i, sockets) in per_worker.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            commands.push(tx);
            let worker = Worker {
                state: state.clone(),
                shutdown: shutdown.clone(),
                access_log: access_log.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || worker.run(i, sockets, rx))
                .map_err(StartError::Thread)?;
            threads.push(handle);
        }
        let (admin_tx, admin_rx) = tokio::sync::mpsc::unbounded_channel();
        if admin_socket.is_some() {
            let _ = admin_tx.send(admin_socket);
        }
        {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            let handle = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control(state, shutdown, admin_rx))
                .map_err(StartError::Thread)?;
            threads.push(handle);
        }
        // Before the lines that say it is listening, which scripts wait for.
        warn_if_admin_open(&state.load().config);
        for (l, (_, addr)) in state.load().config.listeners.iter().zip(&listeners) {
            tracing::info!(listener = %l.name, "listening on {addr}");
        }
        if let Some(addr) = admin_addr {
            tracing::info!("admin listening on {addr}");
        }
        Ok(Server {
            state,
            shutdown,
            threads,
            commands,
            admin_tx,
            bound: std::sync::Mutex::new(Bindings {
                listeners,
                admin: admin_addr,
            }),
            access_log,
            inherited,
        })
    }

    /// The address each listener is bound to, in config order (the real port when the config said 0).
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.listeners.iter().map(|(_, addr)| *addr).collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner()).admin
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Reopens the access log file at its path (after a log rotation moved it).
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
            tracing::info!("access log reopened");
        }
    }

    /// Starts a graceful shutdown: listeners close at once, connections finish
    /// their requests (and tunnels) for up to `shutdown_timeout`.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every thread has stopped (after `shutdown`).
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The control thread: admin endpoints, health checks kept in step with the
/// snapshot, and once-a-second upkeep. Nothing here is on the request path.
fn control(
    state: Arc<State>,
    shutdown: CancellationToken,
    mut admin_sockets: tokio::sync::mpsc::UnboundedReceiver<Option<std::net::TcpListener>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::error!("cannot start the control runtime: {e}"),
    };
    rt.block_on(async move {
        // The admin listener being served; a reload that moves it sends a new socket.
        let mut admin_stop: Option<CancellationToken> = None;
        let mut checks = HealthChecks::default();
        checks.sync(&state.load().upstreams);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let names_changed = Arc::new(Notify::new());
        tokio::spawn(crate::discovery::run(
            state.clone(),
            names_changed.clone(),
            shutdown.clone(),
        ));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = state.changed.notified() => {
                    names_changed.notify_one();
                    let snapshot = state.load();
                    checks.sync(&snapshot.upstreams);
                    // New limits, or new backends, may make room for waiting requests.
                    for upstream in &snapshot.upstreams {
                        upstream.load.dispatch();
                    }
                }
                Some(socket) = admin_sockets.recv() => {
                    if let Some(stop) = admin_stop.take() {
                        stop.cancel();
                    }
                    if let Some(socket) = socket {
                        let stop = shutdown.child_token();
                        tokio::spawn(admin::serve(socket, state.clone(), stop.clone()));
                        admin_stop = Some(stop);
                    }
                }
                _ = tick.tick() => {
                    forget_left(&state);
                    for upstream in &state.load().upstreams {
                        upstream.retry_budget.top_up();
                        // An ejection that ran out makes room for waiting requests
                        // without an event: this catches it.
                        upstream.load.dispatch();
                    }
                    // Histograms are kept in blocks that the exporter folds in on upkeep.
                    crate::metrics::handle().run_upkeep();
                }
            }
        }
    });
}

/// Backends leaving (gone from their name's answer, or removed over the admin
/// API) go once their last request in flight has finished.
fn forget_left(state: &State) {
    let snapshot = state.load_full();
    for upstream in &snapshot.upstreams {
        for (config, backend) in upstream.config.backends.iter().zip(&upstream.backends) {
            if config.leaving && backend.state.active_requests() == 0 {
                state.change_membership(|m| (m.forget(&upstream.config.name, &config.address), ()));
                tracing::info!(upstream = %upstream.config.name, "{} left", config.address);
            }
        }
    }
}

/// Closes this worker's pooled backend connections once they pass their idle timeout.
async fn purge_idle_connections(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for upstream in &state.load().upstreams {
            for backend in &upstream.backends {
                backend.pool.purge_idle();
            }
        }
    }
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit it on Linux: no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    crate::sockopt::defer_accept(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

struct Worker {
    state: Arc<State>,
    shutdown: CancellationToken,
    access_log: Option<AccessLogger>,
}

impl Worker {
    fn run(
        self,
        index: usize,
        sockets: Vec<Bound>,
        mut commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCommand>,
    ) {
        crate::pool::set_worker(index);
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cannot start a worker runtime: {e}");
                self.shutdown.cancel();
                return;
            }
        };
        let worker = Arc::new(self);
        rt.block_on(async move {
            let connections = TaskTracker::new();
            let mut listening: Vec<(SocketAddr, CancellationToken)> = Vec::new();
            for bound in sockets {
                listening.push((bound.key, worker.listen(bound, &connections)));
            }
            tokio::spawn(purge_idle_connections(worker.state.clone()));
            loop {
                tokio::select! {
                    _ = worker.shutdown.cancelled() => break,
                    command = commands.recv() => match command {
                        Some(WorkerCommand::Listen(bound)) => {
                            listening.push((bound.key, worker.listen(bound, &connections)));
                        }
                        Some(WorkerCommand::Close(key)) => listening.retain(|(k, stop)| {
                            if *k == key {
                                stop.cancel();
                            }
                            *k != key
                        }),
                        None => worker.shutdown.cancelled().await,
                    },
                }
            }
            connections.close();
            let grace = worker.state.load().config.shutdown_timeout;
            if tokio::time::timeout(grace, connections.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "shutdown_timeout ({}) passed with {} connections open: closing them",
                    humantime::format_duration(grace),
                    connections.len()
                );
            }
        });
    }

    /// Starts accepting on `bound`; the returned token stops this listener (and
    /// drains its connections) without touching the others. It is a child of the
    /// shutdown token, so a shutdown stops it too.
    fn listen(self: &Arc<Self>, bound: Bound, connections: &TaskTracker) -> CancellationToken {
        let stop = self.shutdown.child_token();
        match TcpListener::from_std(bound.socket) {
            Ok(listener) => {
                let accepting =
                    self.clone()
                        .accept(listener, bound.key, connections.clone(), stop.clone());
                tokio::spawn(accepting);
            }
            Err(e) => tracing::error!("cannot use the socket for {}: {e}", bound.key),
        }
        stop
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        key: SocketAddr,
        connections: TaskTracker,
        stop: CancellationToken,
    ) {
        // The listener's limit, kept across reloads (which change it in place).
        let limit = self
            .state
            .load()
            .listener(key)
            .map(|l| l.connections.clone());
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // At its max_connections, the listener holds the connection
                    // it has just accepted unserved, and accepts no other: the
                    // rest wait in the kernel's backlog. Taking the place after
                    // the accept, not before, keeps an idle worker from holding
                    // one that a busy worker's connection needs.
                    let place = match &limit {
                        Some(limit) if limit.is_limited() => tokio::select! {
                            _ = stop.cancelled() => return,
                            place = limit.acquire() => Some(place),
                        },
                        _ => None,
                    };
                    let at = Accepted {
                        peer,
                        key,
                        tunnels: connections.clone(),
                        stop: stop.clone(),
                        trusted_proxies: None,
                    };
                    match (self.clone().serve(stream, at), place) {
                        (Some(task), None) => {
                            connections.spawn(task);
                        }
                        (Some(task), Some(place)) => {
                            connections.spawn(async move {
                                task.await;
                                drop(place);
                            });
                        }
                        (None, _) => {}
                    }
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!("accept on {key} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The connection's task, chosen synchronously so that the task holds only
    /// the future of the kind of connection it is: an idle connection's memory is
    /// mostly this future, and one async fn over every kind would be as large as
    /// all of them together.
    fn serve(self: Arc<Self>, stream: TcpStream, at: Accepted) -> Option<ConnectionTask> {
        let snapshot = self.state.load();
        // None: the listener was removed by a reload after this connection was accepted.
        let routes = snapshot.listener(at.key)?;
        if routes.config.proxy_protocol {
            return Some(self.serve_proxied(stream, at, routes.config.header_read_timeout));
        }
        self.serve_stream(stream, at, routes)
    }

    /// A connection that starts with a PROXY protocol header: the header is
    /// read in the connection's task, within the time a request head has, and
    /// the client it names is the connection's peer.
    #[inline(never)]
    fn serve_proxied(
        self: Arc<Self>,
        mut stream: TcpStream,
        mut at: Accepted,
        timeout: Duration,
    ) -> ConnectionTask {
        Box::pin(async move {
            match proxy_protocol::read(&mut stream, timeout).await {
                Ok(client) => at.peer = client.unwrap_or(at.peer),
                Err(e) => {
                    // Counted: a sender that does not speak it (an NLB with the
                    // header off) shows here rather than as silence.
                    if let Some(l) = self.state.load().listener(at.key) {
                        crate::metrics::proxy_protocol_refused(&l.config.name, e.reason());
                    }
                    return tracing::debug!(peer = %at.peer, "connection closed: {e}");
                }
            }
            // Read again: a reload may have come while the header did.
            let task = {
                let snapshot = self.state.load();
                let routes = snapshot.listener(at.key);
                routes.and_then(|routes| self.clone().serve_stream(stream, at, routes))
            };
            if let Some(task) = task {
                task.await
            }
        })
    }

    /// As `serve`, past any PROXY protocol header.
    fn serve_stream(
        self: Arc<Self>,
        stream: TcpStream,
        mut at: Accepted,
        routes: &ListenerRoutes,
    ) -> Option<ConnectionTask> {
        let trusted = &routes.config.trusted_proxies;
        if trusted.iter().any(|net| net.contains(&at.peer.ip())) {
            at.trusted_proxies = Some(trusted.clone());
        }
        let limits = Limits::of(&routes.config);
        match (&routes.config.tls, &routes.tls) {
            (None, _) => Some(Box::pin(self.serve_http1(stream, false, at, limits))),
            (Some(tls), Some(acceptor)) => {
                // The handshake runs in the connection's task, never in the accept loop.
                // Boxed, and the stream moved straight on, so that the task does not
                // keep room for the handshake and the stream after they are done.
                let handshake = Box::pin(tokio::time::timeout(
                    tls.handshake_timeout,
                    acceptor.accept(stream),
                ));
                Some(Box::pin(async move {
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            return tracing::debug!(peer = %at.peer, "TLS handshake failed: {e}")
                        }
                        Err(_) => {
                            return tracing::debug!(peer = %at.peer, "TLS handshake timed out")
                        }
                    };
                    self.serve_tls(stream, at, limits).await
                }))
            }
            // A TLS listener whose configuration could not be built serves nothing in clear.
            (Some(_), None) => None,
        }
    }

    /// HTTP/1, plain or over TLS (`http1/serve.rs`). Without TLS, a
    /// connection whose first bytes are HTTP/2's preface (prior knowledge) goes
    /// to `serve_http2`; over TLS, ALPN decided before this, and a client
    /// without ALPN gets HTTP/1.1.
    ///
    /// Not an async fn: an async block keeps its captures in place, where an
    /// async fn would also keep a moved-from copy of every argument, and this
    /// future is most of what an idle connection costs.
    fn serve_http1<S: ClientStream>(
        self: Arc<Self>,
        io: S,
        tls: bool,
        at: Accepted,
        limits: Limits,
    ) -> impl std::future::Future<Output = ()> + Send {
        let activity = Arc::<Activity>::default();
        let entry = self.entry(&at, tls, activity.clone());
        let conn = http1::serve::Connection {
            peer: at.peer,
            tls,
            limits: limits.http1,
            activity,
        };
        let stop = at.stop.clone();
        let http2 = (!tls).then_some(move |io: S, read: Bytes| {
            let io = ClientIo::new(io, Arc::default(), limits.http1.keepalive).with_prefix(read);
            self.serve_http2(io, false, at, limits)
        });
        let refused = |entry: &Entry, status, bytes| entry.refused(status, bytes);
        http1::serve::serve(io, conn, entry, refused, stop, http2)
    }

    /// A TLS connection, its handshake done: HTTP/2 if ALPN chose it, else HTTP/1.1.
    fn serve_tls(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        at: Accepted,
        limits: Limits,
    ) -> ConnectionTask {
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let io = ClientIo::new(stream, Arc::default(), limits.http1.keepalive);
            self.serve_http2(io, true, at, limits)
        } else {
            Box::pin(self.serve_http1(stream, true, at, limits))
        }
    }

    /// HTTP/2, over TLS (ALPN chose it) or with prior knowledge, served by hyper.
    ///
    /// Not an async fn, and the hyper connection is boxed: the connection holds
    /// the socket wrapper (with TLS, over a kilobyte), and an async fn would keep
    /// the wrapper in its arguments as well as in the connection.
    fn serve_http2<S>(
        &self,
        io: ClientIo<S>,
        tls: bool,
        at: Accepted,
        limits: Limits,
    ) -> ConnectionTask
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // The entry's futures are boxed: HTTP/2 spawns every stream's future as a
        // task, moving it several times on the way; a box moves as a pointer.
        let service = TowerToHyperService::new(self.entry(&at, tls, io.activity().clone()));
        // The limits that hold off HTTP/2's known floods, set here rather than left to
        // the defaults of two crates: streams at once per connection; streams a client
        // resets before they are served (rapid reset, CVE-2023-44487) and streams the
        // server had to reset for the client's errors, past which the connection gets
        // GOAWAY; and the header list (HPACK bombs, CONTINUATION floods, CVE-2024-27316).
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .max_header_list_size(limits.http1.head as u32)
            .serve_connection(TokioIo::new(io), service);
        Box::pin(until_stopped(Box::pin(conn), at, |conn| {
            conn.graceful_shutdown()
        }))
    }

    /// The request path's way in, for one connection.
    fn entry(&self, at: &Accepted, tls: bool, activity: Arc<Activity>) -> Entry {
        let cx = Arc::new(ConnContext {
            listener: at.key,
            peer: at.peer,
            client_ip: proxy::headers::client_ip_value(at.peer.ip()),
            tls,
            activity,
            tunnels: at.tunnels.clone(),
            access_log: self.access_log.clone(),
            trusted_proxies: at.trusted_proxies.clone(),
        });
        Entry::new(self.state.clone(), cx)
    }
}

/// Runs a client connection to its end; when the listener stops, lets it
/// finish the requests in progress and then ends it.
async fn until_stopped<C>(
    mut conn: std::pin::Pin<Box<C>>,
    at: Accepted,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = at.stop.cancelled() => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %at.peer, "client connection ended: {e}");
    }
}

type ConnectionTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Streams open at once on one client HTTP/2 connection (hyper's default, and NGINX's 128 is
/// the same order): beyond it a client waits for its streams to end.
const H2_MAX_STREAMS: u32 = 200;
/// Streams a client may reset before bascule has taken them up, in a row (h2's default).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams bascule may reset for a client's protocol errors on one connection (hyper's default).
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// An accepted connection: who, on which listener, and what ends it.
struct Accepted {
    peer: SocketAddr,
    /// The listener's configured bind address, its key in the snapshot.
    key: SocketAddr,
    /// Where upgraded connections' tunnels are tracked, for graceful shutdown.
    tunnels: TaskTracker,
    /// Cancelled when the listener is removed or the server shuts down.
    stop: CancellationToken,
    /// The listener's `trusted_proxies`, when the peer is one of them.
    trusted_proxies: Option<Arc<[ipnet::IpNet]>>,
}

/// What a listener's configuration says about each of its connections.
#[derive(Clone, Copy)]
struct Limits {
    http1: http1::serve::Limits,
}

impl Limits {
    fn of(listener: &crate::config::ListenerConfig) -> Limits {
        Limits {
            http1: http1::serve::Limits {
                keepalive: listener.keepalive_timeout,
                header_read: listener.header_read_timeout,
                body: listener.body_timeout,
                send: listener.send_timeout,
                head: proxy::head_limit(listener.max_header_bytes),
                added_fields: proxy::headers::ADDED_FIELDS,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

impl Server {
    /// Re-reads `path` and switches to it if valid; otherwise keeps the running
    /// config and logs every problem.
    pub fn reload_from(&self, path: &std::path::Path) {
        let result = crate::config::load(path)
            .map_err(ReloadError::from)
            .and_then(|c| self.reload(c));
        crate::metrics::config_reload(result.is_ok());
        *self
            .state
            .last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(crate::state::ReloadOutcome {
            success: result.is_ok(),
            at: crate::sticky::unix_now(),
            error: result.as_ref().err().map(ToString::to_string),
        });
        match result {
            Ok(()) => tracing::info!("reloaded {}", path.display()),
            Err(e) => {
                // One line per problem, each with its file and position, as `check` prints them.
                for problem in e.to_string().lines() {
                    tracing::error!("reload failed: {problem}");
                }
                tracing::error!("reload failed: the running config stays");
            }
        }
    }

    /// Switches to `config`: new requests use it, requests in flight finish on the old one.
    /// Backends that stay keep their state.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let current = self.state.load_full();
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        // Bind what is new before anything changes: a bind failure leaves all as it was.
        let mut added = Vec::new();
        for l in &config.listeners {
            if bound.listeners.iter().any(|(key, _)| *key == l.bind) {
                continue;
            }
            let (sockets, addr) = bind_for_workers(l.bind, self.commands.len(), &self.inherited)
                .map_err(|e| ReloadError::Bind(l.bind, e))?;
            added.push((l.name.clone(), l.bind, sockets, addr));
        }
        let old_admin = current.config.admin.as_ref().map(|a| a.bind);
        let new_admin = config.admin.as_ref().map(|a| a.bind);
        let admin_socket = match new_admin {
            Some(bind) if new_admin != old_admin => {
                let socket =
                    std::net::TcpListener::bind(bind).map_err(|e| ReloadError::Bind(bind, e))?;
                Some(socket)
            }
            _ => None,
        };

        for line in crate::preview::restart_needed(&current.config, &config) {
            tracing::warn!("reload: {line}");
        }
        if let Some(log) = &self.access_log {
            log.set_format(config.access_log_format);
            if config.access_log != current.config.access_log
                && config.access_log != crate::config::AccessLog::Off
            {
                log.switch(config.access_log.clone());
            }
        }
        let config = Arc::new(config);
        // New names are looked up before the switch, as at start.
        let answers = crate::discovery::resolve_new(&config, |upstream, source| {
            self.state.membership(|m| m.has_answer(upstream, source))
        });
        self.state.change_membership(|m| {
            let mut effective = m.set_file(config.clone());
            for (upstream, source, targets) in answers {
                if let Some(changed) = m.set_answer(&upstream, &source, targets) {
                    effective = changed;
                }
            }
            (Some(effective), ())
        });
        for (name, bind, sockets, addr) in added {
            for (worker, socket) in self.commands.iter().zip(sockets) {
                let _ = worker.send(WorkerCommand::Listen(socket));
            }
            tracing::info!(listener = %name, "listening on {addr}");
            bound.listeners.push((bind, addr));
        }
        bound.listeners.retain(|(key, addr)| {
            let keep = config.listeners.iter().any(|l| l.bind == *key);
            if !keep {
                for worker in &self.commands {
                    let _ = worker.send(WorkerCommand::Close(*key));
                }
                tracing::info!(
                    "stopped listening on {addr}; its connections finish their requests"
                );
            }
            keep
        });
        if new_admin != old_admin {
            bound.admin = admin_socket.as_ref().and_then(|s| s.local_addr().ok());
            if let Some(addr) = bound.admin {
                tracing::info!("admin listening on {addr}");
            }
            // None stops the admin listener.
            let _ = self.admin_tx.send(admin_socket);
        }
        warn_if_admin_open(&config);
        Ok(())
    }
}

/// The admin listener can drain backends and purge caches: reachable from
/// other hosts without a token, anyone there can.
fn warn_if_admin_open(config: &Config) {
    if let Some(admin) = &config.admin {
        if !admin.bind.ip().is_loopback() && admin.token.is_none() {
            tracing::warn!(
                "the admin listener on {} is reachable from other hosts and has no admin.token: \
                 anyone who reaches it can drain backends and purge caches",
                admin.bind
            );
        }
    }
}
