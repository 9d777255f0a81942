//! A differential test of the TC program's parser. Thousands of generated
//! frames (IPv4 with options and fragments, IPv6 extension chains, TCP, UDP,
//! ICMP and ICMPv6 errors, VLAN and other ether types, Ethernet padding),
//! and every truncation of some of them, run through the real program with
//! `BPF_PROG_TEST_RUN`, through the Ethernet program and the L3 one (which
//! meets the harness's frames as a tunnel showing its outer headers, see
//! `oracle_l3`). What the program made of each (recorded in a trace
//! map the loader enables only here) must equal what an oracle makes of it:
//! etherparse decodes the headers, and the oracle applies the program's
//! documented policy (see `tproxy-ebpf/src/parse.rs`).
//!
//! Seeded: a failure names its seed and frame. `TPROXY_PARSER_SEED` and
//! `TPROXY_PARSER_FRAMES` (default 3000) choose another or a longer run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail};
use etherparse::{
    Ethernet2HeaderSlice, Icmpv4Slice, Icmpv6Slice, IpAuthHeaderSlice, Ipv4HeaderSlice,
    Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, TcpHeaderSlice,
    UdpHeaderSlice,
};
use tproxy_ebpf::{
    PARSED_ERROR, PARSED_FLOW, PARSED_FRAGMENT, PARSED_NONE, PARSED_TOO_DEEP, ParseTrace,
};
use tproxy_tests::*;
use tproxy_user::{
    datapath::{Datapath, Settings},
    host::system::LinkKind,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// Extension headers the program walks, and how many.
const EXT_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST: u8 = 60;
const MAX_EXT_HDRS: usize = 6;

/// What the parser found, in a form both sides produce.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    kind: u32,
    proto: u8,
    ipv6: bool,
    syn: bool,
    sport: u16,
    dport: u16,
    saddr: IpAddr,
    daddr: IpAddr,
}

impl Parsed {
    fn none(kind: u32) -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Self { kind, proto: 0, ipv6: false, syn: false, sport: 0, dport: 0, saddr: any, daddr: any }
    }

    fn from_trace(t: &ParseTrace) -> Self {
        if matches!(t.kind, PARSED_NONE | PARSED_TOO_DEEP) {
            return Self::none(t.kind);
        }
        let addr = |words: [u32; 4]| -> IpAddr {
            if t.ipv6 != 0 {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
            }
        };
        Self {
            kind: t.kind,
            proto: t.proto,
            ipv6: t.ipv6 != 0,
            syn: t.syn != 0,
            sport: t.sport,
            dport: t.dport,
            saddr: addr(t.saddr),
            daddr: addr(t.daddr),
        }
    }
}

/// `slice` from `offset`, padded with zeros to at least `len` bytes: the
/// program reads only the fields it needs (two bytes of an extension
/// header), while etherparse wants whole headers.
fn padded(frame: &[u8], offset: usize, len: usize) -> Option<Vec<u8>> {
    let rest = frame.get(offset..)?;
    let mut bytes = rest.to_vec();
    if bytes.len() < len {
        bytes.resize(len, 0);
    }
    Some(bytes)
}

/// The oracle: what the program should make of `frame`.
fn oracle(frame: &[u8]) -> Parsed {
    let none = Parsed::none(PARSED_NONE);
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(frame) else { return none };
    match eth.ether_type().0 {
        0x0800 => oracle_v4(frame, 14).unwrap_or(none),
        0x86dd => oracle_v6(frame, 14).unwrap_or(none),
        _ => none,
    }
}

fn oracle_v4(frame: &[u8], l3: usize) -> Option<Parsed> {
    let ip = Ipv4HeaderSlice::from_slice(frame.get(l3..)?).ok()?;
    if ip.fragments_offset().value() != 0 {
        return None;
    }
    let end = match ip.total_len() {
        0 => frame.len(),
        len => l3 + len as usize,
    };
    let first_fragment = ip.more_fragments();
    let l4 = l3 + ip.ihl() as usize * 4;
    let (saddr, daddr) = (IpAddr::from(ip.source()), IpAddr::from(ip.destination()));
    transport(frame, end, l4, ip.protocol().0, first_fragment, false, saddr, daddr)
}

