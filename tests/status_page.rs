//! The status page (`GET /` on the admin listener) in a real headless
//! Chromium, driven over the DevTools protocol: it loads with no console
//! error, shows the config's backends, and follows a backend going down
//! without being reloaded.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Headless Chromium with its DevTools endpoint; killed on drop.
struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// None when Chromium is not installed (and this is not CI).
    fn start() -> Option<Browser> {
        let Some(binary) = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "chromium is missing under CI: .ci/run installs it"
            );
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n*** SKIPPED: the status page's browser test, chromium is not installed (apt-get install -y chromium) ***\n",
            );
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1100,650",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or("").parse::<u16>());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not say where DevTools listens")
            .unwrap();
        Some(Browser {
            child,
            port,
            _profile: profile,
        })
    }

    /// A new tab's DevTools connection.
    fn tab(&self) -> Tab {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        // DevTools keeps the connection open: the reply is read by its length.
        let mut http = TcpStream::connect(addr).unwrap();
        http.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        std::io::Write::write_all(
            &mut http,
            b"PUT /json/new?about:blank HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .unwrap();
        let reply = read_reply(&mut http, &mut Vec::new()).unwrap();
        let target: Value = serde_json::from_str(&reply.body).unwrap();
        let url = target["webSocketDebuggerUrl"].as_str().unwrap().to_string();
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (socket, _) = tungstenite::client(url.as_str(), stream).unwrap();
        let mut tab = Tab {
            socket,
            next: 0,
            console: Vec::new(),
        };
        tab.call("Runtime.enable", json!({}));
        tab.call("Page.enable", json!({}));
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Tab {
    socket: WebSocket<TcpStream>,
    next: u64,
    /// Console errors and uncaught exceptions, as the page reported them.
    console: Vec<String>,
}

impl Tab {
    /// Calls `method` and returns its result, noting console events on the way.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(request.to_string()))
            .unwrap();
        loop {
            let Message::Text(text) = self.socket.read().unwrap() else {
                continue;
            };
            let message: Value = serde_json::from_str(&text).unwrap();
            match message["method"].as_str() {
                Some("Runtime.consoleAPICalled") if message["params"]["type"] == "error" => {
                    self.console.push(message["params"]["args"].to_string());
                }
                Some("Runtime.exceptionThrown") => {
                    self.console
                        .push(message["params"]["exceptionDetails"].to_string());
                }
                _ => {}
            }
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
        }
    }

    /// The value of `expression` in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    fn wait_for(&mut self, limit: Duration, what: &str, expression: &str) {
        let start = Instant::now();
        while self.eval(expression) != json!(true) {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The page's state label for the backend at `address`.
fn state_of(address: std::net::SocketAddr) -> String {
    format!("(document.querySelector('[data-backend=\"{address}\"] .state') || {{}}).textContent")
}

#[test]
fn the_status_page_shows_the_backends_and_follows_one_going_down() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let (a, b) = (TestBackend::start("a"), TestBackend::start("b"));
    let yaml = format!(
        "listeners:\n  - bind: 127.0.0.1:0\n    routes:\n      - upstream: app\nupstreams:\n  app:\n    balance: least_connections\n    max_connections: 50\n    health_check: {{ path: /healthz, interval: 100ms, unhealthy_threshold: 1 }}\n    backends:\n{}caches:\n  pages:\n    memory: 16MiB\nadmin:\n  bind: 127.0.0.1:0\n  token: page-token\n",
        backend_list(&[&a, &b])
    );
    let lb = Balancer::start(&yaml);
    for _ in 0..4 {
        assert_eq!(get(lb.addr, "/").status, 200);
    }
    let page = format!("http://{}/", lb.admin());
    let mut tab = browser.tab();
    tab.call("Page.navigate", json!({ "url": page }));
    // With a token configured, the page asks for it, then shows the figures.
    tab.wait_for(
        Duration::from_secs(10),
        "the token form",
        "document.getElementById('login').style.display === 'block'",
    );
    tab.eval(
        "document.getElementById('token').value = 'page-token'; \
         document.getElementById('login-form').requestSubmit(); true",
    );
    let shown = |addr| format!("{} === 'up'", state_of(addr));
    tab.wait_for(Duration::from_secs(10), "backend a up", &shown(a.addr));
    tab.wait_for(Duration::from_secs(10), "backend b up", &shown(b.addr));
    assert_eq!(
        tab.eval("document.querySelector('[data-upstream=\"app\"] h2 small').textContent"),
        "least_connections · queue 0"
    );
    assert_eq!(
        tab.eval("document.querySelector('#caches tr:nth-child(2) td').textContent"),
        "pages"
    );
    // b goes down; the open page follows within a few seconds, not reloaded.
    b.health.store(HEALTH_FAIL, Ordering::SeqCst);
    let went = Instant::now();
    let down = format!("{} === 'down'", state_of(b.addr));
    tab.wait_for(Duration::from_secs(5), "backend b shown down", &down);
    println!(
        "the page showed b down {:?} after it failed",
        went.elapsed()
    );
    // Drained from the page, with the token it was given.
    tab.eval(&format!(
        "document.querySelector('[data-backend=\"{}\"] button').click(); true",
        a.addr
    ));
    let draining = format!("{} === 'draining'", state_of(a.addr));
    tab.wait_for(Duration::from_secs(5), "backend a draining", &draining);
    assert_eq!(
        status_json_with(lb.admin(), "page-token")["upstreams"]["app"]["backends"][0]["draining"],
        true
    );
    if let Ok(dir) = std::env::var("BASCULE_SCREENSHOT") {
        let shot = tab.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            shot["data"].as_str().unwrap(),
        )
        .unwrap();
        std::fs::write(format!("{dir}/status-page.png"), png).unwrap();
    }
    assert!(tab.console.is_empty(), "console errors: {:?}", tab.console);
}

fn status_json_with(admin: std::net::SocketAddr, token: &str) -> Value {
    let header = format!("Authorization: Bearer {token}");
    serde_json::from_str(&http1(admin, "GET", "/status", &[&header]).body).unwrap()
}
