//! Failure detection through the real server: active checks, passive ejection,
//! retries and the retry budget.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn checked_config(backends: &[&TestBackend], extra: &str) -> String {
    simple_config(backends).replace(
        "    backends:\n",
        &format!(
            "    health_check: {{ path: /healthz, interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2 }}\n{extra}    backends:\n"
        ),
    )
}

#[test]
fn a_backend_killed_under_load_costs_no_request_and_comes_back() {
    let (a, b, c) = (
        TestBackend::start("a"),
        TestBackend::start("b"),
        TestBackend::start("c"),
    );
    let lb = Balancer::start(&checked_config(&[&a, &b, &c], ""));
    let (addr, admin) = (lb.addr, lb.admin());
    let b_addr = b.addr;
    let load = Load::start(addr, 32, 0);
    load.wait_for(500, "load to start");

    // Kill b: its listener and every open connection go at once.
    let killed = Instant::now();
    drop(b);
    wait_until(Duration::from_secs(10), "b to be marked down", || {
        !shown_healthy(admin, b_addr)
    });
    let detection = killed.elapsed();
    // unhealthy_threshold × interval + timeout, with scheduling slack.
    assert!(
        detection < Duration::from_millis(2 * 100 + 100 + 700),
        "detected after {detection:?}"
    );
    load.wait_for(2000, "more load");

    // Restart it on the same address: back within healthy_threshold × interval.
    let restarted = Instant::now();
    let b = TestBackend::start_at("b", b_addr);
    wait_until(Duration::from_secs(10), "b to be marked up", || {
        shown_healthy(admin, b_addr)
    });
    let recovery = restarted.elapsed();
    wait_until(Duration::from_secs(10), "b to get traffic again", || {
        !b.requests().is_empty()
    });

    let (sent, failed) = load.stop();
    eprintln!("kill under load: {sent} requests, {failed} failed; down after {detection:?}, up after {recovery:?}");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    let m = get(admin, "/metrics").body;
    let down = format!("bascule_health_transitions_total{{upstream=\"app\",backend=\"{b_addr}\",to=\"unhealthy\"}} 1");
    let up = format!("bascule_health_transitions_total{{upstream=\"app\",backend=\"{b_addr}\",to=\"healthy\"}} 1");
    assert!(m.contains(&down) && m.contains(&up), "{m}");
}

#[test]
fn a_flapping_health_endpoint_does_not_flap_traffic() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    b.health.store(HEALTH_FLAP, Ordering::SeqCst);
    let lb = Balancer::start(&checked_config(&[&a, &b], ""));
    // Pass, fail, pass, fail...: never two failures in a row, so never down.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        assert!(shown_healthy(lb.admin(), b.addr));
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = get(lb.admin(), "/metrics").body;
    let went_down = format!("backend=\"{}\",to=\"unhealthy\"}} 0", b.addr);
    assert!(m.contains(&went_down), "{m}");
    // Now failing for good: down after two probes.
    b.health.store(HEALTH_FAIL, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b to go down", || {
        !shown_healthy(lb.admin(), b.addr)
    });
    let counts = tally(lb.addr, 20);
    assert_eq!(counts.get("a"), Some(&20));
}

#[test]
fn initial_unhealthy_backends_wait_for_their_first_passes() {
    let a = TestBackend::start("a");
    let lb = Balancer::start(&checked_config(&[&a], "").replace(
        "unhealthy_threshold: 2 }",
        "unhealthy_threshold: 2, initial: unhealthy }",
    ));
    assert_eq!(get(lb.addr, "/").status, 503);
    wait_until(Duration::from_secs(5), "a to come up", || {
        shown_healthy(lb.admin(), a.addr)
    });
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn all_backends_down_gives_503_at_once() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let lb = Balancer::start(&checked_config(&[&a, &b], ""));
    a.health.store(HEALTH_FAIL, Ordering::SeqCst);
    b.health.store(HEALTH_FAIL, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "both down", || {
        !shown_healthy(lb.admin(), a.addr) && !shown_healthy(lb.admin(), b.addr)
    });
    let mut client = KeepAlive::new(lb.addr);
    client.get("/").unwrap();
    let started = Instant::now();
    let (status, body) = client.get("/").unwrap();
    let took = started.elapsed();
    eprintln!("all down: 503 in {took:?}");
    assert_eq!(status, 503);
    assert!(body.starts_with("503 Service Unavailable"));
    assert!(took < Duration::from_millis(200), "{took:?}");
}

