//! A real host runs its own services beside tproxy: traffic to the host's
//! own addresses reaches them untouched while their ports are intercepted,
//! and what tproxy adds or removes leaves everything else alone.

use std::{io::Write as _, net::IpAddr, time::Duration};

use anyhow::{Result, ensure};
use tproxy_tests::*;

/// The proxy host's own web server (python, dual-stack) and DNS server
/// (dnsmasq) answer the clients directly, on both families, while ports 80
/// and 53 are intercepted and traffic to the server is relayed. The web
/// server's own TIME_WAIT sockets (v4-mapped) survive tproxy's exit.
#[test]
fn the_hosts_own_services_answer_directly() -> Result<()> {
    let topology = Topology::new("hostsvc")?;
    let _web = HttpServer::start(&topology.proxy, 80, "the proxy host itself")?;
    let _dns = Dnsmasq::start_in(
        &topology.proxy,
        &["--listen-address=192.0.2.1", "--listen-address=2001:db8:1::1"],
        &[("host.test", "203.0.113.1")],
    )?;
    let server_dns = Dnsmasq::start(&topology, &[("server.test", "203.0.113.2")])?;
    let seen4 = http_responder(&topology.server, Topology::server_addr(false, 80), "the server")?;
    let seen6 = http_responder(&topology.server, Topology::server_addr(true, 80), "the server")?;
    // A dual-stack service of the host's that closes first, so that its
    // side keeps TIME_WAIT sockets (under v4-mapped addresses).
    let closing = topology.proxy.tcp_listen((std::net::Ipv6Addr::UNSPECIFIED, 8080).into())?;
    std::thread::spawn(move || {
        for stream in closing.incoming() {
            let _ = stream.and_then(|mut s| std::io::Write::write_all(&mut s, b"bye"));
        }
    });
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--port", "53", "--port", "8080"],
    )?;
    for v6 in [false, true] {
        let host: IpAddr =
            if v6 { PROXY_CLIENT_SIDE_V6.into() } else { PROXY_CLIENT_SIDE_V4.into() };
        let url = |ip: IpAddr| match ip {
            IpAddr::V4(a) => format!("http://{a}/"),
            IpAddr::V6(a) => format!("http://[{a}]/"),
        };
        ensure!(topology.client.curl(&url(host))?.contains("the proxy host itself"));
        ensure!(topology.client.dig(host, "host.test")? == "203.0.113.1", "the host's dnsmasq");
        let server = Topology::server_addr(v6, 80).ip();
        ensure!(topology.client.curl(&url(server))? == "the server");
        let peer = if v6 { &seen6 } else { &seen4 }.recv_timeout(Duration::from_secs(5))?;
        ensure!(peer.ip() == proxy_ip(v6), "not relayed: the server saw {peer}");
        ensure!(topology.client.dig(server, "server.test")? == "203.0.113.2", "relayed DNS");
        ensure!(server_dns.saw_query_from(&proxy_ip(v6).to_string()), "{}", server_dns.log());
    }
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.datapath.to_host > 0, "{:?}", stats.datapath);
    ensure!(stats.tcp().accepted == 2 && stats.tcp().refused_local == 0, "{:?}", stats.tcp());
    ensure!(stats.udp().sessions_total == 2 && stats.udp().refused_local == 0, "{:?}", stats.udp());
    let mut stream = topology.client.tcp_connect((PROXY_CLIENT_SIDE_V4, 8080).into())?;
    ensure!(read_to_end(&mut stream)? == b"bye");
    drop(stream);
    let own_time_waits = || -> Result<String> {
        topology.proxy.exec(&["ss", "-Htan", "state", "time-wait", "sport", "=", ":8080"])
    };
    ensure!(own_time_waits()?.contains("[::ffff:192.0.2.1]:8080"), "{}", own_time_waits()?);
    proxy.stop()?;
    ensure!(
        own_time_waits()?.contains("[::ffff:192.0.2.1]:8080"),
        "tproxy destroyed the host's own"
    );
    Ok(())
}

