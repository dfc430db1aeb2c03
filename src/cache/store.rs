//! The memory tier: stored responses by key, each key holding the variants
//! its response's `Vary` tells apart. Bounded by weight in bytes (body, head,
//! key and bookkeeping), shared by every worker of the process (moka), and
//! each key kept while one of its variants may still be served.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AGE, CONNECTION, CONTENT_LENGTH, DATE, ETAG, LAST_MODIFIED,
    TRANSFER_ENCODING,
};

use crate::http1::serve::EncodedFields;

/// RFC 9211's field, which every reply on a cached route carries.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
use http::StatusCode;
use http_cache_semantics::CachePolicy;

use super::policy::{self, owned_value, Asked, Lifetime};

/// Variants kept per key: past it, the oldest goes. A response that varies on a
/// field with many values (`User-Agent`) would otherwise fill the cache alone.
const MAX_VARIANTS: usize = 8;

/// What every entry weighs besides its fields and body: the entry, its policy
/// (parsed `Cache-Control`s, its request's fields), the cache's bookkeeping
/// and the allocator's rounding. Measured, not guessed: 20 000 replies of
/// 4 KiB with ten fields each grew the process by 9.2 KB apiece; with these
/// figures they weigh 8.9 KB.
const ENTRY_OVERHEAD: usize = 2048;

/// What a field weighs besides its name and value: its slots in the two maps
/// that hold it (the entry's and its policy's), about a hundred bytes each.
const FIELD_OVERHEAD: usize = 224;

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The backend's fields, with `Age` and `Cache-Status` as placeholders
    /// (each reply sets them).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request's values of the fields the response varies on.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    pub tags: Vec<String>,
    /// For requests with directives of their own, and revalidation.
    pub policy: CachePolicy,
    /// The request the policy was made for, which the Redis tier keeps in its stead.
    pub asked: Asked,
    pub lifetime: Lifetime,
    /// When it was stored, on the process's clock.
    stored: Instant,
    /// And on the wall clock, for the Redis tier's copy.
    pub stored_at: SystemTime,
    /// Its fields encoded for HTTP/1 once, but those each reply sets and
    /// those that frame the body.
    pub encoded: EncodedFields,
}

/// A field as HTTP/1 writes it: `name: value` and the line's end.
pub fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode(headers: &HeaderMap) -> EncodedFields {
    // Sized once: a few more fields than fit would make it grow twice.
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut lines = Vec::with_capacity(size);
    for (name, value) in headers {
        if [
            AGE,
            CACHE_STATUS,
            CONTENT_LENGTH,
            TRANSFER_ENCODING,
            CONNECTION,
        ]
        .contains(name)
        {
            continue;
        }
        put_field(&mut lines, name, value);
    }
    EncodedFields {
        lines: [Bytes::new(), Bytes::from(lines)],
        dated: headers.contains_key(DATE),
    }
}

/// Where an entry stands in its life, for a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale {
        /// Within `stale-while-revalidate`: served while one refresh runs.
        while_revalidating: bool,
        /// Within `stale-if-error`: served in place of a failure.
        if_error: bool,
    },
}

/// The fields in memory of their own, all values in one buffer: a value that
/// shares the buffer its message was read into (a backend connection's, some
/// kilobytes) would keep all of it for as long as the entry lives, unweighed.
fn owned(headers: &HeaderMap) -> HeaderMap {
    let mut all = BytesMut::with_capacity(headers.values().map(HeaderValue::len).sum());
    for v in headers.values() {
        all.extend_from_slice(v.as_bytes());
    }
    let mut all = all.freeze();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let bytes = all.split_to(value.len());
        let mut v = HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| owned_value(value));
        v.set_sensitive(value.is_sensitive());
        out.append(name.clone(), v);
    }
    out
}