fn oracle_v6(frame: &[u8], l3: usize) -> Option<Parsed> {
    let ip = Ipv6HeaderSlice::from_slice(frame.get(l3..)?).ok()?;
    let end = match ip.payload_length() {
        0 => frame.len(),
        len => l3 + 40 + len as usize,
    };
    let (mut next, mut off, mut first_fragment) = (ip.next_header().0, l3 + 40, false);
    let is_ext = |n: u8| matches!(n, EXT_HOP | EXT_ROUTING | EXT_DEST | EXT_AUTH | EXT_FRAGMENT);
    for _ in 0..MAX_EXT_HDRS {
        if !is_ext(next) {
            break;
        }
        // The program needs two bytes (four of a fragment header) to be there.
        let needed = if next == EXT_FRAGMENT { 4 } else { 2 };
        if frame.len() < off + needed {
            return None;
        }
        match next {
            EXT_FRAGMENT => {
                let bytes = padded(frame, off, 8)?;
                let h = Ipv6FragmentHeaderSlice::from_slice(&bytes).ok()?;
                if h.fragment_offset().value() != 0 {
                    return None;
                }
                first_fragment |= h.more_fragments();
                next = h.next_header().0;
                off += 8;
            }
            EXT_AUTH => {
                let len = (frame[off + 1] as usize + 2) * 4;
                let bytes = padded(frame, off, len)?;
                let h = IpAuthHeaderSlice::from_slice(&bytes).ok()?;
                next = h.next_header().0;
                off += h.slice().len();
            }
            _ => {
                let len = (frame[off + 1] as usize + 1) * 8;
                let bytes = padded(frame, off, len)?;
                let h = Ipv6RawExtHeaderSlice::from_slice(&bytes).ok()?;
                next = h.next_header().0;
                off += h.slice().len();
            }
        }
    }
    if is_ext(next) {
        return Some(Parsed::none(PARSED_TOO_DEEP));
    }
    let (saddr, daddr) = (IpAddr::from(ip.source()), IpAddr::from(ip.destination()));
    transport(frame, end, off, next, first_fragment, true, saddr, daddr)
}

/// The transport layer at `l4`, inside a datagram that ends at `end`.
#[allow(clippy::too_many_arguments)]
fn transport(
    frame: &[u8],
    end: usize,
    l4: usize,
    proto: u8,
    first_fragment: bool,
    ipv6: bool,
    saddr: IpAddr,
    daddr: IpAddr,
) -> Option<Parsed> {
    if end > frame.len() {
        return None;
    }
    let min = match proto {
        TCP => 20,
        UDP => 8,
        ICMP if !ipv6 && !first_fragment => return icmp_error(frame, end, l4, false),
        ICMPV6 if ipv6 && !first_fragment => return icmp_error(frame, end, l4, true),
        _ => return None,
    };
    let flow =
        |kind, sport, dport, syn| Parsed { kind, proto, ipv6, syn, sport, dport, saddr, daddr };
    if first_fragment {
        // Only the ports: the rest of the header may be in a later fragment.
        if l4 + 4 > end {
            return None;
        }
        let p = &frame[l4..l4 + 4];
        let (sport, dport) = (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]));
        return Some(flow(PARSED_FRAGMENT, sport, dport, false));
    }
    if l4 + min > end {
        return None;
    }
    let datagram = &frame[l4..end];
    Some(if proto == TCP {
        let tcp = TcpHeaderSlice::from_slice(datagram).ok()?;
        flow(PARSED_FLOW, tcp.source_port(), tcp.destination_port(), tcp.syn() && !tcp.ack())
    } else {
        let udp = UdpHeaderSlice::from_slice(datagram).ok()?;
        flow(PARSED_FLOW, udp.source_port(), udp.destination_port(), false)
    })
}

/// An ICMP error about a TCP or UDP packet: its tuple, reversed.
fn icmp_error(frame: &[u8], end: usize, icmp: usize, ipv6: bool) -> Option<Parsed> {
    let message = frame.get(icmp..)?;
    let (kind, quoted) = if ipv6 {
        let m = Icmpv6Slice::from_slice(message).ok()?;
        (m.type_u8(), icmp + 8)
    } else {
        let m = Icmpv4Slice::from_slice(message).ok()?;
        (m.type_u8(), icmp + 8)
    };
    let is_error = if ipv6 { matches!(kind, 1..=4) } else { matches!(kind, 3 | 11 | 12) };
    if !is_error {
        return None;
    }
    let (proto, src, dst, inner_l4) = if ipv6 {
        let ip = Ipv6HeaderSlice::from_slice(frame.get(quoted..)?).ok()?;
        (ip.next_header().0, IpAddr::from(ip.source()), IpAddr::from(ip.destination()), quoted + 40)
    } else {
        // The program reads the fixed 20 bytes; options are skipped by IHL.
        let bytes = padded(frame, quoted, 60)?;
        let ip = Ipv4HeaderSlice::from_slice(&bytes).ok()?;
        if frame.len() < quoted + 20 || ip.fragments_offset().value() != 0 {
            return None;
        }
        let l4 = quoted + ip.ihl() as usize * 4;
        (ip.protocol().0, IpAddr::from(ip.source()), IpAddr::from(ip.destination()), l4)
    };
    if !matches!(proto, TCP | UDP) || inner_l4 + 4 > end {
        return None;
    }
    let p = &frame[inner_l4..inner_l4 + 4];
    Some(Parsed {
        kind: PARSED_ERROR,
        proto,
        ipv6,
        syn: false,
        sport: u16::from_be_bytes([p[2], p[3]]),
        dport: u16::from_be_bytes([p[0], p[1]]),
        saddr: dst,
        daddr: src,
    })
}

