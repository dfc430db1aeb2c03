//! Sticky sessions through the real server: sealed cookies, failover, rotation.

mod common;

use bascule::sticky::{backend_id, seal, unix_now};
use common::*;

const SECRET: &str = "a long shared secret for the tests";

fn sticky_config(backends: &[&TestBackend], sticky: &str) -> String {
    simple_config(backends).replace(
        "    backends:\n",
        &format!("    sticky: {sticky}\n    backends:\n"),
    )
}

fn with_secret(backends: &[&TestBackend]) -> String {
    sticky_config(
        backends,
        &format!("{{ cookie: aff, ttl: 1h, secret: \"{SECRET}\" }}"),
    )
}

/// The `aff=...` pair of a reply's Set-Cookie, if it set one.
fn cookie_of(r: &Reply) -> Option<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("aff="))
        .map(|v| v.split(';').next().unwrap().to_string())
}

fn ask(addr: std::net::SocketAddr, cookie: Option<&str>) -> Reply {
    match cookie {
        Some(c) => http1(addr, "GET", "/", &[&format!("Cookie: theme=dark; {c}")]),
        None => get(addr, "/"),
    }
}

fn three() -> Vec<TestBackend> {
    (0..3)
        .map(|i| TestBackend::start(&format!("b{i}")))
        .collect()
}

#[test]
fn a_cookie_pins_the_client_and_is_not_set_again() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let lb = Balancer::start(&with_secret(&refs));
    let first = ask(lb.addr, None);
    let cookie = cookie_of(&first).expect("the first reply sets the cookie");
    let set = first.headers["set-cookie"].to_str().unwrap();
    assert!(
        set.ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"),
        "{set}"
    );
    for _ in 0..30 {
        let r = ask(lb.addr, Some(&cookie));
        assert_eq!(r.body, first.body);
        assert!(cookie_of(&r).is_none(), "a valid cookie got a new one");
    }
    // Without a cookie, round robin goes on, and every reply offers a cookie.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = ask(lb.addr, None);
        assert!(cookie_of(&r).is_some());
        seen.insert(r.body);
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn a_down_backend_loses_its_clients_who_are_pinned_again() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let lb = Balancer::start(&with_secret(&refs));
    let first = ask(lb.addr, None);
    let cookie = cookie_of(&first).unwrap();
    let pinned = bs.iter().position(|b| b.name == first.body).unwrap();
    let snapshot = lb.server().state().load_full();
    snapshot.upstream("app").unwrap().backends[pinned]
        .state
        .set_healthy(false);
    let moved = ask(lb.addr, Some(&cookie));
    assert_eq!(moved.status, 200);
    assert_ne!(moved.body, first.body);
    let repinned = cookie_of(&moved).expect("a new cookie for the new backend");
    for _ in 0..10 {
        assert_eq!(ask(lb.addr, Some(&repinned)).body, moved.body);
    }
    // The old backend comes back: its old cookie is honoured again.
    snapshot.upstream("app").unwrap().backends[pinned]
        .state
        .set_healthy(true);
    assert_eq!(ask(lb.addr, Some(&cookie)).body, first.body);
}

#[test]
fn two_instances_with_one_secret_honour_each_others_cookies() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let yaml = with_secret(&refs);
    let (one, two) = (Balancer::start(&yaml), Balancer::start(&yaml));
    for _ in 0..3 {
        let r = ask(one.addr, None);
        let cookie = cookie_of(&r).unwrap();
        for _ in 0..5 {
            let elsewhere = ask(two.addr, Some(&cookie));
            assert_eq!(elsewhere.body, r.body);
            assert!(cookie_of(&elsewhere).is_none());
        }
    }
}

#[test]
fn tampered_forged_expired_and_unknown_cookies_are_ignored_and_counted() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let lb = Balancer::start(&with_secret(&refs));
    let cookie = cookie_of(&ask(lb.addr, None)).unwrap();
    let value = cookie.trim_start_matches("aff=");
    // Flip one hex digit of the MAC.
    let last = value.chars().last().unwrap();
    let flipped = format!(
        "aff={}{}",
        &value[..value.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let id = backend_id("app", &bs[1].addr.to_string());
    let forged = format!("aff={}", seal(b"a guessed secret", "app", id, unix_now()));
    let expired = format!(
        "aff={}",
        seal(SECRET.as_bytes(), "app", id, unix_now() - 7200)
    );
    let unknown = format!("aff={}", seal(SECRET.as_bytes(), "app", 42, unix_now()));
    for bad in [
        &flipped,
        &forged,
        &expired,
        &unknown,
        &"aff=garbage".to_string(),
    ] {
        let r = ask(lb.addr, Some(bad));
        assert_eq!(r.status, 200, "{bad}");
        assert!(cookie_of(&r).is_some(), "{bad} was honoured");
    }
    let m = get(lb.admin(), "/metrics").body;
    for reason in ["bad_signature", "expired", "unknown_backend", "malformed"] {
        let line = format!("bascule_sticky_rejected_total{{upstream=\"app\",reason=\"{reason}\"}}");
        assert!(
            m.lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{reason}: {m}"
        );
    }
    // A valid cookie made by the same secret elsewhere pins as usual.
    let valid = format!("aff={}", seal(SECRET.as_bytes(), "app", id, unix_now()));
    assert_eq!(ask(lb.addr, Some(&valid)).body, "b1");
}

#[test]
fn rotated_secrets_still_verify_and_new_cookies_use_the_first() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("sticky.keys");
    std::fs::write(&keys, "the new secret\n\nthe old secret\n").unwrap();
    let lb = Balancer::start(&sticky_config(
        &refs,
        &format!("{{ cookie: aff, secret_file: {} }}", keys.display()),
    ));
    let id = backend_id("app", &bs[2].addr.to_string());
    let old = format!("aff={}", seal(b"the old secret", "app", id, unix_now()));
    let r = ask(lb.addr, Some(&old));
    assert_eq!(r.body, "b2");
    assert!(cookie_of(&r).is_none());
    let fresh = cookie_of(&ask(lb.addr, None)).unwrap();
    let value = fresh.trim_start_matches("aff=");
    assert!(bascule::sticky::open(
        &[b"the new secret".to_vec()],
        "app",
        value.as_bytes(),
        std::time::Duration::from_secs(60),
        unix_now()
    )
    .is_ok());
}

#[test]
fn the_applications_own_cookies_are_kept() {
    let bs = three();
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let lb = Balancer::start(&with_secret(&refs));
    let r = get(lb.addr, "/setcookie");
    let all: Vec<&str> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.contains(&"app=1; Path=/"));
}
