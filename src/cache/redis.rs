//! The Redis tier: entries shared by every instance, tags as Redis sets, and
//! purges broadcast on `bascule:invalidate:{cache}`.
//!
//! Keys, for cache `C`: `bascule:C:e:{key}` holds an entry (its latest
//! variant), `bascule:C:t:{tag}` the set of entry keys with that tag, and
//! `bascule:C:gen` a count of purges. A fill reads the count when it begins
//! and writes only if it is unchanged (one Lua script), so a purge made
//! anywhere while the fill was in flight wins in Redis as it does in memory.
//!
//! Every call has the cache's `timeout`; past it, or with Redis down, the
//! request goes on as a miss. The connections are made and remade on a thread
//! of the tier's own, so a request never waits for a connect.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, AGE, HOST};
use http::{Method, StatusCode};
use redis::aio::ConnectionManager;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::policy::{self, Asked, Lifetime};
use super::store::{put_field, Entry, CACHE_STATUS};
use super::{Cache, Purge, Source};
use crate::config::CacheRedisConfig;

/// Writes a fill if no purge was made since it began: KEYS = entry, count,
/// then its tags' sets; ARGV = the count read, the entry, its TTL in ms.
const STORE: &str = r"
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1
";

/// Counts a purge and drops what it covers: KEYS = the count, then entry keys
/// (`keys`) or tag sets (`tags`); ARGV = the mode, and for `all` the prefix.
const PURGE: &str = r"
redis.call('INCR', KEYS[1])
local n = 0
if ARGV[1] == 'keys' then
  for i = 2, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
elseif ARGV[1] == 'tags' then
  for i = 2, #KEYS do
    local members = redis.call('SMEMBERS', KEYS[i])
    for _, k in ipairs(members) do n = n + redis.call('DEL', k) end
    redis.call('DEL', KEYS[i])
  end
else
  local cursor = '0'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', ARGV[2] .. '*', 'COUNT', 1000)
    cursor = r[1]
    for _, k in ipairs(r[2]) do
      if k ~= KEYS[1] then n = n + redis.call('DEL', k) end
    end
  until cursor == '0'
end
return n
";

pub struct RedisTier {
    /// `bascule:{cache}:`
    prefix: String,
    channel: String,
    timeout: Duration,
    /// Set while connected.
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    /// Tells this instance's own broadcasts from others'.
    instance: String,
    store: redis::Script,
    purge: redis::Script,
    _stop: DropGuard,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// What a fill read from Redis when it began.
#[derive(Debug, Default)]
pub struct Began {
    /// The entry stored for the key, if any.
    pub entry: Option<Entry>,
    /// The purge count, when Redis answered: without it the fill is not written there.
    pub generation: Option<String>,
}

impl RedisTier {
    /// Connects (and keeps reconnecting) on a thread of its own, subscribed
    /// to the invalidation channel; stops when dropped.
    pub fn start(name: &str, config: &CacheRedisConfig, cache: Weak<Cache>) -> Option<Self> {
        let client = match redis::Client::open(config.url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(cache = name, "the Redis URL cannot be used: {e}");
                return None;
            }
        };
        let stop = CancellationToken::new();
        let conn = Arc::new(ArcSwapOption::empty());
        let tier = RedisTier {
            prefix: format!("bascule:{name}:"),
            channel: format!("bascule:invalidate:{name}"),
            timeout: config.timeout,
            conn: conn.clone(),
            instance: instance_id(),
            store: redis::Script::new(STORE),
            purge: redis::Script::new(PURGE),
            _stop: stop.clone().drop_guard(),
        };
        let (channel, instance, name) = (
            tier.channel.clone(),
            tier.instance.clone(),
            name.to_string(),
        );
        let timeout = config.timeout;
        let spawned = std::thread::Builder::new()
            .name(format!("redis-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!("cannot start the Redis thread: {e}"),
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = keep_connected(client, conn, channel, instance, name, timeout, cache) => {}
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the Redis thread: {e}");
            return None;
        }
        Some(tier)
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    fn entry_key(&self, key: &str) -> String {
        format!("{}e:{key}", self.prefix)
    }

    fn generation_key(&self) -> String {
        format!("{}gen", self.prefix)
    }

    /// The stored entry for `key` and the purge count, as a fill begins.
    pub async fn begin(&self, key: &str) -> Began {
        let Some(mut conn) = self.conn() else {
            return Began::default();
        };
        let keys = [self.entry_key(key), self.generation_key()];
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let call = mget.query_async::<(Option<Vec<u8>>, Option<String>)>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((blob, generation))) => Began {
                entry: blob.and_then(|b| decode(&b)),
                generation: Some(generation.unwrap_or_else(|| "0".into())),
            },
            Ok(Err(e)) => {
                tracing::debug!("Redis read failed: {e}");
                Began::default()
            }
            Err(_) => Began::default(),
        }
    }

