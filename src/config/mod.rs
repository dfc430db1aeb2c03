//! The configuration: typed, validated, and read from one YAML file.
//!
//! Three steps: `raw` reads the file into serde types that keep every value's
//! position (serde-saphyr), `shape` holds its keys against the schema (every
//! unknown or repeated key), and `validate` turns it into the types below or
//! into a list of every problem found, each with `FILE:LINE:COLUMN` and the
//! field's path. Nothing here binds a socket or opens a connection, so
//! `bascule check` and a reload can run it off the request path.

pub mod raw;
mod shape;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;
use serde_saphyr::{DuplicateKeyPolicy, Options};

/// Where a value starts in the file: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// `parent.key`, or `key` at the top.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Decodes `text`; relative file paths in it are taken from `base`. Every
/// problem is reported, in the order of the file, except that a value of
/// the wrong shape (a list where a map belongs) ends the reading there.
pub fn decode(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    // Read as a plain tree first: a syntax error is reported alone, without a path.
    let tree: raw::At<shape::Tree> =
        read(text, DuplicateKeyPolicy::PassThrough).map_err(|p| vec![syntax(text, p)])?;
    if matches!(tree.value, shape::Tree::Null) {
        return Err(vec![Problem {
            pos: Some(Pos { line: 1, column: 1 }),
            path: String::new(),
            message: "the file is empty".into(),
        }]);
    }
    let schema = serde_json::to_value(raw::schema()).expect("a schema is JSON");
    let mut problems = shape::problems(&tree, &schema);
    let config = match read::<raw::File>(text, DuplicateKeyPolicy::LastWins) {
        Ok(file) => validate::config(file, base, &mut problems),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    match config {
        Some(c) if problems.is_empty() => Ok(c),
        _ => {
            problems.sort_by_key(|p| p.pos.map(|p| (p.line, p.column)));
            Err(problems)
        }
    }
}

/// A problem of the plain reading, which only syntax can fail.
fn syntax(text: &str, p: Problem) -> Problem {
    let message = p.message.trim_start_matches("YAML syntax: ");
    // A `[` or `{` left open shows up where the parser gives up, often lines
    // later and as some other complaint: point at the bracket instead.
    if let Some((open, bracket)) = p.pos.and_then(|at| unclosed(text, at)) {
        let close = if bracket == '[' { ']' } else { '}' };
        let at = p.pos.map(|at| at.to_string()).unwrap_or_default();
        return Problem {
            pos: Some(open),
            path: String::new(),
            message: format!(
                "YAML syntax: this `{bracket}` is never closed with `{close}` (the parser stopped at {at}: {message})"
            ),
        };
    }
    Problem {
        pos: p.pos,
        path: String::new(),
        message: format!("YAML syntax: {message}"),
    }
}

/// The innermost `[` or `{` still open where the parser stopped at `at`,
/// if it was opened on an earlier line (quoted text and comments skipped).
fn unclosed(text: &str, at: Pos) -> Option<(Pos, char)> {
    let mut open: Vec<(Pos, char)> = Vec::new();
    for (i, line) in text.lines().enumerate().take(at.line) {
        let mut quote = None;
        let mut escaped = false;
        let mut previous = ' ';
        for (j, c) in line.chars().enumerate() {
            if i + 1 == at.line && j + 1 >= at.column {
                break;
            }
            match (quote, c) {
                (Some('"'), '\\') => escaped = !escaped,
                (Some(q), c) if c == q && !escaped => quote = None,
                (Some(_), _) => escaped = false,
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if previous.is_whitespace() => break,
                (None, '[' | '{') => open.push((
                    Pos {
                        line: i + 1,
                        column: j + 1,
                    },
                    c,
                )),
                (None, ']' | '}') => {
                    open.pop();
                }
                _ => {}
            }
            previous = c;
        }
    }
    open.pop().filter(|(pos, _)| pos.line < at.line)
}

/// Aliases may repeat at most this many YAML events (values, starts and ends
/// of lists and maps) in a file, far more than a config needs: a "billion
/// laughs" (aliases of lists of aliases) is refused at once, not expanded.
pub const MAX_ALIAS_VALUES: usize = 10_000;

/// `text` read as `T`, or the one problem that stopped the reading.
fn read<T: DeserializeOwned>(text: &str, duplicates: DuplicateKeyPolicy) -> Result<T, Problem> {
    let mut options = Options::default();
    options.duplicate_keys = duplicates;
    options.with_snippet = false;
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_VALUES;
    // The error of the value that failed, with its path; the reader's own
    // error after it only says that the document was left unread.
    let mut failed = None;
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options, |d| {
        match serde_path_to_error::deserialize::<_, T>(d) {
            Ok(value) => Ok(Some(value)),
            Err(e) => {
                let path = e.path().to_string();
                failed = Some((path, e.into_inner()));
                Ok(None)
            }
        }
    });
    let (path, error) = match (failed, outcome) {
        (None, Ok(Some(value))) => return Ok(value),
        (Some((path, error)), _) => (path, error),
        (None, Err(error)) => (String::new(), error),
        (None, Ok(None)) => unreachable!("no value comes only with an error"),
    };
    let pos = error.location().filter(|l| l.line() > 0).map(|l| Pos {
        line: l.line() as usize,
        column: l.column() as usize,
    });
    let path = field_path(&path);
    let message = error.without_snippet().to_string();
    let message = if message.contains("alias replay limit exceeded") {
        format!(
            "YAML syntax: aliases repeat more than {MAX_ALIAS_VALUES} values (a \"billion laughs\"?)"
        )
    } else {
        reader_message(&message, path.is_empty())
    };
    Err(Problem { pos, message, path })
}

