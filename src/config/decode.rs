//! Turns the positioned YAML tree into a typed `Config`, collecting every problem.
//!
//! Each reader returns `Option`: `None` means the value was wrong and a problem has
//! been recorded, so decoding goes on and the user sees every mistake in one run.
//! Unknown keys are errors: a typo must never be silently ignored.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::backend_tls::BackendTls;

use super::yaml::{self, Node, Pos, Value};
use super::*;

/// The longest duration a config may give (any timeout or interval): 100 of
/// humantime's years of 365.25 days.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Decodes `text`; relative file paths in it are taken from `base`.
pub fn decode(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let root = syntax(text).map_err(|p| vec![p])?;
    let mut d = Decoder::new(base, None);
    let config = d.config(&root);
    match config {
        Some(c) if d.problems.is_empty() => Ok(c),
        _ => {
            d.problems
                .sort_by_key(|p| p.pos.map(|p| (p.line, p.column)));
            Err(d.problems)
        }
    }
}

/// The YAML tree of `text`, or its syntax error.
fn syntax(text: &str) -> Result<Node, Problem> {
    yaml::parse(text).map_err(|e| Problem {
        pos: Some(e.pos),
        path: String::new(),
        message: format!("YAML syntax: {}", e.message),
    })
}

struct Decoder<'b> {
    problems: Vec<Problem>,
    base: &'b Path,
    /// Where `admin.bind` is (or `admin`, when it takes the default).
    admin_bind: Option<Pos>,
    /// When asked for (`keys`): every key known and given.
    keys: Option<Keys>,
    /// The names under `caches`, for the routes that name one (`None`: `caches` is not a map).
    cache_names: Option<Vec<String>>,
}

/// The keys of a config text as the decoder saw them, as dotted paths (`upstreams.app.retries`,
/// `listeners[0].bind`): those it knows in each map it visited, and those the text gives.
#[derive(Debug, Default)]
pub struct Keys {
    pub known: std::collections::BTreeSet<String>,
    pub given: std::collections::BTreeSet<String>,
}

/// The keys `text` gives and those the decoder knows in each of its maps, whatever the
/// problems: for checking that an example shows every key.
pub fn keys(text: &str, base: &Path) -> Result<Keys, Problem> {
    let root = syntax(text)?;
    let mut d = Decoder::new(base, Some(Keys::default()));
    d.config(&root);
    Ok(d.keys.unwrap_or_default())
}

