//! The example application (examples/app) behind bascule, with a real
//! redis-server started here: sessions shared by replicas, a replica killed,
//! Redis stopped, and cache-aside. Without redis-server installed these tests
//! say so loudly and pass, except under CI (`CI` set), where they fail.

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// One replica of examples/app, as a process; killed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Replica {
    fn start(name: &str, redis: Option<&Redis>) -> Replica {
        let mut cmd = Command::new(app_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--name", name])
            .env_remove("REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(redis) = redis {
            cmd.args(["--redis", &redis.url()]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Replica { child, addr }
    }
}

/// One replica per name, all on `redis` (or in-process without it).
fn replicas(names: &[&str], redis: Option<&Redis>) -> Vec<Replica> {
    names.iter().map(|n| Replica::start(n, redis)).collect()
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// target/debug/examples/app, next to the bascule binary; built if missing.
fn app_bin() -> PathBuf {
    let bin = bin();
    let path = bin.parent().unwrap().join("examples").join("app");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "app"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

/// Bascule in front of `replicas`, round robin, no sticky sessions, quick health checks.
fn balancer(replicas: &[&Replica]) -> Balancer {
    balancer_with(replicas, "")
}

fn balancer_with(replicas: &[&Replica], extra: &str) -> Balancer {
    let backends: String = replicas
        .iter()
        .map(|r| format!("      - {}\n", r.addr))
        .collect();
    Balancer::start(&format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    health_check: {{ path: /healthz, interval: 100ms, timeout: 300ms, unhealthy_threshold: 2, healthy_threshold: 1 }}\n{extra}    backends:\n{backends}admin:\n  bind: 127.0.0.1:0\nworkers: 2\n"
    ))
}

fn cookie_of(reply: &Reply) -> String {
    let set = reply.headers["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

fn replica_of(reply: &Reply) -> String {
    reply.headers["x-replica"].to_str().unwrap().to_string()
}

#[test]
fn a_session_made_on_one_replica_is_read_on_the_others() {
    let Some(redis) = Redis::start() else { return };
    let replicas = replicas(&["r1", "r2", "r3"], Some(&redis));
    let lb = balancer(&replicas.iter().collect::<Vec<_>>());

    let first = get(lb.addr, "/");
    assert_eq!(first.status, 200);
    assert!(
        first.body.ends_with("visit 1 (store: redis)\n"),
        "{first:?}"
    );
    let cookie = format!("Cookie: {}", cookie_of(&first));
    let mut served = std::collections::HashSet::from([replica_of(&first)]);
    for visit in 2..=9 {
        let r = http1(lb.addr, "GET", "/", &[&cookie]);
        assert!(
            r.body.ends_with(&format!("visit {visit} (store: redis)\n")),
            "{r:?}"
        );
        assert!(!r.headers.contains_key("set-cookie"));
        served.insert(replica_of(&r));
    }
    // Round robin, no affinity: all three replicas saw the one session.
    assert_eq!(served.len(), 3, "{served:?}");
}

#[test]
fn killing_the_replica_that_made_a_session_loses_nothing() {
    let Some(redis) = Redis::start() else { return };
    let mut replicas: Vec<Option<Replica>> = replicas(&["r1", "r2", "r3"], Some(&redis))
        .into_iter()
        .map(Some)
        .collect();
    let lb = balancer(&replicas.iter().flatten().collect::<Vec<_>>());

    let first = http1(lb.addr, "POST", "/cart?item=tea", &[]);
    assert_eq!(first.status, 200);
    let maker = replica_of(&first);
    let cookie = format!("Cookie: {}", cookie_of(&first));
    let index = ["r1", "r2", "r3"].iter().position(|n| *n == maker).unwrap();
    drop(replicas[index].take());

    // Every request succeeds (a connect failure is retried on another replica)
    // and sees the cart the dead replica wrote.
    for i in 0..12 {
        let item = if i % 2 == 0 { "POST" } else { "GET" };
        let r = http1(lb.addr, item, "/cart?item=jam", &[&cookie]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_ne!(replica_of(&r), maker);
        assert!(r.body.contains("tea=1"), "{r:?}");
    }
    let last = http1(lb.addr, "GET", "/cart", &[&cookie]);
    assert!(last.body.ends_with("cart [jam=6, tea=1]\n"), "{last:?}");
}

#[test]
fn with_redis_gone_replicas_fail_their_health_checks_and_bascule_answers_503() {
    let Some(redis) = Redis::start() else { return };
    let replicas = replicas(&["r1", "r2"], Some(&redis));
    let lb = balancer(&replicas.iter().collect::<Vec<_>>());
    assert_eq!(get(lb.addr, "/").status, 200);

    let port = redis.port;
    drop(redis);
    let admin = lb.admin();
    wait_until(Duration::from_secs(10), "both replicas marked down", || {
        replicas.iter().all(|r| !shown_healthy(admin, r.addr))
    });
    let r = get(lb.addr, "/");
    assert_eq!(r.status, 503);
    // bascule's own reply: no replica was asked.
    assert!(!r.headers.contains_key("x-replica"), "{r:?}");

    // Redis back on the same port: the replicas reconnect and come back.
    let _redis = Redis::start_on(port);
    wait_until(Duration::from_secs(10), "replicas back up", || {
        replicas.iter().all(|r| shown_healthy(admin, r.addr))
    });
    assert_eq!(get(lb.addr, "/").status, 200);
}

#[test]
fn cache_aside_makes_the_slow_report_a_hit_on_every_replica() {
    let Some(redis) = Redis::start() else { return };
    let replicas = replicas(&["r1", "r2", "r3"], Some(&redis));
    let lb = balancer(&replicas.iter().collect::<Vec<_>>());

    let cold = get(lb.addr, "/report?n=200000");
    assert_eq!(cold.headers["x-cache"], "miss");
    assert!(cold.body.contains("17984 primes below 200000"), "{cold:?}");
    let mut hit_on = std::collections::HashSet::new();
    for _ in 0..9 {
        let warm = get(lb.addr, "/report?n=200000");
        assert_eq!(warm.headers["x-cache"], "hit", "{warm:?}");
        assert!(warm.body.contains("17984 primes"));
        hit_on.insert(replica_of(&warm));
    }
    assert_eq!(hit_on.len(), 3, "{hit_on:?}");
    // Each replica counts its own hits and misses: 9 hits and 1 miss in all.
    let (mut hits, mut misses) = (0, 0);
    for r in &replicas {
        let stats: serde_json::Value = serde_json::from_str(&get(r.addr, "/stats").body).unwrap();
        hits += stats["cache_hits"].as_u64().unwrap();
        misses += stats["cache_misses"].as_u64().unwrap();
    }
    assert_eq!((hits, misses), (9, 1));
}

#[test]
fn without_redis_sessions_stay_in_one_replica_unless_sticky() {
    // No Redis needed: the in-process fallback, which says so.
    let replicas = replicas(&["r1", "r2"], None);
    let lb = balancer(&replicas.iter().collect::<Vec<_>>());
    let first = get(lb.addr, "/");
    assert!(
        first.body.ends_with("visit 1 (store: in-process)\n"),
        "{first:?}"
    );
    let cookie = format!("Cookie: {}", cookie_of(&first));
    // The other replica has never seen this session.
    let second = http1(lb.addr, "GET", "/", &[&cookie]);
    assert_ne!(replica_of(&second), replica_of(&first));
    assert!(
        second.body.ends_with("visit 1 (store: in-process)\n"),
        "{second:?}"
    );

    // Sticky sessions keep the user on the replica that holds the session.
    let sticky = balancer_with(
        &replicas.iter().collect::<Vec<_>>(),
        "    sticky: { secret: demo }\n",
    );
    let first = get(sticky.addr, "/");
    let cookies: Vec<String> = first
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .collect();
    let cookie = format!("Cookie: {}", cookies.join("; "));
    for visit in 2..=6 {
        let r = http1(sticky.addr, "GET", "/", &[&cookie]);
        assert_eq!(replica_of(&r), replica_of(&first));
        assert!(
            r.body
                .ends_with(&format!("visit {visit} (store: in-process)\n")),
            "{r:?}"
        );
    }
}
