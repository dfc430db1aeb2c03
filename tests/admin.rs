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
