//! The host's own traffic, selected by cgroup (`attach --cgroup`): a
//! process in a cgroup the test creates, inside the proxy namespace, makes
//! its own connections; the cgroup hooks send them through the relay while
//! the process still sees its original destination.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tproxy_tests::*;

/// A client of the host's own, in Python: connects (`tcp`), connects a UDP
/// socket (`udp`) or sends without connecting (`sendto`) to HOST PORT,
/// talks once, and prints what its socket shows as JSON: `peer` (from
/// getpeername), `from` (the source of the reply), `local` (its own
/// address) and `reply`. With `hold`, it then waits for a line on stdin.
const APP: &str = r#"
import json, socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
out = {}
if kind == 'tcp':
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, port))
    s.sendall(b'GET / HTTP/1.0\r\n\r\n')
    reply = s.recv(4096)
    while len(sys.argv) < 5 and (more := s.recv(4096)):
        reply += more
    out['peer'] = list(s.getpeername()[:2])
else:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(10)
    if kind == 'udp':
        s.connect((host, port))
        s.send(b'ping')
        out['peer'] = list(s.getpeername()[:2])
    else:
        s.sendto(b'ping', (host, port))
    reply, source = s.recvfrom(4096)
    out['from'] = list(source[:2])
out['local'] = s.getsockname()[0]
out['reply'] = reply.decode(errors='replace')
print(json.dumps(out), flush=True)
if len(sys.argv) > 4:
    sys.stdin.readline()
"#;

/// Runs [`APP`] in `cgroup` (or in the test's own, with `None`) and in the
/// proxy namespace; its JSON line.
fn app(
    topology: &Topology,
    cgroup: Option<&TestCgroup>,
    kind: &str,
    to: SocketAddr,
) -> Result<Value> {
    let mut child = spawn_app(topology, cgroup, kind, to, false)?;
    let line = first_line(&mut child)?;
    let status = child.wait()?;
    ensure!(status.success(), "{kind} client to {to} failed: {line}");
    serde_json::from_str(&line).with_context(|| format!("client said {line:?}"))
}

fn spawn_app(
    topology: &Topology,
    cgroup: Option<&TestCgroup>,
    kind: &str,
    to: SocketAddr,
    hold: bool,
) -> Result<Child> {
    let mut command = in_netns(&topology.proxy, "python3", cgroup.map(|c| c.path.as_path()));
    command.args(["-c", APP, kind, &to.ip().to_string(), &to.port().to_string()]);
    if hold {
        command.arg("hold");
    }
    Ok(command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?)
}

