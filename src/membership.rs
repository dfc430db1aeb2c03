//! Which backends each upstream has now: those the file gives as addresses,
//! what its names last resolved to, and what the admin API changed since the
//! last reload.
//!
//! Pure: no lookups, no sockets, no clock. `effective()` is the config a
//! snapshot is built from; the discovery loop, the admin API and reloads each
//! change one input and build again (`State::change_membership`). A backend
//! that leaves (its name no longer answers with it, or the admin API removed
//! it) stays in the effective config as `leaving` (no new requests) until its
//! requests in flight have finished, then goes (`forget`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{BackendConfig, Config, Lookup, NamedBackend, UpstreamConfig, MAX_WEIGHT};

/// One address a name resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// From an SRV record; `None` for A and AAAA records (the entry's weight applies).
    pub weight: Option<u32>,
    /// The SRV target's host name (for TLS), or `None` for A and AAAA records.
    pub host: Option<String>,
}

/// What the admin API changed in one upstream, until the next reload.
#[derive(Clone, Debug, Default)]
struct Changes {
    weights: HashMap<String, u32>,
    added: Vec<BackendConfig>,
    removed: HashSet<String>,
}

/// Why an admin change was refused: a status code and a one-line reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

fn refused(status: u16, reason: impl Into<String>) -> Refused {
    Refused {
        status,
        reason: reason.into(),
    }
}

#[derive(Debug)]
pub struct Membership {
    /// The config as the file gives it.
    file: Arc<Config>,
    /// (upstream, name as written) → the last good answer, sorted by address.
    answers: HashMap<(String, String), Vec<Target>>,
    changes: HashMap<String, Changes>,
    /// The last effective config: whose backends leave is seen against it.
    current: Arc<Config>,
}

impl Membership {
    pub fn new(file: Arc<Config>) -> Membership {
        Membership {
            current: file.clone(),
            file,
            answers: HashMap::new(),
            changes: HashMap::new(),
        }
    }

    /// The effective config: the one the current snapshot was built from.
    pub fn current(&self) -> &Arc<Config> {
        &self.current
    }

    /// The config as the file gives it (its names unresolved).
    pub fn file(&self) -> &Arc<Config> {
        &self.file
    }

    /// A reload: the file's config replaces the old one, the admin API's
    /// changes are dropped, answers for names that stay are kept, and backends
    /// the file no longer has go at once (their requests in flight finish on
    /// the old snapshot, as for any reload).
    pub fn set_file(&mut self, file: Arc<Config>) -> Arc<Config> {
        self.answers.retain(|(upstream, source), _| {
            file.upstream(upstream)
                .is_some_and(|u| u.names.iter().any(|n| &n.source == source))
        });
        self.changes.clear();
        self.file = file;
        self.current = Arc::new(self.compose(false));
        self.current.clone()
    }

    /// A name's new answer. Returns the effective config when it changed.
    pub fn set_answer(
        &mut self,
        upstream: &str,
        source: &str,
        mut targets: Vec<Target>,
    ) -> Option<Arc<Config>> {
        targets.sort_by_key(|t| t.addr);
        targets.dedup_by_key(|t| t.addr);
        let key = (upstream.to_string(), source.to_string());
        if self.answers.get(&key) == Some(&targets) {
            return None;
        }
        self.answers.insert(key, targets);
        self.recompose()
    }

    /// Whether `source` of `upstream` has answered at least once.
    pub fn has_answer(&self, upstream: &str, source: &str) -> bool {
        self.answers
            .contains_key(&(upstream.to_string(), source.to_string()))
    }

    /// Sets a backend's weight, for as long as it stays.
    pub fn set_weight(
        &mut self,
        upstream: &str,
        address: &str,
        weight: u32,
    ) -> Result<Arc<Config>, Refused> {
        check_weight(weight)?;
        self.present(upstream, address)?;
        let changes = self.changes.entry(upstream.to_string()).or_default();
        changes.weights.insert(address.to_string(), weight);
        Ok(self.recompose().unwrap_or_else(|| self.current.clone()))
    }

