//! The `tproxy-user` command line: a thin layer over the library.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tproxy_user::{
    attach::{self, AttachConfig},
    control::{self, Request, Response},
    intercept::{
        self, DEFAULT_MARK, DEFAULT_RULE_PRIORITY, DEFAULT_TABLE, DEFAULT_UPSTREAM_MARK,
        InterceptConfig, PortTarget, Target,
    },
    relay::{
        RelaySettings, SourcePrefixes, TcpRelayConfig, UdpRelayConfig, tcp, udp,
        upstream::Upstreams,
    },
    rules::{Protocol, Rule, parse_ports},
};
use tracing_subscriber::EnvFilter;

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum OtherCommand {
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
struct InstanceArgs {
    /// Which instance (as given to `attach --name`).
    #[arg(long, default_value = tproxy_user::instance::DEFAULT_NAME)]
    name: String,
}

#[derive(Subcommand)]
enum PortAction {
    /// Start intercepting a port or range.
    Add(PortArgs),
    /// Stop intercepting a port or range (as added); established connections keep flowing.
    Del(PortArgs),
    /// List the rules in force.
    List(InstanceArgs),
}

#[derive(Args)]
struct PortArgs {
    /// The port or range.
    #[arg(value_name = "PORT[-PORT]", value_parser = parse_ports)]
    ports: RangeInclusive<u16>,
    /// Only this protocol (repeatable); both by default.
    #[arg(long = "proto", value_name = "tcp|udp")]
    protocols: Vec<Protocol>,
    #[command(flatten)]
    instance: InstanceArgs,
}

impl PortArgs {
    /// The port rule in text form.
    fn rule(&self) -> String {
        let protocols =
            if self.protocols.is_empty() { Protocol::ALL.to_vec() } else { self.protocols.clone() };
        Rule::ports(&protocols, self.ports.clone()).to_string()
    }
}

#[derive(Subcommand)]
enum RuleAction {
    /// Add a rule: '[tcp|udp/]PORT[-PORT] [to CIDR] [from CIDR] [via NAME|direct] [exclude]'.
    Add(RuleArgs),
    /// Delete a rule, written as `rule list` shows it.
    Del(RuleArgs),
    /// List the rules in force.
    List(InstanceArgs),
}

#[derive(Args)]
struct RuleArgs {
    /// The rule (quote it).
    rule: Rule,
    #[command(flatten)]
    instance: InstanceArgs,
}

/// The routing values. Left out, `attach` takes the first free set from
/// the defaults on (another instance or someone else's routing may hold
/// them); given, they are used as they are, and a conflict is refused.
#[derive(Args)]
struct RoutingArgs {
    /// Mark put on steered packets (decimal or 0x hex) [default: 0x1e5, or the next free]
    #[arg(long, value_parser = parse_u32)]
    mark: Option<u32>,
    /// Routing table that delivers marked packets locally [default: 485, or the next free]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=u32::MAX as i64))]
    table: Option<u32>,
    /// Priority of the `fwmark → table` rule [default: 485, or the next free]
    #[arg(long)]
    rule_priority: Option<u32>,
}

impl RoutingArgs {
    fn given(&self) -> bool {
        self.mark.is_some() || self.table.is_some() || self.rule_priority.is_some()
    }
}

#[derive(Args)]
struct AttachArgs {
    /// Interfaces to intercept on (TC ingress); optional with --cgroup.
    #[arg(required_unless_present = "cgroups", value_name = "IFACE")]
    interfaces: Vec<String>,
    /// Also intercept the connections that processes in this cgroup v2
    /// (and its descendants) make themselves, by the same rules (repeatable).
    /// A full path, or one from the cgroup2 mount (/system.slice/x.service).
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<PathBuf>,
    /// Answer getsockopt(SO_ORIGINAL_DST) for the processes of this cgroup
    /// on the connections they accept from --cgroup's: for a REDIRECT-style
    /// proxy (redsocks, say) on --to-port.
    #[arg(long, value_name = "PATH", requires = "cgroups")]
    original_dst_cgroup: Option<PathBuf>,
    /// Take over from the running instance of this --name without dropping
    /// a connection: attach beside it, then it lets go of the name and
    /// drains (see --drain-timeout). With none running, an ordinary start.
    #[arg(long)]
    takeover: bool,
    /// When a --takeover replaces this instance: how long it keeps relaying
    /// its connections and UDP sessions before closing what is left.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    drain_timeout: f64,
    /// Destination port or range to intercept, e.g. 80 or 8000-8099 (repeatable).
    #[arg(long = "port", short = 'p', value_name = "PORT[-PORT]", value_parser = parse_ports)]
    ports: Vec<RangeInclusive<u16>>,
    /// Limit --port to a protocol (repeatable); both TCP and UDP by default.
    #[arg(long = "proto", value_name = "tcp|udp")]
    protocols: Vec<Protocol>,
    /// A rule: '[tcp|udp/]PORT[-PORT] [to CIDR] [from CIDR] [via NAME|direct] [exclude]' (repeatable).
    #[arg(long = "rule", value_name = "RULE")]
    rules: Vec<Rule>,
    /// A TOML rules file, added to --port and --rule; re-read on SIGHUP and
    /// by `tproxy-user reload`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also reload --config whenever its content changes (for a
    /// Kubernetes ConfigMap, which nothing sends SIGHUP for).
    #[arg(long, requires = "config")]
    watch_config: bool,
    /// Name of this instance, for `port`, `rule`, `reload` and `stats`.
    #[arg(long, default_value = tproxy_user::instance::DEFAULT_NAME)]
    name: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Also intercept traffic to this host's own addresses. By default it
    /// goes to the host's own services untouched.
    #[arg(long)]
    intercept_local: bool,
    /// Most of the host's own destinations (its `local` routing table) the
    /// datapath holds. Past it, intercepted packets to the others are
    /// checked against the kernel's routes one by one. Default: four times
    /// the host's addresses and interfaces, at least 16384.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(16..))]
    local_destinations: Option<u32>,
    /// What to do with packets that may be for an intercepted port but
    /// cannot be parsed whole: first fragments to an intercepted port, IPv6
    /// extension chains longer than the program walks. `drop` makes
    /// interception impossible to bypass with them.
    #[arg(long, value_name = "pass|drop", default_value = "pass", value_parser = ["pass", "drop"])]
    unparsed: String,
    /// Steer to whatever transparent listener has this port (HAProxy,
    /// Envoy, Squid, a go-tproxy program) instead of running our relay:
    /// iptables' `TPROXY --on-port`. Flows pass untouched while nothing
    /// listens there.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), conflicts_with_all = RELAY_ONLY)]
    to_port: Option<u16>,
    /// The address the --to-port listener is bound to, when it is not bound
    /// to the wildcard: one IPv4 and one IPv6 at most (`TPROXY --on-ip`).
    #[arg(long, value_name = "ADDR", requires = "to_port")]
    to_addr: Vec<IpAddr>,
    /// The user whose listeners on --to-port may receive flows (name or
    /// uid; `any` for anyone's). While the real listener is down any user
    /// can bind the port: a new flow that meets another user's socket is
    /// dropped and counted (target_foreign). HAProxy and Squid open their
    /// sockets as root before they drop privileges; an Envoy sidecar runs
    /// as its own uid (1337 in Istio).
    #[arg(long, value_name = "USER", default_value = "root", requires = "to_port")]
    to_port_owner: String,
    /// With --to-port: do not steer the replies to the other program's
    /// upstream sockets bound to clients' addresses (HAProxy `usesrc
    /// clientip`, go-tproxy `DialOriginalDestination(false)`), which is on by
    /// default, as the iptables recipe's `-m socket` rule is.
    #[arg(long, requires = "to_port")]
    no_return_path: bool,
    #[command(flatten)]
    routing: RoutingArgs,
    #[command(flatten)]
    relay: RelayArgs,
}

#[derive(Args)]
struct RelayArgs {
    /// Port of the relay's transparent sockets; 0 lets the kernel choose.
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    /// SO_MARK of the relay's upstream connections, which are never steered
    /// [default: 0x1e6, or with `attach` the next free]
    #[arg(long, value_parser = parse_u32)]
    upstream_mark: Option<u32>,
    /// Connect upstream from the client's own address (both TCP and UDP), so
    /// the server sees the client; replies are steered back on every given
    /// interface.
    #[arg(long, conflicts_with = "upstream")]
    spoof_source: bool,
    /// Reach the original destinations through a proxy:
    /// socks5://[user:pass@]HOST:PORT (TCP and UDP),
    /// http://[user:pass@]HOST:PORT (HTTP CONNECT, TCP), or
    /// proxy-v2://HOST:PORT (a PROXY protocol v2 header, TCP). UDP flows
    /// pass through no proxy but SOCKS5's and are relayed directly.
    /// Repeatable as NAME=URL: a rule with `via NAME` picks that one (`via
    /// direct`: none); the one without a name is the default.
    #[arg(long, value_name = "[NAME=]URL")]
    upstream: Vec<String>,
    /// Read --upstream's [NAME=]URL lines from a file that only its owner
    /// may read (mode 0600 or 0400), so that no password is in the command
    /// line, which every user can read in /proc. A relative PATH is found
    /// in $CREDENTIALS_DIRECTORY when systemd sets it: with
    /// `LoadCredential=upstreams:/etc/tproxy/NAME.upstreams` in the unit,
    /// `--upstream-file upstreams`. `#` starts a comment.
    #[arg(long, value_name = "PATH")]
    upstream_file: Option<PathBuf>,
    /// Seconds to wait for the original destination to accept.
    #[arg(long, default_value_t = tcp::DEFAULT_CONNECT_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    connect_timeout: f64,
    /// Seconds a TCP connection may pass no bytes before it is reset; 0: never.
    #[arg(long, default_value_t = tcp::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    tcp_idle_timeout: f64,
    /// TCP listeners per family, sharing the port with SO_REUSEPORT so that
    /// accepting spreads over cores. Above 1 it needs Linux 6.5 (when
    /// bpf_sk_assign learned reuseport sockets).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    tcp_listeners: usize,
    /// Most TCP connections relayed at once; past it new ones wait in the
    /// backlog. Default: 65536, or what the open-file limit allows.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: Option<usize>,
    /// Most TCP connections relayed at once for one source (see
    /// --source-prefix-v4/-v6); past it the source's new connections are
    /// reset, so that one client cannot hold every slot. 0: no limit.
    /// Default: an eighth of --max-connections.
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    /// Seconds a UDP session may be idle before it is closed.
    #[arg(long, default_value_t = udp::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_name = "SECS")]
    udp_idle_timeout: f64,
    /// Most UDP sessions at once; the least recently used are evicted past
    /// it. Default: 16384, or a quarter of what the open-file limit allows.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_udp_sessions: Option<usize>,
    /// Most UDP sessions at once for one source; past it the source's
    /// oldest session makes room for its new one, so that it competes only
    /// with itself. 0: no limit. Default: an eighth of --max-udp-sessions.
    #[arg(long)]
    max_udp_sessions_per_source: Option<usize>,
    /// IPv4 clients in one prefix of this length count as one source.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=32))]
    source_prefix_v4: u8,
    /// IPv6 clients in one prefix of this length count as one source: a
    /// host usually holds a whole /64 and may send from any address in it.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    source_prefix_v6: u8,
}

#[derive(Args)]
struct DoctorArgs {
    /// Interfaces you mean to attach to.
    #[arg(value_name = "IFACE")]
    interfaces: Vec<String>,
    #[command(flatten)]
    routing: RoutingArgs,
}

#[derive(Args)]
struct CleanupArgs {
    /// Also remove every tproxy TC filter on these interfaces that no live
    /// instance recorded, for when records under /run/tproxy are lost.
    #[arg(value_name = "IFACE")]
    interfaces: Vec<String>,
    #[command(flatten)]
    instance: InstanceArgs,
}

const DEFAULT_LOG_FILTER: &str = "info";

/// `attach` options that only our relay uses, which `--to-port` refuses.
const RELAY_ONLY: [&str; 15] = [
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

/// A positive, finite number of seconds.
fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if value > 0.0 => Ok(duration),
        _ => anyhow::bail!("{name} must be a positive number of seconds, at most about 5.8e11"),
    }
}