/// A serde path (`listeners.value[0].value.bind.value`) as this module
/// writes paths (`listeners[0].bind`): the position wrappers' own fields
/// (`value`) and the document's (`?`) left out.
fn field_path(serde_path: &str) -> String {
    let mut out = String::new();
    for segment in serde_path.split('.') {
        let segment = segment.strip_prefix("value").unwrap_or(segment);
        if segment.is_empty() || segment == "?" {
            continue;
        }
        if !out.is_empty() && !segment.starts_with('[') {
            out.push('.');
        }
        out.push_str(segment);
    }
    out
}

/// The reader's message without its position (given apart) and in this
/// module's words for the usual cases.
fn reader_message(message: &str, syntax: bool) -> String {
    let mut message = message.trim();
    if let Some(i) = message.rfind(" at line ") {
        message = &message[..i];
    }
    if let Some(rest) = message.strip_prefix("error: ") {
        message = rest;
    }
    if let Some((head, rest)) = message.split_once(": ") {
        if head.starts_with("line ") && head.contains(" column ") {
            message = rest;
        }
    }
    for (theirs, ours) in [
        ("expected mapping start", "expected a map"),
        ("expected sequence start", "expected a list"),
        (
            "expected string scalar",
            "expected a single value, not a list or map",
        ),
    ] {
        if message == theirs {
            return ours.to_string();
        }
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {expected}, found {found}");
        }
    }
    if syntax {
        format!("YAML syntax: {message}")
    } else {
        message.to_string()
    }
}

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    /// In file order; names are unique.
    /// Shared with the runtime upstreams built from them, which read their settings here.
    pub upstreams: Vec<Arc<UpstreamConfig>>,
    pub admin: Option<AdminConfig>,
    /// How long SIGTERM waits for requests and tunnels in flight. Default 30s.
    pub shutdown_timeout: Duration,
    pub access_log: AccessLog,
    /// `combined` (default) or `json`.
    pub access_log_format: AccessLogFormat,
    /// Worker threads, each with its own event loop and listening sockets.
    /// Default: one per CPU the process may run on.
    pub workers: Option<usize>,
    /// In file order; names are unique.
    pub caches: Vec<Arc<CacheConfig>>,
    /// Where backend names are looked up. Default: `/etc/resolv.conf` and `/etc/hosts`.
    pub resolver: ResolverConfig,
}

/// `resolver`: the DNS servers asked for backend names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Asked instead of the system's (then `/etc/hosts` is not read). Empty: the system's.
    pub nameservers: Vec<SocketAddr>,
    /// One lookup's limit. Default 2s.
    pub timeout: Option<Duration>,
}

impl ResolverConfig {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(2))
    }
}