    /// Adds a backend at `addr`.
    pub fn add(
        &mut self,
        upstream: &str,
        addr: SocketAddr,
        weight: u32,
    ) -> Result<Arc<Config>, Refused> {
        check_weight(weight)?;
        let u = self.upstream(upstream)?;
        if u.backends.iter().any(|b| b.addr == addr && !b.leaving) {
            return Err(refused(
                409,
                format!("{addr} is already a backend of {upstream}"),
            ));
        }
        let tls_name = match &u.tls {
            Some(tls) => Some(
                tls.name_for(&addr.to_string())
                    .map_err(|why| refused(400, why))?,
            ),
            None => None,
        };
        let changes = self.changes.entry(upstream.to_string()).or_default();
        changes.removed.remove(&addr.to_string());
        changes.added.retain(|b| b.addr != addr);
        changes.added.push(BackendConfig {
            weight,
            tls_name,
            from: Some("admin".into()),
            ..BackendConfig::at(addr)
        });
        Ok(self.recompose().unwrap_or_else(|| self.current.clone()))
    }

    /// Removes a backend: it leaves (drains), then goes.
    pub fn remove(&mut self, upstream: &str, address: &str) -> Result<Arc<Config>, Refused> {
        self.present(upstream, address)?;
        let changes = self.changes.entry(upstream.to_string()).or_default();
        changes.added.retain(|b| b.address != address);
        changes.removed.insert(address.to_string());
        Ok(self.recompose().unwrap_or_else(|| self.current.clone()))
    }

    /// A leaving backend whose last request finished: it goes.
    pub fn forget(&mut self, upstream: &str, address: &str) -> Option<Arc<Config>> {
        let u = self.current.upstream(upstream)?;
        if !u.backends.iter().any(|b| b.address == address && b.leaving) {
            return None;
        }
        let mut config = (*self.current).clone();
        for u in config.upstreams.iter_mut().filter(|u| u.name == upstream) {
            let mut without = (**u).clone();
            without.backends.retain(|b| b.address != address);
            *u = Arc::new(without);
        }
        self.current = Arc::new(config);
        // A weight set over the admin API holds while the address stays.
        if let Some(changes) = self.changes.get_mut(upstream) {
            changes.weights.remove(address);
        }
        Some(self.current.clone())
    }

    fn upstream(&self, name: &str) -> Result<&UpstreamConfig, Refused> {
        self.current
            .upstream(name)
            .ok_or_else(|| refused(404, format!("no upstream named {name}")))
    }

    fn present(&self, upstream: &str, address: &str) -> Result<(), Refused> {
        let u = self.upstream(upstream)?;
        if u.backends
            .iter()
            .any(|b| b.address == address && !b.leaving)
        {
            Ok(())
        } else {
            Err(refused(404, format!("{upstream} has no backend {address}")))
        }
    }

    /// Composes again; `Some` when the result differs from the current config.
    fn recompose(&mut self) -> Option<Arc<Config>> {
        let next = self.compose(true);
        if next == *self.current {
            return None;
        }
        self.current = Arc::new(next);
        Some(self.current.clone())
    }

    /// The file's config with each upstream's backends as they are now.
    /// With `keep_leaving`, backends of the current config that are no longer
    /// there stay, marked leaving.
    fn compose(&self, keep_leaving: bool) -> Config {
        let mut config = (*self.file).clone();
        for u in config.upstreams.iter_mut() {
            let mut backends = self.backends_of(u);
            if keep_leaving {
                let before = self.current.upstream(&u.name);
                for b in before.iter().flat_map(|b| &b.backends) {
                    if !backends.iter().any(|n| n.addr == b.addr) {
                        backends.push(BackendConfig {
                            leaving: true,
                            ..b.clone()
                        });
                    }
                }
            }
            if backends != u.backends {
                let mut changed = (**u).clone();
                changed.backends = backends;
                *u = Arc::new(changed);
            }
        }
        config
    }

