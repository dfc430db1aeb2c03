//! Weighted round robin through the real server.

mod common;

use common::*;

#[test]
fn weights_share_requests_smoothly_across_workers() {
    let (a, b, c) = (
        TestBackend::start("a"),
        TestBackend::start("b"),
        TestBackend::start("c"),
    );
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends:\n      - {{ address: {}, weight: 5 }}\n      - {}\n      - {}\nworkers: 2\n",
        a.addr, b.addr, c.addr
    );
    let lb = Balancer::start(&yaml);
    // Sequential requests on fresh connections land on either worker; the rotation is shared.
    let order: String = (0..14).map(|_| get(lb.addr, "/").body).collect();
    assert_eq!(order, "aabacaaaabacaa");
    let counts = tally(lb.addr, 700);
    assert_eq!(counts["a"], 500);
    assert_eq!(counts["b"], 100);
    assert_eq!(counts["c"], 100);
}
