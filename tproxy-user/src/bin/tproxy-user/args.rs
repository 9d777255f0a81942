//! The command line's grammar: every subcommand and option, with the help
//! text that `--help`, the man page and the completions are made from.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tproxy_user::{
    relay::{tcp, udp},
    rules::{Protocol, Rule, parse_ports},
};

#[derive(Parser)]
#[command(
    name = "tproxy-user",
    version,
    about = "Transparent proxying with eBPF instead of iptables",
    long_about = "Transparent proxying with eBPF instead of iptables: a TC program steers TCP and \
UDP flows arriving on interfaces, by rule, to a transparent relay that connects to each flow's \
original destination, or to another program's transparent listener (--to-port). IPv4 and IPv6. \
`attach` runs until SIGINT or SIGTERM and removes everything it added; SIGHUP re-reads its \
--config. Instances keep their lock, state and control socket in $RUNTIME_DIRECTORY, or \
/run/tproxy."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Intercept TCP and UDP ports arriving on interfaces and relay each
    /// connection and datagram to its original destination. Runs until SIGINT
    /// or SIGTERM, then removes everything it added.
    Attach(Box<AttachArgs>),
    /// Run only the relays on a fixed port, for steering by your own rules
    /// (iptables `-j TPROXY --on-port`). Nothing is attached or routed.
    Relay(RelayArgs),
    #[command(flatten)]
    Other(OtherCommand),
}

