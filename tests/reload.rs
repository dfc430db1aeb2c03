//! Reloads that change listeners, keep sockets and carry backend state.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bascule::config;
use common::*;

fn reload(lb: &Balancer, yaml: &str) {
    let config = config::decode(yaml, std::path::Path::new(".")).unwrap();
    lb.server().reload(config).unwrap();
}

fn two_listeners(a: &TestBackend, b: &TestBackend) -> String {
    format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: one }}]\n  - bind: 127.0.0.2:0\n    routes: [{{ upstream: two }}]\nupstreams:\n  one: {{ backends: [{}] }}\n  two: {{ backends: [{}] }}\nadmin: {{ bind: 127.0.0.1:0 }}\n",
        a.addr, b.addr
    )
}

#[test]
fn a_reload_adds_and_removes_listeners() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let one = simple_config(&[&a])
        .replace("upstream: app", "upstream: one")
        .replace("  app:", "  one:");
    let lb = Balancer::start(&one);
    assert_eq!(lb.server().listener_addrs().len(), 1);

    reload(&lb, &two_listeners(&a, &b));
    let addrs = lb.server().listener_addrs();
    assert_eq!(addrs.len(), 2);
    assert_eq!(get(addrs[0], "/").body, "a");
    assert_eq!(get(addrs[1], "/").body, "b");

    // Remove the second while a request is in flight on it: that request finishes.
    b.delay_ms.store(500, Ordering::SeqCst);
    let mut s = TcpStream::connect(addrs[1]).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    wait_until(Duration::from_secs(5), "b to get the request", || {
        b.requests().len() >= 2
    });
    reload(&lb, &one);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(parse_reply(&out).body, "b");
    wait_until(Duration::from_secs(5), "the listener to close", || {
        TcpStream::connect(addrs[1]).is_err()
    });
    assert_eq!(lb.server().listener_addrs(), vec![addrs[0]]);
    assert_eq!(get(addrs[0], "/").body, "a");
}

#[test]
fn fifty_reloads_under_load_refuse_no_connection_and_fail_no_request() {
    let (a, b, c) = (
        TestBackend::start("a"),
        TestBackend::start("b"),
        TestBackend::start("c"),
    );
    let configs = [simple_config(&[&a, &b, &c]), simple_config(&[&b, &c])];
    let lb = Balancer::start(&configs[0]);
    let addr = lb.addr;
    // A 5 s request in flight across all the reloads.
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=5000").status);
    // 16 clients keep their connection, 16 open one per request.
    let load = Load::start(addr, 16, 16);
    for round in 0..50 {
        reload(&lb, &configs[round % 2]);
        load.wait_for(30, "requests after the reload");
    }
    let (sent, failed) = load.stop();
    eprintln!("50 reloads under load: {sent} requests, {failed} failed");
    assert_eq!(failed, 0);
    assert_eq!(slow.join().unwrap(), 200);
}

#[test]
fn a_request_in_flight_across_a_reload_completes_and_counts_survive() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let yaml = simple_config(&[&a, &b]).replace(
        "    backends:\n",
        "    balance: least_connections\n    backends:\n",
    );
    let lb = Balancer::start(&yaml);
    a.delay_ms.store(1500, Ordering::SeqCst);
    b.delay_ms.store(1500, Ordering::SeqCst);
    let addr = lb.addr;
    let slow = std::thread::spawn(move || get(addr, "/").status);
    wait_until(Duration::from_secs(5), "a request in flight", || {
        a.requests().len() + b.requests().len() == 1
    });
    // Reload to a config that drops nothing but changes a weight.
    reload(
        &lb,
        &yaml.replace(
            &format!("      - {}\n", b.addr),
            &format!("      - {{ address: {}, weight: 2 }}\n", b.addr),
        ),
    );
    let snapshot = lb.server().state().load_full();
    let in_flight: usize = snapshot
        .upstream("app")
        .unwrap()
        .backends
        .iter()
        .map(|x| x.state.active_requests())
        .sum();
    assert_eq!(in_flight, 1, "the in-flight count was lost");
    assert_eq!(slow.join().unwrap(), 200);
    let snapshot = lb.server().state().load_full();
    assert!(snapshot
        .upstream("app")
        .unwrap()
        .backends
        .iter()
        .all(|x| x.state.active_requests() == 0));
}

