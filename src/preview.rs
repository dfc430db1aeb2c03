//! `bascule check --config NEW --against OLD`: what a reload from OLD to NEW would change.
//!
//! Pure: it compares two validated configs. For consistent-hash upstreams it
//! places a fixed sample of 100 000 synthetic keys on both rings and counts the
//! ones that move; for sticky upstreams it names the backends whose pinned
//! clients would be re-pinned.

use crate::balance::hash::hash64;
use crate::balance::Ring;
use crate::config::{Balance, Config, UpstreamConfig};

const SAMPLE_KEYS: u64 = 100_000;

/// What a reload cannot change in a running process, one line each: the
/// number of workers (threads, each with its own sockets), and turning the
/// access log on or off (where it goes, a reload changes).
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.worker_count() != new.worker_count() {
        out.push(format!(
            "! workers: {} -> {} needs a restart; a reload keeps {}",
            old.worker_count(),
            new.worker_count(),
            old.worker_count()
        ));
    }
    let on = |c: &Config| c.access_log != crate::config::AccessLog::Off;
    if on(old) != on(new) {
        out.push(format!(
            "! access_log: turning it {} needs a restart; a reload keeps it {}",
            if on(new) { "on" } else { "off" },
            if on(old) { "on" } else { "off" },
        ));
    } else if old.access_log != new.access_log {
        out.push("~ access_log: lines go to the new destination".to_string());
    }
    out
}

/// One line per change; empty when the configs are the same.
pub fn preview(old: &Config, new: &Config) -> Vec<String> {
    let mut out = restart_needed(old, new);
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.bind == l.bind) {
            None => out.push(format!(
                "+ listener {} ({}): starts listening",
                l.bind, l.name
            )),
            Some(o) if o.routes != l.routes => {
                out.push(format!("~ listener {} ({}): routes change", l.bind, l.name))
            }
            Some(o) if o != l => out.push(format!(
                "~ listener {} ({}): settings change",
                l.bind, l.name
            )),
            Some(_) => {}
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.bind == o.bind) {
            out.push(format!(
                "- listener {} ({}): stops accepting; its connections finish",
                o.bind, o.name
            ));
        }
    }
    let bind = |c: &Config| {
        c.admin
            .as_ref()
            .map_or("none".to_string(), |a| a.bind.to_string())
    };
    if bind(old) != bind(new) {
        out.push(format!("~ admin: {} -> {}", bind(old), bind(new)));
    }
    let token = |c: &Config| c.admin.as_ref().and_then(|a| a.token.clone());
    match (token(old), token(new)) {
        (None, Some(_)) => out.push("~ admin: a token is now required".into()),
        (Some(_), None) => out.push("~ admin: no token is required any more".into()),
        (Some(a), Some(b)) if a != b => out.push("~ admin: the token changes".into()),
        _ => {}
    }
    for u in &new.upstreams {
        match old.upstream(&u.name) {
            None => out.push(format!(
                "+ upstream {}: {} backends",
                u.name,
                u.backends.len()
            )),
            Some(o) => upstream_changes(o, u, &mut out),
        }
    }
    for o in &old.upstreams {
        if new.upstream(&o.name).is_none() {
            out.push(format!("- upstream {}", o.name));
        }
    }
    out
}

fn upstream_changes(old: &UpstreamConfig, new: &UpstreamConfig, out: &mut Vec<String>) {
    let name = &new.name;
    for b in &new.backends {
        match old.backends.iter().find(|o| o.address == b.address) {
            None => out.push(format!(
                "+ upstream {name}: backend {} (weight {})",
                b.address, b.weight
            )),
            Some(o) if o.weight != b.weight => out.push(format!(
                "~ upstream {name}: backend {} weight {} -> {} (its state is kept)",
                b.address, o.weight, b.weight
            )),
            Some(_) => {}
        }
    }
    let removed: Vec<&str> = old
        .backends
        .iter()
        .filter(|o| !new.backends.iter().any(|b| b.address == o.address))
        .map(|o| o.address.as_str())
        .collect();
    for r in &removed {
        out.push(format!("- upstream {name}: backend {r}"));
    }
    // Names: what they resolve to is known at run time only.
    for n in &new.names {
        match old.names.iter().find(|o| o.source == n.source) {
            None => out.push(format!(
                "+ upstream {name}: backends from {} (weight {}), as it resolves",
                n.source, n.weight
            )),
            Some(o) if o.weight != n.weight => out.push(format!(
                "~ upstream {name}: backends from {} weight {} -> {} (their state is kept)",
                n.source, o.weight, n.weight
            )),
            Some(_) => {}
        }
    }
    for o in &old.names {
        if !new.names.iter().any(|n| n.source == o.source) {
            out.push(format!("- upstream {name}: backends from {}", o.source));
        }
    }
    if old.balance != new.balance {
        out.push(format!(
            "~ upstream {name}: balance {} -> {}",
            old.balance.name(),
            new.balance.name()
        ));
    }
    let same_rest = UpstreamConfig {
        backends: old.backends.clone(),
        names: old.names.clone(),
        balance: old.balance,
        ..new.clone()
    } == *old;
    if !same_rest {
        out.push(format!(
            "~ upstream {name}: settings change (timeouts, checks, retries or sticky)"
        ));
    }
    let both_hash =
        old.balance == Balance::ConsistentHash && new.balance == Balance::ConsistentHash;
    if both_hash && old.backends != new.backends {
        let share = moved_keys(old, new);
        out.push(format!(
            "~ upstream {name}: {:.2}% of {SAMPLE_KEYS} sample keys move to another backend",
            share * 100.0
        ));
    }
    if old.sticky.is_some() && new.sticky.is_some() {
        for r in &removed {
            out.push(format!(
                "~ upstream {name}: clients pinned to {r} are balanced again and re-pinned"
            ));
        }
        if old.sticky.as_ref().map(|s| &s.secrets) != new.sticky.as_ref().map(|s| &s.secrets) {
            let still_verify = old
                .sticky
                .as_ref()
                .zip(new.sticky.as_ref())
                .is_some_and(|(o, n)| o.secrets.first().is_some_and(|s| n.secrets.contains(s)));
            if !still_verify {
                out.push(format!(
                    "~ upstream {name}: the new secrets do not verify current cookies: every client is re-pinned"
                ));
            }
        }
    }
}

/// The share of the sample keys that the new ring places on another backend.
fn moved_keys(old: &UpstreamConfig, new: &UpstreamConfig) -> f64 {
    fn ring(u: &UpstreamConfig) -> (Ring, Vec<&str>) {
        let names: Vec<&str> = u.backends.iter().map(|b| b.address.as_str()).collect();
        let weights: Vec<u32> = u.backends.iter().map(|b| b.weight).collect();
        (Ring::new(&names, &weights, None), names)
    }
    let ((a, a_names), (b, b_names)) = (ring(old), ring(new));
    let moved = (0..SAMPLE_KEYS)
        .filter(|k| {
            let key = hash64(&k.to_le_bytes());
            let before = a.pick(key, |_| true, |_| 0, || 0).map(|i| a_names[i]);
            let after = b.pick(key, |_| true, |_| 0, || 0).map(|i| b_names[i]);
            before != after
        })
        .count();
    moved as f64 / SAMPLE_KEYS as f64
}
