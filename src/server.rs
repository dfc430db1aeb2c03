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

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::admin;
use crate::client_io::{Activity, ClientIo, Timeouts};
use crate::config::Config;
use crate::health::HealthChecks;
use crate::proxy::{self, ConnContext};
use crate::state::{Snapshot, State};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (listener {name}): {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
}

/// A running balancer: its threads, its sockets, and the switch that stops it.
pub struct Server {
    state: Arc<State>,
    /// Tells the control thread that the snapshot changed.
    reloaded: Arc<Notify>,
    shutdown: CancellationToken,
    threads: Vec<JoinHandle<()>>,
    listeners: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
}

/// One listening socket handed to a worker: the configured bind (its key in the
/// snapshot) and the socket itself.
struct Bound {
    key: SocketAddr,
    socket: std::net::TcpListener,
}

impl Server {
    /// Binds every listener and the admin endpoint, then starts the workers.
    /// Nothing is started if any bind fails.
    pub fn start(config: Config) -> Result<Server, StartError> {
        let workers = config.worker_count();
        let access_log = AccessLogger::start(&config.access_log).map_err(StartError::AccessLog)?;

        let mut per_worker: Vec<Vec<Bound>> = (0..workers).map(|_| Vec::new()).collect();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let bind_err = |source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            };
            // Port 0 asks the kernel for a port; every worker's socket must then share it.
            let mut addr = l.bind;
            for worker in per_worker.iter_mut() {
                let socket = bind_reuseport(addr).map_err(bind_err)?;
                addr = socket.local_addr().map_err(bind_err)?;
                worker.push(Bound {
                    key: l.bind,
                    socket,
                });
            }
            listeners.push(addr);
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

        let state = Arc::new(State::new(Snapshot::build(Arc::new(config), None)));
        let shutdown = CancellationToken::new();
        let mut threads = Vec::new();
        for (i, sockets) in per_worker.into_iter().enumerate() {
            let worker = Worker {
                state: state.clone(),
                shutdown: shutdown.clone(),
                access_log: access_log.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || worker.run(i, sockets))
                .map_err(StartError::Thread)?;
            threads.push(handle);
        }
        let reloaded = Arc::new(Notify::new());
        {
            let (state, shutdown, reloaded) = (state.clone(), shutdown.clone(), reloaded.clone());
            let handle = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control(state, shutdown, reloaded, admin_socket))
                .map_err(StartError::Thread)?;
            threads.push(handle);
        }
        for (l, addr) in state.load().config.listeners.iter().zip(&listeners) {
            tracing::info!(listener = %l.name, "listening on {addr}");
        }
        if let Some(addr) = admin_addr {
            tracing::info!("admin listening on {addr}");
        }
        Ok(Server {
            state,
            reloaded,
            shutdown,
            threads,
            listeners,
            admin: admin_addr,
        })
    }

    /// The address each listener is bound to, in config order (the real port when the config said 0).
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listeners
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
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
    reloaded: Arc<Notify>,
    admin_socket: Option<std::net::TcpListener>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::error!("cannot start the control runtime: {e}"),
    };
    rt.block_on(async move {
        if let Some(socket) = admin_socket {
            tokio::spawn(admin::serve(socket, state.clone(), shutdown.clone()));
        }
        let mut checks = HealthChecks::default();
        checks.sync(&state.load());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = reloaded.notified() => checks.sync(&state.load()),
                _ = tick.tick() => {
                    for upstream in &state.load().upstreams {
                        upstream.retry_budget.top_up();
                    }
                    // Histograms are kept in blocks that the exporter folds in on upkeep.
                    crate::metrics::handle().run_upkeep();
                }
            }
        }
    });
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
    socket.set_nonblocking(true)?;
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
    fn run(self, index: usize, sockets: Vec<Bound>) {
        crate::proxy::pool::set_worker(index);
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
            for bound in sockets {
                match TcpListener::from_std(bound.socket) {
                    Ok(listener) => {
                        tokio::spawn(worker.clone().accept(
                            listener,
                            bound.key,
                            connections.clone(),
                        ));
                    }
                    Err(e) => tracing::error!("cannot use the socket for {}: {e}", bound.key),
                }
            }
            tokio::spawn(purge_idle_connections(worker.state.clone()));
            worker.shutdown.cancelled().await;
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

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        key: SocketAddr,
        connections: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let tunnels = connections.clone();
                    connections.spawn(self.clone().serve(stream, peer, key, tunnels));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!("accept on {key} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        key: SocketAddr,
        tunnels: TaskTracker,
    ) {
        let Some(listener) = self.state.load().listener(key).map(|l| l.config.clone()) else {
            return; // the listener was removed by a reload after this connection was accepted
        };
        let activity = Arc::new(Activity::default());
        let timeouts = Timeouts {
            keepalive: listener.keepalive_timeout,
            header_read: listener.header_read_timeout,
        };
        let io = TokioIo::new(ClientIo::new(stream, activity.clone(), timeouts));
        let cx = Arc::new(ConnContext {
            state: self.state.clone(),
            listener: key,
            peer,
            client_ip: ConnContext::client_ip_header(peer),
            tls: false,
            activity,
            tunnels,
            access_log: self.access_log.clone(),
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(proxy::head_limit(listener.max_header_bytes));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(proxy::head_limit(listener.max_header_bytes) as u32);
        let service = service_fn(move |req| proxy::serve(cx.clone(), req));
        let conn = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "client connection ended: {e}");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("listener and admin binds cannot change on reload yet; restart to change them")]
    Binds,
}

impl Server {
    /// Re-reads `path` and switches to it if valid; otherwise keeps the running
    /// config and logs every problem.
    pub fn reload_from(&self, path: &std::path::Path) {
        let result = crate::config::load(path)
            .map_err(ReloadError::from)
            .and_then(|c| self.reload(c));
        crate::metrics::config_reload(result.is_ok());
        match result {
            Ok(()) => tracing::info!("reloaded {}", path.display()),
            Err(e) => tracing::error!("reload failed, the running config stays:\n{e}"),
        }
    }

    /// Switches to `config`: new requests use it, requests in flight finish on the old one.
    /// Backends that stay keep their state.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let current = self.state.load_full();
        let binds = |c: &Config| {
            let listeners: Vec<SocketAddr> = c.listeners.iter().map(|l| l.bind).collect();
            (listeners, c.admin.as_ref().map(|a| a.bind))
        };
        if binds(&current.config) != binds(&config) {
            return Err(ReloadError::Binds);
        }
        self.state
            .store(Snapshot::build(Arc::new(config), Some(&current)));
        self.reloaded.notify_one();
        Ok(())
    }
}
