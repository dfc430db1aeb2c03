//! Who the client is, through the real server: behind an L4 load balancer,
//! the PROXY protocol header (v1 and v2), its client address in
//! `X-Forwarded-For`, the access log and client_ip hashing, and connections
//! without one closed; behind an L7 proxy, the `X-Forwarded-For` of
//! `trusted_proxies` believed and everyone else's not.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// `simple_config` with a PROXY protocol listener, logging to `log` as JSON.
fn config(backends: &[&TestBackend], log: &std::path::Path) -> String {
    simple_config(backends).replace("    routes:", "    proxy_protocol: true\n    routes:")
        + &format!("access_log: {}\naccess_log_format: json\n", log.display())
}

/// Sends `header`, then a request, in the given pieces; the reply, or what
/// came back (nothing when the connection was closed).
fn exchange(addr: std::net::SocketAddr, pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for piece in pieces {
        // A closed connection may refuse a later piece: what came back tells.
        if s.write_all(piece).is_err() {
            break;
        }
        s.flush().unwrap();
        std::thread::yield_now();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

const REQUEST: &[u8] = b"GET /pp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(addresses);
    h
}

#[test]
fn the_client_a_proxy_protocol_header_states_is_the_one_forwarded_and_logged() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let lb = Balancer::start(&config(&[&a], &log));
    let forwarded = |i: usize| a.requests()[i].headers["x-forwarded-for"].clone();

    // Version 1, header and request in one write.
    let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 80\r\n";
    let reply = parse_reply(&exchange(lb.addr, &[&[v1.as_slice(), REQUEST].concat()]));
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded(0), "192.0.2.7");

    // Version 1 over IPv6, in pieces that split the header: read to its end, no further.
    let v1 = b"PROXY TCP6 2001:db8::7 ::1 51000 80\r\n";
    let reply = parse_reply(&exchange(
        lb.addr,
        &[&v1[..9], &v1[9..20], &v1[20..], REQUEST],
    ));
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded(1), "2001:db8::7");

    // Version 2 with a TLV after the addresses (an authority, as AWS's NLB sends).
    let mut addresses = vec![198, 51, 100, 9, 127, 0, 0, 1, 0xc7, 0x38, 0, 80];
    addresses.extend_from_slice(&[0x02, 0, 9]);
    addresses.extend_from_slice(b"x.example");
    let header = v2(1, 0x11, &addresses);
    let reply = parse_reply(&exchange(
        lb.addr,
        &[&header[..14], &[&header[14..], REQUEST].concat()],
    ));
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded(2), "198.51.100.9");

    // Version 2's LOCAL (a sender's health check) and v1's UNKNOWN: the connection's own peer.
    let reply = parse_reply(&exchange(
        lb.addr,
        &[&[v2(0, 0, &[]).as_slice(), REQUEST].concat()],
    ));
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded(3), "127.0.0.1");
    let reply = parse_reply(&exchange(lb.addr, &[b"PROXY UNKNOWN\r\n", REQUEST]));
    assert_eq!(reply.status, 200);
    assert_eq!(forwarded(4), "127.0.0.1");

    // The access log names the stated client.
    wait_until(Duration::from_secs(10), "five log lines", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 5)
    });
    let clients: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["client"].to_string())
        .collect();
    assert_eq!(
        clients,
        [
            "\"192.0.2.7\"",
            "\"2001:db8::7\"",
            "\"198.51.100.9\"",
            "\"127.0.0.1\"",
            "\"127.0.0.1\""
        ]
    );
}

#[test]
fn a_connection_without_a_valid_header_is_closed_and_reaches_no_backend() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&[&a], &dir.path().join("access.log")).replace(
        "    proxy_protocol: true\n",
        "    proxy_protocol: true\n    timeouts: { header_read: 300ms }\n",
    );
    let lb = Balancer::start(&yaml);
    // What each connection sends: a bad start, then the request (which must not be served).
    let refused: [&[&[u8]]; 6] = [
        &[REQUEST],
        &[b"PROXY TCP4 192.0.2.300 127.0.0.1 51000 80\r\n", REQUEST],
        &[b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 80 and on and on and on and on and on and on and on and on and on and on\r\n", REQUEST],
        &[b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff", REQUEST],
        &[b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c", REQUEST],
        // Not whole within header_read.
        &[b"PROXY TCP4 192.0.2.7"],
    ];
    for pieces in refused {
        let back = exchange(lb.addr, pieces);
        assert!(
            back.is_empty(),
            "{:?} got {:?}",
            String::from_utf8_lossy(pieces[0]),
            String::from_utf8_lossy(&back)
        );
    }
    assert!(a.requests().is_empty());
    // Each is counted, by reason: a sender that does not speak it shows in the metrics.
    let metrics = get(lb.admin(), "/metrics").body;
    let refused = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("bascule_proxy_protocol_refused_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {reason} line in:\n{metrics}"))
            .to_string()
    };
    assert_eq!(
        (refused("missing"), refused("invalid"), refused("timeout")),
        ("1".into(), "4".into(), "1".into())
    );
    // The listener serves on.
    let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 80\r\n";
    let reply = parse_reply(&exchange(lb.addr, &[v1, REQUEST]));
    assert_eq!(reply.status, 200);
    assert_eq!(a.requests().len(), 1);
}

