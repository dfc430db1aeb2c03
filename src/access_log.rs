//! Access log lines: the combined log format with upstream, backend and
//! duration added, or one JSON object per line (`access_log_format: json`).
//!
//! Lines are formatted on the request's thread and written by a dedicated thread,
//! so a slow disk never stalls the event loop. Off unless configured. A file is
//! reopened at its path on request (`SIGUSR1`, as NGINX does), after a log
//! rotation has moved it away.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Version};
use serde_json::json;

use crate::config::{AccessLog, AccessLogFormat};

#[derive(Clone, Debug)]
pub struct AccessLogger {
    tx: mpsc::Sender<Message>,
    /// The format is JSON: shared by every clone, so a reload switches it.
    json: Arc<AtomicBool>,
}

#[derive(Debug)]
enum Message {
    Line(String),
    /// Close the file and open it again at its path.
    Reopen,
    /// Write to this destination from now on (a reload changed it).
    Switch(AccessLog),
}

fn open(config: &AccessLog) -> io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match config {
        AccessLog::Off => None,
        AccessLog::Stderr => Some(Box::new(io::stderr())),
        AccessLog::File(path) => Some(Box::new(
            OpenOptions::new().create(true).append(true).open(path)?,
        )),
    })
}

impl AccessLogger {
    /// Starts the writer thread; `None` when logging is off.
    pub fn start(config: &AccessLog, format: AccessLogFormat) -> io::Result<Option<Self>> {
        let Some(out) = open(config)? else {
            return Ok(None);
        };
        let mut config = config.clone();
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = BufWriter::new(out);
                while let Ok(message) = rx.recv() {
                    let mut next = Some(message);
                    // Flush once the queue is drained: batches under load, prompt when quiet.
                    while let Some(message) = next.take().or_else(|| rx.try_recv().ok()) {
                        match message {
                            Message::Line(line) => {
                                let _ = out.write_all(line.as_bytes());
                            }
                            Message::Reopen | Message::Switch(_) => {
                                let _ = out.flush();
                                if let Message::Switch(to) = message {
                                    config = to;
                                }
                                match open(&config) {
                                    Ok(Some(file)) => out = BufWriter::new(file),
                                    Ok(None) => {}
                                    // The old file stays: lines keep going somewhere.
                                    Err(e) => tracing::error!(
                                        "cannot reopen the access log {config:?}: {e}"
                                    ),
                                }
                            }
                        }
                    }
                    let _ = out.flush();
                }
            })?;
        let json = Arc::new(AtomicBool::new(format == AccessLogFormat::Json));
        Ok(Some(AccessLogger { tx, json }))
    }

    /// Logs one request, in the format in force.
    pub fn log(&self, request: &RequestLine, outcome: &Outcome<'_>) {
        let line = match self.json.load(Ordering::Relaxed) {
            true => request.json(outcome),
            false => request.format(outcome),
        };
        let _ = self.tx.send(Message::Line(line));
    }

    /// Writes the lines after those already sent in `format` (a reload changed it).
    pub fn set_format(&self, format: AccessLogFormat) {
        self.json
            .store(format == AccessLogFormat::Json, Ordering::Relaxed);
    }

    /// Reopens the log file at its path, after the lines already sent.
    pub fn reopen(&self) {
        let _ = self.tx.send(Message::Reopen);
    }

    /// Sends the lines after those already sent to `to` (a file or stderr).
    pub fn switch(&self, to: AccessLog) {
        let _ = self.tx.send(Message::Switch(to));
    }
}

/// What the log line needs from the request, captured when it arrives.
#[derive(Debug)]
pub struct RequestLine {
    pub client: IpAddr,
    pub time: SystemTime,
    /// Method, target and version; `None` for a request whose head could not be read.
    pub request: Option<(Method, String, Version)>,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
}

impl RequestLine {
    pub fn capture<B>(req: &http::Request<B>, client: IpAddr) -> Self {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        RequestLine {
            client,
            time: SystemTime::now(),
            request: Some((req.method().clone(), target.to_string(), req.version())),
            referer: header(http::header::REFERER),
            user_agent: header(http::header::USER_AGENT),
        }
    }

    /// For a request whose head could not be read: `-` stands for the request line,
    /// as the combined format has it for a field that is unknown.
    pub fn unread(client: IpAddr) -> Self {
        RequestLine {
            client,
            time: SystemTime::now(),
            request: None,
            referer: None,
            user_agent: None,
        }
    }

    /// The line as a JSON object, newline included. Every string is escaped
    /// by the encoder, and bytes that are not UTF-8 (in a header) were
    /// replaced when captured: a line is valid JSON whatever a client sent.
    pub fn json(&self, o: &Outcome<'_>) -> String {
        let (method, uri) = match &self.request {
            Some((method, target, _)) => (Some(method.as_str()), Some(target.as_str())),
            None => (None, None),
        };
        let none = |s: &str| (s != crate::metrics::NONE).then(|| s.to_string());
        let mut line = json!({
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "client": self.client.to_string(),
            "method": method,
            "uri": uri,
            "status": o.status,
            "bytes": o.bytes,
            "duration": o.took.as_secs_f64(),
            "upstream": none(o.upstream),
            "backend": none(o.backend),
            "attempts": o.attempts,
            "cache": o.cache,
            "queued": o.queued.as_secs_f64(),
            "referer": self.referer,
            "user_agent": self.user_agent,
        })
        .to_string();
        line.push('\n');
        line
    }

