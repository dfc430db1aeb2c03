//! The admin listener: /status JSON and /metrics in Prometheus text.

mod common;

use common::*;

#[test]
fn status_lists_upstreams_and_backends() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let yaml = simple_config(&[&a, &b]).replace(
        &format!("      - {}\n", b.addr),
        &format!("      - {{ address: {}, weight: 3 }}\n", b.addr),
    );
    let lb = Balancer::start(&yaml);
    let r = get(lb.admin(), "/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let app = &v["upstreams"]["app"];
    assert_eq!(app["balance"], "round_robin");
    assert_eq!(app["backends"][0]["address"], a.addr.to_string());
    assert_eq!(app["backends"][0]["weight"], 1);
    assert_eq!(app["backends"][1]["weight"], 3);
    assert_eq!(app["backends"][1]["healthy"], true);
    assert_eq!(app["backends"][1]["active_requests"], 0);
    assert_eq!(get(lb.admin(), "/nope").status, 404);
    assert_eq!(http1(lb.admin(), "POST", "/status", &[]).status, 405);
}

#[test]
fn metrics_count_requests_by_upstream_backend_and_status() {
    let a = TestBackend::start("a");
    let yaml = simple_config(&[&a]).replace(
        "      - upstream: app",
        "      - match: { path_prefix: /app }\n        upstream: app",
    );
    let lb = Balancer::start(&yaml);
    for _ in 0..3 {
        assert_eq!(get(lb.addr, "/app").status, 200);
    }
    assert_eq!(get(lb.addr, "/app/status/500").status, 500);
    assert_eq!(get(lb.addr, "/unrouted").status, 404);
    let m = get(lb.admin(), "/metrics").body;
    let backend = a.addr.to_string();
    // Other tests in this process share the recorder, so look for our own backend's lines.
    let line = |needle: &str| {
        m.lines()
            .find(|l| l.starts_with(needle))
            .map(str::to_string)
    };
    assert_eq!(
        line(&format!(
            "bascule_requests_total{{upstream=\"app\",backend=\"{backend}\",status=\"200\"}}"
        ))
        .unwrap(),
        format!(
            "bascule_requests_total{{upstream=\"app\",backend=\"{backend}\",status=\"200\"}} 3"
        )
    );
    assert!(
        line(&format!(
            "bascule_requests_total{{upstream=\"app\",backend=\"{backend}\",status=\"500\"}} 1"
        ))
        .is_some(),
        "{m}"
    );
    assert!(
        line("bascule_requests_total{upstream=\"none\",backend=\"none\",status=\"404\"}").is_some(),
        "{m}"
    );
    assert!(
        line(&format!(
            "bascule_backend_healthy{{upstream=\"app\",backend=\"{backend}\"}} 1"
        ))
        .is_some(),
        "{m}"
    );
    assert!(
        line(&format!(
            "bascule_backend_active_requests{{upstream=\"app\",backend=\"{backend}\"}} 0"
        ))
        .is_some(),
        "{m}"
    );
    assert!(
        m.contains("# TYPE bascule_request_duration_seconds histogram"),
        "{m}"
    );
    assert!(
        line("bascule_request_duration_seconds_count{upstream=\"app\"}").is_some(),
        "{m}"
    );
}

#[test]
fn access_log_writes_combined_lines_with_upstream_backend_and_duration() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = simple_config(&[&a]) + &format!("access_log: {}\n", log.display());
    let lb = Balancer::start(&yaml);
    assert_eq!(
        http1(
            lb.addr,
            "GET",
            "/x?y=1",
            &["User-Agent: tester/1", "Referer: http://r/"]
        )
        .status,
        200
    );
    wait_until(
        std::time::Duration::from_secs(10),
        "the access log line",
        || std::fs::read_to_string(&log).is_ok_and(|s| s.ends_with('\n')),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().next().unwrap();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(&format!(
            "] \"GET /x?y=1 HTTP/1.1\" 200 1 \"http://r/\" \"tester/1\" upstream=app backend={} duration=",
            a.addr
        )),
        "{line}"
    );
}

#[test]
fn requests_refused_unread_are_counted_and_logged_without_a_route() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = simple_config(&[&a]) + &format!("access_log: {}\n", log.display());
    let lb = Balancer::start(&yaml);
    // No other test in this process makes these replies, so the counts are exact.
    let count = |status: u16| -> u64 {
        let needle = format!(
            "bascule_requests_total{{upstream=\"none\",backend=\"none\",status=\"{status}\"}} "
        );
        get(lb.admin(), "/metrics")
            .body
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()).map(|n| n.parse().unwrap()))
            .unwrap_or(0)
    };
    let (bad_before, version_before) = (count(400), count(505));
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\nHost x\r\n\r\n"[..], 400),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    ] {
        assert_eq!(parse_reply(&raw_exchange(lb.addr, request)).status, status);
    }
    assert_eq!(count(400) - bad_before, 2);
    assert_eq!(count(505) - version_before, 1);
    wait_until(
        std::time::Duration::from_secs(10),
        "three access log lines",
        || std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 3 && s.ends_with('\n')),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let statuses: Vec<&str> = text
        .lines()
        .map(|line| {
            assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
            assert!(
                line.contains("upstream=none backend=none duration="),
                "{line}"
            );
            let rest = line
                .split("] \"-\" ")
                .nth(1)
                .expect("no `\"-\"` request line");
            rest.split(' ').next().unwrap()
        })
        .collect();
    assert_eq!(statuses, ["400", "400", "505"]);
}

