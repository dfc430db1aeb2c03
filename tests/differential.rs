//! bascule's framing decisions for client requests beside hyper's server's:
//! the same raw requests sent to a hyper HTTP/1 server directly and through
//! bascule (in front of that same server). Each case must come out alike
//! (accepted with the same body length, or refused), or be listed here, and in
//! the README, as a difference where bascule's answer is the safer one.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

/// A hyper HTTP/1 server answering every request with its body's length, or
/// 400 when the body could not be read.
fn hyper_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let (status, text) = match req.into_body().collect().await {
                                Ok(body) => (200, body.to_bytes().len().to_string()),
                                Err(_) => (400, "body error".to_string()),
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
    });
    addr
}

/// What became of a raw request: `accepted N` (the body length the server
/// read), or `refused` (an error status, or the connection closed unanswered).
fn outcome(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // No half-close: hyper takes the end of a client's input as the end of the
    // connection, and might drop its answer. `Connection: close` ends it instead.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    if out.is_empty() {
        return "refused".into();
    }
    let reply = parse_reply(&out);
    if reply.status == 200 {
        format!("accepted {}", reply.body)
    } else {
        "refused".into()
    }
}

#[test]
fn framing_decisions_match_hypers_but_for_the_listed_differences() {
    let hyper = hyper_server();
    let lb = Balancer::start(&format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends: [{hyper}]\n    retries: 0\n"
    ));
    let chunked = "5\r\nhello\r\n0\r\n\r\n";
    // (case, the fields after the request line, the body)
    let cases: Vec<(&str, String, &str)> = vec![
        ("length", "Content-Length: 5\r\n".into(), "hello"),
        (
            "length twice, agreeing",
            "Content-Length: 5\r\nContent-Length: 5\r\n".into(),
            "hello",
        ),
        (
            "length list, agreeing",
            "Content-Length: 5, 5\r\n".into(),
            "hello",
        ),
        (
            "lengths disagreeing",
            "Content-Length: 5\r\nContent-Length: 6\r\n".into(),
            "hello!",
        ),
        (
            "length with a sign",
            "Content-Length: +5\r\n".into(),
            "hello",
        ),
        ("negative length", "Content-Length: -1\r\n".into(), "hello"),
        ("hex length", "Content-Length: 0x5\r\n".into(), "hello"),
        ("length with junk", "Content-Length: 5a\r\n".into(), "hello"),
        (
            "length overflowing u64",
            "Content-Length: 99999999999999999999\r\n".into(),
            "hello",
        ),
        ("chunked", "Transfer-Encoding: chunked\r\n".into(), chunked),
        (
            "chunked, any case",
            "Transfer-Encoding: ChUnKeD\r\n".into(),
            chunked,
        ),
        (
            "chunked beside a length",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n".into(),
            chunked,
        ),
        (
            "gzip then chunked",
            "Transfer-Encoding: gzip, chunked\r\n".into(),
            chunked,
        ),
        (
            "chunked then gzip",
            "Transfer-Encoding: chunked, gzip\r\n".into(),
            chunked,
        ),
        ("gzip alone", "Transfer-Encoding: gzip\r\n".into(), "hello"),
        (
            "chunked twice",
            "Transfer-Encoding: chunked, chunked\r\n".into(),
            chunked,
        ),
        (
            "chunked in two fields",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".into(),
            chunked,
        ),
        (
            "obs-fold in Transfer-Encoding",
            "Transfer-Encoding:\r\n chunked\r\n".into(),
            chunked,
        ),
        (
            "space before the colon",
            "Content-Length : 5\r\n".into(),
            "hello",
        ),
        (
            "bare CR in a value",
            "X-A: a\rb\r\nContent-Length: 5\r\n".into(),
            "hello",
        ),
        (
            "NUL in a value",
            "X-A: a\0b\r\nContent-Length: 5\r\n".into(),
            "hello",
        ),
        (
            "chunk extension",
            "Transfer-Encoding: chunked\r\n".into(),
            "5;a=b\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk size overflowing",
            "Transfer-Encoding: chunked\r\n".into(),
            "FFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk size with junk",
            "Transfer-Encoding: chunked\r\n".into(),
            "5x\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk data longer than said",
            "Transfer-Encoding: chunked\r\n".into(),
            "3\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "two Host fields",
            "Host: other\r\nContent-Length: 5\r\n".into(),
            "hello",
        ),
    ];
    // Where the two differ: (case, hyper, bascule, why bascule's answer is the safer one).
    let differences: &[(&str, &str, &str, &str)] = &[
        (
            "length list, agreeing",
            "refused",
            "accepted 5",
            "RFC 9110 §8.6 lets a recipient take agreeing copies; bascule forwards one plain value, so no one behind it sees the list",
        ),
        (
            "gzip then chunked",
            "accepted 5",
            "refused",
            "a coding bascule would drop on the way: 501 (RFC 9112 §6.1), as NGINX answers",
        ),
        (
            "chunked twice",
            "accepted 5",
            "refused",
            "RFC 9112 §7: chunked is applied once; a second is a framing no one should guess at",
        ),
        (
            "chunked in two fields",
            "accepted 5",
            "refused",
            "the same: two fields are one list (RFC 9110 §5.3)",
        ),
        (
            "two Host fields",
            "accepted 5",
            "refused",
            "RFC 9112 §3.2: a request with more than one Host is a 400",
        ),
    ];
    let mut found = Vec::new();
    for (case, fields, body) in &cases {
        let raw = format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n{body}");
        let direct = outcome(hyper, raw.as_bytes());
        let through = outcome(lb.addr, raw.as_bytes());
        if direct != through {
            found.push((case, direct, through));
        }
    }
    let unlisted: Vec<String> = found
        .iter()
        .filter(|(case, direct, through)| {
            !differences
                .iter()
                .any(|(c, h, b, _)| c == *case && h == direct && b == through)
        })
        .map(|(case, direct, through)| format!("{case}: hyper {direct}, bascule {through}"))
        .collect();
    assert!(unlisted.is_empty(), "not listed differences: {unlisted:#?}");
    let found_cases: Vec<&str> = found.iter().map(|(c, _, _)| **c).collect();
    for (case, ..) in differences {
        assert!(
            found_cases.contains(case),
            "{case} is listed but no longer differs"
        );
    }
    eprintln!(
        "{} cases, {} differences: {found_cases:?}",
        cases.len(),
        found.len()
    );
}