fn intercept_config(
    interfaces: Vec<String>,
    rules: Vec<Rule>,
    routing: &RoutingArgs,
) -> InterceptConfig {
    InterceptConfig {
        mark: routing.mark.unwrap_or(DEFAULT_MARK),
        table: routing.table.unwrap_or(DEFAULT_TABLE),
        rule_priority: routing.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY),
        choose_free_routing: !routing.given(),
        ..InterceptConfig::new(interfaces, rules)
    }
}

fn attach_config(args: AttachArgs) -> anyhow::Result<AttachConfig> {
    if args.ports.is_empty() && args.rules.is_empty() && args.config.is_none() {
        anyhow::bail!("nothing to intercept: give --port, --rule or --config");
    }
    if !args.protocols.is_empty() && args.ports.is_empty() {
        anyhow::bail!("--proto narrows --port; with --rule, write the protocol in the rule");
    }
    let protocols = if args.protocols.is_empty() { Protocol::ALL.to_vec() } else { args.protocols };
    let mut rules: Vec<Rule> =
        args.ports.into_iter().map(|ports| Rule::ports(&protocols, ports)).collect();
    rules.extend(args.rules);
    let mut intercept = intercept_config(args.interfaces, rules, &args.routing);
    intercept.cgroups = args.cgroups;
    intercept.original_dst_cgroup = args.original_dst_cgroup;
    intercept.takeover = args.takeover;
    intercept.name = args.name;
    intercept.choose_free_routing &= args.relay.upstream_mark.is_none();
    intercept.upstream_mark = args.relay.upstream_mark.unwrap_or(DEFAULT_UPSTREAM_MARK);
    intercept.spoof_source = args.relay.spoof_source;
    if let Some(port) = args.to_port {
        intercept.target = Target::Port(port_target(port, &args.to_addr, &args.to_port_owner)?);
        intercept.spoof_source = !args.no_return_path;
    }
    intercept.intercept_local = args.intercept_local;
    intercept.local_dests_capacity = args.local_destinations;
    intercept.drop_unparsed = args.unparsed == "drop";
    let (tcp, udp) = relay_configs(&args.relay)?;
    Ok(AttachConfig {
        control_socket: Some(tproxy_user::instance::socket_path(&intercept.name)),
        intercept,
        listen_port: args.relay.listen_port,
        ipv6: tproxy_user::host::system::ipv6_enabled(),
        source_prefixes: source_prefixes(&args.relay),
        tcp,
        udp,
        upstreams: upstreams(&args.relay.upstream, args.relay.upstream_file.as_deref())?,
        rules_file: args.config,
        watch_rules_file: args.watch_config,
        metrics: args.metrics,
        drain_timeout: seconds("--drain-timeout", args.drain_timeout)?,
    })
}

