//! The edge cache: a route's GET and HEAD requests answered from stored
//! responses, as a layer on the route's stack (`layer.rs`).
//!
//! `policy` says what is stored and for how long (RFC 9111, RFC 5861);
//! `store` is the memory tier; `key` makes the keys. This module holds what
//! ties them together for one configured cache: the fills in flight (one
//! backend request per key however many clients miss on it at once), the
//! record of recent purges that fences them (a purge made while a fill is in
//! flight wins: that fill is served, not stored), and the figures.

pub mod key;
pub mod layer;
pub mod policy;
pub mod redis;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use metrics::Counter;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::metrics as m;
use redis::RedisTier;
use store::{Entry, Store};

/// Purges remembered for the fills in flight. A fill that began before the
/// oldest of them is not stored: what it missed is not known.
const PURGES_KEPT: usize = 1024;

/// One configured cache, shared by every route that names it and carried
/// across reloads that keep its memory bound.
pub struct Cache {
    pub config: Arc<CacheConfig>,
    pub store: Store,
    /// The shared tier, when the config gives one.
    pub redis: Option<RedisTier>,
    fills: Mutex<HashMap<String, watch::Sender<Option<Filled>>>>,
    purges: Mutex<PurgeLog>,
    pub stats: Stats,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.config.name)
            .finish()
    }
}

/// How a fill ended, for the requests that waited on it.
#[derive(Clone, Debug)]
pub enum Filled {
    Stored(Arc<Entry>),
    /// Not stored: each waiter goes to the backend itself.
    Passed,
}

/// A request that missed: it fills the key, or waits for the fill in flight.
pub enum Join {
    Lead(Fill),
    Wait(watch::Receiver<Option<Filled>>),
}

/// What a purge drops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purge {
    Keys(Vec<String>),
    Tags(Vec<String>),
    All,
}

impl Purge {
    /// A purge request's JSON: `{"urls": [...]}`, `{"tags": [...]}` or `{"all": true}`.
    pub fn from_json(body: &[u8]) -> Result<Purge, String> {
        match Purge::from_message(body)? {
            (purge, None) => Ok(purge),
            (_, Some(_)) => Err("unknown key `from`".into()),
        }
    }

    /// A message on the invalidation channel: a purge request's JSON, and the
    /// instance that sent it (`from`) when it was one of bascule's.
    pub fn from_message(body: &[u8]) -> Result<(Purge, Option<String>), String> {
        const EXPECTED: &str = r#"expected {"urls": ["http://host/path", ...]}, {"tags": ["tag", ...]} or {"all": true}"#;
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("not JSON ({e}); {EXPECTED}"))?;
        let Some(mut map) = value.as_object().cloned() else {
            return Err(EXPECTED.into());
        };
        let from = match map.remove("from") {
            Some(serde_json::Value::String(f)) => Some(f),
            Some(_) => return Err("`from` must be a string".into()),
            None => None,
        };
        if map.len() != 1 {
            return Err(EXPECTED.into());
        }
        let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let purge = match map.iter().next() {
            Some((k, v)) if k == "urls" => {
                let urls = strings(v).ok_or(EXPECTED)?;
                let keys = urls
                    .iter()
                    .map(|u| {
                        key::of_url(u).ok_or_else(|| format!("`{u}` is not an http or https URL"))
                    })
                    .collect::<Result<_, _>>()?;
                Purge::Keys(keys)
            }
            Some((k, v)) if k == "tags" => Purge::Tags(strings(v).ok_or(EXPECTED)?),
            Some((k, v)) if k == "all" && v == &serde_json::Value::Bool(true) => Purge::All,
            _ => return Err(EXPECTED.into()),
        };
        Ok((purge, from))
    }

    /// The message that tells other instances of this purge. Keys go as the
    /// URLs they are (`http://host/path`), which `key::of_url` reads back.
    pub fn to_json(&self, from: Option<&str>) -> String {
        let mut v = match self {
            Purge::Keys(keys) => serde_json::json!({ "urls": keys }),
            Purge::Tags(tags) => serde_json::json!({ "tags": tags }),
            Purge::All => serde_json::json!({ "all": true }),
        };
        if let Some(from) = from {
            v["from"] = serde_json::Value::String(from.to_string());
        }
        v.to_string()
    }

    fn covers(&self, key: &str, tags: &[String]) -> bool {
        match self {
            Purge::Keys(keys) => keys.iter().any(|k| k == key),
            Purge::Tags(purged) => purged.iter().any(|t| tags.contains(t)),
            Purge::All => true,
        }
    }
}

