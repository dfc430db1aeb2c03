//! A route's own layers (`bascule::stack`): a layer of the test's, added to
//! one route, sees that route's requests over HTTP/1 and HTTP/2 and can answer
//! them itself, and no other route's.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bascule::proxy::{self, ProxyBody, RouteRequest};
use bascule::stack::{Layers, Stack};
use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::BodyExt;

/// Answers `/own/fixed` itself and passes everything else on, marking the
/// replies it passed back; remembers every path it saw.
#[derive(Clone, Default)]
struct FixedPath {
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S> tower::Layer<S> for FixedPath {
    type Service = FixedPathService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FixedPathService {
            inner,
            seen: self.seen.clone(),
        }
    }
}

#[derive(Clone)]
struct FixedPathService<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S> tower::Service<RouteRequest> for FixedPathService<S>
where
    S: tower::Service<RouteRequest, Response = Response<ProxyBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: RouteRequest) -> Self::Future {
        let path = req.http.uri().path().to_string();
        self.seen.lock().unwrap().push(path.clone());
        if path == "/own/fixed" {
            let reply = proxy::local_reply(
                StatusCode::OK,
                Bytes::from_static(b"from the layer"),
                req.exchange,
            );
            return Box::pin(async move { Ok(reply) });
        }
        let passed = self.inner.call(req);
        Box::pin(async move {
            let mut resp = passed.await?;
            resp.headers_mut()
                .insert("x-layer", http::HeaderValue::from_static("passed"));
            Ok(resp)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_layer_sees_its_requests_over_http1_and_http2_and_no_others() {
    let b = TestBackend::start("a");
    let layer = FixedPath::default();
    let layers = {
        let layer = layer.clone();
        // Added to the route for /own only, found by its config.
        Layers::default().with(move |site, stack| {
            if site.route.path_prefix.as_deref() == Some("/own") {
                stack.layer(layer.clone())
            } else {
                stack
            }
        })
    };
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /own }}\n        upstream: layered\n      - upstream: layered\nupstreams:\n  layered:\n    backends:\n{}admin:\n  bind: 127.0.0.1:0\nworkers: 2\n",
        backend_list(&[&b])
    );
    let lb = tokio::task::spawn_blocking(move || Balancer::start_with(&yaml, layers))
        .await
        .unwrap();
    let addr = lb.addr;

    // HTTP/1.
    let (fixed, own, other) = tokio::task::spawn_blocking(move || {
        (
            get(addr, "/own/fixed"),
            get(addr, "/own/other"),
            get(addr, "/elsewhere"),
        )
    })
    .await
    .unwrap();
    assert_eq!((fixed.status, fixed.body.as_str()), (200, "from the layer"));
    assert_eq!((own.status, own.body.as_str()), (200, "a"));
    assert_eq!(own.headers["x-layer"], "passed");
    assert_eq!((other.status, other.body.as_str()), (200, "a"));
    assert_eq!(other.headers.get("x-layer"), None);

    // HTTP/2 with prior knowledge, the same three.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut send = h2_client(stream).await;
    let mut h2 = Vec::new();
    for path in ["/own/fixed", "/own/other", "/elsewhere"] {
        let req = http::Request::get(format!("http://h2.example.com{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let marked = resp.headers().get("x-layer").cloned();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        h2.push((status, body, marked));
    }
    assert_eq!(h2[0].0, 200);
    assert_eq!(&h2[0].1[..], b"from the layer");
    assert_eq!(&h2[1].1[..], b"a");
    assert_eq!(
        h2[1].2.as_ref().map(|v| v.to_str().unwrap()),
        Some("passed")
    );
    assert_eq!(&h2[2].1[..], b"a");
    assert_eq!(h2[2].2, None);

    // The layer saw its route's requests and nothing else; the backend never
    // saw the ones the layer answered.
    let seen = layer.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["/own/fixed", "/own/other", "/own/fixed", "/own/other"]
    );
    let paths: Vec<String> = b.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        ["/own/other", "/elsewhere", "/own/other", "/elsewhere"]
    );

    // The layer's own replies are accounted for like any other, to the route's upstream.
    let admin = lb.admin();
    let metrics = tokio::task::spawn_blocking(move || http1(admin, "GET", "/metrics", &[]).body)
        .await
        .unwrap();
    let line = "bascule_requests_total{upstream=\"layered\",backend=\"none\",status=\"200\"} 2";
    assert!(metrics.contains(line), "{metrics}");
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}

/// The layers given at start are applied again to the snapshot a reload builds.
#[test]
fn a_reload_keeps_the_programs_layers() {
    let b = TestBackend::start("a");
    let calls = Arc::new(AtomicUsize::new(0));
    let layers = {
        let calls = calls.clone();
        Layers::default().with(move |_, stack: Stack| {
            calls.fetch_add(1, Ordering::SeqCst);
            stack.layer(FixedPath::default())
        })
    };
    let yaml = simple_config(&[&b]);
    let lb = Balancer::start_with(&yaml, layers);
    assert_eq!(get(lb.addr, "/own/fixed").body, "from the layer");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reload.yaml");
    std::fs::write(&path, &yaml).unwrap();
    lb.server()
        .reload(bascule::config::load(&path).unwrap())
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "once per route per snapshot"
    );
    assert_eq!(get(lb.addr, "/own/fixed").body, "from the layer");
    assert_eq!(get(lb.addr, "/other").body, "a");
}
