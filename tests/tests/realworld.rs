//! Packets of the real world: ICMP errors and path MTU for relayed flows,
//! L3 devices, and hosts configured the way VPN gateways are.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::*;

const FAR_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const FAR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x20);

/// A second server behind the server, on a link whose server end has MTU
/// 1280 while the far end has 1500 (so it announces an MSS of 1460).
struct Far {
    ns: Netns,
}

impl Far {
    fn add(topology: &Topology) -> Result<Self> {
        let far = Far { ns: Netns { name: format!("{}-f", topology.server.name) } };
        let (s, f) = (&topology.server, &far.ns);
        run(&["ip", "netns", "add", &f.name])?;
        run(&[
            "ip", "-n", &s.name, "link", "add", "s1", "type", "veth", "peer", "name", "f0",
            "netns", &f.name,
        ])?;
        s.exec(&["ip", "link", "set", "s1", "mtu", "1280", "up"])?;
        s.exec(&["ip", "addr", "add", "203.0.113.1/24", "dev", "s1"])?;
        s.exec(&["ip", "addr", "add", "2001:db8:3::1/64", "dev", "s1", "nodad"])?;
        s.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        f.exec(&["ip", "link", "set", "lo", "up"])?;
        f.exec(&["ip", "link", "set", "f0", "mtu", "1500", "up"])?;
        f.exec(&["ip", "addr", "add", "203.0.113.20/24", "dev", "f0"])?;
        f.exec(&["ip", "addr", "add", "2001:db8:3::20/64", "dev", "f0", "nodad"])?;
        f.exec(&["ip", "route", "add", "default", "via", "203.0.113.1"])?;
        f.exec(&["ip", "-6", "route", "add", "default", "via", "2001:db8:3::1"])?;
        let p = &topology.proxy;
        p.exec(&["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.10"])?;
        p.exec(&["ip", "-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:2::10"])?;
        Ok(far)
    }
}

impl Drop for Far {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.ns.name]);
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// 1 MiB from the client to the far server across the bottleneck (the
/// direction `iperf3 -c` measures), byte-exact; the far server answers with
/// its byte count. (The other direction is not a path MTU case here: the far
/// host's 1500-byte frames into the server's 1280-byte veth end are dropped
/// by the veth itself, with no ICMP, unless they happen to be GSO.)
fn bulk_to_far(topology: &Topology, far: &Far, v6: bool) -> Result<()> {
    let addr: SocketAddr = if v6 { (FAR_V6, 5201).into() } else { (FAR_V4, 5201).into() };
    let listener = far.ns.tcp_listen(addr)?;
    let request = pattern(7, 1 << 20);
    let server = std::thread::spawn(move || -> Result<Vec<u8>> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let received = read_to_end(&mut stream)?;
        stream.write_all(received.len().to_string().as_bytes())?;
        Ok(received)
    });
    let mut client = topology.client.tcp_connect(addr)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    client.write_all(&request).context("sending across the 1280 link")?;
    client.shutdown(Shutdown::Write)?;
    let answer = read_to_end(&mut client).context("receiving the count")?;
    let received = server.join().unwrap()?;
    ensure!(received == request, "the far server got {} bytes, or wrong ones", received.len());
    ensure!(answer == (1u32 << 20).to_string().as_bytes(), "answer {answer:?}");
    Ok(())
}

/// Spoofed upstream sockets are bound to the client's address, so the
/// "fragmentation needed" and "packet too big" messages of the 1280 hop are
/// addressed to the client. The program hands them to the relay's socket:
/// a bulk transfer across the bottleneck completes, on both families.
#[test]
fn path_mtu_is_learnt_by_spoofed_upstream_sockets() -> Result<()> {
    let topology = Topology::new("pmtuspoof")?;
    let far = Far::add(&topology)?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, "--port", "5201", "--spoof-source"],
    )?;
    for v6 in [false, true] {
        bulk_to_far(&topology, &far, v6).with_context(|| format!("v6={v6}"))?;
    }
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.datapath.icmp_to_socket >= 2, "{:?}", stats.datapath);
    ensure!(stats.tcp().accepted == 2, "{:?}", stats.tcp());
    proxy.stop()?;
    Ok(())
}

