//! A stateless application replica: what bascule is meant to sit in front of.
//!
//! It keeps nothing of its own. Sessions (a visit counter and a cart, keyed by a
//! cookie the app issues) and cached results of a slow computation live in Redis,
//! so any replica can answer any request and a replica can die without losing a
//! thing. Without Redis it falls back to an in-process store and says so: then a
//! session lives in one replica, and only sticky sessions keep a user on it.
//!
//! ```text
//! cargo run --example app -- --listen 127.0.0.1:9001 --name replica-1 [--redis redis://127.0.0.1:6379]
//! ```
//! (`REDIS_URL` works as well as `--redis`.) It prints `listening on ADDR` first.
//!
//! - `GET /`: which replica answered, the session and its visit count
//! - `POST /cart?item=NAME`: adds an item to the session's cart; `GET /cart` shows it
//! - `GET /report?n=N`: the primes below N, a deliberately slow computation
//!   (about 300 ms, standing in for a slow query), cached for everyone (cache-aside),
//!   and cacheable at the edge for a minute (`Cache-Control`, `Cache-Tag: report-N`)
//! - `POST /report/refresh?n=N`: the data behind a report changed: the app drops its
//!   own cached value and publishes `{"tags": ["report-N"]}` on
//!   `bascule:invalidate:edge`, so that every bascule in front drops it too
//! - `GET /stats`: this replica's cache hits and misses, as JSON
//! - `GET /healthz`: 200 while the store answers, 503 when Redis is unreachable
//!
//! Every answer carries `X-Replica: NAME`.

mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use store::{Store, SESSION_TTL};
use tokio::net::TcpListener;

const SESSION_COOKIE: &str = "app_session";
/// What the slow computation stands in for: a query that takes this long.
const SLOW_QUERY: Duration = Duration::from_millis(300);
const REPORT_TTL: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Shown in every answer; default: the port.
    #[arg(long)]
    name: Option<String>,
    /// Keep state in this Redis; without it (or REDIS_URL), in this process only.
    #[arg(long, env = "REDIS_URL")]
    redis: Option<String>,
}

struct App {
    name: String,
    store: Store,
    hits: AtomicU64,
    misses: AtomicU64,
}