impl Config {
    /// The number of worker threads to run.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name).map(|u| &**u)
    }

    pub fn cache(&self, name: &str) -> Option<&Arc<CacheConfig>> {
        self.caches.iter().find(|c| c.name == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Defaults to the bind address.
    pub name: String,
    pub bind: SocketAddr,
    pub routes: Vec<RouteConfig>,
    /// A client must send a whole request head within this. Default 10s.
    pub header_read_timeout: Duration,
    /// An idle client connection is closed after this. Default 60s.
    pub keepalive_timeout: Duration,
    /// The longest wait for the next bytes of a request body. Default 60s.
    pub body_timeout: Duration,
    /// The longest a reply may wait on a client that does not read it. Default 60s.
    pub send_timeout: Duration,
    /// A larger request head gets 431. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Terminate TLS here: the certificates, the first the default.
    pub tls: Option<TlsConfig>,
    /// Answer every request with a 301 to the same URL over https (port 443). Default false.
    pub redirect_https: bool,
    /// Every connection starts with a PROXY protocol header (v1 or v2) whose
    /// client address stands for the peer's. Default false.
    pub proxy_protocol: bool,
    /// Peers whose X-Forwarded-For names the client: the rightmost address in
    /// it not among them (NGINX's `set_real_ip_from` with `real_ip_recursive`).
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Client connections open at once, shared by the workers; past it, new
    /// connections wait in the kernel's backlog. Default none.
    pub max_connections: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    pub certificates: Vec<crate::tls::Certificate>,
    /// A client must finish its handshake within this. Default 10s.
    pub handshake_timeout: Duration,
    /// The TLS versions offered, in NGINX's spelling (`ssl_protocols`). Default both.
    pub protocols: Vec<crate::tls::Protocol>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub upstream: String,
    /// The name of the cache its GET and HEAD requests are served from.
    pub cache: Option<String>,
}

/// An edge cache (`caches.NAME`): a memory tier in the process, and a Redis
/// tier shared by every instance when `redis` is given.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub name: String,
    /// The memory tier's bound, in bytes: bodies, heads and keys counted.
    pub memory: u64,
    /// A larger response streams through, not stored. Default 8 MiB.
    pub max_object: u64,
    /// Freshness for a storable response that states none. Default 0 (not stored).
    pub default_ttl: Duration,
    /// For responses without their own `stale-while-revalidate`. Default 0.
    pub stale_while_revalidate: Duration,
    /// For responses without their own `stale-if-error`. Default 0.
    pub stale_if_error: Duration,
    pub redis: Option<CacheRedisConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CacheRedisConfig {
    pub url: String,
    /// A Redis call that takes longer counts as a miss. Default 50ms.
    pub timeout: Duration,
}

/// A `host` condition, already lower-cased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: the name must end with it.
    Suffix(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    ConsistentHash,
}

impl Balance {
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::ConsistentHash => "consistent_hash",
        }
    }
}

/// What a consistent-hash upstream hashes. A request without it is balanced round robin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// The TCP peer's address.
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
    /// The path, without the query string.
    Path,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    /// Consistent hashing only. Default `client_ip`.
    pub hash_key: HashKey,
    /// Consistent hashing only: no backend takes more than this times its share
    /// of the requests in flight (bounded loads). Off by default.
    pub hash_balance_factor: Option<f64>,
    /// The backends: those written as addresses, then what the names resolved
    /// to and what the admin API changed (see `membership`).
    pub backends: Vec<BackendConfig>,
    /// Backends given by name, in file order: re-resolved at run time.
    pub names: Vec<NamedBackend>,
    pub discovery: DiscoveryConfig,
    /// TCP connect to a backend. Default 5s.
    pub connect_timeout: Duration,
    /// From request sent to response headers; past it the client gets 504. Default 60s.
    pub response_timeout: Duration,
    /// An unused pooled backend connection is closed after this. Default 90s.
    pub idle_timeout: Duration,
    /// Idle keep-alive connections kept open to each backend; more are closed
    /// once unused for a second. Default 64.
    pub max_idle_connections: usize,
    /// Active probes; without them every backend counts as healthy.
    pub health_check: Option<HealthCheckConfig>,
    /// Ejection of backends that fail live requests.
    pub passive: Option<PassiveConfig>,
    /// Extra attempts on other backends when a request can safely be sent again. Default 2.
    pub retries: u32,
    pub retry_budget: RetryBudgetConfig,
    /// When no backend is usable, try them anyway instead of answering 503. Default false.
    pub fail_open: bool,
    /// Cookie affinity, on top of any balance.
    pub sticky: Option<StickyConfig>,
    /// A backend that comes back or is added ramps its share of traffic up
    /// linearly over this window (round robin and least connections). Off by default.
    pub slow_start: Option<Duration>,
    /// TLS to the backends.
    pub tls: Option<crate::backend_tls::BackendTls>,
    /// Requests in flight at once to each backend (a backend's own setting
    /// overrides it). Default none.
    pub max_connections: Option<usize>,
    /// Where requests wait when every backend they may use is at its limit.
    pub queue: QueueConfig,
}

