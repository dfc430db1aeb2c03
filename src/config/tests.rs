//! The config read from text: values, defaults, and every problem at its place.

use super::*;

fn problems(text: &str) -> Vec<String> {
    decode(text, Path::new("/etc/bascule"))
        .unwrap_err()
        .into_iter()
        .map(|p| match p.pos {
            Some(pos) => format!("{pos}: {}: {}", p.path, p.message),
            None => format!("{}: {}", p.path, p.message),
        })
        .collect()
}

const MINIMAL: &str = "listeners:\n  - bind: 127.0.0.1:8080\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = decode(MINIMAL, Path::new(".")).unwrap();
    assert_eq!(c.listeners[0].name, "127.0.0.1:8080");
    assert_eq!(c.listeners[0].max_header_bytes, 65536);
    assert_eq!(c.upstreams[0].backends[0].weight, 1);
    assert_eq!(c.upstreams[0].response_timeout, Duration::from_secs(60));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.access_log, AccessLog::Off);
}

#[test]
fn problems_of_a_value_point_at_the_value() {
    let text = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: app}]\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n    sticky: { secret: s, ttl: 0s }\n    health_check: { interval: 0s }\nadmin:\n  bind: 127.0.0.1:8080\n";
    assert_eq!(
        problems(text),
        vec![
            "7:31: upstreams.app.sticky.ttl: must be at least one second",
            "8:31: upstreams.app.health_check.interval: must be above zero",
            "10:9: admin.bind: the same address as a listener",
        ]
    );
}

#[test]
fn backends_by_name_and_by_srv() {
    let text = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: app}]\nupstreams:\n  app:\n    discovery: { interval: 1s, hold: 10s }\n    backends:\n      - 127.0.0.1:9001\n      - localhost:9003\n      - { address: app.internal:9000, weight: 2 }\n      - { srv: _http._tcp.app.internal }\nresolver: { nameservers: [127.0.0.1:5353], timeout: 500ms }\n";
    let c = decode(text, Path::new(".")).unwrap();
    let app = &c.upstreams[0];
    assert_eq!(app.backends.len(), 1);
    assert_eq!(app.backends[0].address, "127.0.0.1:9001");
    let names: Vec<_> = app
        .names
        .iter()
        .map(|n| (n.lookup.clone(), n.weight))
        .collect();
    assert_eq!(
        names,
        vec![
            (
                Lookup::Host {
                    host: "localhost".into(),
                    port: 9003
                },
                1
            ),
            (
                Lookup::Host {
                    host: "app.internal".into(),
                    port: 9000
                },
                2
            ),
            (Lookup::Srv("_http._tcp.app.internal".into()), 1),
        ]
    );
    assert_eq!(app.discovery.interval, Duration::from_secs(1));
    assert_eq!(app.discovery.hold, Duration::from_secs(10));
    assert_eq!(
        c.resolver.nameservers,
        vec!["127.0.0.1:5353".parse().unwrap()]
    );
    assert_eq!(c.resolver.timeout(), Duration::from_millis(500));
}

#[test]
fn bad_names_are_reported() {
    let text = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: app}]\nupstreams:\n  app:\n    backends:\n      - app..internal:9000\n      - app.internal:0\n      - { srv: \"bad name\" }\n      - { address: a.b:1, srv: _x._tcp.a.b }\n      - a.b:1\n      - a.b:1\n";
    assert_eq!(
        problems(text),
        vec![
            "7:9: upstreams.app.backends[0]: `app..internal:9000` is not an address (expected ip:port or host:port, such as 127.0.0.1:9001 or app.internal:9001)",
            "8:9: upstreams.app.backends[1]: `app.internal:0` is not an address (expected ip:port or host:port, such as 127.0.0.1:9001 or app.internal:9001)",
            "9:16: upstreams.app.backends[2].srv: `bad name` is not a DNS name",
            "10:32: upstreams.app.backends[3].srv: give either address or srv, not both",
            "12:9: upstreams.app.backends[5]: a.b:1 is listed twice",
        ]
    );
}