impl Entry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
        tags: Vec<String>,
        asked: Asked,
        lifetime: Lifetime,
        stored_at: SystemTime,
    ) -> Self {
        let vary: Vec<_> = vary
            .into_iter()
            .map(|(n, v)| (n, v.as_ref().map(owned_value)))
            .collect();
        let (policy, mut headers) = policy::rebuild(
            &asked,
            &vary,
            status,
            owned(&headers),
            lifetime.age,
            stored_at,
        );
        // Made for each reply, in place: the placeholders come last, so that a
        // reply's copy of the map has their slots and never grows.
        headers.remove(AGE);
        headers.remove(CACHE_STATUS);
        headers.insert(AGE, HeaderValue::from_static("0"));
        headers.insert(CACHE_STATUS, HeaderValue::from_static("bascule"));
        let encoded = encode(&headers);
        Entry {
            encoded,
            status,
            headers,
            body,
            vary,
            tags,
            policy,
            asked,
            lifetime,
            stored: Instant::now(),
            stored_at,
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        self.lifetime.age + now.saturating_duration_since(self.stored)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        let age = self.age(now);
        let l = &self.lifetime;
        if age < l.fresh {
            return Freshness::Fresh;
        }
        let stale_for = age - l.fresh;
        Freshness::Stale {
            while_revalidating: !l.must_revalidate && stale_for < l.stale_while_revalidate,
            if_error: !l.must_revalidate && stale_for < l.stale_if_error,
        }
    }

    /// Whether a request with these fields selects this variant.
    pub fn matches(&self, request: &HeaderMap) -> bool {
        self.vary.iter().all(|(n, v)| request.get(n) == v.as_ref())
    }

    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(ETAG) || self.headers.contains_key(LAST_MODIFIED)
    }

    /// How long after it was stored it may still be of use: fresh, then
    /// stale within its windows (a `must-revalidate` one too: while it is
    /// kept, a backend that fails to revalidate it gets a 504, not its
    /// failure passed on), and one lifetime more when it can be revalidated
    /// (a 304 costs the backend less than the whole response).
    pub fn keep(&self) -> Duration {
        let l = &self.lifetime;
        let fresh_left = l.fresh.saturating_sub(l.age);
        let stale = l.stale_while_revalidate.max(l.stale_if_error);
        let revalidate = if self.has_validator() {
            l.fresh
        } else {
            Duration::ZERO
        };
        fresh_left + stale.max(revalidate)
    }

    fn weight(&self) -> usize {
        let fields: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + FIELD_OVERHEAD)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, HeaderValue::len) + 32)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        let encoded = self.encoded.lines[1].len();
        ENTRY_OVERHEAD + self.body.len() + fields + encoded + vary + tags
    }
}

/// A key's variants, and how long the key is kept.
#[derive(Debug)]
pub struct Variants {
    entries: Vec<Arc<Entry>>,
    keep_until: Instant,
    weight: u32,
}

impl Variants {
    fn new(key: &str, entries: Vec<Arc<Entry>>) -> Self {
        let keep_until = entries
            .iter()
            .map(|e| e.stored + e.keep())
            .max()
            .unwrap_or_else(Instant::now);
        let weight = key.len() + entries.iter().map(|e| e.weight()).sum::<usize>();
        Variants {
            entries,
            keep_until,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
        }
    }
}

struct KeepUntil;

impl moka::Expiry<String, Arc<Variants>> for KeepUntil {
    fn expire_after_create(&self, _: &String, v: &Arc<Variants>, now: Instant) -> Option<Duration> {
        Some(v.keep_until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Arc<Variants>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep_until.saturating_duration_since(now))
    }
}

pub struct Store {
    map: moka::sync::Cache<String, Arc<Variants>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.map.entry_count())
            .finish()
    }
}