/// An upstream's queue, used only when its backends have `max_connections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Requests waiting at once; one more gets 503 at once. Default 1000.
    pub size: usize,
    /// A request waiting longer gets 503. Default 5s.
    pub timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            size: 1000,
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyConfig {
    /// Default `bascule_affinity`.
    pub cookie: String,
    /// The cookie's Max-Age, and how long a cookie is honoured. Default 1h.
    pub ttl: std::time::Duration,
    /// From `secret` or `secret_file` (one per line): the first signs, all verify.
    /// Empty when neither is given: a random per-process secret is used (and
    /// instances no longer honour each other's cookies).
    pub secrets: Vec<Vec<u8>>,
    /// Default `/`.
    pub path: String,
    /// Default true.
    pub http_only: bool,
    /// Default lax.
    pub same_site: SameSite,
    /// `None` (default): Secure on TLS listeners only; `Some(b)`: always or never.
    pub secure: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Default `/`.
    pub path: String,
    /// Default 2s; each backend's probes are spread by a fixed per-backend offset.
    pub interval: Duration,
    /// Default 1s: a probe without a status line by then has failed.
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend up. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failures that take an up backend down. Default 3.
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges that pass. Default 200-399.
    pub expected_status: Vec<(u16, u16)>,
    /// The probe's Host header. Default: the backend's address.
    pub host: Option<String>,
    /// Whether a backend starts healthy (before any probe). Default true.
    pub initial_healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive failed exchanges (connect failure, broken exchange, timeout, 5xx) that eject. Default 5.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection doubles it. Default 30s.
    pub ejection: Duration,
    /// The longest ejection. Default 5m.
    pub max_ejection: Duration,
    /// At most this share of an upstream's backends is ejected at once, and never
    /// the last one. Default 50.
    pub max_ejected_percent: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries may add this share of the requests. Default 0.2.
    pub ratio: f64,
    /// And at least this many retries a second, for quiet upstreams. Default 10.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// `discovery`: how often an upstream's names are looked up again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Default 5s; sooner when an answer's TTL is shorter.
    pub interval: Duration,
    /// A name answering NXDOMAIN or no address keeps its last set this long. Default 30s.
    pub hold: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            interval: Duration::from_secs(5),
            hold: Duration::from_secs(30),
        }
    }
}

/// A backend given by name: every address the name resolves to is a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedBackend {
    /// As written (`app.internal:9000`, or the SRV name): where its backends came from.
    pub source: String,
    pub lookup: Lookup,
    /// Each address's weight (SRV records bring their own). Default 1.
    pub weight: u32,
    pub max_connections: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A and AAAA records, every address with this port.
    Host { host: String, port: u16 },
    /// SRV records: targets, ports and weights.
    Srv(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// As written in the file: the backend's identity in metrics, status and reloads.
    pub address: String,
    pub addr: SocketAddr,
    /// 1 to `MAX_WEIGHT`. Default 1.
    pub weight: u32,
    /// With upstream TLS: the name its certificate is checked against, also sent as SNI.
    pub tls_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Its own `max_connections`, over the upstream's.
    pub max_connections: Option<usize>,
    /// The name it was resolved from, or `admin` when added over the admin API;
    /// `None` when written in the file as an address.
    pub from: Option<String>,
    /// Gone from its name's answer or removed over the admin API: takes no new
    /// requests, and goes once those in flight finish.
    pub leaving: bool,
}

impl BackendConfig {
    /// A backend at `addr`, with the defaults.
    pub fn at(addr: SocketAddr) -> BackendConfig {
        BackendConfig {
            address: addr.to_string(),
            addr,
            weight: 1,
            tls_name: None,
            max_connections: None,
            from: None,
            leaving: false,
        }
    }
}

/// Weights above this are refused: round robin keeps a table as long as the sum of weights.
pub const MAX_WEIGHT: u32 = 1000;

#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// `token` or `token_file`: every admin request but `GET /metrics` must
    /// carry `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

/// The token is never printed.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// How access log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// NGINX's and Apache's combined format, with bascule's fields appended.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// Where access log lines go. Off unless configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

/// One problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pos: Option<Pos>,
    /// The field's path, such as `upstreams.app.backends[2].weight`; empty for the whole file.
    pub path: String,
    pub message: String,
}

/// Every problem found in one file, printed one per line as `FILE:LINE:COLUMN: path: message`.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(pos) = p.pos {
                write!(f, ":{pos}")?;
            }
            if p.path.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

/// Reads and validates the file at `path`. `path` is named in errors as given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![Problem {
            pos: None,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    decode(&text, base).map_err(|problems| ConfigError { file, problems })
}
