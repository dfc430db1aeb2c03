//! The command line: check, version, exit codes, signals.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

fn check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let file = path.display().to_string();
    let strip = |b: &[u8]| String::from_utf8_lossy(b).replace(&file, "FILE");
    (
        out.status.code().unwrap(),
        strip(&out.stdout),
        strip(&out.stderr),
    )
}

#[test]
fn check_refuses_a_billion_laughs_at_once() {
    // Ten lists of ten aliases of the list before: 10^10 values once expanded.
    let mut yaml = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        yaml.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    yaml.push_str("listeners: *a9\n");
    let started = std::time::Instant::now();
    let (code, _, err) = check(&yaml);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "FILE:4:45: YAML syntax: aliases repeat more than 10000 values (a \"billion laughs\"?)\n"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn check_accepts_a_good_file() {
    let (code, out, _) = check("listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: app}]\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n");
    assert_eq!(code, 0);
    assert_eq!(out, "FILE: ok\n");
}

#[test]
fn check_reports_every_problem_with_its_position() {
    let yaml = "\
listeners:
  - bind: 127.0.0.1:8080
    routes:
      - upstream: ap
upstreams:
  app:
    balance: round_robin
    backends:
      - 127.0.0.1:9001
      - { address: 127.0.0.1:9002, weight: 0 }
    timeout: { connect: 1s }
";
    let (code, out, err) = check(yaml);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(
        err,
        "FILE:4:19: listeners[0].routes[0].upstream: no upstream named `ap` (known: app)\n\
         FILE:10:44: upstreams.app.backends[1].weight: `0` is not a whole number in the range 1 to 1000\n\
         FILE:11:5: upstreams.app.timeout: unknown key (expected one of: backends, balance, discovery, fail_open, hash_balance_factor, hash_key, health_check, max_connections, max_idle_connections, passive, queue, retries, retry_budget, slow_start, sticky, timeouts, tls)\n"
    );
}

#[test]
fn check_reports_syntax_errors_and_missing_files() {
    let (code, _, err) = check("listeners: [\n  - bind\n");
    assert_eq!(code, 1);
    assert!(err.starts_with("FILE:"), "{err}");
    assert!(err.contains("YAML syntax"), "{err}");
    let out = Command::new(bin())
        .args(["check", "--config", "/nonexistent/b.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("/nonexistent/b.yaml: cannot read the file"));
}

#[test]
fn version_help_and_bad_command_lines() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("bascule "));
    let out = Command::new(bin()).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("check"));
    assert_eq!(
        Command::new(bin())
            .arg("--frobnicate")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert_eq!(Command::new(bin()).output().unwrap().status.code(), Some(2));
}

#[test]
fn bad_config_or_taken_port_at_start_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.yaml");
    std::fs::write(&path, "listeners: []\n").unwrap();
    let out = Command::new(bin()).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(
        &path,
        format!("listeners:\n  - bind: 127.0.0.1:{port}\n    routes: [{{upstream: a}}]\nupstreams:\n  a: {{ backends: [127.0.0.1:1] }}\n"),
    )
    .unwrap();
    let out = Command::new(bin()).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let b = TestBackend::start("a");
    let mut p = Process::start(&simple_config(&[&b]));
    let addr = p.addrs[0];
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the backend to get the request",
        || !b.requests().is_empty(),
    );
    p.signal(SIGTERM);
    // New connections are refused once the listeners close.
    wait_until(Duration::from_secs(10), "the listener to close", || {
        TcpStream::connect(addr).is_err()
    });
    let mut head = [0u8; 15];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), 0);
}

/// HTTP/2 streams are served by their own connection type (h2c here, h2 over
/// TLS alike). On SIGTERM the stream in flight finishes, and the connection is
/// told to go away (GOAWAY): the client keeps it open, yet the process exits
/// well before `shutdown_timeout` would cut it.
#[test]
fn sigterm_lets_an_http2_stream_finish_and_closes_its_connection() {
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]) + "shutdown_timeout: 60s\n";
    let mut p = Process::start(&yaml);
    let addr = p.addrs[0];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let in_flight = rt.spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut send = h2_client(stream).await;
        let req = http::Request::get("http://x/slow?ms=1500")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        // Returned, so that the client's side of the connection stays open.
        (status, body, send)
    });
    wait_until(
        Duration::from_secs(10),
        "the backend to get the request",
        || !b.requests().is_empty(),
    );
    p.signal(SIGTERM);
    let (status, body, _send) = rt.block_on(in_flight).unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"a");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), 0);
}