#[test]
fn a_token_guards_every_admin_endpoint_but_metrics() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin.token");
    // Surrounding white space (a file's last newline) is not part of the token.
    std::fs::write(&file, "  s3cret-token\n").unwrap();
    let yaml = simple_config(&[&a]).replace(
        "admin:\n  bind: 127.0.0.1:0\n",
        &format!(
            "admin:\n  bind: 127.0.0.1:0\n  token_file: {}\n",
            file.display()
        ),
    );
    let lb = Balancer::start(&yaml);
    let admin = lb.admin();
    let good = "Authorization: Bearer s3cret-token";
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/nope"),
        ("POST", "/caches/none/purge"),
    ] {
        for wrong in [
            &[][..],
            &["Authorization: Bearer s3cret-tokeN"],
            &["Authorization: s3cret-token"],
        ] {
            let reply = http1(admin, method, path, wrong);
            assert_eq!(reply.status, 401, "{method} {path} {wrong:?}");
            assert_eq!(reply.headers["www-authenticate"], "Bearer");
        }
    }
    // Refused, the drain changed nothing.
    let drain = format!("/upstreams/app/backends/{}/drain", a.addr);
    assert_eq!(http1(admin, "POST", &drain, &[]).status, 401);
    let status = http1(admin, "GET", "/status", &[good]);
    assert_eq!(status.status, 200);
    let v: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(v["upstreams"]["app"]["backends"][0]["draining"], false);
    assert_eq!(http1(admin, "POST", &drain, &[good]).status, 200);
    // Prometheus scrapes without it.
    assert_eq!(get(admin, "/metrics").status, 200);
    assert_eq!(http1(admin, "POST", "/metrics", &[]).status, 401);
}

#[test]
fn an_admin_listener_open_to_other_hosts_without_a_token_is_warned_of() {
    let a = TestBackend::start("a");
    let open = simple_config(&[&a]).replace(
        "admin:\n  bind: 127.0.0.1:0\n",
        "admin:\n  bind: 0.0.0.0:0\n",
    );
    let p = Process::start(&open);
    let warning = "is reachable from other hosts and has no admin.token";
    wait_until(std::time::Duration::from_secs(5), "the warning", || {
        p.log.lock().unwrap().contains(warning)
    });
    let guarded = open.replace("  bind: 0.0.0.0:0\n", "  bind: 0.0.0.0:0\n  token: t\n");
    let p = Process::start(&guarded);
    let closed = simple_config(&[&a]);
    let q = Process::start(&closed);
    // Both have logged their start (their listeners), and neither warns.
    for p in [&p, &q] {
        assert!(
            !p.log.lock().unwrap().contains(warning),
            "{}",
            p.log.lock().unwrap()
        );
    }
}

#[test]
fn admin_token_mistakes_are_reported_at_their_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.token"), "\n").unwrap();
    let base = "listeners:\n  - bind: 127.0.0.1:0\n    routes: [{ upstream: app }]\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";
    for (admin, expected) in [
        (
            "admin: { token: a, token_file: b }\n",
            "7:32: admin.token_file: give token or token_file, not both",
        ),
        (
            "admin: { token_file: empty.token }\n",
            "7:22: admin.token_file: the token is empty",
        ),
        (
            "admin: { token: \"two words\" }\n",
            "7:17: admin.token: the token must be printable ASCII without spaces",
        ),
    ] {
        let path = dir.path().join("bascule.yaml");
        std::fs::write(&path, format!("{base}{admin}")).unwrap();
        let problems = bascule::config::load(&path).unwrap_err().to_string();
        assert!(problems.contains(expected), "{problems}");
    }
}

#[test]
fn a_json_access_log_line_per_request_whatever_its_bytes() {
    let a = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml =
        simple_config(&[&a]) + &format!("access_log: {}\naccess_log_format: json\n", log.display());
    let lb = Balancer::start(&yaml);
    let mut hostile = b"GET /a\\b{c}|^?q=%00%22'` HTTP/1.1\r\nHost: x\r\nUser-Agent: t\tx\"y\\\xff\r\nConnection: close\r\n\r\n".to_vec();
    let reply = parse_reply(&raw_exchange(lb.addr, &hostile));
    assert_eq!(reply.status, 200);
    hostile = b"GET /a\"b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    assert_eq!(parse_reply(&raw_exchange(lb.addr, &hostile)).status, 200);
    // A control byte in a field's name: refused unread (400), logged all the same.
    hostile = b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01: x\r\n\r\n".to_vec();
    assert_eq!(parse_reply(&raw_exchange(lb.addr, &hostile)).status, 400);
    wait_until(
        std::time::Duration::from_secs(10),
        "three log lines",
        || std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 3),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    println!("{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let served = &lines[0];
    assert_eq!(served["method"], "GET");
    assert_eq!(served["uri"], "/a\\b{c}|^?q=%00%22'`");
    assert_eq!(served["status"], 200);
    assert_eq!(served["bytes"], 1);
    assert_eq!(served["upstream"], "app");
    assert_eq!(served["backend"], a.addr.to_string());
    assert_eq!(served["attempts"], 1);
    assert_eq!(served["cache"], serde_json::Value::Null);
    assert_eq!(served["client"], "127.0.0.1");
    assert_eq!(served["user_agent"], "t\tx\"y\\\u{fffd}");
    assert!(served["duration"].as_f64().unwrap() >= 0.0);
    assert!(served["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["uri"], "/a\"b");
    let refused = &lines[2];
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["uri"], serde_json::Value::Null);
    assert_eq!(refused["attempts"], 0);
}
