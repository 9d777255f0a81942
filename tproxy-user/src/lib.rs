//! tproxy: transparent proxying on Linux with eBPF instead of iptables.
//!
//! A TC ingress program steers connections for the intercepted ports to the
//! relay's transparent listener with `bpf_sk_assign`; policy routing makes
//! the kernel deliver them locally; the relay connects to each connection's
//! original destination and copies both ways.
//!
//! - [`Interceptor`]: the program, its maps and the routing, as one value.
//! - [`relay::TcpRelay`]: the transparent TCP relay.
//! - [`attach::run`]: both together, as `tproxy-user attach` runs them.

pub mod attach;
pub mod datapath;
pub mod error;
pub mod intercept;
pub mod relay;
pub mod routing;
pub mod rules;
pub mod system;
pub mod transparent;

pub use error::{Error, Result};
pub use intercept::{InterceptConfig, Interceptor, RelaySocket};
