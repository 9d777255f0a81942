//! The interception controller: the TC program on a set of interfaces, the
//! ports it intercepts, and the policy routing it needs, as one value.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::BorrowedFd,
    sync::Arc,
};

use tokio::sync::watch;

use tproxy_ebpf::RuleStats;
use tracing::{info, warn};

use crate::{
    datapath::original_dst::OriginalDsts,
    datapath::{
        self, Datapath, DatapathStats,
        local_table::{self, LocalTable},
        routing::{self, PolicyRouting, RoutingConfig},
    },
    error::{Error, Result},
    host::{cgroup, kernel, netlink, system},
    instance::{self, AllocationLock, Claim, DEFAULT_NAME, validate_name},
    relay::timewait::{self, Purge, Whose},
    rules::{Protocol, Rule, RuleSet},
};

mod claim;
mod cleanup;
mod config;
mod load;
mod port_target;
mod running;
mod start;

pub use cleanup::remove_leftovers;
pub use config::*;
pub use datapath::{PortTarget, Target, Unparsed};
pub use load::load_programs;
pub use port_target::{PortFinding, check_port_target};

use cleanup::remove_recorded;
use start::CreatedQdiscs;

/// Interception ready to start: checked, its name claimed (what a dead run
/// under the name recorded is removed), its routing values chosen and
/// recorded, and its programs loaded. Made by [`Interceptor::load`] without
/// an async runtime or threads, so that a process can then drop the
/// capabilities only loading needs; [`Loaded::start`] installs the rest.
pub struct Loaded {
    config: InterceptConfig,
    /// Each interface's link kind, in `config.interfaces` order.
    kinds: Vec<system::LinkKind>,
    /// The cgroups, open, in `config.cgroups` order.
    cgroups: Vec<cgroup::Cgroup>,
    /// `config.original_dst_cgroup`, open.
    original_dst_cgroup: Option<cgroup::Cgroup>,
    claim: Claim,
    datapath: Datapath,
    kernel: aya::util::KernelVersion,
}

/// Which of the relay's sockets a `BorrowedFd` is, for [`Interceptor::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySocket {
    /// The IPv4 TCP listener.
    TcpV4,
    /// The IPv6 TCP listener.
    TcpV6,
    /// The IPv4 UDP socket.
    UdpV4,
    /// The IPv6 UDP socket.
    UdpV6,
    /// The IPv4 TCP listener on loopback that the cgroup hooks send the
    /// host's own connections to (see [`InterceptConfig::cgroups`]).
    LoopbackTcpV4,
    /// The same for IPv6.
    LoopbackTcpV6,
    /// The IPv4 UDP socket on loopback for the host's own datagrams.
    LoopbackUdpV4,
    /// The same for IPv6.
    LoopbackUdpV6,
}

impl RelaySocket {
    fn slot(self) -> u32 {
        use tproxy_ebpf::slot;
        match self {
            Self::TcpV4 | Self::LoopbackTcpV4 => slot::TCP_V4,
            Self::TcpV6 | Self::LoopbackTcpV6 => slot::TCP_V6,
            Self::UdpV4 | Self::LoopbackUdpV4 => slot::UDP_V4,
            Self::UdpV6 | Self::LoopbackUdpV6 => slot::UDP_V6,
        }
    }

    fn loopback(self) -> bool {
        matches!(
            self,
            Self::LoopbackTcpV4 | Self::LoopbackTcpV6 | Self::LoopbackUdpV4 | Self::LoopbackUdpV6
        )
    }
}

/// Running interception. Dropping it detaches the program and removes the
/// routing; [`Interceptor::stop`] does the same and reports errors.
pub struct Interceptor {
    // Field order is drop order: detach before the routing goes, and give up
    // the name last.
    datapath: Datapath,
    local_table: Option<LocalTable>,
    routing: Option<PolicyRouting>,
    qdiscs: CreatedQdiscs,
    claim: Claim,
    config: InterceptConfig,
    rules: RuleSet,
    /// TCP ports gated at some point of the run (gates are never closed).
    gated_tcp: HashSet<u16>,
    /// The rules in force, for the relays.
    rules_tx: watch::Sender<Arc<RuleSet>>,
    /// The cgroup hooks' record, when there are cgroups.
    original_dsts: Option<OriginalDsts>,
}
