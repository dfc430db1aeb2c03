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
