//! Weighted round robin through the real server.

mod common;

use std::sync::atomic::Ordering;

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

fn upstream_config(backends: &[&TestBackend], settings: &str) -> String {
    simple_config(backends).replace("    backends:\n", &format!("{settings}    backends:\n"))
}

/// Sends `n` requests from each of `clients` threads at once; returns the bodies.
fn concurrent(
    addr: std::net::SocketAddr,
    clients: usize,
    n: usize,
    header: &'static str,
) -> Vec<String> {
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                (0..n)
                    .map(|_| {
                        let extra: Vec<&str> = if header.is_empty() {
                            vec![]
                        } else {
                            vec![header]
                        };
                        http1(addr, "GET", "/", &extra).body
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

#[test]
fn least_connections_steers_away_from_a_slow_backend() {
    let (slow, fast) = (TestBackend::start("slow"), TestBackend::start("fast"));
    slow.delay_ms.store(300, Ordering::SeqCst);
    fast.delay_ms.store(5, Ordering::SeqCst);
    let lb = Balancer::start(&upstream_config(
        &[&slow, &fast],
        "    balance: least_connections\n",
    ));
    let bodies = concurrent(lb.addr, 8, 10, "");
    let to_slow = bodies.iter().filter(|b| *b == "slow").count();
    // Round robin would send half (40) to the slow backend.
    assert!(
        to_slow <= 12,
        "{to_slow} of {} went to the slow backend",
        bodies.len()
    );
    let status = status_json(lb.admin());
    assert_eq!(status["upstreams"]["app"]["balance"], "least_connections");
}

#[test]
fn each_hash_key_source_routes_a_key_to_one_backend() {
    let backends: Vec<TestBackend> = (0..4)
        .map(|i| TestBackend::start(&format!("b{i}")))
        .collect();
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let sources = [
        ("header:X-User", "X-User: {}", "/"),
        ("cookie:session", "Cookie: theme=dark; session={}", "/"),
        ("query:user", "", "/?user={}"),
        ("path", "", "/users/{}"),
    ];
    for (source, header, path) in sources {
        let lb = Balancer::start(&upstream_config(
            &refs,
            &format!("    balance: consistent_hash\n    hash_key: \"{source}\"\n"),
        ));
        let mut homes = std::collections::HashSet::new();
        for user in 0..20 {
            let h = header.replace("{}", &user.to_string());
            let p = path.replace("{}", &user.to_string());
            let extra: Vec<&str> = if h.is_empty() {
                vec![]
            } else {
                vec![h.as_str()]
            };
            let first = http1(lb.addr, "GET", &p, &extra).body;
            for _ in 0..5 {
                assert_eq!(
                    http1(lb.addr, "GET", &p, &extra).body,
                    first,
                    "{source}: user {user} moved"
                );
            }
            homes.insert(first);
        }
        assert!(homes.len() >= 3, "{source}: 20 keys on only {homes:?}");
    }
    // client_ip: every request here comes from 127.0.0.1, so one backend takes them all.
    let lb = Balancer::start(&upstream_config(&refs, "    balance: consistent_hash\n"));
    let counts = tally(lb.addr, 12);
    assert_eq!(counts.len(), 1, "{counts:?}");
}

#[test]
fn two_processes_place_keys_the_same_way() {
    let backends: Vec<TestBackend> = (0..5)
        .map(|i| TestBackend::start(&format!("b{i}")))
        .collect();
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let yaml = upstream_config(
        &refs,
        "    balance: consistent_hash\n    hash_key: header:x-user\n",
    );
    let (one, two) = (Balancer::start(&yaml), Balancer::start(&yaml));
    for user in 0..30 {
        let h = format!("X-User: {user}");
        assert_eq!(
            http1(one.addr, "GET", "/", &[&h]).body,
            http1(two.addr, "GET", "/", &[&h]).body
        );
    }
}

#[test]
fn bounded_loads_spill_a_hot_key() {
    let backends: Vec<TestBackend> = (0..3)
        .map(|i| TestBackend::start(&format!("b{i}")))
        .collect();
    for b in &backends {
        b.delay_ms.store(200, Ordering::SeqCst);
    }
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let settings = "    balance: consistent_hash\n    hash_key: header:x-user\n    hash_balance_factor: 1.25\n";
    let lb = Balancer::start(&upstream_config(&refs, settings));
    let bodies = concurrent(lb.addr, 12, 1, "X-User: hot");
    let mut counts = std::collections::HashMap::new();
    for b in &bodies {
        *counts.entry(b.clone()).or_insert(0) += 1;
    }
    // Twelve at once on one key: its backend's bound is ceil(12 × 1.25 / 3) = 5.
    assert!(counts.len() >= 2, "{counts:?}");
    assert!(counts.values().all(|&c| c <= 6), "{counts:?}");
    // Alone again, the key goes home: the same backend every time.
    let alone: Vec<String> = (0..3)
        .map(|_| http1(lb.addr, "GET", "/", &["X-User: hot"]).body)
        .collect();
    assert!(alone.iter().all(|b| *b == alone[0]), "{alone:?}");
}
