//! Backend names looked up again at run time: every `discovery.interval`
//! (sooner when an answer's TTL is shorter), on the control thread.
//!
//! An answer with addresses replaces the name's set (`membership` adds the
//! new addresses and lets the others leave). A failed lookup (timeout,
//! SERVFAIL) keeps the last set; a name that answers with no address
//! (NXDOMAIN, no records) keeps it for `discovery.hold`, then empties it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts,
    ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DiscoveryConfig, Lookup, NamedBackend, ResolverConfig};
use crate::membership::{self, Target};
use crate::state::State;

/// What one lookup of a name found.
#[derive(Debug)]
pub enum Answer {
    /// Addresses, and how long the answer is valid.
    Found(Vec<Target>, Duration),
    /// NXDOMAIN, or no address records.
    Nothing,
    /// Timeout, SERVFAIL, refused: the last set stays.
    Failed(String),
}

/// A resolver for `config`: its servers, or the system's with `/etc/hosts`.
pub fn resolver(config: &ResolverConfig) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if config.nameservers.is_empty() {
        Resolver::builder(provider)
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(HickoryConfig::from_name_servers(servers), provider)
    };
    let options = builder.options_mut();
    options.timeout = config.timeout();
    options.attempts = 1;
    // Answers are asked for on discovery's own schedule, which follows their
    // TTLs: a cache would only hide a change.
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.use_hosts_file = if config.nameservers.is_empty() {
        ResolveHosts::Always
    } else {
        ResolveHosts::Never
    };
    builder
        .build()
        .map_err(|e| format!("cannot start the resolver: {e}"))
}

/// Looks `name` up once, within `timeout`.
pub async fn lookup(resolver: &TokioResolver, name: &NamedBackend, timeout: Duration) -> Answer {
    match tokio::time::timeout(timeout, lookup_inner(resolver, &name.lookup)).await {
        Ok(answer) => answer,
        Err(_) => Answer::Failed(format!("no answer within {timeout:?}")),
    }
}

async fn lookup_inner(resolver: &TokioResolver, lookup: &Lookup) -> Answer {
    let now = Instant::now();
    let classify = |e: hickory_resolver::net::NetError| {
        if e.is_no_records_found() || e.is_nx_domain() {
            Answer::Nothing
        } else {
            Answer::Failed(e.to_string())
        }
    };
    match lookup {
        Lookup::Host { host, port } => match resolver.lookup_ip(absolute(host)).await {
            Ok(ips) => {
                let ttl = ips.valid_until().saturating_duration_since(now);
                let targets: Vec<Target> = ips
                    .iter()
                    .map(|ip| Target {
                        addr: SocketAddr::new(ip, *port),
                        weight: None,
                        host: None,
                    })
                    .collect();
                found(targets, ttl)
            }
            Err(e) => classify(e),
        },
        Lookup::Srv(name) => {
            let records = match resolver.srv_lookup(absolute(name)).await {
                Ok(records) => records,
                Err(e) => return classify(e),
            };
            let mut ttl = records.valid_until().saturating_duration_since(now);
            let mut targets = Vec::new();
            for record in records.answers() {
                let RData::SRV(srv) = &record.data else {
                    continue;
                };
                let host = srv.target.to_string();
                let host = host.trim_end_matches('.').to_string();
                // The additional section usually carries the targets' addresses; otherwise ask.
                let mut ips: Vec<_> = records
                    .additionals()
                    .iter()
                    .filter(|r| r.name == srv.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    match resolver.lookup_ip(srv.target.clone()).await {
                        Ok(found) => {
                            ttl = ttl.min(found.valid_until().saturating_duration_since(now));
                            ips.extend(found.iter());
                        }
                        Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                        Err(e) => return Answer::Failed(format!("{host}: {e}")),
                    }
                }
                for ip in ips {
                    targets.push(Target {
                        addr: SocketAddr::new(ip, srv.port),
                        weight: Some(u32::from(srv.weight)),
                        host: Some(host.clone()),
                    });
                }
            }
            found(targets, ttl)
        }
    }
}

fn found(targets: Vec<Target>, ttl: Duration) -> Answer {
    if targets.is_empty() {
        Answer::Nothing
    } else {
        Answer::Found(targets, ttl)
    }
}

/// Names are looked up as written, fully qualified unless they have no dot
/// (`localhost`, or a short name the search list completes).
fn absolute(name: &str) -> String {
    if name.contains('.') {
        format!("{name}.")
    } else {
        name.to_string()
    }
}

/// Looks up every name of `config` that `known` has no answer for, at once,
/// on a runtime of its own: at start and on reload, so that a new name's
/// backends are there from the first request. Names that do not answer
/// within the resolver's timeout are left to the discovery loop.
pub fn resolve_new(
    config: &Config,
    known: impl Fn(&str, &str) -> bool,
) -> Vec<(String, String, Vec<Target>)> {
    let names: Vec<_> = membership::names(config)
        .into_iter()
        .filter(|((upstream, source), _)| !known(upstream, source))
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    // On a thread of its own: the caller may itself be on a runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(|| lookup_all(config, names))
            .join()
            .unwrap_or_default()
    })
}