#[test]
fn client_ip_hashing_uses_the_stated_client() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&[&a, &b], &dir.path().join("access.log")).replace(
        "  app:\n    backends:",
        "  app:\n    balance: consistent_hash\n    hash_key: client_ip\n    backends:",
    );
    let lb = Balancer::start(&yaml);
    // Every connection comes from 127.0.0.1; the clients they state spread.
    for i in 0..40 {
        let v1 = format!(
            "PROXY TCP4 10.0.{}.{} 127.0.0.1 51000 80\r\n",
            i / 7,
            i % 250
        );
        let reply = parse_reply(&exchange(lb.addr, &[v1.as_bytes(), REQUEST]));
        assert_eq!(reply.status, 200);
    }
    let (na, nb) = (a.requests().len(), b.requests().len());
    assert_eq!(na + nb, 40);
    assert!(na > 0 && nb > 0, "a {na}, b {nb}");
}

/// The `client` of each line of a JSON access log, once it has `n` lines.
fn logged_clients(log: &std::path::Path, n: usize) -> Vec<String> {
    wait_until(Duration::from_secs(10), "the access log's lines", || {
        std::fs::read_to_string(log).is_ok_and(|s| s.lines().count() == n)
    });
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["client"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_trusted_proxys_forwarded_for_names_the_client_and_no_one_elses_does() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // Two listeners: one trusting 127.0.0.0/8 (these tests' own address) and 10.0.0.0/8, one
    // not. Their binds differ: a listener is known by its configured bind.
    let yaml = (simple_config(&[&a, &b]) + &format!("access_log: {}\naccess_log_format: json\n", log.display()))
        .replace(
            "listeners:\n",
            &format!("listeners:\n  - bind: 127.0.0.1:{}\n    trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n    routes:\n      - upstream: app\n", free_port()),
        )
        .replace(
            "  app:\n    backends:",
            "  app:\n    balance: consistent_hash\n    hash_key: client_ip\n    backends:",
        );
    let lb = Balancer::start(&yaml);
    let bound = lb.server().listener_addrs();
    let (trusting, plain) = (bound[0], bound[1]);
    let forwarded = |addr, path: &str, list: &str| {
        let reply = http1(addr, "GET", path, &[&format!("X-Forwarded-For: {list}")]);
        assert_eq!(reply.status, 200);
    };

    forwarded(trusting, "/", "198.51.100.1, 203.0.113.9, 10.1.2.3");
    forwarded(plain, "/", "198.51.100.1, 203.0.113.9, 10.1.2.3");
    assert_eq!(logged_clients(&log, 2), ["203.0.113.9", "127.0.0.1"]);
    // The list goes on to the backend with the peer appended, as from any client.
    let seen: Vec<_> = a.requests().into_iter().chain(b.requests()).collect();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(
            r.headers["x-forwarded-for"],
            "198.51.100.1, 203.0.113.9, 10.1.2.3, 127.0.0.1"
        );
    }

    // client_ip hashing follows the forwarded client through the trusting listener only.
    for i in 0..40 {
        forwarded(trusting, "/trusting", &format!("203.0.{i}.{i}"));
        forwarded(plain, "/plain", &format!("203.0.{i}.{i}"));
    }
    let on = |backend: &TestBackend, path: &str| {
        backend.requests().iter().filter(|r| r.path == path).count()
    };
    let trusting = (on(&a, "/trusting"), on(&b, "/trusting"));
    let plain = (on(&a, "/plain"), on(&b, "/plain"));
    assert!(trusting.0 > 0 && trusting.1 > 0, "trusting {trusting:?}");
    assert!(plain == (40, 0) || plain == (0, 40), "plain {plain:?}");
}