/// The scalar keys of a map node (`None` if it is not a map).
fn map_keys(node: &Node) -> Option<Vec<String>> {
    match &node.value {
        Value::Map(entries) => Some(
            entries
                .iter()
                .filter_map(|(k, _)| match &k.value {
                    Value::Scalar(name) => Some(name.clone()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// One item of `backends`.
enum Entry {
    Address(BackendConfig),
    Name(NamedBackend),
}

/// A DNS name as RFC 1123 allows it (plus `_` for SRV labels), with an
/// optional trailing dot.
fn is_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The entries of one YAML map, with a record of which keys the decoder asked for.
struct Fields<'n> {
    path: String,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
    asked: Vec<&'static str>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'n> Fields<'n> {
    /// The value of `key`, if present and not null.
    fn get(&mut self, key: &'static str) -> Option<(&'n Node, String)> {
        self.asked.push(key);
        let path = join(&self.path, key);
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .filter(|(_, _, v)| !matches!(v.value, Value::Null))
            .map(|(_, _, v)| (*v, path))
    }
}

impl<'b> Decoder<'b> {
    fn new(base: &'b Path, keys: Option<Keys>) -> Self {
        Decoder {
            problems: Vec::new(),
            base,
            admin_bind: None,
            keys,
            cache_names: Some(Vec::new()),
        }
    }

    fn problem(&mut self, pos: Option<Pos>, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn fields<'n>(&mut self, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.problem(
                Some(node.pos),
                path,
                format!("expected a map, found {}", node.kind()),
            );
            return None;
        };
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Scalar(key) = &k.value else {
                self.problem(Some(k.pos), path, "keys must be plain names");
                continue;
            };
            if !seen.insert(key.as_str()) {
                self.problem(
                    Some(k.pos),
                    &join(path, key),
                    "duplicate key (each key may appear once)",
                );
                continue;
            }
            out.push((key.as_str(), k, v));
        }
        Some(Fields {
            path: path.to_string(),
            entries: out,
            asked: Vec::new(),
        })
    }

    /// Reports every key of `f` the decoder never asked for.
    fn finish(&mut self, f: Fields<'_>) {
        if let Some(keys) = &mut self.keys {
            keys.known.extend(f.asked.iter().map(|k| join(&f.path, k)));
            keys.given
                .extend(f.entries.iter().map(|(k, _, _)| join(&f.path, k)));
        }
        for (key, k, _) in &f.entries {
            if !f.asked.contains(key) {
                let mut known = f.asked.clone();
                known.sort_unstable();
                known.dedup();
                self.problem(
                    Some(k.pos),
                    &join(&f.path, key),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
    }

    fn required<'n>(
        &mut self,
        f: &mut Fields<'n>,
        key: &'static str,
        pos: Pos,
    ) -> Option<(&'n Node, String)> {
        let found = f.get(key);
        if found.is_none() {
            self.problem(Some(pos), &join(&f.path, key), "missing (required)");
        }
        found
    }

    fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.problem(
                    Some(node.pos),
                    path,
                    format!("expected a list, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// Each item of a list, decoded by `one` at its own path (`path[i]`): every
    /// item's problems are reported, and the list is `None` if any had one.
    fn each<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut one: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.seq(node, path)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(one(self, item, &format!("{path}[{i}]")));
        }
        out.into_iter().collect()
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(s) => Some(s.clone()),
            _ => {
                self.problem(
                    Some(node.pos),
                    path,
                    format!("expected a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        node: &Node,
        path: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(node, path)?;
        match parse(text.trim()) {
            Ok(v) => Some(v),
            Err(why) => {
                self.problem(Some(node.pos), path, format!("`{text}` is not {what}{why}"));
                None
            }
        }
    }

    /// Durations are bounded so that a deadline made from one (now + timeout)
    /// can always be represented; humantime accepts far larger.
    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        self.parsed(node, path, "a duration", |s| {
            if s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(" (give a unit: 250ms, 2s, 5m, 1h)".into());
            }
            let d = humantime::parse_duration(s).map_err(|e| format!(" ({e})"))?;
            if d > MAX_DURATION {
                return Err(" of at most 100 years".into());
            }
            Ok(d)
        })
    }

    fn duration_at_least(&mut self, node: &Node, path: &str, min: Duration) -> Option<Duration> {
        let d = self.duration(node, path)?;
        if d < min {
            let min = humantime::format_duration(min);
            self.problem(Some(node.pos), path, format!("must be at least {min}"));
            return None;
        }
        Some(d)
    }

    fn socket_addr(&mut self, node: &Node, path: &str) -> Option<SocketAddr> {
        self.parsed(node, path, "an address", |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| " (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)".into())
        })
    }

    fn integer(&mut self, node: &Node, path: &str, min: u64, max: u64) -> Option<u64> {
        self.parsed(node, path, "a whole number", |s| {
            let n: u64 = s.parse().map_err(|_| String::new())?;
            if n < min || n > max {
                return Err(format!(" in the range {min} to {max}"));
            }
            Ok(n)
        })
    }

    fn optional<T>(
        &mut self,
        f: &mut Fields<'_>,
        key: &'static str,
        default: T,
        read: impl FnOnce(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<T> {
        match f.get(key) {
            Some((node, path)) => read(self, node, &path),
            None => Some(default),
        }
    }

    // ---- the sections ----------------------------------------------------------------

    fn config(&mut self, root: &Node) -> Option<Config> {
        if matches!(root.value, Value::Null) {
            self.problem(Some(root.pos), "", "the file is empty");
            return None;
        }
        let mut f = self.fields(root, "")?;
        let upstreams_node = self.required(&mut f, "upstreams", root.pos);
        // Routes are checked against the names even when an upstream has other problems.
        let names = upstreams_node.as_ref().and_then(|(node, _)| map_keys(node));
        let upstreams = upstreams_node.and_then(|(node, path)| self.upstreams(node, &path));
        let caches = match f.get("caches") {
            Some((node, path)) => {
                self.cache_names = map_keys(node);
                self.caches(node, &path)
            }
            None => Some(Vec::new()),
        };
        let listeners = match self.required(&mut f, "listeners", root.pos) {
            Some((node, path)) => self.listeners(node, &path, names.as_ref()),
            None => None,
        };
        // `admin:` with nothing under it asks for the defaults.
        let admin_given = f.entries.iter().any(|(k, _, _)| *k == "admin");
        let admin = match f.get("admin") {
            Some((node, path)) => self.admin(node, &path).map(Some),
            None if admin_given => Some(Some(AdminConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 9901)),
                token: None,
            })),
            None => Some(None),
        };
        let shutdown_timeout = self.optional(
            &mut f,
            "shutdown_timeout",
            Duration::from_secs(30),
            Self::duration,
        );
        let access_log = self.optional(&mut f, "access_log", AccessLog::Off, Self::access_log);
        let access_log_format = self.optional(
            &mut f,
            "access_log_format",
            AccessLogFormat::Combined,
            |d, n, p| {
                d.parsed(n, p, "an access log format", |s| match s {
                    "combined" => Ok(AccessLogFormat::Combined),
                    "json" => Ok(AccessLogFormat::Json),
                    _ => Err(" (expected combined or json)".into()),
                })
            },
        );
        let workers = self.optional(&mut f, "workers", None, |d, n, p| {
            d.integer(n, p, 1, 1024).map(|n| Some(n as usize))
        });
        let resolver = self.optional(
            &mut f,
            "resolver",
            ResolverConfig::default(),
            Self::resolver,
        );
        self.finish(f);
        // Checked whatever else failed, so that one run reports every problem.
        if let (Some(Some(admin)), Some(listeners)) = (&admin, &listeners) {
            if admin.bind.port() != 0 && listeners.iter().any(|l| l.bind == admin.bind) {
                let pos = self.admin_bind;
                self.problem(pos, "admin.bind", "the same address as a listener");
            }
        }
        let config = Config {
            listeners: listeners?,
            upstreams: upstreams?,
            admin: admin?,
            shutdown_timeout: shutdown_timeout?,
            access_log: access_log?,
            access_log_format: access_log_format?,
            workers: workers?,
            caches: caches?,
            resolver: resolver?,
        };
        Some(config)
    }

    fn caches(&mut self, node: &Node, path: &str) -> Option<Vec<Arc<CacheConfig>>> {
        let mut f = self.fields(node, path)?;
        let mut out = Vec::new();
        let mut ok = true;
        for (name, _, value) in std::mem::take(&mut f.entries) {
            match self.cache(name, value, &join(path, name)) {
                Some(c) => out.push(Arc::new(c)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn cache(&mut self, name: &str, node: &Node, path: &str) -> Option<CacheConfig> {
        let mut f = self.fields(node, path)?;
        let memory = self
            .required(&mut f, "memory", node.pos)
            .and_then(|(n, p)| self.size(n, &p, 1 << 20));
        let mut max_object_pos = node.pos;
        let max_object = self.optional(&mut f, "max_object", 8 << 20, |d, n, p| {
            max_object_pos = n.pos;
            d.size(n, p, 1)
        });
        let default_ttl = self.optional(&mut f, "default_ttl", Duration::ZERO, Self::duration);
        let swr = self.optional(
            &mut f,
            "stale_while_revalidate",
            Duration::ZERO,
            Self::duration,
        );
        let sie = self.optional(&mut f, "stale_if_error", Duration::ZERO, Self::duration);
        let redis = self.optional(&mut f, "redis", None, |d, n, p| {
            d.cache_redis(n, p).map(Some)
        });
        self.finish(f);
        let (memory, max_object) = (memory?, max_object?);
        if max_object > memory {
            let pos = Some(max_object_pos);
            self.problem(pos, &join(path, "max_object"), "larger than `memory`");
            return None;
        }
        Some(CacheConfig {
            name: name.to_string(),
            memory,
            max_object,
            default_ttl: default_ttl?,
            stale_while_revalidate: swr?,
            stale_if_error: sie?,
            redis: redis?,
        })
    }

    fn cache_redis(&mut self, node: &Node, path: &str) -> Option<CacheRedisConfig> {
        let mut f = self.fields(node, path)?;
        let url = self.required(&mut f, "url", node.pos).and_then(|(n, p)| {
            self.parsed(n, &p, "a Redis URL", |s| {
                if s.starts_with("redis://") || s.starts_with("unix://") {
                    Ok(s.to_string())
                } else {
                    Err(" (expected redis://HOST:PORT/DB or unix:///PATH)".into())
                }
            })
        });
        let timeout = self.optional(&mut f, "timeout", Duration::from_millis(50), Self::positive);
        self.finish(f);
        Some(CacheRedisConfig {
            url: url?,
            timeout: timeout?,
        })
    }

    /// A size in bytes: a whole number with `KiB`, `MiB` or `GiB`, or plain bytes; at least `min`.
    fn size(&mut self, node: &Node, path: &str, min: u64) -> Option<u64> {
        self.parsed(node, path, "a size", |s| {
            let (digits, unit) =
                s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let scale: u64 = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => return Err(" (a whole number with KiB, MiB or GiB: 256MiB)".into()),
            };
            let n = digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .filter(|n| *n < 1 << 50)
                .ok_or_else(|| " (a whole number with KiB, MiB or GiB: 256MiB)".to_string())?;
            if n < min {
                return Err(format!(" of at least {min} bytes"));
            }
            Ok(n)
        })
    }

    /// A file is opened for appending here, as `nginx -t` opens its logs: a
    /// path that cannot be written is this file's problem, not a failed start.
    fn access_log(&mut self, node: &Node, path: &str) -> Option<AccessLog> {
        let text = self.string(node, path)?;
        Some(match text.as_str() {
            "off" | "false" => AccessLog::Off,
            "stderr" => AccessLog::Stderr,
            file => {
                let file = self.base.join(file);
                let opened = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file);
                if let Err(e) = opened {
                    let message = format!("cannot open {} for appending: {e}", file.display());
                    self.problem(Some(node.pos), path, message);
                    return None;
                }
                AccessLog::File(file)
            }
        })
    }

    /// `admin: {}` (or `admin:` alone) listens on loopback, 127.0.0.1:9901.
    fn admin(&mut self, node: &Node, path: &str) -> Option<AdminConfig> {
        let default = SocketAddr::from(([127, 0, 0, 1], 9901));
        let mut f = self.fields(node, path)?;
        let bind = self.optional(&mut f, "bind", default, |d, n, p| {
            // Kept for the check against the listeners, made once they are known.
            d.admin_bind = Some(n.pos);
            d.socket_addr(n, p)
        });
        let token = match (f.get("token"), f.get("token_file")) {
            (None, None) => Some(None),
            (Some((n, p)), None) => self.token(n, &p, |_, text| Ok(text)).map(Some),
            (None, Some((n, p))) => self
                .token(n, &p, |d, name| {
                    let file = d.base.join(name);
                    std::fs::read_to_string(&file)
                        .map(|text| text.trim().to_string())
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))
                })
                .map(Some),
            (Some(_), Some((n, p))) => {
                self.problem(Some(n.pos), &p, "give token or token_file, not both");
                None
            }
        };
        self.finish(f);
        if bind.is_some() && self.admin_bind.is_none() {
            self.admin_bind = Some(node.pos);
        }
        Some(AdminConfig {
            bind: bind?,
            token: token?,
        })
    }

    /// The admin token: `read` turns the key's text into the token (the
    /// file's content, for `token_file`). Refused when empty or not sendable
    /// in an HTTP field.
    fn token(
        &mut self,
        node: &Node,
        path: &str,
        read: impl FnOnce(&Self, String) -> Result<String, String>,
    ) -> Option<String> {
        let text = self.string(node, path)?;
        match read(self, text) {
            Ok(token) if token.is_empty() => {
                self.problem(Some(node.pos), path, "the token is empty");
                None
            }
            Ok(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => {
                let why = "the token must be printable ASCII without spaces";
                self.problem(Some(node.pos), path, why);
                None
            }
            Ok(token) => Some(token),
            Err(why) => {
                self.problem(Some(node.pos), path, why);
                None
            }
        }
    }

    fn upstreams(&mut self, node: &Node, path: &str) -> Option<Vec<Arc<UpstreamConfig>>> {
        let mut f = self.fields(node, path)?;
        if f.entries.is_empty() {
            self.problem(Some(node.pos), path, "at least one upstream is needed");
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (name, _, value) in std::mem::take(&mut f.entries) {
            match self.upstream(name, value, &join(path, name)) {
                Some(u) => out.push(Arc::new(u)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn upstream(&mut self, name: &str, node: &Node, path: &str) -> Option<UpstreamConfig> {
        let mut f = self.fields(node, path)?;
        let balance = self.optional(&mut f, "balance", Balance::RoundRobin, |d, n, p| {
            d.parsed(n, p, "a balance", |s| match s {
                "round_robin" => Ok(Balance::RoundRobin),
                "least_connections" => Ok(Balance::LeastConnections),
                "consistent_hash" => Ok(Balance::ConsistentHash),
                _ => Err(" (expected round_robin, least_connections or consistent_hash)".into()),
            })
        });
        let hash_key = match f.get("hash_key") {
            Some((n, p)) => {
                if balance != Some(Balance::ConsistentHash) {
                    self.problem(Some(n.pos), &p, "applies only to balance: consistent_hash");
                }
                self.hash_key(n, &p)
            }
            None => Some(HashKey::ClientIp),
        };
        let hash_balance_factor = match f.get("hash_balance_factor") {
            Some((n, p)) => {
                if balance != Some(Balance::ConsistentHash) {
                    self.problem(Some(n.pos), &p, "applies only to balance: consistent_hash");
                }
                self.parsed(n, &p, "a balance factor", |s| match s.parse::<f64>() {
                    Ok(f) if f > 1.0 && f.is_finite() => Ok(Some(f)),
                    _ => Err(" above 1, such as 1.25".into()),
                })
            }
            None => Some(None),
        };
        let backends = match self.required(&mut f, "backends", node.pos) {
            Some((n, p)) => self.backends(n, &p),
            None => None,
        };
        let discovery = self.optional(
            &mut f,
            "discovery",
            DiscoveryConfig::default(),
            Self::discovery,
        );
        let (mut connect, mut response, mut idle) = (
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(90)),
        );
        if let Some((n, p)) = f.get("timeouts") {
            if let Some(mut t) = self.fields(n, &p) {
                connect = self.optional(
                    &mut t,
                    "connect",
                    connect.unwrap_or_default(),
                    Self::duration,
                );
                response = self.optional(
                    &mut t,
                    "response",
                    response.unwrap_or_default(),
                    Self::duration,
                );
                idle = self.optional(&mut t, "idle", idle.unwrap_or_default(), Self::duration);
                self.finish(t);
            }
        }
        let health_check = self.optional(&mut f, "health_check", None, |d, n, p| {
            d.health_check(n, p).map(Some)
        });
        let passive = self.optional(&mut f, "passive", None, |d, n, p| d.passive(n, p).map(Some));
        let retries = self.optional(&mut f, "retries", 2, |d, n, p| {
            d.integer(n, p, 0, 10).map(|v| v as u32)
        });
        let retry_budget = self.optional(
            &mut f,
            "retry_budget",
            RetryBudgetConfig::default(),
            Self::retry_budget,
        );
        let fail_open = self.optional(&mut f, "fail_open", false, Self::boolean);
        let max_idle = self.optional(&mut f, "max_idle_connections", 64, |d, n, p| {
            d.integer(n, p, 0, 100_000).map(|v| v as usize)
        });
        let slow_start = self.optional(&mut f, "slow_start", None, |d, n, p| {
            d.duration(n, p).map(Some)
        });
        let sticky = self.optional(&mut f, "sticky", None, |d, n, p| d.sticky(n, p).map(Some));
        let max_connections = self.optional(&mut f, "max_connections", None, Self::max_connections);
        let queue = self.optional(&mut f, "queue", QueueConfig::default(), Self::queue);
        let tls_field = f.get("tls");
        let tls = match &tls_field {
            Some((n, p)) => self.backend_tls(n, p).map(Some),
            None => Some(None),
        };
        self.finish(f);
        let mut backends = backends;
        // Each backend's name for certificate checks and SNI, settled now so that
        // a name that cannot be checked is a config error. (An SRV record's
        // targets are checked as they come.)
        if let (Some(Some(tls)), Some((backends, names)), Some((n, p))) =
            (&tls, backends.as_mut(), &tls_field)
        {
            for b in backends.iter_mut() {
                match tls.name_for(&b.address) {
                    Ok(name) => b.tls_name = Some(name),
                    Err(why) => self.problem(Some(n.pos), p, why),
                }
            }
            for name in names
                .iter()
                .filter(|n| matches!(n.lookup, Lookup::Host { .. }))
            {
                if let Err(why) = tls.name_for(&name.source) {
                    self.problem(Some(n.pos), p, why);
                }
            }
        }
        let (backends, names) = backends?;
        Some(UpstreamConfig {
            name: name.to_string(),
            balance: balance?,
            hash_key: hash_key?,
            hash_balance_factor: hash_balance_factor?,
            backends,
            names,
            discovery: discovery?,
            connect_timeout: connect?,
            response_timeout: response?,
            idle_timeout: idle?,
            max_idle_connections: max_idle?,
            health_check: health_check?,
            passive: passive?,
            retries: retries?,
            retry_budget: retry_budget?,
            fail_open: fail_open?,
            tls: tls?,
            slow_start: slow_start?,
            sticky: sticky?,
            max_connections: max_connections?,
            queue: queue?,
        })
    }

    fn discovery(&mut self, node: &Node, path: &str) -> Option<DiscoveryConfig> {
        let mut f = self.fields(node, path)?;
        let default = DiscoveryConfig::default();
        let interval = self.optional(&mut f, "interval", default.interval, |d, n, p| {
            d.duration_at_least(n, p, Duration::from_millis(100))
        });
        let hold = self.optional(&mut f, "hold", default.hold, Self::duration);
        self.finish(f);
        Some(DiscoveryConfig {
            interval: interval?,
            hold: hold?,
        })
    }

    fn resolver(&mut self, node: &Node, path: &str) -> Option<ResolverConfig> {
        let mut f = self.fields(node, path)?;
        let nameservers = self.optional(&mut f, "nameservers", Vec::new(), |d, n, p| {
            let items = d.seq(n, p)?;
            let mut out = Vec::new();
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match d.socket_addr(item, &format!("{p}[{i}]")) {
                    Some(a) => out.push(a),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        });
        let timeout = self.optional(&mut f, "timeout", None, |d, n, p| {
            d.duration_at_least(n, p, Duration::from_millis(10))
                .map(Some)
        });
        self.finish(f);
        Some(ResolverConfig {
            nameservers: nameservers?,
            timeout: timeout?,
        })
    }

    fn max_connections(&mut self, node: &Node, path: &str) -> Option<Option<usize>> {
        self.integer(node, path, 1, 10_000_000)
            .map(|n| Some(n as usize))
    }

    fn queue(&mut self, node: &Node, path: &str) -> Option<QueueConfig> {
        let mut f = self.fields(node, path)?;
        let default = QueueConfig::default();
        let size = self.optional(&mut f, "size", default.size, |d, n, p| {
            d.integer(n, p, 0, 10_000_000).map(|v| v as usize)
        });
        let timeout = self.optional(&mut f, "timeout", default.timeout, Self::duration);
        self.finish(f);
        Some(QueueConfig {
            size: size?,
            timeout: timeout?,
        })
    }

    fn hash_key(&mut self, node: &Node, path: &str) -> Option<HashKey> {
        self.parsed(node, path, "a hash key", |s| {
            let named = |rest: &str| {
                if rest.is_empty() {
                    Err(" (a name must follow the colon)".to_string())
                } else {
                    Ok(rest.to_string())
                }
            };
            match s.split_once(':') {
                None if s == "client_ip" => Ok(HashKey::ClientIp),
                None if s == "path" => Ok(HashKey::Path),
                Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                    .map(HashKey::Header)
                    .map_err(|_| " (not a valid header name)".to_string()),
                Some(("cookie", name)) => named(name).map(HashKey::Cookie),
                Some(("query", name)) => named(name).map(HashKey::Query),
                _ => Err(
                    " (expected client_ip, path, header:NAME, cookie:NAME or query:NAME)".into(),
                ),
            }
        })
    }

    fn sticky(&mut self, node: &Node, path: &str) -> Option<StickyConfig> {
        let mut f = self.fields(node, path)?;
        let cookie = self.optional(
            &mut f,
            "cookie",
            "bascule_affinity".to_string(),
            |d, n, p| {
                d.parsed(n, p, "a cookie name", |s| {
                    let token =
                        |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                    if !s.is_empty() && s.bytes().all(token) {
                        Ok(s.to_string())
                    } else {
                        Err(" (letters, digits and !#$%&'*+-.^_`|~ only)".into())
                    }
                })
            },
        );
        let ttl = self.optional(&mut f, "ttl", Duration::from_secs(3600), |d, n, p| {
            let ttl = d.duration(n, p)?;
            if ttl.as_secs() == 0 {
                d.problem(Some(n.pos), p, "must be at least one second");
                return None;
            }
            Some(ttl)
        });
        let inline = f.get("secret");
        let file = f.get("secret_file");
        let secrets = match (inline, file) {
            (Some((n, p)), None) => self.string(n, &p).map(|s| vec![s.into_bytes()]),
            (None, Some((n, p))) => self.secret_file(n, &p),
            (None, None) => Some(Vec::new()),
            (Some(_), Some((n, p))) => {
                self.problem(Some(n.pos), &p, "give secret or secret_file, not both");
                None
            }
        };
        let cookie_path = self.optional(&mut f, "path", "/".to_string(), |d, n, p| {
            d.parsed(n, p, "a cookie path", |s| {
                if s.starts_with('/')
                    && !s
                        .bytes()
                        .any(|b| b == b';' || b.is_ascii_control() || b == b' ')
                {
                    Ok(s.to_string())
                } else {
                    Err(" (it must start with / and hold no ; or spaces)".into())
                }
            })
        });
        let http_only = self.optional(&mut f, "http_only", true, Self::boolean);
        let same_site = self.optional(&mut f, "same_site", SameSite::Lax, |d, n, p| {
            d.parsed(n, p, "a SameSite value", |s| match s {
                "lax" | "Lax" => Ok(SameSite::Lax),
                "strict" | "Strict" => Ok(SameSite::Strict),
                "none" | "None" => Ok(SameSite::None),
                _ => Err(" (expected lax, strict or none)".into()),
            })
        });
        let secure = self.optional(&mut f, "secure", None, |d, n, p| {
            d.parsed(n, p, "a Secure setting", |s| match s {
                "auto" => Ok(None),
                "always" | "true" => Ok(Some(true)),
                "never" | "false" => Ok(Some(false)),
                _ => Err(" (expected auto, always or never)".into()),
            })
        });
        self.finish(f);
        let ttl = ttl?;
        Some(StickyConfig {
            cookie: cookie?,
            ttl,
            secrets: secrets?,
            path: cookie_path?,
            http_only: http_only?,
            same_site: same_site?,
            secure: secure?,
        })
    }

    /// One secret per line, blank lines skipped; relative to the config file.
    fn secret_file(&mut self, node: &Node, path: &str) -> Option<Vec<Vec<u8>>> {
        let name = self.string(node, path)?;
        let file = self.base.join(&name);
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let secrets: Vec<Vec<u8>> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec())
                    .collect();
                if secrets.is_empty() {
                    self.problem(
                        Some(node.pos),
                        path,
                        format!("{} holds no secret", file.display()),
                    );
                    return None;
                }
                Some(secrets)
            }
            Err(e) => {
                self.problem(
                    Some(node.pos),
                    path,
                    format!("cannot read {}: {e}", file.display()),
                );
                None
            }
        }
    }

    /// A duration above zero.
    fn positive(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let d = self.duration(node, path)?;
        if d.is_zero() {
            self.problem(Some(node.pos), path, "must be above zero");
            return None;
        }
        Some(d)
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        self.parsed(node, path, "true or false", |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(String::new()),
        })
    }

    fn health_check(&mut self, node: &Node, path: &str) -> Option<HealthCheckConfig> {
        let mut f = self.fields(node, path)?;
        let check_path = self.optional(&mut f, "path", "/".to_string(), |d, n, p| {
            d.parsed(n, p, "a path", |s| {
                if s.starts_with('/')
                    && !s
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    Ok(s.to_string())
                } else {
                    Err(" (it must start with / and hold no spaces)".into())
                }
            })
        });
        let interval = self.optional(&mut f, "interval", Duration::from_secs(2), Self::positive);
        let timeout = self.optional(&mut f, "timeout", Duration::from_secs(1), Self::positive);
        let threshold = |d: &mut Self, n: &Node, p: &str| d.integer(n, p, 1, 100).map(|v| v as u32);
        let healthy_threshold = self.optional(&mut f, "healthy_threshold", 2, threshold);
        let unhealthy_threshold = self.optional(&mut f, "unhealthy_threshold", 3, threshold);
        let expected_status = self.optional(
            &mut f,
            "expected_status",
            vec![(200, 399)],
            Self::status_ranges,
        );
        let host = self.optional(&mut f, "host", None, |d, n, p| d.string(n, p).map(Some));
        let initial_healthy = self.optional(&mut f, "initial", true, |d, n, p| {
            d.parsed(n, p, "an initial state", |s| match s {
                "healthy" => Ok(true),
                "unhealthy" => Ok(false),
                _ => Err(" (expected healthy or unhealthy)".into()),
            })
        });
        self.finish(f);
        let (interval, timeout) = (interval?, timeout?);
        Some(HealthCheckConfig {
            path: check_path?,
            interval,
            timeout,
            healthy_threshold: healthy_threshold?,
            unhealthy_threshold: unhealthy_threshold?,
            expected_status: expected_status?,
            host: host?,
            initial_healthy: initial_healthy?,
        })
    }

    /// `"200-399"`, `"200,204,300-302"`.
    fn status_ranges(&mut self, node: &Node, path: &str) -> Option<Vec<(u16, u16)>> {
        self.parsed(node, path, "a list of status ranges", |s| {
            s.split(',')
                .map(|part| {
                    let part = part.trim();
                    let (lo, hi) = part.split_once('-').unwrap_or((part, part));
                    let lo: u16 = lo
                        .trim()
                        .parse()
                        .map_err(|_| " (such as 200-399 or 200,204)".to_string())?;
                    let hi: u16 = hi
                        .trim()
                        .parse()
                        .map_err(|_| " (such as 200-399 or 200,204)".to_string())?;
                    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                        return Err(" (statuses run from 100 to 599, low to high)".into());
                    }
                    Ok((lo, hi))
                })
                .collect()
        })
    }

    fn passive(&mut self, node: &Node, path: &str) -> Option<PassiveConfig> {
        let mut f = self.fields(node, path)?;
        let consecutive_failures = self.optional(&mut f, "consecutive_failures", 5, |d, n, p| {
            d.integer(n, p, 1, 1000).map(|v| v as u32)
        });
        let ejection = self.optional(&mut f, "ejection", Duration::from_secs(30), Self::duration);
        let max_ejection = self.optional(
            &mut f,
            "max_ejection",
            Duration::from_secs(300),
            Self::duration,
        );
        let max_ejected_percent = self.optional(&mut f, "max_ejected_percent", 50, |d, n, p| {
            d.integer(n, p, 0, 100).map(|v| v as u32)
        });
        self.finish(f);
        Some(PassiveConfig {
            consecutive_failures: consecutive_failures?,
            ejection: ejection?,
            max_ejection: max_ejection?,
            max_ejected_percent: max_ejected_percent?,
        })
    }

    fn retry_budget(&mut self, node: &Node, path: &str) -> Option<RetryBudgetConfig> {
        let mut f = self.fields(node, path)?;
        let ratio = self.optional(&mut f, "ratio", 0.2, |d, n, p| {
            d.parsed(n, p, "a ratio", |s| match s.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(" from 0 to 1, such as 0.2".into()),
            })
        });
        let min_per_second = self.optional(&mut f, "min_per_second", 10, |d, n, p| {
            d.integer(n, p, 0, 100_000).map(|v| v as u32)
        });
        self.finish(f);
        Some(RetryBudgetConfig {
            ratio: ratio?,
            min_per_second: min_per_second?,
        })
    }

    /// The backends written as addresses, and those given by name.
    fn backends(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<(Vec<BackendConfig>, Vec<NamedBackend>)> {
        let items = self.seq(node, path)?;
        if items.is_empty() {
            self.problem(Some(node.pos), path, "at least one backend is needed");
            return None;
        }
        let mut out: Vec<BackendConfig> = Vec::with_capacity(items.len());
        let mut names: Vec<NamedBackend> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let twice = |what: &str| format!("{what} is listed twice");
            match self.backend(item, &path) {
                Some(Entry::Address(b)) if out.iter().any(|o| o.addr == b.addr) => {
                    self.problem(Some(item.pos), &path, twice(&b.address));
                    ok = false;
                }
                Some(Entry::Name(n)) if names.iter().any(|o| o.source == n.source) => {
                    self.problem(Some(item.pos), &path, twice(&n.source));
                    ok = false;
                }
                Some(Entry::Address(b)) => out.push(b),
                Some(Entry::Name(n)) => names.push(n),
                None => ok = false,
            }
        }
        ok.then_some((out, names))
    }

    fn backend(&mut self, node: &Node, path: &str) -> Option<Entry> {
        if let Value::Scalar(_) = &node.value {
            return self.backend_address(node, path, 1, None);
        }
        let mut f = self.fields(node, path)?;
        let weight = self.optional(&mut f, "weight", 1, |d, n, p| {
            d.integer(n, p, 1, MAX_WEIGHT.into()).map(|w| w as u32)
        });
        let max_connections = self.optional(&mut f, "max_connections", None, Self::max_connections);
        let entry = match (f.get("address"), f.get("srv")) {
            (Some((n, p)), None) => {
                self.backend_address(n, &p, weight.unwrap_or(1), max_connections.flatten())
            }
            (None, Some((n, p))) => self.string(n, &p).and_then(|name| {
                let name = name.trim().trim_end_matches('.').to_string();
                if !is_host_name(&name) {
                    self.problem(Some(n.pos), &p, format!("`{name}` is not a DNS name"));
                    return None;
                }
                Some(Entry::Name(NamedBackend {
                    source: name.clone(),
                    lookup: Lookup::Srv(name),
                    weight: 1,
                    max_connections: max_connections.flatten(),
                }))
            }),
            (Some(_), Some((n, p))) => {
                self.problem(Some(n.pos), &p, "give either address or srv, not both");
                None
            }
            (None, None) => {
                self.problem(
                    Some(node.pos),
                    path,
                    "missing key `address` (or `srv`, for DNS SRV records)",
                );
                None
            }
        };
        self.finish(f);
        weight?;
        max_connections?;
        entry
    }

    /// `ip:port` (a backend), or `host:port` (a name whose addresses are backends).
    fn backend_address(
        &mut self,
        node: &Node,
        path: &str,
        weight: u32,
        max_connections: Option<usize>,
    ) -> Option<Entry> {
        let text = self.string(node, path)?;
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(Entry::Address(BackendConfig {
                address: text.to_string(),
                weight,
                max_connections,
                ..BackendConfig::at(addr)
            }));
        }
        let host_port = text
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|&(host, port)| port != 0 && is_host_name(host));
        let Some((host, port)) = host_port else {
            self.problem(
                Some(node.pos),
                path,
                format!(
                    "`{text}` is not an address (expected ip:port or host:port, such as \
                     127.0.0.1:9001 or app.internal:9001)"
                ),
            );
            return None;
        };
        Some(Entry::Name(NamedBackend {
            source: text.to_string(),
            lookup: Lookup::Host {
                host: host.trim_end_matches('.').to_string(),
                port,
            },
            weight,
            max_connections,
        }))
    }

    fn listeners(
        &mut self,
        node: &Node,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<Vec<ListenerConfig>> {
        let items = self.seq(node, path)?;
        if items.is_empty() {
            self.problem(Some(node.pos), path, "at least one listener is needed");
            return None;
        }
        let mut out: Vec<ListenerConfig> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{path}[{i}]");
            match self.listener(item, &path, upstreams) {
                Some(l) if l.bind.port() != 0 && out.iter().any(|o| o.bind == l.bind) => {
                    self.problem(
                        Some(item.pos),
                        &format!("{path}.bind"),
                        format!("{} is bound by an earlier listener", l.bind),
                    );
                    ok = false;
                }
                Some(l) => out.push(l),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn listener(
        &mut self,
        node: &Node,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<ListenerConfig> {
        let mut f = self.fields(node, path)?;
        let bind = self
            .required(&mut f, "bind", node.pos)
            .and_then(|(n, p)| self.socket_addr(n, &p));
        let name = self.optional(&mut f, "name", None, |d, n, p| d.string(n, p).map(Some));
        let redirect_https = self.optional(&mut f, "redirect_https", false, Self::boolean);
        // A listener that only redirects to https needs no routes.
        let routes = match (redirect_https, f.get("routes")) {
            (_, Some((n, p))) => self.routes(n, &p, upstreams),
            (Some(true), None) => Some(Vec::new()),
            _ => {
                // Reports the missing key.
                self.required(&mut f, "routes", node.pos);
                None
            }
        };
        let tls = self.optional(&mut f, "tls", None, |d, n, p| d.tls(n, p).map(Some));
        let max_header_bytes = self.optional(&mut f, "max_header_bytes", 65536, |d, n, p| {
            d.integer(n, p, 1024, 1 << 20).map(|v| v as usize)
        });
        let max_connections = self.optional(&mut f, "max_connections", None, Self::max_connections);
        let minute = Duration::from_secs(60);
        let (mut header_read, mut keepalive, mut body, mut send) = (
            Some(Duration::from_secs(10)),
            Some(minute),
            Some(minute),
            Some(minute),
        );
        if let Some((n, p)) = f.get("timeouts") {
            if let Some(mut t) = self.fields(n, &p) {
                header_read = self.optional(
                    &mut t,
                    "header_read",
                    Duration::from_secs(10),
                    Self::duration,
                );
                keepalive = self.optional(&mut t, "keepalive", minute, Self::duration);
                body = self.optional(&mut t, "body", minute, Self::duration);
                send = self.optional(&mut t, "send", minute, Self::duration);
                self.finish(t);
            }
        }
        self.finish(f);
        let bind = bind?;
        Some(ListenerConfig {
            name: name?.unwrap_or_else(|| bind.to_string()),
            bind,
            routes: routes?,
            header_read_timeout: header_read?,
            keepalive_timeout: keepalive?,
            body_timeout: body?,
            send_timeout: send?,
            max_header_bytes: max_header_bytes?,
            tls: tls?,
            redirect_https: redirect_https?,
            max_connections: max_connections?,
        })
    }

    fn tls(&mut self, node: &Node, path: &str) -> Option<TlsConfig> {
        let mut f = self.fields(node, path)?;
        let certificates = self
            .required(&mut f, "certificates", node.pos)
            .and_then(|(n, p)| {
                let items = self.seq(n, &p)?;
                if items.is_empty() {
                    self.problem(Some(n.pos), &p, "at least one certificate is needed");
                    return None;
                }
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{p}[{i}]");
                    let Some(mut c) = self.fields(item, &p) else {
                        continue;
                    };
                    let cert = self
                        .required(&mut c, "cert", item.pos)
                        .and_then(|(n, p)| self.string(n, &p).map(|s| (s, n.pos)));
                    let key = self
                        .required(&mut c, "key", item.pos)
                        .and_then(|(n, p)| self.string(n, &p).map(|s| (s, n.pos)));
                    self.finish(c);
                    let (Some((cert, cert_pos)), Some((key, _))) = (cert, key) else {
                        continue;
                    };
                    match crate::tls::load(&self.base.join(cert), &self.base.join(key)) {
                        Ok(loaded) => out.push(loaded),
                        Err(why) => self.problem(Some(cert_pos), &p, why),
                    }
                }
                (out.len() == items.len()).then_some(out)
            });
        let handshake_timeout = self.optional(
            &mut f,
            "handshake_timeout",
            Duration::from_secs(10),
            Self::duration,
        );
        let protocols = self.optional(
            &mut f,
            "protocols",
            crate::tls::Protocol::ALL.to_vec(),
            Self::tls_protocols,
        );
        self.finish(f);
        Some(TlsConfig {
            certificates: certificates?,
            handshake_timeout: handshake_timeout?,
            protocols: protocols?,
        })
    }

    fn tls_protocols(&mut self, node: &Node, path: &str) -> Option<Vec<crate::tls::Protocol>> {
        use crate::tls::Protocol;
        let protocols = self.each(node, path, |d, item, p| {
            d.parsed(item, p, "a TLS version bascule offers", |s| {
                Protocol::ALL
                    .into_iter()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| format!(" ({})", Protocol::ALL.map(Protocol::name).join(", ")))
            })
        })?;
        if protocols.is_empty() {
            self.problem(Some(node.pos), path, "at least one protocol is needed");
            return None;
        }
        Some(protocols)
    }

    fn backend_tls(&mut self, node: &Node, path: &str) -> Option<BackendTls> {
        let mut f = self.fields(node, path)?;
        let ca = self.optional(&mut f, "ca", None, |d, n, p| d.string(n, p).map(Some));
        let server_name = self.optional(&mut f, "server_name", None, |d, n, p| {
            d.string(n, p).map(Some)
        });
        let insecure = self.optional(&mut f, "insecure_skip_verify", false, Self::boolean);
        let http2 = self.optional(&mut f, "http2", true, Self::boolean);
        self.finish(f);
        let (ca, server_name, insecure, http2) = (ca?, server_name?, insecure?, http2?);
        if insecure && ca.is_some() {
            self.problem(
                Some(node.pos),
                path,
                "`ca` and `insecure_skip_verify: true` contradict each other",
            );
            return None;
        }
        let ca = ca.map(|c| self.base.join(c));
        match BackendTls::new(ca.as_deref(), server_name, insecure, http2) {
            Ok(tls) => Some(tls),
            Err(why) => {
                self.problem(Some(node.pos), path, why);
                None
            }
        }
    }

    fn routes(
        &mut self,
        node: &Node,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<Vec<RouteConfig>> {
        let items = self.seq(node, path)?;
        if items.is_empty() {
            self.problem(Some(node.pos), path, "at least one route is needed");
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(self.route(item, &format!("{path}[{i}]"), upstreams));
        }
        out.into_iter().collect()
    }

    fn route(
        &mut self,
        node: &Node,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<RouteConfig> {
        let mut f = self.fields(node, path)?;
        let upstream = self
            .required(&mut f, "upstream", node.pos)
            .and_then(|(n, p)| {
                let name = self.string(n, &p)?;
                match upstreams {
                    Some(known) if !known.contains(&name) => {
                        self.problem(
                            Some(n.pos),
                            &p,
                            format!("no upstream named `{name}` (known: {})", known.join(", ")),
                        );
                        None
                    }
                    _ => Some(name),
                }
            });
        let cache = self.optional(&mut f, "cache", None, |d, n, p| {
            let name = d.string(n, p)?;
            match d.cache_names.clone() {
                Some(known) if !known.contains(&name) => {
                    let known = if known.is_empty() {
                        "none: add it under `caches`".to_string()
                    } else {
                        known.join(", ")
                    };
                    d.problem(
                        Some(n.pos),
                        p,
                        format!("no cache named `{name}` (known: {known})"),
                    );
                    None
                }
                _ => Some(Some(name)),
            }
        });
        let mut host = Some(None);
        let mut path_prefix = Some(None);
        let mut methods = Some(Vec::new());
        if let Some((n, p)) = f.get("match") {
            if let Some(mut m) = self.fields(n, &p) {
                host = self.optional(&mut m, "host", None, |d, n, p| d.host(n, p).map(Some));
                path_prefix = self.optional(&mut m, "path_prefix", None, |d, n, p| {
                    d.parsed(n, p, "a path prefix", |s| {
                        if s.starts_with('/') {
                            Ok(Some(s.to_string()))
                        } else {
                            Err(" (it must start with /)".into())
                        }
                    })
                });
                methods = self.optional(&mut m, "methods", Vec::new(), Self::methods);
                self.finish(m);
            }
        }
        self.finish(f);
        Some(RouteConfig {
            host: host?,
            path_prefix: path_prefix?,
            methods: methods?,
            upstream: upstream?,
            cache: cache?,
        })
    }

    fn host(&mut self, node: &Node, path: &str) -> Option<HostMatch> {
        self.parsed(node, path, "a host name", |s| {
            let s = s.to_ascii_lowercase();
            let (suffix, name) = match s.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, s.as_str()),
            };
            let valid = |label: &str| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if !name.split('.').all(valid) {
                return Err(" (expected a name such as api.example.com or *.example.com)".into());
            }
            Ok(if suffix {
                HostMatch::Suffix(format!(".{name}"))
            } else {
                HostMatch::Exact(name.to_string())
            })
        })
    }

    fn methods(&mut self, node: &Node, path: &str) -> Option<Vec<Method>> {
        self.each(node, path, |d, item, p| {
            d.parsed(item, p, "an HTTP method", |s| {
                if !s.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(" (methods are upper case, such as GET)".into());
                }
                Method::from_bytes(s.as_bytes()).map_err(|_| String::new())
            })
        })
    }
}

#[cfg(test)]
mod tests {
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
            p.iter()
                .any(|p| p
                    .contains("listeners[1].bind: 127.0.0.1:8080 is bound by an earlier listener")),
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
}