fn first_line(child: &mut Child) -> Result<String> {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// `[address, port]` as the client prints an address.
fn shown(addr: SocketAddr) -> Value {
    serde_json::json!([addr.ip().to_string(), addr.port()])
}

fn is_loopback(text: &Value) -> bool {
    text.as_str().and_then(|t| t.parse::<IpAddr>().ok()).is_some_and(|ip| ip.is_loopback())
}

fn attach(topology: &Topology, cgroup: &TestCgroup, run_in: Option<&TestCgroup>) -> Result<Proxy> {
    Proxy::start_keeping_mounts(
        &topology.proxy,
        run_in.map(|c| c.path.as_path()),
        &["attach", "--cgroup", &cgroup.relative, "--port", "80", "--port", "53", "--port", "5300"],
    )
}

#[test]
fn own_connections_go_through_the_relay_and_keep_their_destination() -> Result<()> {
    let topology = Topology::new("cgown")?;
    let cgroup = TestCgroup::new("own")?;
    let _dns = Dnsmasq::start(&topology, &[("www.example.test", "203.0.113.80")])?;
    let _udp4 = UdpServer::start(&topology.server, Topology::server_addr(false, 5300), 1)?;
    let _udp6 = UdpServer::start(&topology.server, Topology::server_addr(true, 5300), 1)?;
    let peers4 = http_responder(&topology.server, Topology::server_addr(false, 80), "hello4")?;
    let peers6 = http_responder(&topology.server, Topology::server_addr(true, 80), "hello6")?;
    let proxy = attach(&topology, &cgroup, None)?;

    for v6 in [false, true] {
        let server = Topology::server_addr(v6, 80);
        let out = app(&topology, Some(&cgroup), "tcp", server)?;
        ensure!(
            out["reply"].as_str().is_some_and(|r| r.ends_with(if v6 {
                "hello6"
            } else {
                "hello4"
            })),
            "{out}"
        );
        // Its peer is the server, as with the iptables recipe; only its own
        // address shows that it went to loopback.
        ensure!(out["peer"] == shown(server) && is_loopback(&out["local"]), "{out}");
        let peers = if v6 { &peers6 } else { &peers4 };
        let seen = peers.recv_timeout(Duration::from_secs(10))?;
        ensure!(seen.ip() == proxy_server_side_ip(v6), "the server saw {seen}");

        let udp = Topology::server_addr(v6, 5300);
        let connected = app(&topology, Some(&cgroup), "udp", udp)?;
        ensure!(connected["peer"] == shown(udp) && connected["from"] == shown(udp), "{connected}");
        ensure!(connected["reply"] == "ping", "{connected}");
        let unconnected = app(&topology, Some(&cgroup), "sendto", udp)?;
        ensure!(
            unconnected["from"] == shown(udp) && unconnected["reply"] == "ping",
            "{unconnected}"
        );

        let answer = dig_in(&topology, &cgroup, Topology::server_addr(v6, 53).ip())?;
        ensure!(answer == "203.0.113.80", "dig answered {answer:?}");
    }
    // Every one of them went through the relay.
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 2, "{:?}", stats.tcp());
    ensure!(stats.udp().sessions_total == 6, "{:?}", stats.udp());
    ensure!(stats.datapath.cgroup_to_target == 8, "{:?}", stats.datapath);

    // A connection that stays open is the relay's upstream, and the
    // client's own socket goes to the relay's loopback listener.
    let echo = Topology::server_addr(false, 5300);
    let _echoed = tcp_echo_server(&topology.server, echo)?;
    let mut held = spawn_app(&topology, Some(&cgroup), "tcp", echo, true)?;
    let out: Value = serde_json::from_str(&first_line(&mut held)?)?;
    let echoed = out["reply"].as_str().is_some_and(|r| r.starts_with("GET"));
    ensure!(out["peer"] == shown(echo) && echoed, "{out}");
    let to_server =
        topology.proxy.exec(&["ss", "-Htnp", "state", "established", "dst", &echo.to_string()])?;
    ensure!(
        to_server.contains("tproxy-user") && !to_server.contains("python3"),
        "connections to the server: {to_server:?}"
    );
    held.stdin.take().expect("stdin").write_all(b"\n")?;
    held.wait()?;

    // A cgroup below the given one is covered too.
    let below = cgroup.child("below")?;
    let out = app(&topology, Some(&below), "tcp", Topology::server_addr(true, 80))?;
    ensure!(
        out["peer"] == shown(Topology::server_addr(true, 80)) && is_loopback(&out["local"]),
        "{out}"
    );
    drop(below);

    // A process in another cgroup is untouched: it talks to the server
    // itself, and the relay sees nothing of it.
    let outside = app(&topology, None, "tcp", Topology::server_addr(false, 80))?;
    ensure!(outside["local"] == PROXY_SERVER_SIDE_V4.to_string(), "{outside}");
    let outside = app(&topology, None, "udp", Topology::server_addr(true, 5300))?;
    ensure!(outside["local"] == PROXY_SERVER_SIDE_V6.to_string(), "{outside}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 4 && stats.udp().sessions_total == 6, "{stats:?}");
    ensure!(stats.tcp().refused_unknown == 0 && stats.udp().refused_unknown == 0, "{stats:?}");
    Ok(())
}

fn proxy_server_side_ip(v6: bool) -> IpAddr {
    if v6 { PROXY_SERVER_SIDE_V6.into() } else { PROXY_SERVER_SIDE_V4.into() }
}

/// `dig` from `cgroup` in the proxy namespace.
fn dig_in(topology: &Topology, cgroup: &TestCgroup, server: IpAddr) -> Result<String> {
    let out = cgroup
        .command(&topology.proxy, "dig")
        .args(["+short", "+time=2", "+tries=3", &format!("@{server}"), "www.example.test", "A"])
        .output()?;
    ensure!(out.status.success(), "dig: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn a_relay_inside_the_cgroup_never_catches_its_own_connections() -> Result<()> {
    let topology = Topology::new("cgself")?;
    let cgroup = TestCgroup::new("self")?;
    let _dns = Dnsmasq::start(&topology, &[("www.example.test", "203.0.113.80")])?;
    let _http = HttpServer::start(&topology.server, 80, "served")?;
    let proxy = attach(&topology, &cgroup, Some(&cgroup))?;
    for v6 in [false, true] {
        let url = format!("http://{}/", Topology::server_addr(v6, 80));
        let out = cgroup
            .command(&topology.proxy, "curl")
            .args(["-sS", "--max-time", "10", &url])
            .output()?;
        ensure!(String::from_utf8_lossy(&out.stdout).contains("served"), "curl {url}: {out:?}");
        ensure!(dig_in(&topology, &cgroup, Topology::server_addr(v6, 53).ip())? == "203.0.113.80");
    }
    // Had it caught its upstream connections, each would have come back
    // to it, and come back again.
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 2 && stats.udp().sessions_total == 2, "{stats:?}");
    ensure!(stats.tcp().upstream_failures == 0, "{stats:?}");
    Ok(())
}

#[test]
fn exit_and_sigkill_leave_nothing_attached_to_the_cgroup() -> Result<()> {
    let topology = Topology::new("cgkill")?;
    let cgroup = TestCgroup::new("kill")?;
    let _peers = http_responder(&topology.server, Topology::server_addr(false, 80), "x")?;
    let server = Topology::server_addr(false, 80);
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let proxy = attach(&topology, &cgroup, None)?;
        ensure!(cgroup.connect4_programs()? == 1, "the connect hook is not attached");
        ensure!(is_loopback(&app(&topology, Some(&cgroup), "tcp", server)?["local"]));
        let (status, log) = proxy.stop_with(signal)?;
        ensure!(signal == libc::SIGKILL || status.success(), "{log}");
        let left = cgroup.connect4_programs()?;
        ensure!(left == 0, "{left} programs left attached after signal {signal}");
        // And the cgroup's connections go straight to the server again.
        let out = app(&topology, Some(&cgroup), "tcp", server)?;
        ensure!(out["local"] == PROXY_SERVER_SIDE_V4.to_string(), "{out}");
    }
    // The killed run's records (its routing, in the namespace about to go)
    // are removed as after any SIGKILL.
    let cleanup = run_tproxy(&topology.proxy, &["cleanup"])?;
    ensure!(cleanup.status.success(), "{cleanup:?}");
    Ok(())
}