/// The commands that run no datapath or relay of their own.
#[derive(Subcommand)]
pub(crate) enum OtherCommand {
    /// Add, delete or list the ports a running instance intercepts.
    Port {
        #[command(subcommand)]
        action: PortAction,
    },
    /// Add, delete or list a running instance's rules.
    Rule {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Re-read a running instance's --config file and apply it atomically
    /// (SIGHUP does the same).
    Reload(InstanceArgs),
    /// Print a running instance's counters.
    Stats {
        #[command(flatten)]
        instance: InstanceArgs,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Also the counters at 0 (JSON always has them).
        #[arg(long, conflicts_with = "json")]
        all: bool,
    },
    /// Check this host for what tproxy needs and what gets in its way; each
    /// finding comes with its fix. Exits non-zero if anything fails.
    Doctor(DoctorArgs),
    /// Remove what a killed `attach` left behind: the TC filters it recorded
    /// and the policy routing for the mark and table.
    Cleanup(CleanupArgs),
    /// Print a shell completion script, e.g. `tproxy-user completions bash >
    /// /usr/share/bash-completion/completions/tproxy-user`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `tproxy-user man | man -l -`, or
    /// write it and one page per subcommand into a directory.
    Man {
        /// Write tproxy-user.1 and tproxy-user-<command>.1 here.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct InstanceArgs {
    /// Which instance (as given to `attach --name`).
    #[arg(long, default_value = tproxy_user::instance::DEFAULT_NAME)]
    pub(crate) name: String,
}

#[derive(Subcommand)]
pub(crate) enum PortAction {
    /// Start intercepting a port or range.
    Add(PortArgs),
    /// Stop intercepting a port or range (as added); established connections keep flowing.
    Del(PortArgs),
    /// List the rules in force.
    List(InstanceArgs),
}

#[derive(Args)]
pub(crate) struct PortArgs {
    /// The port or range.
    #[arg(value_name = "PORT[-PORT]", value_parser = parse_ports)]
    pub(crate) ports: RangeInclusive<u16>,
    /// Only this protocol (repeatable); both by default.
    #[arg(long = "proto", value_name = "tcp|udp")]
    pub(crate) protocols: Vec<Protocol>,
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
}

impl PortArgs {
    /// The port rule in text form.
    pub(crate) fn rule(&self) -> String {
        let protocols =
            if self.protocols.is_empty() { Protocol::ALL.to_vec() } else { self.protocols.clone() };
        Rule::ports(&protocols, self.ports.clone()).to_string()
    }
}

#[derive(Subcommand)]
pub(crate) enum RuleAction {
    /// Add a rule: '[tcp|udp/]PORT[-PORT] [to CIDR] [from CIDR] [via NAME|direct] [exclude]'.
    Add(RuleArgs),
    /// Delete a rule, written as `rule list` shows it.
    Del(RuleArgs),
    /// List the rules in force.
    List(InstanceArgs),
}

#[derive(Args)]
pub(crate) struct RuleArgs {
    /// The rule (quote it).
    pub(crate) rule: Rule,
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
}

/// The routing values. Left out, `attach` takes the first free set from
/// the defaults on (another instance or someone else's routing may hold
/// them); given, they are used as they are, and a conflict is refused.
#[derive(Args)]
pub(crate) struct RoutingArgs {
    /// Mark put on steered packets (decimal or 0x hex) [default: 0x1e5, or the next free]
    #[arg(long, value_parser = parse_u32)]
    pub(crate) mark: Option<u32>,
    /// Routing table that delivers marked packets locally [default: 485, or the next free]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=u32::MAX as i64))]
    pub(crate) table: Option<u32>,
    /// Priority of the `fwmark → table` rule [default: 485, or the next free]
    #[arg(long)]
    pub(crate) rule_priority: Option<u32>,
}

impl RoutingArgs {
    pub(crate) fn given(&self) -> bool {
        self.mark.is_some() || self.table.is_some() || self.rule_priority.is_some()
    }
}

#[derive(Args)]
pub(crate) struct AttachArgs {
    /// Interfaces to intercept on (TC ingress); optional with --cgroup.
    #[arg(required_unless_present = "cgroups", value_name = "IFACE")]
    pub(crate) interfaces: Vec<String>,
    /// Also intercept the connections that processes in this cgroup v2
    /// (and its descendants) make themselves, by the same rules (repeatable).
    /// A full path, or one from the cgroup2 mount (/system.slice/x.service).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub(crate) cgroups: Vec<PathBuf>,
    /// Answer getsockopt(SO_ORIGINAL_DST) for the processes of this cgroup
    /// on the connections they accept from --cgroup's: for a REDIRECT-style
    /// proxy (redsocks, say) on --to-port.
    #[arg(long, value_name = "PATH", requires = "cgroups")]
    pub(crate) original_dst_cgroup: Option<PathBuf>,
    /// Take over from the running instance of this --name without dropping
    /// a connection: attach beside it, then it lets go of the name and
    /// drains (see --drain-timeout). With none running, an ordinary start.
    #[arg(long)]
    pub(crate) takeover: bool,
    /// When a --takeover replaces this instance: how long it keeps relaying
    /// its connections and UDP sessions before closing what is left.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub(crate) drain_timeout: f64,
    /// Destination port or range to intercept, e.g. 80 or 8000-8099 (repeatable).
    #[arg(long = "port", short = 'p', value_name = "PORT[-PORT]", value_parser = parse_ports)]
    pub(crate) ports: Vec<RangeInclusive<u16>>,
    /// Limit --port to a protocol (repeatable); both TCP and UDP by default.
    #[arg(long = "proto", value_name = "tcp|udp")]
    pub(crate) protocols: Vec<Protocol>,
    /// A rule: '[tcp|udp/]PORT[-PORT] [to CIDR] [from CIDR] [via NAME|direct] [exclude]' (repeatable).
    #[arg(long = "rule", value_name = "RULE")]
    pub(crate) rules: Vec<Rule>,
    /// A TOML rules file, added to --port and --rule; re-read on SIGHUP and
    /// by `tproxy-user reload`.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Also reload --config whenever its content changes (for a
    /// Kubernetes ConfigMap, which nothing sends SIGHUP for).
    #[arg(long, requires = "config")]
    pub(crate) watch_config: bool,
    /// Name of this instance, for `port`, `rule`, `reload` and `stats`.
    #[arg(long, default_value = tproxy_user::instance::DEFAULT_NAME)]
    pub(crate) name: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Write one JSON line for every relayed TCP connection and UDP session
    /// as it ends, to PATH (appended; `-`: standard output); SIGHUP reopens
    /// it, for logrotate.
    #[arg(long, value_name = "PATH")]
    pub(crate) access_log: Option<PathBuf>,
    /// Also intercept traffic to this host's own addresses. By default it
    /// goes to the host's own services untouched.
    #[arg(long)]
    pub(crate) intercept_local: bool,
    /// Most of the host's own destinations (its `local` routing table) the
    /// datapath holds. Past it, intercepted packets to the others are
    /// checked against the kernel's routes one by one. Default: four times
    /// the host's addresses and interfaces, at least 16384.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(16..))]
    pub(crate) local_destinations: Option<u32>,
    /// What to do with packets that may be for an intercepted port but
    /// cannot be parsed whole: first fragments to an intercepted port, IPv6
    /// extension chains longer than the program walks. `drop` makes
    /// interception impossible to bypass with them.
    #[arg(long, value_name = "pass|drop", default_value = "pass")]
    pub(crate) unparsed: UnparsedArg,
    /// Steer to whatever transparent listener has this port (HAProxy,
    /// Envoy, Squid, a go-tproxy program) instead of running our relay:
    /// iptables' `TPROXY --on-port`. Flows pass untouched while nothing
    /// listens there.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), conflicts_with_all = RELAY_ONLY)]
    pub(crate) to_port: Option<u16>,
    /// The address the --to-port listener is bound to, when it is not bound
    /// to the wildcard: one IPv4 and one IPv6 at most (`TPROXY --on-ip`).
    #[arg(long, value_name = "ADDR", requires = "to_port")]
    pub(crate) to_addr: Vec<IpAddr>,
    /// The user whose listeners on --to-port may receive flows (name or
    /// uid; `any` for anyone's). While the real listener is down any user
    /// can bind the port: a new flow that meets another user's socket is
    /// dropped and counted (target_foreign). HAProxy and Squid open their
    /// sockets as root before they drop privileges; an Envoy sidecar runs
    /// as its own uid (1337 in Istio).
    #[arg(long, value_name = "USER", default_value = "root", requires = "to_port")]
    pub(crate) to_port_owner: String,
    /// With --to-port: do not steer the replies to the other program's
    /// upstream sockets bound to clients' addresses (HAProxy `usesrc
    /// clientip`, go-tproxy `DialOriginalDestination(false)`), which is on by
    /// default, as the iptables recipe's `-m socket` rule is.
    #[arg(long, requires = "to_port")]
    pub(crate) no_return_path: bool,
    #[command(flatten)]
    pub(crate) routing: RoutingArgs,
    #[command(flatten)]
    pub(crate) relay: RelayArgs,
}

#[derive(Args)]
pub(crate) struct RelayArgs {
    /// Port of the relay's transparent sockets; 0 lets the kernel choose.
    #[arg(long, default_value_t = 0)]
    pub(crate) listen_port: u16,
    /// SO_MARK of the relay's upstream connections, which are never steered
    /// [default: 0x1e6, or with `attach` the next free]
    #[arg(long, value_parser = parse_u32)]
    pub(crate) upstream_mark: Option<u32>,
    /// Connect upstream from the client's own address (both TCP and UDP), so
    /// the server sees the client; replies are steered back on every given
    /// interface.
    #[arg(long, conflicts_with = "upstream")]
    pub(crate) spoof_source: bool,
    /// Reach the original destinations through a proxy:
    /// socks5://[user:pass@]HOST:PORT (TCP and UDP),
    /// http://[user:pass@]HOST:PORT (HTTP CONNECT, TCP), or
    /// proxy-v2://HOST:PORT (a PROXY protocol v2 header, TCP). UDP flows
    /// pass through no proxy but SOCKS5's and are relayed directly.
    /// Repeatable as NAME=URL: a rule with `via NAME` picks that one (`via
    /// direct`: none); the one without a name is the default.
    #[arg(long, value_name = "[NAME=]URL")]
    pub(crate) upstream: Vec<String>,
    /// Read --upstream's [NAME=]URL lines from a file that only its owner
    /// may read (mode 0600 or 0400), so that no password is in the command
    /// line, which every user can read in /proc. A relative PATH is found
    /// in $CREDENTIALS_DIRECTORY when systemd sets it: with
    /// `LoadCredential=upstreams:/etc/tproxy/NAME.upstreams` in the unit,
    /// `--upstream-file upstreams`. `#` starts a comment.
    #[arg(long, value_name = "PATH")]
    pub(crate) upstream_file: Option<PathBuf>,
    /// Seconds to wait for the original destination to accept.
    #[arg(long, default_value_t = tcp::DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    pub(crate) connect_timeout: f64,
    /// Seconds a TCP connection may pass no bytes before it is reset; 0: never.
    #[arg(long, default_value_t = tcp::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    pub(crate) tcp_idle_timeout: f64,
    /// TCP listeners per family, sharing the port with SO_REUSEPORT so that
    /// accepting spreads over cores. Above 1 it needs Linux 6.5 (when
    /// bpf_sk_assign learned reuseport sockets).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub(crate) tcp_listeners: usize,
    /// Most TCP connections relayed at once; past it new ones wait in the
    /// backlog. Default: 65536, or what the open-file limit allows.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) max_connections: Option<usize>,
    /// Most TCP connections relayed at once for one source (see
    /// --source-prefix-v4/-v6); past it the source's new connections are
    /// reset, so that one client cannot hold every slot. 0: no limit.
    /// Default: an eighth of --max-connections.
    #[arg(long)]
    pub(crate) max_connections_per_source: Option<usize>,
    /// Seconds a UDP session may be idle before it is closed.
    #[arg(long, default_value_t = udp::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    pub(crate) udp_idle_timeout: f64,
    /// Most UDP sessions at once; the least recently used are evicted past
    /// it. Default: 16384, or a quarter of what the open-file limit allows.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) max_udp_sessions: Option<usize>,
    /// Most UDP sessions at once for one source; past it the source's
    /// oldest session makes room for its new one, so that it competes only
    /// with itself. 0: no limit. Default: an eighth of --max-udp-sessions.
    #[arg(long)]
    pub(crate) max_udp_sessions_per_source: Option<usize>,
    /// IPv4 clients in one prefix of this length count as one source.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub(crate) source_prefix_v4: u8,
    /// IPv6 clients in one prefix of this length count as one source: a
    /// host usually holds a whole /64 and may send from any address in it.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub(crate) source_prefix_v6: u8,
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// Interfaces you mean to attach to.
    #[arg(value_name = "IFACE")]
    pub(crate) interfaces: Vec<String>,
    #[command(flatten)]
    pub(crate) routing: RoutingArgs,
}

#[derive(Args)]
pub(crate) struct CleanupArgs {
    /// Also remove every tproxy TC filter on these interfaces that no live
    /// instance recorded, for when records under /run/tproxy are lost.
    #[arg(value_name = "IFACE")]
    pub(crate) interfaces: Vec<String>,
    #[command(flatten)]
    pub(crate) instance: InstanceArgs,
}

pub(crate) const DEFAULT_LOG_FILTER: &str = "info";

/// `attach` options that only our relay uses, which `--to-port` refuses.
pub(crate) const RELAY_ONLY: [&str; 15] = [
    "listen_port",
    "upstream_mark",
    "spoof_source",
    "connect_timeout",
    "tcp_idle_timeout",
    "tcp_listeners",
    "max_connections",
    "max_connections_per_source",
    "udp_idle_timeout",
    "max_udp_sessions",
    "max_udp_sessions_per_source",
    "source_prefix_v4",
    "source_prefix_v6",
    "upstream",
    "upstream_file",
];

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

/// `--unparsed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum UnparsedArg {
    Pass,
    Drop,
}

impl From<UnparsedArg> for tproxy_user::intercept::Unparsed {
    fn from(arg: UnparsedArg) -> Self {
        match arg {
            UnparsedArg::Pass => Self::Pass,
            UnparsedArg::Drop => Self::Drop,
        }
    }
}
