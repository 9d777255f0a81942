//! What the programs are loaded with: the choices they make per packet,
//! set once as the loader's globals.

use std::net::{Ipv4Addr, Ipv6Addr};

#[cfg(doc)]
use super::Datapath;

/// What the programs are loaded with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// Put on steered packets.
    pub mark: u32,
    /// The relay's upstream traffic carries it: never steered.
    pub upstream_mark: u32,
    /// Also steer replies to the relay's spoofed sockets.
    pub return_path: bool,
    /// Also steer traffic to the host's own destinations.
    pub intercept_local: bool,
    /// What becomes of what may be for an intercepted port but cannot be
    /// parsed whole.
    pub unparsed: Unparsed,
    /// Record each parse for [`Datapath::trace_parse`] (tests and
    /// diagnostics; off, it costs nothing).
    pub trace: bool,
    /// Where new flows go: the sockets given to [`Datapath::set_listener`],
    /// or whatever transparent listener has a port.
    pub target: Target,
    /// Load the TC program for Ethernet interfaces.
    pub ethernet_links: bool,
    /// Load the TC program for L3 interfaces (tunnels, TUN, WireGuard).
    /// Each program costs the verifier a few hundred milliseconds: load
    /// only the kinds that will be attached.
    pub l3_links: bool,
    /// Also load the cgroup hooks, for [`Datapath::attach_cgroup`].
    pub cgroup_hooks: bool,
    /// Also load what answers `getsockopt(SO_ORIGINAL_DST)`, for
    /// [`Datapath::attach_original_dst_answers`].
    pub original_dst_answers: bool,
    /// The network namespace whose sockets the cgroup hooks rewrite, by
    /// its cookie; 0: every one.
    pub netns_cookie: u64,
    /// Most entries of the host's own destinations; 0: the program's
    /// default (`MAX_LOCAL_DESTS`).
    pub local_dests_capacity: u32,
}

/// Where intercepted flows go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The relay sockets given to `Loaded::start` (or [`Datapath::set_listener`]).
    #[default]
    Relay,
    /// Whatever transparent listener has this port: another program's
    /// (HAProxy, Envoy, Squid, a go-tproxy program), looked up for each new
    /// flow as the kernel looks up a local destination, so that it may
    /// start, restart or stop at any time. Nothing there: traffic passes
    /// untouched (fail-open), counted as `no_listener`.
    Port(PortTarget),
}

/// [`Target::Port`]: the port, and the addresses its listeners are bound to
/// when not the wildcard (iptables' `TPROXY --on-ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortTarget {
    /// The listeners' port.
    pub port: u16,
    /// The IPv4 listener's address, if it is not bound to the wildcard.
    pub ipv4: Option<Ipv4Addr>,
    /// The IPv6 listener's address, if it is not bound to the wildcard.
    pub ipv6: Option<Ipv6Addr>,
    /// The uid whose listeners on the port may receive flows (the creator
    /// of the socket); `None`: anyone's. While the real listener is down
    /// any user can bind the port, so by default only root's count; a new
    /// flow that meets another user's socket is dropped and counted
    /// (`target_foreign`).
    pub owner: Option<u32>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Relay => f.write_str("the relay"),
            Self::Port(t) => {
                write!(f, "port {}", t.port)?;
                let addrs: Vec<String> =
                    [t.ipv4.map(|a| a.to_string()), t.ipv6.map(|a| a.to_string())]
                        .into_iter()
                        .flatten()
                        .collect();
                if !addrs.is_empty() {
                    write!(f, " of {}", addrs.join(" and "))?;
                }
                Ok(())
            }
        }
    }
}

impl PortTarget {
    /// Listeners on `port` bound to the wildcard (or to the original
    /// destination).
    pub fn new(port: u16) -> Self {
        Self { port, ipv4: None, ipv6: None, owner: Some(0) }
    }
}

/// What becomes of a packet that may be for an intercepted port but cannot
/// be parsed whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unparsed {
    /// It passes untouched, as it would without us.
    #[default]
    Pass,
    /// It is dropped, so that interception cannot be bypassed with it.
    Drop,
}
