//! The file's shape as serde types, and the JSON Schema derived from them
//! (`bascule schema`), for editors: a YAML language server pointed at it
//! validates and completes `bascule.yaml`.
//!
//! The shape only: what a value means, its bounds across fields and the
//! files it names are checked by `decode`, which reports every problem with
//! its position. `tests/example_config.rs` holds the two to the same keys.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;

/// The JSON Schema (draft 2020-12) of the config file, pretty-printed.
pub fn json() -> String {
    let schema = schemars::schema_for!(File);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema is JSON");
    text.push('\n');
    text
}

/// A bascule configuration file.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "bascule configuration")]
pub struct File {
    /// Where clients connect, and how their requests are routed.
    #[schemars(length(min = 1))]
    pub listeners: Vec<Listener>,
    /// The groups of backends routes send requests to, by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Edge caches by name; a route uses one with `cache:`.
    pub caches: Option<BTreeMap<String, Cache>>,
    /// The admin listener: status page, /status, /metrics, /explain, runtime changes.
    pub admin: Option<Admin>,
    /// Where backend names are looked up. Default: /etc/resolv.conf and /etc/hosts.
    pub resolver: Option<Resolver>,
    /// How long SIGTERM waits for requests and tunnels in flight. Default 30s.
    pub shutdown_timeout: Option<Duration>,
    /// `off` (default), `stderr`, or a file path (relative to the config file).
    pub access_log: Option<AccessLog>,
    /// Default `combined`.
    pub access_log_format: Option<AccessLogFormat>,
    /// Event-loop threads. Default: one per CPU the process may use.
    #[schemars(range(min = 1, max = 1024))]
    pub workers: Option<u32>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Defaults to the bind address.
    pub name: Option<String>,
    /// ip:port; [::1]:8080 for IPv6; port 0 picks a free port.
    pub bind: SocketAddress,
    /// First match wins; a route without `match` catches all.
    pub routes: Option<Vec<Route>>,
    pub timeouts: Option<ListenerTimeouts>,
    /// A larger request head gets 431. Default 65536.
    #[schemars(range(min = 1024, max = 1_048_576))]
    pub max_header_bytes: Option<u32>,
    /// Client connections served at once, for all workers; the rest wait in the backlog.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections: Option<u64>,
    /// Terminate TLS here.
    pub tls: Option<ListenerTls>,
    /// Answer every request with a 301 to https://HOST/PATH (no routes needed).
    pub redirect_https: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// A client must send a whole request head within this. Default 10s.
    pub header_read: Option<Duration>,
    /// An idle client connection is closed after this. Default 60s.
    pub keepalive: Option<Duration>,
    /// Longest wait for the next bytes of a request body. Default 60s.
    pub body: Option<Duration>,
    /// Longest a reply waits on a client that reads none of it. Default 60s.
    pub send: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Chosen by SNI; the first is the default.
    #[schemars(length(min = 1))]
    pub certificates: Vec<Certificate>,
    /// Default 10s.
    pub handshake_timeout: Option<Duration>,
    /// Default both.
    #[schemars(length(min = 1))]
    pub protocols: Option<Vec<TlsProtocol>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM certificate chain, relative to the config file.
    pub cert: String,
    /// PEM private key, relative to the config file.
    pub key: String,
}

