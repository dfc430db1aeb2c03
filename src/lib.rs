//! bascule: an L7 HTTP load balancer.
//!
//! The binary (`main.rs`) parses the command line and calls into this library;
//! integration tests drive the same `Server` the binary runs.
// One exception, allowed where it stands: a socket option socket2 has no setter for.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod backend_tls;
pub mod balance;
pub mod client_io;
pub mod config;
pub mod entry;
pub mod failure;
pub mod hash_key;
pub mod health;
pub mod http1;
pub mod metrics;
pub mod pool;
pub mod preview;
pub mod proxy;
pub mod router;
pub mod server;
pub mod stack;
pub mod state;
pub mod sticky;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{Server, StartError};
