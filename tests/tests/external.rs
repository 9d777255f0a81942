//! Steering to other programs' transparent listeners (`attach --to-port`):
//! HAProxy 2.6 from Debian, and a separate IP_TRANSPARENT process (the
//! library's `original_destination` example), with no relay of ours and no
//! iptables or nft rule anywhere.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::*;

const PROXY_PORT: u16 = 8080;

/// HAProxy in `ns` as a transparent proxy on `PROXY_PORT` (v4 and v6), the
/// way people run it with the iptables recipe: `bind … transparent`, and
/// upstream from the client's own address (`usesrc clientip`) to the
/// original destination (`server … 0.0.0.0`). Killed when dropped.
fn haproxy(ns: &Netns) -> Result<Daemon> {
    let config = format!(
        "global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v4
    bind 0.0.0.0:{PROXY_PORT} transparent
    default_backend origin4
frontend v6
    bind :::{PROXY_PORT} v6only transparent
    default_backend origin6
backend origin4
    source 0.0.0.0 usesrc clientip
    server origin 0.0.0.0
backend origin6
    source [::]:0 usesrc clientip
    server origin [::]
"
    );
    Daemon::start(ns, "haproxy", &config, &["-db", "-f", "CONFIG"], PROXY_PORT)
}

fn attach_to_port(topology: &Topology, extra: &[&str]) -> Result<Proxy> {
    let port = PROXY_PORT.to_string();
    let mut args = vec!["attach", PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, "--port", "80"];
    args.extend(["--to-port", &port]);
    args.extend(extra);
    Proxy::start(&topology.proxy, &args)
}

/// No packet filter rule of any kind in `ns`: the steering is ours alone.
fn no_packet_filter_rules(ns: &Netns) -> Result<()> {
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = ns.exec(&[save])?;
        ensure!(!rules.lines().any(|l| l.starts_with("-A")), "{save}: {rules}");
    }
    let ruleset = ns.exec(&["nft", "list", "ruleset"])?;
    ensure!(ruleset.trim().is_empty(), "nft: {ruleset}");
    Ok(())
}

/// 1 MiB each way through HAProxy, byte-exact; the server sees the client's
/// address, HAProxy holds the upstream socket, and nothing but our program
/// steers.
fn haproxy_relays(v6: bool) -> Result<()> {
    let topology = Topology::new(if v6 { "ext-hap6" } else { "ext-hap4" })?;
    let _haproxy = haproxy(&topology.proxy)?;
    let proxy = attach_to_port(&topology, &[])?;
    let addr = Topology::server_addr(v6, 80);
    let request = pattern(31, 1 << 20);
    let reply = pattern(32, 1 << 20);

    // The server reads the request, reports, and answers only when told, so
    // that the connection is still open while the test looks at it.
    let listener = topology.server.tcp_listen(addr)?;
    let (report, reported) = mpsc::channel();
    let (go, gone) = mpsc::channel::<()>();
    let answer = reply.clone();
    let server = thread::spawn(move || -> Result<()> {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut received = Vec::new();
        stream.read_to_end(&mut received)?;
        report.send((peer, received))?;
        gone.recv()?;
        stream.write_all(&answer)?;
        Ok(())
    });
    let mut client = topology.client.tcp_connect(addr)?;
    ensure!(client.peer_addr()? == addr);
    client.write_all(&request)?;
    client.shutdown(Shutdown::Write)?;
    let (peer, received) = reported.recv_timeout(Duration::from_secs(30))?;
    ensure!(received == request, "request corrupted: {} bytes arrived", received.len());
    ensure!(peer.ip() == client_ip(v6), "the server saw {peer}, not the client");

    // HAProxy's socket, bound to the client's address, is the upstream one.
    let sockets = topology.proxy.exec(&["ss", "-Htanp"])?;
    let upstream = sockets
        .lines()
        .find(|l| l.contains(&peer.to_string()) && l.contains(&addr.to_string()))
        .with_context(|| format!("no upstream socket {peer} -> {addr}: {sockets}"))?;
    ensure!(upstream.contains("\"haproxy\""), "not HAProxy's: {upstream:?}");

    go.send(())?;
    ensure!(read_to_end(&mut client)? == reply, "reply corrupted");
    server.join().unwrap()?;
    no_packet_filter_rules(&topology.proxy)?;

    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.target == format!("port {PROXY_PORT}"), "{stats:?}");
    // No relay of ours ran.
    ensure!(stats.tcp.is_none() && stats.udp.is_none(), "{stats:?}");
    let datapath = &stats.datapath;
    ensure!(datapath.to_listener == 1, "{datapath:?}");
    // HAProxy's spoofed upstream socket got the server's replies.
    ensure!(datapath.return_path > 0, "{datapath:?}");
    ensure!(stats.rules[0].counters.new_flows == 1, "{stats:?}");
    Ok(())
}

#[test]
fn haproxy_ipv4_relays_as_the_client_without_iptables() -> Result<()> {
    haproxy_relays(false)
}

