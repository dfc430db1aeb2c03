//! The replies bascule makes itself: 404, 400, 431, 502, 503, 504, each with a short body.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

fn assert_reply(r: &Reply, status: u16, start: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert!(
        r.body.starts_with(start),
        "body {:?} should start with {start:?}",
        r.body
    );
    assert!(r.body.len() < 200, "{:?}", r.body);
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
}

#[test]
fn no_route_is_404() {
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]).replace(
        "      - upstream: app",
        "      - match: { path_prefix: /app }\n        upstream: app",
    );
    let lb = Balancer::start(&yaml);
    assert_reply(&get(lb.addr, "/elsewhere"), 404, "404 Not Found");
    assert_eq!(get(lb.addr, "/app/x").status, 200);
}

#[test]
fn unreachable_backend_is_502() {
    // A port that was free a moment ago: nothing listens there.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{free}]\n"
    );
    let lb = Balancer::start(&yaml);
    assert_reply(&get(lb.addr, "/"), 502, "502 Bad Gateway");
}

#[test]
fn backend_that_breaks_the_exchange_is_502() {
    // Accepts, reads the request, and closes without answering.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
        }
    });
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{addr}]\n"
    );
    let lb = Balancer::start(&yaml);
    assert_reply(&get(lb.addr, "/"), 502, "502 Bad Gateway");
}

#[test]
fn no_healthy_backend_is_503() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let snapshot = lb.server().state().load_full();
    snapshot.upstream("app").unwrap().backends[0]
        .state
        .set_healthy(false);
    assert_reply(&get(lb.addr, "/"), 503, "503 Service Unavailable");
    assert!(b.requests().is_empty());
    snapshot.upstream("app").unwrap().backends[0]
        .state
        .set_healthy(true);
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn slow_backend_is_504_after_the_response_timeout() {
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]).replace(
        "    backends:\n",
        "    timeouts: { response: 200ms }\n    backends:\n",
    );
    let lb = Balancer::start(&yaml);
    let started = std::time::Instant::now();
    assert_reply(&get(lb.addr, "/slow?ms=5000"), 504, "504 Gateway Timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert_eq!(get(lb.addr, "/slow?ms=10").status, 200);
}

#[test]
fn http11_without_host_is_400() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&b]));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_reply(&parse_reply(&out), 400, "400 Bad Request");
}

#[test]
fn oversized_head_is_431() {
    let b = TestBackend::start("a");
    let yaml =
        simple_config(&[&b]).replace("    routes:", "    max_header_bytes: 4096\n    routes:");
    let lb = Balancer::start(&yaml);
    let big = format!("X-Big: {}", "z".repeat(5000));
    assert_reply(
        &http1(lb.addr, "GET", "/", &[&big]),
        431,
        "431 Request Header Fields Too Large",
    );
    let fits = format!("X-Big: {}", "z".repeat(3000));
    assert_eq!(http1(lb.addr, "GET", "/", &[&fits]).status, 200);
    // Far over the limit, hyper itself refuses the head: still a 431.
    let huge = format!("X-Big: {}", "z".repeat(20000));
    assert_eq!(http1(lb.addr, "GET", "/", &[&huge]).status, 431);
    assert!(b.requests().len() == 1);
}

/// A backend that answers an upload before reading it (a 413) and closes:
/// bascule's writes of the rest then fail, and the answer already there is
/// what the client must get, not a 502.
#[test]
fn a_backend_that_refuses_an_upload_and_closes_is_heard() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let mut s = s;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = s.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n",
            );
            // Closed with the body unread: the kernel answers the rest with a reset.
        }
    });
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends: [{backend}]\n"
    );
    let lb = Balancer::start(&yaml);
    let size = 16 << 20;
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The client sends on until bascule answers (or stops reading).
    let chunk = vec![b'x'; 64 * 1024];
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..size / chunk.len() {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let reply = read_reply(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.body, "too big\n");
    drop(s);
    let _ = writer.join();
}
