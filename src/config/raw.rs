//! The file's shape as serde types: read with every value's position
//! (serde-saphyr's `Spanned`), checked and turned into a `Config` by
//! `validate`, and described by the JSON Schema that `bascule schema` prints
//! for editors.
//!
//! Scalars are kept as their text (`Text`), whatever YAML would make of
//! them, so that a value of the wrong kind (`weight: many`) is a problem
//! reported with every other, not the end of reading.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::Pos;

/// The JSON Schema (draft 2020-12) of the config file, pretty-printed.
pub fn schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).expect("a schema is JSON");
    text.push('\n');
    text
}

/// The JSON Schema of the config file.
pub fn schema() -> Schema {
    schemars::schema_for!(File)
}

/// A value and where it starts in the file.
#[derive(Debug, Clone)]
pub struct At<T> {
    pub value: T,
    pub pos: Pos,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(At {
            value: spanned.value,
            pos: Pos {
                line: spanned.referenced.line() as usize,
                column: spanned.referenced.column() as usize,
            },
        })
    }
}

impl<T: JsonSchema> JsonSchema for At<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A scalar's text, as written (`off`, `0.20` and `8080` stay as they are).
pub type Text = At<String>;

/// A map's entries in file order (a key given twice is reported by `shape`).
#[derive(Debug)]
pub struct Entries<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ordered<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Ordered<T> {
            type Value = Entries<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<T>, A::Error> {
                let mut out = Vec::new();
                while let Some((key, value)) = map.next_entry()? {
                    out.push((key, value));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Ordered(PhantomData))
    }
}

impl<T: JsonSchema> JsonSchema for Entries<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Map_of_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        BTreeMap::<String, T>::json_schema(generator)
    }
}