/// redsocks, a proxy written for iptables REDIRECT, behind `--to-port`:
/// it asks `getsockopt(SO_ORIGINAL_DST)` for each connection it accepts and
/// takes it to dante.
#[test]
fn a_redirect_style_proxy_reads_so_original_dst() -> Result<()> {
    let topology = Topology::new("cgredir")?;
    let clients = TestCgroup::new("redir-clients")?;
    let proxies = TestCgroup::new("redir-proxy")?;
    let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "via redsocks")?;
    let _dante = Daemon::start(
        &topology.server,
        "danted",
        &format!(
            "logoutput: stderr\ninternal: {SERVER_V4} port = 1080\nexternal: {SERVER_V4}\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{ from: 0/0 to: 0/0 }}\nsocks pass {{ from: 0/0 to: 0/0 }}\n"
        ),
        &[
            "-f",
            "CONFIG",
            "-N",
            "1",
            &format!(
                "-p{}",
                std::env::temp_dir().join(format!("{}-danted.pid", topology.server.name)).display()
            ),
        ],
        1080,
    )?;
    let redsocks_config = format!(
        "base {{ log_debug = off; log_info = on; log = stderr; daemon = off; redirector = iptables; }}\n\
         redsocks {{ local_ip = 127.0.0.1; local_port = 12345; ip = {SERVER_V4}; port = 1080; type = socks5; }}\n"
    );
    let _redsocks = Daemon::start_command(
        &topology.proxy,
        proxies.command(&topology.proxy, "redsocks"),
        "redsocks",
        &redsocks_config,
        &["-c", "CONFIG"],
        12345,
    )?;
    let proxy = Proxy::start_keeping_mounts(
        &topology.proxy,
        None,
        &[
            "attach",
            "--cgroup",
            &clients.relative,
            "--original-dst-cgroup",
            &proxies.relative,
            "--port",
            "80",
            "--proto",
            "tcp",
            "--to-port",
            "12345",
        ],
    )?;
    let out = app(&topology, Some(&clients), "tcp", Topology::server_addr(false, 80))?;
    ensure!(out["reply"].as_str().is_some_and(|r| r.ends_with("via redsocks")), "{out}");
    ensure!(out["peer"] == shown(Topology::server_addr(false, 80)), "{out}");
    // The origin was reached from dante, which redsocks asked for it.
    let seen = peers.recv_timeout(Duration::from_secs(10))?;
    ensure!(seen.ip() == IpAddr::from(SERVER_V4), "the server saw {seen}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.datapath.cgroup_to_target == 1, "{stats:?}");
    Ok(())
}

