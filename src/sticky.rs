//! Sticky sessions: sealed cookies that name a backend, honoured by every
//! bascule instance that shares the secret.
//!
//! A cookie value is `1-ID-ISSUED-MAC`, all in hex:
//! - `ID`: 64 bits of a fixed hash of the upstream's name and the backend's
//!   address. It names the backend without revealing its address, and is the
//!   same in every process, across restarts and reloads that keep the backend.
//! - `ISSUED`: Unix seconds when the cookie was made; older than `ttl`, it has expired.
//! - `MAC`: HMAC-SHA256 over the version, upstream, ID and ISSUED, keyed by the
//!   secret, cut to 128 bits. The first secret signs; all of them verify, so a
//!   secret can be rotated without breaking the sessions pinned under the old one.
//!
//! Nothing is shared between instances but the secret: two processes with the
//! same config honour each other's cookies. A cookie that is forged, tampered
//! with, expired or names an unknown backend is ignored (the request is
//! balanced normally and gets a new cookie), never an error.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;

use crate::balance::hash::hash64;
use crate::config::{SameSite, StickyConfig};

const VERSION: &str = "1";
const MAC_BYTES: usize = 16;

/// Why a cookie was not honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not of the cookie's form.
    Malformed,
    /// Of the form, but no secret made its MAC: forged or tampered with.
    BadSignature,
    Expired,
    /// Signed, but no backend of the upstream has its ID (removed by a reload).
    UnknownBackend,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::BadSignature => "bad_signature",
            Rejected::Expired => "expired",
            Rejected::UnknownBackend => "unknown_backend",
        }
    }
}

/// The stable, address-hiding ID of a backend of an upstream.
pub fn backend_id(upstream: &str, address: &str) -> u64 {
    let mut key = Vec::with_capacity(upstream.len() + address.len() + 1);
    key.extend_from_slice(upstream.as_bytes());
    key.push(b'/');
    key.extend_from_slice(address.as_bytes());
    hash64(&key)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mac(secret: &[u8], upstream: &str, id: u64, issued: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(VERSION.as_bytes());
    mac.update(b"|");
    mac.update(upstream.as_bytes());
    mac.update(b"|");
    mac.update(&id.to_be_bytes());
    mac.update(&issued.to_be_bytes());
    mac
}

/// The cookie value for backend `id` of `upstream`, issued at `issued`.
pub fn seal(secret: &[u8], upstream: &str, id: u64, issued: u64) -> String {
    let tag = mac(secret, upstream, id, issued).finalize().into_bytes();
    let mut out = format!("{VERSION}-{id:016x}-{issued:x}-");
    for b in &tag[..MAC_BYTES] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Checks a cookie value; on success, the backend ID it names.
pub fn open(
    secrets: &[Vec<u8>],
    upstream: &str,
    value: &[u8],
    ttl: Duration,
    now: u64,
) -> Result<u64, Rejected> {
    let text = std::str::from_utf8(value).map_err(|_| Rejected::Malformed)?;
    let mut parts = text.split('-');
    let (Some(VERSION), Some(id), Some(issued), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(Rejected::Malformed);
    };
    let id = parse_hex_u64(id, 16).ok_or(Rejected::Malformed)?;
    let issued = parse_hex_u64(issued, 16).ok_or(Rejected::Malformed)?;
    // Checked as bytes: slicing a str of multi-byte characters in pairs would panic.
    let tag = tag.as_bytes();
    if tag.len() != MAC_BYTES * 2 || !tag.iter().all(u8::is_ascii_hexdigit) {
        return Err(Rejected::Malformed);
    }
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    let mut bytes = [0u8; MAC_BYTES];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = nibble(tag[2 * i]) << 4 | nibble(tag[2 * i + 1]);
    }
    let signed = secrets.iter().any(|s| {
        mac(s, upstream, id, issued)
            .verify_truncated_left(&bytes)
            .is_ok()
    });
    if !signed {
        return Err(Rejected::BadSignature);
    }
    // A minute of clock skew between instances is tolerated.
    if issued > now + 60 || now.saturating_sub(issued) > ttl.as_secs() {
        return Err(Rejected::Expired);
    }
    Ok(id)
}

fn parse_hex_u64(s: &str, max_len: usize) -> Option<u64> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// The secret used when none is configured: random, made once per process.
/// Cookies then survive reloads but not restarts, and other instances do not
/// honour them; a warning says so at start.
pub fn process_secret() -> Vec<u8> {
    static SECRET: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SECRET
        .get_or_init(|| {
            let mut bytes = vec![0u8; 32];
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                use std::io::Read;
                let _ = f.read_exact(&mut bytes);
            }
            bytes
        })
        .clone()
}

