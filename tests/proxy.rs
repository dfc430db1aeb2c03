//! Proxying through the real server: routing, headers, bodies, upgrades, h2c.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn routes_by_host_path_and_method_first_match_wins() {
    let (api, wild, stat, def) = (
        TestBackend::start("api"),
        TestBackend::start("wild"),
        TestBackend::start("static"),
        TestBackend::start("default"),
    );
    let yaml = format!(
        "listeners:
  - bind: 127.0.0.1:0
    routes:
      - match: {{ host: api.example.com, path_prefix: /api, methods: [GET, HEAD] }}
        upstream: api
      - match: {{ host: '*.example.com' }}
        upstream: wild
      - match: {{ path_prefix: /static }}
        upstream: static
      - match: {{ host: only.example.org }}
        upstream: default
upstreams:
  api: {{ backends: [{}] }}
  wild: {{ backends: [{}] }}
  static: {{ backends: [{}] }}
  default: {{ backends: [{}] }}
",
        api.addr, wild.addr, stat.addr, def.addr
    );
    let lb = Balancer::start(&yaml);
    let raw = |method: &str, host: &str, path: &str| {
        let mut s = TcpStream::connect(lb.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let r = parse_reply(&out);
        (r.status, r.body)
    };
    assert_eq!(
        raw("GET", "API.example.com:8080", "/api/users"),
        (200, "api".into())
    );
    assert_eq!(
        raw("POST", "api.example.com", "/api/users"),
        (200, "wild".into())
    );
    assert_eq!(
        raw("GET", "www.example.com", "/static/x"),
        (200, "wild".into())
    );
    assert_eq!(
        raw("GET", "example.com", "/static/x"),
        (200, "static".into())
    );
    assert_eq!(raw("GET", "only.example.org", "/"), (200, "default".into()));
    let (status, body) = raw("GET", "example.com", "/nothing");
    assert_eq!(status, 404);
    assert!(body.starts_with("404 Not Found"), "{body}");
}

#[test]
fn forwarded_headers_are_added_and_hop_by_hop_stripped_both_ways() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let r = http1(
        lb.addr,
        "GET",
        "/h",
        &[
            "X-Forwarded-For: 203.0.113.9",
            "X-Forwarded-Proto: https",
            "Connection: X-Secret",
            "X-Secret: do-not-forward",
            "Keep-Alive: timeout=10",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "X-Kept: yes",
        ],
    );
    assert_eq!(r.status, 200);
    let seen = b.requests().pop().unwrap();
    let h = &seen.headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], lb.addr.to_string().as_str());
    assert_eq!(h["host"], lb.addr.to_string().as_str());
    assert_eq!(h["x-kept"], "yes");
    for gone in ["x-secret", "keep-alive", "proxy-connection", "te"] {
        assert!(!h.contains_key(gone), "{gone} was forwarded: {h:?}");
    }
    // The client's Connection: close must not reach the pooled backend connection.
    assert!(h.get("connection").is_none_or(|v| v != "close"), "{h:?}");
    // Response side: the backend's Connection-named and Keep-Alive fields are gone.
    assert_eq!(r.headers["x-backend"], "a");
    assert!(!r.headers.contains_key("x-private"), "{:?}", r.headers);
    assert!(!r.headers.contains_key("keep-alive"), "{:?}", r.headers);
}

#[test]
fn backend_connections_are_reused_across_client_connections() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    for _ in 0..50 {
        // Each client request arrives on its own connection with Connection: close.
        assert_eq!(get(lb.addr, "/").status, 200);
    }
    let opened = b.connections.load(std::sync::atomic::Ordering::SeqCst);
    // One pool per upstream shared by both workers: at most a connection or two per worker.
    assert!(
        opened <= 4,
        "{opened} backend connections for 50 sequential requests"
    );
}