#[test]
fn what_is_not_a_cgroup_v2_directory_is_refused_in_one_line() -> Result<()> {
    let topology = Topology::new("cgbad")?;
    for (path, expected) in [
        ("/tmp", "/tmp is not a cgroup v2 directory"),
        ("/no-such-tproxy-group", "/no-such-tproxy-group is not a cgroup v2 directory"),
    ] {
        let args = topology.proxy.instance_args(&["attach", "--cgroup", path, "--port", "80"]);
        let out = in_netns(&topology.proxy, &tproxy_bin().to_string_lossy(), None)
            .args(&args)
            .env("NO_COLOR", "1")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "--cgroup {path} was taken");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        ensure!(errors.len() == 1 && errors[0].contains(expected), "--cgroup {path}: {stderr}");
        let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
        ensure!(state.is_empty(), "--cgroup {path} left behind: {state}");
    }
    // `ip netns exec` hides the cgroup2 mount; the error says so.
    expect_refused(
        &topology.proxy,
        &[],
        &["attach", "--cgroup", "/x", "--port", "80"],
        "ip netns exec` hides it",
    )?;
    Ok(())
}

/// Interfaces and a cgroup in one instance: a client's connection arriving
/// on p0 and one of the host's own both go through the relay.
#[test]
fn interfaces_and_a_cgroup_together() -> Result<()> {
    let topology = Topology::new("cgboth")?;
    let cgroup = TestCgroup::new("both")?;
    let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "both")?;
    let proxy = Proxy::start_keeping_mounts(
        &topology.proxy,
        None,
        &["attach", PROXY_CLIENT_IFACE, "--cgroup", &cgroup.relative, "--port", "80"],
    )?;
    let url = format!("http://{}/", Topology::server_addr(false, 80));
    ensure!(topology.client.curl(&url)?.contains("both"));
    let own = app(&topology, Some(&cgroup), "tcp", Topology::server_addr(false, 80))?;
    ensure!(
        is_loopback(&own["local"]) && own["reply"].as_str().is_some_and(|r| r.ends_with("both")),
        "{own}"
    );
    for _ in 0..2 {
        let seen = peers.recv_timeout(Duration::from_secs(10))?;
        ensure!(seen.ip() == IpAddr::from(PROXY_SERVER_SIDE_V4), "the server saw {seen}");
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 2, "{stats:?}");
    ensure!(stats.datapath.to_listener == 1 && stats.datapath.cgroup_to_target == 1, "{stats:?}");
    Ok(())
}
