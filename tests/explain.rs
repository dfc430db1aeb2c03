//! `GET /explain` on the admin listener: the backend a request would go to
//! now, by the live selection code, changing nothing.

mod common;

use std::time::Duration;

use common::*;

fn explain(admin: std::net::SocketAddr, query: &str) -> serde_json::Value {
    let reply = get(admin, &format!("/explain?{query}"));
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

#[test]
fn a_consistent_hash_key_whose_backend_is_down_is_explained_and_goes_where_it_says() {
    let backends: Vec<TestBackend> = ["a", "b", "c"].map(TestBackend::start).into();
    let list = backend_list(&backends.iter().collect::<Vec<_>>());
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - match: {{ path_prefix: /users }}\n        upstream: users\nupstreams:\n  users:\n    balance: consistent_hash\n    hash_key: header:X-User\n    health_check: {{ path: /healthz, interval: 100ms, unhealthy_threshold: 1 }}\n    backends:\n{list}admin:\n  bind: 127.0.0.1:0\n"
    );
    let lb = Balancer::start(&yaml);
    let admin = lb.admin();
    let down = &backends[1];
    down.health
        .store(HEALTH_FAIL, std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "b to be down", || {
        !shown_healthy_in(admin, "users", down.addr)
    });
    // A user whose key belongs to the backend that is down.
    let (user, answer) = (0..200)
        .map(|n| format!("user-{n}"))
        .find_map(|user| {
            let host = lb.addr;
            let answer = explain(
                admin,
                &format!("url=http%3A%2F%2F{host}%2Fusers%2F1&header=X-User%3A{user}"),
            );
            answer["why"]
                .as_str()
                .unwrap()
                .contains(&format!("the key's backend {} is down", down.addr))
                .then_some((user, answer))
        })
        .expect("a key of the down backend among 200");
    println!("{}", serde_json::to_string_pretty(&answer).unwrap());
    assert_eq!(answer["upstream"], "users");
    assert_eq!(answer["balance"], "consistent_hash");
    assert_eq!(answer["route"]["index"], 0);
    assert_eq!(answer["route"]["match"]["path_prefix"], "/users");
    assert_eq!(answer["key"]["source"], "header:x-user");
    assert_eq!(answer["key"]["value"], user.as_str());
    assert_eq!(answer["queued"], false);
    let skipped = answer["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["address"], down.addr.to_string());
    assert_eq!(skipped[0]["reason"], "down");
    // The live request goes where the answer said, every time.
    let chosen = answer["backend"].as_str().unwrap();
    let chosen = backends
        .iter()
        .find(|b| b.addr.to_string() == chosen)
        .unwrap();
    for _ in 0..3 {
        let header = format!("X-User: {user}");
        let reply = http1(lb.addr, "GET", "/users/1", &[&header]);
        assert_eq!(reply.body, chosen.name);
    }
}

#[test]
fn an_explanation_takes_no_step_and_counts_nothing() {
    let (a, b, c) = (
        TestBackend::start("a"),
        TestBackend::start("b"),
        TestBackend::start("c"),
    );
    let lb = Balancer::start(&simple_config(&[&a, &b, &c]));
    let admin = lb.admin();
    let query = format!("url=http://{}/x", lb.addr);
    for _ in 0..5 {
        let first = explain(admin, &query);
        let again = explain(admin, &query);
        // Asking again gives the same answer: the rotation did not move...
        assert_eq!(first["backend"], again["backend"]);
        assert!(first["why"].as_str().unwrap().starts_with("round_robin: "));
        // ...and the next request goes where it said.
        let reply = get(lb.addr, "/x");
        let served = [&a, &b, &c]
            .into_iter()
            .find(|t| t.name == reply.body)
            .unwrap();
        assert_eq!(first["backend"], served.addr.to_string());
    }
    let metrics = get(admin, "/metrics").body;
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("bascule_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 5.0, "only the live requests are counted");
}

#[test]
fn what_explain_cannot_answer_gets_a_400_and_no_route_is_said() {
    let a = TestBackend::start("a");
    let yaml = simple_config(&[&a]).replace(
        "      - upstream: app\n",
        "      - match: { host: app.example.com }\n        upstream: app\n",
    );
    let lb = Balancer::start(&yaml);
    let admin = lb.admin();
    for query in [
        "",
        "url=/relative",
        "url=http://x/&method=G%20T",
        "url=http://x/&header=no-colon",
        "url=http://x/&client_ip=nope",
        "url=http://x/&colour=blue",
    ] {
        let reply = get(admin, &format!("/explain?{query}"));
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert!(
            reply.body.starts_with("400 Bad Request: "),
            "{}",
            reply.body
        );
    }
    let answer = explain(admin, "url=http://other.example.com/");
    assert_eq!(answer["route"], serde_json::Value::Null);
    assert_eq!(answer["why"], "no route matches: the request would get 404");
    let answer = explain(admin, "url=http://app.example.com/&client_ip=10.1.2.3");
    assert_eq!(answer["backend"], a.addr.to_string());
    assert_eq!(answer["route"]["match"]["host"], "app.example.com");
}