/// `--to-port` with its `--to-addr`s and `--to-port-owner`.
fn port_target(port: u16, addrs: &[IpAddr], owner: &str) -> anyhow::Result<PortTarget> {
    let mut target = PortTarget::new(port);
    target.owner = match owner {
        "any" => None,
        uid if uid.parse::<u32>().is_ok() => uid.parse().ok(),
        name => match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Some(user.uid.as_raw()),
            _ => anyhow::bail!("--to-port-owner: no user {name:?}"),
        },
    };
    for addr in addrs {
        let taken = match addr.to_canonical() {
            IpAddr::V4(a) => target.ipv4.replace(a).is_some(),
            IpAddr::V6(a) => target.ipv6.replace(a).is_some(),
        };
        if taken {
            anyhow::bail!("--to-addr: give at most one IPv4 and one IPv6 address");
        }
    }
    Ok(target)
}

/// `--upstream [NAME=]URL`, each, and those of `--upstream-file`.
fn upstreams(given: &[String], file: Option<&std::path::Path>) -> anyhow::Result<Upstreams> {
    let mut upstreams = Upstreams::default();
    for text in given {
        upstreams.add(text).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?;
    }
    if let Some(path) = file {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let path = match credentials {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        };
        upstreams.add_file(&path).map_err(|e| anyhow::anyhow!("--upstream-file: {e}"))?;
    }
    Ok(upstreams)
}