#[test]
fn every_problem_is_reported_with_its_position() {
    let text = "listeners:\n  - bind: 127.0.0.1:80800\n    routes:\n      - upstream: nope\nupstreams:\n  app:\n    backends:\n      - { address: 127.0.0.1:9001, weight: 0 }\n    timeouts: { connect: 5 }\n    colour: blue\n";
    let p = problems(text);
    assert_eq!(
        p,
        vec![
            "2:11: listeners[0].bind: `127.0.0.1:80800` is not an address (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)",
            "4:19: listeners[0].routes[0].upstream: no upstream named `nope` (known: app)",
            "8:44: upstreams.app.backends[0].weight: `0` is not a whole number in the range 1 to 1000",
            "9:26: upstreams.app.timeouts.connect: `5` is not a duration (give a unit: 250ms, 2s, 5m, 1h)",
            "10:5: upstreams.app.colour: unknown key (expected one of: backends, balance, discovery, fail_open, hash_balance_factor, hash_key, health_check, max_connections, max_idle_connections, passive, queue, retries, retry_budget, slow_start, sticky, timeouts, tls)",
        ]
    );
}

#[test]
fn a_duration_too_long_for_a_deadline_is_a_problem() {
    let text = MINIMAL.replace(
        "    backends:",
        "    timeouts: { connect: 400000000000years, idle: 100years }\n    backends:",
    );
    assert_eq!(
        problems(&text),
        vec!["7:26: upstreams.app.timeouts.connect: `400000000000years` is not a duration of at most 100 years"]
    );
}

#[test]
fn tls_protocols_are_named_as_nginx_names_them() {
    let with = |protocols: &str| {
        let tls = format!("    tls:\n      certificates: [{{ cert: c.pem, key: c.key }}]\n      protocols: {protocols}\n");
        let p = problems(&MINIMAL.replace("    routes:", &format!("{tls}    routes:")));
        // The certificate does not exist; only what the protocols add is of interest here.
        p.into_iter()
            .filter(|p| p.contains("protocols"))
            .collect::<Vec<_>>()
    };
    assert_eq!(with("[TLSv1.2, TLSv1.3]"), Vec::<String>::new());
    assert_eq!(
        with("[TLSv1.3, TLSv1.1, tls1.2]"),
        vec![
            "5:28: listeners[0].tls.protocols[1]: `TLSv1.1` is not a TLS version bascule offers (TLSv1.2, TLSv1.3)",
            "5:37: listeners[0].tls.protocols[2]: `tls1.2` is not a TLS version bascule offers (TLSv1.2, TLSv1.3)",
        ]
    );
    assert_eq!(
        with("[]"),
        vec!["5:18: listeners[0].tls.protocols: at least one protocol is needed"]
    );
}

#[test]
fn caches_and_the_routes_that_use_them() {
    let text = "caches:\n  pages:\n    memory: 64MiB\n    default_ttl: 30s\n    redis: { url: redis://127.0.0.1:6379/0 }\nlisteners:\n  - bind: 127.0.0.1:8080\n    routes:\n      - upstream: app\n        cache: pages\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";
    let c = decode(text, Path::new(".")).unwrap();
    let pages = c.cache("pages").unwrap();
    assert_eq!(pages.memory, 64 << 20);
    assert_eq!(pages.max_object, 8 << 20);
    assert_eq!(pages.default_ttl, Duration::from_secs(30));
    let redis = pages.redis.as_ref().unwrap();
    assert_eq!(redis.timeout, Duration::from_millis(50));
    assert_eq!(c.listeners[0].routes[0].cache.as_deref(), Some("pages"));

    let text = "caches:\n  pages:\n    memory: 64 MB\n  small:\n    memory: 1MiB\n    max_object: 2MiB\n  r:\n    memory: 1GiB\n    redis: { url: http://x }\nlisteners:\n  - bind: 127.0.0.1:8080\n    routes:\n      - upstream: app\n        cache: page\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";
    assert_eq!(
        problems(text),
        vec![
            "3:13: caches.pages.memory: `64 MB` is not a size (a whole number with KiB, MiB or GiB: 256MiB)",
            "6:17: caches.small.max_object: larger than `memory`",
            "9:19: caches.r.redis.url: `http://x` is not a Redis URL (expected redis://HOST:PORT/DB or unix:///PATH)",
            "14:16: listeners[0].routes[0].cache: no cache named `page` (known: pages, small, r)",
        ]
    );
    let no_caches = MINIMAL.replace("upstream: app\n", "upstream: app\n        cache: pages\n");
    assert_eq!(
        problems(&no_caches),
        vec!["5:16: listeners[0].routes[0].cache: no cache named `pages` (known: none: add it under `caches`)"]
    );
}

