//! Bounds-checked packet parsing: an optional Ethernet header, IPv4/IPv6
//! (with extension headers), then the TCP or UDP ports, or the packet an
//! ICMP or ICMPv6 error quotes. What cannot be parsed with certainty is
//! reported as such; the caller decides.

use core::mem::size_of;

use aya_ebpf::{bindings::bpf_sock_tuple, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};
use tproxy_ebpf::{PROTO_TCP, PROTO_UDP};

/// Offset of the IP header after an Ethernet header.
pub const ETH_L3: usize = EthHdr::LEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv6 extension headers walked; a longer chain is not parsed.
pub const MAX_EXT_HDRS: usize = 6;
/// Past the furthest transport header the walk can reach: outer headers,
/// the IPv6 header and six extension headers of at most 2 KiB each.
const MAX_L4_OFFSET: usize = 0x3fff;

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// ICMP and ICMPv6 headers before the quoted packet.
const ICMP_HDR_LEN: usize = 8;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The parts of a packet the steering decision needs.
pub struct Flow {
    pub ipv6: bool,
    pub proto: u8,
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// True for a TCP SYN without ACK: the first packet of a connection.
    pub syn: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP or UDP header.
    pub l4: usize,
    /// The packet's own tuple, in network order, for socket lookups.
    pub tuple: bpf_sock_tuple,
}

impl Flow {
    /// Size of the tuple variant in use, as the lookup helpers expect it.
    #[inline(always)]
    pub fn tuple_len(&self) -> u32 {
        if self.ipv6 { 36 } else { 12 }
    }
}

/// What a packet is, as far as steering goes.
pub enum Packet {
    /// A TCP segment or UDP datagram, fully parsed.
    Flow(Flow),
    /// An ICMP or ICMPv6 error about a TCP or UDP packet. The flow is the
    /// quoted packet's reversed: what a packet of that flow arriving here
    /// would carry, so a socket lookup finds the socket that sent it.
    Error(Flow),
    /// The first fragment of a TCP or UDP datagram: its ports are known, but
    /// the rest of the datagram cannot be steered with it.
    Fragment(Flow),
    /// An IPv6 packet whose extension headers run longer than the walk: its
    /// transport and ports are unknown.
    TooDeep,
}

/// Pointer to a `T` at `offset` into the packet, if all of it is in bounds.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The `T` at `offset` into the packet, if all of it is in bounds. The
/// reference lives no longer than the borrow of the context, and no
/// program here writes packet data, so nothing changes under it.
#[inline(always)]
pub fn ref_at<T>(ctx: &TcContext, offset: usize) -> Option<&T> {
    // SAFETY: `ptr_at` checked that the packet holds all of it.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &*p })
}

/// `value & mask`, with the mask kept. The verifier wants a bound on the very
/// register used as a packet offset; the compiler drops a mask it can prove
/// redundant, or offsets with an unbounded copy of the value it checked.
#[inline(always)]
pub fn bounded(value: usize, mask: usize) -> usize {
    // SAFETY: volatile access through a valid reference.
    unsafe { core::ptr::read_volatile(&value) & mask }
}

/// `value`, with what the verifier knows of it forgotten (it cannot follow
/// a value through the skb's scratch space). The paths out of the IPv6
/// extension header walk differ only in the offset they reach; forgotten,
/// the verifier explores what follows once instead of once per depth.
#[inline(always)]
pub fn opaque(ctx: &TcContext, value: usize, mask: usize) -> usize {
    // SAFETY: the context is valid for the run; `cb` is scratch space.
    unsafe {
        let cb = &mut (*ctx.skb.skb).cb[4];
        let saved = *cb;
        core::ptr::write_volatile(cb, value as u32);
        let value = core::ptr::read_volatile(cb);
        core::ptr::write_volatile(cb, saved);
        bounded(value as usize, mask)
    }
}