/// Who asked for a purge, for `bascule_cache_invalidations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Admin,
    PubSub,
    UnsafeMethod,
}

#[derive(Debug, Default)]
struct PurgeLog {
    /// Purges made so far.
    generation: u64,
    recent: VecDeque<(u64, Purge)>,
}

impl Cache {
    pub fn new(config: Arc<CacheConfig>) -> Arc<Self> {
        Arc::new_cyclic(|cache| Cache {
            store: Store::new(config.memory),
            stats: Stats::new(&config.name),
            redis: config
                .redis
                .as_ref()
                .and_then(|r| RedisTier::start(&config.name, r, cache.clone())),
            config,
            fills: Mutex::new(HashMap::new()),
            purges: Mutex::new(PurgeLog::default()),
        })
    }

    pub fn defaults(&self) -> policy::Defaults {
        policy::Defaults {
            ttl: self.config.default_ttl,
            stale_while_revalidate: self.config.stale_while_revalidate,
            stale_if_error: self.config.stale_if_error,
        }
    }

    /// Leads the fill of `key`, or joins the one in flight.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut fills = lock(&self.fills);
        if let Some(tx) = fills.get(key) {
            return Join::Wait(tx.subscribe());
        }
        fills.insert(key.to_string(), watch::channel(None).0);
        drop(fills);
        Join::Lead(Fill {
            cache: self.clone(),
            key: key.to_string(),
            generation: lock(&self.purges).generation,
            redis_generation: None,
            done: false,
        })
    }

    /// Leads the fill of `key` if none is in flight (a background refresh).
    pub fn lead(self: &Arc<Self>, key: &str) -> Option<Fill> {
        match self.join(key) {
            Join::Lead(fill) => Some(fill),
            Join::Wait(_) => None,
        }
    }

    /// Drops what `purge` covers from the memory tier, and fences the fills
    /// in flight against it; says how many entries went.
    pub fn purge(&self, purge: Purge, source: Source) -> usize {
        let dropped = self.purge_local(&purge);
        self.stats.invalidations[source as usize].increment(1);
        dropped
    }

    /// As `purge`, then in Redis and, broadcast, in every other instance.
    pub async fn purge_everywhere(&self, purge: Purge, source: Source) -> usize {
        let dropped = self.purge(purge.clone(), source);
        if let Some(tier) = &self.redis {
            tier.purge(&purge, true).await;
        }
        dropped
    }

    fn purge_local(&self, purge: &Purge) -> usize {
        let mut log = lock(&self.purges);
        log.generation += 1;
        let generation = log.generation;
        if log.recent.len() == PURGES_KEPT {
            log.recent.pop_front();
        }
        log.recent.push_back((generation, purge.clone()));
        // Under the log's lock, so that a fill's check and store do not fall between.
        let dropped = match purge {
            Purge::Keys(keys) => keys.iter().map(|k| self.store.remove(k)).sum(),
            Purge::Tags(tags) => self.store.remove_tagged(tags),
            Purge::All => self.store.clear(),
        };
        drop(log);
        dropped
    }

    fn finish(&self, key: &str, filled: Filled) {
        if let Some(tx) = lock(&self.fills).remove(key) {
            tx.send_replace(Some(filled));
        }
    }
}

/// The right to fill one key, held by the request that went to the backend
/// for it. Dropped without `store`, its waiters go to the backend themselves.
pub struct Fill {
    cache: Arc<Cache>,
    key: String,
    /// The purges made when it began.
    generation: u64,
    /// Redis's count of purges when it began: without it, not written there.
    pub redis_generation: Option<String>,
    done: bool,
}