#[test]
fn fail_open_tries_backends_even_when_all_are_down() {
    let a = TestBackend::start("a");
    let lb = Balancer::start(&checked_config(&[&a], "    fail_open: true\n"));
    a.health.store(HEALTH_FAIL, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "a down", || {
        !shown_healthy(lb.admin(), a.addr)
    });
    assert_eq!(get(lb.addr, "/").body, "a");
}

/// A backend that reads each request head and closes the connection without answering.
fn breaking_backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                seen2.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (addr, seen)
}

#[test]
fn get_is_retried_on_another_backend_but_post_is_not() {
    let (broken, broken_seen) = breaking_backend();
    let good = TestBackend::start("good");
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    backends: [{broken}, {}]\n",
        good.addr
    );
    let lb = Balancer::start(&yaml);
    for _ in 0..6 {
        assert_eq!(get(lb.addr, "/").body, "good");
    }
    assert!(broken_seen.load(Ordering::SeqCst) >= 3);
    // POSTs: the one sent to the broken backend fails, and is not sent to the good one.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(lb.addr).unwrap();
        s.write_all(b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        statuses.push(parse_reply(&out).status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 502, 502]);
    assert_eq!(
        good.requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        2
    );
}

#[test]
fn the_retry_budget_holds_when_every_backend_fails() {
    let backends: Vec<_> = (0..3).map(|_| breaking_backend()).collect();
    let list: Vec<String> = backends.iter().map(|(a, _)| a.to_string()).collect();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{{ upstream: app }}]\nupstreams:\n  app:\n    retries: 2\n    retry_budget: {{ ratio: 0.2, min_per_second: 0 }}\n    backends: [{}]\n",
        list.join(", ")
    );
    let lb = Balancer::start(&yaml);
    for _ in 0..100 {
        assert_eq!(get(lb.addr, "/").status, 502);
    }
    let attempts: usize = backends
        .iter()
        .map(|(_, seen)| seen.load(Ordering::SeqCst))
        .sum();
    let retries = attempts - 100;
    eprintln!("every backend failing: 100 requests, {attempts} attempts, {retries} retries");
    // 20% of 100 requests, not 2 × 100.
    assert!((15..=25).contains(&retries), "{retries} retries");
}

#[test]
fn passive_detection_ejects_a_backend_that_fails_requests() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    b.fail_all.store(true, Ordering::SeqCst);
    let yaml = simple_config(&[&a, &b]).replace(
        "    backends:\n",
        "    passive: { consecutive_failures: 3, ejection: 30s }\n    backends:\n",
    );
    let lb = Balancer::start(&yaml);
    let mut failures = 0;
    for _ in 0..40 {
        if get(lb.addr, "/").status == 500 {
            failures += 1;
        }
    }
    // Three 500s in a row from b, then b is out for 30s: the rest go to a.
    assert_eq!(failures, 3);
    assert_eq!(get(lb.addr, "/").body, "a");
}

#[test]
fn slow_start_ramps_a_returning_backend_up() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let lb = Balancer::start(&checked_config(&[&a, &b], "    slow_start: 1s\n"));
    b.health.store(HEALTH_FAIL, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b down", || {
        !shown_healthy(lb.admin(), b.addr)
    });
    b.health.store(HEALTH_OK, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b up", || {
        shown_healthy(lb.admin(), b.addr)
    });
    let back = Instant::now();
    let mut client = KeepAlive::new(lb.addr);
    let (mut early, mut early_b) = (0, 0);
    while back.elapsed() < Duration::from_millis(250) {
        early += 1;
        early_b += usize::from(client.get("/").unwrap().1 == "b");
    }
    // Over its first quarter of the window, b averages an eighth of its weight.
    assert!(
        early > 50 && early_b * 4 < early,
        "b took {early_b} of {early} early requests"
    );
    wait_until(Duration::from_secs(5), "the ramp to end", || {
        back.elapsed() > Duration::from_millis(1100)
    });
    let late_b = (0..200)
        .filter(|_| client.get("/").unwrap().1 == "b")
        .count();
    assert!(
        (70..=130).contains(&late_b),
        "b took {late_b} of 200 after the ramp"
    );
}