impl Store {
    /// A store holding at most `bytes`, by its entries' weights.
    pub fn new(bytes: u64) -> Self {
        let map = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|_: &String, v: &Arc<Variants>| v.weight)
            .expire_after(KeepUntil)
            .build();
        Store { map }
    }

    /// The variant of `key` that a request with these fields selects.
    pub fn get(&self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let variants = self.map.get(key)?;
        variants
            .entries
            .iter()
            .find(|e| e.matches(request))
            .cloned()
    }

    /// Stores `entry` in place of the variant it matches, if any.
    pub fn insert(&self, key: String, entry: Arc<Entry>) {
        let mut entries = match self.map.get(&key) {
            Some(old) => old
                .entries
                .iter()
                .filter(|e| e.vary != entry.vary)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if entries.len() >= MAX_VARIANTS {
            entries.remove(0);
        }
        entries.push(entry);
        let variants = Arc::new(Variants::new(&key, entries));
        self.map.insert(key, variants);
    }

    /// Drops every variant of `key`; says how many there were.
    pub fn remove(&self, key: &str) -> usize {
        self.map.remove(key).map_or(0, |v| v.entries.len())
    }

    /// Drops every key with a variant tagged with one of `tags`; says how
    /// many variants went. A walk over the store: purges by tag are rare
    /// beside lookups, and an index would cost every fill.
    pub fn remove_tagged(&self, tags: &[String]) -> usize {
        let tagged: Vec<Arc<String>> = self
            .map
            .iter()
            .filter(|(_, v)| {
                v.entries
                    .iter()
                    .any(|e| e.tags.iter().any(|t| tags.contains(t)))
            })
            .map(|(k, _)| k)
            .collect();
        tagged.iter().map(|k| self.remove(k)).sum()
    }

    /// Drops everything; says how many variants there were.
    pub fn clear(&self) -> usize {
        let n = self.map.iter().map(|(_, v)| v.entries.len()).sum();
        self.map.invalidate_all();
        n
    }

    /// Keys stored (each with one or more variants).
    pub fn entries(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.entry_count()
    }

    /// Their weight, in bytes.
    pub fn bytes(&self) -> u64 {
        self.map.run_pending_tasks();
        self.map.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        vary: &[(&'static str, Option<&'static str>)],
        tags: &[&str],
        fresh: u64,
        body: usize,
    ) -> Arc<Entry> {
        let req = http::Request::get("http://x/")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        Arc::new(Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; body]),
            vary.iter()
                .map(|(n, v)| (HeaderName::from_static(n), v.map(HeaderValue::from_static)))
                .collect(),
            tags.iter().map(|t| t.to_string()).collect(),
            Asked::of(&req),
            Lifetime {
                age: Duration::ZERO,
                fresh: Duration::from_secs(fresh),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::from_secs(5),
                must_revalidate: false,
            },
            SystemTime::now(),
        ))
    }

    #[test]
    fn variants_are_told_apart_by_their_vary_values() {
        let store = Store::new(1 << 20);
        store.insert("k".into(), entry(&[("x-lang", Some("fr"))], &[], 60, 10));
        store.insert("k".into(), entry(&[("x-lang", None)], &[], 60, 20));
        let mut fr = HeaderMap::new();
        fr.insert("x-lang", "fr".parse().unwrap());
        assert_eq!(store.get("k", &fr).unwrap().body.len(), 10);
        assert_eq!(store.get("k", &HeaderMap::new()).unwrap().body.len(), 20);
        fr.insert("x-lang", "de".parse().unwrap());
        assert!(store.get("k", &fr).is_none());
        // The same variant again replaces it.
        store.insert("k".into(), entry(&[("x-lang", None)], &[], 60, 30));
        assert_eq!(store.get("k", &HeaderMap::new()).unwrap().body.len(), 30);
        assert_eq!(store.remove("k"), 2);
        assert!(store.get("k", &HeaderMap::new()).is_none());
    }

    #[test]
    fn purges_by_tag_and_all() {
        let store = Store::new(1 << 20);
        store.insert("a".into(), entry(&[], &["p-1", "catalog"], 60, 1));
        store.insert("b".into(), entry(&[], &["p-2", "catalog"], 60, 1));
        store.insert("c".into(), entry(&[], &[], 60, 1));
        assert_eq!(store.remove_tagged(&["p-1".into()]), 1);
        assert!(store.get("a", &HeaderMap::new()).is_none());
        assert!(store.get("b", &HeaderMap::new()).is_some());
        assert_eq!(store.remove_tagged(&["catalog".into(), "none".into()]), 1);
        assert_eq!(store.clear(), 1);
        assert!(store.get("c", &HeaderMap::new()).is_none());
    }

    #[test]
    fn the_weight_bound_holds() {
        let store = Store::new(1 << 20);
        for i in 0..100 {
            store.insert(format!("k{i}"), entry(&[], &[], 60, 64 << 10));
        }
        assert!(store.bytes() <= 1 << 20, "{}", store.bytes());
        assert!(store.entries() <= 16, "{}", store.entries());
    }

    #[test]
    fn an_entry_goes_stale_within_its_windows() {
        let e = entry(&[], &[], 10, 1);
        let now = Instant::now();
        assert_eq!(e.freshness(now), Freshness::Fresh);
        assert_eq!(
            e.freshness(now + Duration::from_secs(12)),
            Freshness::Stale {
                while_revalidating: false,
                if_error: true
            }
        );
        assert_eq!(
            e.freshness(now + Duration::from_secs(16)),
            Freshness::Stale {
                while_revalidating: false,
                if_error: false
            }
        );
        assert_eq!(e.keep(), Duration::from_secs(15));
    }
}
