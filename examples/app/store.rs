//! Where the application keeps its state: Redis, shared by every replica, or a
//! map inside this process when no Redis is configured.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use tokio::sync::OnceCell;

/// Sessions and cached results expire after this long without use.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);

pub enum Store {
    Redis(RedisStore),
    Local(Mutex<LocalStore>),
}

pub struct RedisStore {
    client: redis::Client,
    /// One multiplexed connection that reconnects by itself, made on first use so
    /// that a replica started before Redis comes up serves as soon as it does.
    conn: OnceCell<ConnectionManager>,
}

#[derive(Default)]
pub struct LocalStore {
    values: HashMap<String, (String, Instant)>,
    hashes: HashMap<String, (HashMap<String, i64>, Instant)>,
}

pub type Result<T> = std::result::Result<T, String>;

impl Store {
    pub fn redis(url: &str) -> Result<Store> {
        let client = redis::Client::open(url).map_err(|e| format!("REDIS_URL {url}: {e}"))?;
        Ok(Store::Redis(RedisStore {
            client,
            conn: OnceCell::new(),
        }))
    }

    pub fn local() -> Store {
        Store::Local(Mutex::new(LocalStore::default()))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Redis(_) => "redis",
            Store::Local(_) => "in-process",
        }
    }

    /// Whether the store answers; a replica whose Redis is gone is not healthy.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Store::Redis(r) => {
                let mut c = r.conn().await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Store::Local(_) => Ok(()),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        match self {
            Store::Redis(r) => r.conn().await?.get(key).await.map_err(|e| e.to_string()),
            Store::Local(l) => {
                let l = l.lock().unwrap();
                Ok(l.values
                    .get(key)
                    .filter(|(_, until)| *until > Instant::now())
                    .map(|(v, _)| v.clone()))
            }
        }
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<()> {
        match self {
            Store::Redis(r) => r
                .conn()
                .await?
                .set_ex(key, value, ttl.as_secs())
                .await
                .map_err(|e| e.to_string()),
            Store::Local(l) => {
                let mut l = l.lock().unwrap();
                let until = Instant::now() + ttl;
                l.values.insert(key.to_string(), (value.to_string(), until));
                Ok(())
            }
        }
    }

    /// Drops `key`, and tells whoever listens on `channel` (with Redis: the
    /// edge caches in front, on `bascule:invalidate:NAME`) with `message`.
    pub async fn drop_and_publish(&self, key: &str, channel: &str, message: &str) -> Result<()> {
        match self {
            Store::Redis(r) => {
                let mut c = r.conn().await?;
                redis::pipe()
                    .del(key)
                    .ignore()
                    .publish(channel, message)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|e| e.to_string())
            }
            Store::Local(l) => {
                l.lock().unwrap().values.remove(key);
                Ok(())
            }
        }
    }

    /// Adds `by` to `field` of the hash at `key` and renews the key's time to live;
    /// returns the whole hash.
    pub async fn bump(&self, key: &str, field: &str, by: i64) -> Result<HashMap<String, i64>> {
        match self {
            Store::Redis(r) => {
                let mut c = r.conn().await?;
                let (_, _, all): (i64, bool, HashMap<String, i64>) = redis::pipe()
                    .atomic()
                    .hincr(key, field, by)
                    .expire(key, SESSION_TTL.as_secs() as i64)
                    .hgetall(key)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(all)
            }
            Store::Local(l) => {
                let mut l = l.lock().unwrap();
                let now = Instant::now();
                let entry = l
                    .hashes
                    .entry(key.to_string())
                    .or_insert_with(|| (HashMap::new(), now));
                if entry.1 < now {
                    entry.0.clear();
                }
                entry.1 = now + SESSION_TTL;
                *entry.0.entry(field.to_string()).or_insert(0) += by;
                Ok(entry.0.clone())
            }
        }
    }
}

impl RedisStore {
    async fn conn(&self) -> Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_millis(500))
            .set_response_timeout(Duration::from_millis(500))
            .set_number_of_retries(1);
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(|e| format!("redis: {e}"))
    }
}
