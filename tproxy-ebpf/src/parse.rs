//! Bounds-checked packet parsing: Ethernet, IPv4/IPv6 (with extension
//! headers), then the TCP or UDP ports. Anything we cannot parse with
//! certainty yields `None`, and the caller passes the packet untouched.

use core::mem::size_of;

use aya_ebpf::{bindings::bpf_sock_tuple, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr};
use tproxy_ebpf::{PROTO_TCP, PROTO_UDP};

/// Offset of the IP header: right after Ethernet's.
pub const L3: usize = EthHdr::LEN;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers we walk before giving up (and passing the packet).
const MAX_EXT_HDRS: usize = 6;

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;

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

/// Parses a packet up to its L4 ports. Fragments (beyond the first) and
/// protocols other than TCP and UDP give `None`.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Flow> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let frame_len = ctx.len() as usize;
    // `end`: where the IP datagram ends, by its own length field. A length
    // of 0 is a BIG TCP or jumbo packet, which runs to the end of the frame.
    let (ipv6, proto, l4, end) = match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, L3)?;
            let ip = unsafe { &*ip };
            let ihl = (ip.vihl & 0x0f) as usize;
            // Any fragment other than the first has no L4 header. A first
            // fragment (MF set) is also passed: its followers cannot be
            // matched, and a datagram must not be split between us and the
            // real destination.
            if ip.vihl >> 4 != 4 || ihl < 5 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
                return None;
            }
            let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            v4.saddr = u32::from_ne_bytes(ip.src_addr);
            v4.daddr = u32::from_ne_bytes(ip.dst_addr);
            let end = match u16::from_be_bytes(ip.tot_len) as usize {
                0 => frame_len,
                len => L3 + len,
            };
            (false, ip.proto, L3 + ihl * 4, end)
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, L3)?;
            let ip = unsafe { &*ip };
            if ip.vcf[0] >> 4 != 6 {
                return None;
            }
            let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            v6.saddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.src_addr) };
            v6.daddr = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(ip.dst_addr) };
            let end = match u16::from_be_bytes(ip.payload_len) as usize {
                0 => frame_len,
                len => L3 + Ipv6Hdr::LEN + len,
            };
            let (proto, l4) = skip_ipv6_ext(ctx, ip.next_hdr, L3 + Ipv6Hdr::LEN)?;
            (true, proto, l4, end)
        }
        _ => return None,
    };
    // The transport header must lie inside the datagram, and the datagram
    // inside the frame; anything else the kernel drops after us anyway.
    let l4_min = match proto {
        PROTO_TCP => TCP_HDR_LEN,
        PROTO_UDP => UDP_HDR_LEN,
        _ => return None,
    };
    if l4 + l4_min > end || end > frame_len {
        return None;
    }
    // TCP and UDP both start with the two ports; TCP's flags are at byte 13.
    let ports: *const [u8; 4] = ptr_at(ctx, l4)?;
    let ports = unsafe { *ports };
    let mut syn = false;
    if proto == PROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4 + 13)?;
        syn = unsafe { *flags } & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
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
        l4,
        tuple,
    })
}

/// Walks IPv6 extension headers; returns the upper-layer protocol and its offset.
#[inline(always)]
fn skip_ipv6_ext(ctx: &TcContext, mut next: u8, mut off: usize) -> Option<(u8, usize)> {
    for _ in 0..MAX_EXT_HDRS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: *const [u8; 2] = ptr_at(ctx, off)?;
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h: *const [u8; 2] = ptr_at(ctx, off)?;
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                // Same rule as IPv4: fragmented datagrams are never steered.
                let h: *const [u8; 4] = ptr_at(ctx, off)?;
                let h = unsafe { *h };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                    return None;
                }
                next = h[0];
                off += 8;
            }
            _ => return Some((next, off)),
        }
    }
    None
}
