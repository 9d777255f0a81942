//! The interception controller: the TC program on a set of interfaces, the
//! ports it intercepts, and the policy routing it needs, as one value.

use std::{collections::HashSet, os::fd::BorrowedFd};

use tproxy_ebpf::RuleStats;
use tracing::{info, warn};

use crate::{
    control::{DEFAULT_NAME, validate_name},
    datapath::{self, Datapath, DatapathStats},
    error::{Error, Result},
    routing::{self, PolicyRouting, RoutingConfig},
    rules::{Protocol, Rule, RuleSet},
    state::{self, Claim},
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
    /// The instance's name: it claims `/run/tproxy/<name>.lock` while it
    /// runs, and a later start under the same name cleans up after it.
    pub name: String,
    /// Interfaces whose ingress traffic is inspected.
    pub interfaces: Vec<String>,
    /// What to intercept.
    pub rules: Vec<Rule>,
    /// Mark for steered packets; the fwmark rule matches it.
    pub mark: u32,
    /// Routing table with the `local default dev lo` route.
    pub table: u32,
    /// Priority of the fwmark rule.
    pub rule_priority: u32,
    /// Packets already carrying this mark are never steered.
    pub bypass_mark: u32,
    /// Also steer replies addressed to the relay's spoofed upstream sockets
    /// (source spoofing: the relay connects from the client's address).
    pub return_path: bool,
}

