//! The edge cache's memory tier through the real server: what is stored and
//! served, coalescing, purges, stale content, and the storability rules.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// What the origin answers to one request.
#[derive(Clone, Default)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Before the head.
    delay: Duration,
    /// The body sent in this many pieces, this far apart.
    pieces: Option<(usize, Duration)>,
}

fn ok(headers: &[(&'static str, &str)], body: &str) -> Answer {
    Answer {
        status: 200,
        headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        body: body.as_bytes().to_vec(),
        ..Answer::default()
    }
}

type Answers = Arc<dyn Fn(&http::request::Parts, usize) -> Answer + Send + Sync>;

/// A backend whose answers a test writes, counting the requests to each
/// target; while `down`, it closes every connection without an answer.
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    requests: Arc<Mutex<Vec<http::request::Parts>>>,
    down: Arc<AtomicBool>,
}

impl Origin {
    fn start(
        answers: impl Fn(&http::request::Parts, usize) -> Answer + Send + Sync + 'static,
    ) -> Origin {
        let answers: Answers = Arc::new(answers);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (seen2, requests2, down2) = (seen.clone(), requests.clone(), down.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    if down2.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    let (answers, seen, requests) =
                        (answers.clone(), seen2.clone(), requests2.clone());
                    let down = down2.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: http::Request<Incoming>| {
                            let (answers, seen, requests) =
                                (answers.clone(), seen.clone(), requests.clone());
                            let down = down.clone();
                            async move {
                                if down.load(Ordering::SeqCst) {
                                    // A pooled connection breaks off with no answer.
                                    return Err("down");
                                }
                                let (parts, _) = req.into_parts();
                                let target = parts.uri.path_and_query().unwrap().to_string();
                                let n = {
                                    let mut seen = seen.lock().unwrap();
                                    let n = seen.entry(target).or_insert(0);
                                    *n += 1;
                                    *n
                                };
                                let a = answers(&parts, n);
                                requests.lock().unwrap().push(parts);
                                tokio::time::sleep(a.delay).await;
                                Ok::<_, &str>(respond(a))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Origin {
            addr,
            seen,
            requests,
            down,
        }
    }

    fn count(&self, target: &str) -> usize {
        self.seen.lock().unwrap().get(target).copied().unwrap_or(0)
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn respond(a: Answer) -> http::Response<OriginBody> {
    let mut resp = http::Response::builder().status(a.status);
    for (k, v) in &a.headers {
        resp = resp.header(*k, v);
    }
    let body = match a.pieces {
        None => http_body_util::Full::new(Bytes::from(a.body)).boxed(),
        Some((n, gap)) => {
            let size = a.body.len().div_ceil(n);
            let chunks: Vec<Bytes> = a.body.chunks(size).map(Bytes::copy_from_slice).collect();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for c in chunks {
                    tokio::time::sleep(gap).await;
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
            });
            Pieces(rx).boxed()
        }
    };
    resp.body(body).unwrap()
}

/// A body sent in pieces as they come down a channel.
struct Pieces(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

fn config(origin: &Origin, cache: &str) -> String {
    format!(
        "caches:\n  pages:\n{cache}listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\n        cache: pages\nupstreams:\n  app:\n    backends: [{}]\n    retries: 0\n    timeouts: {{ connect: 1s }}\nadmin:\n  bind: 127.0.0.1:0\nworkers: 2\n",
        origin.addr
    )
}

const MEMORY: &str = "    memory: 64MiB\n";

fn cache_status(r: &Reply) -> &str {
    r.headers
        .get("cache-status")
        .map_or("", |v| v.to_str().unwrap())
}

fn purge(admin: SocketAddr, json: &str) -> Reply {
    let len = json.len();
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "POST /caches/pages/purge HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{json}"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

#[test]
fn a_miss_is_stored_and_the_next_request_hits_memory() {
    let origin = Origin::start(|_, n| {
        ok(
            &[("cache-control", "max-age=60"), ("x-n", &n.to_string())],
            "report",
        )
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    let first = get(lb.addr, "/report");
    assert_eq!(first.status, 200);
    assert_eq!(cache_status(&first), "bascule; fwd=miss; stored");
    let second = get(lb.addr, "/report");
    assert_eq!(second.status, 200);
    assert_eq!(second.body, "report");
    assert_eq!(cache_status(&second), "bascule; hit; detail=memory");
    assert_eq!(second.headers["x-n"], "1");
    assert!(second.headers.contains_key("age"));
    // Another query is another key.
    assert_eq!(
        cache_status(&get(lb.addr, "/report?x=1")),
        "bascule; fwd=miss; stored"
    );
    // HEAD is answered from the GET's entry, without a body.
    let head = http1(lb.addr, "HEAD", "/report", &[]);
    assert_eq!(cache_status(&head), "bascule; hit; detail=memory");
    assert_eq!(head.headers["content-length"], "6");
    assert_eq!(head.body, "");
    assert_eq!(origin.count("/report"), 1);
    // A conditional that the entry satisfies gets a 304.
}

#[test]
fn a_fresh_entry_answers_a_matching_conditional_with_304() {
    let origin = Origin::start(|_, _| {
        ok(
            &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
            "body",
        )
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    assert_eq!(get(lb.addr, "/p").status, 200);
    let r = http1(lb.addr, "GET", "/p", &["If-None-Match: \"v1\""]);
    assert_eq!(r.status, 304);
    assert_eq!(r.headers["etag"], "\"v1\"");
    assert_eq!(r.body, "");
    let r = http1(lb.addr, "GET", "/p", &["If-None-Match: \"v0\""]);
    assert_eq!((r.status, r.body.as_str()), (200, "body"));
    assert_eq!(origin.count("/p"), 1);
}

#[test]
fn concurrent_misses_on_one_key_make_one_backend_request() {
    let origin = Origin::start(|_, _| Answer {
        delay: Duration::from_millis(300),
        ..ok(&[("cache-control", "max-age=60")], "slow report")
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    let addr = lb.addr;
    let clients: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || get(addr, "/report")))
        .collect();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.body == "slow report"));
    let collapsed = replies
        .iter()
        .filter(|r| cache_status(r) == "bascule; fwd=uri-miss; collapsed")
        .count();
    eprintln!(
        "100 concurrent cold requests: {} backend request(s), {collapsed} collapsed",
        origin.count("/report")
    );
    assert_eq!(origin.count("/report"), 1);
}

#[test]
fn purges_by_url_tag_and_all_drop_entries() {
    let origin = Origin::start(|parts, _| {
        let tag = if parts.uri.path().starts_with("/product") {
            "product-42 catalog"
        } else {
            "home"
        };
        ok(&[("cache-control", "max-age=60"), ("cache-tag", tag)], "x")
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    let admin = lb.admin();
    for p in ["/product/42", "/product/42/reviews", "/", "/about?lang=fr"] {
        assert_eq!(
            cache_status(&get(lb.addr, p)),
            "bascule; fwd=miss; stored",
            "{p}"
        );
    }
    let host = lb.addr.ip();
    // The URL as the key is made: scheme, host (any port), path and query.
    let r = purge(
        admin,
        &format!(r#"{{"urls": ["http://{host}:1/about?lang=fr"]}}"#),
    );
    assert_eq!((r.status, r.body.trim()), (200, r#"{"dropped":1}"#));
    assert_eq!(
        cache_status(&get(lb.addr, "/about?lang=fr")),
        "bascule; fwd=miss; stored"
    );
    let r = purge(admin, r#"{"tags": ["product-42"]}"#);
    assert_eq!(r.body.trim(), r#"{"dropped":2}"#);
    assert_eq!(
        cache_status(&get(lb.addr, "/product/42")),
        "bascule; fwd=miss; stored"
    );
    assert_eq!(
        cache_status(&get(lb.addr, "/")),
        "bascule; hit; detail=memory"
    );
    let r = purge(admin, r#"{"all": true}"#);
    assert_eq!(r.body.trim(), r#"{"dropped":3}"#);
    assert_eq!(
        cache_status(&get(lb.addr, "/")),
        "bascule; fwd=miss; stored"
    );
    // Bad requests are told why.
    for bad in [
        r#"{"urls": ["/relative"]}"#,
        r#"{"tag": ["x"]}"#,
        "nope",
        r#"{"all": false}"#,
    ] {
        let r = purge(admin, bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}

#[test]
fn a_successful_unsafe_method_invalidates_its_url() {
    let origin = Origin::start(|parts, _| match parts.method.as_str() {
        "GET" => ok(&[("cache-control", "max-age=60")], "cart"),
        _ if parts.uri.path() == "/fails" => Answer {
            status: 500,
            ..ok(&[], "no")
        },
        _ => ok(&[], "updated"),
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    for p in ["/cart", "/fails"] {
        get(lb.addr, p);
        assert_eq!(
            cache_status(&get(lb.addr, p)),
            "bascule; hit; detail=memory"
        );
    }
    let r = http1(lb.addr, "POST", "/cart", &["Content-Length: 0"]);
    assert_eq!((r.status, cache_status(&r)), (200, "bascule; fwd=method"));
    assert_eq!(
        cache_status(&get(lb.addr, "/cart")),
        "bascule; fwd=miss; stored"
    );
    // A failed one changes nothing.
    let r = http1(lb.addr, "DELETE", "/fails", &[]);
    assert_eq!(r.status, 500);
    assert_eq!(
        cache_status(&get(lb.addr, "/fails")),
        "bascule; hit; detail=memory"
    );
}

#[test]
fn what_must_not_be_shared_is_not_stored() {
    let origin = Origin::start(|parts, _| {
        let cc = ("cache-control", "max-age=60");
        match parts.uri.path() {
            "/no-store" => ok(&[("cache-control", "max-age=60, no-store")], "x"),
            "/private" => ok(&[("cache-control", "max-age=60, private")], "x"),
            "/cookie" => ok(&[cc, ("set-cookie", "session=1")], "x"),
            "/public-cookie" => ok(
                &[
                    ("cache-control", "max-age=60, public"),
                    ("set-cookie", "a=1"),
                ],
                "x",
            ),
            "/vary-star" => ok(&[cc, ("vary", "*")], "x"),
            "/nothing-said" => ok(&[], "x"),
            "/s-maxage" => ok(&[("cache-control", "s-maxage=60")], "x"),
            _ => ok(&[cc], "x"),
        }
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    for (path, extra, stored) in [
        ("/no-store", vec![], false),
        ("/private", vec![], false),
        ("/cookie", vec![], false),
        ("/public-cookie", vec![], true),
        ("/vary-star", vec![], false),
        ("/nothing-said", vec![], false),
        ("/auth", vec!["Authorization: Bearer t"], false),
        ("/s-maxage", vec!["Authorization: Bearer t"], true),
        ("/request-no-store", vec!["Cache-Control: no-store"], false),
    ] {
        let first = http1(lb.addr, "GET", path, &extra);
        let again = http1(lb.addr, "GET", path, &extra);
        let hit = cache_status(&again) == "bascule; hit; detail=memory";
        assert_eq!(
            hit,
            stored,
            "{path}: {} then {}",
            cache_status(&first),
            cache_status(&again)
        );
    }
}

#[test]
fn vary_keeps_variants_apart_and_unkeyed_fields_change_nothing() {
    let origin = Origin::start(|parts, _| {
        let lang = parts
            .headers
            .get("x-lang")
            .map_or("en", |v| v.to_str().unwrap())
            .to_string();
        let mut a = ok(&[("cache-control", "max-age=60"), ("vary", "X-Lang")], "");
        a.body = lang.into_bytes();
        a
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    let fr = http1(lb.addr, "GET", "/home", &["X-Lang: fr"]);
    assert_eq!(fr.body, "fr");
    let en = get(lb.addr, "/home");
    assert_eq!(
        (en.body.as_str(), cache_status(&en)),
        ("en", "bascule; fwd=miss; stored")
    );
    let fr = http1(lb.addr, "GET", "/home", &["X-Lang: fr", "X-Other: 1"]);
    assert_eq!(
        (fr.body.as_str(), cache_status(&fr)),
        ("fr", "bascule; hit; detail=memory")
    );
    let en = http1(
        lb.addr,
        "GET",
        "/home",
        &["Cookie: a=1", "X-Forwarded-Host: evil"],
    );
    assert_eq!(
        (en.body.as_str(), cache_status(&en)),
        ("en", "bascule; hit; detail=memory")
    );
    assert_eq!(origin.count("/home"), 2);
}

#[test]
fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = Origin::start(|_, n| Answer {
        // Long enough that the requests below all come while it runs, however slow the machine.
        delay: if n > 1 {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        },
        ..ok(
            &[
                ("cache-control", "max-age=1, stale-while-revalidate=60"),
                ("x-n", &n.to_string()),
            ],
            "v",
        )
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    assert_eq!(get(lb.addr, "/swr").headers["x-n"], "1");
    wait_until(Duration::from_secs(5), "the entry to go stale", || {
        cache_status(&get(lb.addr, "/swr")) == "bascule; fwd=stale"
    });
    // Stale is served at once while the one refresh (1 s) runs.
    for _ in 0..5 {
        let r = get(lb.addr, "/swr");
        assert_eq!(r.headers["x-n"], "1", "{}", cache_status(&r));
    }
    wait_until(Duration::from_secs(5), "the refreshed entry", || {
        let r = get(lb.addr, "/swr");
        r.headers["x-n"] == "2" && cache_status(&r) == "bascule; hit; detail=memory"
    });
    assert_eq!(origin.count("/swr"), 2);
}

#[test]
fn stale_if_error_serves_stale_while_the_backend_is_down_and_must_revalidate_gets_504() {
    let origin = Origin::start(|parts, _| {
        let cc = if parts.uri.path() == "/strict" {
            "max-age=1, must-revalidate, stale-if-error=60"
        } else {
            "max-age=1, stale-if-error=60"
        };
        ok(&[("cache-control", cc)], "kept")
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    for p in ["/sie", "/strict"] {
        assert_eq!(get(lb.addr, p).status, 200);
    }
    origin.down.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "the entry to go stale", || {
        cache_status(&get(lb.addr, "/sie")).starts_with("bascule; fwd=stale; fwd-status=502")
    });
    let r = get(lb.addr, "/sie");
    assert_eq!((r.status, r.body.as_str()), (200, "kept"));
    // Stored a moment after /sie, /strict may stay fresh a moment longer.
    wait_until(
        Duration::from_secs(5),
        "the strict entry to go stale",
        || cache_status(&get(lb.addr, "/strict")) != "bascule; hit; detail=memory",
    );
    let r = get(lb.addr, "/strict");
    assert_eq!(r.status, 504, "{}: {}", cache_status(&r), r.body);
}

#[test]
fn a_stale_entry_is_revalidated_and_a_304_refreshes_it() {
    let origin = Origin::start(|parts, _| {
        if parts
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            return Answer {
                status: 304,
                ..ok(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")], "")
            };
        }
        ok(
            &[("cache-control", "max-age=1"), ("etag", "\"v1\"")],
            "full body",
        )
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    assert_eq!(get(lb.addr, "/doc").body, "full body");
    wait_until(Duration::from_secs(5), "a revalidation", || {
        let r = get(lb.addr, "/doc");
        assert_eq!((r.status, r.body.as_str()), (200, "full body"));
        cache_status(&r) == "bascule; fwd=stale; fwd-status=304"
    });
    // Refreshed for 60 s now.
    let r = get(lb.addr, "/doc");
    assert_eq!(
        (r.body.as_str(), cache_status(&r)),
        ("full body", "bascule; hit; detail=memory")
    );
    let conditional = origin
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.headers.contains_key("if-none-match"))
        .count();
    assert!(conditional >= 1);
}

#[test]
fn a_purge_during_a_slow_fill_leaves_nothing_stored() {
    let origin = Origin::start(|_, n| Answer {
        delay: if n == 1 {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        },
        ..ok(
            &[
                ("cache-control", "max-age=60"),
                ("cache-tag", "t"),
                ("x-n", &n.to_string()),
            ],
            "x",
        )
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    let addr = lb.addr;
    let filling = std::thread::spawn(move || get(addr, "/slow-fill"));
    wait_until(
        Duration::from_secs(5),
        "the fill to reach the backend",
        || origin.count("/slow-fill") == 1,
    );
    assert_eq!(purge(lb.admin(), r#"{"tags": ["t"]}"#).status, 200);
    let first = filling.join().unwrap();
    assert_eq!(
        (first.status, &first.headers["x-n"]),
        (200, &"1".parse().unwrap())
    );
    let next = get(lb.addr, "/slow-fill");
    assert_eq!(cache_status(&next), "bascule; fwd=miss; stored");
    assert_eq!(next.headers["x-n"], "2");
}

#[test]
fn an_object_over_max_object_streams_through_unstored() {
    let origin = Origin::start(|_, _| Answer {
        pieces: Some((4, Duration::from_millis(150))),
        body: vec![b'b'; 4 << 20],
        ..ok(&[("cache-control", "max-age=60")], "")
    });
    let lb = Balancer::start(&config(
        &origin,
        "    memory: 64MiB\n    max_object: 1MiB\n",
    ));
    use std::io::{Read, Write};
    for round in 0..2 {
        let mut s = std::net::TcpStream::connect(lb.addr).unwrap();
        let head = format!(
            "GET /big HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            lb.addr
        );
        s.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).unwrap();
        let first_byte = started.elapsed();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let last_byte = started.elapsed();
        // The backend sends its last piece 600 ms in: the client had the first long before.
        assert!(
            first_byte + Duration::from_millis(300) < last_byte,
            "{first_byte:?} then {last_byte:?}"
        );
        assert!(rest.len() > 4 << 20, "round {round}");
    }
    assert_eq!(origin.count("/big"), 2);
}

#[test]
fn a_body_being_stored_streams_to_its_client_as_it_arrives() {
    let origin = Origin::start(|_, _| Answer {
        pieces: Some((4, Duration::from_millis(150))),
        body: vec![b's'; 256 << 10],
        ..ok(&[("cache-control", "max-age=60")], "")
    });
    let lb = Balancer::start(&config(&origin, MEMORY));
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(lb.addr).unwrap();
    let head = format!(
        "GET /stream HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        lb.addr
    );
    s.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let first_byte = started.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let last_byte = started.elapsed();
    assert!(
        first_byte + Duration::from_millis(300) < last_byte,
        "{first_byte:?} then {last_byte:?}"
    );
    let hit = get(lb.addr, "/stream");
    assert_eq!(cache_status(&hit), "bascule; hit; detail=memory");
    assert_eq!(hit.body.len(), 256 << 10);
}

#[test]
fn status_and_metrics_show_the_cache() {
    let origin = Origin::start(|_, _| ok(&[("cache-control", "max-age=60")], "x"));
    // A name of its own: the recorder is the process's, and other tests count too.
    let lb = Balancer::start(&config(&origin, MEMORY).replace("pages", "figures"));
    let value = |metrics: &str, series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let hits = r#"bascule_cache_requests_total{cache="figures",result="hit_memory"}"#;
    let misses = r#"bascule_cache_requests_total{cache="figures",result="miss"}"#;
    let before = get(lb.admin(), "/metrics").body;
    get(lb.addr, "/a");
    for _ in 0..3 {
        get(lb.addr, "/a");
    }
    let status = status_json(lb.admin());
    let pages = &status["caches"]["figures"];
    assert_eq!(pages["entries"], 1, "{status}");
    assert!(pages["bytes"].as_u64().unwrap() > 0);
    assert_eq!(pages["hit_ratio"], 0.75);
    assert_eq!(pages["hit_ratio_last_minute"], 0.75);
    let after = get(lb.admin(), "/metrics").body;
    assert_eq!(value(&after, hits) - value(&before, hits), 3.0, "{after}");
    assert_eq!(
        value(&after, misses) - value(&before, misses),
        1.0,
        "{after}"
    );
    assert!(
        after.contains(r#"bascule_cache_entries{cache="figures"} 1"#),
        "{after}"
    );
}

// ---- the Redis tier: two real bascule processes sharing one Redis ----------------------

/// One command to Redis, in RESP; its reply as text.
fn redis_cmd(port: u16, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn shared_config(origin: &Origin, redis: &Redis) -> String {
    config(
        origin,
        &format!(
            "    memory: 64MiB\n    redis:\n      url: {}\n      timeout: 200ms\n",
            redis.url()
        ),
    )
}

/// A bascule process connected to Redis.
fn instance(origin: &Origin, redis: &Redis) -> Process {
    let p = Process::start(&shared_config(origin, redis));
    wait_until(Duration::from_secs(10), "the Redis tier to connect", || {
        p.log.lock().unwrap().contains("Redis connected")
    });
    p
}

fn get_at(p: &Process, path: &str) -> Reply {
    get(p.addrs[0], path)
}

/// Waits for `key`'s entry to be written to Redis by the instance that filled it.
fn wait_in_redis(redis: &Redis, key: &str) {
    let k = format!("bascule:pages:e:{key}");
    wait_until(Duration::from_secs(5), "the fill to reach Redis", || {
        redis_cmd(redis.port, &["EXISTS", &k]).starts_with(":1")
    });
}

#[test]
fn two_instances_share_fills_and_every_purge_reaches_both() {
    let Some(redis) = Redis::start() else { return };
    let origin = Origin::start(|parts, _| {
        let tag = format!("item-{}", parts.uri.path().trim_start_matches('/'));
        ok(
            &[("cache-control", "max-age=300"), ("cache-tag", &tag)],
            "shared",
        )
    });
    let (a, b) = (instance(&origin, &redis), instance(&origin, &redis));
    // A miss on A, then a hit from Redis on B, then from B's memory: one backend request.
    assert_eq!(
        cache_status(&get_at(&a, "/report")),
        "bascule; fwd=miss; stored"
    );
    let host = a.addrs[0].ip();
    wait_in_redis(&redis, &format!("http://{host}/report"));
    let on_b = get_at(&b, "/report");
    assert_eq!(
        (on_b.body.as_str(), cache_status(&on_b)),
        ("shared", "bascule; hit; detail=redis")
    );
    assert_eq!(
        cache_status(&get_at(&b, "/report")),
        "bascule; hit; detail=memory"
    );
    assert_eq!(origin.count("/report"), 1);

    // Purges on A, by URL and by tag, reach B: timed over 100 of them.
    let mut took = Vec::new();
    for i in 0..100 {
        let path = format!("/p{i}");
        get_at(&a, &path);
        wait_in_redis(&redis, &format!("http://{host}{path}"));
        assert_eq!(
            cache_status(&get_at(&b, &path)),
            "bascule; hit; detail=redis"
        );
        let body = if i % 2 == 0 {
            format!(r#"{{"urls": ["http://{host}{path}"]}}"#)
        } else {
            format!(r#"{{"tags": ["item-p{i}"]}}"#)
        };
        let started = Instant::now();
        assert_eq!(
            purge(a.admin.unwrap(), &body).body.trim(),
            r#"{"dropped":1}"#
        );
        wait_until(Duration::from_secs(2), "the purge to reach B", || {
            cache_status(&get_at(&b, &path)) == "bascule; fwd=miss; stored"
        });
        took.push(started.elapsed());
    }
    took.sort();
    let (median, max) = (took[took.len() / 2], took[took.len() - 1]);
    eprintln!("purge on A seen on B: median {median:?}, max {max:?} over 100 purges");
    assert!(
        max < Duration::from_millis(100),
        "a purge took {max:?} to reach B"
    );

    // An application's own PUBLISH, from its write path, invalidates both.
    for p in [&a, &b] {
        get_at(p, "/cart");
        assert_eq!(
            cache_status(&get_at(p, "/cart")),
            "bascule; hit; detail=memory"
        );
    }
    let message = format!(r#"{{"urls": ["http://{host}/cart"]}}"#);
    let heard = |p: &Process| -> f64 {
        let metrics = get(p.admin.unwrap(), "/metrics").body;
        let series = r#"bascule_cache_invalidations_total{cache="pages",source="pubsub"}"#;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let before = [heard(&a), heard(&b)];
    assert!(redis_cmd(
        redis.port,
        &["PUBLISH", "bascule:invalidate:pages", &message]
    )
    .starts_with(":2"));
    for (p, before) in [&a, &b].into_iter().zip(before) {
        wait_until(Duration::from_secs(2), "the application's purge", || {
            heard(p) > before
        });
    }
    // Gone from Redis and from both memories: A misses; B, after A's refill,
    // finds it in Redis, not in its memory.
    let k = format!("bascule:pages:e:http://{host}/cart");
    assert!(redis_cmd(redis.port, &["EXISTS", &k]).starts_with(":0"));
    assert_eq!(
        cache_status(&get_at(&a, "/cart")),
        "bascule; fwd=miss; stored"
    );
    assert_ne!(
        cache_status(&get_at(&b, "/cart")),
        "bascule; hit; detail=memory"
    );
}

#[test]
fn with_redis_down_requests_go_on_and_its_return_flushes_memory() {
    let Some(redis) = Redis::start() else { return };
    let port = redis.port;
    let origin = Origin::start(|_, _| ok(&[("cache-control", "max-age=300")], "v"));
    let a = instance(&origin, &redis);
    get_at(&a, "/kept");
    assert_eq!(
        cache_status(&get_at(&a, "/kept")),
        "bascule; hit; detail=memory"
    );
    drop(redis);
    wait_until(Duration::from_secs(10), "the loss to be noticed", || {
        a.log.lock().unwrap().contains("subscription was lost")
    });
    // Hits from memory go on; misses reach the backend; nothing fails.
    for i in 0..20 {
        assert_eq!(
            cache_status(&get_at(&a, "/kept")),
            "bascule; hit; detail=memory"
        );
        let r = get_at(&a, &format!("/new{i}"));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let _redis = Redis::start_on(port);
    wait_until(
        Duration::from_secs(10),
        "the flush on Redis's return",
        || {
            a.log
                .lock()
                .unwrap()
                .contains("the memory tier was flushed")
        },
    );
    assert_eq!(
        cache_status(&get_at(&a, "/kept")),
        "bascule; fwd=miss; stored"
    );
}

#[test]
fn the_access_log_says_how_the_cache_served_each_request() {
    let origin = Origin::start(|_, _| ok(&[("cache-control", "max-age=60")], "x"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let lb = Balancer::start(&format!(
        "{}access_log: {}\n",
        config(&origin, MEMORY),
        log.display()
    ));
    get(lb.addr, "/logged");
    get(lb.addr, "/logged");
    http1(lb.addr, "GET", "/logged", &["Cache-Control: no-store"]);
    wait_until(Duration::from_secs(10), "three log lines", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 3 && s.ends_with('\n'))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let results: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        results,
        ["cache=miss", "cache=hit_memory", "cache=bypass"],
        "{text}"
    );
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .contains("upstream=app backend=none"),
        "{text}"
    );
}

#[test]
fn the_memory_bound_holds_when_eight_times_its_size_is_filled() {
    let origin = Origin::start(|_, _| Answer {
        body: vec![b'm'; 256 << 10],
        ..ok(&[("cache-control", "max-age=600")], "")
    });
    let p = Process::start(&config(
        &origin,
        "    memory: 16MiB\n    max_object: 1MiB\n",
    ));
    assert_eq!(get_at(&p, "/warm").status, 200);
    let before = p.rss_kib();
    // 512 objects of 256 KiB: 128 MiB through a 16 MiB cache. Past the first
    // few times its size (what the allocator keeps for reuse), the rest
    // replaces what is there: RSS stops growing.
    let mut halfway = 0;
    for i in 0..512 {
        if i == 256 {
            halfway = p.rss_kib();
        }
        let r = get_at(&p, &format!("/o{i}"));
        assert_eq!((r.status, r.body.len()), (200, 256 << 10));
    }
    let after = p.rss_kib();
    let status = status_json(p.admin.unwrap());
    let bytes = status["caches"]["pages"]["bytes"].as_u64().unwrap();
    eprintln!(
        "128 MiB through a 16 MiB cache: it holds {bytes} bytes; RSS {before} KiB, {halfway} KiB at 64 MiB, {after} KiB at 128 MiB"
    );
    assert!(bytes <= 16 << 20, "{bytes}");
    let (late, all) = (after.saturating_sub(halfway), after.saturating_sub(before));
    assert!(
        late < 16 * 1024,
        "RSS went on growing: {halfway} to {after} KiB"
    );
    assert!(all < 64 * 1024, "RSS grew {all} KiB");
}

#[test]
fn the_memory_bound_holds_for_small_replies() {
    // Small replies are where what an entry holds besides its body counts:
    // its fields, its policy, and any buffer its values still share with the
    // backend's read (kilobytes each, once).
    let origin = Origin::start(|_, _| Answer {
        body: vec![b's'; 4 << 10],
        ..ok(
            &[
                ("cache-control", "public, max-age=600"),
                ("etag", "\"v1\""),
                ("last-modified", "Mon, 07 Dec 2026 05:49:09 GMT"),
                ("content-type", "text/plain"),
                ("x-served-by", "replica-7"),
            ],
            "",
        )
    });
    // One worker: each keeps freed memory of its own for reuse, and which
    // worker a connection lands on would move the figure from run to run.
    let p =
        Process::start(&config(&origin, "    memory: 8MiB\n").replace("workers: 2", "workers: 1"));
    assert_eq!(get_at(&p, "/warm").status, 200);
    let before = p.rss_kib();
    // Some 4 000 replies of 4 KiB: 16 MiB of bodies, twice what an 8 MiB cache holds.
    for i in 0..4000 {
        let r = get_at(&p, &format!("/s{i}"));
        assert_eq!((r.status, r.body.len()), (200, 4 << 10));
    }
    let after = p.rss_kib();
    let status = status_json(p.admin.unwrap());
    let bytes = status["caches"]["pages"]["bytes"].as_u64().unwrap();
    let entries = status["caches"]["pages"]["entries"].as_u64().unwrap();
    eprintln!("4 000 replies of 4 KiB through an 8 MiB cache: it holds {entries} entries, {bytes} bytes; RSS {before} to {after} KiB");
    assert!(bytes <= 8 << 20, "{bytes}");
    let grew = after.saturating_sub(before);
    assert!(
        grew < 12 * 1024,
        "RSS grew {grew} KiB for an 8 MiB cache ({entries} entries)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_share_entries_with_http1_clients() {
    let origin = Origin::start(|_, _| ok(&[("cache-control", "max-age=60")], "both"));
    let lb = tokio::task::spawn_blocking({
        let yaml = config(&origin, MEMORY);
        move || Balancer::start(&yaml)
    })
    .await
    .unwrap();
    let addr = lb.addr;
    let first = tokio::task::spawn_blocking(move || get(addr, "/shared"))
        .await
        .unwrap();
    assert_eq!(cache_status(&first), "bascule; fwd=miss; stored");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut send = h2_client(stream).await;
    for method in [http::Method::GET, http::Method::HEAD] {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}/shared"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(
            resp.headers()["cache-status"],
            "bascule; hit; detail=memory",
            "{method}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let want: &[u8] = if method == http::Method::GET {
            b"both"
        } else {
            b""
        };
        assert_eq!(&body[..], want, "{method}");
    }
    assert_eq!(origin.count("/shared"), 1);
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}

#[test]
fn a_hit_written_from_its_stored_fields_has_each_field_once() {
    let origin =
        Origin::start(|_, _| ok(&[("cache-control", "max-age=60"), ("x-kept", "1")], "once"));
    let lb = Balancer::start(&config(&origin, MEMORY));
    let request = format!(
        "GET /once HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        lb.addr
    );
    for round in 0..2 {
        let raw = String::from_utf8(raw_exchange(lb.addr, request.as_bytes())).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let count = |name: &str| {
            head.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                .count()
        };
        for name in [
            "date",
            "content-length",
            "cache-control",
            "x-kept",
            "cache-status",
            "connection",
        ] {
            assert_eq!(count(name), 1, "round {round}, {name}:\n{head}");
        }
        assert_eq!(count("age"), round, "round {round}:\n{head}");
        assert_eq!(body, "once");
    }
}

#[test]
fn a_head_that_misses_fills_with_a_get() {
    let origin = Origin::start(|_, _| ok(&[("cache-control", "max-age=60")], "filled by a HEAD"));
    let lb = Balancer::start(&config(&origin, MEMORY));
    let head = http1(lb.addr, "HEAD", "/h", &[]);
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(head.headers["content-length"], "16");
    assert_eq!(cache_status(&head), "bascule; fwd=miss; stored");
    wait_until(Duration::from_secs(5), "the fill to be stored", || {
        cache_status(&http1(lb.addr, "HEAD", "/h", &[])) == "bascule; hit; detail=memory"
    });
    let get = get(lb.addr, "/h");
    assert_eq!(
        (get.body.as_str(), cache_status(&get)),
        ("filled by a HEAD", "bascule; hit; detail=memory")
    );
    let methods: Vec<String> = origin
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.method.to_string())
        .collect();
    assert_eq!(methods, ["GET"]);
}