    /// The finished line, newline included.
    pub fn format(&self, o: &Outcome<'_>) -> String {
        let queued = if o.queued.is_zero() {
            String::new()
        } else {
            format!(" queued={:.6}", o.queued.as_secs_f64())
        };
        let cache = o.cache.map_or(String::new(), |c| format!(" cache={c}"));
        format!(
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\" upstream={} backend={} duration={:.6}{queued}{cache}\n",
            self.client,
            clf_time(self.time),
            escape(&self.request_text()),
            o.status,
            o.bytes,
            escape(self.referer.as_deref().unwrap_or("-")),
            escape(self.user_agent.as_deref().unwrap_or("-")),
            o.upstream,
            o.backend,
            o.took.as_secs_f64()
        )
    }
}

impl RequestLine {
    fn request_text(&self) -> String {
        match &self.request {
            Some((method, target, version)) => format!("{method} {target} {version:?}"),
            None => "-".into(),
        }
    }
}

/// What became of a request, for its line.
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    pub status: u16,
    pub bytes: u64,
    pub upstream: &'a str,
    pub backend: &'a str,
    pub took: Duration,
    /// Time spent in the upstream's queue; zero (not written) when it did not wait.
    pub queued: Duration,
    /// Backends tried: 0 for a reply made without one, 1 and more with retries.
    pub attempts: u8,
    /// The cache's result, on a cached route.
    pub cache: Option<&'a str>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `22/Nov/2026:04:24:23 +0000`, in UTC.
fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_in_common_log_format() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_321_463); // 2026-11-22T04:24:23Z
        assert_eq!(clf_time(t), "22/Nov/2026:04:24:23 +0000");
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn a_json_line_is_valid_whatever_the_request_held() {
        let req = http::Request::get("/a\\b{c}|^?q=%00%22'`")
            .header(
                "user-agent",
                http::HeaderValue::from_bytes(b"t\tx\"y\\\xff").unwrap(),
            )
            .body(())
            .unwrap();
        let mut line = RequestLine::capture(&req, "10.0.0.1".parse().unwrap());
        line.time = UNIX_EPOCH + Duration::from_millis(1_795_321_463_250);
        let s = line.json(&Outcome {
            status: 200,
            bytes: 12,
            upstream: "app",
            backend: "127.0.0.1:9001",
            took: Duration::from_millis(3),
            attempts: 2,
            cache: Some("miss"),
            ..Outcome::default()
        });
        assert!(s.ends_with('\n') && s.matches('\n').count() == 1, "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["time"], "2026-11-22T04:24:23.250Z");
        assert_eq!(v["client"], "10.0.0.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["uri"], "/a\\b{c}|^?q=%00%22'`");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 12);
        assert_eq!(v["duration"], 0.003);
        assert_eq!(
            (v["upstream"].as_str(), v["backend"].as_str()),
            (Some("app"), Some("127.0.0.1:9001"))
        );
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["cache"], "miss");
        assert_eq!(v["user_agent"], "t\tx\"y\\\u{fffd}");
        assert_eq!(v["referer"], serde_json::Value::Null);
        // A request never read, and a reply made without a backend.
        let s = RequestLine::unread("::1".parse().unwrap()).json(&Outcome {
            status: 400,
            upstream: crate::metrics::NONE,
            backend: crate::metrics::NONE,
            ..Outcome::default()
        });
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            (&v["method"], &v["uri"], &v["upstream"], &v["backend"]),
            (
                &serde_json::Value::Null,
                &serde_json::Value::Null,
                &serde_json::Value::Null,
                &serde_json::Value::Null
            )
        );
        assert_eq!(
            (&v["client"], &v["status"], &v["attempts"]),
            (&json!("::1"), &json!(400), &json!(0))
        );
    }

    #[test]
    fn line_quotes_and_escapes() {
        let req = http::Request::get("/a?b=1")
            .header("user-agent", "curl \"x\"")
            .body(())
            .unwrap();
        let mut line = RequestLine::capture(&req, "10.0.0.1".parse().unwrap());
        line.time = UNIX_EPOCH;
        let s = line.format(&Outcome {
            status: 200,
            bytes: 12,
            upstream: "app",
            backend: "127.0.0.1:9001",
            took: Duration::from_millis(3),
            ..Outcome::default()
        });
        assert_eq!(
            s,
            "10.0.0.1 - - [01/Jan/1970:00:00:00 +0000] \"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \"curl \\\"x\\\"\" upstream=app backend=127.0.0.1:9001 duration=0.003000\n"
        );
        // On a cached route, how the cache served it.
        let s = line.format(&Outcome {
            status: 200,
            bytes: 12,
            upstream: "app",
            backend: "none",
            took: Duration::from_millis(3),
            cache: Some("hit_memory"),
            ..Outcome::default()
        });
        assert!(s.ends_with(" duration=0.003000 cache=hit_memory\n"), "{s}");
        // A request that waited for a backend says how long.
        let s = line.format(&Outcome {
            status: 200,
            upstream: "app",
            took: Duration::from_millis(300),
            queued: Duration::from_millis(250),
            ..Outcome::default()
        });
        assert!(s.ends_with(" duration=0.300000 queued=0.250000\n"), "{s}");
    }
}