/// The same without spoofing: the errors come to the proxy's own address.
#[test]
fn path_mtu_is_learnt_by_plain_upstream_sockets() -> Result<()> {
    let topology = Topology::new("pmtuplain")?;
    let far = Far::add(&topology)?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "5201"])?;
    for v6 in [false, true] {
        bulk_to_far(&topology, &far, v6).with_context(|| format!("v6={v6}"))?;
    }
    ensure!(proxy.stats(&topology.proxy)?.tcp().accepted == 2);
    proxy.stop()?;
    Ok(())
}

/// An unreachable destination: the router's ICMP error reaches the relay's
/// spoofed upstream socket, whose connect fails at once instead of waiting
/// for the connect timeout.
#[test]
fn an_unreachable_upstream_fails_the_connect_at_once() -> Result<()> {
    let topology = Topology::new("unreach")?;
    let _far = Far::add(&topology)?;
    topology.server.exec(&["ip", "route", "add", "unreachable", "203.0.113.99/32"])?;
    topology.server.exec(&["ip", "-6", "route", "add", "unreachable", "2001:db8:3::99/128"])?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            PROXY_SERVER_IFACE,
            "--port",
            "5201",
            "--spoof-source",
            "--connect-timeout",
            "10",
        ],
    )?;
    for (i, dst) in ["203.0.113.99:5201", "[2001:db8:3::99]:5201"].into_iter().enumerate() {
        let dst: SocketAddr = dst.parse()?;
        let started = Instant::now();
        let _ = topology.client.tcp_connect(dst);
        loop {
            let tcp = *proxy.stats(&topology.proxy)?.tcp();
            if tcp.upstream_failures == i as u64 + 1 {
                ensure!(tcp.connect_timeouts == 0, "{tcp:?}");
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(3),
                "{dst}: the connect waited: {tcp:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    proxy.stop()?;
    Ok(())
}

/// A socat process; killed when dropped.
struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TUN tunnel (no Ethernet header) from the client to the proxy, over
/// UDP: `tc3` 203.0.113.129 / 2001:db8:9::2 in the client, `tl3`
/// 203.0.113.130 / 2001:db8:9::1 in the proxy, with the client's routes to
/// the server through it.
fn tun_tunnel(topology: &Topology) -> Result<(Socat, Socat)> {
    // Kernels with TUN as a module (the VM kernels) have no /dev/net/tun
    // until it is loaded.
    if !std::path::Path::new("/dev/net/tun").exists() {
        let _ = std::process::Command::new("modprobe").arg("tun").status();
    }
    let socat = |ns: &Netns, args: &[&str]| -> Result<Socat> {
        Ok(Socat(ns.command("socat").args(args).stderr(Stdio::null()).spawn()?))
    };
    let listening = socat(
        &topology.proxy,
        &["UDP-LISTEN:7000,bind=192.0.2.1", "TUN:203.0.113.130/30,up,iff-no-pi,tun-name=tl3"],
    )?;
    // The calling end's UDP socket is connected: a datagram that meets no
    // listener yet makes it fail with ECONNREFUSED and exit.
    topology.proxy.wait_until_bound("-u", 7000)?;
    let calling = socat(
        &topology.client,
        &["UDP:192.0.2.1:7000", "TUN:203.0.113.129/30,up,iff-no-pi,tun-name=tc3"],
    )?;
    // The listening end opens its TUN when the first datagram arrives;
    // under emulation, with other tests running, that takes a while.
    let poke = topology.client.udp_bind((Ipv4Addr::UNSPECIFIED, 0).into())?;
    eventually(Duration::from_secs(60), || {
        let _ = poke.send_to(b"up", (Ipv4Addr::new(203, 0, 113, 130), 9));
        topology.proxy.exec(&["ip", "link", "show", "tl3"]).context("the tunnel did not come up")
    })?;
    topology.proxy.exec(&["ip", "addr", "add", "2001:db8:9::1/64", "dev", "tl3", "nodad"])?;
    topology.client.exec(&["ip", "addr", "add", "2001:db8:9::2/64", "dev", "tc3", "nodad"])?;
    topology.client.exec(&["ip", "route", "add", "198.51.100.10/32", "dev", "tc3"])?;
    topology.client.exec(&["ip", "-6", "route", "add", "2001:db8:2::10/128", "dev", "tc3"])?;
    Ok((listening, calling))
}

/// On a TUN device, whose packets start at the IP header, connections are
/// intercepted on both families, as on Ethernet.
#[test]
fn a_tun_device_is_intercepted() -> Result<()> {
    let topology = Topology::new("tun")?;
    let _tunnel = tun_tunnel(&topology)?;
    let seen4 = http_responder(&topology.server, Topology::server_addr(false, 80), "the server")?;
    let seen6 = http_responder(&topology.server, Topology::server_addr(true, 80), "the server")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", "tl3", "--port", "80"])?;
    let stats = proxy.stats(&topology.proxy)?;
    ensure!(stats.interfaces == ["tl3"], "{:?}", stats.interfaces);
    for (url, seen, v6) in
        [("http://198.51.100.10/", &seen4, false), ("http://[2001:db8:2::10]/", &seen6, true)]
    {
        ensure!(topology.client.curl(url)? == "the server");
        let peer = seen.recv_timeout(Duration::from_secs(5))?;
        ensure!(peer.ip() == proxy_ip(v6), "{url} not relayed: the server saw {peer}");
    }
    ensure!(proxy.stats(&topology.proxy)?.tcp().accepted == 2);
    proxy.stop()?;
    Ok(())
}

/// A device whose packets the program cannot parse is refused in one line.
#[test]
fn an_unsupported_device_type_is_refused() -> Result<()> {
    let topology = Topology::new("devtype")?;
    let args = ["attach", "lo", "--port", "80"];
    let stderr = expect_refused(&topology.proxy, &[], &args, "link type 772 (loopback)")?;
    ensure!(stderr.trim().lines().count() == 1, "{stderr}");
    Ok(())
}

/// With `src_valid_mark=1` (as wg-quick sets it), the kernel's source check
/// of a steered packet routes the client's address with tproxy's mark.
/// Connections are still relayed, and doctor says why.
#[test]
fn src_valid_mark_does_not_stop_interception() -> Result<()> {
    let topology = Topology::new("validmark")?;
    topology.proxy.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.src_valid_mark=1",
        "net.ipv4.conf.p0.src_valid_mark=1",
    ])?;
    let seen = http_responder(&topology.server, Topology::server_addr(false, 80), "the server")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    ensure!(topology.client.curl("http://198.51.100.10/")? == "the server");
    let peer = seen.recv_timeout(Duration::from_secs(5))?;
    ensure!(peer.ip() == IpAddr::from(PROXY_SERVER_SIDE_V4), "not relayed: {peer}");
    proxy.stop()?;
    let out = topology.proxy.command(tproxy_bin()).args(["doctor", PROXY_CLIENT_IFACE]).output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(report.contains("p0: src_valid_mark=1"), "{report}");
    ensure!(report.contains("p0: link type 1 (Ethernet header)"), "{report}");
    Ok(())
}

