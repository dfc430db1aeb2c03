//! bascule: an L7 HTTP load balancer.
//!
//! The binary (`main.rs`) parses the command line and calls into this library;
//! integration tests drive the same `Server` the binary runs.
// Every module forbids unsafe code but `sockopt`, which holds one socket option
// socket2 has no setter for.
#![deny(unsafe_code)]

#[forbid(unsafe_code)]
pub mod access_log;
#[forbid(unsafe_code)]
pub mod admin;
#[forbid(unsafe_code)]
pub mod backend;
#[forbid(unsafe_code)]
pub mod backend_tls;
#[forbid(unsafe_code)]
pub mod balance;
#[forbid(unsafe_code)]
pub mod cache;
#[forbid(unsafe_code)]
pub mod client_io;
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod discovery;
#[forbid(unsafe_code)]
pub mod entry;
#[forbid(unsafe_code)]
pub mod explain;
#[forbid(unsafe_code)]
pub mod failure;
#[forbid(unsafe_code)]
pub mod hash_key;
#[forbid(unsafe_code)]
pub mod health;
#[forbid(unsafe_code)]
pub mod http1;
#[forbid(unsafe_code)]
pub mod inherited;
#[forbid(unsafe_code)]
pub mod listener_limit;
#[forbid(unsafe_code)]
pub mod membership;
#[forbid(unsafe_code)]
pub mod metrics;
#[forbid(unsafe_code)]
pub mod pool;
#[forbid(unsafe_code)]
pub mod preview;
#[forbid(unsafe_code)]
pub mod proxy;
#[forbid(unsafe_code)]
pub mod proxy_protocol;
#[forbid(unsafe_code)]
pub mod queue;
#[forbid(unsafe_code)]
pub mod router;
#[forbid(unsafe_code)]
pub mod server;
pub mod sockopt;
#[forbid(unsafe_code)]
pub mod stack;
#[forbid(unsafe_code)]
pub mod state;
#[forbid(unsafe_code)]
pub mod sticky;
#[forbid(unsafe_code)]
pub mod tls;
#[forbid(unsafe_code)]
pub mod upstream;

pub use config::Config;
pub use server::{Server, StartError};
