//! Overload control through the real server: per-backend `max_connections`,
//! the upstream's FIFO queue with its size and timeout, and the listener's
//! connection limit.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// One listener routing to upstream `app`, whose settings are `upstream`
/// (YAML lines indented under `app:`), and whose backends are `backends`
/// (YAML list items).
fn config(upstream: &str, backends: &str) -> String {
    format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n{upstream}    backends:\n{backends}admin:\n  bind: 127.0.0.1:0\nworkers: 2\n"
    )
}

/// The upstream of `config` named `name`: metrics are the process's, shared
/// by the tests that run at once, so a test that reads them has its own.
fn named(config: String, name: &str) -> String {
    config
        .replace("upstream: app\n", &format!("upstream: {name}\n"))
        .replace("  app:\n", &format!("  {name}:\n"))
}

/// Requests waiting in the queue (of the one upstream).
fn queue_depth(admin: SocketAddr) -> u64 {
    let status = status_json(admin);
    let upstreams = status["upstreams"].as_object().unwrap();
    upstreams
        .values()
        .map(|u| u["queue_depth"].as_u64().unwrap())
        .sum()
}

/// A request sent from its own thread: its reply, and how long it took.
fn send(addr: SocketAddr, path: &str) -> JoinHandle<(Reply, Duration)> {
    send_with(addr, path, "X-N: -")
}

/// As `send`, with one more header line.
fn send_with(addr: SocketAddr, path: &str, header: &str) -> JoinHandle<(Reply, Duration)> {
    let (path, header) = (path.to_string(), header.to_string());
    std::thread::spawn(move || {
        let start = Instant::now();
        let reply = http1(addr, "GET", &path, &[&header]);
        (reply, start.elapsed())
    })
}

/// A config file's text, loaded as `bascule check` and a reload load it.
fn load(yaml: &str) -> Result<bascule::Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bascule.yaml");
    std::fs::write(&path, yaml).unwrap();
    bascule::config::load(&path).map_err(|e| {
        e.to_string()
            .replace(&*path.to_string_lossy(), "bascule.yaml")
    })
}