/// An ipip tunnel (link type 768) from the client to the proxy, where the
/// kernel has the module: the Debian kernels of `cargo xtask vm-test` do;
/// this host's kernel has none, and the test says so and checks nothing.
#[test]
fn an_ipip_tunnel_is_intercepted_where_the_kernel_has_it() -> Result<()> {
    let topology = Topology::new("ipip")?;
    let made = topology.proxy.exec(&[
        "ip",
        "link",
        "add",
        "tpi",
        "type",
        "ipip",
        "local",
        "192.0.2.1",
        "remote",
        "192.0.2.2",
    ]);
    if let Err(e) = made {
        eprintln!("ipip: not available on this kernel ({e}); the kernel-VM runs cover it");
        return Ok(());
    }
    topology.client.exec(&[
        "ip",
        "link",
        "add",
        "tci",
        "type",
        "ipip",
        "local",
        "192.0.2.2",
        "remote",
        "192.0.2.1",
    ])?;
    topology.proxy.exec(&["ip", "addr", "add", "203.0.113.130/30", "dev", "tpi"])?;
    topology.proxy.exec(&["ip", "link", "set", "tpi", "up"])?;
    topology.client.exec(&["ip", "addr", "add", "203.0.113.129/30", "dev", "tci"])?;
    topology.client.exec(&["ip", "link", "set", "tci", "up"])?;
    topology.client.exec(&["ip", "route", "add", "198.51.100.10/32", "dev", "tci"])?;
    let seen = http_responder(&topology.server, Topology::server_addr(false, 80), "the server")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", "tpi", "--port", "80"])?;
    ensure!(topology.client.curl("http://198.51.100.10/")? == "the server");
    let peer = seen.recv_timeout(Duration::from_secs(5))?;
    ensure!(peer.ip() == proxy_ip(false), "not relayed: the server saw {peer}");
    proxy.stop()?;
    Ok(())
}