    fn backends_of(&self, u: &UpstreamConfig) -> Vec<BackendConfig> {
        let mut backends = u.backends.clone();
        for name in &u.names {
            let key = (u.name.clone(), name.source.clone());
            for target in self.answers.get(&key).into_iter().flatten() {
                if !backends.iter().any(|b| b.addr == target.addr) {
                    backends.push(resolved(u, name, target));
                }
            }
        }
        let Some(changes) = self.changes.get(&u.name) else {
            return backends;
        };
        for b in &changes.added {
            if !backends.iter().any(|o| o.addr == b.addr) {
                backends.push(b.clone());
            }
        }
        backends.retain(|b| !changes.removed.contains(&b.address));
        for b in backends.iter_mut() {
            if let Some(&w) = changes.weights.get(&b.address) {
                b.weight = w;
            }
        }
        backends
    }
}

/// The backend for one address a name gave.
fn resolved(u: &UpstreamConfig, name: &NamedBackend, target: &Target) -> BackendConfig {
    let host = match (&name.lookup, &target.host) {
        (Lookup::Host { .. }, _) => Some(name.source.as_str()),
        (Lookup::Srv(_), Some(host)) => Some(host.as_str()),
        (Lookup::Srv(_), None) => None,
    };
    // An SRV target that cannot be checked against a certificate is checked
    // against its address instead, which fails the handshake: it is not used.
    let tls_name = u.tls.as_ref().and_then(|tls| {
        host.and_then(|h| tls.name_for(h).ok())
            .or_else(|| tls.name_for(&target.addr.to_string()).ok())
    });
    BackendConfig {
        weight: target.weight.unwrap_or(name.weight).clamp(1, MAX_WEIGHT),
        tls_name,
        max_connections: name.max_connections,
        from: Some(name.source.clone()),
        ..BackendConfig::at(target.addr)
    }
}

fn check_weight(weight: u32) -> Result<(), Refused> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(refused(
            400,
            format!("weight {weight} is outside 1 to {MAX_WEIGHT}"),
        ))
    }
}