impl Fill {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Keeps an entry read from the Redis tier in memory (unless a purge since
    /// the fill began covers it), without writing it back there.
    pub fn promote(mut self, entry: Arc<Entry>) -> bool {
        self.redis_generation = None;
        self.store(entry)
    }

    /// Stores `entry` unless a purge since the fill began covers it, and
    /// hands it to the waiters either way; says whether it was stored.
    pub fn store(mut self, entry: Arc<Entry>) -> bool {
        let log = lock(&self.cache.purges);
        let missed = log
            .recent
            .front()
            .is_some_and(|(oldest, _)| *oldest > self.generation + 1);
        let purged = log
            .recent
            .iter()
            .filter(|(g, _)| *g > self.generation)
            .any(|(_, p)| p.covers(&self.key, &entry.tags));
        let stored = !missed && !purged;
        if stored {
            self.cache.store.insert(self.key.clone(), entry.clone());
        }
        drop(log);
        if let (true, Some(generation)) = (stored, self.redis_generation.take()) {
            let (cache, key, entry) = (self.cache.clone(), self.key.clone(), entry.clone());
            tokio::spawn(async move {
                if let Some(tier) = &cache.redis {
                    tier.put(&key, &entry, &generation).await;
                }
            });
        }
        self.done = true;
        self.cache.finish(&self.key, Filled::Stored(entry));
        stored
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.done {
            self.cache.finish(&self.key, Filled::Passed);
        }
    }
}

/// How a GET or HEAD request was served, for the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    HitMemory,
    HitRedis,
    Stale,
    Miss,
    Bypass,
}

const OUTCOMES: [&str; 5] = ["hit_memory", "hit_redis", "stale", "miss", "bypass"];

impl Outcome {
    /// As the metrics and the access log name it.
    pub fn name(self) -> &'static str {
        OUTCOMES[self as usize]
    }
}
const SOURCES: [&str; 3] = ["admin", "pubsub", "unsafe_method"];

/// The cache's counters: the metrics, and the hit ratio since start and over
/// the last minute for `/status`.
pub struct Stats {
    requests: [Counter; 5],
    invalidations: [Counter; 3],
    lookups: AtomicU64,
    hits: AtomicU64,
    /// Per second of the last minute: (the second, lookups, hits).
    seconds: [(AtomicU64, AtomicU64, AtomicU64); 60],
}

impl Stats {
    fn new(name: &str) -> Self {
        m::handle();
        let requests = OUTCOMES.map(
            |r| metrics::counter!(m::CACHE_REQUESTS, "cache" => name.to_string(), "result" => r),
        );
        let invalidations = SOURCES.map(|s| {
            metrics::counter!(m::CACHE_INVALIDATIONS, "cache" => name.to_string(), "source" => s)
        });
        Stats {
            requests,
            invalidations,
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            seconds: std::array::from_fn(|_| Default::default()),
        }
    }

    pub fn count(&self, outcome: Outcome) {
        self.count_at(outcome, Instant::now());
    }

    /// Counts an outcome decided at `at` (a request's start, which a hit has
    /// already read: the clock is not read again).
    pub fn count_at(&self, outcome: Outcome, at: Instant) {
        self.requests[outcome as usize].increment(1);
        let hit = matches!(outcome, Outcome::HitMemory | Outcome::HitRedis);
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let now = second_of(at);
        let (second, lookups, hits) = &self.seconds[(now % 60) as usize];
        // The first request of a new second resets its slot; a request racing
        // it may be lost from the minute's figure, never from the totals.
        // Read first: every other request of the second writes nothing here.
        if second.load(Ordering::Relaxed) != now && second.swap(now, Ordering::Relaxed) != now {
            lookups.store(0, Ordering::Relaxed);
            hits.store(0, Ordering::Relaxed);
        }
        lookups.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
            hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hits over lookups since start, and over the last minute.
    pub fn hit_ratios(&self) -> (f64, f64) {
        let ratio = |h: u64, l: u64| if l == 0 { 0.0 } else { h as f64 / l as f64 };
        let now = second_of(Instant::now());
        let (mut l, mut h) = (0, 0);
        for (second, lookups, hits) in &self.seconds {
            if now.saturating_sub(second.load(Ordering::Relaxed)) < 60 {
                l += lookups.load(Ordering::Relaxed);
                h += hits.load(Ordering::Relaxed);
            }
        }
        (
            ratio(
                self.hits.load(Ordering::Relaxed),
                self.lookups.load(Ordering::Relaxed),
            ),
            ratio(h, l),
        )
    }
}

/// Seconds on a process-wide monotonic clock, from 1 (0: a slot never used).
fn second_of(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_secs() + 1
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