type Reply = Response<Full<Bytes>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let store = match &args.redis {
        Some(url) => Store::redis(url)?,
        None => Store::local(),
    };
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let app = Arc::new(App {
        name: args.name.unwrap_or_else(|| addr.port().to_string()),
        store,
        hits: AtomicU64::new(0),
        misses: AtomicU64::new(0),
    });
    println!("listening on {addr}");
    let says = match &args.redis {
        Some(url) => format!("{}: state in Redis at {url}\n", app.name),
        None => format!(
            "{}: no REDIS_URL, state in this process only: sessions are not shared between replicas\n",
            app.name
        ),
    };
    // One write, so that replicas started together do not interleave their lines.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), says.as_bytes());
    loop {
        let (stream, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.answer(req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl App {
    async fn answer(&self, req: Request<Incoming>) -> Reply {
        let result = match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => self.health().await,
            (&Method::GET, "/stats") => Ok(self.stats()),
            (&Method::GET, "/report") => self.report(&req).await,
            (&Method::POST, "/report/refresh") => self.refresh(&req).await,
            (&Method::GET, "/") => self.visit(&req).await,
            (&Method::GET, "/cart") => self.cart(&req, None).await,
            (&Method::POST, "/cart") => match query(&req, "item") {
                Some(item) => self.cart(&req, Some(item)).await,
                None => Ok(text(StatusCode::BAD_REQUEST, "POST /cart?item=NAME\n")),
            },
            _ => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
        };
        let mut reply = result.unwrap_or_else(|e| {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("store unavailable: {e}\n"),
            )
        });
        let name = HeaderValue::from_str(&self.name).unwrap_or(HeaderValue::from_static("?"));
        reply.headers_mut().insert("x-replica", name);
        reply
    }

    async fn health(&self) -> store::Result<Reply> {
        self.store.ping().await?;
        Ok(text(StatusCode::OK, "ok\n"))
    }

    fn stats(&self) -> Reply {
        let (hits, misses) = (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        );
        let rate = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let body = format!(
            "{{\"replica\":\"{}\",\"store\":\"{}\",\"cache_hits\":{hits},\"cache_misses\":{misses},\"hit_rate\":{rate:.3}}}\n",
            self.name,
            self.store.kind()
        );
        let mut reply = text(StatusCode::OK, &body);
        reply
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        reply
    }

    /// Cache-aside: the shared cache first; on a miss, compute and store for everyone.
    async fn report(&self, req: &Request<Incoming>) -> store::Result<Reply> {
        let n = report_n(req);
        let key = report_key(n);
        let (count, cache) = match self.store.get(&key).await? {
            Some(count) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                (count, "hit")
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(SLOW_QUERY).await;
                let count = tokio::task::spawn_blocking(move || primes_below(n))
                    .await
                    .map_err(|e| e.to_string())?
                    .to_string();
                self.store.set(&key, &count, REPORT_TTL).await?;
                (count, "miss")
            }
        };
        let body = format!("{}: {count} primes below {n} (cache {cache})\n", self.name);
        let mut reply = text(StatusCode::OK, &body);
        let headers = reply.headers_mut();
        headers.insert("x-cache", HeaderValue::from_static(cache));
        headers.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=60, stale-while-revalidate=30"),
        );
        if let Ok(tag) = HeaderValue::from_str(&format!("report report-{n}")) {
            headers.insert("cache-tag", tag);
        }
        Ok(reply)
    }

    /// The write path: what a report is made from changed. Event-based
    /// invalidation from where the data changes.
    async fn refresh(&self, req: &Request<Incoming>) -> store::Result<Reply> {
        let n = report_n(req);
        let message = format!(r#"{{"tags": ["report-{n}"]}}"#);
        self.store
            .drop_and_publish(&report_key(n), "bascule:invalidate:edge", &message)
            .await?;
        Ok(text(
            StatusCode::OK,
            &format!("{}: report {n} refreshed; published {message}\n", self.name),
        ))
    }

    async fn visit(&self, req: &Request<Incoming>) -> store::Result<Reply> {
        let (session, new) = session(req);
        let all = self
            .store
            .bump(&format!("session:{session}"), "visits", 1)
            .await?;
        let visits = all.get("visits").copied().unwrap_or(0);
        let body = format!(
            "{}: session {} visit {visits} (store: {})\n",
            self.name,
            &session[..8],
            self.store.kind()
        );
        Ok(with_session(text(StatusCode::OK, &body), &session, new))
    }

    async fn cart(&self, req: &Request<Incoming>, add: Option<String>) -> store::Result<Reply> {
        let (session, new) = session(req);
        let key = format!("session:{session}");
        let field = add.as_ref().map(|item| format!("cart:{item}"));
        let all = self
            .store
            .bump(
                &key,
                field.as_deref().unwrap_or("cart"),
                i64::from(add.is_some()),
            )
            .await?;
        let mut items: Vec<_> = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("cart:")?, v)))
            .collect();
        items.sort();
        let list: Vec<String> = items.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let body = format!("{}: cart [{}]\n", self.name, list.join(", "));
        Ok(with_session(text(StatusCode::OK, &body), &session, new))
    }
}

fn report_n(req: &Request<Incoming>) -> u64 {
    query(req, "n")
        .and_then(|n| n.parse().ok())
        .filter(|n| (2..=10_000_000).contains(n))
        .unwrap_or(1_000_000)
}

fn report_key(n: u64) -> String {
    format!("report:primes:{n}")
}

/// The session ID from the cookie, or a new random one (and whether it is new).
fn session(req: &Request<Incoming>) -> (String, bool) {
    let existing = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, v)| {
            *k == SESSION_COOKIE && v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .map(|(_, v)| v.to_string());
    match existing {
        Some(id) => (id, false),
        None => (new_session_id(), true),
    }
}

fn new_session_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom is readable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_session(mut reply: Reply, session: &str, new: bool) -> Reply {
    if new {
        let cookie = format!(
            "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
            SESSION_TTL.as_secs()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            reply.headers_mut().append(SET_COOKIE, v);
        }
    }
    reply
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_string())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

/// How many primes are below `n` (a sieve): the work worth caching.
fn primes_below(n: u64) -> usize {
    let n = n as usize;
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            for j in (i * i..n).step_by(i) {
                composite[j] = true;
            }
        }
    }
    count
}