/// Every name to look up: (upstream, the entry), in config order.
pub fn names(
    config: &Config,
) -> BTreeMap<(String, String), (NamedBackend, crate::config::DiscoveryConfig)> {
    config
        .upstreams
        .iter()
        .flat_map(|u| {
            u.names
                .iter()
                .map(move |n| ((u.name.clone(), n.source.clone()), (n.clone(), u.discovery)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(backends: &str) -> Arc<Config> {
        let text = format!(
            "listeners:\n  - bind: 127.0.0.1:8080\n    routes: [{{upstream: app}}]\nupstreams:\n  app:\n    backends: {backends}\n"
        );
        Arc::new(crate::config::decode(&text, Path::new(".")).unwrap())
    }

    fn a(addr: &str) -> Target {
        Target {
            addr: addr.parse().unwrap(),
            weight: None,
            host: None,
        }
    }

    fn listed(c: &Config) -> Vec<(String, u32, Option<String>, bool)> {
        c.upstreams[0]
            .backends
            .iter()
            .map(|b| (b.address.clone(), b.weight, b.from.clone(), b.leaving))
            .collect()
    }

    #[test]
    fn a_name_gives_a_backend_per_address_with_its_weight() {
        let mut m = Membership::new(config(
            "[127.0.0.1:1, {address: app.internal:9000, weight: 3}]",
        ));
        let c = m
            .set_answer(
                "app",
                "app.internal:9000",
                vec![a("10.0.0.2:9000"), a("10.0.0.1:9000")],
            )
            .unwrap();
        let from = Some("app.internal:9000".to_string());
        assert_eq!(
            listed(&c),
            vec![
                ("127.0.0.1:1".into(), 1, None, false),
                ("10.0.0.1:9000".into(), 3, from.clone(), false),
                ("10.0.0.2:9000".into(), 3, from, false),
            ]
        );
        // The same answer in another order changes nothing.
        assert!(m
            .set_answer(
                "app",
                "app.internal:9000",
                vec![a("10.0.0.1:9000"), a("10.0.0.2:9000")]
            )
            .is_none());
    }

    #[test]
    fn an_address_that_leaves_drains_then_goes() {
        let mut m = Membership::new(config("[app.internal:9000]"));
        m.set_answer(
            "app",
            "app.internal:9000",
            vec![a("10.0.0.1:9000"), a("10.0.0.2:9000")],
        );
        let c = m
            .set_answer("app", "app.internal:9000", vec![a("10.0.0.1:9000")])
            .unwrap();
        let leaving: Vec<_> = listed(&c).into_iter().map(|b| (b.0, b.3)).collect();
        assert_eq!(
            leaving,
            vec![
                ("10.0.0.1:9000".into(), false),
                ("10.0.0.2:9000".into(), true)
            ]
        );
        let c = m.forget("app", "10.0.0.2:9000").unwrap();
        assert_eq!(listed(&c).len(), 1);
        // Forgetting one that is not leaving does nothing.
        assert!(m.forget("app", "10.0.0.1:9000").is_none());
    }

    #[test]
    fn a_leaving_address_that_returns_is_back() {
        let mut m = Membership::new(config("[app.internal:9000]"));
        m.set_answer(
            "app",
            "app.internal:9000",
            vec![a("10.0.0.1:9000"), a("10.0.0.2:9000")],
        );
        m.set_answer("app", "app.internal:9000", vec![a("10.0.0.1:9000")]);
        let c = m
            .set_answer(
                "app",
                "app.internal:9000",
                vec![a("10.0.0.1:9000"), a("10.0.0.2:9000")],
            )
            .unwrap();
        assert!(listed(&c).iter().all(|b| !b.3));
    }

    #[test]
    fn admin_changes_hold_until_the_next_reload() {
        let file = config("[127.0.0.1:1, 127.0.0.1:2]");
        let mut m = Membership::new(file.clone());
        m.set_weight("app", "127.0.0.1:2", 5).unwrap();
        m.add("app", "127.0.0.1:3".parse().unwrap(), 2).unwrap();
        let c = m.remove("app", "127.0.0.1:1").unwrap();
        assert_eq!(
            listed(&c),
            vec![
                ("127.0.0.1:2".into(), 5, None, false),
                ("127.0.0.1:3".into(), 2, Some("admin".into()), false),
                ("127.0.0.1:1".into(), 1, None, true),
            ]
        );
        let c = m.set_file(file);
        assert_eq!(
            listed(&c),
            vec![
                ("127.0.0.1:1".into(), 1, None, false),
                ("127.0.0.1:2".into(), 1, None, false)
            ]
        );
    }

    #[test]
    fn bad_admin_changes_are_refused_and_change_nothing() {
        let mut m = Membership::new(config("[127.0.0.1:1]"));
        let status = |r: Result<Arc<Config>, Refused>| r.unwrap_err().status;
        assert_eq!(status(m.set_weight("app", "127.0.0.1:1", 0)), 400);
        assert_eq!(status(m.set_weight("app", "127.0.0.1:1", 1001)), 400);
        assert_eq!(status(m.set_weight("nope", "127.0.0.1:1", 2)), 404);
        assert_eq!(status(m.set_weight("app", "127.0.0.1:9", 2)), 404);
        assert_eq!(status(m.add("app", "127.0.0.1:1".parse().unwrap(), 1)), 409);
        assert_eq!(status(m.remove("app", "127.0.0.1:9")), 404);
        assert_eq!(
            listed(&m.current),
            vec![("127.0.0.1:1".into(), 1, None, false)]
        );
    }

    #[test]
    fn srv_records_bring_their_weights() {
        let mut m = Membership::new(config("[{srv: _http._tcp.app.internal}]"));
        let target = |addr: &str, weight| Target {
            addr: addr.parse().unwrap(),
            weight: Some(weight),
            host: Some("a.app.internal".into()),
        };
        let c = m
            .set_answer(
                "app",
                "_http._tcp.app.internal",
                vec![
                    target("10.0.0.1:80", 1),
                    target("10.0.0.2:81", 3),
                    target("10.0.0.3:82", 0),
                ],
            )
            .unwrap();
        let weights: Vec<_> = listed(&c).into_iter().map(|b| (b.0, b.1)).collect();
        assert_eq!(
            weights,
            vec![
                ("10.0.0.1:80".into(), 1),
                ("10.0.0.2:81".into(), 3),
                ("10.0.0.3:82".into(), 1)
            ]
        );
    }
}
