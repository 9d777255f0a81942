//! Bad input: each gives a one-line error and a non-zero exit, and leaves
//! nothing behind.

use anyhow::{Result, ensure};
use tproxy_tests::*;

const TABLE: u32 = 485;

/// Runs `attach` with `args` and checks the error and the clean state.
fn rejected(tag: &str, wrapper: &[&str], args: &[&str], expected: &str) -> Result<()> {
    let topology = Topology::new(tag)?;
    let bin = tproxy_bin();
    let mut command: Vec<&str> = wrapper.to_vec();
    command.push(bin.to_str().unwrap());
    let args = topology.proxy.instance_args(args);
    command.extend(args.iter().map(String::as_str));
    let out =
        topology.proxy.command(command[0]).args(&command[1..]).env("NO_COLOR", "1").output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{args:?} succeeded");
    ensure!(stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{stderr}");
    let first = stderr.lines().find(|l| l.contains("error")).unwrap_or_default();
    ensure!(first.contains(expected), "the error line does not say it: {first}");
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, TABLE)?;
    ensure!(state.is_empty(), "{args:?} left behind: {state}");
    Ok(())
}

#[test]
fn missing_interface() -> Result<()> {
    rejected("noif", &[], &["attach", "nope0", "--port", "80"], "interface \"nope0\" not found")
}

#[test]
fn a_missing_second_interface_leaves_the_first_untouched() -> Result<()> {
    rejected(
        "noif2",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "nope0", "--port", "80"],
        "interface \"nope0\" not found",
    )
}

#[test]
fn port_zero() -> Result<()> {
    rejected(
        "port0",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "0"],
        "invalid value '0' for '--port",
    )
}

#[test]
fn port_too_large() -> Result<()> {
    rejected(
        "port65536",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "65536"],
        "invalid value '65536'",
    )
}

#[test]
fn listen_port_that_is_also_intercepted() -> Result<()> {
    rejected(
        "lport",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--listen-port", "80"],
        "--listen-port 80 is also an intercepted port",
    )
}

#[test]
fn no_privileges() -> Result<()> {
    rejected(
        "noprivs",
        UNPRIVILEGED,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80"],
        "insufficient privileges",
    )
}

#[test]
fn a_mark_already_routed_elsewhere() -> Result<()> {
    let topology = Topology::new("markused")?;
    topology
        .proxy
        .exec(&["ip", "rule", "add", "fwmark", "0x1e5", "lookup", "100", "priority", "100"])?;
    let out = run_tproxy(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(stderr.contains("fwmark 0x1e5 is already used by another rule"), "{stderr}");
    // The other rule is still there, and nothing of ours was added.
    let rules = topology.proxy.exec(&["ip", "rule", "show"])?;
    ensure!(rules.contains("lookup 100") && !rules.contains("lookup 485"), "{rules}");
    Ok(())
}
