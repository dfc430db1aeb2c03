//! What the cache stores and for how long: RFC 9111's rules for a shared
//! cache (from `http-cache-semantics`), with RFC 5861's stale-while-revalidate
//! and stale-if-error, the cache's defaults, and the few rules bascule adds
//! to be safe. No I/O: the layer asks, these answer.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, EXPIRES, HOST, PRAGMA, SET_COOKIE, VARY,
};
use http::{Method, StatusCode, Uri};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};

/// The cache's own settings for responses that state nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Defaults {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// How long a stored response may be used, counted from its age zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// Its age when stored (the backend's `Age`, and the time since it answered).
    pub age: Duration,
    /// Fresh until its age reaches this.
    pub fresh: Duration,
    /// Then served stale while one refresh runs, for this long.
    pub stale_while_revalidate: Duration,
    /// Then served stale in place of a failure, for this long.
    pub stale_if_error: Duration,
    /// Never served stale (`must-revalidate`, `proxy-revalidate`).
    pub must_revalidate: bool,
}

/// The request a stored response answered, as far as its policy compares a
/// later request with it: the method, the target and `Host` (and the fields
/// the response varies on, which the entry keeps apart). Nothing else of it
/// is kept where the Redis tier shares it: not its cookies, not its credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    pub method: Method,
    pub uri: Uri,
    pub host: Option<HeaderValue>,
}

impl Asked {
    /// Copied out of the request: its parts share the buffer it was read
    /// into, which a stored entry would otherwise keep.
    pub fn of(req: &http::request::Parts) -> Self {
        Asked {
            method: req.method.clone(),
            uri: req.uri.to_string().parse().unwrap_or_default(),
            host: req.headers.get(HOST).map(owned_value),
        }
    }
}

/// A value in memory of its own, not in a buffer it shares with a message.
pub fn owned_value(v: &HeaderValue) -> HeaderValue {
    let mut owned = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    owned.set_sensitive(v.is_sensitive());
    owned
}

/// A stored response's policy, made from what its entry keeps: the request
/// as `Asked`, its values of the fields the response varies on, the
/// response's status and fields, its age when stored and when that was. It
/// judges later requests as one made from the whole request would: of the
/// request's fields the policy reads only `Host`, those the response varies
/// on, and (to decide whether it may be stored, which `storable` decided)
/// `Authorization`. So an entry keeps no other field of the request (its
/// cookies, its credentials), in memory or in Redis, and one read back from
/// Redis is made as one stored here. The fields come back, with `Age` as it
/// was when stored.
pub fn rebuild(
    asked: &Asked,
    vary: &[(HeaderName, Option<HeaderValue>)],
    status: StatusCode,
    mut fields: HeaderMap,
    age: Duration,
    stored_at: SystemTime,
) -> (CachePolicy, HeaderMap) {
    let mut req = http::Request::new(());
    *req.method_mut() = asked.method.clone();
    *req.uri_mut() = asked.uri.clone();
    let headers = req.headers_mut();
    if let Some(host) = &asked.host {
        headers.insert(HOST, host.clone());
    }
    for (name, value) in vary {
        if let Some(value) = value {
            headers.insert(name.clone(), value.clone());
        }
    }
    // Its age then, as the field it was counted from.
    fields.insert(AGE, HeaderValue::from(age.as_secs()));
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = fields;
    let resp = resp.into_parts().0;
    let policy = CachePolicy::new_options(&req.into_parts().0, &resp, stored_at, options());
    (policy, resp.headers)
}

/// The `Cache-Control` directives bascule acts on, from every field of the message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub public: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub must_revalidate: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl Directives {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut d = Directives::default();
        let fields = headers.get_all(CACHE_CONTROL).iter();
        for item in fields
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (item.trim(), None),
            };
            let seconds = || value.and_then(|v| v.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                // Qualified (`no-cache="set-cookie"`) is taken whole: the safe reading.
                "no-cache" => d.no_cache = true,
                "public" => d.public = true,
                "max-age" => d.max_age = seconds(),
                "s-maxage" => d.s_maxage = seconds(),
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                "stale-if-error" => d.stale_if_error = seconds(),
                _ => {}
            }
        }
        d
    }
}

fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        // Freshness is what the response states, or the cache's `default_ttl`;
        // never guessed from `Last-Modified`.
        cache_heuristic: 0.0,
        ..CacheOptions::default()
    }
}

/// Whether, and for how long, the response to `req` may be stored. The
/// stored entry's policy is made apart (`rebuild`), from what it keeps.
pub fn storable(
    req: &http::request::Parts,
    resp: &http::response::Parts,
    defaults: &Defaults,
    now: SystemTime,
) -> Option<Lifetime> {
    let policy = CachePolicy::new_options(req, resp, now, options());
    if !policy.is_storable() {
        return None;
    }
    let headers = &resp.headers;
    let d = Directives::of(headers);
    // Stored only to be revalidated every time: not worth the memory.
    if d.no_cache {
        return None;
    }
    // A cookie is one client's; only a response that says it is for everyone is shared.
    if headers.contains_key(SET_COOKIE) && !d.public {
        return None;
    }
    if vary_names(headers).any(|n| n == "*") {
        return None;
    }
    let age = policy.age(now);
    let explicit = d.max_age.is_some() || d.s_maxage.is_some() || headers.contains_key(EXPIRES);
    let fresh = if explicit {
        age + policy.time_to_live(now)
    } else {
        age + defaults.ttl
    };
    if fresh <= age {
        return None;
    }
    let seconds = |s: Option<u64>, default| s.map_or(default, Duration::from_secs);
    Some(Lifetime {
        age,
        fresh,
        stale_while_revalidate: seconds(d.stale_while_revalidate, defaults.stale_while_revalidate),
        stale_if_error: seconds(d.stale_if_error, defaults.stale_if_error),
        must_revalidate: d.must_revalidate,
    })
}

/// For a request with its own `Cache-Control` or `Pragma`: whether the stored
/// response satisfies it without going to the backend (RFC 9111 §4.2, with
/// the request's `max-age`, `min-fresh`, `max-stale` and `no-cache`).
pub fn satisfies(policy: &CachePolicy, req: &http::request::Parts, now: SystemTime) -> bool {
    matches!(policy.before_request(req, now), BeforeRequest::Fresh(_))
}

/// What the request asks of the cache, read from its own fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Nothing: the stored response's freshness decides.
    Plain,
    /// It has `Cache-Control` or `Pragma`: `satisfies` decides.
    Directives,
    /// `no-store`: neither served from the cache nor stored.
    Bypass,
}

pub fn ask(headers: &HeaderMap) -> Ask {
    if !headers.contains_key(CACHE_CONTROL) && !headers.contains_key(PRAGMA) {
        return Ask::Plain;
    }
    if Directives::of(headers).no_store {
        Ask::Bypass
    } else {
        Ask::Directives
    }
}

/// The field names a response varies on, lower case.
pub fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// The request's values of the fields the response varies on, to tell its variants apart.
pub fn vary_values(
    response: &HeaderMap,
    request: &HeaderMap,
) -> Vec<(HeaderName, Option<HeaderValue>)> {
    vary_names(response)
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .map(|n| {
            let v = request.get(&n).cloned();
            (n, v)
        })
        .collect()
}

