//! The runtime snapshot: everything a request needs, built from one config and
//! swapped atomically on reload.
//!
//! A request does one `State::load()` and works on that snapshot to its end, so
//! a reload never changes the rules under a request in flight. A new snapshot is
//! built aside from the old one, taking over the runtime state of every backend
//! whose (upstream, address) stays, and its connection pool too when the
//! upstream's connect and idle timeouts stay.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::Mutex;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::Notify;

use crate::backend::{Backend, BackendState};
use crate::backend_tls::Connector;
use crate::cache::layer::CacheLayer;
use crate::cache::Cache;
use crate::config::{Config, ListenerConfig, UpstreamConfig};
use crate::listener_limit::ConnectionLimit;
use crate::membership::Membership;
use crate::metrics as m;
use crate::pool::{Pool, PoolSettings};
use crate::proxy::Proxy;
use crate::router::Router;
use crate::stack::{Layers, RouteSite, Stack};
use crate::upstream::Upstream;
use tower::Layer;

/// A route as requests run it: its upstream, and its stack of services.
#[derive(Debug)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub stack: Stack,
}

pub struct ListenerRoutes {
    pub config: ListenerConfig,
    pub router: Router,
    /// In config order: the router answers with an index into this.
    pub routes: Vec<Route>,
    /// For TLS listeners: the handshake with this config's certificates.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Its `max_connections` and the connections counted against it; kept
    /// across reloads with the bind address.
    pub connections: Arc<ConnectionLimit>,
}

impl std::fmt::Debug for ListenerRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerRoutes")
            .field("config", &self.config)
            .finish()
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub caches: Vec<Arc<Cache>>,
    pub listeners: Vec<ListenerRoutes>,
    /// The layers a program added to routes, carried to every snapshot built from this one.
    pub layers: Layers,
    /// The running process's worker threads: the first config's count, which a
    /// reload cannot change (pools are sized by it).
    pub workers: usize,
}

impl Snapshot {
    /// Builds the snapshot for `config`, carrying state over from `previous`,
    /// and its layers.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let layers = previous.map(|p| p.layers.clone()).unwrap_or_default();
        Snapshot::build_with(config, previous, layers)
    }

    /// As `build`, with `layers` on every route.
    pub fn build_with(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        layers: Layers,
    ) -> Snapshot {
        let workers = previous.map_or_else(|| config.worker_count(), |p| p.workers);
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                Arc::new(build_upstream(
                    u,
                    workers,
                    previous.and_then(|p| p.upstream(&u.name)),
                ))
            })
            .collect();
        // A cache whose settings stay keeps what it stores.
        let caches: Vec<Arc<Cache>> = config
            .caches
            .iter()
            .map(|c| {
                previous
                    .and_then(|p| p.caches.iter().find(|old| old.config == *c))
                    .cloned()
                    .unwrap_or_else(|| Cache::new(c.clone()))
            })
            .collect();
        let index = |name: &str| {
            upstreams
                .iter()
                .position(|u| u.config.name == name)
                .expect("validation checked route upstreams")
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRoutes {
                config: l.clone(),
                router: Router::new(&l.routes),
                routes: l
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, route)| {
                        let upstream = &upstreams[index(&route.upstream)];
                        let site = RouteSite {
                            listener: l,
                            index: i,
                            route,
                        };
                        let mut stack = Stack::Proxy(Proxy::new(upstream.clone()));
                        if let Some(name) = &route.cache {
                            let cache = caches
                                .iter()
                                .find(|c| &c.config.name == name)
                                .expect("validation checked route caches");
                            let layer = CacheLayer::new(cache.clone(), upstream.clone());
                            let cached = layer.layer(Proxy::new(upstream.clone()));
                            stack = Stack::Cached(cached.with_encoded_heads(true));
                        }
                        Route {
                            upstream: upstream.clone(),
                            stack: layers.build(&site, stack),
                        }
                    })
                    .collect(),
                connections: {
                    let old = previous.and_then(|p| p.listener(l.bind));
                    let limit = old.map(|o| o.connections.clone()).unwrap_or_default();
                    limit.set_max(l.max_connections);
                    limit
                },
                tls: l.tls.as_ref().and_then(|t| {
                    match crate::tls::server_config(&t.certificates, &t.protocols) {
                        Ok(config) => Some(tokio_rustls::TlsAcceptor::from(config)),
                        Err(e) => {
                            tracing::error!(listener = %l.name, "TLS setup failed: {e}");
                            None
                        }
                    }
                }),
            })
            .collect();
        Snapshot {
            config,
            upstreams,
            caches,
            listeners,
            layers,
            workers,
        }
    }

    pub fn cache(&self, name: &str) -> Option<&Arc<Cache>> {
        self.caches.iter().find(|c| c.config.name == name)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.config.name == name)
    }

    /// The listener configured with this bind address.
    pub fn listener(&self, bind: SocketAddr) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| l.config.bind == bind)
    }
}