/// Parses a packet whose IP header starts at `l3`, with `ether_type` as its
/// protocol. `None`: not TCP, UDP or an error about them, or malformed.
#[inline(always)]
pub fn parse(ctx: &TcContext, l3: usize, ether_type: u16) -> Option<Packet> {
    // SAFETY: a C struct of integers: all zeros is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let frame_len = ctx.len() as usize;
    // `end`: where the IP datagram ends, by its own length field. A length
    // of 0 is a BIG TCP or jumbo packet, which runs to the end of the frame.
    let (ipv6, proto, l4, end, first_fragment) = match ether_type {
        ETH_P_IP => {
            let ip: &Ipv4Hdr = ref_at(ctx, l3)?;
            let ihl = (ip.vihl & 0x0f) as usize;
            if ip.vihl >> 4 != 4 || ihl < 5 {
                return None;
            }
            let frags = u16::from_be_bytes(ip.frags);
            // A fragment other than the first has no L4 header.
            if frags & 0x1fff != 0 {
                return None;
            }
            // SAFETY: a union of integers; the flow's family picks the member.
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            v4.saddr = u32::from_ne_bytes(ip.src_addr);
            v4.daddr = u32::from_ne_bytes(ip.dst_addr);
            let end = match u16::from_be_bytes(ip.tot_len) as usize {
                0 => frame_len,
                len => l3 + len,
            };
            (false, ip.proto, l3 + ihl * 4, end, frags & 0x2000 != 0)
        }
        ETH_P_IPV6 => {
            let ip: &Ipv6Hdr = ref_at(ctx, l3)?;
            if ip.vcf[0] >> 4 != 6 {
                return None;
            }
            // SAFETY: a union of integers; the flow's family picks the member.
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            // SAFETY: 16 bytes of integers either way; any bits are valid.
            v6.saddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.src_addr) };
            // SAFETY: 16 bytes of integers either way; any bits are valid.
            v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.dst_addr) };
            let end = match u16::from_be_bytes(ip.payload_len) as usize {
                0 => frame_len,
                len => l3 + Ipv6Hdr::LEN + len,
            };
            let (proto, l4, first_fragment) =
                match skip_ipv6_ext(ctx, ip.next_hdr, l3 + Ipv6Hdr::LEN)? {
                    Walk::Upper { proto, offset, first_fragment } => {
                        (proto, opaque(ctx, offset, MAX_L4_OFFSET), first_fragment)
                    }
                    Walk::TooDeep => return Some(Packet::TooDeep),
                };
            (true, proto, l4, end, first_fragment)
        }
        _ => return None,
    };
    if end > frame_len {
        return None;
    }
    let l4_min = match proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        PROTO_ICMP if !ipv6 && !first_fragment => {
            return icmp_error(ctx, l4, end, ipv6).map(Packet::Error);
        }
        PROTO_ICMPV6 if ipv6 && !first_fragment => {
            return icmp_error(ctx, l4, end, ipv6).map(Packet::Error);
        }
        _ => return None,
    };
    // The transport header must lie inside the datagram (the kernel drops
    // anything else after us anyway); a first fragment's may end past it.
    if l4 + l4_min > end && !(first_fragment && l4 + 4 <= end) {
        return None;
    }
    let flow = ports(ctx, ipv6, proto, l3, l4, tuple, !first_fragment)?;
    Some(if first_fragment { Packet::Fragment(flow) } else { Packet::Flow(flow) })
}

/// Reads the ports (and the TCP flags, when `flags`) at `l4` into a flow.
#[inline(always)]
fn ports(
    ctx: &TcContext,
    ipv6: bool,
    proto: u8,
    l3: usize,
    l4: usize,
    mut tuple: bpf_sock_tuple,
    flags: bool,
) -> Option<Flow> {
    // TCP and UDP both start with the two ports; TCP's flags are at byte 13.
    let ports: [u8; 4] = *ref_at(ctx, l4)?;
    let mut syn = false;
    if proto == PROTO_TCP && flags {
        let flags: u8 = *ref_at(ctx, l4 + 13)?;
        syn = flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    }
    let sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let dport = u16::from_ne_bytes([ports[2], ports[3]]);
    if ipv6 {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
    } else {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
    }
    Some(Flow {
        ipv6,
        proto,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        syn,
        l3,
        l4,
        tuple,
    })
}