/// An address added to the interface while tproxy runs is the host's at
/// once (synchronised on tproxy's own record of it), and stops being so
/// when it goes.
#[test]
fn an_address_added_while_running_is_left_to_the_host() -> Result<()> {
    let topology = Topology::new("newaddr")?;
    let _web = HttpServer::start(&topology.proxy, 80, "the proxy host itself")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    topology.proxy.exec(&["ip", "addr", "add", "192.0.2.77/24", "dev", PROXY_CLIENT_IFACE])?;
    topology.proxy.exec(&[
        "ip",
        "addr",
        "add",
        "2001:db8:1::77/64",
        "dev",
        PROXY_CLIENT_IFACE,
        "nodad",
    ])?;
    proxy.wait_for_log("local destination added: 192.0.2.77/32", Duration::from_secs(5))?;
    proxy.wait_for_log("local destination added: 2001:db8:1::77/128", Duration::from_secs(5))?;
    ensure!(topology.client.curl("http://192.0.2.77/")?.contains("the proxy host itself"));
    ensure!(topology.client.curl("http://[2001:db8:1::77]/")?.contains("the proxy host itself"));
    topology.proxy.exec(&["ip", "addr", "del", "192.0.2.77/24", "dev", PROXY_CLIENT_IFACE])?;
    proxy.wait_for_log("local destination removed: 192.0.2.77/32", Duration::from_secs(5))?;
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(
        stats.tcp().accepted == 0,
        "the host's own traffic reached the relay: {:?}",
        stats.tcp()
    );
    proxy.stop()?;
    Ok(())
}

/// `--intercept-local` opts in: the host's own port goes through the relay,
/// which then connects to the host's service.
#[test]
fn intercept_local_relays_the_hosts_own_ports() -> Result<()> {
    let topology = Topology::new("interlocal")?;
    let _web = HttpServer::start(&topology.proxy, 80, "the proxy host itself")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--intercept-local"],
    )?;
    ensure!(topology.client.curl("http://192.0.2.1/")?.contains("the proxy host itself"));
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 1 && stats.datapath.to_host == 0, "{stats:?}");
    proxy.stop()?;
    Ok(())
}

/// Even with `--intercept-local`, another host never reaches loopback
/// through the relay. Where `route_localnet=1` (kube-proxy sets it) the
/// kernel delivers a SYN to 127.0.0.1 from the wire; relayed, it would reach
/// a loopback-only service from a loopback source, which such services
/// trust. Here the client routes 127.0.0.1 to the proxy.
#[test]
fn intercept_local_never_opens_loopback_to_another_host() -> Result<()> {
    let topology = Topology::new("localnet")?;
    let seen = http_responder(&topology.proxy, "127.0.0.1:80".parse()?, "loopback only")?;
    topology.proxy.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{PROXY_CLIENT_IFACE}.route_localnet=1"),
    ])?;
    topology.client.exec(&["sysctl", "-qw", "net.ipv4.conf.c0.route_localnet=1"])?;
    topology.client.exec(&["ip", "addr", "del", "127.0.0.1/8", "dev", "lo"])?;
    topology.client.exec(&[
        "ip",
        "route",
        "add",
        "127.0.0.1/32",
        "via",
        "192.0.2.1",
        "dev",
        "c0",
    ])?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--intercept-local"],
    )?;
    let answer = topology.client.curl("http://127.0.0.1/");
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(answer.is_err(), "another host reached loopback: {answer:?}");
    ensure!(seen.try_recv().is_err(), "the loopback service was reached");
    ensure!(
        stats.tcp().accepted == 1 && stats.tcp().refused_local == 1,
        "the relay did not refuse it: {:?}",
        stats.tcp()
    );
    proxy.stop()?;
    Ok(())
}

