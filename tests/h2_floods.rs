//! HTTP/2 from clients holds against the known floods: the limits set in
//! `server.rs` end an abusive connection, and everyone else is served.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Rapid reset (CVE-2023-44487): streams opened and reset at once, faster than
/// they can be served. The connection is told to go away long before its
/// thousands of streams reach a backend, and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_and_others_are_served() {
    let b = TestBackend::start("a");
    b.delay_ms.store(50, std::sync::atomic::Ordering::SeqCst);
    let lb = tokio::task::spawn_blocking({
        let yaml = simple_config(&[&b]);
        move || Balancer::start(&yaml)
    })
    .await
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let mut reset = 0;
    for _ in 0..10_000 {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::get("http://x/slow").body(()).unwrap();
        let Ok((_, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    // bascule ends the connection: the client's connection task finishes with an error.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the flooding connection was not ended");
    let err = ended
        .unwrap()
        .expect_err("the flooding connection was not ended in error");
    assert!(reset < 10_000, "all {reset} resets were taken");
    eprintln!(
        "rapid reset: ended after {reset} resets in {:?}: {err}",
        started.elapsed()
    );
    // Another client is served at once.
    let addr = lb.addr;
    let reply = tokio::task::spawn_blocking(move || get(addr, "/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    // Of the streams reset, few reached the backend.
    let seen = b.requests().len();
    assert!(seen < 1_000, "{seen} reset streams were forwarded");
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}
