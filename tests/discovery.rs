//! Backends found by DNS and changed at run time: a DNS server started by the
//! test (UDP on 127.0.0.1, answers the test changes), real bascule servers,
//! real backends on loopback addresses (127.0.0.2, .3, ... on one port, as
//! A records give addresses and the config gives the port).

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// How the test DNS server answers for one name.
#[derive(Clone, Debug)]
enum Zone {
    /// A records (in an order that turns on every query, as round-robin DNS does).
    Addresses(Vec<Ipv4Addr>),
    /// SRV records: (weight, port, address of the target).
    Srv(Vec<(u16, u16, Ipv4Addr)>),
    NxDomain,
    ServFail,
    /// No reply at all: the lookup times out.
    Silent,
}

struct Dns {
    addr: SocketAddr,
    zones: Arc<Mutex<HashMap<String, Zone>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dns {
    fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zones: Arc<Mutex<HashMap<String, Zone>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (z, s) = (zones.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut turn = 0usize;
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                turn += 1;
                let zones = z.lock().unwrap().clone();
                if let Some(reply) = answer(&query, &zones, turn) {
                    let _ = socket.send_to(&reply.to_vec().unwrap(), from);
                }
            }
        });
        Dns {
            addr,
            zones,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, name: &str, zone: Zone) {
        self.zones.lock().unwrap().insert(name.to_string(), zone);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to one query, or `None` to stay silent.
fn answer(query: &Message, zones: &HashMap<String, Zone>, turn: usize) -> Option<Message> {
    let q = query.queries.first()?;
    let name = q.name().to_string().trim_end_matches('.').to_lowercase();
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    let record = |name: &Name, data: RData| Record::from_rdata(name.clone(), 1, data);
    match zones.get(&name).cloned().unwrap_or(Zone::NxDomain) {
        Zone::Addresses(mut ips) => {
            if q.query_type() == RecordType::A && !ips.is_empty() {
                let len = ips.len();
                ips.rotate_left(turn % len);
                for ip in ips {
                    reply.add_answer(record(q.name(), RData::A(A(ip))));
                }
            }
        }
        Zone::Srv(targets) => {
            if q.query_type() == RecordType::SRV {
                for (i, (weight, port, ip)) in targets.into_iter().enumerate() {
                    let target = Name::from_ascii(format!("t{i}.{name}.")).unwrap();
                    let srv = SRV::new(10, weight, port, target.clone());
                    reply.add_answer(record(q.name(), RData::SRV(srv)));
                    reply.add_additional(record(&target, RData::A(A(ip))));
                }
            }
        }
        Zone::NxDomain => reply.metadata.response_code = ResponseCode::NXDomain,
        Zone::ServFail => reply.metadata.response_code = ResponseCode::ServFail,
        Zone::Silent => return None,
    }
    Some(reply)
}

/// Backends on 127.0.0.2, 127.0.0.3, ... sharing one port.
fn backends_on_one_port(n: u8) -> (u16, Vec<TestBackend>) {
    loop {
        let first = TestBackend::start_at("b0", "127.0.0.2:0".parse().unwrap());
        let port = first.addr.port();
        let mut all = vec![first];
        for i in 1..n {
            let addr = SocketAddr::from(([127, 0, 0, 2 + i], port));
            if std::net::TcpListener::bind(addr).is_err() {
                break;
            }
            all.push(TestBackend::start_at(&format!("b{i}"), addr));
        }
        if all.len() == n as usize {
            return (port, all);
        }
    }
}

fn ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i)
}

fn config(dns: &Dns, upstream: &str, extra: &str) -> String {
    format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n{upstream}{extra}resolver:\n  nameservers: [{}]\n  timeout: 300ms\nadmin:\n  bind: 127.0.0.1:0\nworkers: 2\n",
        dns.addr
    )
}

