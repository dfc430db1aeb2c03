//! Every header rewrite the proxy makes, in one place.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1: `Connection`, every field it
/// names, and `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and
/// `Upgrade`. They describe one connection and must not be forwarded; a client's
/// `Connection: close` forwarded to a backend would also close the pooled
/// connection after every request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these, or only `Connection: keep-alive`: look
    // before touching the map, since each removal hashes and probes.
    let mut fixed = false;
    let mut connection = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if is_fixed_hop_by_hop(name) {
            fixed = true;
        }
    }
    if connection {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `close` and `keep-alive` are the usual tokens; only other tokens name fields.
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if fixed {
        for name in [
            &PROXY_CONNECTION,
            &KEEP_ALIVE,
            &header::TE,
            &header::TRANSFER_ENCODING,
            &header::UPGRADE,
        ] {
            headers.remove(name);
        }
    }
}

fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// The protocol a request asks to switch to (`Connection: upgrade` plus `Upgrade`),
/// such as `websocket`.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Puts back the two fields that carry an upgrade across this hop.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// A client's address as X-Forwarded-For writes it, made once per connection.
///
/// IPv4 is written by hand: `Ipv4Addr`'s `Display` goes through the formatting
/// machinery, about 1 300 instructions, a few percent of a short connection's cost.
pub fn client_ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .expect("an IP address is a valid header value");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = match octet {
            100.. => 0,
            10.. => 1,
            _ => 2,
        };
        for d in &digits[skip..] {
            text[len] = b'0' + d;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header value")
}

/// The client that a trusted proxy's `X-Forwarded-For` names: walking the
/// list from its right end (the hop nearest bascule), the first address not
/// among `trusted`, or the leftmost if all are (NGINX's `real_ip_recursive
/// on`). An entry that is not an address ends the walk: what lies left of it
/// was written by no one bascule trusts. `None` when the list is missing or
/// its last entry is not an address.
pub fn forwarded_client(headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let mut client = None;
    for list in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(list) = list.to_str() else {
            return client;
        };
        for entry in list.rsplit(',') {
            let entry = entry.trim();
            let Some(ip) = entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
            else {
                return client;
            };
            client = Some(ip);
            if !trusted.iter().any(|net| net.contains(&ip)) {
                return client;
            }
        }
    }
    client
}

/// How many fields `add_forwarded` may add, for maps built with room for them.
pub const ADDED_FIELDS: usize = 3;

/// Adds `X-Forwarded-For` (appending the client's address to any list the
/// client sent), and sets `X-Forwarded-Proto` and `X-Forwarded-Host` (what the
/// client sent as Host, port included). bascule is the edge: a client's own
/// Proto and Host claims are replaced, not trusted.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    tls: bool,
    host: Option<HeaderValue>,
) {
    // One lookup for the usual case, a client that sent no list of its own.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(entry) => {
            entry.insert(client_ip.clone());
        }
        Entry::Occupied(mut entry) => {
            let mut list = Vec::new();
            for v in entry.iter() {
                list.extend_from_slice(v.as_bytes());
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(client_ip.as_bytes());
            entry.insert(HeaderValue::from_bytes(&list).unwrap_or_else(|_| client_ip.clone()));
        }
    }
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_proxys_list_names_the_rightmost_untrusted_address() {
        let trusted: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let client = |pairs: &[(&str, &str)]| forwarded_client(&map(pairs), &trusted);
        let xff = "x-forwarded-for";
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(client(&[]), None);
        assert_eq!(client(&[(xff, "203.0.113.9")]), ip("203.0.113.9"));
        // A client's own claim left of the first untrusted hop is not believed.
        assert_eq!(
            client(&[(xff, "198.51.100.1, 203.0.113.9, 10.1.2.3")]),
            ip("203.0.113.9")
        );
        // Over several field lines, the last is nearest.
        assert_eq!(
            client(&[
                (xff, "198.51.100.1, 203.0.113.9"),
                (xff, "10.1.2.3 , 10.9.9.9")
            ]),
            ip("203.0.113.9")
        );
        // All trusted: the leftmost. Ports and IPv6 read as addresses.
        assert_eq!(client(&[(xff, "10.0.0.1, 10.0.0.2")]), ip("10.0.0.1"));
        assert_eq!(
            client(&[(xff, "[2001:db9::1]:4711, 2001:db8::2")]),
            ip("2001:db9::1")
        );
        assert_eq!(client(&[(xff, "203.0.113.9:4711")]), ip("203.0.113.9"));
        // What is not an address ends the walk.
        assert_eq!(client(&[(xff, "unknown")]), None);
        assert_eq!(
            client(&[(xff, "203.0.113.9, junk, 10.1.2.3")]),
            ip("10.1.2.3")
        );
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", "foo"),
            ("x-secret", "1"),
            ("foo", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_needs_both_fields() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
        assert!(upgrade_protocol(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn forwarded_for_appends_and_proto_host_are_set() {
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("host", "example.com:8080"),
        ]);
        let host = h.get(header::HOST).cloned();
        add_forwarded(&mut h, &ip, false, host);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");

        let mut h = HeaderMap::new();
        let host = h.get(header::HOST).cloned();
        add_forwarded(&mut h, &ip, true, host);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn client_ip_is_written_as_display_writes_it() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "9.99.100.255",
            "255.255.255.255",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(client_ip_value(ip), text);
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(client_ip_value(v6), "2001:db8::1");
    }
}
