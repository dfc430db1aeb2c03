//! The cache key: scheme, host (lower case, without its port) and the path
//! with its query, as `http://host/path?q`; the same for a request and for a
//! URL given to purge.

use http::header::HOST;
use http::Request;

use crate::router::strip_port;

/// The key of a request, or `None` when it names no host.
pub fn of_request<B>(req: &Request<B>, tls: bool) -> Option<String> {
    let host = match req.uri().authority() {
        Some(a) => a.host(),
        None => req.headers().get(HOST)?.to_str().ok()?,
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Some(make(if tls { "https" } else { "http" }, host, target))
}

/// The key of a URL given to purge (`http://Host:8080/p?q`), or `None` when
/// it is not an absolute http or https URL.
pub fn of_url(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    Some(make(scheme, uri.authority()?.host(), target))
}

fn make(scheme: &str, host: &str, target: &str) -> String {
    let host = strip_port(host);
    let mut key = String::with_capacity(scheme.len() + 3 + host.len() + target.len());
    key.push_str(scheme);
    key.push_str("://");
    let at = key.len();
    key.push_str(host);
    key[at..].make_ascii_lowercase();
    key.push_str(target);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_urls_make_the_same_keys() {
        let req =
            |target: &str, host: &str| Request::get(target).header(HOST, host).body(()).unwrap();
        assert_eq!(
            of_request(&req("/a?b=1", "Shop.Example:8080"), false).unwrap(),
            "http://shop.example/a?b=1"
        );
        assert_eq!(
            of_request(&req("http://Other.test/x", "ignored"), true).unwrap(),
            "https://other.test/x"
        );
        assert_eq!(
            of_request(&req("/", "[::1]:8080"), false).unwrap(),
            "http://[::1]/"
        );
        assert_eq!(
            of_url("http://SHOP.example:8080/a?b=1").unwrap(),
            "http://shop.example/a?b=1"
        );
        assert_eq!(
            of_url("https://shop.example").unwrap(),
            "https://shop.example/"
        );
        assert_eq!(of_url("/relative"), None);
        assert_eq!(of_url("ftp://x/y"), None);
        let hostless = Request::get("/").body(()).unwrap();
        assert_eq!(of_request(&hostless, false), None);
    }
}
