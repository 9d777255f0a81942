//! Bad input: each gives a one-line error and a non-zero exit, and leaves
//! nothing behind.

use anyhow::{Result, ensure};
use tproxy_tests::*;

/// Runs `attach` with `args` and checks the error and the clean state.
fn rejected(tag: &str, wrapper: &[&str], args: &[&str], expected: &str) -> Result<()> {
    let topology = Topology::new(tag)?;
    expect_refused(&topology.proxy, wrapper, args, expected)?;
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
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
fn neither_interface_nor_cgroup() -> Result<()> {
    rejected("noplace", &[], &["attach", "--port", "80"], "the following required arguments")
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
    let (mark, table) = (format!("{DEFAULT_MARK:#x}"), DEFAULT_TABLE.to_string());
    let ip = |args: &[&str]| topology.proxy.exec(&[&["ip"], args].concat());
    ip(&["rule", "add", "fwmark", &mark, "lookup", &table, "priority", "100"])?;
    ip(&["route", "add", "local", "default", "dev", "lo", "table", &table])?;
    let foreign = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    let given = ["attach", PROXY_CLIENT_IFACE, "--port", "80", "--mark", &mark, "--table", &table];
    let out = run_tproxy(&topology.proxy, &given)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(stderr.trim().lines().count() == 1, "{stderr}");
    ensure!(
        stderr.contains(&format!("fwmark {mark} or table {table} is in use by another rule")),
        "{stderr}"
    );
    ensure!(topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)? == foreign);
    // With the defaults it steps around them, and leaves them alone.
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    ensure!(proxy.log().contains("this instance uses fwmark 0x1e7, table 486"), "{}", proxy.log());
    proxy.stop()?;
    let out = run_tproxy(&topology.proxy, &["cleanup", PROXY_CLIENT_IFACE])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ensure!(topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)? == foreign);
    Ok(())
}

#[test]
fn to_port_refuses_the_relays_options() -> Result<()> {
    rejected(
        "toport-relay",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--to-port", "8080", "--listen-port", "81"],
        "'--to-port <PORT>' cannot be used with '--listen-port",
    )
}

#[test]
fn to_addr_twice_for_one_family() -> Result<()> {
    rejected(
        "toaddr2",
        &[],
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "80",
            "--to-port",
            "8080",
            "--to-addr",
            "192.0.2.1",
            "--to-addr",
            "192.0.2.2",
        ],
        "--to-addr: give at most one IPv4 and one IPv6 address",
    )
}

#[test]
fn to_addr_that_no_listener_can_bind() -> Result<()> {
    rejected(
        "toaddr0",
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--to-port", "8080", "--to-addr", "::"],
        "a target address must be one a listener can bind to",
    )
}

#[test]
fn to_port_owner_that_is_no_user() -> Result<()> {
    rejected(
        "toowner",
        &[],
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "80",
            "--to-port",
            "8080",
            "--to-port-owner",
            "no-such-user",
        ],
        "--to-port-owner: no user \"no-such-user\"",
    )
}
