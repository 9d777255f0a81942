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

/// Someone's hand-made TPROXY recipe on our default mark and table is never
/// removed: given explicitly, the values are refused with what is in the
/// way; by default the next free ones are chosen.
#[test]
fn a_mark_already_routed_elsewhere() -> Result<()> {
    let topology = Topology::new("markused")?;
    topology
        .proxy
        .exec(&["ip", "rule", "add", "fwmark", "0x1e5", "lookup", "485", "priority", "100"])?;
    topology
        .proxy
        .exec(&["ip", "route", "add", "local", "default", "dev", "lo", "table", "485"])?;
    let foreign = topology.proxy.interception_state(PROXY_CLIENT_IFACE, TABLE)?;
    let out = run_tproxy(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--mark", "0x1e5", "--table", "485"],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(stderr.trim().lines().count() == 1, "{stderr}");
    ensure!(stderr.contains("fwmark 0x1e5 or table 485 is in use by another rule"), "{stderr}");
    ensure!(topology.proxy.interception_state(PROXY_CLIENT_IFACE, TABLE)? == foreign);
    // With the defaults it steps around them, and leaves them alone.
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    ensure!(proxy.log().contains("this instance uses fwmark 0x1e7, table 486"), "{}", proxy.log());
    proxy.stop()?;
    let out = run_tproxy(&topology.proxy, &["cleanup", PROXY_CLIENT_IFACE])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ensure!(topology.proxy.interception_state(PROXY_CLIENT_IFACE, TABLE)? == foreign);
    Ok(())
}
