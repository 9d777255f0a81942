//! The interception controller: the TC program on a set of interfaces, the
//! ports it intercepts, and the policy routing it needs, as one value.

use std::{collections::HashSet, os::fd::BorrowedFd};

use tproxy_ebpf::PROTO_TCP;
use tracing::{info, warn};

use crate::{
    datapath::{self, Datapath, DatapathStats},
    error::{Error, Result},
    routing::{self, PolicyRouting, RoutingConfig},
    system,
};

/// Mark put on steered packets. Chosen clear of the bits that Kubernetes
/// (0x4000, 0x8000), Cilium (0x0f00), Calico (0xffff0000) and Istio (0x539)
/// use, and of the small values tutorials use.
pub const DEFAULT_MARK: u32 = 0x1e5;
/// Routing table for steered packets (not one of iproute2's named tables).
pub const DEFAULT_TABLE: u32 = 485;
/// Priority of the fwmark rule: before `main` (32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 485;
/// SO_MARK of the relay's upstream connections; never steered.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x1e6;

/// What to intercept and how to route it.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// Interfaces whose ingress traffic is inspected.
    pub interfaces: Vec<String>,
    /// TCP destination ports to intercept.
    pub tcp_ports: Vec<u16>,
    /// Mark for steered packets; the fwmark rule matches it.
    pub mark: u32,
    /// Routing table with the `local default dev lo` route.
    pub table: u32,
    /// Priority of the fwmark rule.
    pub rule_priority: u32,
    /// Packets already carrying this mark are never steered.
    pub bypass_mark: u32,
}

impl InterceptConfig {
    pub fn new(interfaces: Vec<String>, tcp_ports: Vec<u16>) -> Self {
        Self {
            interfaces,
            tcp_ports,
            mark: DEFAULT_MARK,
            table: DEFAULT_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
            bypass_mark: DEFAULT_UPSTREAM_MARK,
        }
    }

    /// Rejects configurations that cannot work, before anything is changed.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.interfaces.is_empty() {
            return bad("no interface given".into());
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.interfaces.iter().find(|i| !seen.insert(*i)) {
            return bad(format!("interface {dup} given twice"));
        }
        if self.tcp_ports.is_empty() {
            return bad("no port given".into());
        }
        if self.tcp_ports.contains(&0) {
            return bad("port 0 cannot be intercepted".into());
        }
        if self.mark == 0 || self.bypass_mark == 0 {
            return bad("marks must not be 0".into());
        }
        if self.mark == self.bypass_mark {
            return bad(format!("--mark and --upstream-mark are both {:#x}", self.mark));
        }
        if matches!(self.table, 0 | 253..=255) {
            return bad(format!("table {} is reserved by the kernel", self.table));
        }
        Ok(())
    }

    fn routing(&self) -> RoutingConfig {
        RoutingConfig {
            mark: self.mark,
            table: self.table,
            priority: self.rule_priority,
            ipv6: system::ipv6_enabled(),
        }
    }
}

/// Which of the relay's sockets a `BorrowedFd` is, for [`Interceptor::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySocket {
    TcpV4,
    TcpV6,
}

impl RelaySocket {
    fn slot(self) -> u32 {
        match self {
            Self::TcpV4 => tproxy_ebpf::slot::TCP_V4,
            Self::TcpV6 => tproxy_ebpf::slot::TCP_V6,
        }
    }
}

/// Running interception. Dropping it detaches the program and removes the
/// routing; [`Interceptor::stop`] does the same and reports errors.
pub struct Interceptor {
    // Field order is drop order: detach before the routing goes.
    datapath: Datapath,
    routing: Option<PolicyRouting>,
    config: InterceptConfig,
}

impl Interceptor {
    /// Checks the host and the configuration, removes what an earlier killed
    /// run left behind, then loads the program, registers the relay's sockets,
    /// installs the routing and attaches to every interface. On error nothing
    /// stays attached or installed.
    pub async fn start(
        config: InterceptConfig,
        sockets: &[(RelaySocket, BorrowedFd<'_>)],
    ) -> Result<Self> {
        let kernel = preflight(&config)?;
        remove_leftovers(&config).await?;

        let mut datapath = Datapath::load(config.mark, config.bypass_mark)?;
        for &(socket, fd) in sockets {
            datapath.set_listener(socket.slot(), &fd)?;
        }
        for &port in &config.tcp_ports {
            datapath.set_port(PROTO_TCP, port, true)?;
        }
        if let Err(e) = datapath.attach_reopen() {
            warn!("{e}: a SYN that meets a TIME_WAIT socket will wait for its retry");
        }
        let routing = PolicyRouting::install(config.routing()).await?;
        let mut interceptor = Self { datapath, routing: Some(routing), config };
        let tcx = system::has_tcx(kernel);
        for iface in &interceptor.config.interfaces {
            interceptor.datapath.attach(iface, tcx)?;
        }
        info!(
            "attached to {} at TC ingress ({}), intercepting tcp ports {:?}",
            interceptor.config.interfaces.join(", "),
            if tcx { "tcx" } else { "netlink clsact" },
            interceptor.config.tcp_ports
        );
        Ok(interceptor)
    }

    /// The configuration this interceptor runs with.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// The program's counters.
    pub fn stats(&self) -> Result<DatapathStats> {
        self.datapath.stats()
    }

    /// Detaches and removes the routing.
    pub async fn stop(mut self) -> Result<()> {
        let routing = self.routing.take();
        drop(self);
        match routing {
            Some(routing) => routing.remove().await,
            None => Ok(()),
        }
    }
}

/// Everything that can be checked before changing anything: the
/// configuration, privileges, the kernel, and that the interfaces exist.
pub fn preflight(config: &InterceptConfig) -> Result<aya::util::KernelVersion> {
    config.validate()?;
    system::check_privileges()?;
    let kernel = system::check_kernel()?;
    for iface in &config.interfaces {
        system::ifindex(iface)?;
    }
    Ok(kernel)
}

/// Removes what a killed instance with this configuration left behind:
/// netlink TC filters on its interfaces, and its rules and routes.
pub async fn remove_leftovers(config: &InterceptConfig) -> Result<()> {
    for iface in &config.interfaces {
        datapath::remove_leftover_filters(iface);
    }
    routing::remove(&config.routing()).await
}