    /// Writes a fill unless a purge was made since it began, with its TTL
    /// (plus up to 5%, so that a burst of fills does not expire at once).
    pub async fn put(&self, key: &str, entry: &Entry, generation: &str) {
        let Some(mut conn) = self.conn() else {
            return;
        };
        let ttl = entry.keep();
        let jitter = ttl.mul_f64(jitter_fraction() * 0.05);
        let ttl_ms = (ttl + jitter).as_millis().max(1) as u64;
        let mut call = self.store.prepare_invoke();
        call.key(self.entry_key(key)).key(self.generation_key());
        for tag in &entry.tags {
            call.key(format!("{}t:{tag}", self.prefix));
        }
        call.arg(generation).arg(encode(entry)).arg(ttl_ms);
        let invoked = call.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, invoked).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!("Redis write failed: {e}"),
            Err(_) => tracing::debug!("Redis write timed out"),
        }
    }

    /// Drops what `purge` covers in Redis, and when `broadcast`, tells every
    /// instance on the channel. Redis down: logged; the memory tiers of the
    /// others flush when their channel comes back.
    pub async fn purge(&self, purge: &Purge, broadcast: bool) {
        let Some(mut conn) = self.conn() else {
            return tracing::warn!("Redis is unreachable: the purge reached this instance only");
        };
        let mut call = self.purge.prepare_invoke();
        call.key(self.generation_key());
        match purge {
            Purge::Keys(keys) => {
                call.arg("keys");
                for k in keys {
                    call.key(self.entry_key(k));
                }
            }
            Purge::Tags(tags) => {
                call.arg("tags");
                for t in tags {
                    call.key(format!("{}t:{t}", self.prefix));
                }
            }
            Purge::All => {
                call.arg("all").arg(format!("{}e:", self.prefix));
            }
        }
        let mut pipe = redis::pipe();
        let message = purge.to_json(Some(&self.instance));
        let done = async {
            call.invoke_async::<i64>(&mut conn).await?;
            if broadcast {
                pipe.cmd("PUBLISH").arg(&self.channel).arg(message);
                pipe.query_async::<()>(&mut conn).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), done).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the purge failed in Redis: {e}"),
            Err(_) => tracing::warn!("the purge timed out in Redis"),
        }
    }
}