/// What the relays share, for `relay` (`attach` derives it from its
/// interception).
fn relay_settings(args: &RelayArgs) -> anyhow::Result<RelaySettings> {
    Ok(RelaySettings {
        listen_port: args.listen_port,
        ipv6: tproxy_user::host::system::ipv6_enabled(),
        upstream_mark: args.upstream_mark.unwrap_or(DEFAULT_UPSTREAM_MARK),
        spoof_source: args.spoof_source,
        allow_local_destinations: false,
        upstreams: upstreams(&args.upstream, args.upstream_file.as_deref())?,
        loopback: false,
        source_prefixes: source_prefixes(args),
    })
}

fn source_prefixes(args: &RelayArgs) -> SourcePrefixes {
    SourcePrefixes { v4: args.source_prefix_v4, v6: args.source_prefix_v6 }
}

/// A per-source bound as given: 0 is no limit.
fn per_source(given: Option<usize>) -> Option<usize> {
    given.map(|n| if n == 0 { usize::MAX } else { n })
}

fn relay_configs(args: &RelayArgs) -> anyhow::Result<(TcpRelayConfig, UdpRelayConfig)> {
    let idle_timeout = match args.tcp_idle_timeout {
        0.0 => None,
        secs => Some(seconds("--tcp-idle-timeout", secs)?),
    };
    let tcp = TcpRelayConfig {
        connect_timeout: seconds("--connect-timeout", args.connect_timeout)?,
        idle_timeout,
        max_connections: args.max_connections,
        max_connections_per_source: per_source(args.max_connections_per_source),
        listeners: args.tcp_listeners,
    };
    let udp = UdpRelayConfig {
        idle_timeout: seconds("--udp-idle-timeout", args.udp_idle_timeout)?,
        max_sessions: args.max_udp_sessions,
        max_sessions_per_source: per_source(args.max_udp_sessions_per_source),
    };
    Ok((tcp, udp))
}