/// The length of the fixed IP header the frame's ether type announces.
fn fixed_ip_header(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        _ => 0,
    }
}

/// What the L3 program should make of `frame`, or `None` where it makes no
/// promise. The harness shows it the Ethernet header as outer bytes before
/// the network header (as 5.10's ipip does); the program finds the IP header
/// by counting the IP length back from the end and checking the byte there.
/// Where the datagram ends the frame that is the oracle's answer; where it
/// does not (padding, truncation), the program reads from the frame's start,
/// an Ethernet address, which parses as nothing, unless the byte it checks
/// happens to match.
fn oracle_l3(frame: &[u8]) -> Option<Parsed> {
    let none = Parsed::none(PARSED_NONE);
    let (version, ip_len) = match (frame.get(12..14), frame.get(14..20)) {
        (Some([0x08, 0x00]), Some(h)) => (4, u16::from_be_bytes([h[2], h[3]]) as usize),
        (Some([0x86, 0xdd]), Some(h)) => (6, u16::from_be_bytes([h[4], h[5]]) as usize + 40),
        _ => return Some(none),
    };
    let Some(outer) = frame.len().checked_sub(ip_len) else { return Some(none) };
    if outer == 0 || outer > 128 || frame[14] >> 4 != version || outer + 20 > frame.len() {
        return Some(none);
    }
    match outer {
        14 => Some(oracle(frame)),
        _ if frame[outer] == frame[14] => None,
        _ => Some(none),
    }
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn checksum(header: &mut [u8]) {
    header[10..12].copy_from_slice(&[0, 0]);
    let mut sum: u32 =
        header.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

fn v4_header(rng: &mut Rng, proto: u8, payload_len: usize, frag: u16) -> Vec<u8> {
    let ihl = if rng.chance(70) { 5 } else { 5 + rng.below(11) as u8 };
    let mut h = vec![0u8; ihl as usize * 4];
    h[0] = 0x40 | ihl;
    let correct = (h.len() + payload_len) as u16;
    let total = match rng.below(10) {
        0 => 0,
        1 => correct.saturating_sub(rng.below(30) as u16),
        2 => correct + rng.below(30) as u16,
        _ => correct,
    };
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&[192, 0, 2, rng.below(256) as u8]);
    h[16..20].copy_from_slice(&[198, 51, 100, rng.below(256) as u8]);
    for b in h.iter_mut().skip(20) {
        *b = 1; // NOP options
    }
    checksum(&mut h);
    h
}

fn v6_header(rng: &mut Rng, next: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    let len = match rng.below(10) {
        0 => 0,
        1 => (payload_len as u16).saturating_sub(rng.below(30) as u16),
        2 => payload_len as u16 + rng.below(30) as u16,
        _ => payload_len as u16,
    };
    h.extend(len.to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, rng.below(65536) as u16).octets());
    h.extend(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, rng.below(65536) as u16).octets());
    h
}

/// A TCP, UDP or other transport header and some payload.
fn l4(rng: &mut Rng, proto: u8) -> Vec<u8> {
    let ports = |rng: &mut Rng| -> Vec<u8> {
        let mut p = rng.pick(&[53u16, 80, 443, 5201]).to_be_bytes().to_vec();
        p.extend((1024 + rng.below(60000) as u16).to_be_bytes());
        if rng.chance(50) {
            p.swap(0, 2);
            p.swap(1, 3);
        }
        p
    };
    match proto {
        TCP => {
            let mut h = ports(rng);
            h.extend(rng.bytes(8));
            h.push(5 << 4);
            let any = rng.next() as u8;
            h.push(rng.pick(&[0x02, 0x12, 0x10, 0x11, 0x04, any]));
            h.extend(rng.bytes(6));
            let n = rng.below(16) as usize;
            h.extend(rng.bytes(n));
            h
        }
        UDP => {
            let n = rng.below(24) as usize;
            let mut h = ports(rng);
            h.extend(((8 + n) as u16).to_be_bytes());
            h.extend([0, 0]);
            h.extend(rng.bytes(n));
            h
        }
        _ => {
            let n = rng.below(24) as usize;
            rng.bytes(n)
        }
    }
}

