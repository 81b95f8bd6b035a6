//! Test support for providers: a scriptable mock HTTP server, mocks of each cloud's API that
//! follow the real API's shape (paths, auth, field names, states, error bodies), and the generic
//! kit every provider plus its mock must pass.
//!
//! Mocks bind 127.0.0.1 only. Nothing here is used outside tests and benchmarks.

pub mod kit;
pub mod mock;
pub mod runpod;
pub mod vastai;

pub use mock::{Fault, Logged, MockServer};
