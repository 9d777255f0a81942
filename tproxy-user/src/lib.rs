//! tproxy: transparent proxying on Linux with eBPF instead of iptables.
//!
//! A TC ingress program steers connections for the intercepted ports to the
//! relay's transparent listener with `bpf_sk_assign`; policy routing makes
//! the kernel deliver them locally; the relay connects to each connection's
//! original destination and copies both ways. For the host's own
//! connections, cgroup hooks send those of a cgroup's processes to the
//! relay's loopback sockets instead ([`InterceptConfig::cgroups`]).
//!
//! The pieces, from the whole to the parts:
//!
//! - [`attach::run`]: interception plus the TCP and UDP relays, as
//!   `tproxy-user attach` runs them.
//! - [`Interceptor`]: the TC program on a set of interfaces, its [rules]
//!   (changeable while it runs) and the policy routing, as one value that
//!   removes everything when dropped.
//! - [`relay::TcpRelay`], [`relay::UdpRelay`]: the relays.
//! - [`relay::transparent`]: transparent listeners, UDP sockets that report the
//!   original destination and reply from it, and dials from any source.
//!
//! The modules are the layers: [`datapath`] (the program, its maps, the
//! policy routing), [`relay`] (the relays and their transparent sockets),
//! [`control`] (the control socket, the rules file, counters and metrics),
//! [`host`] (privileges, limits, kernel features), and [`instance`] (a
//! named run's lock, state and paths); [`doctor`] inspects them all.
//!
//! Everything returns the typed [`Error`]; nothing panics on bad input.
//!
//! # Example
//!
//! Relay TCP and UDP port 53 arriving on `eth0` to its original destination,
//! connecting upstream as the client, until Ctrl-C:
//!
//! ```no_run
//! use tproxy_user::{attach::{self, AttachConfig}, rules::Rule, InterceptConfig};
//!
//! # async fn example() -> tproxy_user::Result<()> {
//! let mut intercept = InterceptConfig::new(vec!["eth0".into()], vec!["53".parse::<Rule>()?]);
//! intercept.spoof_source = true;
//! attach::run(AttachConfig::new(intercept), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
//!
//! `examples/logging_proxy.rs` builds a proxy from the parts instead.

#![deny(missing_docs)]

pub mod attach;
pub mod control;
pub mod counters;
pub mod datapath;
pub mod doctor;
pub mod error;
pub mod host;
pub mod instance;
pub mod intercept;
pub mod relay;
pub mod rules;
pub mod upgrade;

pub use error::{Error, Result};
pub use intercept::{InterceptConfig, Interceptor, RelaySocket};