/// Sends `request` to instance `name`; a refusal becomes the error.
async fn ask(name: &str, request: Request) -> anyhow::Result<Response> {
    tproxy_user::instance::validate_name(name)?;
    match control::request(name, &request).await? {
        Response::Error { message } => Err(anyhow::anyhow!(message)),
        response => Ok(response),
    }
}

async fn print_rules(name: &str) -> anyhow::Result<()> {
    if let Response::Rules { rules } = ask(name, Request::ListRules).await? {
        for rule in rules {
            println!("{rule}");
        }
    }
    Ok(())
}

/// What runs once the runtime is up; `attach` and `relay` are prepared
/// before it, while the process has a single thread.
enum Job {
    Attach(Box<attach::Prepared>),
    Relay(RelaySettings, TcpRelayConfig, UdpRelayConfig),
    Other(OtherCommand),
}

/// Checks the input, loads the programs, and drops every capability the
/// rest of the run does not need. Capabilities are per thread, so this
/// happens before the runtime starts its threads, which inherit the result.
fn prepare(command: Command) -> anyhow::Result<Job> {
    let job = match command {
        Command::Attach(args) => {
            let config = attach_config(*args)?;
            // Before anything is opened or loaded: the helper holds none of it.
            let successor = tproxy_user::upgrade::Successor::fork().context("attach")?;
            Job::Attach(Box::new(
                attach::prepare(config).context("attach")?.upgrade_with(successor),
            ))
        }
        Command::Relay(args) => {
            if args.listen_port == 0 {
                anyhow::bail!("give --listen-port: the port your TPROXY rules send traffic to");
            }
            let (tcp, udp) = relay_configs(&args)?;
            Job::Relay(relay_settings(&args)?, tcp, udp)
        }
        Command::Other(other) => return Ok(Job::Other(other)),
    };
    tproxy_user::host::system::drop_capabilities(
        &tproxy_user::host::system::runtime_capabilities(),
    )?;
    Ok(job)
}

