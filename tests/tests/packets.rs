//! Hostile and odd packets, crafted by hand and sent from the client's raw
//! socket through the real attached program. Each one must be steered
//! correctly or passed untouched: the program's own counters show which, and
//! the relay keeps working afterwards.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::*;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// A frame from the client to the proxy's p0.
struct Wire {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
}

impl Wire {
    fn eth(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = self.dst_mac.to_vec();
        frame.extend(self.src_mac);
        frame.extend(ethertype.to_be_bytes());
        frame.extend(payload);
        frame
    }
}

fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&1u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x02;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(((8 + payload.len()) as u16).to_be_bytes());
    h.extend([0, 0]);
    h.extend(payload);
    h
}

struct V4 {
    src: std::net::Ipv4Addr,
    version: u8,
    ihl: u8,
    frag: u16,
    proto: u8,
    tot_len: Option<u16>,
}

impl Default for V4 {
    fn default() -> Self {
        Self { src: CLIENT_V4, version: 4, ihl: 5, frag: 0, proto: TCP, tot_len: None }
    }
}

fn ipv4(h: V4, l4: &[u8]) -> Vec<u8> {
    let header_len = h.ihl.max(5) as usize * 4;
    let mut p = vec![0u8; header_len];
    p[0] = (h.version << 4) | h.ihl;
    let tot = h.tot_len.unwrap_or((header_len + l4.len()) as u16);
    p[2..4].copy_from_slice(&tot.to_be_bytes());
    p[6..8].copy_from_slice(&h.frag.to_be_bytes());
    p[8] = 64;
    p[9] = h.proto;
    p[12..16].copy_from_slice(&h.src.octets());
    p[16..20].copy_from_slice(&SERVER_V4.octets());
    // Options: NOPs (1) then End of list.
    for b in p.iter_mut().skip(20) {
        *b = 1;
    }
    if header_len > 20 {
        p[header_len - 1] = 0;
    }
    let mut sum = 0u32;
    for chunk in p[..header_len].chunks(2) {
        sum += u16::from_be_bytes([chunk[0], chunk[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend(l4);
    p
}

/// An IPv6 packet with `ext` (already chained) before the transport header.
fn ipv6(first_next: u8, ext: &[u8], l4: &[u8], payload_len: Option<u16>) -> Vec<u8> {
    ipv6_to(SERVER_V6, first_next, ext, l4, payload_len)
}

fn ipv6_to(
    dst: std::net::Ipv6Addr,
    first_next: u8,
    ext: &[u8],
    l4: &[u8],
    payload_len: Option<u16>,
) -> Vec<u8> {
    ipv6_between(CLIENT_V6, dst, first_next, ext, l4, payload_len)
}

fn ipv6_between(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    first_next: u8,
    ext: &[u8],
    l4: &[u8],
    payload_len: Option<u16>,
) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    let len = payload_len.unwrap_or((ext.len() + l4.len()) as u16);
    p.extend(len.to_be_bytes());
    p.push(first_next);
    p.push(64);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(ext);
    p.extend(l4);
    p
}

/// A generic extension header (hop-by-hop, routing, destination options) of
/// 8 bytes, padded with PadN.
fn ext8(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn frag_ext(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | more as u16;
    let mut h = vec![next, 0];
    h.extend(field.to_be_bytes());
    h.extend(7u32.to_be_bytes());
    h
}

/// An AF_PACKET socket on `dev`, inside the namespace it was made in.
fn raw_socket(ns: &Netns, dev: &'static str) -> Result<OwnedFd> {
    ns.run(move || -> std::io::Result<OwnedFd> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(dev).unwrap();
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    })?
    .context("opening an AF_PACKET socket")
}

fn send(fd: &OwnedFd, frame: &[u8]) -> Result<()> {
    let sent = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    ensure!(sent == frame.len() as isize, "send: {}", std::io::Error::last_os_error());
    Ok(())
}

fn mac(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let text = ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")])?;
    let bytes: Vec<u8> =
        text.trim().split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

#[test]
fn crafted_packets_are_steered_correctly_or_passed_untouched() -> Result<()> {
    let topology = Topology::new("packets")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--port", "5300"],
    )?;
    let wire = Wire { dst_mac: mac(&topology.proxy, "p0")?, src_mac: mac(&topology.client, "c0")? };
    let raw = raw_socket(&topology.client, "c0")?;
    let syn = |n: u16| tcp_syn(40000 + n, 80);
    let v4 = |h: V4, l4: &[u8]| wire.eth(ETH_P_IP, &ipv4(h, l4));
    let v6 = |next: u8, ext: &[u8], l4: &[u8]| wire.eth(ETH_P_IPV6, &ipv6(next, ext, l4, None));
    let dest_chain = |n: usize, last: u8| -> Vec<u8> {
        (0..n).flat_map(|i| ext8(if i + 1 == n { last } else { 60 })).collect()
    };
    let mut vlan = wire.eth(ETH_P_8021Q, &[0, 10]);
    vlan.extend(ETH_P_IP.to_be_bytes());
    vlan.extend(ipv4(V4::default(), &syn(21)));

    // (what, frame, steered?)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        // Shorter than an Ethernet header cannot reach TC ingress (the
        // kernel refuses to send it); one byte of IP is the least that can.
        ("one byte after the Ethernet header", wire.eth(ETH_P_IP, &[0x45]), false),
        ("an Ethernet header alone", wire.eth(ETH_P_IP, &[]), false),
        ("an IPv4 header cut short", wire.eth(ETH_P_IP, &ipv4(V4::default(), &[])[..12]), false),
        ("IPv4 with IHL 4", v4(V4 { ihl: 4, ..V4::default() }, &syn(1)), false),
        ("IPv4 with version 5", v4(V4 { version: 5, ..V4::default() }, &syn(2)), false),
        ("an IPv4 SYN", v4(V4::default(), &syn(3)), true),
        (
            "an IPv4 SYN with 4 bytes of options (IHL 6)",
            v4(V4 { ihl: 6, ..V4::default() }, &syn(4)),
            true,
        ),
        (
            "an IPv4 SYN with 40 bytes of options (IHL 15)",
            v4(V4 { ihl: 15, ..V4::default() }, &syn(5)),
            true,
        ),
        (
            "a non-first IPv4 fragment that looks like a SYN",
            v4(V4 { frag: 185, ..V4::default() }, &syn(6)),
            false,
        ),
        (
            "a first IPv4 fragment (MF: unparsed)",
            v4(V4 { frag: 0x2000, ..V4::default() }, &syn(7)),
            false,
        ),
        ("an IPv4 TCP header cut short", v4(V4::default(), &syn(8)[..10]), false),
        (
            "IPv4 whose total length ends inside the TCP header",
            v4(V4 { tot_len: Some(30), ..V4::default() }, &syn(9)),
            false,
        ),
        (
            "IPv4 whose total length runs past the frame",
            v4(V4 { tot_len: Some(1400), ..V4::default() }, &syn(10)),
            false,
        ),
        ("a VLAN-tagged IPv4 SYN", vlan, false),
        ("a SYN to a port not intercepted", v4(V4::default(), &tcp_syn(40011, 81)), false),
        (
            "a UDP datagram to an intercepted port",
            v4(V4 { proto: UDP, ..V4::default() }, &udp(40012, 5300, b"x")),
            true,
        ),
        (
            "a UDP header cut short",
            v4(V4 { proto: UDP, ..V4::default() }, &udp(40013, 5300, b"")[..4]),
            false,
        ),
        ("an IPv6 SYN", v6(TCP, &[], &syn(14)), true),
        (
            "an IPv6 SYN behind hop-by-hop, routing and destination options",
            v6(0, &[ext8(43), ext8(60), ext8(TCP)].concat(), &syn(15)),
            true,
        ),
        (
            "an IPv6 SYN behind 6 extension headers (as many as the walk takes)",
            v6(60, &dest_chain(6, TCP), &syn(23)),
            true,
        ),
        (
            "an IPv6 SYN behind 7 extension headers (too long a chain: unparsed)",
            v6(60, &dest_chain(7, TCP), &syn(16)),
            false,
        ),
        ("a first IPv6 fragment (unparsed)", v6(44, &frag_ext(TCP, 0, true), &syn(24)), false),
        (
            "an IPv6 SYN to a v4-mapped address",
            wire.eth(ETH_P_IPV6, &ipv6_to(SERVER_V4.to_ipv6_mapped(), TCP, &[], &syn(25), None)),
            false,
        ),
        ("a non-first IPv6 fragment", v6(44, &frag_ext(TCP, 100, false), &syn(17)), false),
        (
            "an IPv6 atomic fragment (offset 0, no more)",
            v6(44, &frag_ext(TCP, 0, false), &syn(18)),
            true,
        ),
        (
            "an IPv6 extension header running past the frame",
            v6(60, &[TCP, 200, 1, 4, 0, 0, 0, 0], &syn(19)),
            false,
        ),
        (
            "IPv6 whose payload length runs past the frame",
            wire.eth(ETH_P_IPV6, &ipv6(TCP, &[], &syn(20), Some(1000))),
            false,
        ),
        ("an IPv6 TCP header cut short", v6(TCP, &[], &syn(22)[..12]), false),
    ];

    let counters = |proxy: &Proxy| -> Result<(u64, u64)> {
        let d = &proxy.stats(&topology.proxy)?.datapath;
        Ok((d.to_listener, d.assign_failed))
    };
    // After each case, a sentinel SYN that is always steered: frames on one
    // device are judged in order, so once the sentinel is counted, the
    // case before it has been judged too.
    let (mut steered_before, _) = counters(&proxy)?;
    let mut wrong = Vec::new();
    for (i, (what, frame, expect_steered)) in cases.iter().enumerate() {
        send(&raw, frame)?;
        send(&raw, &v4(V4::default(), &tcp_syn(41000 + i as u16, 80)))?;
        let target = steered_before + 1 + u64::from(*expect_steered);
        // Past the wait, the counters as they stand say what went wrong.
        let (steered, failed) = eventually(Duration::from_secs(10), || {
            let (steered, failed) = counters(&proxy)?;
            ensure!(steered >= target, "the sentinel was not counted");
            Ok((steered, failed))
        })
        .or_else(|_| counters(&proxy))?;
        let was_steered = steered - steered_before == 2;
        if steered != target || failed != 0 {
            wrong.push(format!(
                "{what}: steered {was_steered}, expected {expect_steered}, assign failures {failed}"
            ));
        }
        steered_before = steered;
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    let unparsed = proxy.stats(&topology.proxy)?.datapath.unparsed_passed;
    ensure!(unparsed == 3, "unparsed packets passed: {unparsed}, expected the 3 marked so");
    eprintln!("packets: {} crafted packets, each steered or passed as expected", cases.len());

    // The relay still works for real traffic.
    let addr = Topology::server_addr(false, 80);
    let server = serve_once(topology.server.tcp_listen(addr)?, b"fine".to_vec());
    let mut client = topology.client.tcp_connect(addr)?;
    client.shutdown(std::net::Shutdown::Write)?;
    ensure!(read_to_end(&mut client)? == b"fine");
    ensure!(server.join().unwrap()?.peer.ip() == proxy_ip(false));
    proxy.stop()?;
    Ok(())
}

/// A UDP datagram to the server, fragmented in two by the client.
fn fragmented_datagram(wire: &Wire, id: u16) -> [Vec<u8>; 2] {
    let payload = [7u8; 24];
    let datagram = udp(40100, 5300, &payload);
    // The first fragment carries the UDP header and 8 bytes; the second the
    // rest, at offset 16 bytes (2 units).
    let (head, tail) = datagram.split_at(16);
    let fragment = |frag: u16, l4: &[u8]| {
        let mut packet = ipv4(V4 { frag, proto: UDP, ..V4::default() }, l4);
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        // The header checksum covers the id.
        packet[10..12].copy_from_slice(&[0, 0]);
        let mut sum = 0u32;
        for chunk in packet[..20].chunks(2) {
            sum += u16::from_be_bytes([chunk[0], chunk[1]]) as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        wire.eth(ETH_P_IP, &packet)
    };
    [fragment(0x2000, head), fragment(2, tail)]
}

/// A fragmented datagram to an intercepted port cannot be steered whole.
/// By default it passes to the server untouched; with `--unparsed drop` its
/// first fragment is dropped, so it never arrives, and interception cannot
/// be bypassed with fragments.
#[test]
fn unparsed_packets_pass_or_drop_as_configured() -> Result<()> {
    for (policy, arrives) in [("pass", true), ("drop", false)] {
        let topology = Topology::new(&format!("unparsed{policy}"))?;
        let server = UdpServer::start(&topology.server, Topology::server_addr(false, 5300), 0)?;
        let proxy = Proxy::start(
            &topology.proxy,
            &["attach", PROXY_CLIENT_IFACE, "--port", "5300", "--unparsed", policy],
        )?;
        let wire =
            Wire { dst_mac: mac(&topology.proxy, "p0")?, src_mac: mac(&topology.client, "c0")? };
        let raw = raw_socket(&topology.client, "c0")?;
        for frame in fragmented_datagram(&wire, 4242) {
            send(&raw, &frame)?;
        }
        proxy.wait_for(&topology.proxy, policy, |s| {
            let d = &s.datapath;
            if arrives { d.unparsed_passed == 1 } else { d.unparsed_dropped == 1 }
        })?;
        if arrives {
            eventually(Duration::from_secs(5), || {
                ensure!(!server.peers().is_empty(), "the fragmented datagram was lost");
                Ok(())
            })?;
            ensure!(server.peers()[0].ip() == client_ip(false), "{:?}", server.peers());
        } else {
            // A datagram sent after it, whole, is relayed; the dropped one
            // never arrived before it.
            let client = topology.client.udp_client(Topology::server_addr(false, 5300))?;
            client.send_to(b"whole", Topology::server_addr(false, 5300))?;
            eventually(Duration::from_secs(5), || {
                ensure!(!server.peers().is_empty(), "the whole datagram was lost");
                Ok(())
            })?;
            ensure!(server.peers() == [server.peers()[0]], "{:?}", server.peers());
            ensure!(server.peers()[0].ip() == proxy_ip(false), "{:?}", server.peers());
        }
        proxy.stop()?;
    }
    Ok(())
}

/// A datagram from `0.0.0.0` (or `::`) to an intercepted port must not be
/// taken for one of a connected socket's: an unconnected socket's peer is
/// the unspecified address too, and the host's own wildcard server on the
/// port would get it, though it was addressed to the server beyond.
#[test]
fn an_unspecified_source_never_reaches_the_hosts_own_server() -> Result<()> {
    let topology = Topology::new("unspecsrc")?;
    // Dual-stack: it gets IPv4 datagrams too.
    let own = topology.proxy.udp_bind("[::]:5300".parse()?)?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "5300"])?;
    let wire = Wire { dst_mac: mac(&topology.proxy, "p0")?, src_mac: mac(&topology.client, "c0")? };
    let raw = raw_socket(&topology.client, "c0")?;
    let v4 = V4 { src: std::net::Ipv4Addr::UNSPECIFIED, proto: UDP, ..V4::default() };
    send(&raw, &wire.eth(ETH_P_IP, &ipv4(v4, &udp(5300, 5300, b"to the server"))))?;
    let v6 = ipv6_between(
        std::net::Ipv6Addr::UNSPECIFIED,
        SERVER_V6,
        UDP,
        &[],
        &udp(5300, 5300, b"to the server"),
        None,
    );
    send(&raw, &wire.eth(ETH_P_IPV6, &v6))?;
    // Both were judged once the datapath counts them.
    eventually(Duration::from_secs(10), || {
        let d = &proxy.stats(&topology.proxy)?.datapath;
        let judged = d.to_listener + d.to_socket;
        ensure!(judged + d.return_path >= 2, "not judged yet: {d:?}");
        Ok(())
    })?;
    own.set_nonblocking(true)?;
    match own.recv_from(&mut [0u8; 64]) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => anyhow::bail!("the host's own server got {other:?}"),
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.datapath.return_path == 0, "{stats:?}");
    ensure!(stats.datapath.to_listener == 2, "{stats:?}");
    Ok(())
}
