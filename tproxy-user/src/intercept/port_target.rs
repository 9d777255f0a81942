//! `--to-port`: what stands in the way of steering to another program's
//! listener.

use super::*;

/// Something in the way of steering to a [`PortTarget`] now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortFinding {
    /// Nothing listens there: flows of `proto` pass untouched until a
    /// transparent listener binds the port.
    NoListener {
        /// TCP or UDP.
        proto: Protocol,
        /// The port.
        port: u16,
    },
    /// Only listeners bound to addresses the lookup will not ask for.
    BoundElsewhere {
        /// TCP or UDP.
        proto: Protocol,
        /// The port.
        port: u16,
        /// Where they are bound.
        addrs: Vec<std::net::IpAddr>,
    },
    /// The socket table could not be read.
    Unknown {
        /// TCP or UDP.
        proto: Protocol,
        /// Why.
        error: String,
    },
}

impl std::fmt::Display for PortFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoListener { proto, port } => write!(
                f,
                "nothing listens on {proto} port {port} yet: {proto} flows pass untouched until a transparent listener binds it"
            ),
            Self::BoundElsewhere { proto, port, addrs } => {
                let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                write!(
                    f,
                    "{proto} port {port} is bound only to {}: give --to-addr with that address, or a flow is steered there only when it is its destination",
                    list.join(", ")
                )
            }
            Self::Unknown { proto, error } => {
                write!(f, "could not list {proto} sockets to check the target port: {error}")
            }
        }
    }
}

/// What stands in the way of steering to `target` for `protocols` now, for
/// the start's warnings and the readiness probe.
pub fn check_port_target(target: &PortTarget, protocols: &HashSet<Protocol>) -> Vec<PortFinding> {
    use std::net::IpAddr;

    use crate::host::sock_diag::{self, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, StateFlags};
    let port = target.port;
    let mut findings = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        if !protocols.contains(&proto) {
            continue;
        }
        let (number, states) = match proto {
            Protocol::Tcp => (IPPROTO_TCP, StateFlags::LISTEN),
            // Bound, not connected.
            Protocol::Udp => (IPPROTO_UDP, StateFlags::CLOSE),
        };
        let mut bound: Vec<IpAddr> = Vec::new();
        for family in [AF_INET, AF_INET6] {
            match sock_diag::sockets(family, number, states.clone()) {
                Ok(ids) => bound.extend(
                    ids.iter().filter(|id| id.source_port == port).map(|id| id.source_address),
                ),
                Err(e) => findings.push(PortFinding::Unknown { proto, error: e.to_string() }),
            }
        }
        if bound.is_empty() {
            findings.push(PortFinding::NoListener { proto, port });
            continue;
        }
        let wildcard = bound.iter().any(|a| a.is_unspecified());
        let asked = |a: &IpAddr| match a {
            IpAddr::V4(a) => target.ipv4 == Some(*a),
            IpAddr::V6(a) => target.ipv6 == Some(*a),
        };
        if !wildcard && !bound.iter().any(asked) {
            findings.push(PortFinding::BoundElsewhere { proto, port, addrs: bound });
        }
    }
    findings
}