/// The flow an ICMP or ICMPv6 error at `icmp` quotes, reversed; `None` for
/// other messages, or when the quoted packet is not TCP or UDP with its
/// ports.
#[inline(always)]
fn icmp_error(ctx: &TcContext, icmp: usize, end: usize, ipv6: bool) -> Option<Flow> {
    // The whole header: a one-byte check compiles to a form the verifier
    // cannot bound.
    let header: &[u8; ICMP_HDR_LEN] = ref_at(ctx, icmp)?;
    let kind = header[0];
    // v4: unreachable (fragmentation needed among them), time exceeded,
    // parameter problem. v6: unreachable, packet too big, time exceeded,
    // parameter problem.
    let is_error = if ipv6 { matches!(kind, 1..=4) } else { matches!(kind, 3 | 11 | 12) };
    if !is_error {
        return None;
    }
    let inner = icmp + ICMP_HDR_LEN;
    // SAFETY: a C struct of integers: all zeros is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (proto, inner_l4) = if ipv6 {
        let ip: &Ipv6Hdr = ref_at(ctx, inner)?;
        // The quoted packet was sent by a socket here: its source is the
        // socket's own address, so it is the lookup's destination.
        // SAFETY: a union of integers; the flow's family picks the member.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        // SAFETY: 16 bytes of integers either way; any bits are valid.
        v6.saddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.dst_addr) };
        // SAFETY: 16 bytes of integers either way; any bits are valid.
        v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.src_addr) };
        (ip.next_hdr, inner + Ipv6Hdr::LEN)
    } else {
        let ip: &Ipv4Hdr = ref_at(ctx, inner)?;
        let ihl = (ip.vihl & 0x0f) as usize;
        if ip.vihl >> 4 != 4 || ihl < 5 || u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
            return None;
        }
        // SAFETY: a union of integers; the flow's family picks the member.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.saddr = u32::from_ne_bytes(ip.dst_addr);
        v4.daddr = u32::from_ne_bytes(ip.src_addr);
        (ip.proto, inner + ihl * 4)
    };
    if !matches!(proto, PROTO_TCP | PROTO_UDP) || inner_l4 + 4 > end {
        return None;
    }
    let ports: [u8; 4] = *ref_at(ctx, inner_l4)?;
    // Reversed: the quoted destination port is the lookup's source port.
    let sport = u16::from_ne_bytes([ports[2], ports[3]]);
    let dport = u16::from_ne_bytes([ports[0], ports[1]]);
    if ipv6 {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
    } else {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
    }
    Some(Flow {
        ipv6,
        proto,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        syn: false,
        l3: inner,
        l4: inner_l4,
        tuple,
    })
}

/// Where an IPv6 extension header walk ended.
enum Walk {
    /// At the upper-layer header `proto` at `offset`; `first_fragment` when
    /// a fragment header with offset 0 and M set was walked.
    Upper { proto: u8, offset: usize, first_fragment: bool },
    /// Still in extension headers after [`MAX_EXT_HDRS`].
    TooDeep,
}

#[inline(always)]
fn is_ext(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT)
}

/// Walks up to [`MAX_EXT_HDRS`] IPv6 extension headers. `None`: a header
/// runs past the packet, or a fragment other than the first.
#[inline(always)]
fn skip_ipv6_ext(ctx: &TcContext, mut next: u8, mut off: usize) -> Option<Walk> {
    let mut first_fragment = false;
    for _ in 0..MAX_EXT_HDRS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = *ref_at(ctx, off)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = *ref_at(ctx, off)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let h: [u8; 4] = *ref_at(ctx, off)?;
                let offset_and_more = u16::from_be_bytes([h[2], h[3]]);
                // A fragment other than the first has no L4 header.
                if offset_and_more & 0xfff8 != 0 {
                    return None;
                }
                first_fragment |= offset_and_more & 1 != 0;
                next = h[0];
                off += 8;
            }
            _ => return Some(Walk::Upper { proto: next, offset: off, first_fragment }),
        }
    }
    if is_ext(next) {
        Some(Walk::TooDeep)
    } else {
        Some(Walk::Upper { proto: next, offset: off, first_fragment })
    }
}
