//! The consistent-hashing key of a request, hashed in place (no allocation).

use std::net::IpAddr;

use http::header::COOKIE;
use http::Request;

use crate::balance::hash::hash64;
use crate::config::HashKey;

/// The hash of the request's key, or `None` when the request does not carry it.
/// Values are hashed as sent: query values are not percent-decoded.
#[inline]
pub fn key_hash<B>(key: &HashKey, req: &Request<B>, client: IpAddr) -> Option<u64> {
    with_key(key, req, client, hash64)
}

/// `f` of the request's key as it is hashed (the client IP's octets), or
/// `None` when the request does not carry it.
#[inline(always)]
pub fn with_key<B, R>(
    key: &HashKey,
    req: &Request<B>,
    client: IpAddr,
    f: impl FnOnce(&[u8]) -> R,
) -> Option<R> {
    match key {
        HashKey::ClientIp => Some(match client {
            IpAddr::V4(ip) => f(&ip.octets()),
            IpAddr::V6(ip) => f(&ip.octets()),
        }),
        HashKey::Path => Some(f(req.uri().path().as_bytes())),
        HashKey::Header(name) => req.headers().get(name).map(|v| f(v.as_bytes())),
        HashKey::Cookie(name) => cookie(req, name).map(f),
        HashKey::Query(name) => req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| f(v.as_bytes()))
        }),
    }
}

/// The value of cookie `name`, looking through every Cookie header (HTTP/2
/// clients may send one per cookie).
pub fn cookie<'r, B>(req: &'r Request<B>, name: &str) -> Option<&'r [u8]> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn each_key_source() {
        let r = req(
            "/cart/items?user=42&x=1",
            &[
                ("x-user", "42"),
                ("cookie", "a=1; session=abc"),
                ("cookie", "user=42"),
            ],
        );
        let h42 = Some(hash64(b"42"));
        assert_eq!(
            key_hash(&HashKey::Header("x-user".parse().unwrap()), &r, IP),
            h42
        );
        assert_eq!(key_hash(&HashKey::Cookie("user".into()), &r, IP), h42);
        assert_eq!(key_hash(&HashKey::Query("user".into()), &r, IP), h42);
        assert_eq!(
            key_hash(&HashKey::Cookie("session".into()), &r, IP),
            Some(hash64(b"abc"))
        );
        assert_eq!(
            key_hash(&HashKey::Path, &r, IP),
            Some(hash64(b"/cart/items"))
        );
        assert_eq!(
            key_hash(&HashKey::ClientIp, &r, IP),
            Some(hash64(&[10, 0, 0, 1]))
        );
    }

    #[test]
    fn missing_keys_are_none() {
        let r = req("/?other=1", &[("cookie", "usera=1")]);
        assert_eq!(key_hash(&HashKey::Cookie("user".into()), &r, IP), None);
        assert_eq!(key_hash(&HashKey::Query("user".into()), &r, IP), None);
        assert_eq!(
            key_hash(&HashKey::Header("x-user".parse().unwrap()), &r, IP),
            None
        );
    }
}
