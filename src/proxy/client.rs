//! The pooled HTTP/1.1 client that carries requests to backends.
//!
//! One client per upstream, shared by every worker thread, so a keep-alive
//! connection opened by one thread can serve the next request of any other.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub type BackendClient = Client<HttpConnector, Incoming>;

pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> BackendClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        // The legacy pool ignores its idle timeout without a timer.
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        // The client's Host comes through untouched; the pool must not add its own.
        .set_host(false)
        .build(connector)
}
