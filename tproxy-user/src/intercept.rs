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

/// Mark put on steered packets. Chosen clear of the bits that Kubernetes
/// (0x4000, 0x8000), Cilium (0x0f00), Calico (0xffff0000) and Istio (0x539)
/// use, and of the small values tutorials use.
pub const DEFAULT_MARK: u32 = 0x1e5;
/// Routing table for steered packets (not one of iproute2's named tables).
pub const DEFAULT_TABLE: u32 = 485;
/// Priority of the fwmark rule: before `main` (32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 485;
/// SO_MARK of the relay's upstream connections; never steered. The relay
/// owns it; it is here too because the interception skips it.
pub use crate::relay::DEFAULT_UPSTREAM_MARK;

/// Where intercepted flows go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The relay sockets given to [`Loaded::start`].
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

/// What to intercept and how to route it.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// The instance's name: it claims `/run/tproxy/<name>.lock` while it
    /// runs, and a later start under the same name cleans up after it.
    pub name: String,
    /// Interfaces whose ingress traffic is inspected.
    pub interfaces: Vec<String>,
    /// cgroup v2 directories whose processes' own connections are
    /// intercepted too (descendants included), by the cgroup hooks: see
    /// [`crate::host::cgroup::open`] for the paths taken.
    pub cgroups: Vec<std::path::PathBuf>,
    /// A cgroup whose processes get `getsockopt(SO_ORIGINAL_DST)` answered
    /// on the connections they accept from `cgroups`' processes, as iptables
    /// REDIRECT's conntrack answers it: a REDIRECT-style proxy behind
    /// [`Target::Port`].
    pub original_dst_cgroup: Option<std::path::PathBuf>,
    /// What to intercept.
    pub rules: Vec<Rule>,
    /// Mark for steered packets; the fwmark rule matches it.
    pub mark: u32,
    /// Routing table with the `local default dev lo` route.
    pub table: u32,
    /// Priority of the fwmark rule.
    pub rule_priority: u32,
    /// The relay's upstream traffic carries this mark (SO_MARK), and packets
    /// carrying it are never steered.
    pub upstream_mark: u32,
    /// When true (the default), `mark`, `table`, `rule_priority` and
    /// `upstream_mark` are replaced at start by the first set, from the
    /// defaults on, that no other live instance and no one else's routing
    /// uses; the start logs which. When false they are used as given, and a
    /// conflict is refused.
    pub choose_free_routing: bool,
    /// Where intercepted flows go: the relay (the default), or another
    /// program's transparent listener.
    pub target: Target,
    /// The relay (or the target's program) reaches upstream from the
    /// client's address: the program then also steers the replies to those
    /// spoofed sockets.
    pub spoof_source: bool,
    /// Also intercept traffic to this host's own addresses. By default it is
    /// left to the host's own services.
    pub intercept_local: bool,
    /// Take over from a running instance of the same name (see
    /// [`crate::attach`]): the programs load and attach beside that
    /// instance's, under a name of their own ([`instance::takeover_name`]),
    /// until [`Interceptor::take_name`].
    pub takeover: bool,
    /// What becomes of packets that may be for an intercepted port but
    /// cannot be parsed whole (first fragments to a gated port, IPv6
    /// extension chains longer than the program walks).
    pub unparsed: Unparsed,
    /// Most of the host's own destinations (its `local` routing table) the
    /// datapath holds. `None`: sized from the host
    /// ([`local_table::default_capacity`]). Past it the programs are told
    /// the table is incomplete and leave what it may lack to the host.
    pub local_dests_capacity: Option<u32>,
}

impl InterceptConfig {
    /// Interception of `rules` on `interfaces`, with routing values chosen
    /// free at start from the defaults on.
    pub fn new(interfaces: Vec<String>, rules: Vec<Rule>) -> Self {
        Self {
            name: DEFAULT_NAME.to_owned(),
            interfaces,
            cgroups: Vec::new(),
            original_dst_cgroup: None,
            rules,
            mark: DEFAULT_MARK,
            table: DEFAULT_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
            upstream_mark: DEFAULT_UPSTREAM_MARK,
            choose_free_routing: true,
            target: Target::Relay,
            spoof_source: false,
            intercept_local: false,
            unparsed: Unparsed::Pass,
            takeover: false,
            local_dests_capacity: None,
        }
    }

