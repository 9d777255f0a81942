//! `tproxy-user doctor`: checks this host for what tproxy needs and for what
//! gets in its way, each finding with its fix. It sits above the layers it
//! inspects (it loads the programs to see that they would load).

use std::{fmt, fs};

use crate::{
    datapath::routing,
    host::{
        kernel::{self, Feature},
        system,
    },
    intercept::InterceptConfig,
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// `attach` would fail, or intercepted traffic would be lost.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How bad.
    pub level: Level,
    /// What was found.
    pub what: String,
    /// What to do about it, if anything.
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

fn ok(what: impl Into<String>) -> Finding {
    Finding { level: Level::Ok, what: what.into(), fix: None }
}

/// `; it explored 14193 (Ethernet) and 11910 (L3) instructions`, where the
/// kernel says (5.16 and later).
fn explored(work: &[(&str, Option<u32>)]) -> String {
    let counts: Vec<String> =
        work.iter().filter_map(|(kind, n)| Some(format!("{} ({kind})", (*n)?))).collect();
    if counts.is_empty() {
        return String::new();
    }
    format!("; it explored {} instructions", counts.join(" and "))
}

fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { level: Level::Warn, what: what.into(), fix: Some(fix.into()) }
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { level: Level::Fail, what: what.into(), fix: Some(fix.into()) }
}

/// Runs every check for an instance configured like `config` (its
/// interfaces, mark and table).
pub async fn check(config: &InterceptConfig) -> Vec<Finding> {
    let mut findings = vec![kernel()];
    let privileged = system::check_privileges();
    findings.push(match &privileged {
        Ok(()) => ok("privileges: CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON"),
        Err(e) => fail(
            e.to_string(),
            "run as root, or grant those capabilities (e.g. systemd AmbientCapabilities=)",
        ),
    });
    if privileged.is_ok() {
        findings.push(
            match crate::intercept::load_programs(
                config,
                // Every program, whatever the interfaces are.
                &[system::LinkKind::Ethernet, system::LinkKind::L3],
            ) {
                Ok(datapath) => ok(format!(
                    "the TC and sk_lookup programs pass this kernel's verifier (helpers present){}",
                    explored(&datapath.verifier_work())
                )),
                Err(e) => fail(
                    format!("loading the programs: {e}"),
                    "run with RUST_LOG=debug for the verifier log, and report it",
                ),
            },
        );
    }
    findings.push(bpffs());
    findings.extend(ipv6().await);
    findings.extend(routing_conflicts(config).await);
    for iface in &config.interfaces {
        findings.extend(interface(iface));
    }
    findings.push(forwarding());
    findings
}

fn kernel() -> Finding {
    let Ok(current) = kernel::current() else {
        return fail("cannot read the kernel version", "check /proc/sys/kernel/osrelease");
    };
    let version = kernel::text(current);
    let (has, lacks): (Vec<&Feature>, Vec<&Feature>) =
        kernel::FEATURES.iter().partition(|f| f.in_kernel(current));
    let min = kernel::SK_ASSIGN;
    if !min.in_kernel(current) {
        return fail(
            format!("kernel {version}: the programs need {} ({})", min.since_text(), min.name),
            "upgrade the kernel",
        );
    }
    let has: Vec<String> = has.iter().map(|f| format!("{} ({})", f.name, f.since_text())).collect();
    if lacks.is_empty() {
        return ok(format!("kernel {version}: {}", has.join(", ")));
    }
    let lacks: Vec<String> =
        lacks.iter().map(|f| format!("no {} ({}): {}", f.name, f.since_text(), f.role)).collect();
    warn(
        format!("kernel {version}: {}; {}", has.join(", "), lacks.join("; ")),
        "a newer kernel; after a SIGKILL without TCX, the next `attach` with the same --name, or `tproxy-user cleanup`, removes what it left",
    )
}

fn bpffs() -> Finding {
    let mounted = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    if mounted {
        ok("bpffs is mounted (tproxy pins nothing, but other tools expect it)")
    } else {
        warn(
            "bpffs is not mounted; tproxy does not need it (it pins nothing)",
            "for bpftool and friends: mount -t bpf bpf /sys/fs/bpf",
        )
    }
}