fn lookup_all(
    config: &Config,
    names: Vec<((String, String), (NamedBackend, DiscoveryConfig))>,
) -> Vec<(String, String, Vec<Target>)> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!("cannot look up backend names now: {e}");
            return Vec::new();
        }
    };
    runtime.block_on(async {
        let resolver = match resolver(&config.resolver) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}");
                return Vec::new();
            }
        };
        let timeout = config.resolver.timeout();
        let lookups = names
            .iter()
            .map(|((_, _), (name, _))| lookup(&resolver, name, timeout));
        let answers = futures_util::future::join_all(lookups).await;
        names
            .into_iter()
            .zip(answers)
            .filter_map(|(((upstream, source), _), answer)| match answer {
                Answer::Found(targets, _) => Some((upstream, source, targets)),
                Answer::Nothing => {
                    tracing::warn!(upstream, "{source}: no address yet");
                    None
                }
                Answer::Failed(why) => {
                    tracing::warn!(upstream, "{source}: lookup failed: {why}");
                    None
                }
            })
            .collect()
    })
}

/// When a name is next looked up, and since when it has answered with nothing.
#[derive(Debug, Default)]
struct Schedule {
    next: Option<Instant>,
    empty_since: Option<Instant>,
}

/// The shortest wait between two lookups of a name, whatever its TTL.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Looks every name up on its schedule until `shutdown`; `changed` wakes it
/// when a reload may have brought new names or a new resolver.
pub async fn run(state: Arc<State>, changed: Arc<Notify>, shutdown: CancellationToken) {
    let mut settings: Option<ResolverConfig> = None;
    let mut resolver: Option<TokioResolver> = None;
    let mut schedules: HashMap<(String, String), Schedule> = HashMap::new();
    loop {
        let file = state.membership(|m| m.file().clone());
        let names = membership::names(&file);
        schedules.retain(|key, _| names.contains_key(key));
        if settings.as_ref() != Some(&file.resolver) {
            settings = Some(file.resolver.clone());
            resolver = resolver_or_log(&file.resolver);
        }
        let now = Instant::now();
        let due: Vec<_> = names
            .iter()
            .filter(|(key, _)| {
                schedules
                    .get(*key)
                    .and_then(|s| s.next)
                    .is_none_or(|t| t <= now)
            })
            .collect();
        if let (Some(resolver), false) = (&resolver, due.is_empty()) {
            let timeout = file.resolver.timeout();
            let answers = futures_util::future::join_all(
                due.iter()
                    .map(|(_, (name, _))| lookup(resolver, name, timeout)),
            )
            .await;
            for (((upstream, source), (_, discovery)), answer) in due.into_iter().zip(answers) {
                let schedule = schedules
                    .entry((upstream.clone(), source.clone()))
                    .or_default();
                apply(&state, upstream, source, discovery, schedule, answer);
            }
        } else if resolver.is_none() {
            for key in names.keys() {
                schedules.entry(key.clone()).or_default().next = Some(now + Duration::from_secs(5));
            }
        }
        let next = schedules.values().filter_map(|s| s.next).min();
        let sleep = next.map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

fn resolver_or_log(config: &ResolverConfig) -> Option<TokioResolver> {
    resolver(config)
        .inspect_err(|e| tracing::error!("backend names will not be looked up: {e}"))
        .ok()
}

/// Takes one answer into the membership, and schedules the next lookup.
fn apply(
    state: &State,
    upstream: &str,
    source: &str,
    discovery: &DiscoveryConfig,
    schedule: &mut Schedule,
    answer: Answer,
) {
    let now = Instant::now();
    let mut wait = discovery.interval;
    match answer {
        Answer::Found(targets, ttl) => {
            schedule.empty_since = None;
            wait = wait.min(ttl).max(MIN_INTERVAL);
            state.change_membership(|m| {
                let first = !m.has_answer(upstream, source);
                let changed = m.set_answer(upstream, source, targets);
                if changed.is_some() {
                    let level = if first { "resolved" } else { "changed" };
                    tracing::info!(upstream, "{source} {level}");
                }
                (changed, ())
            });
            crate::metrics::discovery_lookup(upstream, source, "found");
        }
        Answer::Nothing => {
            let since = *schedule.empty_since.get_or_insert(now);
            crate::metrics::discovery_lookup(upstream, source, "no_address");
            if now.duration_since(since) >= discovery.hold {
                state.change_membership(|m| {
                    let changed = m.set_answer(upstream, source, Vec::new());
                    if changed.is_some() {
                        tracing::warn!(
                            upstream,
                            "{source} has had no address for {:?}: its backends leave",
                            discovery.hold
                        );
                    }
                    (changed, ())
                });
            } else {
                tracing::warn!(upstream, "{source}: no address; the last set stays");
                // Looked at again when the hold runs out, if not before.
                wait = wait.min(discovery.hold.saturating_sub(now.duration_since(since)));
            }
        }
        Answer::Failed(why) => {
            crate::metrics::discovery_lookup(upstream, source, "failed");
            tracing::warn!(
                upstream,
                "{source}: lookup failed ({why}); the last set stays"
            );
        }
    }
    schedule.next = Some(now + wait.max(MIN_INTERVAL));
}