#[test]
fn the_preview_predicts_the_keys_a_reload_moves() {
    let backends: Vec<String> = (1..=10)
        .map(|i| format!("127.0.0.1:{}", 9000 + i))
        .collect();
    let yaml = |list: &[String]| {
        format!(
            "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    balance: consistent_hash\n    hash_key: header:x-user\n    backends: [{}]\n",
            list.join(", ")
        )
    };
    let old = config::decode(&yaml(&backends), std::path::Path::new(".")).unwrap();
    let mut fewer = backends.clone();
    fewer.remove(3);
    fewer.push("127.0.0.1:9100".into());
    let new = config::decode(&yaml(&fewer), std::path::Path::new(".")).unwrap();
    let lines = bascule::preview::preview(&old, &new);
    let predicted = preview_share(lines.iter().map(String::as_str)).unwrap();
    // What the running server then does: the same keys through the real
    // snapshots, the old one's picks taken before the reload (which retires
    // the backends it removes from the old snapshot too).
    let old_snapshot = bascule::state::Snapshot::build(std::sync::Arc::new(old), None);
    let keys = 100_000u64;
    let key = |k: u64| {
        Some(bascule::balance::hash::hash64(
            &k.wrapping_mul(7919).to_le_bytes(),
        ))
    };
    let pick = |snapshot: &bascule::state::Snapshot, k: u64| {
        let upstream = snapshot.upstream("app").unwrap();
        upstream
            .pick_index(&[], key(k))
            .map(|i| upstream.backends[i].address.clone())
    };
    let before: Vec<_> = (0..keys).map(|k| pick(&old_snapshot, k)).collect();
    let new_snapshot =
        bascule::state::Snapshot::build(std::sync::Arc::new(new), Some(&old_snapshot));
    let moved = (0..keys)
        .filter(|&k| before[k as usize] != pick(&new_snapshot, k))
        .count();
    let actual = moved as f64 * 100.0 / keys as f64;
    eprintln!("preview {predicted:.2}% of keys move; the reload moved {actual:.2}%");
    assert!(
        (predicted - actual).abs() <= 1.0,
        "{predicted} against {actual}"
    );
}

#[test]
fn backend_state_survives_a_reload_that_reweights_it() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let lb = Balancer::start(&simple_config(&[&a, &b]));
    let before = lb.server().state().load_full();
    before.upstream("app").unwrap().backends[1]
        .state
        .set_healthy(false);
    let yaml = simple_config(&[&a, &b]).replace(
        &format!("      - {}\n", b.addr),
        &format!("      - {{ address: {}, weight: 5 }}\n", b.addr),
    );
    reload(&lb, &yaml);
    let after = lb.server().state().load_full();
    let backend = &after.upstream("app").unwrap().backends[1];
    assert_eq!(backend.weight, 5);
    assert!(!backend.state.is_healthy());
    assert_eq!(tally(lb.addr, 10).get("a"), Some(&10));
}

#[test]
fn a_reload_that_cannot_bind_changes_nothing() {
    let a = TestBackend::start("a");
    let lb = Balancer::start(&simple_config(&[&a]));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let yaml = simple_config(&[&a]).replace(
        "listeners:\n",
        &format!(
            "listeners:\n  - bind: {}\n    routes: [{{ upstream: app }}]\n",
            taken.local_addr().unwrap()
        ),
    );
    let config = config::decode(&yaml, std::path::Path::new(".")).unwrap();
    let err = lb.server().reload(config).unwrap_err();
    assert!(err.to_string().contains("cannot listen on"), "{err}");
    assert_eq!(lb.server().listener_addrs().len(), 1);
    assert_eq!(get(lb.addr, "/").body, "a");
}

#[test]
fn a_drained_backend_finishes_its_requests_and_gets_no_new_ones() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let lb = Balancer::start(&simple_config(&[&a, &b]));
    let admin = lb.admin();
    b.delay_ms.store(600, Ordering::SeqCst);
    // A slow request on b, in flight while b is drained.
    let addr = lb.addr;
    let slow = std::thread::spawn(move || (0..2).map(|_| get(addr, "/").body).collect::<Vec<_>>());
    wait_until(Duration::from_secs(5), "b busy", || {
        !b.requests().is_empty()
    });
    let drain = format!("/upstreams/app/backends/{}/drain", b.addr);
    let r = http1(admin, "POST", &drain, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["draining"], true);
    assert_eq!(v["active_requests"], 1);
    assert_eq!(tally(lb.addr, 10).get("a"), Some(&10));
    assert!(slow.join().unwrap().contains(&"b".to_string()));
    wait_until(Duration::from_secs(5), "b idle", || {
        let s = status_json(admin);
        let backends = s["upstreams"]["app"]["backends"]
            .as_array()
            .unwrap()
            .clone();
        backends
            .iter()
            .any(|x| x["draining"] == true && x["active_requests"] == 0)
    });
    // Draining survives a reload, and undrain puts it back.
    reload(&lb, &simple_config(&[&a, &b]));
    assert_eq!(tally(lb.addr, 6).get("a"), Some(&6));
    let undrain = format!("/upstreams/app/backends/{}/undrain", b.addr);
    assert_eq!(http1(admin, "POST", &undrain, &[]).status, 200);
    b.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(tally(lb.addr, 6).get("b"), Some(&3));
    assert_eq!(
        http1(
            admin,
            "POST",
            "/upstreams/app/backends/10.9.9.9:1/drain",
            &[]
        )
        .status,
        404
    );
    assert_eq!(http1(admin, "GET", &drain, &[]).status, 405);
}