async fn ipv6() -> Vec<Finding> {
    if !system::ipv6_enabled() {
        return vec![warn(
            "IPv6 is disabled: only IPv4 is intercepted",
            "nothing to do unless you need IPv6",
        )];
    }
    match routing::probe_ipv6_rules().await {
        Ok(()) => vec![ok("IPv6 policy routing (multiple tables) works")],
        Err(e) => vec![fail(
            format!("IPv6 policy routing: {e}"),
            "a kernel with CONFIG_IPV6_MULTIPLE_TABLES, or disable IPv6",
        )],
    }
}

async fn routing_conflicts(config: &InterceptConfig) -> Vec<Finding> {
    match routing::conflicts(&config.routing()).await {
        Ok(conflicts) if conflicts.is_empty() => vec![ok(format!(
            "fwmark {:#x} and table {} are free",
            config.mark, config.table
        ))],
        // With the default values attach steps to the next free ones.
        Ok(conflicts) if config.choose_free_routing => conflicts
            .into_iter()
            .map(|c| warn(c, "attach will choose the next free mark and table, and say which"))
            .collect(),
        Ok(conflicts) => conflicts
            .into_iter()
            .map(|c| fail(c, "choose another --mark/--table, or remove the other rule (tproxy-user cleanup --name N if it is a leftover of instance N)"))
            .collect(),
        Err(e) => vec![fail(format!("listing rules: {e}"), "check rtnetlink access")],
    }
}

fn interface(iface: &str) -> Vec<Finding> {
    if system::ifindex(iface).is_err() {
        return vec![fail(
            format!("interface {iface:?} not found"),
            "check the name with `ip link`",
        )];
    }
    let mut findings = vec![match system::link_kind(iface) {
        Ok(kind) => ok(format!(
            "{iface}: link type {} ({})",
            system::link_type(iface).unwrap_or(0),
            match kind {
                system::LinkKind::Ethernet => "Ethernet header",
                system::LinkKind::L3 => "L3: packets start at the IP header",
            }
        )),
        Err(e) => fail(e.to_string(), "attach to the Ethernet or L3 device the traffic arrives on"),
    }];
    let read =
        |path: String| fs::read_to_string(path).ok().and_then(|v| v.trim().parse::<u32>().ok());
    let iface_rp = read(format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter")).unwrap_or(0);
    let all_rp = read("/proc/sys/net/ipv4/conf/all/rp_filter".into()).unwrap_or(0);
    // The kernel uses the larger of the two.
    let rp = iface_rp.max(all_rp);
    findings.push(if rp == 1 {
        warn(
            format!(
                "{iface}: strict reverse-path filtering (rp_filter=1) drops packets from sources routed via another interface, intercepted or not"
            ),
            format!(
                "with asymmetric routes: sysctl -w net.ipv4.conf.{iface}.rp_filter=2 net.ipv4.conf.all.rp_filter=2"
            ),
        )
    } else {
        ok(format!("{iface}: rp_filter={rp}"))
    });
    // wg-quick sets it. The source check of a steered packet then routes
    // the client's address with our mark; tproxy's routing answers that
    // with its own rule (`iif lo fwmark M lookup main`), so it passes.
    let valid_mark = read(format!("/proc/sys/net/ipv4/conf/{iface}/src_valid_mark")).unwrap_or(0)
        | read("/proc/sys/net/ipv4/conf/all/src_valid_mark".into()).unwrap_or(0);
    findings.push(ok(format!(
        "{iface}: src_valid_mark={valid_mark}{}",
        if valid_mark != 0 {
            " (source checks see the mark; tproxy's routing answers them, so steered packets pass)"
        } else {
            ""
        }
    )));
    findings
}

fn forwarding() -> Finding {
    let on = fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|v| v.trim() == "1")
        .unwrap_or(false);
    if on {
        ok("IPv4 forwarding is on (traffic that is not intercepted is routed on)")
    } else {
        warn(
            "IPv4 forwarding is off: on a router, traffic that is not intercepted is dropped",
            "sysctl -w net.ipv4.ip_forward=1 (and net.ipv6.conf.all.forwarding=1)",
        )
    }
}

/// Whether any finding fails.
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Fail)
}