/// Waits until `n` requests have reached the balancer's backends or its
/// queue: each thread's request is then known to have arrived, in order.
fn wait_arrived(lb: &Balancer, backends: &[&TestBackend], n: usize) {
    wait_until(Duration::from_secs(10), "the request to arrive", || {
        let seen: usize = backends.iter().map(|b| b.requests().len()).sum();
        seen + queue_depth(lb.admin()) as usize >= n
    });
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    get(admin, "/metrics")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn twenty_clients_reach_a_backend_two_at_a_time_in_order_of_arrival() {
    let b = TestBackend::start("b");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = config("    max_connections: 2\n", &backend_list(&[&b]))
        + &format!("access_log: {}\n", log.display());
    let lb = Balancer::start(&yaml);
    let clients: Vec<_> = (0..20)
        .map(|n| {
            let client = send_with(lb.addr, "/slow?ms=200", &format!("X-N: {n}"));
            // Each client is sent once the one before it has arrived: the
            // order of arrival is the order of `n`, across both workers.
            wait_arrived(&lb, &[&b], n + 1);
            client
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for client in clients {
        let (reply, took) = client.join().unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        slowest = slowest.max(took);
    }
    assert_eq!(b.busy_peak.load(Ordering::SeqCst), 2);
    let expected: Vec<usize> = (0..20).collect();
    let served: Vec<usize> = b
        .requests()
        .iter()
        .map(|s| s.headers["x-n"].to_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(served, expected, "served in order of arrival");
    println!(
        "20 clients, max_connections 2: the backend saw at most {} at once; served in order {served:?}; the last waited {slowest:?}",
        b.busy_peak.load(Ordering::SeqCst)
    );
    // The access log says how long each queued request waited.
    wait_until(Duration::from_secs(10), "the access log", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 20)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let queued = text.lines().filter(|l| l.contains(" queued=")).count();
    assert_eq!(queued, 18, "{text}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after_at_once() {
    let b = TestBackend::start("b");
    let upstream = "    max_connections: 1\n    queue: { size: 5, timeout: 30s }\n";
    let lb = Balancer::start(&named(config(upstream, &backend_list(&[&b])), "full"));
    // One request in flight holds the place, and five wait.
    let mut admitted = vec![send(lb.addr, "/slow?ms=2000")];
    wait_arrived(&lb, &[&b], 1);
    for n in 0..5 {
        admitted.push(send(lb.addr, "/slow?ms=10"));
        wait_arrived(&lb, &[&b], n + 2);
    }
    assert_eq!(queue_depth(lb.admin()), 5);
    for _ in 0..3 {
        let start = Instant::now();
        let reply = get(lb.addr, "/turned-away");
        let took = start.elapsed();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(
            reply.body,
            "503 Service Unavailable: every backend is at its connection limit and the queue is full\n"
        );
        // At once: the queue's timeout (30s) is not waited.
        assert!(took < Duration::from_secs(10), "took {took:?}");
        println!("a full queue's 503 came in {took:?}");
    }
    for client in admitted {
        assert_eq!(client.join().unwrap().0.status, 200);
    }
    assert!(b.requests().iter().all(|s| s.path != "/turned-away"));
    let admin = lb.admin();
    assert_eq!(
        metric(
            admin,
            r#"bascule_queue_rejected_total{upstream="full",reason="full"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            admin,
            r#"bascule_queue_wait_seconds_count{upstream="full"}"#
        ),
        8.0,
        "five waited, three were turned away"
    );
    assert_eq!(
        metric(admin, r#"bascule_queue_depth{upstream="full"}"#),
        0.0
    );
}

#[test]
fn a_request_waiting_past_the_queue_timeout_gets_503() {
    let b = TestBackend::start("b");
    let upstream = "    max_connections: 1\n    queue: { timeout: 300ms }\n";
    let lb = Balancer::start(&named(config(upstream, &backend_list(&[&b])), "slow"));
    let holder = send(lb.addr, "/slow?ms=3000");
    wait_arrived(&lb, &[&b], 1);
    let waited = send(lb.addr, "/waits");
    let (reply, took) = waited.join().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(
        reply.body,
        "503 Service Unavailable: no backend had room within the queue's timeout\n"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(3000),
        "took {took:?}"
    );
    println!("the queue timeout's 503 came after {took:?} (timeout 300ms)");
    assert_eq!(
        metric(
            lb.admin(),
            r#"bascule_queue_rejected_total{upstream="slow",reason="timeout"}"#
        ),
        1.0
    );
    assert_eq!(holder.join().unwrap().0.status, 200);
    assert!(b.requests().iter().all(|s| s.path != "/waits"));
}

#[test]
fn a_client_that_leaves_the_queue_never_reaches_the_backend() {
    let b = TestBackend::start("b");
    let lb = Balancer::start(&config("    max_connections: 1\n", &backend_list(&[&b])));
    let holder = send(lb.addr, "/slow?ms=1500");
    wait_arrived(&lb, &[&b], 1);
    let mut leaver = TcpStream::connect(lb.addr).unwrap();
    write!(leaver, "GET /gone HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    wait_until(Duration::from_secs(5), "the request to queue", || {
        queue_depth(lb.admin()) == 1
    });
    drop(leaver);
    // Out of the queue at once, not when its turn would have come.
    wait_until(
        Duration::from_millis(300),
        "the leaver to leave the queue",
        || queue_depth(lb.admin()) == 0,
    );
    // A request queued after it is served after the holder: had the leaver
    // stayed, it would have gone first.
    let next = send(lb.addr, "/next");
    wait_arrived(&lb, &[&b], 2);
    assert_eq!(holder.join().unwrap().0.status, 200);
    assert_eq!(next.join().unwrap().0.status, 200);
    let paths: Vec<String> = b.requests().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/slow", "/next"]);
}

#[test]
fn least_connections_with_unequal_limits_fills_by_free_capacity() {
    let small = TestBackend::start("small");
    let large = TestBackend::start("large");
    let backends = format!(
        "      - {{ address: {}, max_connections: 1 }}\n      - {{ address: {}, max_connections: 3 }}\n",
        small.addr, large.addr
    );
    let lb = Balancer::start(&config("    balance: least_connections\n", &backends));
    let first: Vec<_> = (0..4).map(|_| send(lb.addr, "/slow?ms=1000")).collect();
    wait_arrived(&lb, &[&small, &large], 4);
    // The four fill both backends' places, none waits; the fifth must.
    assert_eq!(queue_depth(lb.admin()), 0);
    let fifth = send(lb.addr, "/slow?ms=10");
    wait_arrived(&lb, &[&small, &large], 5);
    assert_eq!(small.busy_peak.load(Ordering::SeqCst), 1);
    assert_eq!(large.busy_peak.load(Ordering::SeqCst), 3);
    for client in first.into_iter().chain([fifth]) {
        assert_eq!(client.join().unwrap().0.status, 200);
    }
    let status = status_json(lb.admin());
    let limits: Vec<u64> = status["upstreams"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["max_connections"].as_u64().unwrap())
        .collect();
    assert_eq!(limits, [1, 3]);
}

#[test]
fn a_backend_marked_down_while_requests_wait_is_not_handed_one() {
    let a = TestBackend::start("a");
    let b = TestBackend::start("b");
    let lb = Balancer::start(&config(
        "    max_connections: 1\n",
        &backend_list(&[&a, &b]),
    ));
    let quick = send(lb.addr, "/slow?ms=300");
    wait_arrived(&lb, &[&a, &b], 1);
    let long = send(lb.addr, "/slow?ms=1500");
    wait_arrived(&lb, &[&a, &b], 2);
    let waiting = send(lb.addr, "/waiting");
    wait_arrived(&lb, &[&a, &b], 3);
    assert_eq!(queue_depth(lb.admin()), 1);
    // The backend about to free its place is drained while the request waits.
    let (fast, slow) = if a.requests().is_empty() {
        (&b, &a)
    } else {
        (&a, &b)
    };
    let drain = format!("/upstreams/app/backends/{}/drain", fast.addr);
    assert_eq!(http1(lb.admin(), "POST", &drain, &[]).status, 200);
    assert_eq!(quick.join().unwrap().0.status, 200);
    let (reply, _) = waiting.join().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, slow.name);
    assert_eq!(long.join().unwrap().0.status, 200);
    assert_eq!(fast.requests().len(), 1);
}

#[test]
fn a_reload_that_raises_the_limit_releases_waiting_requests() {
    let b = TestBackend::start("b");
    let lb = Balancer::start(&config("    max_connections: 1\n", &backend_list(&[&b])));
    let holder = send(lb.addr, "/slow?ms=5000");
    wait_arrived(&lb, &[&b], 1);
    let waiting = send(lb.addr, "/released");
    wait_arrived(&lb, &[&b], 2);
    assert_eq!(queue_depth(lb.admin()), 1);
    // The same listener and admin binds (127.0.0.1:0): kept, not bound again.
    let raised = load(&config("    max_connections: 2\n", &backend_list(&[&b]))).unwrap();
    lb.server().reload(raised).unwrap();
    let (reply, took) = waiting.join().unwrap();
    assert_eq!(reply.status, 200);
    // Released while the holder still holds its place.
    assert!(!holder.is_finished(), "released after {took:?}");
    assert_eq!(b.busy_peak.load(Ordering::SeqCst), 2);
    assert_eq!(holder.join().unwrap().0.status, 200);
}

#[test]
fn a_websocket_tunnel_holds_its_place_while_open() {
    let b = TestBackend::start("b");
    let lb = Balancer::start(&config("    max_connections: 1\n", &backend_list(&[&b])));
    let mut tunnel = TcpStream::connect(lb.addr).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        tunnel,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    tunnel.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let next = send(lb.addr, "/after-the-tunnel");
    wait_until(Duration::from_secs(5), "the request to queue", || {
        queue_depth(lb.admin()) == 1
    });
    drop(tunnel);
    assert_eq!(next.join().unwrap().0.status, 200);
}

#[test]
fn a_listener_at_its_limit_leaves_new_connections_waiting() {
    let b = TestBackend::start("b");
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    max_connections: 2\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends:\n{}workers: 2\n",
        backend_list(&[&b])
    );
    let lb = Balancer::start(&yaml);
    let mut open: Vec<KeepAlive> = (0..2).map(|_| KeepAlive::new(lb.addr)).collect();
    for c in &mut open {
        assert_eq!(c.get("/").unwrap().0, 200);
    }
    // A third client connects (the kernel completes the handshake) and sends
    // its request, which is not read while two connections are open.
    let third = std::thread::spawn(move || get(lb.addr, "/third"));
    // Nothing to wait for here but time: that the third is not served in it.
    let unserved = Instant::now() + Duration::from_millis(300);
    while Instant::now() < unserved {
        assert!(!third.is_finished(), "the third connection was served");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(b.requests().len(), 2);
    // One of the two leaves: the third is served.
    open.pop();
    let reply = third.join().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "b"));
    assert_eq!(b.requests().len(), 3);
}

#[test]
fn limits_out_of_range_are_reported_at_their_position() {
    let yaml = config(
        "    max_connections: 0\n    queue: { size: -1, timeout: soon }\n",
        "      - 127.0.0.1:9001\n",
    );
    let problems = load(&yaml).unwrap_err();
    for expected in [
        "bascule.yaml:7:22: upstreams.app.max_connections: `0` is not a whole number in the range 1 to 10000000",
        "bascule.yaml:8:20: upstreams.app.queue.size: `-1` is not a whole number",
        "bascule.yaml:8:33: upstreams.app.queue.timeout: `soon` is not a duration",
    ] {
        assert!(problems.contains(expected), "{expected}\nnot in\n{problems}");
    }
}

#[test]
fn a_retry_that_finds_every_other_backend_full_waits_in_the_queue() {
    let live = TestBackend::start("live");
    // A port nothing listens on: connections to it are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let backends = format!("      - {}\n      - {dead_addr}\n", live.addr);
    let lb = Balancer::start(&named(
        config("    max_connections: 1\n", &backends),
        "retried",
    ));
    let mut holder = None;
    // Round robin: whichever request goes to the live backend holds it.
    while holder.is_none() {
        let attempt = send(lb.addr, "/slow?ms=1500");
        wait_until(Duration::from_secs(5), "the request to be placed", || {
            live.busy.load(Ordering::SeqCst) == 1 || attempt.is_finished()
        });
        if !attempt.is_finished() {
            holder = Some(attempt);
        } else {
            assert_eq!(attempt.join().unwrap().0.status, 200);
        }
    }
    let retries_before = metric(lb.admin(), r#"bascule_retries_total{upstream="retried"}"#);
    // This one meets the dead backend (it has room), is retried, finds the
    // live one full, waits, and is served once the holder is done.
    let (reply, _) = send(lb.addr, "/after-a-retry").join().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "live"));
    assert!(metric(lb.admin(), r#"bascule_retries_total{upstream="retried"}"#) > retries_before);
    assert_eq!(
        metric(
            lb.admin(),
            r#"bascule_queue_wait_seconds_count{upstream="retried"}"#
        ),
        1.0
    );
    assert_eq!(holder.unwrap().join().unwrap().0.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_while_queued_leaves_the_queue() {
    let b = TestBackend::start("b");
    let yaml = config("    max_connections: 1\n", &backend_list(&[&b]));
    let lb = tokio::task::spawn_blocking(move || Balancer::start(&yaml))
        .await
        .unwrap();
    let (addr, admin) = (lb.addr, lb.admin());
    let holder = send(addr, "/slow?ms=1500");
    let depth = move || queue_depth(admin);
    // The holder has the one place before the stream comes (else the stream
    // would take it, and the holder wait instead).
    let busy = b.busy.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(5), "the holder at the backend", || {
            busy.load(Ordering::SeqCst) == 1
        })
    })
    .await
    .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut h2 = h2_client(stream).await;
    let req = http::Request::builder()
        .uri(format!("http://{addr}/gone"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let waiting = tokio::spawn(h2.send_request(req));
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(5), "the stream to queue", || {
            depth() == 1
        })
    })
    .await
    .unwrap();
    // The client gives up on the stream: hyper resets it (RST_STREAM).
    waiting.abort();
    tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_millis(300),
            "the stream to leave the queue",
            || depth() == 0,
        )
    })
    .await
    .unwrap();
    let (reply, _) = tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert!(b.requests().iter().all(|s| s.path != "/gone"));
    drop(lb);
}