/// More local destinations than the datapath holds (an IPVS node's
/// service addresses, say) still reach the host's own services: the
/// program asks the kernel's routes for intercepted packets to what its
/// table lacks. Here it holds 64, and 100 addresses come on top of the
/// host's own; each answers from the host while the server's traffic is
/// relayed, and the table is complete again once they go.
#[test]
fn local_destinations_past_the_datapaths_capacity_stay_the_hosts() -> Result<()> {
    let topology = Topology::new("localfull")?;
    let _web = HttpServer::start(&topology.proxy, 80, "the proxy host itself")?;
    let seen = http_responder(&topology.server, Topology::server_addr(false, 80), "the server")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--local-destinations", "64"],
    )?;
    let addrs: Vec<String> = (1..=100).map(|i| format!("203.0.113.{i}")).collect();
    let batch = |verb: &str| -> String {
        addrs.iter().map(|a| format!("addr {verb} {a}/32 dev {PROXY_CLIENT_IFACE}\n")).collect()
    };
    topology.proxy.ip_batch(&batch("add"))?;
    proxy.wait_for_log("local destinations and the datapath holds", Duration::from_secs(10))?;
    for addr in &addrs {
        let mut stream = topology.client.tcp_connect((addr.parse::<IpAddr>()?, 80).into())?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let answer = read_to_end(&mut stream)?;
        ensure!(
            String::from_utf8_lossy(&answer).contains("the proxy host itself"),
            "{addr} did not reach the host's own server"
        );
    }
    ensure!(topology.client.curl("http://198.51.100.10/")?.contains("the server"));
    ensure!(seen.try_recv().is_ok_and(|peer| peer.ip() != client_ip(false)), "not relayed");
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(
        stats.tcp().accepted == 1
            && stats.tcp().refused_local == 0
            && stats.datapath.local_unknown == 0,
        "{stats:?}"
    );
    topology.proxy.ip_batch(&batch("del"))?;
    proxy.wait_for_log("all fit in the datapath again", Duration::from_secs(10))?;
    proxy.stop()?;
    Ok(())
}

/// The clsact qdisc that tproxy created goes with it; one that was there
/// before stays. (Kernels with TCX attach without a qdisc at all.)
#[test]
fn only_the_qdisc_tproxy_created_is_removed() -> Result<()> {
    let topology = Topology::new("qdisc")?;
    let qdiscs = || topology.proxy.exec(&["tc", "qdisc", "show", "dev", PROXY_CLIENT_IFACE]);
    let attach = &["attach", PROXY_CLIENT_IFACE, "--port", "80"];
    Proxy::start(&topology.proxy, attach)?.stop()?;
    ensure!(!qdiscs()?.contains("clsact"), "left behind: {}", qdiscs()?);
    topology.proxy.exec(&["tc", "qdisc", "add", "dev", PROXY_CLIENT_IFACE, "clsact"])?;
    Proxy::start(&topology.proxy, attach)?.stop()?;
    ensure!(qdiscs()?.contains("clsact"), "someone else's qdisc was removed");
    Ok(())
}

/// A UDP rule over the ephemeral range on both interfaces covers the ports
/// of the relay's own upstream sockets: the server's replies to them (to
/// the host's own address) must reach them, not the relay's listener. (The
/// range is narrowed to 100 ports, which the rule covers whole: a rule over
/// all 64 512 takes minutes to install under emulation, one map write per
/// port and family.)
#[test]
fn a_rule_over_ephemeral_ports_leaves_the_relays_own_replies() -> Result<()> {
    let topology = Topology::new("ephemeral")?;
    topology.proxy.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40099"])?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            PROXY_SERVER_IFACE,
            "--rule",
            "udp/5300",
            "--rule",
            "udp/40000-40099",
        ],
    )?;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 5300);
        let server = UdpServer::start(&topology.server, addr, 1)?;
        let client = topology.client.udp_client(addr)?;
        udp_round_trips(&client, addr, 5)?;
        let peers = server.peers();
        ensure!(
            peers.iter().all(|p| p.ip() == proxy_ip(v6) && (40000..40100).contains(&p.port())),
            "not relayed from the covered range: {peers:?}"
        );
    }
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.udp().sessions_total == 2, "{:?}", stats.udp());
    ensure!(stats.datapath.to_host >= 10, "{:?}", stats.datapath);
    proxy.stop()?;
    Ok(())
}