/// A client's connection is handed to the balancer with its first bytes, not at the end of its
/// TCP handshake: until the client speaks, the kernel keeps the balancer's side half-open.
#[test]
fn a_connection_is_accepted_when_its_first_bytes_arrive() {
    const SYN_RECV: &str = "03";
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    // On loopback the handshake's last ACK reaches the listener before connect returns.
    let balancer_side = tcp_state(lb.addr, s.local_addr().unwrap());
    assert_eq!(balancer_side.as_deref(), Some(SYN_RECV));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(parse_reply(&out).status, 200);
}

/// The state (hex, as /proc/net/tcp gives it) of the IPv4 socket bound to `local` and facing
/// `remote`.
fn tcp_state(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<String> {
    let hex = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => {
            format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
        }
        std::net::IpAddr::V6(_) => unreachable!("the tests bind 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[1] == local && f[2] == remote)
        .map(|f| f[3].to_string())
}

/// Backend connections opened by a burst of `n` overlapping requests.
fn opened_by_burst(lb: &Balancer, b: &TestBackend, n: usize) -> usize {
    let before = b.connections.load(std::sync::atomic::Ordering::SeqCst);
    let addr = lb.addr;
    let burst: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || get(addr, "/slow?ms=300").status))
        .collect();
    for request in burst {
        assert_eq!(request.join().unwrap(), 200);
    }
    b.connections.load(std::sync::atomic::Ordering::SeqCst) - before
}

#[test]
fn a_burst_surplus_of_backend_connections_is_closed_and_max_idle_kept() {
    let b = TestBackend::start("a");
    // One worker: the cap is shared out among workers, and with two the burst's
    // connections may all reach one of them (1 time in 128), leaving the other none to keep.
    let capped = simple_config(&[&b])
        .replace("  app:\n", "  app:\n    max_idle_connections: 2\n")
        .replace("workers: 2", "workers: 1");
    let lb = Balancer::start(&capped);
    assert!(opened_by_burst(&lb, &b, 8) >= 8);
    let open = || b.open.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "the surplus closed", || {
        open() <= 2
    });
    // The two kept serve the next requests: one at a time, nothing new opens.
    let before = b.connections.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(get(lb.addr, "/").status, 200);
    }
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    assert_eq!(open(), 2);
}

#[test]
fn large_bodies_stream_both_ways() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let size: u64 = 64 << 20;
    // Download.
    let total = download(lb.addr, size);
    assert!(total > size && total < size + 1024, "read {total} bytes");
    // Upload, chunked, without a length known in advance.
    let mut s = TcpStream::connect(lb.addr).unwrap();
    write!(s, "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = vec![b'y'; 1 << 16];
    for _ in 0..(size >> 16) {
        write!(s, "{:x}\r\n", chunk.len()).unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let r = parse_reply(&out);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, size.to_string());
}

