//! The TC entry points and what the loader sets: the packet's start (an
//! Ethernet header, or an L3 device's IP header, after any outer headers),
//! then [`crate::steer`].
//!
//! Per packet: parse, then one array lookup (`PORT_GATE`) decides whether the
//! packet can concern us at all. Only gated packets pay for a rule lookup and
//! a socket lookup.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    cty::c_void,
    helpers::bpf_skb_load_bytes_relative,
    macros::{classifier, map},
    maps::{Array, SockMap},
    programs::TcContext,
};
use tproxy_ebpf::{
    PARSED_ERROR, PARSED_FLOW, PARSED_FRAGMENT, PARSED_TOO_DEEP, ParseTrace, slot, stat,
};

use crate::parse::{ETH_L3, ETH_P_IP, ETH_P_IPV6, Packet, bounded, opaque, parse, ref_at};
use crate::{rules::gated, stats::count};

use crate::steer::*;

/// `TC_ACT_UNSPEC`: "no verdict", so the next program or filter still runs and
/// the packet otherwise continues as if we were not there.
pub(crate) const TC_NEXT: i32 = -1;
/// `TC_ACT_SHOT`: drop (only for packets `--unparsed drop` refuses).
pub(crate) const TC_DROP: i32 = 2;

// Set by the loader. Plain statics read through `read_volatile`, so the
// compiler keeps the loads; aya's `Global<T>` would emit a `MaybeUninit<u32>`
// BTF name that kernels reject.
#[unsafe(no_mangle)]
pub(crate) static MARK: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static BYPASS_MARK: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static RETURN_PATH: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static INTERCEPT_LOCAL: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static DROP_UNPARSED: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static TRACE_PARSE: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static TARGET_PORT: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static TARGET_OWNER: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static TARGET_ADDR4: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static TARGET_ADDR6: [u32; 4] = [0; 4];

#[inline(always)]
pub(crate) fn global(value: &'static u32) -> u32 {
    crate::addr::load(value)
}

#[map]
pub(crate) static LISTENERS: SockMap = SockMap::with_max_entries(slot::COUNT, 0);

#[map]
pub(crate) static PARSE_TRACE: Array<ParseTrace> = Array::with_max_entries(1, 0);

/// For devices with an Ethernet header.
#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    let Some(eth) = ref_at::<[u8; 14]>(&ctx, 0) else { return TC_NEXT };
    let ether_type = u16::from_be_bytes([eth[12], eth[13]]);
    handle(&ctx, ETH_L3, ether_type)
}

/// For L3 devices (tun, WireGuard, ipip, GRE, PPP): the packet starts with
/// its IP header, and the skb says which IP it is.
#[classifier]
pub fn tproxy_ingress_l3(ctx: TcContext) -> i32 {
    let ether_type = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => ETH_P_IP,
        ETH_P_IPV6 => ETH_P_IPV6,
        _ => return TC_NEXT,
    };
    // Two starts would double what the verifier explores after.
    handle(&ctx, opaque(&ctx, l3_start(&ctx, ether_type), 0xff), ether_type)
}

/// How far outer headers the kernel still shows reach: at most an outer
/// Ethernet and IPv6 header with a few options.
pub(crate) const MAX_OUTER: u32 = 128;

/// Where the IP header of an L3 device's packet starts. Almost always at
/// 0, which the header there says itself (its version, and a length that
/// ends the packet), without a helper call. 5.10's ipip, though, shows the
/// outer Ethernet and IP headers first (the skb's MAC header still points
/// at the outer frame): then the IP header at the network header, whose
/// length counted back from the end says how far in it is.
#[inline(always)]
pub(crate) fn l3_start(ctx: &TcContext, ether_type: u16) -> usize {
    let version = if ether_type == ETH_P_IP { 4 } else { 6 };
    let ip_len = |head: &[u8; 6]| {
        if version == 4 {
            u16::from_be_bytes([head[2], head[3]]) as u32
        } else {
            u16::from_be_bytes([head[4], head[5]]) as u32 + 40
        }
    };
    // A whole minimal header: a one-byte check compiles to `p >= end`,
    // which older verifiers do not credit as a bound.
    if let Some(head) = ref_at::<[u8; 20]>(ctx, 0).and_then(|ip| ip.first_chunk::<6>()) {
        if head[0] >> 4 == version && ip_len(head) == ctx.len() {
            return 0;
        }
    }
    let mut head = [0u8; 6];
    // SAFETY: a stack buffer of the length given.
    let read = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            0,
            head.as_mut_ptr() as *mut c_void,
            head.len() as u32,
            BPF_HDR_START_NET,
        )
    };
    if read != 0 || head[0] >> 4 != version {
        return 0;
    }
    let Some(outer) = ctx.len().checked_sub(ip_len(&head)) else { return 0 };
    if outer == 0 || outer > MAX_OUTER {
        return 0;
    }
    let outer = bounded(outer as usize, 0xff);
    match ref_at::<[u8; 20]>(ctx, outer) {
        Some(ip) if ip[0] == head[0] => outer,
        _ => 0,
    }
}