/// The tags of a response's `Cache-Tag` fields (comma- or space-separated).
pub fn tags(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(|c: char| c == ',' || c.is_ascii_whitespace()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
    ) -> (http::request::Parts, http::response::Parts) {
        let mut r = http::Request::get("http://shop.test/p").header("host", "shop.test");
        for (k, v) in req {
            r = r.header(*k, *v);
        }
        let mut s = http::Response::builder().status(status);
        for (k, v) in resp {
            s = s.header(*k, *v);
        }
        (
            r.body(()).unwrap().into_parts().0,
            s.body(()).unwrap().into_parts().0,
        )
    }

    fn lifetime(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
        defaults: Defaults,
    ) -> Option<Lifetime> {
        let (q, s) = parts(req, status, resp);
        storable(&q, &s, &defaults, SystemTime::now())
    }

    const NONE: Defaults = Defaults {
        ttl: Duration::ZERO,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
    };

    #[test]
    fn freshness_as_a_shared_cache_reads_it() {
        let l = lifetime(&[], 200, &[("cache-control", "max-age=60")], NONE).unwrap();
        assert_eq!(l.fresh, Duration::from_secs(60));
        // s-maxage over max-age; the backend's Age counts.
        let l = lifetime(
            &[],
            200,
            &[("cache-control", "max-age=5, s-maxage=30"), ("age", "10")],
            NONE,
        )
        .unwrap();
        assert_eq!((l.age.as_secs(), l.fresh.as_secs()), (10, 30));
        // RFC 5861, and the defaults where the response says nothing.
        let defaults = Defaults {
            ttl: Duration::from_secs(7),
            stale_while_revalidate: Duration::from_secs(3),
            stale_if_error: Duration::from_secs(4),
        };
        let l = lifetime(
            &[],
            200,
            &[(
                "cache-control",
                "max-age=1, stale-while-revalidate=20, stale-if-error=30",
            )],
            defaults,
        )
        .unwrap();
        assert_eq!(
            (
                l.stale_while_revalidate.as_secs(),
                l.stale_if_error.as_secs()
            ),
            (20, 30)
        );
        let l = lifetime(&[], 200, &[], defaults).unwrap();
        assert_eq!(
            (
                l.fresh.as_secs(),
                l.stale_while_revalidate.as_secs(),
                l.stale_if_error.as_secs()
            ),
            (7, 3, 4)
        );
        assert!(
            lifetime(
                &[],
                200,
                &[("cache-control", "max-age=1, must-revalidate")],
                defaults
            )
            .unwrap()
            .must_revalidate
        );
        // Nothing stated and no default: not stored.
        assert_eq!(lifetime(&[], 200, &[], NONE), None);
        // An Expires in the past, max-age=0: not stored.
        assert_eq!(
            lifetime(
                &[],
                200,
                &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
                defaults
            ),
            None
        );
        assert_eq!(
            lifetime(&[], 200, &[("cache-control", "max-age=0")], defaults),
            None
        );
    }

    #[test]
    fn what_is_never_stored() {
        let ok = [("cache-control", "max-age=60")];
        for (what, req, resp) in [
            (
                "no-store",
                vec![],
                vec![("cache-control", "max-age=60, no-store")],
            ),
            (
                "private",
                vec![],
                vec![("cache-control", "max-age=60, private")],
            ),
            (
                "no-cache",
                vec![],
                vec![("cache-control", "max-age=60, no-cache")],
            ),
            (
                "a request's no-store",
                vec![("cache-control", "no-store")],
                ok.to_vec(),
            ),
            (
                "Authorization",
                vec![("authorization", "Bearer x")],
                ok.to_vec(),
            ),
            (
                "Set-Cookie",
                vec![],
                vec![("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            ),
            (
                "Vary: *",
                vec![],
                vec![("cache-control", "max-age=60"), ("vary", "*")],
            ),
        ] {
            assert_eq!(lifetime(&req, 200, &resp, NONE), None, "{what}");
        }
        // Unless the response allows it.
        let auth = [("authorization", "Bearer x")];
        assert!(lifetime(&auth, 200, &[("cache-control", "s-maxage=60")], NONE).is_some());
        assert!(lifetime(&auth, 200, &[("cache-control", "max-age=60, public")], NONE).is_some());
        assert!(lifetime(
            &[],
            200,
            &[
                ("cache-control", "max-age=60, public"),
                ("set-cookie", "s=1")
            ],
            NONE
        )
        .is_some());
        // A status not understood as cacheable.
        assert_eq!(lifetime(&[], 201, &ok, NONE), None);
    }

    #[test]
    fn requests_ask_in_their_own_fields() {
        let h = |k: &str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
            m
        };
        assert_eq!(ask(&HeaderMap::new()), Ask::Plain);
        assert_eq!(ask(&h("cache-control", "no-store")), Ask::Bypass);
        assert_eq!(ask(&h("cache-control", "max-age=0")), Ask::Directives);
        assert_eq!(ask(&h("pragma", "no-cache")), Ask::Directives);
        let (q, s) = parts(&[], 200, &[("cache-control", "max-age=60")]);
        let lifetime = storable(&q, &s, &NONE, SystemTime::now()).unwrap();
        let now = SystemTime::now();
        let (policy, _) = rebuild(
            &Asked::of(&q),
            &[],
            s.status,
            s.headers.clone(),
            lifetime.age,
            now,
        );
        assert!(satisfies(&policy, &q, now));
        let (no_cache, _) = parts(&[("cache-control", "no-cache")], 200, &[]);
        assert!(!satisfies(&policy, &no_cache, now));
        let (min_fresh, _) = parts(&[("cache-control", "min-fresh=120")], 200, &[]);
        assert!(!satisfies(&policy, &min_fresh, now));
    }

    #[test]
    fn tags_and_vary() {
        let mut m = HeaderMap::new();
        m.append("cache-tag", "product-42, catalog".parse().unwrap());
        m.append("cache-tag", "home  catalog".parse().unwrap());
        assert_eq!(tags(&m), ["catalog", "home", "product-42"]);
        m.insert(VARY, "Accept-Encoding, X-Lang".parse().unwrap());
        let mut req = HeaderMap::new();
        req.insert("x-lang", "fr".parse().unwrap());
        let v = vary_values(&m, &req);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], (HeaderName::from_static("accept-encoding"), None));
        assert_eq!(v[1].1.as_ref().unwrap(), "fr");
    }

    #[test]
    fn a_policy_made_from_what_an_entry_keeps_judges_as_one_made_from_the_whole_request() {
        let (q, s) = parts(
            &[
                ("accept-language", "fr"),
                ("cookie", "session=1"),
                ("authorization", "Bearer t"),
            ],
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("vary", "Accept-Language, Accept-Encoding"),
                ("age", "20"),
            ],
        );
        let now = SystemTime::now();
        let whole = CachePolicy::new_options(&q, &s, now, options());
        let lifetime = storable(&q, &s, &NONE, now).unwrap();
        let vary = vary_values(&s.headers, &q.headers);
        let (kept, _) = rebuild(
            &Asked::of(&q),
            &vary,
            s.status,
            s.headers.clone(),
            lifetime.age,
            now,
        );
        let later = now + Duration::from_secs(100);
        assert_eq!(kept.age(later), whole.age(later));
        assert_eq!(kept.time_to_live(later), whole.time_to_live(later));
        let asks: [&[(&str, &str)]; 8] = [
            &[("accept-language", "fr")],
            &[("accept-language", "fr"), ("cookie", "other=2")],
            &[("accept-language", "de")],
            &[("accept-language", "fr"), ("accept-encoding", "gzip")],
            &[("accept-language", "fr"), ("cache-control", "max-age=60")],
            &[("accept-language", "fr"), ("cache-control", "max-age=200")],
            &[
                ("accept-language", "fr"),
                ("cache-control", "min-fresh=500"),
            ],
            &[("accept-language", "fr"), ("pragma", "no-cache")],
        ];
        let judged: Vec<bool> = asks
            .iter()
            .map(|a| satisfies(&whole, &parts(a, 200, &[]).0, later))
            .collect();
        assert_eq!(
            judged,
            [true, true, false, false, false, true, false, false]
        );
        for (a, expected) in asks.iter().zip(judged) {
            assert_eq!(
                satisfies(&kept, &parts(a, 200, &[]).0, later),
                expected,
                "{a:?}"
            );
        }
        let other_host = http::Request::get("http://elsewhere.test/p")
            .header("host", "elsewhere.test")
            .header("accept-language", "fr")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(!satisfies(&whole, &other_host, later));
        assert!(!satisfies(&kept, &other_host, later));
    }
}
