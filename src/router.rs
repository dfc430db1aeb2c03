//! Maps a request to a route: host, path prefix and method, first match wins.
//!
//! Pure: it sees the request's host, path and method and answers with the
//! route's index among its listener's routes.

use http::Method;

use crate::config::{HostMatch, RouteConfig};

#[derive(Debug)]
struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    methods: Vec<Method>,
}

#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Self {
        Router {
            routes: routes
                .iter()
                .map(|r| Route {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    methods: r.methods.clone(),
                })
                .collect(),
        }
    }

    /// The index of the first route that matches. `host` is the request's Host
    /// (or :authority), port included or not.
    pub fn route(&self, host: Option<&str>, path: &str, method: &Method) -> Option<usize> {
        let host = host.map(strip_port);
        self.routes.iter().position(|r| {
            r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
                && (r.methods.is_empty() || r.methods.contains(method))
                && r.host
                    .as_ref()
                    .is_none_or(|m| host.is_some_and(|h| host_matches(m, h)))
        })
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:8080` -> `[::1]`. (Over
/// bytes: `str::rfind` with a char costs several times as much, on every request.)
pub fn strip_port(host: &str) -> &str {
    let bytes = host.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        Some(i) if !bytes[i..].contains(&b']') => &host[..i],
        _ => host,
    }
}

fn host_matches(m: &HostMatch, host: &str) -> bool {
    // A fully qualified name may end with a dot.
    let host = host.strip_suffix('.').unwrap_or(host);
    match m {
        HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
        HostMatch::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        host: Option<&str>,
        prefix: Option<&str>,
        methods: &[Method],
        upstream: &str,
    ) -> RouteConfig {
        RouteConfig {
            cache: None,
            host: host.map(|h| match h.strip_prefix('*') {
                Some(s) => HostMatch::Suffix(s.to_string()),
                None => HostMatch::Exact(h.to_string()),
            }),
            path_prefix: prefix.map(str::to_string),
            methods: methods.to_vec(),
            upstream: upstream.to_string(),
        }
    }

    fn router() -> Router {
        let routes = [
            route(
                Some("api.example.com"),
                Some("/api"),
                &[Method::GET, Method::HEAD],
                "0",
            ),
            route(Some("*.example.com"), None, &[], "1"),
            route(None, Some("/static"), &[], "2"),
        ];
        // Each route's upstream is named for its index, the router's answer.
        Router::new(&routes)
    }

    #[test]
    fn first_match_wins_and_every_condition_holds() {
        let r = router();
        assert_eq!(
            r.route(Some("api.example.com"), "/api/x", &Method::GET),
            Some(0)
        );
        assert_eq!(
            r.route(Some("API.Example.COM:8443"), "/api", &Method::HEAD),
            Some(0)
        );
        assert_eq!(
            r.route(Some("api.example.com"), "/api/x", &Method::POST),
            Some(1)
        );
        assert_eq!(
            r.route(Some("api.example.com"), "/other", &Method::GET),
            Some(1)
        );
        assert_eq!(
            r.route(Some("other.org"), "/static/a.css", &Method::GET),
            Some(2)
        );
        assert_eq!(r.route(Some("other.org"), "/", &Method::GET), None);
        assert_eq!(r.route(None, "/api", &Method::GET), None);
    }

    #[test]
    fn wildcard_needs_a_label_before_the_suffix() {
        let r = router();
        assert_eq!(r.route(Some("a.b.example.com"), "/", &Method::GET), Some(1));
        assert_eq!(r.route(Some("example.com"), "/", &Method::GET), None);
        assert_eq!(r.route(Some("badexample.com"), "/", &Method::GET), None);
        assert_eq!(
            r.route(Some("www.example.com."), "/", &Method::GET),
            Some(1)
        );
    }

    #[test]
    fn ports_are_ignored_including_ipv6() {
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com:80"), "example.com");
    }
}
