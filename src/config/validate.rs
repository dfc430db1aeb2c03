//! Turns the file's serde types (`raw`) into a checked `Config`, collecting
//! every problem with its position and path.
//!
//! Each reader returns `Option`: `None` means the value was wrong and a
//! problem has been recorded, so checking goes on and the user sees every
//! mistake in one run.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::backend_tls::BackendTls;

use super::raw::{self, At, Entries, Text};
use super::*;

/// The longest duration a config may give (any timeout or interval): 100 of
/// humantime's years of 365.25 days.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Checks `file`; relative file paths in it are taken from `base`. Problems
/// are added to `problems`; a config comes back only when there are none.
pub fn config(file: raw::File, base: &Path, problems: &mut Vec<Problem>) -> Option<Config> {
    let mut v = Validator {
        problems: Vec::new(),
        base,
        admin_bind: None,
        cache_names: Vec::new(),
    };
    let config = v.config(file);
    let ok = v.problems.is_empty() && problems.is_empty();
    problems.append(&mut v.problems);
    config.filter(|_| ok)
}

struct Validator<'b> {
    problems: Vec<Problem>,
    base: &'b Path,
    /// Where `admin.bind` is (or `admin`, when it takes the default).
    admin_bind: Option<Pos>,
    /// The names under `caches`, for the routes that name one.
    cache_names: Vec<String>,
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