/// Connects, subscribes, and applies what comes on the channel; when the
/// subscription was lost, flushes the memory tier once it is back.
async fn keep_connected(
    client: redis::Client,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    channel: String,
    instance: String,
    name: String,
    timeout: Duration,
    cache: Weak<Cache>,
) {
    use futures_util::StreamExt;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(timeout.max(Duration::from_millis(500)))
        .set_response_timeout(timeout.max(Duration::from_millis(500)))
        .set_number_of_retries(1);
    let mut lost = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if conn.load().is_none() {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(c) => conn.store(Some(Arc::new(c))),
                Err(e) => tracing::debug!(cache = %name, "Redis connect failed: {e}"),
            }
        }
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match subscribed.await {
            Ok(pubsub) => {
                backoff = Duration::from_millis(100);
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                if lost {
                    // What was purged meanwhile is not known: start again.
                    let dropped = strong.purge_local(&Purge::All);
                    tracing::info!(cache = %name, dropped, "Redis is back: the memory tier was flushed");
                } else {
                    tracing::info!(cache = %name, "Redis connected");
                }
                drop(strong);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(cache) = cache.upgrade() else { return };
                    match Purge::from_message(msg.get_payload_bytes()) {
                        Ok((_, Some(from))) if from == instance => {}
                        Ok((purge, from)) => {
                            // Published by an application: this instance clears Redis
                            // too, first, so that a miss here cannot find it there.
                            if from.is_none() {
                                if let Some(tier) = &cache.redis {
                                    tier.purge(&purge, false).await;
                                }
                            }
                            cache.purge(purge, Source::PubSub);
                        }
                        Err(why) => {
                            tracing::warn!(cache = %name, "ignored a message on {channel}: {why}")
                        }
                    }
                }
                tracing::warn!(cache = %name, "the Redis subscription was lost; reconnecting");
                lost = true;
            }
            Err(e) => {
                if !lost {
                    tracing::warn!(cache = %name, "Redis unreachable ({e}); serving without it");
                }
                lost = true;
                conn.store(None);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn instance_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

/// A number in [0, 1), different for each call.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What begins an entry as Redis holds it, and says which form it has: one
/// this build cannot read (an older form, during an upgrade) is a miss, and
/// the fill that follows writes it again.
const FORM: &[u8; 4] = b"bsc2";

/// An entry as Redis holds it: `FORM`, then three parts each after its length
/// (4 bytes, big-endian): `Meta` as JSON; the response's fields as HTTP/1
/// writes them (`name: value` lines); the request's `Host` and the fields the
/// response varies on, likewise. Then the body. The policy is made again from
/// these when the entry is read (`policy::rebuild`): kept whole, it held every
/// field of the request that filled it (its cookies, its credentials), and
/// reading it back was most of a Redis hit's cost.
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    status: u16,
    method: String,
    uri: String,
    tags: Vec<String>,
    age_ms: u64,
    fresh_ms: u64,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    must_revalidate: bool,
    stored_at_ms: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn put_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

pub fn encode(e: &Entry) -> Vec<u8> {
    let meta = Meta {
        status: e.status.as_u16(),
        method: e.asked.method.to_string(),
        uri: e.asked.uri.to_string(),
        tags: e.tags.clone(),
        age_ms: millis(e.lifetime.age),
        fresh_ms: millis(e.lifetime.fresh),
        stale_while_revalidate_ms: millis(e.lifetime.stale_while_revalidate),
        stale_if_error_ms: millis(e.lifetime.stale_if_error),
        must_revalidate: e.lifetime.must_revalidate,
        stored_at_ms: millis(e.stored_at.duration_since(UNIX_EPOCH).unwrap_or_default()),
    };
    let mut response = Vec::with_capacity(e.encoded.lines[1].len() + 64);
    for (name, value) in &e.headers {
        // Placeholders that each reply sets.
        if name != AGE && name != CACHE_STATUS {
            put_field(&mut response, name, value);
        }
    }
    let mut request = Vec::new();
    if let Some(host) = &e.asked.host {
        put_field(&mut request, &HOST, host);
    }
    for (name, value) in &e.vary {
        if let Some(value) = value {
            put_field(&mut request, name, value);
        }
    }
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out =
        Vec::with_capacity(16 + meta.len() + response.len() + request.len() + e.body.len());
    out.extend_from_slice(FORM);
    put_part(&mut out, &meta);
    put_part(&mut out, &response);
    put_part(&mut out, &request);
    out.extend_from_slice(&e.body);
    out
}

/// The part at the front of `blob` and what follows it.
fn take_part(blob: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    Some((blob.get(4..4 + len)?, blob.get(4 + len..)?))
}

/// Fields written by `put_field`; `None` if one is not a field.
fn fields(lines: &[u8]) -> Option<HeaderMap> {
    // Sized once: growing the map as it fills costs more than filling it.
    let mut map = HeaderMap::with_capacity(lines.iter().filter(|&&b| b == b'\n').count());
    for line in lines.split(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\r") else {
            // Only what follows the last line's end.
            if line.is_empty() {
                break;
            }
            return None;
        };
        let colon = line.iter().position(|&b| b == b':')?;
        let value = line[colon + 1..].strip_prefix(b" ")?;
        map.append(
            HeaderName::from_bytes(&line[..colon]).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        );
    }
    Some(map)
}