/// What became of a packet, as the `stat` index that counts it; `None` for
/// packets that are none of our business. `handle` counts it, once.
pub(crate) type Outcome = Option<u32>;

#[inline(always)]
pub(crate) fn handle(ctx: &TcContext, l3: usize, ether_type: u16) -> i32 {
    let packet = parse(ctx, l3, ether_type);
    if global(&TRACE_PARSE) != 0 {
        trace(&packet);
    }
    let outcome = match packet {
        Some(Packet::Flow(flow)) => steer(ctx, flow),
        Some(Packet::Error(flow)) => steer_error(ctx, flow),
        Some(Packet::Fragment(flow)) if gated(flow.proto, flow.dport) => unparsed(ctx),
        Some(Packet::TooDeep) => unparsed(ctx),
        _ => None,
    };
    let Some(index) = outcome else { return TC_NEXT };
    count(index);
    match index {
        stat::UNPARSED_DROPPED | stat::TARGET_FOREIGN => TC_DROP,
        _ => TC_NEXT,
    }
}

/// Records what the parser made of the packet (tests only). A subprogram
/// of its own, so that it does not shape the per-packet code: older
/// verifiers (5.10) refused what LLVM made of it inlined.
#[inline(never)]
pub(crate) fn trace(packet: &Option<Packet>) {
    let Some(slot) = PARSE_TRACE.get_ptr_mut(0) else { return };
    let mut t = ParseTrace::default();
    let flow = match packet {
        None => None,
        Some(Packet::TooDeep) => {
            t.kind = PARSED_TOO_DEEP;
            None
        }
        Some(Packet::Flow(f)) => {
            t.kind = PARSED_FLOW;
            Some(f)
        }
        Some(Packet::Error(f)) => {
            t.kind = PARSED_ERROR;
            Some(f)
        }
        Some(Packet::Fragment(f)) => {
            t.kind = PARSED_FRAGMENT;
            Some(f)
        }
    };
    if let Some(f) = flow {
        t.proto = f.proto;
        t.ipv6 = f.ipv6 as u8;
        t.syn = f.syn as u8;
        t.sport = f.sport;
        t.dport = f.dport;
        // SAFETY: a union of integers; the flow's family picks the member.
        unsafe {
            if f.ipv6 {
                t.saddr = f.tuple.__bindgen_anon_1.ipv6.saddr;
                t.daddr = f.tuple.__bindgen_anon_1.ipv6.daddr;
            } else {
                t.saddr[0] = f.tuple.__bindgen_anon_1.ipv4.saddr;
                t.daddr[0] = f.tuple.__bindgen_anon_1.ipv4.daddr;
            }
        }
    }
    // SAFETY: a map value from a lookup, valid until the program returns.
    unsafe { *slot = t };
}

/// A packet that may be for an intercepted port but cannot be steered
/// whole: a first fragment to a gated port, an IPv6 chain past the walk.
/// It passes untouched, unless interception must not be bypassed.
#[inline(always)]
pub(crate) fn unparsed(ctx: &TcContext) -> Outcome {
    if skb_mark(ctx) == global(&BYPASS_MARK) {
        return None;
    }
    Some(if global(&DROP_UNPARSED) != 0 { stat::UNPARSED_DROPPED } else { stat::UNPARSED_PASSED })
}

#[inline(always)]
pub(crate) fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context the kernel passes is valid for the run.
    unsafe { (*ctx.skb.skb).mark }
}