/// An upstream's sticky settings, ready for the request path.
#[derive(Debug)]
pub struct Sticky {
    pub cookie: String,
    pub ttl: Duration,
    /// The first signs; all verify.
    pub secrets: Vec<Vec<u8>>,
    attributes: String,
    attributes_secure: String,
    /// Per backend: the last Set-Cookie value made and the second it was made in,
    /// so that a busy backend seals one cookie a second, not one per response.
    cache: Vec<Mutex<Option<(u64, HeaderValue, bool)>>>,
    /// Per backend, in config order: its cookie ID.
    pub ids: Vec<u64>,
    rejected: [metrics::Counter; 5],
}

impl Sticky {
    pub fn new(config: &StickyConfig, upstream: &str, addresses: &[&str]) -> Self {
        let secrets = if config.secrets.is_empty() {
            tracing::warn!(
                upstream,
                "sticky has no secret: using a random one, so cookies will not survive a restart \
                 and other bascule instances will not honour them; set secret or secret_file"
            );
            vec![process_secret()]
        } else {
            config.secrets.clone()
        };
        let reason = |r: &str| crate::metrics::sticky_rejected(upstream, r);
        let mut attributes = format!("; Path={}; Max-Age={}", config.path, config.ttl.as_secs());
        if config.http_only {
            attributes.push_str("; HttpOnly");
        }
        attributes.push_str(match config.same_site {
            SameSite::Lax => "; SameSite=Lax",
            SameSite::Strict => "; SameSite=Strict",
            SameSite::None => "; SameSite=None",
        });
        let attributes_secure = format!("{attributes}; Secure");
        let always_secure = config.secure == Some(true);
        let never_secure = config.secure == Some(false);
        Sticky {
            cookie: config.cookie.clone(),
            ttl: config.ttl,
            secrets,
            attributes: if always_secure {
                attributes_secure.clone()
            } else {
                attributes.clone()
            },
            attributes_secure: if never_secure {
                attributes
            } else {
                attributes_secure
            },
            cache: addresses.iter().map(|_| Mutex::new(None)).collect(),
            ids: addresses.iter().map(|a| backend_id(upstream, a)).collect(),
            rejected: [
                reason(Rejected::Malformed.label()),
                reason(Rejected::BadSignature.label()),
                reason(Rejected::Expired.label()),
                reason(Rejected::UnknownBackend.label()),
                reason("backend_unusable"),
            ],
        }
    }

    /// The backend the request's cookie pins it to, if the cookie is valid and
    /// names a backend of this upstream. Rejections are counted.
    pub fn pinned<B>(&self, upstream: &str, req: &http::Request<B>) -> Option<usize> {
        match self.find(upstream, req)? {
            Ok(index) => Some(index),
            Err(r) => {
                self.rejected[r as usize].increment(1);
                None
            }
        }
    }

    /// As `pinned`, counting nothing: for `/explain`.
    pub fn peek_pinned<B>(&self, upstream: &str, req: &http::Request<B>) -> Option<usize> {
        self.find(upstream, req)?.ok()
    }

    fn find<B>(&self, upstream: &str, req: &http::Request<B>) -> Option<Result<usize, Rejected>> {
        let value = crate::hash_key::cookie(req, &self.cookie)?;
        let id = open(&self.secrets, upstream, value, self.ttl, unix_now());
        Some(id.and_then(|id| {
            self.ids
                .iter()
                .position(|&i| i == id)
                .ok_or(Rejected::UnknownBackend)
        }))
    }

    /// Counts a valid cookie whose backend cannot take the request (down, ejected).
    pub fn count_unusable(&self) {
        self.rejected[4].increment(1);
    }

