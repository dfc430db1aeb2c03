//! Backend selection: pure algorithms over a fixed set of backends.
//!
//! A selector is built from the weights of an upstream's backends (in config
//! order) and answers "which index next?". It does no I/O and knows nothing of
//! sockets or health: the caller passes a predicate saying which indexes are
//! usable right now. Selectors are shared by every worker thread, so their
//! state is atomic.

pub mod round_robin;

pub use round_robin::RoundRobin;