/// An ICMP(v6) message quoting a packet of `inner_proto`.
fn icmp(rng: &mut Rng, ipv6: bool) -> Vec<u8> {
    let kind = if ipv6 {
        rng.pick(&[1u8, 2, 3, 4, 128, 129, 135])
    } else {
        rng.pick(&[3u8, 11, 12, 0, 8, 5])
    };
    let mut m = vec![kind, rng.below(16) as u8, 0, 0, 0, 0, 5, 0x00];
    let inner_proto = rng.pick(&[TCP, UDP, TCP, UDP, ICMP]);
    let quoted_l4 = rng.bytes(8).into_iter().enumerate().map(|(i, b)| if i < 2 { 0x13 } else { b });
    let quoted_l4: Vec<u8> = quoted_l4.collect();
    if ipv6 {
        let mut inner = v6_header(rng, inner_proto, 8);
        inner[4..6].copy_from_slice(&1000u16.to_be_bytes());
        m.extend(inner);
    } else {
        let frag = rng.pick(&[0x4000, 0, 0x2000, 0x0010]);
        let mut inner = v4_header(rng, inner_proto, 8, frag);
        inner[2..4].copy_from_slice(&1000u16.to_be_bytes());
        checksum(&mut inner);
        m.extend(inner);
    }
    m.extend(quoted_l4);
    m
}

fn ipv6_ext(rng: &mut Rng, kind: u8, next: u8) -> Vec<u8> {
    match kind {
        EXT_FRAGMENT => {
            let offset: u16 = if rng.chance(70) { 0 } else { rng.below(100) as u16 + 1 };
            let field = (offset << 3) | rng.below(2) as u16;
            let mut h = vec![next, 0];
            h.extend(field.to_be_bytes());
            h.extend(rng.bytes(4));
            h
        }
        EXT_AUTH => {
            let words = 1 + rng.below(4) as u8;
            let mut h = vec![next, words];
            h.extend(rng.bytes((words as usize + 2) * 4 - 2));
            h
        }
        _ => {
            let units = rng.below(3) as u8;
            let mut h = vec![next, units];
            h.extend(std::iter::repeat_n(0, (units as usize + 1) * 8 - 2));
            h
        }
    }
}

/// One random frame.
fn frame(rng: &mut Rng) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let ipv6 = rng.chance(50);
    let proto = rng.pick(&[TCP, UDP, TCP, UDP, if ipv6 { ICMPV6 } else { ICMP }, 47]);
    let body = if matches!(proto, ICMP | ICMPV6) { icmp(rng, ipv6) } else { l4(rng, proto) };
    if ipv6 {
        let chain: Vec<u8> = (0..rng.pick(&[0usize, 0, 1, 2, 3, 5, 6, 7, 8]))
            .map(|_| rng.pick(&[EXT_HOP, EXT_ROUTING, EXT_DEST, EXT_AUTH, EXT_FRAGMENT]))
            .collect();
        let mut ext = Vec::new();
        for (i, kind) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied().unwrap_or(proto);
            ext.extend(ipv6_ext(rng, *kind, next));
        }
        let first = chain.first().copied().unwrap_or(proto);
        frame.extend(rng.pick(&[0x86ddu16, 0x86dd, 0x86dd, 0x8100]).to_be_bytes());
        frame.extend(v6_header(rng, first, ext.len() + body.len()));
        frame.extend(ext);
    } else {
        let frag = rng.pick(&[0x4000u16, 0, 0x2000, 0x2000 | 3, 7, 0x4000]);
        frame.extend(rng.pick(&[0x0800u16, 0x0800, 0x0800, 0x0806]).to_be_bytes());
        frame.extend(v4_header(rng, proto, body.len(), frag));
    }
    frame.extend(body);
    // Ethernet padding past the datagram.
    if rng.chance(20) {
        let n = rng.below(20) as usize;
        frame.extend(std::iter::repeat_n(0, n));
    }
    frame
}

/// The Ethernet and the L3 program, with the parse trace or without it (as
/// `attach` loads them).
fn both_programs(trace: bool) -> Settings {
    Settings {
        mark: 0x1e5,
        upstream_mark: 0x1e6,
        trace,
        ethernet_links: true,
        l3_links: true,
        ..Settings::default()
    }
}