#[test]
fn upgrade_is_tunnelled_both_ways() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let r = parse_reply(&head);
    assert_eq!(r.status, 101);
    assert_eq!(r.headers["upgrade"], "echo");
    let seen = b.requests().pop().unwrap();
    assert_eq!(seen.headers["upgrade"], "echo");
    for msg in [&b"hello"[..], b"second message", &[0u8, 255, 10, 13]] {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    // While the tunnel is open, the backend counts it in flight.
    let status = http1(lb.admin(), "GET", "/status", &[]).body;
    assert!(status.contains("\"active_requests\":1"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_reaches_an_http1_backend() {
    let b = TestBackend::start("a");
    let lb = tokio::task::spawn_blocking({
        let yaml = simple_config(&[&b]);
        move || Balancer::start(&yaml)
    })
    .await
    .unwrap();
    let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut send = h2_client(stream).await;
    for _ in 0..3 {
        let req = http::Request::get("http://h2.example.com:8443/path?q=1")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"a");
    }
    let seen = b.requests().pop().unwrap();
    assert_eq!(seen.path, "/path");
    assert_eq!(seen.headers["host"], "h2.example.com:8443");
    assert_eq!(seen.headers["x-forwarded-host"], "h2.example.com:8443");
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}

/// A backend that answers the first request on each connection and, like one
/// whose keep-alive timeout fires as the next request arrives, reads the second
/// and closes without answering.
fn backend_closing_on_second_request() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                for answer in [true, false] {
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if answer {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn idle_pooled_connection_closed_by_the_backend_costs_no_get() {
    let addr = backend_closing_on_second_request();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{addr}]\nworkers: 1\n"
    );
    let lb = Balancer::start(&yaml);
    for i in 0..5 {
        assert_eq!(get(lb.addr, "/").status, 200, "request {i}");
        // Let the pooled connection sit idle, as between requests of a quiet site.
        std::thread::sleep(Duration::from_millis(150));
    }
    // A request with a body is not sent twice: the backend may have acted on it.
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(parse_reply(&out).status, 502);
}

/// A backend that answers each request as its path says, in every framing
/// HTTP/1.1 allows, and counts the connections it accepted.
fn scripted_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut s = s;
                loop {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&got)
                        .lines()
                        .next()
                        .unwrap()
                        .to_owned();
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    // Each part in its own write, so that the proxy meets them in separate reads.
                    let parts: &[&[u8]] = match path.as_str() {
                        "/chunked" => &[
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                            b"lo\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n",
                            b"\r\n",
                        ],
                        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
                        "/chunked-and-length" => &[b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
                        "/interim" => &[
                            b"HTTP/1.1 100 Continue\r\n\r\n",
                            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n",
                            b"Content-Length: 7\r\n\r\ninterim",
                        ],
                        "/head" => &[b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"],
                        "/no-content" => &[b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"],
                        "/until-close" => &[b"HTTP/1.1 200 OK\r\n\r\nto the ", b"end"],
                        "/http10" => &[b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!"],
                        "/http10-keep-alive" => &[b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 4\r\n\r\nold!"],
                        // Kept open here: the proxy must close it of its own accord.
                        "/close" => &[b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 3\r\n\r\nbye"],
                        "/bad-length" => &[b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"],
                        _ => &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                    };
                    for part in parts {
                        if s.write_all(part).is_err() {
                            return;
                        }
                        let _ = s.flush();
                    }
                    if matches!(path.as_str(), "/until-close" | "/http10" | "/bad-length") {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn backend_responses_are_framed_as_http1_says_and_their_connections_reused_when_they_allow() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = scripted_backend();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{addr}]\n    retries: 0\nworkers: 1\n"
    );
    let lb = Balancer::start(&yaml);
    let reply = |method: &str, path: &str| {
        let r = http1(lb.addr, method, path, &[]);
        (r.status, r.body)
    };
    // Each of these leaves the connection fit for the next: one connection for all.
    assert_eq!(reply("GET", "/chunked"), (200, "hello world".into()));
    assert_eq!(reply("GET", "/interim"), (200, "interim".into()));
    assert_eq!(reply("GET", "/chunked-and-length"), (200, "hello".into()));
    assert_eq!(reply("HEAD", "/head"), (200, String::new()));
    assert_eq!(reply("GET", "/no-content"), (204, String::new()));
    assert_eq!(reply("GET", "/chunked"), (200, "hello world".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "connection reused");
    // A body that runs to the connection's end, and HTTP/1.0: not reused.
    assert_eq!(reply("GET", "/until-close"), (200, "to the end".into()));
    assert_eq!(reply("GET", "/"), (200, "ok".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(reply("GET", "/http10"), (200, "old!".into()));
    assert_eq!(reply("GET", "/"), (200, "ok".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    // `Connection: close` ends reuse even beside `keep-alive`; HTTP/1.0 may ask to keep it.
    assert_eq!(reply("GET", "/close"), (200, "bye".into()));
    assert_eq!(reply("GET", "/http10-keep-alive"), (200, "old!".into()));
    assert_eq!(reply("GET", "/"), (200, "ok".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    // Conflicting lengths cannot be framed: 502, and the connection is not kept.
    assert_eq!(reply("GET", "/bad-length").0, 502);
    assert_eq!(reply("GET", "/"), (200, "ok".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[test]
fn client_requests_are_read_and_answered_as_http1_says() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();

    // Pipelined on one connection: a body framed by its length, a chunked one
    // with extensions and trailers, then a bodyless request.
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nx-t: 1\r\n\r\n\
          GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().body, "5");
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().body, "7");
    let r = read_reply(&mut s, &mut buf).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
    assert!(r.headers.contains_key("date"), "{:?}", r.headers);

    // Expect: 100-continue is answered before the body is sent.
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    while !buf.ends_with(b"HTTP/1.1 100 Continue\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before 100 Continue");
        buf.push(byte[0]);
    }
    buf.clear();
    s.write_all(b"data").unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().body, "4");

    // A request framed two ways is read by its chunks, and is the connection's last.
    let out = raw_exchange(
        lb.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let r = parse_reply(&out);
    assert_eq!((r.status, r.body.as_str()), (200, "5"));
    assert_eq!(r.headers["connection"], "close");

    // Heads that cannot be read get a reply with a reason, and the connection closes.
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\nHost x\r\n\r\n"[..], 400),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ] {
        let r = parse_reply(&raw_exchange(lb.addr, request));
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(request));
        assert!(r.body.starts_with(&status.to_string()), "{}", r.body);
        assert_eq!(r.headers["connection"], "close");
    }
    assert_eq!(
        b.requests().len(),
        5,
        "refused requests reached the backend"
    );
}

#[test]
fn replies_are_framed_for_what_the_client_speaks_and_trailers_reach_who_asked() {
    let (addr, _) = scripted_backend();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{addr}]\n"
    );
    let lb = Balancer::start(&yaml);
    let ask = |extra: &str| {
        let request =
            format!("GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
        String::from_utf8(raw_exchange(lb.addr, request.as_bytes())).unwrap()
    };
    // The backend's chunked body goes on chunked, with its trailer only to a client that said TE: trailers.
    let with = ask("TE: trailers\r\n");
    assert!(with.contains("transfer-encoding: chunked\r\n"), "{with}");
    assert!(with.ends_with("0\r\nx-trailer: 1\r\n\r\n"), "{with}");
    assert_eq!(parse_reply(with.as_bytes()).body, "hello world");
    let without = ask("");
    assert!(without.ends_with("\r\n0\r\n\r\n"), "{without}");
    assert!(!without.contains("x-trailer"), "{without}");

    // HTTP/1.0 has no chunked coding: the body runs to the connection's close.
    let old = raw_exchange(lb.addr, b"GET /chunked HTTP/1.0\r\nHost: x\r\n\r\n");
    let r = parse_reply(&old);
    assert!(
        !r.headers.contains_key("transfer-encoding"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.body, "hello world");
}

#[test]
fn a_refused_request_keeps_its_connection_when_its_unread_body_is_small() {
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]).replace(
        "      - upstream: app",
        "      - match: { host: only.example }\n        upstream: app",
    );
    let lb = Balancer::start(&yaml);
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    // No route: the body is never read by the proxy, so the connection reads it past.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let r = read_reply(&mut s, &mut buf).unwrap();
    assert_eq!(r.status, 404);
    assert!(!r.headers.contains_key("connection"), "{:?}", r.headers);
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().status, 404);
    s.write_all(b"GET / HTTP/1.1\r\nHost: only.example\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().body, "a");

    // More than is worth reading past: the connection closes after the reply.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nhello")
        .unwrap();
    assert_eq!(read_reply(&mut s, &mut buf).unwrap().status, 404);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty() && buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}