/// The addresses /status lists for upstream `app`, with whether each is leaving.
fn listed(admin: SocketAddr) -> Vec<(String, bool)> {
    let status = status_json(admin);
    let mut out: Vec<(String, bool)> = status["upstreams"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["leaving"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_name_follows_its_answer_and_a_remove_under_load_fails_nothing() {
    let dns = Dns::start();
    let (port, b) = backends_on_one_port(3);
    dns.set("app.test", Zone::Addresses(vec![ip(0), ip(1)]));
    let upstream =
        format!("    discovery: {{ interval: 200ms }}\n    backends:\n      - app.test:{port}\n");
    let lb = Balancer::start(&config(&dns, &upstream, ""));
    let admin = lb.admin();

    // Resolved before the first request: both addresses serve.
    let counts = tally(lb.addr, 10);
    assert_eq!(counts.get("b0"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("b1"), Some(&5), "{counts:?}");
    let status = status_json(admin);
    let first = &status["upstreams"]["app"]["backends"][0];
    assert_eq!(first["from"], format!("app.test:{port}"), "{status}");

    // An address that appears gets requests within the interval.
    let changed = Instant::now();
    dns.set("app.test", Zone::Addresses(vec![ip(0), ip(1), ip(2)]));
    wait_until(
        Duration::from_secs(5),
        "the new backend's first request",
        || get(lb.addr, "/").status == 200 && !b[2].requests().is_empty(),
    );
    eprintln!(
        "DNS change to the first request on the new backend: {:?}",
        changed.elapsed()
    );

    // Under load, with a slow request on b0, b0 leaves the answer.
    let load = Load::start(lb.addr, 4, 2);
    load.wait_for(200, "load before the change");
    let slow = std::thread::spawn(move || get(lb.addr, "/slow?ms=1500").status);
    wait_until(
        Duration::from_secs(5),
        "a slow request on some backend",
        || b.iter().any(|b| b.busy.load(Ordering::SeqCst) > 0),
    );
    let slow_on: Vec<usize> = (0..3)
        .filter(|&i| b[i].busy.load(Ordering::SeqCst) > 0)
        .collect();
    let leaving = slow_on[0];
    let staying: Vec<Ipv4Addr> = (0..3)
        .filter(|&i| i != leaving)
        .map(|i| ip(i as u8))
        .collect();
    dns.set("app.test", Zone::Addresses(staying));
    let gone = format!("{}:{port}", ip(leaving as u8));
    wait_until(Duration::from_secs(5), "the address shown leaving", || {
        listed(admin).contains(&(gone.clone(), true))
    });
    // Requests picked before the change may still reach it; they count before.
    load.wait_for_in_flight("requests in flight at the change");
    let before = b[leaving].requests().len();
    load.wait_for(300, "load after the change");
    assert_eq!(
        b[leaving].requests().len(),
        before,
        "a leaving backend got new requests"
    );
    // Its request in flight finishes; then it goes.
    assert_eq!(slow.join().unwrap(), 200);
    wait_until(
        Duration::from_secs(5),
        "the address gone from /status",
        || !listed(admin).iter().any(|(a, _)| *a == gone),
    );
    let (sent, failed) = load.stop();
    eprintln!("remove under load: {sent} requests, {failed} failed");
    assert_eq!(failed, 0);
    // Its series are no longer reported.
    let metrics = get(admin, "/metrics").body;
    assert!(
        !metrics.contains(&format!("backend=\"{gone}\"")),
        "{metrics}"
    );
}

#[test]
fn addresses_that_stay_keep_their_health() {
    let dns = Dns::start();
    let (port, b) = backends_on_one_port(3);
    b[1].health.store(HEALTH_FAIL, Ordering::SeqCst);
    dns.set("app.test", Zone::Addresses(vec![ip(0), ip(1)]));
    let upstream = format!(
        "    discovery: {{ interval: 200ms }}\n    health_check: {{ path: /healthz, interval: 100ms, unhealthy_threshold: 1, healthy_threshold: 1 }}\n    backends:\n      - app.test:{port}\n"
    );
    let lb = Balancer::start(&config(&dns, &upstream, ""));
    let admin = lb.admin();
    let addr = |i: u8| SocketAddr::from((ip(i), port));
    wait_until(Duration::from_secs(5), "b1 shown down", || {
        !shown_healthy(admin, addr(1))
    });
    dns.set("app.test", Zone::Addresses(vec![ip(0), ip(1), ip(2)]));
    wait_until(Duration::from_secs(5), "b2 listed", || {
        listed(admin).iter().any(|(a, _)| *a == addr(2).to_string())
    });
    // b1 is still down the moment the new set is in place: not reset to the initial state.
    assert!(!shown_healthy(admin, addr(1)));
    let counts = tally(lb.addr, 20);
    assert_eq!(counts.get("b1"), None, "{counts:?}");
}

#[test]
fn failed_lookups_keep_the_set_and_no_address_empties_it_after_hold() {
    let dns = Dns::start();
    let (port, b) = backends_on_one_port(1);
    dns.set("app.test", Zone::Addresses(vec![ip(0)]));
    let upstream = format!(
        "    discovery: {{ interval: 100ms, hold: 1s }}\n    backends:\n      - app.test:{port}\n"
    );
    let lb = Balancer::start(&config(&dns, &upstream, ""));
    let admin = lb.admin();
    assert_eq!(get(lb.addr, "/").body, "b0");
    let failed = |admin| {
        get(admin, "/metrics")
            .body
            .lines()
            .filter(|l| {
                l.starts_with("bascule_discovery_lookups_total") && l.contains("result=\"failed\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    for zone in [Zone::ServFail, Zone::Silent] {
        let before = failed(admin);
        dns.set("app.test", zone.clone());
        wait_until(Duration::from_secs(5), "two failed lookups", || {
            failed(admin) >= before + 2
        });
        assert_eq!(get(lb.addr, "/").body, "b0", "{zone:?}");
        assert_eq!(listed(admin).len(), 1, "{zone:?}");
    }
    // NXDOMAIN: the set stays for `hold`, then its backends leave and go.
    let nx = Instant::now();
    dns.set("app.test", Zone::NxDomain);
    wait_until(Duration::from_secs(5), "the set emptied", || {
        listed(admin).is_empty()
    });
    assert!(nx.elapsed() >= Duration::from_secs(1), "{:?}", nx.elapsed());
    let reply = get(lb.addr, "/");
    assert_eq!(reply.status, 503, "{reply:?}");
    // An answer brings it back.
    dns.set("app.test", Zone::Addresses(vec![ip(0)]));
    wait_until(Duration::from_secs(5), "the backend back", || {
        get(lb.addr, "/").status == 200
    });
    drop(b);
}

#[test]
fn a_name_without_an_answer_at_start_gets_503_until_it_resolves() {
    let dns = Dns::start();
    let (port, _b) = backends_on_one_port(1);
    let upstream =
        format!("    discovery: {{ interval: 100ms }}\n    backends:\n      - app.test:{port}\n");
    let lb = Balancer::start(&config(&dns, &upstream, ""));
    let reply = get(lb.addr, "/");
    assert_eq!(reply.status, 503, "{reply:?}");
    dns.set("app.test", Zone::Addresses(vec![ip(0)]));
    wait_until(Duration::from_secs(5), "the first answer", || {
        get(lb.addr, "/").status == 200
    });
}

#[test]
fn srv_records_give_ports_and_weights() {
    let dns = Dns::start();
    let (b1, b2) = (TestBackend::start("one"), TestBackend::start("three"));
    let local = Ipv4Addr::LOCALHOST;
    dns.set(
        "_http._tcp.app.test",
        Zone::Srv(vec![(1, b1.addr.port(), local), (3, b2.addr.port(), local)]),
    );
    let upstream = "    backends:\n      - { srv: _http._tcp.app.test }\n";
    let lb = Balancer::start(&config(&dns, upstream, ""));
    let counts = tally(lb.addr, 40);
    assert_eq!(counts.get("one"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("three"), Some(&30), "{counts:?}");
    let status = status_json(lb.admin());
    let backends = status["upstreams"]["app"]["backends"].as_array().unwrap();
    assert!(
        backends.iter().all(|b| b["from"] == "_http._tcp.app.test"),
        "{status}"
    );
}

#[test]
fn two_instances_with_the_same_answer_route_a_key_alike() {
    let dns = Dns::start();
    let (port, _b) = backends_on_one_port(4);
    dns.set("app.test", Zone::Addresses((0..4).map(ip).collect()));
    let upstream = format!(
        "    balance: consistent_hash\n    hash_key: header:X-User\n    backends:\n      - app.test:{port}\n"
    );
    let yaml = config(&dns, &upstream, "");
    // The DNS server turns its answer's order on every query: each instance
    // sees the addresses in another order.
    let (one, two) = (Balancer::start(&yaml), Balancer::start(&yaml));
    let mut spread = HashMap::new();
    for user in 0..60 {
        let header = format!("X-User: user-{user}");
        let a = http1(one.addr, "GET", "/", &[&header]).body;
        let b = http1(two.addr, "GET", "/", &[&header]).body;
        assert_eq!(a, b, "user-{user}");
        *spread.entry(a).or_insert(0) += 1;
    }
    assert!(spread.len() >= 3, "{spread:?}");
}

#[test]
fn localhost_resolves_from_etc_hosts() {
    let b = TestBackend::start("local");
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends:\n      - localhost:{}\nadmin:\n  bind: 127.0.0.1:0\n",
        b.addr.port()
    );
    let lb = Balancer::start(&yaml);
    assert_eq!(get(lb.addr, "/").body, "local");
    let status = status_json(lb.admin());
    let backends = status["upstreams"]["app"]["backends"].as_array().unwrap();
    assert!(
        backends.iter().any(|x| x["address"] == b.addr.to_string()
            && x["from"] == format!("localhost:{}", b.addr.port())),
        "{status}"
    );
}

fn send_json(admin: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let length = format!("Content-Length: {}", body.len());
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{length}\r\nContent-Type: application/json\r\n\r\n{body}"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

#[test]
fn admin_sets_weights_adds_and_removes_backends_until_the_next_reload() {
    let (b1, b2, b3) = (
        TestBackend::start("b1"),
        TestBackend::start("b2"),
        TestBackend::start("b3"),
    );
    let yaml = simple_config(&[&b1, &b2]);
    let lb = Balancer::start(&yaml);
    let admin = lb.admin();
    let base = "/upstreams/app/backends";

    // A weight takes effect on the next requests.
    let r = send_json(
        admin,
        "PUT",
        &format!("{base}/{}/weight", b1.addr),
        r#"{"weight": 3}"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("until the next reload"), "{r:?}");
    let counts = tally(lb.addr, 40);
    assert_eq!((counts["b1"], counts["b2"]), (30, 10), "{counts:?}");

    // Added: in rotation at once (the upstream has no health checks); a second add is a conflict.
    let add = format!(r#"{{"address": "{}", "weight": 1}}"#, b3.addr);
    let r = send_json(admin, "POST", base, &add);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(send_json(admin, "POST", base, &add).status, 409);
    let counts = tally(lb.addr, 50);
    assert_eq!(counts.get("b3"), Some(&10), "{counts:?}");
    let status = status_json(admin);
    assert!(
        status["upstreams"]["app"]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["address"] == b3.addr.to_string() && b["from"] == "admin"),
        "{status}"
    );

    // Removed: 202 at once, no new requests, then gone.
    let r = http1(admin, "DELETE", &format!("{base}/{}", b2.addr), &[]);
    assert_eq!(r.status, 202, "{r:?}");
    let before = b2.requests().len();
    tally(lb.addr, 20);
    assert_eq!(b2.requests().len(), before);
    wait_until(Duration::from_secs(5), "b2 gone from /status", || {
        !listed(admin).iter().any(|(a, _)| *a == b2.addr.to_string())
    });

    // Bad input: a one-line 4xx, nothing changed.
    let cases = [
        (
            "PUT",
            format!("{base}/{}/weight", b1.addr),
            r#"{"weight": 0}"#,
            400,
        ),
        (
            "PUT",
            format!("{base}/{}/weight", b1.addr),
            r#"{"weight": 1001}"#,
            400,
        ),
        (
            "PUT",
            format!("{base}/{}/weight", b1.addr),
            r#"{"weigh": 2}"#,
            400,
        ),
        ("PUT", format!("{base}/{}/weight", b1.addr), "not json", 400),
        (
            "PUT",
            format!("{base}/127.0.0.1:1/weight"),
            r#"{"weight": 2}"#,
            404,
        ),
        (
            "PUT",
            format!("/upstreams/nope/backends/{}/weight", b1.addr),
            r#"{"weight": 2}"#,
            404,
        ),
        ("POST", base.to_string(), r#"{"address": "nowhere"}"#, 400),
        ("DELETE", format!("{base}/127.0.0.1:1"), "", 404),
    ];
    let before = status_json(admin)["upstreams"].clone();
    for (method, path, body, status) in cases {
        let r = send_json(admin, method, &path, body);
        assert_eq!(r.status, status, "{method} {path} {body}: {r:?}");
        assert_eq!(r.body.lines().count(), 1, "{r:?}");
    }
    let after = status_json(admin)["upstreams"].clone();
    let addresses = |u: &serde_json::Value| {
        u["app"]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["address"].clone(), b["weight"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(addresses(&before), addresses(&after));

    // A reload goes back to the file.
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), &yaml).unwrap();
    lb.server().reload_from(path.path());
    let weights: Vec<_> = addresses(&status_json(admin)["upstreams"]);
    assert_eq!(
        weights,
        vec![
            (serde_json::json!(b1.addr.to_string()), serde_json::json!(1)),
            (serde_json::json!(b2.addr.to_string()), serde_json::json!(1)),
        ]
    );
}
