//! Requests whose framing or addressing RFC 9112 and RFC 9110 rule out are
//! refused, or passed on in the one form the RFCs allow; never forwarded as
//! they came. Each case once forwarded what it should not have.

mod common;

use common::*;

fn balancer(b: &TestBackend) -> Balancer {
    Balancer::start(&simple_config(&[b]))
}

#[test]
fn a_coding_other_than_chunked_is_501_and_reaches_no_backend() {
    let b = TestBackend::start("a");
    let lb = balancer(&b);
    let reply = parse_reply(&raw_exchange(
        lb.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ));
    assert_eq!(reply.status, 501, "{reply:?}");
    assert!(b.requests().is_empty(), "{:?}", b.requests());
}

#[test]
fn an_http10_request_with_transfer_encoding_is_400_and_nothing_behind_it_is_read() {
    let b = TestBackend::start("a");
    let lb = balancer(&b);
    let raw = raw_exchange(
        lb.addr,
        b"POST /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 400, "{reply:?}");
    // One reply, then the close.
    assert_eq!(
        String::from_utf8_lossy(&raw).matches("HTTP/1.1 ").count(),
        1
    );
    assert!(b.requests().is_empty(), "{:?}", b.requests());
}

#[test]
fn content_length_copies_that_agree_go_on_as_one_plain_value() {
    let b = TestBackend::start("a");
    let lb = balancer(&b);
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 5\r\n",
    ] {
        let request =
            format!("POST /upload HTTP/1.1\r\nHost: x\r\n{lengths}Connection: close\r\n\r\nhello");
        let reply = parse_reply(&raw_exchange(lb.addr, request.as_bytes()));
        assert_eq!((reply.status, reply.body.as_str()), (200, "5"), "{lengths}");
        let seen = b.requests().pop().unwrap();
        let sent: Vec<_> = seen.headers.get_all("content-length").iter().collect();
        assert_eq!(sent, ["5"], "{lengths}");
    }
}

#[test]
fn an_absolute_form_target_names_the_host_for_routing_and_the_backend() {
    let (good, evil) = (TestBackend::start("good"), TestBackend::start("evil"));
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - match: {{ host: evil.test }}\n        upstream: evil\n      - upstream: good\nupstreams:\n  good:\n    backends: [{}]\n  evil:\n    backends: [{}]\n",
        good.addr, evil.addr
    );
    let lb = Balancer::start(&yaml);
    let reply = parse_reply(&raw_exchange(
        lb.addr,
        b"GET http://evil.test/abs HTTP/1.1\r\nHost: good.test\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!((reply.status, reply.body.as_str()), (200, "evil"));
    assert!(good.requests().is_empty());
    let seen = evil.requests().pop().unwrap();
    assert_eq!(seen.path, "/abs");
    assert_eq!(seen.headers["host"], "evil.test");
}

#[test]
fn two_hosts_or_a_host_that_is_not_one_are_400() {
    let b = TestBackend::start("a");
    let lb = balancer(&b);
    for hosts in [
        "Host: a.test\r\nHost: b.test\r\n",
        "Host: a b/c@d\r\n",
        "Host: user@a.test\r\n",
        "Host: a.test/path\r\n",
    ] {
        let request = format!("GET / HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let reply = parse_reply(&raw_exchange(lb.addr, request.as_bytes()));
        assert_eq!(reply.status, 400, "{hosts:?}: {reply:?}");
    }
    assert!(b.requests().is_empty(), "{:?}", b.requests());
}

#[test]
fn an_http10_request_without_host_reaches_the_backend_with_one() {
    let b = TestBackend::start("a");
    let lb = balancer(&b);
    let reply = parse_reply(&raw_exchange(lb.addr, b"GET /old HTTP/1.0\r\n\r\n"));
    assert_eq!((reply.status, reply.body.as_str()), (200, "a"));
    let seen = b.requests().pop().unwrap();
    assert_eq!(seen.headers["host"], b.addr.to_string());
}