#[test]
fn sigterm_waits_for_open_tunnels_up_to_shutdown_timeout() {
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]) + "shutdown_timeout: 1s\n";
    let mut p = Process::start(&yaml);
    let mut s = TcpStream::connect(p.addrs[0]).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let started = std::time::Instant::now();
    p.signal(SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(20)), 0);
    // The tunnel was waited for, until shutdown_timeout cut it.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(p
        .log
        .lock()
        .unwrap()
        .contains("shutdown_timeout (1s) passed"));
}

#[test]
fn sighup_applies_a_valid_file_and_keeps_the_old_one_otherwise() {
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let p = Process::start(&simple_config(&[&a]));
    let addr = p.addrs[0];
    assert_eq!(get(addr, "/").body, "a");
    let yaml = simple_config(&[&b]);
    std::fs::write(&p.config, yaml).unwrap();
    p.signal(SIGHUP);
    wait_until(Duration::from_secs(10), "the reload", || {
        get(addr, "/").body == "b"
    });
    std::fs::write(&p.config, "listeners: [oops\n").unwrap();
    p.signal(SIGHUP);
    wait_until(
        Duration::from_secs(10),
        "the failed reload to be logged",
        || p.log.lock().unwrap().contains("reload failed"),
    );
    assert_eq!(get(addr, "/").body, "b");
    let metrics = get(p.admin.unwrap(), "/metrics").body;
    assert!(
        metrics.contains("bascule_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bascule_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(p.admin.unwrap(), "/status").body).unwrap();
    assert_eq!(status["last_reload"]["result"], "failure");
    let error = status["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("YAML syntax"), "{status}");
}

#[test]
fn sighup_as_soon_as_it_listens_reloads_rather_than_ending_the_process() {
    // SIGHUP's default action ends a process: the handlers must be in place
    // before the listeners are, or a reload sent at start-up (a service manager
    // reloading a unit just started) kills the balancer.
    let b = TestBackend::start("a");
    let yaml = simple_config(&[&b]).replace("admin:\n  bind: 127.0.0.1:0\n", "");
    // The window is a few hundred microseconds wide: many tries to meet it.
    for _ in 0..60 {
        let mut p = Process::start(&yaml);
        p.signal(SIGHUP);
        wait_until(Duration::from_secs(10), "the reload or the exit", || {
            p.log.lock().unwrap().contains("reloaded") || p.child.try_wait().unwrap().is_some()
        });
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "SIGHUP ended bascule:\n{}",
            p.log.lock().unwrap()
        );
        assert_eq!(get(p.addrs[0], "/").body, "a");
    }
}

#[test]
fn check_against_previews_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let backends = |n: usize| {
        (1..=n)
            .map(|i| format!("127.0.0.1:90{i:02}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = |extra_listener: bool, n: usize| {
        let mut s =
            String::from("listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{ upstream: app }]\n");
        if extra_listener {
            s.push_str("  - bind: 127.0.0.1:8081\n    routes: [{ upstream: app }]\n");
        }
        s + &format!(
            "upstreams:\n  app:\n    balance: consistent_hash\n    sticky: {{ secret: s }}\n    backends: [{}]\n",
            backends(n)
        )
    };
    let (old, new) = (dir.path().join("old.yaml"), dir.path().join("new.yaml"));
    std::fs::write(&old, config(false, 10)).unwrap();
    // The new file also gives a backend by name.
    let named = config(true, 9).replace("backends: [", "backends: [app.internal:9000, ");
    std::fs::write(&new, named).unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg("-c")
        .arg(&new)
        .arg("--against")
        .arg(&old)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+ listener 127.0.0.1:8081"), "{text}");
    assert!(
        text.contains("+ upstream app: backends from app.internal:9000 (weight 1), as it resolves"),
        "{text}"
    );
    assert!(
        text.contains("- upstream app: backend 127.0.0.1:9010"),
        "{text}"
    );
    assert!(
        text.contains("clients pinned to 127.0.0.1:9010 are balanced again"),
        "{text}"
    );
    // One of ten equal backends removed: about a tenth of the keys move, no more.
    let share = preview_share(text.lines()).unwrap_or_else(|| panic!("{text}"));
    assert!((8.0..=11.0).contains(&share), "{share}% moved");
    let same = Command::new(bin())
        .arg("check")
        .arg("-c")
        .arg(&old)
        .arg("--against")
        .arg(&old)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&same.stdout).contains("no change from"));
}

#[test]
fn check_points_at_a_bracket_never_closed() {
    let yaml = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [\n      - upstream: app\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";
    let (code, _, err) = check(yaml);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(
            "FILE:3:13: YAML syntax: this `[` is never closed with `]` (the parser stopped at 4:"
        ),
        "{err}"
    );
}

#[test]
fn check_opens_the_access_log_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let base = "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{upstream: app}]\nupstreams:\n  app:\n    backends: [127.0.0.1:9001]\n";
    let missing = dir.path().join("no-such-dir/access.log");
    let (code, _, err) = check(&format!("{base}access_log: {}\n", missing.display()));
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "FILE:7:13: access_log: cannot open {} for appending: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    let good = dir.path().join("access.log");
    let (code, out, _) = check(&format!("{base}access_log: {}\n", good.display()));
    assert_eq!((code, out.as_str()), (0, "FILE: ok\n"));
    assert!(good.exists(), "check opens the log as the start would");
}