#[test]
fn haproxy_ipv6_relays_as_the_client_without_iptables() -> Result<()> {
    haproxy_relays(true)
}

/// Attach may come first: it warns, and traffic passes untouched until
/// HAProxy listens; once HAProxy stops, traffic passes untouched again.
#[test]
fn the_proxy_may_start_late_and_stop_and_traffic_fails_open() -> Result<()> {
    let topology = Topology::new("ext-late")?;
    let proxy = attach_to_port(&topology, &[])?;
    ensure!(
        proxy.log().contains(&format!("nothing listens on tcp port {PROXY_PORT} yet")),
        "{}",
        proxy.log()
    );
    let addr = Topology::server_addr(false, 80);
    let server = closing_server(&topology, addr, 3)?;
    let connect = || -> Result<()> {
        let mut client = topology.client.tcp_connect(addr)?;
        ensure!(read_to_end(&mut client)? == b"bye");
        Ok(())
    };
    // Nothing listens: forwarded as if we were not there.
    connect()?;
    proxy.wait_for(&topology.proxy, "datapath.no_listener", |s| s.datapath.no_listener == 1)?;
    let haproxy = haproxy(&topology.proxy)?;
    connect()?;
    proxy.wait_for(&topology.proxy, "datapath.to_listener", |s| s.datapath.to_listener == 1)?;
    drop(haproxy);
    connect()?;
    proxy.wait_for(&topology.proxy, "datapath.no_listener", |s| s.datapath.no_listener == 2)?;
    // Every connection reached the server as the client itself.
    let peers = server.join().unwrap()?;
    ensure!(peers.iter().all(|p| p.ip() == client_ip(false)), "{peers:?}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.datapath.to_listener == 1, "{stats:?}");
    ensure!(stats.reasons.passed["no_listener"] == 2, "{:?}", stats.reasons);
    Ok(())
}

/// The library's `original_destination` example, in its own process.
fn original_destination_server(ns: &Netns) -> Result<Proxy> {
    let port = PROXY_PORT.to_string();
    let server = Proxy::spawn_program(ns, &example_bin("original_destination"), &[&port], "")?;
    server.wait_for_log("ready:", Duration::from_secs(30))?;
    Ok(server)
}

/// TCP and UDP, v4 and v6: another process's transparent sockets read each
/// flow's original destination, and its UDP answer comes from there.
#[test]
fn another_process_reads_the_original_destination_tcp_and_udp() -> Result<()> {
    let topology = Topology::new("ext-orig")?;
    let _server = original_destination_server(&topology.proxy)?;
    let proxy = attach_to_port(&topology, &[])?;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 80);
        let mut client = topology.client.tcp_connect(addr)?;
        let expected = format!("{} -> {addr}\n", client.local_addr()?);
        let answer = String::from_utf8(read_to_end(&mut client)?)?;
        ensure!(answer == expected, "tcp: {answer:?}, not {expected:?}");

        let client = topology.client.udp_client(addr)?;
        // Connected: only a datagram from the original destination arrives.
        client.connect(addr)?;
        client.send(b"who")?;
        let mut buf = [0u8; 256];
        let n = client.recv(&mut buf).context("no UDP answer from the original destination")?;
        let expected = format!("{} -> {addr}\n", client.local_addr()?);
        let answer = std::str::from_utf8(&buf[..n])?;
        ensure!(answer == expected, "udp: {answer:?}, not {expected:?}");
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    // Two connections and two datagrams.
    ensure!(stats.datapath.to_listener == 4, "{stats:?}");
    Ok(())
}

/// The other program closes first, so its socket holds the client's tuple
/// in TIME_WAIT. A new connection from the same client port must reach its
/// listener, not that TIME_WAIT socket, as for our own relay.
#[test]
fn syn_meeting_the_other_programs_time_wait_reaches_its_listener() -> Result<()> {
    let topology = Topology::new("ext-tw")?;
    let _server = original_destination_server(&topology.proxy)?;
    let proxy = attach_to_port(&topology, &[])?;
    const ROUNDS: usize = 10;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 80);
        let client_addr = SocketAddr::new(client_ip(v6), 40000);
        let resets_before = tcp_counter(&topology.client, "TcpOutRsts")?;
        for round in 0..ROUNDS {
            let answer = connect_from(&topology, client_addr, addr, Duration::from_secs(10))
                .map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
            ensure!(answer == format!("{client_addr} -> {addr}\n").as_bytes(), "round {round}");
            wait_until_port_free(&topology, client_addr.port())?;
        }
        let resets = tcp_counter(&topology.client, "TcpOutRsts")? - resets_before;
        ensure!(resets == 0, "the client had to reset {resets} times");
    }
    let reopens = 2 * (ROUNDS - 1) as u64;
    let datapath = &proxy.stop_with_stats(&topology.proxy)?.datapath;
    ensure!(datapath.tw_syn == reopens && datapath.tw_handover == reopens, "{datapath:?}");
    Ok(())
}