impl Validator<'_> {
    fn problem(&mut self, pos: Option<Pos>, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// The value of `key` in the map at `pos`, or a problem saying it is missing.
    fn required<'a, T>(
        &mut self,
        value: &'a Option<T>,
        parent: &str,
        key: &str,
        pos: Pos,
    ) -> Option<&'a T> {
        if value.is_none() {
            self.problem(Some(pos), &join(parent, key), "missing (required)");
        }
        value.as_ref()
    }

    /// `read` of the value of `key`, or `default` when it is not given.
    fn optional<T>(
        &mut self,
        value: &Option<Text>,
        parent: &str,
        key: &str,
        default: T,
        read: impl FnOnce(&mut Self, &Text, &str) -> Option<T>,
    ) -> Option<T> {
        match value {
            Some(text) => read(self, text, &join(parent, key)),
            None => Some(default),
        }
    }

    fn parsed<T>(
        &mut self,
        text: &Text,
        path: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(text.value.trim()) {
            Ok(v) => Some(v),
            Err(why) => {
                let shown = &text.value;
                self.problem(
                    Some(text.pos),
                    path,
                    format!("`{shown}` is not {what}{why}"),
                );
                None
            }
        }
    }

    /// Each item of a list, read by `one` at its own path (`path[i]`): every
    /// item's problems are reported, and the list is `None` if any had one.
    fn each<T>(
        &mut self,
        items: &[Text],
        path: &str,
        mut one: impl FnMut(&mut Self, &Text, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(one(self, item, &format!("{path}[{i}]")));
        }
        out.into_iter().collect()
    }

    /// Durations are bounded so that a deadline made from one (now + timeout)
    /// can always be represented; humantime accepts far larger.
    fn duration(&mut self, text: &Text, path: &str) -> Option<Duration> {
        self.parsed(text, path, "a duration", |s| {
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

    fn duration_at_least(&mut self, text: &Text, path: &str, min: Duration) -> Option<Duration> {
        let d = self.duration(text, path)?;
        if d < min {
            let min = humantime::format_duration(min);
            self.problem(Some(text.pos), path, format!("must be at least {min}"));
            return None;
        }
        Some(d)
    }

    /// A duration above zero.
    fn positive(&mut self, text: &Text, path: &str) -> Option<Duration> {
        let d = self.duration(text, path)?;
        if d.is_zero() {
            self.problem(Some(text.pos), path, "must be above zero");
            return None;
        }
        Some(d)
    }

    fn socket_addr(&mut self, text: &Text, path: &str) -> Option<SocketAddr> {
        self.parsed(text, path, "an address", |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| " (expected ip:port, such as 127.0.0.1:8080 or [::1]:8080)".into())
        })
    }

    fn integer(&mut self, text: &Text, path: &str, min: u64, max: u64) -> Option<u64> {
        self.parsed(text, path, "a whole number", |s| {
            let n: u64 = s.parse().map_err(|_| String::new())?;
            if n < min || n > max {
                return Err(format!(" in the range {min} to {max}"));
            }
            Ok(n)
        })
    }

    fn boolean(&mut self, text: &Text, path: &str) -> Option<bool> {
        self.parsed(text, path, "true or false", |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(String::new()),
        })
    }

    fn max_connections(&mut self, text: &Text, path: &str) -> Option<Option<usize>> {
        self.integer(text, path, 1, 10_000_000)
            .map(|n| Some(n as usize))
    }

    /// A size in bytes: a whole number with `KiB`, `MiB` or `GiB`, or plain bytes; at least `min`.
    fn size(&mut self, text: &Text, path: &str, min: u64) -> Option<u64> {
        self.parsed(text, path, "a size", |s| {
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

    // ---- the sections ----------------------------------------------------------------

    fn config(&mut self, f: raw::File) -> Option<Config> {
        let root = Pos { line: 1, column: 1 };
        let upstreams_node = self.required(&f.upstreams, "", "upstreams", root);
        // Routes are checked against the names even when an upstream has other problems.
        let names: Option<Vec<String>> =
            upstreams_node.map(|u| u.value.0.iter().map(|(k, _)| k.clone()).collect());
        let upstreams = upstreams_node.and_then(|u| self.upstreams(u, "upstreams"));
        let caches = match &f.caches {
            Some(c) => {
                self.cache_names = c.value.0.iter().map(|(k, _)| k.clone()).collect();
                self.caches(&c.value, "caches")
            }
            None => Some(Vec::new()),
        };
        let listeners = self
            .required(&f.listeners, "", "listeners", root)
            .and_then(|l| self.listeners(l, "listeners", names.as_ref()));
        // `admin:` with nothing under it asks for the defaults.
        let admin = match &f.admin {
            Some(At {
                value: Some(admin),
                pos,
            }) => self.admin(admin, *pos, "admin").map(Some),
            Some(At { value: None, pos }) => {
                self.admin_bind = Some(*pos);
                Some(Some(AdminConfig {
                    bind: SocketAddr::from(([127, 0, 0, 1], 9901)),
                    token: None,
                }))
            }
            None => Some(None),
        };
        let shutdown_timeout = self.optional(
            &f.shutdown_timeout,
            "",
            "shutdown_timeout",
            Duration::from_secs(30),
            Self::duration,
        );
        let access_log = self.optional(
            &f.access_log,
            "",
            "access_log",
            AccessLog::Off,
            Self::access_log,
        );
        let access_log_format = self.optional(
            &f.access_log_format,
            "",
            "access_log_format",
            AccessLogFormat::Combined,
            |d, t, p| {
                d.parsed(t, p, "an access log format", |s| match s {
                    "combined" => Ok(AccessLogFormat::Combined),
                    "json" => Ok(AccessLogFormat::Json),
                    _ => Err(" (expected combined or json)".into()),
                })
            },
        );
        let workers = self.optional(&f.workers, "", "workers", None, |d, t, p| {
            d.integer(t, p, 1, 1024).map(|n| Some(n as usize))
        });
        let resolver = match &f.resolver {
            Some(r) => self.resolver(&r.value, "resolver"),
            None => Some(ResolverConfig::default()),
        };
        // Checked whatever else failed, so that one run reports every problem.
        if let (Some(Some(admin)), Some(listeners)) = (&admin, &listeners) {
            if admin.bind.port() != 0 && listeners.iter().any(|l| l.bind == admin.bind) {
                let pos = self.admin_bind;
                self.problem(pos, "admin.bind", "the same address as a listener");
            }
        }
        Some(Config {
            listeners: listeners?,
            upstreams: upstreams?,
            admin: admin?,
            shutdown_timeout: shutdown_timeout?,
            access_log: access_log?,
            access_log_format: access_log_format?,
            workers: workers?,
            caches: caches?,
            resolver: resolver?,
        })
    }

    fn caches(
        &mut self,
        caches: &Entries<At<raw::Cache>>,
        path: &str,
    ) -> Option<Vec<Arc<CacheConfig>>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (name, cache) in &caches.0 {
            match self.cache(name, cache, &join(path, name)) {
                Some(c) => out.push(Arc::new(c)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn cache(&mut self, name: &str, c: &At<raw::Cache>, path: &str) -> Option<CacheConfig> {
        let (pos, c) = (c.pos, &c.value);
        let memory = self
            .required(&c.memory, path, "memory", pos)
            .and_then(|t| self.size(t, &join(path, "memory"), 1 << 20));
        let max_object_pos = c.max_object.as_ref().map_or(pos, |t| t.pos);
        let max_object = self.optional(&c.max_object, path, "max_object", 8 << 20, |d, t, p| {
            d.size(t, p, 1)
        });
        let default_ttl = self.optional(
            &c.default_ttl,
            path,
            "default_ttl",
            Duration::ZERO,
            Self::duration,
        );
        let swr = self.optional(
            &c.stale_while_revalidate,
            path,
            "stale_while_revalidate",
            Duration::ZERO,
            Self::duration,
        );
        let sie = self.optional(
            &c.stale_if_error,
            path,
            "stale_if_error",
            Duration::ZERO,
            Self::duration,
        );
        let redis = match &c.redis {
            Some(r) => self.cache_redis(r, &join(path, "redis")).map(Some),
            None => Some(None),
        };
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

    fn cache_redis(&mut self, r: &At<raw::CacheRedis>, path: &str) -> Option<CacheRedisConfig> {
        let url = self
            .required(&r.value.url, path, "url", r.pos)
            .and_then(|t| {
                self.parsed(t, &join(path, "url"), "a Redis URL", |s| {
                    if s.starts_with("redis://") || s.starts_with("unix://") {
                        Ok(s.to_string())
                    } else {
                        Err(" (expected redis://HOST:PORT/DB or unix:///PATH)".into())
                    }
                })
            });
        let timeout = self.optional(
            &r.value.timeout,
            path,
            "timeout",
            Duration::from_millis(50),
            Self::positive,
        );
        Some(CacheRedisConfig {
            url: url?,
            timeout: timeout?,
        })
    }

    /// A file is opened for appending here, as `nginx -t` opens its logs: a
    /// path that cannot be written is this file's problem, not a failed start.
    fn access_log(&mut self, text: &Text, path: &str) -> Option<AccessLog> {
        Some(match text.value.as_str() {
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
                    self.problem(Some(text.pos), path, message);
                    return None;
                }
                AccessLog::File(file)
            }
        })
    }

    /// `admin: {}` (or `admin:` alone) listens on loopback, 127.0.0.1:9901.
    fn admin(&mut self, a: &raw::Admin, pos: Pos, path: &str) -> Option<AdminConfig> {
        let default = SocketAddr::from(([127, 0, 0, 1], 9901));
        // Kept for the check against the listeners, made once they are known.
        self.admin_bind = Some(a.bind.as_ref().map_or(pos, |t| t.pos));
        let bind = self.optional(&a.bind, path, "bind", default, Self::socket_addr);
        let token = match (&a.token, &a.token_file) {
            (None, None) => Some(None),
            (Some(t), None) => self
                .token(t, &join(path, "token"), |_, text| Ok(text))
                .map(Some),
            (None, Some(t)) => self
                .token(t, &join(path, "token_file"), |d, name| {
                    let file = d.base.join(name);
                    std::fs::read_to_string(&file)
                        .map(|text| text.trim().to_string())
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))
                })
                .map(Some),
            (Some(_), Some(t)) => {
                let p = join(path, "token_file");
                self.problem(Some(t.pos), &p, "give token or token_file, not both");
                None
            }
        };
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
        text: &Text,
        path: &str,
        read: impl FnOnce(&Self, String) -> Result<String, String>,
    ) -> Option<String> {
        match read(self, text.value.clone()) {
            Ok(token) if token.is_empty() => {
                self.problem(Some(text.pos), path, "the token is empty");
                None
            }
            Ok(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => {
                let why = "the token must be printable ASCII without spaces";
                self.problem(Some(text.pos), path, why);
                None
            }
            Ok(token) => Some(token),
            Err(why) => {
                self.problem(Some(text.pos), path, why);
                None
            }
        }
    }

    fn upstreams(
        &mut self,
        upstreams: &At<Entries<At<raw::Upstream>>>,
        path: &str,
    ) -> Option<Vec<Arc<UpstreamConfig>>> {
        if upstreams.value.0.is_empty() {
            self.problem(Some(upstreams.pos), path, "at least one upstream is needed");
        }
        let mut out: Vec<Arc<UpstreamConfig>> = Vec::new();
        let mut ok = true;
        for (name, u) in &upstreams.value.0 {
            // A name given twice is reported with the keys (`shape`).
            if out.iter().any(|o| o.name == *name) {
                ok = false;
                continue;
            }
            match self.upstream(name, u, &join(path, name)) {
                Some(u) => out.push(Arc::new(u)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn upstream(
        &mut self,
        name: &str,
        u: &At<raw::Upstream>,
        path: &str,
    ) -> Option<UpstreamConfig> {
        let (pos, u) = (u.pos, &u.value);
        let balance = self.optional(
            &u.balance,
            path,
            "balance",
            Balance::RoundRobin,
            |d, t, p| {
                d.parsed(t, p, "a balance", |s| match s {
                    "round_robin" => Ok(Balance::RoundRobin),
                    "least_connections" => Ok(Balance::LeastConnections),
                    "consistent_hash" => Ok(Balance::ConsistentHash),
                    _ => {
                        Err(" (expected round_robin, least_connections or consistent_hash)".into())
                    }
                })
            },
        );
        let hashing = balance == Some(Balance::ConsistentHash);
        let hash_key = match &u.hash_key {
            Some(t) => {
                let p = join(path, "hash_key");
                if !hashing {
                    self.problem(Some(t.pos), &p, "applies only to balance: consistent_hash");
                }
                self.hash_key(t, &p)
            }
            None => Some(HashKey::ClientIp),
        };
        let hash_balance_factor = match &u.hash_balance_factor {
            Some(t) => {
                let p = join(path, "hash_balance_factor");
                if !hashing {
                    self.problem(Some(t.pos), &p, "applies only to balance: consistent_hash");
                }
                self.parsed(t, &p, "a balance factor", |s| match s.parse::<f64>() {
                    Ok(f) if f > 1.0 && f.is_finite() => Ok(Some(f)),
                    _ => Err(" above 1, such as 1.25".into()),
                })
            }
            None => Some(None),
        };
        let backends = self
            .required(&u.backends, path, "backends", pos)
            .and_then(|b| self.backends(b, &join(path, "backends")));
        let discovery = match &u.discovery {
            Some(d) => self.discovery(&d.value, &join(path, "discovery")),
            None => Some(DiscoveryConfig::default()),
        };
        let (mut connect, mut response, mut idle) = (
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(90)),
        );
        if let Some(t) = &u.timeouts {
            let p = join(path, "timeouts");
            let t = &t.value;
            connect = self.optional(
                &t.connect,
                &p,
                "connect",
                Duration::from_secs(5),
                Self::duration,
            );
            response = self.optional(
                &t.response,
                &p,
                "response",
                Duration::from_secs(60),
                Self::duration,
            );
            idle = self.optional(&t.idle, &p, "idle", Duration::from_secs(90), Self::duration);
        }
        let health_check = match &u.health_check {
            Some(h) => self
                .health_check(&h.value, &join(path, "health_check"))
                .map(Some),
            None => Some(None),
        };
        let passive = match &u.passive {
            Some(h) => self.passive(&h.value, &join(path, "passive")).map(Some),
            None => Some(None),
        };
        let retries = self.optional(&u.retries, path, "retries", 2, |d, t, p| {
            d.integer(t, p, 0, 10).map(|v| v as u32)
        });
        let retry_budget = match &u.retry_budget {
            Some(r) => self.retry_budget(&r.value, &join(path, "retry_budget")),
            None => Some(RetryBudgetConfig::default()),
        };
        let fail_open = self.optional(&u.fail_open, path, "fail_open", false, Self::boolean);
        let max_idle = self.optional(
            &u.max_idle_connections,
            path,
            "max_idle_connections",
            64,
            |d, t, p| d.integer(t, p, 0, 100_000).map(|v| v as usize),
        );
        let slow_start = self.optional(&u.slow_start, path, "slow_start", None, |d, t, p| {
            d.duration(t, p).map(Some)
        });
        let sticky = match &u.sticky {
            Some(s) => self.sticky(&s.value, &join(path, "sticky")).map(Some),
            None => Some(None),
        };
        let max_connections = self.optional(
            &u.max_connections,
            path,
            "max_connections",
            None,
            Self::max_connections,
        );
        let queue = match &u.queue {
            Some(q) => self.queue(&q.value, &join(path, "queue")),
            None => Some(QueueConfig::default()),
        };
        let tls_path = join(path, "tls");
        let tls = match &u.tls {
            Some(t) => self.backend_tls(t, &tls_path).map(Some),
            None => Some(None),
        };
        let mut backends = backends;
        // Each backend's name for certificate checks and SNI, settled now so that
        // a name that cannot be checked is a config error. (An SRV record's
        // targets are checked as they come.)
        if let (Some(Some(tls)), Some((backends, names)), Some(field)) =
            (&tls, backends.as_mut(), &u.tls)
        {
            for b in backends.iter_mut() {
                match tls.name_for(&b.address) {
                    Ok(name) => b.tls_name = Some(name),
                    Err(why) => self.problem(Some(field.pos), &tls_path, why),
                }
            }
            for name in names
                .iter()
                .filter(|n| matches!(n.lookup, Lookup::Host { .. }))
            {
                if let Err(why) = tls.name_for(&name.source) {
                    self.problem(Some(field.pos), &tls_path, why);
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

    fn discovery(&mut self, d: &raw::Discovery, path: &str) -> Option<DiscoveryConfig> {
        let default = DiscoveryConfig::default();
        let interval = self.optional(
            &d.interval,
            path,
            "interval",
            default.interval,
            |v, t, p| v.duration_at_least(t, p, Duration::from_millis(100)),
        );
        let hold = self.optional(&d.hold, path, "hold", default.hold, Self::duration);
        Some(DiscoveryConfig {
            interval: interval?,
            hold: hold?,
        })
    }

    fn resolver(&mut self, r: &raw::Resolver, path: &str) -> Option<ResolverConfig> {
        let nameservers = match &r.nameservers {
            Some(list) => {
                let p = join(path, "nameservers");
                self.each(&list.value, &p, Self::socket_addr)
            }
            None => Some(Vec::new()),
        };
        let timeout = self.optional(&r.timeout, path, "timeout", None, |d, t, p| {
            d.duration_at_least(t, p, Duration::from_millis(10))
                .map(Some)
        });
        Some(ResolverConfig {
            nameservers: nameservers?,
            timeout: timeout?,
        })
    }

    fn queue(&mut self, q: &raw::Queue, path: &str) -> Option<QueueConfig> {
        let default = QueueConfig::default();
        let size = self.optional(&q.size, path, "size", default.size, |d, t, p| {
            d.integer(t, p, 0, 10_000_000).map(|v| v as usize)
        });
        let timeout = self.optional(&q.timeout, path, "timeout", default.timeout, Self::duration);
        Some(QueueConfig {
            size: size?,
            timeout: timeout?,
        })
    }

    fn hash_key(&mut self, text: &Text, path: &str) -> Option<HashKey> {
        self.parsed(text, path, "a hash key", |s| {
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

    fn sticky(&mut self, s: &raw::Sticky, path: &str) -> Option<StickyConfig> {
        let cookie = self.optional(
            &s.cookie,
            path,
            "cookie",
            "bascule_affinity".to_string(),
            |d, t, p| {
                d.parsed(t, p, "a cookie name", |s| {
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
        let ttl = self.optional(&s.ttl, path, "ttl", Duration::from_secs(3600), |d, t, p| {
            let ttl = d.duration(t, p)?;
            if ttl.as_secs() == 0 {
                d.problem(Some(t.pos), p, "must be at least one second");
                return None;
            }
            Some(ttl)
        });
        let secrets = match (&s.secret, &s.secret_file) {
            (Some(t), None) => Some(vec![t.value.clone().into_bytes()]),
            (None, Some(t)) => self.secret_file(t, &join(path, "secret_file")),
            (None, None) => Some(Vec::new()),
            (Some(_), Some(t)) => {
                let p = join(path, "secret_file");
                self.problem(Some(t.pos), &p, "give secret or secret_file, not both");
                None
            }
        };
        let cookie_path = self.optional(&s.path, path, "path", "/".to_string(), |d, t, p| {
            d.parsed(t, p, "a cookie path", |s| {
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
        let http_only = self.optional(&s.http_only, path, "http_only", true, Self::boolean);
        let same_site = self.optional(&s.same_site, path, "same_site", SameSite::Lax, |d, t, p| {
            d.parsed(t, p, "a SameSite value", |s| match s {
                "lax" | "Lax" => Ok(SameSite::Lax),
                "strict" | "Strict" => Ok(SameSite::Strict),
                "none" | "None" => Ok(SameSite::None),
                _ => Err(" (expected lax, strict or none)".into()),
            })
        });
        let secure = self.optional(&s.secure, path, "secure", None, |d, t, p| {
            d.parsed(t, p, "a Secure setting", |s| match s {
                "auto" => Ok(None),
                "always" | "true" => Ok(Some(true)),
                "never" | "false" => Ok(Some(false)),
                _ => Err(" (expected auto, always or never)".into()),
            })
        });
        Some(StickyConfig {
            cookie: cookie?,
            ttl: ttl?,
            secrets: secrets?,
            path: cookie_path?,
            http_only: http_only?,
            same_site: same_site?,
            secure: secure?,
        })
    }

    /// One secret per line, blank lines skipped; relative to the config file.
    fn secret_file(&mut self, text: &Text, path: &str) -> Option<Vec<Vec<u8>>> {
        let file = self.base.join(&text.value);
        match std::fs::read_to_string(&file) {
            Ok(content) => {
                let secrets: Vec<Vec<u8>> = content
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.as_bytes().to_vec())
                    .collect();
                if secrets.is_empty() {
                    let message = format!("{} holds no secret", file.display());
                    self.problem(Some(text.pos), path, message);
                    return None;
                }
                Some(secrets)
            }
            Err(e) => {
                let message = format!("cannot read {}: {e}", file.display());
                self.problem(Some(text.pos), path, message);
                None
            }
        }
    }

    fn health_check(&mut self, h: &raw::HealthCheck, path: &str) -> Option<HealthCheckConfig> {
        let check_path = self.optional(&h.path, path, "path", "/".to_string(), |d, t, p| {
            d.parsed(t, p, "a path", |s| {
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
        let interval = self.optional(
            &h.interval,
            path,
            "interval",
            Duration::from_secs(2),
            Self::positive,
        );
        let timeout = self.optional(
            &h.timeout,
            path,
            "timeout",
            Duration::from_secs(1),
            Self::positive,
        );
        let threshold = |d: &mut Self, t: &Text, p: &str| d.integer(t, p, 1, 100).map(|v| v as u32);
        let healthy_threshold = self.optional(
            &h.healthy_threshold,
            path,
            "healthy_threshold",
            2,
            threshold,
        );
        let unhealthy_threshold = self.optional(
            &h.unhealthy_threshold,
            path,
            "unhealthy_threshold",
            3,
            threshold,
        );
        let expected_status = self.optional(
            &h.expected_status,
            path,
            "expected_status",
            vec![(200, 399)],
            Self::status_ranges,
        );
        let host = self.optional(&h.host, path, "host", None, |_, t, _| {
            Some(Some(t.value.clone()))
        });
        let initial_healthy = self.optional(&h.initial, path, "initial", true, |d, t, p| {
            d.parsed(t, p, "an initial state", |s| match s {
                "healthy" => Ok(true),
                "unhealthy" => Ok(false),
                _ => Err(" (expected healthy or unhealthy)".into()),
            })
        });
        Some(HealthCheckConfig {
            path: check_path?,
            interval: interval?,
            timeout: timeout?,
            healthy_threshold: healthy_threshold?,
            unhealthy_threshold: unhealthy_threshold?,
            expected_status: expected_status?,
            host: host?,
            initial_healthy: initial_healthy?,
        })
    }

    /// `"200-399"`, `"200,204,300-302"`.
    fn status_ranges(&mut self, text: &Text, path: &str) -> Option<Vec<(u16, u16)>> {
        self.parsed(text, path, "a list of status ranges", |s| {
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

    fn passive(&mut self, h: &raw::Passive, path: &str) -> Option<PassiveConfig> {
        let consecutive_failures = self.optional(
            &h.consecutive_failures,
            path,
            "consecutive_failures",
            5,
            |d, t, p| d.integer(t, p, 1, 1000).map(|v| v as u32),
        );
        let ejection = self.optional(
            &h.ejection,
            path,
            "ejection",
            Duration::from_secs(30),
            Self::duration,
        );
        let max_ejection = self.optional(
            &h.max_ejection,
            path,
            "max_ejection",
            Duration::from_secs(300),
            Self::duration,
        );
        let max_ejected_percent = self.optional(
            &h.max_ejected_percent,
            path,
            "max_ejected_percent",
            50,
            |d, t, p| d.integer(t, p, 0, 100).map(|v| v as u32),
        );
        Some(PassiveConfig {
            consecutive_failures: consecutive_failures?,
            ejection: ejection?,
            max_ejection: max_ejection?,
            max_ejected_percent: max_ejected_percent?,
        })
    }

    fn retry_budget(&mut self, r: &raw::RetryBudget, path: &str) -> Option<RetryBudgetConfig> {
        let ratio = self.optional(&r.ratio, path, "ratio", 0.2, |d, t, p| {
            d.parsed(t, p, "a ratio", |s| match s.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(" from 0 to 1, such as 0.2".into()),
            })
        });
        let min_per_second =
            self.optional(&r.min_per_second, path, "min_per_second", 10, |d, t, p| {
                d.integer(t, p, 0, 100_000).map(|v| v as u32)
            });
        Some(RetryBudgetConfig {
            ratio: ratio?,
            min_per_second: min_per_second?,
        })
    }

    /// The backends written as addresses, and those given by name.
    fn backends(
        &mut self,
        list: &At<Vec<At<raw::Backend>>>,
        path: &str,
    ) -> Option<(Vec<BackendConfig>, Vec<NamedBackend>)> {
        if list.value.is_empty() {
            self.problem(Some(list.pos), path, "at least one backend is needed");
            return None;
        }
        let mut out: Vec<BackendConfig> = Vec::with_capacity(list.value.len());
        let mut names: Vec<NamedBackend> = Vec::new();
        let mut ok = true;
        for (i, item) in list.value.iter().enumerate() {
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

    fn backend(&mut self, item: &At<raw::Backend>, path: &str) -> Option<Entry> {
        let b = match &item.value {
            raw::Backend::Address(text) => {
                let text = At {
                    value: text.clone(),
                    pos: item.pos,
                };
                return self.backend_address(&text, path, 1, None);
            }
            raw::Backend::Map(b) => b,
        };
        let weight = self.optional(&b.weight, path, "weight", 1, |d, t, p| {
            d.integer(t, p, 1, MAX_WEIGHT.into()).map(|w| w as u32)
        });
        let max_connections = self.optional(
            &b.max_connections,
            path,
            "max_connections",
            None,
            Self::max_connections,
        );
        let entry = match (&b.address, &b.srv) {
            (Some(t), None) => self.backend_address(
                t,
                &join(path, "address"),
                weight.unwrap_or(1),
                max_connections.flatten(),
            ),
            (None, Some(t)) => {
                let name = t.value.trim().trim_end_matches('.').to_string();
                if is_host_name(&name) {
                    Some(Entry::Name(NamedBackend {
                        source: name.clone(),
                        lookup: Lookup::Srv(name),
                        weight: 1,
                        max_connections: max_connections.flatten(),
                    }))
                } else {
                    let p = join(path, "srv");
                    self.problem(Some(t.pos), &p, format!("`{name}` is not a DNS name"));
                    None
                }
            }
            (Some(_), Some(t)) => {
                let p = join(path, "srv");
                self.problem(Some(t.pos), &p, "give either address or srv, not both");
                None
            }
            (None, None) => {
                self.problem(
                    Some(item.pos),
                    path,
                    "missing key `address` (or `srv`, for DNS SRV records)",
                );
                None
            }
        };
        weight?;
        max_connections?;
        entry
    }

    /// `ip:port` (a backend), or `host:port` (a name whose addresses are backends).
    fn backend_address(
        &mut self,
        text: &Text,
        path: &str,
        weight: u32,
        max_connections: Option<usize>,
    ) -> Option<Entry> {
        let written = text.value.trim();
        if let Ok(addr) = written.parse::<SocketAddr>() {
            return Some(Entry::Address(BackendConfig {
                address: written.to_string(),
                weight,
                max_connections,
                ..BackendConfig::at(addr)
            }));
        }
        let host_port = written
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|&(host, port)| port != 0 && is_host_name(host));
        let Some((host, port)) = host_port else {
            self.problem(
                Some(text.pos),
                path,
                format!(
                    "`{written}` is not an address (expected ip:port or host:port, such as \
                     127.0.0.1:9001 or app.internal:9001)"
                ),
            );
            return None;
        };
        Some(Entry::Name(NamedBackend {
            source: written.to_string(),
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
        list: &At<Vec<At<raw::Listener>>>,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<Vec<ListenerConfig>> {
        if list.value.is_empty() {
            self.problem(Some(list.pos), path, "at least one listener is needed");
            return None;
        }
        let mut out: Vec<ListenerConfig> = Vec::new();
        let mut ok = true;
        for (i, item) in list.value.iter().enumerate() {
            let path = format!("{path}[{i}]");
            match self.listener(item, &path, upstreams) {
                // A listener is known by its bind, across reloads too: two at
                // port 0 would be two sockets with one listener's routes.
                Some(l) if out.iter().any(|o| o.bind == l.bind) => {
                    let why = if l.bind.port() == 0 {
                        format!("{} is also an earlier listener's bind: give each its own port, as a listener is known by its bind", l.bind)
                    } else {
                        format!("{} is bound by an earlier listener", l.bind)
                    };
                    self.problem(Some(item.pos), &format!("{path}.bind"), why);
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
        item: &At<raw::Listener>,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<ListenerConfig> {
        let (pos, l) = (item.pos, &item.value);
        let bind = self
            .required(&l.bind, path, "bind", pos)
            .and_then(|t| self.socket_addr(t, &join(path, "bind")));
        let name = self.optional(&l.name, path, "name", None, |_, t, _| {
            Some(Some(t.value.clone()))
        });
        let redirect_https = self.optional(
            &l.redirect_https,
            path,
            "redirect_https",
            false,
            Self::boolean,
        );
        let proxy_protocol = self.optional(
            &l.proxy_protocol,
            path,
            "proxy_protocol",
            false,
            Self::boolean,
        );
        let trusted_proxies = match &l.trusted_proxies {
            Some(list) => self.each(&list.value, &join(path, "trusted_proxies"), |d, t, p| {
                d.parsed(t, p, "an IP address or CIDR range", |s| {
                    s.parse::<ipnet::IpNet>()
                        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| " (such as 10.0.0.0/8 or 192.0.2.7)".into())
                })
            }),
            None => Some(Vec::new()),
        };
        // A listener that only redirects to https needs no routes.
        let routes = match (redirect_https, &l.routes) {
            (_, Some(routes)) => self.routes(routes, &join(path, "routes"), upstreams),
            (Some(true), None) => Some(Vec::new()),
            _ => {
                // Reports the missing key.
                self.required(&l.routes, path, "routes", pos);
                None
            }
        };
        let tls = match &l.tls {
            Some(t) => self.tls(t, &join(path, "tls")).map(Some),
            None => Some(None),
        };
        let max_header_bytes = self.optional(
            &l.max_header_bytes,
            path,
            "max_header_bytes",
            65536,
            |d, t, p| d.integer(t, p, 1024, 1 << 20).map(|v| v as usize),
        );
        let max_connections = self.optional(
            &l.max_connections,
            path,
            "max_connections",
            None,
            Self::max_connections,
        );
        let minute = Duration::from_secs(60);
        let (mut header_read, mut keepalive, mut body, mut send) = (
            Some(Duration::from_secs(10)),
            Some(minute),
            Some(minute),
            Some(minute),
        );
        if let Some(t) = &l.timeouts {
            let p = join(path, "timeouts");
            let t = &t.value;
            header_read = self.optional(
                &t.header_read,
                &p,
                "header_read",
                Duration::from_secs(10),
                Self::duration,
            );
            keepalive = self.optional(&t.keepalive, &p, "keepalive", minute, Self::duration);
            body = self.optional(&t.body, &p, "body", minute, Self::duration);
            send = self.optional(&t.send, &p, "send", minute, Self::duration);
        }
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
            proxy_protocol: proxy_protocol?,
            trusted_proxies: trusted_proxies?.into(),
            max_connections: max_connections?,
        })
    }

    fn tls(&mut self, t: &At<raw::ListenerTls>, path: &str) -> Option<TlsConfig> {
        let certificates = self
            .required(&t.value.certificates, path, "certificates", t.pos)
            .and_then(|list| {
                let p = join(path, "certificates");
                if list.value.is_empty() {
                    self.problem(Some(list.pos), &p, "at least one certificate is needed");
                    return None;
                }
                let mut out = Vec::new();
                for (i, item) in list.value.iter().enumerate() {
                    let p = format!("{p}[{i}]");
                    let cert = self.required(&item.value.cert, &p, "cert", item.pos);
                    let key = self.required(&item.value.key, &p, "key", item.pos);
                    let (Some(cert), Some(key)) = (cert, key) else {
                        continue;
                    };
                    let (cert_file, key_file) =
                        (self.base.join(&cert.value), self.base.join(&key.value));
                    match crate::tls::load(&cert_file, &key_file) {
                        Ok(loaded) => out.push(loaded),
                        Err(why) => self.problem(Some(cert.pos), &p, why),
                    }
                }
                (out.len() == list.value.len()).then_some(out)
            });
        let handshake_timeout = self.optional(
            &t.value.handshake_timeout,
            path,
            "handshake_timeout",
            Duration::from_secs(10),
            Self::duration,
        );
        let protocols = match &t.value.protocols {
            Some(list) => self.tls_protocols(list, &join(path, "protocols")),
            None => Some(crate::tls::Protocol::ALL.to_vec()),
        };
        Some(TlsConfig {
            certificates: certificates?,
            handshake_timeout: handshake_timeout?,
            protocols: protocols?,
        })
    }

    fn tls_protocols(
        &mut self,
        list: &At<Vec<Text>>,
        path: &str,
    ) -> Option<Vec<crate::tls::Protocol>> {
        use crate::tls::Protocol;
        let protocols = self.each(&list.value, path, |d, item, p| {
            d.parsed(item, p, "a TLS version bascule offers", |s| {
                Protocol::ALL
                    .into_iter()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| format!(" ({})", Protocol::ALL.map(Protocol::name).join(", ")))
            })
        })?;
        if protocols.is_empty() {
            self.problem(Some(list.pos), path, "at least one protocol is needed");
            return None;
        }
        Some(protocols)
    }

    fn backend_tls(&mut self, t: &At<raw::BackendTls>, path: &str) -> Option<BackendTls> {
        let (pos, t) = (t.pos, &t.value);
        let ca = self.optional(&t.ca, path, "ca", None, |_, t, _| {
            Some(Some(t.value.clone()))
        });
        let server_name = self.optional(&t.server_name, path, "server_name", None, |_, t, _| {
            Some(Some(t.value.clone()))
        });
        let insecure = self.optional(
            &t.insecure_skip_verify,
            path,
            "insecure_skip_verify",
            false,
            Self::boolean,
        );
        let http2 = self.optional(&t.http2, path, "http2", true, Self::boolean);
        let (ca, server_name, insecure, http2) = (ca?, server_name?, insecure?, http2?);
        if insecure && ca.is_some() {
            self.problem(
                Some(pos),
                path,
                "`ca` and `insecure_skip_verify: true` contradict each other",
            );
            return None;
        }
        let ca = ca.map(|c| self.base.join(c));
        match BackendTls::new(ca.as_deref(), server_name, insecure, http2) {
            Ok(tls) => Some(tls),
            Err(why) => {
                self.problem(Some(pos), path, why);
                None
            }
        }
    }

    fn routes(
        &mut self,
        list: &At<Vec<At<raw::Route>>>,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<Vec<RouteConfig>> {
        if list.value.is_empty() {
            self.problem(Some(list.pos), path, "at least one route is needed");
            return None;
        }
        let mut out = Vec::with_capacity(list.value.len());
        for (i, item) in list.value.iter().enumerate() {
            out.push(self.route(item, &format!("{path}[{i}]"), upstreams));
        }
        out.into_iter().collect()
    }

    fn route(
        &mut self,
        item: &At<raw::Route>,
        path: &str,
        upstreams: Option<&Vec<String>>,
    ) -> Option<RouteConfig> {
        let r = &item.value;
        let upstream = self
            .required(&r.upstream, path, "upstream", item.pos)
            .and_then(|t| {
                let name = t.value.clone();
                match upstreams {
                    Some(known) if !known.contains(&name) => {
                        self.problem(
                            Some(t.pos),
                            &join(path, "upstream"),
                            format!("no upstream named `{name}` (known: {})", known.join(", ")),
                        );
                        None
                    }
                    _ => Some(name),
                }
            });
        let cache = self.optional(&r.cache, path, "cache", None, |d, t, p| {
            let name = t.value.clone();
            if d.cache_names.contains(&name) {
                return Some(Some(name));
            }
            let known = if d.cache_names.is_empty() {
                "none: add it under `caches`".to_string()
            } else {
                d.cache_names.join(", ")
            };
            d.problem(
                Some(t.pos),
                p,
                format!("no cache named `{name}` (known: {known})"),
            );
            None
        });
        let mut host = Some(None);
        let mut path_prefix = Some(None);
        let mut methods = Some(Vec::new());
        if let Some(m) = &r.matches {
            let p = join(path, "match");
            let m = &m.value;
            host = self.optional(&m.host, &p, "host", None, |d, t, p| d.host(t, p).map(Some));
            path_prefix = self.optional(&m.path_prefix, &p, "path_prefix", None, |d, t, p| {
                d.parsed(t, p, "a path prefix", |s| {
                    if s.starts_with('/') {
                        Ok(Some(s.to_string()))
                    } else {
                        Err(" (it must start with /)".into())
                    }
                })
            });
            methods = match &m.methods {
                Some(list) => self.methods(&list.value, &join(&p, "methods")),
                None => Some(Vec::new()),
            };
        }
        Some(RouteConfig {
            host: host?,
            path_prefix: path_prefix?,
            methods: methods?,
            upstream: upstream?,
            cache: cache?,
        })
    }

    fn host(&mut self, text: &Text, path: &str) -> Option<HostMatch> {
        self.parsed(text, path, "a host name", |s| {
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

    fn methods(&mut self, items: &[Text], path: &str) -> Option<Vec<Method>> {
        self.each(items, path, |d, item, p| {
            d.parsed(item, p, "an HTTP method", |s| {
                if !s.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(" (methods are upper case, such as GET)".into());
                }
                Method::from_bytes(s.as_bytes()).map_err(|_| String::new())
            })
        })
    }
}
