//! The sandbox the integration tests, the demo and the benchmarks run in:
//! three network namespaces on documentation address ranges.
//!
//! ```text
//!  client ns            proxy ns                     server ns
//!  c0 192.0.2.2 ---- p0 192.0.2.1 | p1 198.51.100.1 ---- s0 198.51.100.10
//!  2001:db8:1::2       2001:db8:1::1 | 2001:db8:2::1      2001:db8:2::10
//! ```
//!
//! The client and the server route through the proxy, which forwards.
//! Everything is removed when the [`Topology`] drops.

mod cgroup;
mod fixtures;
mod netns;
mod proxy;

pub use cgroup::*;
pub use fixtures::*;
pub use netns::*;
pub use proxy::*;
