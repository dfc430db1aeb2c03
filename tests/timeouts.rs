//! Client-side timeouts: keep-alive idle and request-head read, kept apart.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn config_with(b: &TestBackend, timeouts: &str) -> String {
    simple_config(&[b]).replace(
        "    routes:",
        &format!("    timeouts: {timeouts}\n    routes:"),
    )
}

/// Reads until the peer closes; returns what arrived and how long it took.
fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, start.elapsed()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, start.elapsed()),
            Err(e) => panic!("read failed after {:?}: {e}", start.elapsed()),
        }
    }
}

#[test]
fn idle_keepalive_connection_is_closed_after_keepalive_not_header_read() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&config_with(
        &b,
        "{ keepalive: 1500ms, header_read: 300ms }",
    ));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 200];
    let n = s.read(&mut first).unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // Idle well past header_read: still open, and serves the next request.
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let n = s.read(&mut first).unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    // Then closed once idle for `keepalive`.
    let (rest, took) = read_until_closed(&mut s);
    assert!(rest.is_empty());
    assert!(
        took >= Duration::from_millis(1300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn a_slow_request_head_is_cut_at_header_read() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&config_with(&b, "{ keepalive: 10s, header_read: 400ms }"));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(); // never finished
    let (_, took) = read_until_closed(&mut s);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(b.requests().is_empty());
}

#[test]
fn a_stalled_upload_gets_408_and_costs_its_backend_nothing() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    // One failure ejects a backend (one of two may be), if the stall were counted against it.
    let yaml = simple_config(&[&a, &b])
        .replace("    routes:", "    timeouts: { body: 300ms }\n    routes:")
        .replace(
            "    backends:\n",
            "    passive: { consecutive_failures: 1, ejection: 30s }\n    backends:\n",
        );
    let lb = Balancer::start(&yaml);
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    let (reply, took) = read_until_closed(&mut s);
    let r = parse_reply(&reply);
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Neither backend was blamed: both still take requests.
    let served = tally(lb.addr, 6);
    assert_eq!(served.len(), 2, "{served:?}");
}

#[test]
fn a_client_that_stops_reading_its_reply_is_cut_after_send() {
    let b = TestBackend::start("a");
    let lb = Balancer::start(&config_with(&b, "{ send: 300ms }"));
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let size: u64 = 256 << 20;
    write!(s, "GET /big?bytes={size} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Not reading: once bascule gives up, the reply's backend connection,
    // cut short, is closed rather than kept.
    let open = || b.open.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "the backend connection opened",
        || open() == 1,
    );
    wait_until(Duration::from_secs(10), "the reply given up", || {
        open() == 0
    });
    let (got, _) = read_until_closed(&mut s);
    assert!((got.len() as u64) < size, "{} bytes arrived", got.len());
}