/// The entry, aged by the time it spent in Redis; `None` if it cannot be read.
pub fn decode(blob: &[u8]) -> Option<Entry> {
    let blob = blob.strip_prefix(FORM)?;
    let (meta, blob) = take_part(blob)?;
    let (response, blob) = take_part(blob)?;
    let (request, body) = take_part(blob)?;
    let meta: Meta = serde_json::from_slice(meta).ok()?;
    let status = StatusCode::from_u16(meta.status).ok()?;
    let headers = fields(response)?;
    let request = fields(request)?;
    let asked = Asked {
        method: Method::from_bytes(meta.method.as_bytes()).ok()?,
        uri: meta.uri.parse().ok()?,
        host: request.get(HOST).cloned(),
    };
    let vary = policy::vary_values(&headers, &request);
    let stored_at = UNIX_EPOCH + Duration::from_millis(meta.stored_at_ms);
    let in_redis = SystemTime::now()
        .duration_since(stored_at)
        .unwrap_or_default();
    // Aged by its time in Redis, it is as if stored now.
    Some(Entry::new(
        status,
        headers,
        Bytes::copy_from_slice(body),
        vary,
        meta.tags,
        asked,
        Lifetime {
            age: Duration::from_millis(meta.age_ms) + in_redis,
            fresh: Duration::from_millis(meta.fresh_ms),
            stale_while_revalidate: Duration::from_millis(meta.stale_while_revalidate_ms),
            stale_if_error: Duration::from_millis(meta.stale_if_error_ms),
            must_revalidate: meta.must_revalidate,
        },
        SystemTime::now(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Defaults;

    /// An entry stored as the layer stores one, for this request and response.
    fn stored(req: &[(&str, &str)], resp: &[(&str, &str)]) -> Entry {
        let mut r = http::Request::get("/p?q=1");
        for (k, v) in req {
            r = r.header(*k, *v);
        }
        let client = r.body(()).unwrap().into_parts().0;
        let mut s = http::Response::builder().status(200);
        for (k, v) in resp {
            s = s.header(*k, *v);
        }
        let head = s.body(()).unwrap().into_parts().0;
        let now = SystemTime::now();
        let lifetime = policy::storable(&client, &head, &Defaults::default(), now).unwrap();
        Entry::new(
            head.status,
            head.headers.clone(),
            Bytes::from_static(b"the body"),
            policy::vary_values(&head.headers, &client.headers),
            policy::tags(&head.headers),
            Asked::of(&client),
            lifetime,
            now,
        )
    }

    fn request(fields: &[(&str, &str)]) -> http::request::Parts {
        let mut r = http::Request::get("/p?q=1");
        for (k, v) in fields {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap().into_parts().0
    }

    #[test]
    fn an_entry_read_back_is_the_entry_stored() {
        let e = stored(
            &[
                ("host", "shop.test:8080"),
                ("accept-language", "fr"),
                ("user-agent", "u"),
            ],
            &[
                ("cache-control", "public, max-age=600, stale-if-error=30"),
                ("vary", "Accept-Language, Accept-Encoding"),
                ("etag", "\"v1\""),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("cache-tag", "product-42 list"),
                ("x-odd", " leading space and: colon"),
                ("age", "20"),
            ],
        );
        let back = decode(&encode(&e)).expect("read back");
        assert_eq!(back.status, e.status);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.body, e.body);
        assert_eq!(back.vary, e.vary);
        assert_eq!(back.tags, e.tags);
        assert_eq!(back.asked, e.asked);
        assert_eq!(back.lifetime.fresh, e.lifetime.fresh);
        assert_eq!(back.lifetime.stale_if_error, e.lifetime.stale_if_error);
        assert!(back.lifetime.age >= e.lifetime.age);
        assert!(back.lifetime.age < e.lifetime.age + Duration::from_secs(1));
        // The policy made again judges requests as the one made when it was stored.
        let now = SystemTime::now();
        assert_eq!(back.policy.age(now).as_secs(), e.policy.age(now).as_secs());
        let asks: [&[(&str, &str)]; 7] = [
            &[("host", "shop.test:8080"), ("accept-language", "fr")],
            &[("host", "shop.test:8080"), ("accept-language", "de")],
            &[("host", "other.test"), ("accept-language", "fr")],
            &[
                ("host", "shop.test:8080"),
                ("accept-language", "fr"),
                ("cache-control", "max-age=10"),
            ],
            &[
                ("host", "shop.test:8080"),
                ("accept-language", "fr"),
                ("cache-control", "max-age=60"),
            ],
            &[
                ("host", "shop.test:8080"),
                ("accept-language", "fr"),
                ("cache-control", "min-fresh=700"),
            ],
            &[
                ("host", "shop.test:8080"),
                ("accept-language", "fr"),
                ("pragma", "no-cache"),
            ],
        ];
        let judged: Vec<bool> = asks
            .iter()
            .map(|a| policy::satisfies(&e.policy, &request(a), now))
            .collect();
        assert_eq!(judged, [true, false, false, false, true, false, false]);
        for (ask, expected) in asks.iter().zip(judged) {
            assert_eq!(
                policy::satisfies(&back.policy, &request(ask), now),
                expected,
                "{ask:?}"
            );
        }
    }

    #[test]
    fn redis_keeps_nothing_of_the_request_but_what_the_policy_compares() {
        let e = stored(
            &[
                ("host", "shop.test"),
                ("authorization", "Bearer secret-token"),
                ("cookie", "session=secret-session"),
                ("accept-language", "fr"),
            ],
            &[
                ("cache-control", "public, max-age=60"),
                ("vary", "accept-language"),
            ],
        );
        let blob = encode(&e);
        let text = String::from_utf8_lossy(&blob);
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("host: shop.test\r\naccept-language: fr\r\n"),
            "{text}"
        );
        // An entry stored with credentials is still told apart by what it varies on.
        let back = decode(&blob).unwrap();
        let now = SystemTime::now();
        let fr = [
            ("host", "shop.test"),
            ("accept-language", "fr"),
            ("cache-control", "max-age=30"),
        ];
        assert!(policy::satisfies(&back.policy, &request(&fr), now));
    }

    #[test]
    fn a_blob_in_another_form_is_a_miss() {
        let e = stored(&[("host", "a")], &[("cache-control", "max-age=60")]);
        let blob = encode(&e);
        assert!(decode(&blob).is_some());
        assert!(decode(&blob[..blob.len() - e.body.len() - 3]).is_none());
        assert!(decode(b"\x00\x00\x00\x02{}body").is_none());
        let mut other = blob.clone();
        other[3] = b'1';
        assert!(decode(&other).is_none());
    }
}