#[test]
fn the_start_is_logged_with_version_config_and_workers() {
    let b = TestBackend::start("a");
    let p = Process::start(&simple_config(&[&b]));
    let log = p.log.lock().unwrap().clone();
    let first = log.lines().next().unwrap();
    assert!(
        first.ends_with(&format!(
            "bascule {} starting with {} (2 workers)",
            env!("CARGO_PKG_VERSION"),
            p.config.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on {}", p.addrs[0])),
        "{log}"
    );
}

#[test]
fn a_failed_reload_logs_each_problem_on_a_line_of_its_own() {
    let b = TestBackend::start("a");
    let p = Process::start(&simple_config(&[&b]));
    let bad = simple_config(&[&b])
        .replace("      - upstream: app", "      - upstream: nope")
        .replace("workers: 2", "workers: 2\ncolour: blue");
    std::fs::write(&p.config, bad).unwrap();
    p.signal(SIGHUP);
    wait_until(Duration::from_secs(10), "the failed reload", || {
        p.log.lock().unwrap().contains("the running config stays")
    });
    let log = p.log.lock().unwrap().clone();
    let file = p.config.display().to_string();
    let problems: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("reload failed: ").nth(1))
        .collect();
    assert_eq!(problems.len(), 3, "{log}");
    assert!(
        problems[0].starts_with(&format!(
            "{file}:4:19: listeners[0].routes[0].upstream: no upstream named `nope`"
        )),
        "{log}"
    );
    assert!(
        problems[1].starts_with(&format!("{file}:12:1: colour: unknown key")),
        "{log}"
    );
    assert_eq!(problems[2], "the running config stays");
    assert_eq!(get(p.addrs[0], "/").body, "a");
}

#[test]
fn sigusr1_reopens_the_access_log_after_a_rotation() {
    let b = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let yaml = format!(
        "{}access_log: {}\n",
        simple_config(&[&b]),
        log_path.display()
    );
    let p = Process::start(&yaml);
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(get(p.addrs[0], "/first").status, 200);
    wait_until(Duration::from_secs(10), "the first line", || {
        lines(&log_path) == 1
    });
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log_path, &rotated).unwrap();
    p.signal(SIGUSR1);
    wait_until(Duration::from_secs(10), "the reopen", || log_path.exists());
    assert_eq!(get(p.addrs[0], "/second").status, 200);
    wait_until(Duration::from_secs(10), "the second line", || {
        lines(&log_path) == 1
    });
    assert!(std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("GET /second"));
    assert_eq!(
        lines(&rotated),
        1,
        "the rotated file keeps the first line only"
    );
}

#[test]
fn sighup_while_draining_is_ignored_and_the_drain_goes_on() {
    let b = TestBackend::start("a");
    let mut p = Process::start(&simple_config(&[&b]));
    let mut s = TcpStream::connect(p.addrs[0]).unwrap();
    s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until(Duration::from_secs(10), "the backend to get it", || {
        !b.requests().is_empty()
    });
    p.signal(SIGTERM);
    wait_until(Duration::from_secs(10), "the shutdown to begin", || {
        p.log.lock().unwrap().contains("shutting down")
    });
    p.signal(SIGHUP);
    let mut head = [0u8; 15];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    assert_eq!(p.wait_exit(Duration::from_secs(20)), 0);
    let log = p.log.lock().unwrap().clone();
    assert!(log.contains("SIGHUP ignored: shutting down"), "{log}");
    assert!(!log.contains("exiting now"), "{log}");
}