    /// Rejects configurations that cannot work, before anything is changed.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        validate_name(&self.name)?;
        if self.interfaces.is_empty() && self.cgroups.is_empty() {
            return bad("no interface or cgroup given".into());
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.interfaces.iter().find(|i| !seen.insert(*i)) {
            return bad(format!("interface {dup} given twice"));
        }
        if self.original_dst_cgroup.is_some() && self.cgroups.is_empty() {
            return bad(
                "answering SO_ORIGINAL_DST needs a cgroup whose connections to answer for".into()
            );
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.cgroups.iter().find(|c| !seen.insert(*c)) {
            return bad(format!("cgroup {} given twice", dup.display()));
        }
        if self.mark == 0 || self.upstream_mark == 0 {
            return bad("marks must not be 0".into());
        }
        if self.mark == self.upstream_mark {
            return bad(format!("--mark and --upstream-mark are both {:#x}", self.mark));
        }
        if matches!(self.table, 0 | 253..=255) {
            return bad(format!("table {} is reserved by the kernel", self.table));
        }
        RuleSet::new(self.rules.clone())?;
        if let Target::Port(target) = &self.target {
            if target.port == 0 {
                return bad("the target port must not be 0".into());
            }
            let unusable = |a: std::net::IpAddr| a.is_unspecified() || a.is_multicast();
            if target.ipv4.is_some_and(|a| unusable(a.into()))
                || target.ipv6.is_some_and(|a| unusable(a.into()) || a.to_ipv4_mapped().is_some())
            {
                return bad("a target address must be one a listener can bind to".into());
            }
        }
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

/// Claims `config.name`, removes what a dead instance of that name left,
/// and chooses the routing (see [`InterceptConfig::choose_free_routing`]),
/// updating `config`; nothing else's state is touched.
fn claim(config: &mut InterceptConfig) -> Result<Claim> {
    let name = match config.takeover {
        true => instance::takeover_name(&config.name),
        false => config.name.clone(),
    };
    let (mut claim, leftover) = Claim::acquire(&name)?;
    netlink::block_on(async {
        remove_recorded(&name, &leftover).await;
        // A takeover killed half way leaves its own records.
        if !config.takeover {
            remove_dead_takeover(&config.name).await;
        }
        // Once recorded, the choice is visible to every later start: the
        // lock covers only choosing and recording.
        let _allocation = AllocationLock::acquire()?;
        choose_routing(config, &name, &mut claim).await
    })??;
    Ok(claim)
}

/// Replaces the config's routing values by the first free set, or checks
/// the given ones, and records the choice before anything is installed.
/// Removes what a takeover of `name` that died before it took the name
/// recorded, unless one is running.
async fn remove_dead_takeover(name: &str) {
    let next = instance::takeover_name(name);
    if let Ok((claim, leftover)) = Claim::acquire(&next) {
        remove_recorded(&next, &leftover).await;
        drop(claim);
    }
}

/// `claimed` is the name this start holds (a takeover's interim one: the
/// instance it takes over counts as live).
async fn choose_routing(
    config: &mut InterceptConfig,
    claimed: &str,
    claim: &mut Claim,
) -> Result<()> {
    let live = instance::live_instances(claimed)?;
    let candidates: Vec<(u32, u32, u32, u32)> = if config.choose_free_routing {
        (0..64)
            .map(|k| {
                (
                    DEFAULT_MARK + 2 * k,
                    DEFAULT_UPSTREAM_MARK + 2 * k,
                    DEFAULT_TABLE + k,
                    DEFAULT_RULE_PRIORITY + k,
                )
            })
            .collect()
    } else {
        vec![(config.mark, config.upstream_mark, config.table, config.rule_priority)]
    };
    let mut first_refusal = None;
    for (mark, upstream, table, priority) in candidates {
        let routing = RoutingConfig { mark, table, priority, ipv6: system::ipv6_enabled() };
        let held = live.iter().find(|(_, s)| {
            let theirs = [s.routing.map(|r| r.mark), Some(s.upstream_mark)];
            s.routing.is_some_and(|r| r.table == table)
                || theirs.contains(&Some(mark))
                || theirs.contains(&Some(upstream))
        });
        let refusal = match held {
            Some((name, _)) => Some(format!(
                "fwmark {mark:#x}, upstream mark {upstream:#x} or table {table} is held by the running instance {name:?}"
            )),
            None => routing::conflicts(&routing).await?.into_iter().next(),
        };
        match refusal {
            Some(why) => {
                first_refusal.get_or_insert(why);
            }
            None => {
                if let Some(why) = &first_refusal {
                    info!(
                        "{why}; this instance uses fwmark {mark:#x}, table {table}, rule priority {priority}, upstream mark {upstream:#x}"
                    );
                }
                (config.mark, config.upstream_mark, config.table, config.rule_priority) =
                    (mark, upstream, table, priority);
                return claim.record_routing(routing, upstream);
            }
        }
    }
    let why = first_refusal.unwrap_or_default();
    Err(Error::RoutingConflict(if config.choose_free_routing {
        format!("no free mark and table near the defaults ({why})")
    } else {
        format!("{why}; give this instance other --mark, --table and --upstream-mark values")
    }))
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

impl Interceptor {
    /// [`Interceptor::load`], then [`Loaded::start`]: on error nothing stays
    /// attached or installed.
    pub async fn start(
        config: InterceptConfig,
        sockets: &[(RelaySocket, BorrowedFd<'_>)],
    ) -> Result<Self> {
        Self::load(config)?.start(sockets).await
    }

    /// Checks the configuration, the privileges, the kernel and the
    /// interfaces, claims the name and loads the programs (see [`Loaded`]).
    pub fn load(mut config: InterceptConfig) -> Result<Loaded> {
        config.validate()?;
        system::check_privileges()?;
        let kernel = kernel::SK_ASSIGN.require()?;
        if let Target::Port(_) = config.target {
            kernel::SOCKMAP_UPDATE.require()?;
        }
        let kinds: Vec<_> = config
            .interfaces
            .iter()
            .map(|iface| system::ifindex(iface).and_then(|_| system::link_kind(iface)))
            .collect::<Result<_>>()?;
        if !config.cgroups.is_empty() {
            kernel::CGROUP_HOOKS.require()?;
        }
        let cgroups =
            config.cgroups.iter().map(|path| cgroup::open(path)).collect::<Result<Vec<_>>>()?;
        let original_dst_cgroup =
            config.original_dst_cgroup.as_deref().map(cgroup::open).transpose()?;
        if !cgroups.is_empty() && !kernel::NETNS_COOKIE.in_kernel(kernel) {
            warn!(
                "this kernel cannot name the network namespace to the cgroup hooks (SO_NETNS_COOKIE, 5.14): the cgroup's processes in other network namespaces are rewritten too"
            );
        }
        system::raise_memlock_limit();
        let claim = claim(&mut config)?;
        let datapath = load_programs(&config, &kinds).inspect_err(|_| {
            // Before 5.11 maps count against RLIMIT_MEMLOCK, which only
            // CAP_SYS_RESOURCE can raise.
            if !kernel::MEMCG_ACCOUNTING.in_kernel(kernel) && !nix::unistd::geteuid().is_root() {
                warn!(
                    "on this kernel BPF maps count against RLIMIT_MEMLOCK: raise it for this user (systemd: LimitMEMLOCK=infinity; prlimit --memlock=unlimited)"
                );
            }
        })?;
        Ok(Loaded { config, kinds, cgroups, original_dst_cgroup, claim, datapath, kernel })
    }
}

impl Loaded {
    /// The configuration, with the routing values chosen.
    pub fn config(&self) -> &InterceptConfig {
        &self.config
    }

    /// Registers the relay's sockets, installs the rules and the routing,
    /// and attaches to every interface. What is left needs CAP_NET_ADMIN
    /// only.
    pub async fn start(self, sockets: &[(RelaySocket, BorrowedFd<'_>)]) -> Result<Interceptor> {
        let Loaded { config, kinds, cgroups, original_dst_cgroup, claim, mut datapath, kernel } =
            self;
        if let (Target::Port(target), false) = (config.target, sockets.is_empty()) {
            return Err(Error::Config(format!(
                "relay sockets given to interception that steers to port {}",
                target.port
            )));
        }
        for &(socket, fd) in sockets {
            if socket.loopback() {
                let addr = socket2::SockRef::from(&fd)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| Error::Config(format!("{socket:?} socket is not bound")))?;
                datapath.set_cgroup_target(socket.slot(), Some(addr))?;
            } else {
                datapath.set_listener(socket.slot(), &fd)?;
            }
        }
        if let (Target::Port(target), false) = (config.target, cgroups.is_empty()) {
            let v4 = target.ipv4.unwrap_or(Ipv4Addr::LOCALHOST);
            let v6 = target.ipv6.unwrap_or(Ipv6Addr::LOCALHOST);
            for (slot, ip) in [
                (tproxy_ebpf::slot::TCP_V4, v4.into()),
                (tproxy_ebpf::slot::UDP_V4, v4.into()),
                (tproxy_ebpf::slot::TCP_V6, v6.into()),
                (tproxy_ebpf::slot::UDP_V6, v6.into()),
            ] {
                datapath
                    .set_cgroup_target(slot, Some(std::net::SocketAddr::new(ip, target.port)))?;
            }
        }
        let original_dsts =
            if cgroups.is_empty() { None } else { Some(datapath.take_original_dsts()?) };
        match datapath.attach_reopen() {
            // Before 6.5 it also hands new flows to another program's
            // SO_REUSEPORT listener (see `Target::Port`).
            Err(e) if matches!(config.target, Target::Port(_)) => return Err(e),
            Err(e) => warn!("{e}: a SYN that meets a TIME_WAIT socket will wait for its retry"),
            Ok(()) => {}
        }
        // Before anything is attached: the host's own traffic is never steered.
        let local_table = LocalTable::start(datapath.take_local_dests()?).await?;
        let mut interceptor = Interceptor {
            datapath,
            local_table: Some(local_table),
            routing: None,
            qdiscs: CreatedQdiscs(Vec::new()),
            claim,
            config,
            rules: RuleSet::default(),
            gated_tcp: HashSet::new(),
            rules_tx: watch::Sender::new(Arc::default()),
            original_dsts,
        };
        interceptor.set_rules(interceptor.config.rules.clone())?;
        interceptor.routing = Some(PolicyRouting::install(interceptor.config.routing()).await?);
        let tcx = kernel::TCX.in_kernel(kernel);
        for (iface, kind) in interceptor.config.interfaces.iter().zip(kinds) {
            let attached = interceptor.datapath.attach(iface, kind, tcx)?;
            if attached.created_qdisc {
                interceptor.qdiscs.0.push(iface.clone());
                interceptor.claim.record_qdisc(iface)?;
            }
            if let Some(filter) = attached.filter {
                interceptor.claim.record(filter)?;
            }
        }
        if let Some(proxy) = &original_dst_cgroup {
            interceptor.datapath.attach_original_dst_answers(&cgroups, proxy)?;
        }
        for cgroup in &cgroups {
            interceptor.datapath.attach_cgroup(cgroup)?;
        }
        let mut places: Vec<String> = Vec::new();
        if !interceptor.config.interfaces.is_empty() {
            places.push(format!(
                "{} at TC ingress ({})",
                interceptor.config.interfaces.join(", "),
                if tcx { "tcx" } else { "netlink clsact" }
            ));
        }
        if !cgroups.is_empty() {
            let paths: Vec<String> = cgroups.iter().map(|c| c.path.display().to_string()).collect();
            places.push(format!("cgroup {}", paths.join(", ")));
        }
        info!(
            "attached to {}; rules: {}",
            places.join(" and "),
            interceptor.rules.iter().map(|(_, r)| r.to_string()).collect::<Vec<_>>().join(", ")
        );
        // The TC program's lookup: the cgroup hooks connect to the target
        // like any client.
        if let (Target::Port(target), false) =
            (interceptor.config.target, interceptor.config.interfaces.is_empty())
        {
            let protocols: HashSet<Protocol> =
                interceptor.rules.gated_ports().map(|(p, _)| p).collect();
            for finding in check_port_target(&target, &protocols) {
                warn!("{finding}");
            }
        }
        Ok(interceptor)
    }
}

impl Interceptor {
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
        self.datapath.replace_rules(next.entries().iter().copied())?;
        // The first set narrows nothing: TIME_WAIT sockets on its ports are
        // not ours (an earlier run's were removed with its records).
        let narrowed = !self.rules.is_empty();
        self.rules = next;
        self.rules_tx.send_replace(Arc::new(self.rules.clone()));
        if narrowed {
            self.remove_unsteered_time_waits();
        }
        Ok(())
    }

    /// The rules in force, updated on every change: the relays end what
    /// they hold for flows no rule intercepts any more.
    pub fn watch_rules(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.rules_tx.subscribe()
    }

    /// The relay's TIME_WAIT sockets carry clients' tuples; for a flow no
    /// rule intercepts now, early demux would attach one to the client's
    /// next forwarded SYN, which `ip_forward` drops for up to a minute.
    fn remove_unsteered_time_waits(&self) {
        let (rules, gated) = (&self.rules, &self.gated_tcp);
        let unsteered = |id: &crate::host::sock_diag::SocketId| {
            let (l, r) = (id.source_address, id.destination_address);
            let (lp, rp) = (id.source_port, id.destination_port);
            // Client side: bound to the destination; spoofed upstream:
            // bound to the client.
            let steered = (gated.contains(&lp) && rules.intercepts(Protocol::Tcp, r, l, lp))
                || (gated.contains(&rp) && rules.intercepts(Protocol::Tcp, l, r, rp));
            (gated.contains(&lp) || gated.contains(&rp)) && !steered
        };
        timewait::purge(Purge::Where(&unsteered), Whose::Ours("of flows no rule intercepts now"));
    }

    /// Where the host's own intercepted sockets meant to go (when there are
    /// [`InterceptConfig::cgroups`]), for the relays' loopback sockets.
    pub fn original_dsts(&self) -> Option<&OriginalDsts> {
        self.original_dsts.as_ref()
    }

    /// A takeover's last step: claims the instance's own name, which the
    /// instance taken over has let go of (or died holding: what it recorded
    /// is removed then), and moves this interceptor's records there.
    ///
    /// `patience`: how long a holder may take to let go (a process being
    /// killed closes its lock after its sockets).
    pub async fn take_name(&mut self, patience: std::time::Duration) -> Result<()> {
        let name = self.config.name.clone();
        let deadline = std::time::Instant::now() + patience;
        let leftover = loop {
            match self.claim.rename(&name) {
                Err(Error::InstanceRunning(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                taken => break taken?,
            }
        };
        remove_recorded(&name, &leftover).await;
        self.config.takeover = false;
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
    pub async fn stop(self) -> Result<()> {
        self.stop_then(async {}).await
    }

    /// Detaches, removes the routing and the qdiscs this instance created,
    /// then runs `before_release` (the relays closing, say), and gives up the
    /// name last, so that no other start under the name can meet half of it.
    pub async fn stop_then(
        self,
        before_release: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let Self { datapath, local_table, routing, qdiscs, claim, .. } = self;
        drop(datapath);
        drop(local_table);
        let removed = match routing {
            Some(routing) => routing.remove().await,
            None => Ok(()),
        };
        qdiscs.remove().await;
        before_release.await;
        drop(claim);
        removed
    }
}

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

/// clsact qdiscs this instance created; removed at the end unless some
/// other filter now uses them.
struct CreatedQdiscs(Vec<String>);

impl CreatedQdiscs {
    async fn remove(mut self) {
        for iface in std::mem::take(&mut self.0) {
            datapath::remove_clsact_if_unused(&iface).await;
        }
    }
}

impl Drop for CreatedQdiscs {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let ifaces = std::mem::take(&mut self.0);
        let _ = netlink::block_on(async {
            for iface in &ifaces {
                datapath::remove_clsact_if_unused(iface).await;
            }
        });
    }
}

/// Removes what a dead instance recorded: its netlink filters and the
/// qdiscs it created, its routing, and its relay's TIME_WAIT sockets, which
/// would black-hole clients reusing their ports for a minute.
async fn remove_recorded(name: &str, leftover: &instance::InstanceState) {
    if leftover.netns != 0 && instance::netns_id().is_ok_and(|id| id != leftover.netns) {
        warn!(
            "instance {name:?} last ran in another network namespace; what it left there can only be removed there"
        );
        return;
    }
    for filter in &leftover.filters {
        datapath::remove_filter(filter).await;
    }
    for iface in &leftover.qdiscs {
        datapath::remove_clsact_if_unused(iface).await;
    }
    if let Some(routing) = &leftover.routing {
        match routing::remove(routing).await {
            Ok(()) => warn!(
                "removed the policy routing an earlier run of {name:?} left (fwmark {:#x}, table {})",
                routing.mark, routing.table
            ),
            Err(e) => warn!("could not remove an earlier run's routing: {e}"),
        }
    }
    if leftover.tcp_ports.is_empty() {
        return;
    }
    let ports: HashSet<u16> = leftover.tcp_ports.iter().copied().collect();
    timewait::purge(Purge::Ports(&ports), Whose::Leftover);
}

/// Loads the programs for `config`, with the TC programs for the interface
/// kinds in `links` (see [`Datapath::load`]).
pub fn load_programs(config: &InterceptConfig, links: &[system::LinkKind]) -> Result<Datapath> {
    let target = match config.target {
        Target::Relay => None,
        Target::Port(t) => Some(t),
    };
    Datapath::load(&datapath::Settings {
        mark: config.mark,
        upstream_mark: config.upstream_mark,
        return_path: config.spoof_source,
        intercept_local: config.intercept_local,
        drop_unparsed: config.unparsed == Unparsed::Drop,
        trace: false,
        ethernet_links: links.contains(&system::LinkKind::Ethernet),
        l3_links: links.contains(&system::LinkKind::L3),
        target_port: target.map_or(0, |t| t.port),
        target_owner: target.map_or(0, |t| t.owner.unwrap_or(u32::MAX)),
        target_ipv4: target.and_then(|t| t.ipv4),
        target_ipv6: target.and_then(|t| t.ipv6),
        cgroup_hooks: !config.cgroups.is_empty(),
        original_dst_answers: config.original_dst_cgroup.is_some(),
        netns_cookie: if config.cgroups.is_empty() { 0 } else { system::netns_cookie() },
        local_dests_capacity: config
            .local_dests_capacity
            .unwrap_or_else(local_table::default_capacity),
    })
}

/// `tproxy-user cleanup`: removes exactly what a dead instance named `name`
/// recorded (nothing when it never ran), and every tproxy TC filter on
/// `interfaces` that no live instance recorded, for when records are lost.
/// Refuses while `name` runs.
pub async fn remove_leftovers(name: &str, interfaces: &[String]) -> Result<()> {
    validate_name(name)?;
    let Some(leftover) = instance::leftovers(name)? else {
        return Err(Error::InstanceRunning(name.to_owned()));
    };
    remove_recorded(name, &leftover).await;
    // The dead instance's control socket.
    let _ = std::fs::remove_file(crate::instance::socket_path(name));
    let live: Vec<instance::NetlinkFilter> =
        instance::live_instances(name)?.into_iter().flat_map(|(_, s)| s.filters).collect();
    for iface in interfaces {
        datapath::remove_unrecorded_filters(iface, &live).await?;
    }
    Ok(())
}
