//! A backend that breaks HTTP/1.1 can never make one exchange's bytes the
//! next exchange's answer: whatever it sends, the pooled connection it sent it
//! on is not given to another request unless its response ended cleanly where
//! bascule's framing said it ends.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use common::*;

/// A backend whose first answer on each connection is `first`, and any later
/// one on that connection `reused`: a reply of `reused` (or of bytes `first`
/// left over) would mean a poisoned connection went back to the pool.
fn backend(first: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let first = first.clone();
            std::thread::spawn(move || {
                let mut s = s;
                for n in 0.. {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let answer: &[u8] = if n == 0 {
                        &first
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nreused"
                    };
                    let closes = answer.windows(17).any(|w| w == b"connection: close");
                    if s.write_all(answer).is_err() || closes {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn no_hostile_response_reaches_the_next_exchange() {
    let big_head = {
        let mut h = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 1 << 20));
        h.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
        h
    };
    // (what, the backend's first answer, status, body start, whether the
    // connection is in step after it and may serve the next request).
    let cases: Vec<(&str, Vec<u8>, u16, &str, bool)> = vec![
        (
            "bytes past Content-Length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED".to_vec(),
            200,
            "ok",
            false,
        ),
        (
            "Content-Length beside chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            200,
            "hello",
            // Read by its chunks (RFC 9112 §6.3): the chunks end where the response does.
            true,
        ),
        (
            "a garbage status line",
            b"HTTPX/9 ok\r\n\r\nLEAKED".to_vec(),
            502,
            "502 Bad Gateway",
            false,
        ),
        ("a 1 MiB head", big_head, 502, "502 Bad Gateway", false),
        (
            // Passed on without its coding, the gzip bytes would reach the client as content.
            "gzip, chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n6\r\nLEAKED\r\n0\r\n\r\n".to_vec(),
            502,
            "502 Bad Gateway",
            false,
        ),
        (
            "a body shorter than its Content-Length, then a close",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nshort".to_vec(),
            200,
            "",
            false,
        ),
    ];
    for (what, first, status, body, in_step) in cases {
        let addr = backend(first);
        let yaml = format!(
            "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends: [{addr}]\n    retries: 0\nworkers: 1\n"
        );
        let lb = Balancer::start(&yaml);
        for round in 0..3 {
            let raw = raw_exchange(
                lb.addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            let text = String::from_utf8_lossy(&raw);
            assert!(!text.contains("LEAKED"), "{what}, round {round}: {text}");
            if text.contains("reused") {
                assert!(in_step && round > 0, "{what}, round {round}: {text}");
                continue;
            }
            if body.is_empty() {
                // Cut short: the client sees the response break off, never more.
                continue;
            }
            let reply = parse_reply(&raw);
            assert_eq!(reply.status, status, "{what}, round {round}: {text}");
            assert!(
                reply.body.starts_with(body),
                "{what}, round {round}: {text}"
            );
        }
    }
}