#[derive(Deserialize, JsonSchema)]
pub enum TlsProtocol {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Every condition given must hold.
    #[serde(rename = "match")]
    pub matches: Option<RouteMatch>,
    /// The name of an upstream.
    pub upstream: String,
    /// GET and HEAD served from this cache.
    pub cache: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact, or "*.example.com" (any name ending in .example.com).
    pub host: Option<String>,
    /// A plain prefix of the path.
    #[schemars(regex(pattern = r"^/"))]
    pub path_prefix: Option<String>,
    /// Upper case, such as GET.
    pub methods: Option<Vec<String>>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub balance: Option<Balance>,
    /// consistent_hash: client_ip | path | header:NAME | cookie:NAME | query:NAME.
    #[schemars(regex(pattern = r"^(client_ip|path|(header|cookie|query):.+)$"))]
    pub hash_key: Option<String>,
    /// consistent_hash: no backend above this times its share of requests in flight.
    #[schemars(range(min = 1.0))]
    pub hash_balance_factor: Option<f64>,
    /// `ip:port`, `host:port` (every address it resolves to), or a map.
    #[schemars(length(min = 1))]
    pub backends: Vec<Backend>,
    pub discovery: Option<Discovery>,
    pub timeouts: Option<UpstreamTimeouts>,
    /// Idle connections kept per backend. Default 64.
    #[schemars(range(max = 100_000))]
    pub max_idle_connections: Option<u32>,
    pub health_check: Option<HealthCheck>,
    pub passive: Option<Passive>,
    /// Other backends tried when it is safe. Default 2.
    #[schemars(range(max = 10))]
    pub retries: Option<u32>,
    pub retry_budget: Option<RetryBudget>,
    /// When all are down, try them anyway instead of 503. Default false.
    pub fail_open: Option<bool>,
    /// A returning or added backend ramps up over this window.
    pub slow_start: Option<Duration>,
    /// Cookie affinity, on top of any balance.
    pub sticky: Option<Sticky>,
    /// TLS to the backends.
    pub tls: Option<BackendTls>,
    /// Requests in flight at once per backend.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections: Option<u64>,
    /// Where requests wait when every backend they may use is full.
    pub queue: Option<Queue>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    ConsistentHash,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Backend {
    /// `ip:port`, or `host:port`.
    Address(String),
    Map(BackendMap),
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendMap {
    /// `ip:port`, or `host:port`; give this or `srv`.
    pub address: Option<String>,
    /// A DNS SRV name: targets, ports and weights from its records.
    pub srv: Option<String>,
    /// Default 1.
    #[schemars(range(min = 1, max = 1000))]
    pub weight: Option<u32>,
    /// Its own limit, over the upstream's.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Names are looked up again this often (sooner with a shorter TTL). Default 5s.
    pub interval: Option<Duration>,
    /// A name answering with no address keeps its last set this long. Default 30s.
    pub hold: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// TCP connect to a backend. Default 5s.
    pub connect: Option<Duration>,
    /// From the request sent to the response head. Default 60s.
    pub response: Option<Duration>,
    /// An unused pooled connection is closed after this. Default 90s.
    pub idle: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Default /.
    pub path: Option<String>,
    /// The probes' Host field. Default: the backend's address.
    pub host: Option<String>,
    /// Default 2s.
    pub interval: Option<Duration>,
    /// Default 1s.
    pub timeout: Option<Duration>,
    /// Consecutive passes to bring a down backend up. Default 2.
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures to take an up backend down. Default 3.
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: Option<u32>,
    /// Such as 200-399 (the default), 200,204 or 200-299,304.
    pub expected_status: Option<StatusRanges>,
    /// Default healthy.
    pub initial: Option<Initial>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Initial {
    Healthy,
    Unhealthy,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    /// Default 5.
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: Option<u32>,
    /// Doubles on each ejection in a row, up to max_ejection. Default 30s.
    pub ejection: Option<Duration>,
    /// Default 5m.
    pub max_ejection: Option<Duration>,
    /// Default 50.
    #[schemars(range(max = 100))]
    pub max_ejected_percent: Option<u32>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries may add this share of the requests. Default 0.2.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: Option<f64>,
    /// And at least this many a second. Default 10.
    #[schemars(range(max = 100_000))]
    pub min_per_second: Option<u32>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// Default bascule_affinity.
    pub cookie: Option<String>,
    /// The cookie's Max-Age, and how long it is honoured. Default 1h.
    pub ttl: Option<Duration>,
    /// Instances sharing it honour each other's cookies.
    pub secret: Option<String>,
    /// Instead of secret: one per line; the first signs, all verify.
    pub secret_file: Option<String>,
    /// Default /.
    pub path: Option<String>,
    /// Default true.
    pub http_only: Option<bool>,
    /// Default lax.
    pub same_site: Option<SameSite>,
    /// Default auto: on TLS listeners.
    pub secure: Option<Secure>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Secure {
    Auto,
    Always,
    Never,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM CA certificates; without it, the system's roots.
    pub ca: Option<String>,
    /// Checked and sent as SNI. Default: each backend's host.
    pub server_name: Option<String>,
    /// HTTP/2 by ALPN where the backend picks it. Default true.
    pub http2: Option<bool>,
    /// Accept any certificate (test rigs only).
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    /// Requests waiting at once; one more gets 503 at once. Default 1000.
    #[schemars(range(max = 10_000_000))]
    pub size: Option<u64>,
    /// A request waiting longer gets 503. Default 5s.
    pub timeout: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// The memory tier's bound: bodies, heads and keys.
    pub memory: Size,
    /// A larger response streams through, not stored. Default 8MiB.
    pub max_object: Option<Size>,
    /// Freshness for a storable response that states none. Default 0s: not stored.
    pub default_ttl: Option<Duration>,
    /// For responses without their own stale-while-revalidate. Default 0s.
    pub stale_while_revalidate: Option<Duration>,
    /// For responses without their own stale-if-error. Default 0s.
    pub stale_if_error: Option<Duration>,
    /// A tier shared by every instance, whose purges reach them all.
    pub redis: Option<CacheRedis>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheRedis {
    /// Such as redis://127.0.0.1:6379/0.
    #[schemars(regex(pattern = r"^rediss?://"))]
    pub url: String,
    /// A slower Redis call counts as a miss. Default 50ms.
    pub timeout: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Default 127.0.0.1:9901.
    pub bind: Option<SocketAddress>,
    /// Every admin request but GET /metrics needs Authorization: Bearer TOKEN.
    pub token: Option<String>,
    /// Instead of token: the file's content, trimmed.
    pub token_file: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolver {
    /// ip:port of DNS servers to ask instead of the system's (then /etc/hosts is not read).
    pub nameservers: Option<Vec<SocketAddress>>,
    /// One lookup's limit. Default 2s.
    pub timeout: Option<Duration>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    Combined,
    Json,
}

/// Scalars whose text is read by `decode`; described here by their form.
macro_rules! text_schema {
    ($name:ident, $doc:literal, $schema:tt) => {
        #[doc = $doc]
        #[derive(Deserialize)]
        pub struct $name(pub serde_json::Value);

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                let mut schema = json_schema!($schema);
                schema.insert("description".into(), $doc.into());
                schema
            }
        }
    };
}

text_schema!(
    Duration,
    "A duration with its unit: 250ms, 2s, 5m, 1h.",
    { "type": "string", "pattern": "^\\s*([0-9]+(\\.[0-9]+)?\\s*[a-zµ]+\\s*)+$" }
);
text_schema!(
    Size,
    "Bytes, or a whole number with KiB, MiB or GiB: 256MiB.",
    { "anyOf": [
        { "type": "integer", "minimum": 0 },
        { "type": "string", "pattern": "^[0-9]+\\s*(B|KiB|MiB|GiB)?$" }
    ] }
);
text_schema!(
    SocketAddress,
    "ip:port, such as 127.0.0.1:8080 or [::1]:8080.",
    { "type": "string", "pattern": "^(\\[[0-9a-fA-F:.]+\\]|[0-9.]+):[0-9]{1,5}$" }
);
text_schema!(
    StatusRanges,
    "Statuses and ranges, such as 200-399 or 200,204.",
    { "anyOf": [
        { "type": "integer", "minimum": 100, "maximum": 599 },
        { "type": "string", "pattern": "^\\s*[0-9]{3}(\\s*-\\s*[0-9]{3})?(\\s*,\\s*[0-9]{3}(\\s*-\\s*[0-9]{3})?)*\\s*$" }
    ] }
);
text_schema!(
    AccessLog,
    "off, stderr, or a file path relative to the config file.",
    { "anyOf": [ { "type": "string", "minLength": 1 }, { "const": false } ] }
);