#[test]
fn keys_of_later_features_are_unknown() {
    let text = format!("{MINIMAL}    drain_timeout: 5s\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert!(
        p[0].contains("upstreams.app.drain_timeout: unknown key"),
        "{p:?}"
    );
}

#[test]
fn duplicate_upstream_and_bind_and_empty_backends() {
    let text = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: a}]\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: a}]\nupstreams:\n  a:\n    backends: []\n  a:\n    backends: [127.0.0.1:1]\n";
    let p = problems(text);
    assert!(
        p.iter().any(|p| p.contains("upstreams.a: duplicate key")),
        "{p:?}"
    );
    assert!(
        p.iter().any(
            |p| p.contains("listeners[1].bind: 127.0.0.1:8080 is bound by an earlier listener")
        ),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|p| p.contains("upstreams.a.backends: at least one backend is needed")),
        "{p:?}"
    );
}

#[test]
fn host_and_methods_are_normalised() {
    let text = MINIMAL.replace(
        "      - upstream: app\n",
        "      - match: { host: '*.Example.com', methods: [GET], path_prefix: /api }\n        upstream: app\n",
    );
    let c = decode(&text, Path::new(".")).unwrap();
    let r = &c.listeners[0].routes[0];
    assert_eq!(r.host, Some(HostMatch::Suffix(".example.com".into())));
    assert_eq!(r.methods, vec![Method::GET]);
    assert_eq!(r.path_prefix.as_deref(), Some("/api"));
}

#[test]
fn syntax_errors_have_positions() {
    let p = problems("listeners: [\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].contains("YAML syntax"), "{p:?}");
}

#[test]
fn a_billion_laughs_is_refused_at_once() {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let started = std::time::Instant::now();
    let p = problems(&text);
    assert_eq!(
        p,
        vec!["4:45: : YAML syntax: aliases repeat more than 10000 values (a \"billion laughs\"?)"]
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // Aliases within the bound are copied as before.
    let anchored = MINIMAL.replace(
        "backends: [127.0.0.1:9001]",
        "backends: &b [127.0.0.1:9001]\n  other:\n    backends: *b",
    );
    let c = decode(&anchored, Path::new(".")).unwrap();
    assert_eq!(c.upstreams[1].backends[0].address, "127.0.0.1:9001");
}

#[test]
fn values_of_the_wrong_shape_are_reported_at_their_place() {
    let text = MINIMAL.replace("    backends:", "    health_check: [1]\n    backends:");
    assert_eq!(
        problems(&text),
        vec!["7:19: upstreams.app.health_check: expected a map"]
    );
}

#[test]
fn two_listeners_at_port_zero_are_refused() {
    // A listener is known by its bind: two at port 0 would share one's routes.
    let text = "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{upstream: a}]\n  - bind: 127.0.0.1:0\n    routes: [{upstream: a}]\nupstreams:\n  a:\n    backends: [127.0.0.1:1]\n";
    assert_eq!(
        problems(text),
        ["4:5: listeners[1].bind: 127.0.0.1:0 is also an earlier listener's bind: give each its own port, as a listener is known by its bind"]
    );
}