    /// The `Set-Cookie` value pinning a client to backend `index` (whose ID is `id`).
    pub fn set_cookie(&self, upstream: &str, index: usize, id: u64, tls: bool) -> HeaderValue {
        let now = unix_now();
        let mut cached = self.cache[index].lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, value, secure)) = cached.as_ref() {
            if *at == now && *secure == tls {
                return value.clone();
            }
        }
        let attributes = if tls {
            &self.attributes_secure
        } else {
            &self.attributes
        };
        let text = format!(
            "{}={}{}",
            self.cookie,
            seal(&self.secrets[0], upstream, id, now),
            attributes
        );
        let value = HeaderValue::from_str(&text)
            .expect("cookie names and values are checked by the config");
        *cached = Some((now, value.clone(), tls));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    #[test]
    fn sealed_cookies_open_and_name_their_backend() {
        let id = backend_id("app", "10.0.0.1:80");
        let v = seal(b"secret", "app", id, 1_000_000);
        assert_eq!(
            open(&[b"secret".to_vec()], "app", v.as_bytes(), TTL, 1_000_100),
            Ok(id)
        );
        assert!(!v.contains("10.0.0.1"));
    }

    #[test]
    fn tampering_forgery_and_expiry_are_rejected() {
        let id = backend_id("app", "10.0.0.1:80");
        let secrets = [b"secret".to_vec()];
        let v = seal(b"secret", "app", id, 1_000_000);
        let at = |v: &str, now| open(&secrets, "app", v.as_bytes(), TTL, now);
        // Another backend's ID with the same MAC.
        let other = backend_id("app", "10.0.0.2:80");
        let swapped = v.replacen(&format!("{id:016x}"), &format!("{other:016x}"), 1);
        assert_eq!(at(&swapped, 1_000_000), Err(Rejected::BadSignature));
        // A later issue time, to extend the session.
        let later = v.replacen("-f4240-", "-f4241-", 1);
        assert_eq!(at(&later, 1_000_000), Err(Rejected::BadSignature));
        // Signed with another secret, or for another upstream.
        assert_eq!(
            at(&seal(b"guess", "app", id, 1_000_000), 1_000_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            at(&seal(b"secret", "other", id, 1_000_000), 1_000_000),
            Err(Rejected::BadSignature)
        );
        assert_eq!(at(&v, 1_000_000 + 3601), Err(Rejected::Expired));
        for junk in [
            "",
            "1",
            "1-2-3",
            "2-0-0-00",
            "1-zz-1-00000000000000000000000000000000",
            "1-1-1-0000-",
        ] {
            assert_eq!(at(junk, 1_000_000), Err(Rejected::Malformed), "{junk}");
        }
    }

    #[test]
    fn set_cookie_attributes_and_secure_on_tls() {
        let config = StickyConfig {
            cookie: "aff".into(),
            ttl: TTL,
            secrets: vec![b"s".to_vec()],
            path: "/".into(),
            http_only: true,
            same_site: SameSite::Lax,
            secure: None,
        };
        let sticky = Sticky::new(&config, "app", &["10.0.0.1:80"]);
        let id = sticky.ids[0];
        let plain = sticky.set_cookie("app", 0, id, false);
        assert!(plain
            .to_str()
            .unwrap()
            .ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"));
        let tls = sticky.set_cookie("app", 0, id, true);
        assert!(tls.to_str().unwrap().ends_with("; SameSite=Lax; Secure"));
        let never = Sticky::new(
            &StickyConfig {
                secure: Some(false),
                ..config.clone()
            },
            "app",
            &["10.0.0.1:80"],
        );
        assert!(!never
            .set_cookie("app", 0, id, true)
            .to_str()
            .unwrap()
            .contains("Secure"));
        let always = Sticky::new(
            &StickyConfig {
                secure: Some(true),
                ..config
            },
            "app",
            &["10.0.0.1:80"],
        );
        assert!(always
            .set_cookie("app", 0, id, false)
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }

    #[test]
    fn every_secret_verifies_the_first_signs() {
        let id = backend_id("app", "b:1");
        let old = seal(b"old", "app", id, 50);
        let secrets = [b"new".to_vec(), b"old".to_vec()];
        assert_eq!(open(&secrets, "app", old.as_bytes(), TTL, 60), Ok(id));
    }
}
