//! What to intercept and how: the configuration, checked before anything
//! is touched.

use super::*;

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
