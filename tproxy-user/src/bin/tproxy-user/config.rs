//! The library's configurations made from the parsed command line.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use tproxy_user::{
    attach::AttachConfig,
    intercept::{
        DEFAULT_MARK, DEFAULT_RULE_PRIORITY, DEFAULT_TABLE, DEFAULT_UPSTREAM_MARK, InterceptConfig,
        PortTarget, Target,
    },
    relay::{RelaySettings, SourcePrefixes, TcpRelayConfig, UdpRelayConfig, upstream::Upstreams},
    rules::{Protocol, Rule},
};

use crate::args::{AttachArgs, RelayArgs, RoutingArgs};

/// A positive, finite number of seconds.
fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if value > 0.0 => Ok(duration),
        _ => anyhow::bail!("{name} must be a positive number of seconds, at most about 5.8e11"),
    }
}

pub(crate) fn intercept_config(
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

pub(crate) fn attach_config(args: AttachArgs) -> anyhow::Result<AttachConfig> {
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
    intercept.unparsed = args.unparsed.into();
    let (tcp, udp) = relay_configs(&args.relay)?;
    Ok(AttachConfig {
        relay: relay_settings(&args.relay)?,
        tcp,
        udp,
        rules_file: args.config,
        watch_rules_file: args.watch_config,
        metrics: args.metrics,
        access_log: args.access_log,
        drain_timeout: seconds("--drain-timeout", args.drain_timeout)?,
        ..AttachConfig::new(intercept)
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

/// What the relays share, as given (`attach` takes the mark, spoofing, local
/// destinations and loopback from its interception instead).
pub(crate) fn relay_settings(args: &RelayArgs) -> anyhow::Result<RelaySettings> {
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

pub(crate) fn relay_configs(args: &RelayArgs) -> anyhow::Result<(TcpRelayConfig, UdpRelayConfig)> {
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

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