#[test]
fn the_program_parses_as_the_oracle_does() -> Result<()> {
    let seed: u64 = match std::env::var("TPROXY_PARSER_SEED") {
        Ok(s) => s.parse().context("TPROXY_PARSER_SEED")?,
        Err(_) => 0x7470_726f_7879,
    };
    let frames: usize = match std::env::var("TPROXY_PARSER_FRAMES") {
        Ok(s) => s.parse().context("TPROXY_PARSER_FRAMES")?,
        Err(_) => 3000,
    };
    let topology = Topology::new("parser")?;
    let counts = topology.proxy.run(move || -> Result<[usize; 5]> {
        let mut datapath = Datapath::load(&both_programs(true))?;
        let mut rng = Rng(seed | 1);
        let mut kinds = [0usize; 5];
        let (mut skipped, mut l3_compared, mut l3_parsed) = (0usize, 0usize, 0usize);
        for i in 0..frames {
            let full = frame(&mut rng);
            // Every truncation of one frame in twenty (a test run needs
            // more than an Ethernet header).
            let cuts = if i % 20 == 0 { 15..full.len() } else { full.len()..full.len() + 1 };
            for cut in cuts {
                let frame = &full[..cut];
                let traced = match datapath.trace_parse(frame, LinkKind::Ethernet) {
                    Ok(trace) => trace,
                    // The kernel's test harness refuses IP frames shorter
                    // than their fixed header; the AF_PACKET test in
                    // packets.rs sends such frames through a real device.
                    Err(_) if cut < 14 + fixed_ip_header(frame) => {
                        skipped += 1;
                        continue;
                    }
                    Err(e) => return Err(e).with_context(|| format!("a {cut}-byte frame")),
                };
                let got = Parsed::from_trace(&traced);
                let want = oracle(frame);
                if got != want {
                    bail!(
                        "seed {seed}, frame {i}, cut at {cut} of {}:\n  frame {frame:02x?}\n  program {got:?}\n  oracle  {want:?}",
                        full.len()
                    );
                }
                kinds[want.kind as usize] += 1;
                // The same frame through the L3 program.
                let Some(want) = oracle_l3(frame) else { continue };
                let got = Parsed::from_trace(&datapath.trace_parse(frame, LinkKind::L3)?);
                if got != want {
                    bail!(
                        "L3 program: seed {seed}, frame {i}, cut at {cut} of {}:\n  frame {frame:02x?}\n  program {got:?}\n  oracle  {want:?}",
                        full.len()
                    );
                }
                l3_compared += 1;
                l3_parsed += usize::from(want.kind != PARSED_NONE);
            }
        }
        eprintln!("parser: {skipped} cuts shorter than their IP header left to packets.rs");
        eprintln!(
            "parser: {l3_compared} frames also agreed through the L3 program, {l3_parsed} of them parsed"
        );
        anyhow::ensure!(l3_parsed > frames / 8, "the L3 program parsed too few frames to prove much");
        Ok(kinds)
    })??;
    eprintln!(
        "parser: seed {seed}: {} frames agreed: {} none, {} flows, {} ICMP errors, {} first fragments, {} too deep",
        counts.iter().sum::<usize>(),
        counts[PARSED_NONE as usize],
        counts[PARSED_FLOW as usize],
        counts[PARSED_ERROR as usize],
        counts[PARSED_FRAGMENT as usize],
        counts[PARSED_TOO_DEEP as usize],
    );
    // The generator reaches every outcome, or the comparison proves little.
    anyhow::ensure!(counts.iter().all(|&n| n > 0), "an outcome never occurred: {counts:?}");
    Ok(())
}

/// Every start pays for the verifier's exploration of the programs (84 105
/// instructions for the Ethernet program took 1.4 s in the 6.1 VM), and a
/// parser change that lets paths multiply shows here first: each program,
/// as `attach` loads it, stays within a budget of about twice what it costs
/// now. Kernels before 5.16 do not report the count.
#[test]
fn the_programs_stay_cheap_to_verify() -> Result<()> {
    const BUDGET: u32 = 30_000;
    let topology = Topology::new("verify")?;
    let work = topology.proxy.run(|| -> Result<_> {
        let datapath = Datapath::load(&both_programs(false))?;
        Ok(datapath.verifier_work())
    })??;
    anyhow::ensure!(work.len() == 2, "both TC programs load: {work:?}");
    for (kind, explored) in work {
        let Some(explored) = explored else {
            eprintln!("verify: this kernel does not report the {kind} program's exploration");
            continue;
        };
        eprintln!("verify: the {kind} program: {explored} instructions explored");
        anyhow::ensure!(
            explored <= BUDGET,
            "the verifier explored {explored} instructions of the {kind} program, over the budget of {BUDGET}"
        );
    }
    Ok(())
}
