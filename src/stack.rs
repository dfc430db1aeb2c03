//! A route's services: the proxy innermost, and around it the layers the
//! route carries (`tower::Layer`s over [`RouteRequest`]), built once per
//! snapshot.
//!
//! A route without layers is the bare `Proxy`, which the entry calls
//! directly: no box, no clone, no dynamic call. A route with layers is one
//! boxed, cloneable service (`BoxCloneSyncService`); a request clones it (a
//! pointer's copy and an allocation) and calls it once. There is no `Buffer`
//! and no per-clone state: a layer's shared state lives behind its own `Arc`s,
//! the same for every worker and connection.
//!
//! Layers come from two places: those the config asks for, and those a
//! program embedding bascule adds with [`Layers`] (given to
//! `Server::start_with`), which are applied to every snapshot, reloads
//! included.

use std::convert::Infallible;
use std::sync::Arc;

use http::Response;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::cache::layer::CacheService;
use crate::config::{ListenerConfig, RouteConfig};
use crate::proxy::{Proxy, ProxyBody, RouteRequest};

/// A route's layers and the proxy inside them, as one service.
pub type RouteService = BoxCloneSyncService<RouteRequest, Response<ProxyBody>, Infallible>;

/// What a route runs.
#[derive(Clone)]
pub enum Stack {
    /// The proxy alone.
    Proxy(Proxy),
    /// The proxy behind the route's cache, called as directly as the proxy:
    /// a fresh hit is answered with no future made at all.
    Cached(CacheService<Proxy>),
    /// The proxy inside one or more layers.
    Layered(RouteService),
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stack::Proxy(p) => f
                .debug_tuple("Proxy")
                .field(&p.upstream().config.name)
                .finish(),
            Stack::Cached(_) => f.write_str("Cached"),
            Stack::Layered(_) => f.write_str("Layered"),
        }
    }
}

impl Stack {
    /// Wraps the stack in `layer`: requests reach it first.
    pub fn layer<L>(self, layer: L) -> Stack
    where
        L: Layer<RouteService>,
        L::Service: Service<RouteRequest, Response = Response<ProxyBody>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<RouteRequest>>::Future: Send + 'static,
    {
        let inner = match self {
            Stack::Proxy(proxy) => RouteService::new(proxy),
            // A layer above may read the reply's fields: they go in its map.
            Stack::Cached(cached) => RouteService::new(cached.with_encoded_heads(false)),
            Stack::Layered(service) => service,
        };
        Stack::Layered(RouteService::new(layer.layer(inner)))
    }
}

/// Where a route stands, for a function adding layers to it.
#[derive(Debug, Clone, Copy)]
pub struct RouteSite<'a> {
    pub listener: &'a ListenerConfig,
    /// Its position in the listener's routes.
    pub index: usize,
    pub route: &'a RouteConfig,
}

type AddLayers = dyn Fn(&RouteSite<'_>, Stack) -> Stack + Send + Sync;

/// Layers a program adds to routes, beside those the config asks for: each
/// function is called for every route of every snapshot, in the order added,
/// and returns the stack as it is or wrapped (`Stack::layer`).
#[derive(Clone, Default)]
pub struct Layers(Vec<Arc<AddLayers>>);

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Layers({})", self.0.len())
    }
}

impl Layers {
    pub fn with(
        mut self,
        f: impl Fn(&RouteSite<'_>, Stack) -> Stack + Send + Sync + 'static,
    ) -> Self {
        self.0.push(Arc::new(f));
        self
    }

    /// The stack for the route at `site`: `config`'s (its upstream's proxy,
    /// inside the layers the config asks for), inside these.
    pub fn build(&self, site: &RouteSite<'_>, config: Stack) -> Stack {
        self.0.iter().fold(config, |stack, add| add(site, stack))
    }
}