async fn run(job: Job) -> anyhow::Result<()> {
    match job {
        Job::Attach(prepared) => prepared.run(shutdown_signal()?).await.context("attach"),
        Job::Relay(settings, tcp, udp) => {
            attach::relay_only(settings, tcp, udp, shutdown_signal()?).await.context("relay")
        }
        Job::Other(command) => run_other(command).await,
    }
}

async fn run_other(command: OtherCommand) -> anyhow::Result<()> {
    match command {
        OtherCommand::Port { action } => match action {
            PortAction::Add(a) => {
                ask(&a.instance.name, Request::AddRule { rule: a.rule() }).await.map(drop)
            }
            PortAction::Del(a) => {
                ask(&a.instance.name, Request::DeleteRule { rule: a.rule() }).await.map(drop)
            }
            PortAction::List(i) => print_rules(&i.name).await,
        },
        OtherCommand::Rule { action } => match action {
            RuleAction::Add(a) => {
                ask(&a.instance.name, Request::AddRule { rule: a.rule.to_string() }).await.map(drop)
            }
            RuleAction::Del(a) => {
                ask(&a.instance.name, Request::DeleteRule { rule: a.rule.to_string() })
                    .await
                    .map(drop)
            }
            RuleAction::List(i) => print_rules(&i.name).await,
        },
        OtherCommand::Reload(i) => ask(&i.name, Request::Reload).await.map(drop),
        OtherCommand::Stats { instance, json } => {
            if let Response::Stats { stats } = ask(&instance.name, Request::Stats).await? {
                if json {
                    println!("{}", serde_json::to_string_pretty(&stats)?);
                } else {
                    print!("{}", stats.to_table());
                }
            }
            Ok(())
        }
        OtherCommand::Doctor(args) => {
            let config = intercept_config(args.interfaces, vec![], &args.routing);
            let findings = tproxy_user::host::doctor::check(&config).await;
            for finding in &findings {
                println!("{finding}");
            }
            if tproxy_user::host::doctor::failed(&findings) {
                anyhow::bail!("doctor found problems (FAIL above)");
            }
            Ok(())
        }
        OtherCommand::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tproxy-user",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        OtherCommand::Man { dir } => {
            use clap::CommandFactory as _;
            let command = Cli::command();
            match dir {
                Some(dir) => clap_mangen::generate_to(command, &dir)
                    .with_context(|| format!("writing man pages into {}", dir.display())),
                None => clap_mangen::Man::new(command)
                    .render(&mut std::io::stdout())
                    .context("writing the man page"),
            }
        }
        OtherCommand::Cleanup(args) => {
            tproxy_user::host::system::check_privileges()?;
            for iface in &args.interfaces {
                tproxy_user::host::system::ifindex(iface)?;
            }
            intercept::remove_leftovers(&args.instance.name, &args.interfaces)
                .await
                .context("cleanup")?;
            tracing::info!("removed what instance {:?} left behind", args.instance.name);
            Ok(())
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files
        // or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let job = match prepare(cli.command) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("tproxy-user: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tproxy-user: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(job)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tproxy-user: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_out_of_range_are_refused_not_a_panic() {
        for bad in [1e20, f64::INFINITY, f64::NAN, 0.0, -1.0] {
            assert!(seconds("--connect-timeout", bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("--connect-timeout", 2.5).unwrap(), Duration::from_millis(2500));
    }

    #[test]
    fn routing_values_are_chosen_unless_given() {
        let cli = Cli::parse_from(["tproxy-user", "attach", "eth0", "--port", "80"]);
        let Command::Attach(args) = cli.command else { panic!("not attach") };
        let config = attach_config(*args).unwrap();
        assert!(config.intercept.choose_free_routing);
        assert_eq!(config.intercept.mark, DEFAULT_MARK);
        assert_eq!(config.intercept.upstream_mark, DEFAULT_UPSTREAM_MARK);
        let cli = Cli::parse_from(["tproxy-user", "attach", "eth0", "-p", "80", "--mark", "0x10"]);
        let Command::Attach(args) = cli.command else { panic!("not attach") };
        let config = attach_config(*args).unwrap();
        assert!(!config.intercept.choose_free_routing);
        assert_eq!(config.intercept.mark, 0x10);
    }
}
