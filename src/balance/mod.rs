//! Backend selection: pure algorithms over a fixed set of backends.
//!
//! A selector is built from the weights of an upstream's backends (in config
//! order) and answers "which index next?". It does no I/O and knows nothing of
//! sockets or health: the caller says which indexes are usable right now and
//! what load each carries. Selectors are shared by every worker thread, so their
//! state is atomic.

pub mod consistent_hash;
pub mod hash;
pub mod least_connections;
pub mod round_robin;

pub use consistent_hash::Ring;
pub use least_connections::LeastConnections;
pub use round_robin::RoundRobin;

/// One upstream's selector.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastConnections(LeastConnections),
    /// The ring, and round robin for requests that carry no key.
    ConsistentHash(Ring, RoundRobin),
}

/// Whether a pick moves the selector on (a request's), or only looks
/// (`/explain`'s, which must change nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Take,
    Peek,
}

impl Selector {
    /// The chosen index. `key` is the request's hash key (consistent hashing
    /// only); `load(i)` backend i's requests in flight and `total_load` their sum.
    #[inline(always)]
    pub fn pick(
        &self,
        step: Step,
        key: Option<u64>,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
        total_load: impl FnOnce() -> usize,
    ) -> Option<usize> {
        let round = |rr: &RoundRobin, usable| match step {
            Step::Take => rr.pick(usable),
            Step::Peek => rr.peek(usable),
        };
        match self {
            Selector::RoundRobin(rr) => round(rr, usable),
            Selector::LeastConnections(lc) => match step {
                Step::Take => lc.pick(usable, load),
                Step::Peek => lc.peek(usable, load),
            },
            Selector::ConsistentHash(ring, rr) => match key {
                // The ring keeps no state: a look is a pick.
                Some(key) => ring.pick(key, usable, load, total_load),
                None => round(rr, usable),
            },
        }
    }
}