fn build_upstream(
    config: &Arc<UpstreamConfig>,
    workers: usize,
    previous: Option<&Arc<Upstream>>,
) -> Upstream {
    let settings = PoolSettings {
        connect_timeout: config.connect_timeout,
        idle_timeout: config.idle_timeout,
        max_idle: config.max_idle_connections,
    };
    // A changed TLS setting means new connections; the old pools drain with the old snapshot.
    let same_tls = previous.is_some_and(|p| p.config.tls == config.tls);
    let backends = config
        .backends
        .iter()
        .map(|b| {
            let old = previous.and_then(|p| p.backends.iter().find(|old| old.address == b.address));
            let state = old.map(|old| old.state.clone()).unwrap_or_else(|| {
                let initial = config
                    .health_check
                    .as_ref()
                    .is_none_or(|h| h.initial_healthy);
                let state = BackendState::new(initial);
                // A backend added by a reload ramps up; the first config's do not.
                if previous.is_some() && config.slow_start.is_some() {
                    state.start_ramp(crate::backend::now_ms());
                }
                Arc::new(state)
            });
            state.set_limit(b.max_connections.or(config.max_connections));
            // A backend that leaves takes no new requests; one whose address
            // came back before it went takes them again.
            let was_leaving = previous
                .and_then(|p| p.config.backends.iter().find(|c| c.address == b.address))
                .is_some_and(|c| c.leaving);
            if b.leaving {
                state.set_draining(true);
            } else if was_leaving {
                state.set_draining(false);
            }
            let (proxy_tls, probe_tls) = tls_connectors(config, b).unzip();
            let pool = match old {
                Some(old) if same_tls && old.pool.settings() == settings => old.pool.clone(),
                _ => Arc::new(Pool::new(
                    b.addr,
                    workers,
                    settings,
                    proxy_tls,
                    m::connections_opened(&config.name, &b.address),
                )),
            };
            Backend::new(&config.name, b, state, pool, probe_tls)
        })
        .collect();
    // A backend the reload removes takes no new requests from the old
    // snapshot either: its retries, and requests queued on it, go elsewhere.
    for old in previous.iter().flat_map(|p| &p.backends) {
        if !config.backends.iter().any(|b| b.address == old.address) {
            old.state.set_draining(true);
        }
    }
    let load = previous.map_or_else(Default::default, |p| p.load.clone());
    Upstream::new(config.clone(), backends, load)
}

/// The connectors for a backend's requests and probes, with upstream TLS.
fn tls_connectors(
    config: &UpstreamConfig,
    backend: &crate::config::BackendConfig,
) -> Option<(Connector, Connector)> {
    let tls = config.tls.as_ref()?;
    let name = backend.tls_name.clone()?;
    Some(tls.connectors(name))
}

/// How the last reload went: for `/status`.
#[derive(Clone, Debug)]
pub struct ReloadOutcome {
    pub success: bool,
    /// Unix seconds.
    pub at: u64,
    /// Every problem, when it failed.
    pub error: Option<String>,
}

/// The current snapshot, shared by every thread, and how the last reload went.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
    pub last_reload: std::sync::Mutex<Option<ReloadOutcome>>,
    /// The backends each upstream has now; held while a snapshot is built
    /// from it, so that snapshots are stored in the order of the changes.
    membership: Mutex<Membership>,
    /// Told when a new snapshot is stored: the control thread follows it with
    /// health checks, the discovery loop with its names.
    pub changed: Notify,
}

impl State {
    /// A state whose membership starts from the snapshot's config.
    pub fn new(snapshot: Snapshot) -> Self {
        let membership = Membership::new(snapshot.config.clone());
        State::with_membership(snapshot, membership)
    }

    /// A state whose snapshot was built from `membership`'s config.
    pub fn with_membership(snapshot: Snapshot, membership: Membership) -> Self {
        State {
            membership: Mutex::new(membership),
            current: ArcSwap::from_pointee(snapshot),
            last_reload: std::sync::Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// Reads the membership (what the file gives, what names answered).
    pub fn membership<T>(&self, read: impl FnOnce(&Membership) -> T) -> T {
        read(&self.membership.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `change` on the membership; when it yields a new config, builds
    /// the snapshot for it from the current one (as a reload does) and
    /// switches to it.
    pub fn change_membership<T>(
        &self,
        change: impl FnOnce(&mut Membership) -> (Option<Arc<Config>>, T),
    ) -> T {
        let mut membership = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let (config, out) = change(&mut membership);
        if let Some(config) = config {
            let current = self.load_full();
            self.store(Snapshot::build(config, Some(&current)));
            self.changed.notify_one();
        }
        out
    }

    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}