#[test]
fn a_retried_connect_failure_is_logged_with_the_backend() {
    let b = TestBackend::start("a");
    // A port nothing listens on: connections to it are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    backends: [{dead}, {}]\n    retries: 1\nworkers: 1\n",
        b.addr
    );
    let p = Process::start(&yaml);
    // Round robin starts with the dead backend; the request goes on to the live one.
    for _ in 0..2 {
        assert_eq!(get(p.addrs[0], "/").body, "a");
    }
    wait_until(
        Duration::from_secs(10),
        "the failed attempt's warning",
        || {
            p.log
                .lock()
                .unwrap()
                .contains("the backend could not be reached")
        },
    );
    let log = p.log.lock().unwrap().clone();
    let warning = log
        .lines()
        .find(|l| l.contains("the backend could not be reached"))
        .unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("backend={dead}")), "{warning}");
    assert!(warning.contains("upstream=app"), "{warning}");
}

#[test]
fn a_reload_applies_a_new_access_log_and_says_what_needs_a_restart() {
    let b = TestBackend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first.log"), dir.path().join("second.log"));
    let yaml = |log: &std::path::Path, workers: usize| {
        simple_config(&[&b]).replace(
            "workers: 2",
            &format!("workers: {workers}\naccess_log: {}", log.display()),
        )
    };
    let p = Process::start(&yaml(&first, 2));
    let lines =
        |path: &std::path::Path| std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    assert_eq!(get(p.addrs[0], "/before").status, 200);
    wait_until(Duration::from_secs(10), "the first line", || {
        lines(&first) == 1
    });

    std::fs::write(&p.config, yaml(&second, 4)).unwrap();
    // What check --against says of it, before it is applied.
    let old = dir.path().join("old.yaml");
    std::fs::write(&old, yaml(&first, 2)).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&p.config)
        .arg("--against")
        .arg(&old)
        .output()
        .unwrap();
    let preview = String::from_utf8_lossy(&out.stdout);
    assert!(
        preview.contains("! workers: 2 -> 4 needs a restart; a reload keeps 2"),
        "{preview}"
    );
    assert!(
        preview.contains("~ access_log: lines go to the new destination"),
        "{preview}"
    );

    p.signal(SIGHUP);
    wait_until(Duration::from_secs(10), "the reload", || {
        p.log.lock().unwrap().contains("reloaded")
    });
    let log = p.log.lock().unwrap().clone();
    assert!(
        log.contains("reload: ! workers: 2 -> 4 needs a restart; a reload keeps 2"),
        "{log}"
    );
    assert_eq!(get(p.addrs[0], "/after").status, 200);
    wait_until(Duration::from_secs(10), "a line in the new log", || {
        lines(&second) == 1
    });
    assert!(std::fs::read_to_string(&second)
        .unwrap()
        .contains("GET /after"));
    assert_eq!(lines(&first), 1);
}

#[test]
fn an_inherited_socket_is_used_and_what_waited_in_its_backlog_is_served() {
    use std::os::fd::AsRawFd;
    let a = TestBackend::start("a");
    // The socket a service manager would hold: bound and listening before bascule runs.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::empty()).unwrap();
    // A client that came before bascule: it waits in the socket's backlog.
    let mut early = TcpStream::connect(addr).unwrap();
    early
        .write_all(b"GET /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // bascule could not bind this address itself: the test's socket has no SO_REUSEPORT.
    let yaml = simple_config(&[&a]).replacen("127.0.0.1:0", &addr.to_string(), 1);
    let fd = socket.as_raw_fd();
    let p = Process::start_command(&yaml, |config| {
        // As systemd hands it over: descriptor 3, LISTEN_FDS and the process's own LISTEN_PID.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --config \"$1\""
            ))
            .arg(bin())
            .arg(config);
        command
    });
    drop(socket);
    assert_eq!(p.addrs, [addr]);
    assert!(p
        .log
        .lock()
        .unwrap()
        .contains(&format!("socket activation: a socket inherited at {addr}")));
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    early.read_to_end(&mut reply).unwrap();
    assert_eq!(parse_reply(&reply).status, 200);
    assert_eq!(a.requests()[0].path, "/early");
    for _ in 0..4 {
        assert_eq!(get(addr, "/").status, 200);
    }
    assert_eq!(a.requests().len(), 5);
}