impl InterceptConfig {
    /// Interception of `rules` on `interfaces`, with the default mark, table
    /// and rule priority.
    pub fn new(interfaces: Vec<String>, rules: Vec<Rule>) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            interfaces,
            rules,
            mark: DEFAULT_MARK,
            table: DEFAULT_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
            bypass_mark: DEFAULT_UPSTREAM_MARK,
            return_path: false,
        }
    }

    /// Rejects configurations that cannot work, before anything is changed.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        validate_name(&self.name)?;
        if self.interfaces.is_empty() {
            return bad("no interface given".into());
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.interfaces.iter().find(|i| !seen.insert(*i)) {
            return bad(format!("interface {dup} given twice"));
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
        RuleSet::new(self.rules.clone())?;
        Ok(())
    }

    pub(crate) fn routing(&self) -> RoutingConfig {
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
    /// The IPv4 TCP listener.
    TcpV4,
    /// The IPv6 TCP listener.
    TcpV6,
    /// The IPv4 UDP socket.
    UdpV4,
    /// The IPv6 UDP socket.
    UdpV6,
}

impl RelaySocket {
    fn slot(self) -> u32 {
        match self {
            Self::TcpV4 => tproxy_ebpf::slot::TCP_V4,
            Self::TcpV6 => tproxy_ebpf::slot::TCP_V6,
            Self::UdpV4 => tproxy_ebpf::slot::UDP_V4,
            Self::UdpV6 => tproxy_ebpf::slot::UDP_V6,
        }
    }
}

/// Running interception. Dropping it detaches the program and removes the
/// routing; [`Interceptor::stop`] does the same and reports errors.
pub struct Interceptor {
    // Field order is drop order: detach before the routing goes, and give up
    // the name last.
    datapath: Datapath,
    routing: Option<PolicyRouting>,
    claim: Claim,
    config: InterceptConfig,
    rules: RuleSet,
    /// TCP ports gated at some point of the run (gates are never closed).
    gated_tcp: HashSet<u16>,
}

impl Interceptor {
    /// Checks the host and the configuration, removes what an earlier killed
    /// run left behind, then loads the program, registers the relay's sockets,
    /// installs the rules and the routing, and attaches to every interface.
    /// On error nothing stays attached or installed.
    pub async fn start(
        config: InterceptConfig,
        sockets: &[(RelaySocket, BorrowedFd<'_>)],
    ) -> Result<Self> {
        preflight(&config)?;
        let datapath = load(&config)?;
        Self::start_loaded(config, sockets, datapath).await
    }

    /// [`Self::start`] with the programs already loaded by [`load`].
    pub async fn start_loaded(
        config: InterceptConfig,
        sockets: &[(RelaySocket, BorrowedFd<'_>)],
        mut datapath: Datapath,
    ) -> Result<Self> {
        // The programs are loaded: what is left needs CAP_NET_ADMIN.
        let kernel = checks(&config, false)?;
        let (claim, leftover) = Claim::acquire(&config.name)?;
        // A killed run under this name left these; its routing is ours to
        // replace too (same mark and table).
        remove_recorded(&leftover);
        routing::remove(&config.routing()).await?;

        datapath.start_logger();
        for &(socket, fd) in sockets {
            datapath.set_listener(socket.slot(), &fd)?;
        }
        if let Err(e) = datapath.attach_reopen() {
            warn!("{e}: a SYN that meets a TIME_WAIT socket will wait for its retry");
        }
        let mut interceptor = Self {
            datapath,
            routing: None,
            claim,
            config,
            rules: RuleSet::default(),
            gated_tcp: HashSet::new(),
        };
        interceptor.set_rules(interceptor.config.rules.clone())?;
        interceptor.routing = Some(PolicyRouting::install(interceptor.config.routing()).await?);
        let tcx = system::has_tcx(kernel);
        for iface in &interceptor.config.interfaces {
            if let Some(filter) = interceptor.datapath.attach(iface, tcx)? {
                interceptor.claim.record(filter)?;
            }
        }
        info!(
            "attached to {} at TC ingress ({}); rules: {}",
            interceptor.config.interfaces.join(", "),
            if tcx { "tcx" } else { "netlink clsact" },
            interceptor.rules.iter().map(|(_, r)| r.to_string()).collect::<Vec<_>>().join(", ")
        );
        Ok(interceptor)
    }

    /// The configuration this interceptor was started with.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// The rules in force, with their counter ids.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Replaces the rules. The new set is validated first; on error the
    /// running set is unchanged. The switch is atomic for the datapath.
    pub fn set_rules(&mut self, rules: Vec<Rule>) -> Result<()> {
        let next = self.rules.replaced(rules)?;
        self.apply(next)
    }

    /// Adds one rule.
    pub fn add_rule(&mut self, rule: Rule) -> Result<()> {
        let next = self.rules.with(rule)?;
        self.apply(next)
    }

    /// Removes one rule.
    pub fn remove_rule(&mut self, rule: &Rule) -> Result<()> {
        let next = self.rules.without(rule)?;
        self.apply(next)
    }

    /// Starts intercepting `proto` to `port`, for every destination.
    pub fn add_port(&mut self, proto: Protocol, port: u16) -> Result<()> {
        self.add_rule(Rule::port(&[proto], port))
    }

    /// Stops intercepting `proto` to `port` (a rule added by [`Self::add_port`]).
    /// Connections already relayed keep flowing.
    pub fn remove_port(&mut self, proto: Protocol, port: u16) -> Result<()> {
        self.remove_rule(&Rule::port(&[proto], port))
    }

    fn apply(&mut self, next: RuleSet) -> Result<()> {
        for (id, rule) in next.iter() {
            if self.rules.iter().all(|(old_id, old)| old_id != id || old != rule) {
                self.datapath.reset_rule_stats(id)?;
            }
        }
        for (proto, port) in next.gated_ports() {
            self.datapath.open_gate(proto.number(), port)?;
            if proto == Protocol::Tcp {
                self.gated_tcp.insert(port);
            }
        }
        self.claim.record_tcp_ports(self.gated_tcp.iter().copied())?;
        self.datapath.replace_rules(next.entries())?;
        self.rules = next;
        Ok(())
    }

    /// Every TCP port intercepted at some point of this run.
    pub fn intercepted_tcp_ports(&self) -> &HashSet<u16> {
        &self.gated_tcp
    }

    /// The program's counters, all rules together.
    pub fn stats(&self) -> Result<DatapathStats> {
        self.datapath.stats()
    }

    /// The counters of each rule.
    pub fn rule_stats(&self) -> Result<Vec<(Rule, RuleStats)>> {
        self.rules
            .iter()
            .map(|(id, rule)| Ok((rule.clone(), self.datapath.rule_stats(id)?)))
            .collect()
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

/// Removes what a dead instance recorded: its netlink filters, and its
/// relay's TIME_WAIT sockets, which would black-hole clients reusing their
/// ports for a minute.
fn remove_recorded(leftover: &state::InstanceState) {
    leftover.filters.iter().for_each(datapath::remove_filter);
    if leftover.tcp_ports.is_empty() {
        return;
    }
    let ports: HashSet<u16> = leftover.tcp_ports.iter().copied().collect();
    match system::local_addresses()
        .and_then(|local| crate::timewait::remove_relay_time_waits(Some(&ports), &local))
    {
        Ok(0) => {}
        Ok(n) => warn!("removed {n} TIME_WAIT sockets an earlier run left"),
        Err(e) => warn!("could not remove an earlier run's TIME_WAIT sockets: {e}"),
    }
}

/// Loads the programs for `config` (see [`Datapath::load`]).
pub fn load(config: &InterceptConfig) -> Result<Datapath> {
    Datapath::load(config.mark, config.bypass_mark, config.return_path)
}

/// Everything that can be checked before changing anything: the
/// configuration, privileges, the kernel, and that the interfaces exist.
pub fn preflight(config: &InterceptConfig) -> Result<aya::util::KernelVersion> {
    checks(config, true)
}

fn checks(config: &InterceptConfig, loading: bool) -> Result<aya::util::KernelVersion> {
    config.validate()?;
    if loading {
        system::check_privileges()?;
    } else {
        system::check_relay_privileges()?;
    }
    let kernel = system::check_kernel()?;
    for iface in &config.interfaces {
        system::ifindex(iface)?;
    }
    Ok(kernel)
}

/// Removes what a killed instance with this configuration's name left
/// behind: the netlink TC filters it recorded, and its rules and routes
/// (by mark and table). Every tproxy filter on `config.interfaces` goes too,
/// for when the records are lost. Refuses while the instance runs.
pub async fn remove_leftovers(config: &InterceptConfig) -> Result<()> {
    validate_name(&config.name)?;
    let Some(leftover) = state::leftovers(&config.name)? else {
        return Err(Error::Config(format!(
            "instance {:?} is running; stop it instead of cleaning up after it",
            config.name
        )));
    };
    remove_recorded(&leftover);
    // The dead instance's control socket.
    let _ = std::fs::remove_file(crate::control::socket_path(&config.name));
    for iface in &config.interfaces {
        datapath::remove_all_filters(iface);
    }
    routing::remove(&config.routing()).await
}