/// A bascule configuration file.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[schemars(title = "bascule configuration")]
pub struct File {
    /// Where clients connect, and how their requests are routed.
    #[schemars(with = "Vec<Listener>", length(min = 1))]
    pub listeners: Option<At<Vec<At<Listener>>>>,
    /// The groups of backends routes send requests to, by name.
    #[schemars(with = "BTreeMap<String, Upstream>")]
    pub upstreams: Option<At<Entries<At<Upstream>>>>,
    /// Edge caches by name; a route uses one with `cache:`.
    pub caches: Option<At<Entries<At<Cache>>>>,
    /// The admin listener: status page, /status, /metrics, /explain, runtime changes.
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "Option<Admin>")]
    pub admin: Option<At<Option<Admin>>>,
    /// Where backend names are looked up. Default: /etc/resolv.conf and /etc/hosts.
    pub resolver: Option<At<Resolver>>,
    /// How long SIGTERM waits for requests and tunnels in flight. Default 30s.
    #[schemars(with = "Option<Duration>")]
    pub shutdown_timeout: Option<Text>,
    /// `off` (default), `stderr`, or a file path (relative to the config file).
    #[schemars(with = "Option<AccessLog>")]
    pub access_log: Option<Text>,
    /// Default `combined`.
    #[schemars(with = "Option<AccessLogFormat>")]
    pub access_log_format: Option<Text>,
    /// Event-loop threads. Default: one per CPU the process may use.
    #[schemars(range(min = 1, max = 1024))]
    #[schemars(with = "Option<u32>")]
    pub workers: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Listener {
    /// Defaults to the bind address.
    #[schemars(with = "Option<String>")]
    pub name: Option<Text>,
    /// ip:port; [::1]:8080 for IPv6; port 0 picks a free port.
    #[schemars(with = "SocketAddress")]
    pub bind: Option<Text>,
    /// First match wins; a route without `match` catches all.
    pub routes: Option<At<Vec<At<Route>>>>,
    pub timeouts: Option<At<ListenerTimeouts>>,
    /// A larger request head gets 431. Default 65536.
    #[schemars(range(min = 1024, max = 1_048_576))]
    #[schemars(with = "Option<u32>")]
    pub max_header_bytes: Option<Text>,
    /// Client connections served at once, for all workers; the rest wait in the backlog.
    #[schemars(range(min = 1, max = 10_000_000))]
    #[schemars(with = "Option<u64>")]
    pub max_connections: Option<Text>,
    /// Terminate TLS here.
    pub tls: Option<At<ListenerTls>>,
    /// Answer every request with a 301 to https://HOST/PATH (no routes needed).
    #[schemars(with = "Option<bool>")]
    pub redirect_https: Option<Text>,
    /// Expect a PROXY protocol header (v1 or v2) on every connection; its client
    /// address is the one used. Connections without one are closed. Default false.
    #[schemars(with = "Option<bool>")]
    pub proxy_protocol: Option<Text>,
    /// Peers (addresses or CIDR ranges) whose X-Forwarded-For is believed: the
    /// client is the rightmost address in it not among them.
    #[schemars(with = "Option<Vec<String>>")]
    pub trusted_proxies: Option<At<Vec<Text>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// A client must send a whole request head within this. Default 10s.
    #[schemars(with = "Option<Duration>")]
    pub header_read: Option<Text>,
    /// An idle client connection is closed after this. Default 60s.
    #[schemars(with = "Option<Duration>")]
    pub keepalive: Option<Text>,
    /// Longest wait for the next bytes of a request body. Default 60s.
    #[schemars(with = "Option<Duration>")]
    pub body: Option<Text>,
    /// Longest a reply waits on a client that reads none of it. Default 60s.
    #[schemars(with = "Option<Duration>")]
    pub send: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ListenerTls {
    /// Chosen by SNI; the first is the default.
    #[schemars(with = "Vec<Certificate>", length(min = 1))]
    pub certificates: Option<At<Vec<At<Certificate>>>>,
    /// Default 10s.
    #[schemars(with = "Option<Duration>")]
    pub handshake_timeout: Option<Text>,
    /// Default both.
    #[schemars(length(min = 1))]
    #[schemars(with = "Option<Vec<TlsProtocol>>")]
    pub protocols: Option<At<Vec<Text>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Certificate {
    /// PEM certificate chain, relative to the config file.
    #[schemars(with = "String")]
    pub cert: Option<Text>,
    /// PEM private key, relative to the config file.
    #[schemars(with = "String")]
    pub key: Option<Text>,
}

#[derive(JsonSchema)]
pub enum TlsProtocol {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Route {
    /// Every condition given must hold.
    #[serde(rename = "match")]
    pub matches: Option<At<RouteMatch>>,
    /// The name of an upstream.
    #[schemars(with = "String")]
    pub upstream: Option<Text>,
    /// GET and HEAD served from this cache.
    #[schemars(with = "Option<String>")]
    pub cache: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact, or "*.example.com" (any name ending in .example.com).
    #[schemars(with = "Option<String>")]
    pub host: Option<Text>,
    /// A plain prefix of the path.
    #[schemars(regex(pattern = r"^/"))]
    #[schemars(with = "Option<String>")]
    pub path_prefix: Option<Text>,
    /// Upper case, such as GET.
    #[schemars(with = "Option<Vec<String>>")]
    pub methods: Option<At<Vec<Text>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Upstream {
    #[schemars(with = "Option<Balance>")]
    pub balance: Option<Text>,
    /// consistent_hash: client_ip | path | header:NAME | cookie:NAME | query:NAME.
    #[schemars(regex(pattern = r"^(client_ip|path|(header|cookie|query):.+)$"))]
    #[schemars(with = "Option<String>")]
    pub hash_key: Option<Text>,
    /// consistent_hash: no backend above this times its share of requests in flight.
    #[schemars(range(min = 1.0))]
    #[schemars(with = "Option<f64>")]
    pub hash_balance_factor: Option<Text>,
    /// `ip:port`, `host:port` (every address it resolves to), or a map.
    #[schemars(with = "Vec<Backend>", length(min = 1))]
    pub backends: Option<At<Vec<At<Backend>>>>,
    pub discovery: Option<At<Discovery>>,
    pub timeouts: Option<At<UpstreamTimeouts>>,
    /// Idle connections kept per backend. Default 64.
    #[schemars(range(max = 100_000))]
    #[schemars(with = "Option<u32>")]
    pub max_idle_connections: Option<Text>,
    pub health_check: Option<At<HealthCheck>>,
    pub passive: Option<At<Passive>>,
    /// Other backends tried when it is safe. Default 2.
    #[schemars(range(max = 10))]
    #[schemars(with = "Option<u32>")]
    pub retries: Option<Text>,
    pub retry_budget: Option<At<RetryBudget>>,
    /// When all are down, try them anyway instead of 503. Default false.
    #[schemars(with = "Option<bool>")]
    pub fail_open: Option<Text>,
    /// A returning or added backend ramps up over this window.
    #[schemars(with = "Option<Duration>")]
    pub slow_start: Option<Text>,
    /// Cookie affinity, on top of any balance.
    pub sticky: Option<At<Sticky>>,
    /// TLS to the backends.
    pub tls: Option<At<BackendTls>>,
    /// Requests in flight at once per backend.
    #[schemars(range(min = 1, max = 10_000_000))]
    #[schemars(with = "Option<u64>")]
    pub max_connections: Option<Text>,
    /// Where requests wait when every backend they may use is full.
    pub queue: Option<At<Queue>>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    ConsistentHash,
}

/// `ip:port` or `host:port`, or a map.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub enum Backend {
    /// `ip:port`, or `host:port`.
    Address(String),
    Map(BackendMap),
}

/// By hand: serde's untagged enums buffer the value, which loses positions.
impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = Backend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or a map")
            }
            fn visit_str<E>(self, v: &str) -> Result<Backend, E> {
                Ok(Backend::Address(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Backend, E> {
                Ok(Backend::Address(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Backend, E> {
                Ok(Backend::Address(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Backend, E> {
                Ok(Backend::Address(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Backend, E> {
                Ok(Backend::Address(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Backend, A::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(map);
                BackendMap::deserialize(d).map(Backend::Map)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BackendMap {
    /// `ip:port`, or `host:port`; give this or `srv`.
    #[schemars(with = "Option<String>")]
    pub address: Option<Text>,
    /// A DNS SRV name: targets, ports and weights from its records.
    #[schemars(with = "Option<String>")]
    pub srv: Option<Text>,
    /// Default 1.
    #[schemars(range(min = 1, max = 1000))]
    #[schemars(with = "Option<u32>")]
    pub weight: Option<Text>,
    /// Its own limit, over the upstream's.
    #[schemars(range(min = 1, max = 10_000_000))]
    #[schemars(with = "Option<u64>")]
    pub max_connections: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Discovery {
    /// Names are looked up again this often (sooner with a shorter TTL). Default 5s.
    #[schemars(with = "Option<Duration>")]
    pub interval: Option<Text>,
    /// A name answering with no address keeps its last set this long. Default 30s.
    #[schemars(with = "Option<Duration>")]
    pub hold: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// TCP connect to a backend. Default 5s.
    #[schemars(with = "Option<Duration>")]
    pub connect: Option<Text>,
    /// From the request sent to the response head. Default 60s.
    #[schemars(with = "Option<Duration>")]
    pub response: Option<Text>,
    /// An unused pooled connection is closed after this. Default 90s.
    #[schemars(with = "Option<Duration>")]
    pub idle: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct HealthCheck {
    /// Default /.
    #[schemars(with = "Option<String>")]
    pub path: Option<Text>,
    /// The probes' Host field. Default: the backend's address.
    #[schemars(with = "Option<String>")]
    pub host: Option<Text>,
    /// Default 2s.
    #[schemars(with = "Option<Duration>")]
    pub interval: Option<Text>,
    /// Default 1s.
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<Text>,
    /// Consecutive passes to bring a down backend up. Default 2.
    #[schemars(range(min = 1, max = 100))]
    #[schemars(with = "Option<u32>")]
    pub healthy_threshold: Option<Text>,
    /// Consecutive failures to take an up backend down. Default 3.
    #[schemars(range(min = 1, max = 100))]
    #[schemars(with = "Option<u32>")]
    pub unhealthy_threshold: Option<Text>,
    /// Such as 200-399 (the default), 200,204 or 200-299,304.
    #[schemars(with = "Option<StatusRanges>")]
    pub expected_status: Option<Text>,
    /// Default healthy.
    #[schemars(with = "Option<Initial>")]
    pub initial: Option<Text>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Initial {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Passive {
    /// Default 5.
    #[schemars(range(min = 1, max = 1000))]
    #[schemars(with = "Option<u32>")]
    pub consecutive_failures: Option<Text>,
    /// Doubles on each ejection in a row, up to max_ejection. Default 30s.
    #[schemars(with = "Option<Duration>")]
    pub ejection: Option<Text>,
    /// Default 5m.
    #[schemars(with = "Option<Duration>")]
    pub max_ejection: Option<Text>,
    /// Default 50.
    #[schemars(range(max = 100))]
    #[schemars(with = "Option<u32>")]
    pub max_ejected_percent: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries may add this share of the requests. Default 0.2.
    #[schemars(range(min = 0.0, max = 1.0))]
    #[schemars(with = "Option<f64>")]
    pub ratio: Option<Text>,
    /// And at least this many a second. Default 10.
    #[schemars(range(max = 100_000))]
    #[schemars(with = "Option<u32>")]
    pub min_per_second: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Sticky {
    /// Default bascule_affinity.
    #[schemars(with = "Option<String>")]
    pub cookie: Option<Text>,
    /// The cookie's Max-Age, and how long it is honoured. Default 1h.
    #[schemars(with = "Option<Duration>")]
    pub ttl: Option<Text>,
    /// Instances sharing it honour each other's cookies.
    #[schemars(with = "Option<String>")]
    pub secret: Option<Text>,
    /// Instead of secret: one per line; the first signs, all verify.
    #[schemars(with = "Option<String>")]
    pub secret_file: Option<Text>,
    /// Default /.
    #[schemars(with = "Option<String>")]
    pub path: Option<Text>,
    /// Default true.
    #[schemars(with = "Option<bool>")]
    pub http_only: Option<Text>,
    /// Default lax.
    #[schemars(with = "Option<SameSite>")]
    pub same_site: Option<Text>,
    /// Default auto: on TLS listeners.
    #[schemars(with = "Option<Secure>")]
    pub secure: Option<Text>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Secure {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM CA certificates; without it, the system's roots.
    #[schemars(with = "Option<String>")]
    pub ca: Option<Text>,
    /// Checked and sent as SNI. Default: each backend's host.
    #[schemars(with = "Option<String>")]
    pub server_name: Option<Text>,
    /// HTTP/2 by ALPN where the backend picks it. Default true.
    #[schemars(with = "Option<bool>")]
    pub http2: Option<Text>,
    /// Accept any certificate (test rigs only).
    #[schemars(with = "Option<bool>")]
    pub insecure_skip_verify: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Queue {
    /// Requests waiting at once; one more gets 503 at once. Default 1000.
    #[schemars(range(max = 10_000_000))]
    #[schemars(with = "Option<u64>")]
    pub size: Option<Text>,
    /// A request waiting longer gets 503. Default 5s.
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Cache {
    /// The memory tier's bound: bodies, heads and keys.
    #[schemars(with = "Size")]
    pub memory: Option<Text>,
    /// A larger response streams through, not stored. Default 8MiB.
    #[schemars(with = "Option<Size>")]
    pub max_object: Option<Text>,
    /// Freshness for a storable response that states none. Default 0s: not stored.
    #[schemars(with = "Option<Duration>")]
    pub default_ttl: Option<Text>,
    /// For responses without their own stale-while-revalidate. Default 0s.
    #[schemars(with = "Option<Duration>")]
    pub stale_while_revalidate: Option<Text>,
    /// For responses without their own stale-if-error. Default 0s.
    #[schemars(with = "Option<Duration>")]
    pub stale_if_error: Option<Text>,
    /// A tier shared by every instance, whose purges reach them all.
    pub redis: Option<At<CacheRedis>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CacheRedis {
    /// Such as redis://127.0.0.1:6379/0.
    #[schemars(regex(pattern = r"^rediss?://"))]
    #[schemars(with = "String")]
    pub url: Option<Text>,
    /// A slower Redis call counts as a miss. Default 50ms.
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Admin {
    /// Default 127.0.0.1:9901.
    #[schemars(with = "Option<SocketAddress>")]
    pub bind: Option<Text>,
    /// Every admin request but GET /metrics needs Authorization: Bearer TOKEN.
    #[schemars(with = "Option<String>")]
    pub token: Option<Text>,
    /// Instead of token: the file's content, trimmed.
    #[schemars(with = "Option<String>")]
    pub token_file: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Resolver {
    /// ip:port of DNS servers to ask instead of the system's (then /etc/hosts is not read).
    #[schemars(with = "Option<Vec<SocketAddress>>")]
    pub nameservers: Option<At<Vec<Text>>>,
    /// One lookup's limit. Default 2s.
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<Text>,
}

#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    Combined,
    Json,
}

/// The forms of scalars that `validate` reads from their text, for the schema.
macro_rules! text_schema {
    ($name:ident, $doc:literal, $schema:tt) => {
        #[doc = $doc]
        pub struct $name;

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

/// For a key whose presence matters even when its value is null (`admin:`
/// alone asks for the defaults): present is `Some`, whatever its value.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}
