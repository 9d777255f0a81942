//! The steering decision.
//!
//! Per packet: parse, then one array lookup (`PORT_GATE`) decides whether the
//! packet can concern us at all. Only gated packets pay for a rule lookup and
//! a socket lookup.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_fib_lookup as FibParams,
        bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock,
    },
    cty::c_void,
    helpers::{
        bpf_fib_lookup, bpf_get_socket_uid, bpf_map_lookup_elem, bpf_map_update_elem,
        bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skb_load_bytes_relative, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
    },
    macros::{classifier, map, sk_lookup},
    maps::{Array, LruHashMap, SockMap},
    programs::{SkLookupContext, TcContext},
};
use tproxy_ebpf::{
    MAX_REOPENS, PARSED_ERROR, PARSED_FLOW, PARSED_FRAGMENT, PARSED_TOO_DEEP, PROTO_TCP,
    ParseTrace, ReopenKey, RuleChoice, slot, stat,
};

use crate::parse::{ETH_L3, ETH_P_IP, ETH_P_IPV6, Flow, Packet, bounded, opaque, parse, ptr_at};
use crate::{
    rules::{Query, gated, is_local, local_dests_incomplete, match_rule},
    stats::{count, rule_stats},
};

/// `TC_ACT_UNSPEC`: "no verdict", so the next program or filter still runs and
/// the packet otherwise continues as if we were not there.
const TC_NEXT: i32 = -1;
/// `TC_ACT_SHOT`: drop (only for packets `--unparsed drop` refuses).
const TC_DROP: i32 = 2;

// Set by the loader. Plain statics read through `read_volatile`, so the
// compiler keeps the loads; aya's `Global<T>` would emit a `MaybeUninit<u32>`
// BTF name that kernels reject.
#[unsafe(no_mangle)]
static MARK: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static BYPASS_MARK: u32 = 0;
#[unsafe(no_mangle)]
static RETURN_PATH: u32 = 0;
#[unsafe(no_mangle)]
pub(crate) static INTERCEPT_LOCAL: u32 = 0;
#[unsafe(no_mangle)]
static DROP_UNPARSED: u32 = 0;
#[unsafe(no_mangle)]
static TRACE_PARSE: u32 = 0;
#[unsafe(no_mangle)]
static TARGET_PORT: u32 = 0;
#[unsafe(no_mangle)]
static TARGET_OWNER: u32 = 0;
#[unsafe(no_mangle)]
static TARGET_ADDR4: u32 = 0;
#[unsafe(no_mangle)]
static TARGET_ADDR6: [u32; 4] = [0; 4];

#[inline(always)]
pub(crate) fn global(value: &'static u32) -> u32 {
    unsafe { core::ptr::read_volatile(value) }
}

#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(slot::COUNT, 0);

/// Tuples whose next listener lookup `tproxy_reopen` answers, with why.
#[map]
static TW_REOPEN: LruHashMap<ReopenKey, u8> = LruHashMap::with_max_entries(MAX_REOPENS, 0);
/// A SYN handed to a TIME_WAIT socket holding its tuple.
const REOPEN_TIME_WAIT: u8 = 0;
/// A new flow whose listener could not be assigned (SO_REUSEPORT, before 6.5).
const REOPEN_NEW_FLOW: u8 = 1;

#[map]
static PARSE_TRACE: Array<ParseTrace> = Array::with_max_entries(1, 0);

/// For devices with an Ethernet header.
#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    let Some(eth) = ptr_at::<[u8; 14]>(&ctx, 0) else { return TC_NEXT };
    let ether_type = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
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
const MAX_OUTER: u32 = 128;

/// Where the IP header of an L3 device's packet starts. Almost always at
/// 0, which the header there says itself (its version, and a length that
/// ends the packet), without a helper call. 5.10's ipip, though, shows the
/// outer Ethernet and IP headers first (the skb's MAC header still points
/// at the outer frame): then the IP header at the network header, whose
/// length counted back from the end says how far in it is.
#[inline(always)]
fn l3_start(ctx: &TcContext, ether_type: u16) -> usize {
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
    if let Some(ip) = ptr_at::<[u8; 20]>(ctx, 0) {
        let head = unsafe { &*(ip as *const [u8; 6]) };
        if head[0] >> 4 == version && ip_len(head) == ctx.len() {
            return 0;
        }
    }
    let mut head = [0u8; 6];
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
    match ptr_at::<[u8; 20]>(ctx, outer) {
        Some(ip) if unsafe { (*ip)[0] } == head[0] => outer,
        _ => 0,
    }
}

/// What became of a packet, as the `stat` index that counts it; `None` for
/// packets that are none of our business. `handle` counts it, once.
type Outcome = Option<u32>;

#[inline(always)]
fn handle(ctx: &TcContext, l3: usize, ether_type: u16) -> i32 {
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
fn trace(packet: &Option<Packet>) {
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
    unsafe { *slot = t };
}

/// A packet that may be for an intercepted port but cannot be steered
/// whole: a first fragment to a gated port, an IPv6 chain past the walk.
/// It passes untouched, unless interception must not be bypassed.
#[inline(always)]
fn unparsed(ctx: &TcContext) -> Outcome {
    if skb_mark(ctx) == global(&BYPASS_MARK) {
        return None;
    }
    Some(if global(&DROP_UNPARSED) != 0 { stat::UNPARSED_DROPPED } else { stat::UNPARSED_PASSED })
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).mark }
}

/// An ICMP error about a packet one of our sockets sent (a relay's
/// client-side or spoofed upstream socket, bound to an address not the
/// host's) is addressed to that non-local address and would be forwarded.
/// Marked, it is delivered locally, where the kernel hands it to the socket:
/// path MTU is learnt, and an unreachable destination fails the connect at
/// once, as iptables' `-m socket` arranges.
#[inline(always)]
fn steer_error(ctx: &TcContext, mut flow: Flow) -> Outcome {
    if !gated(flow.proto, flow.dport) && !gated(flow.proto, flow.sport) {
        return None;
    }
    let len = flow.tuple_len();
    let owned = unsafe {
        if flow.proto == PROTO_TCP {
            let sk = bpf_skc_lookup_tcp(
                ctx.as_ptr(),
                &mut flow.tuple,
                len,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            if sk.is_null() {
                return None;
            }
            let state = (*sk).state;
            bpf_sk_release(sk.cast());
            state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT
        } else {
            let sk = bpf_sk_lookup_udp(
                ctx.as_ptr(),
                &mut flow.tuple,
                len,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            if sk.is_null() {
                return None;
            }
            let owned = owns_tuple(sk, &flow);
            bpf_sk_release(sk.cast());
            owned
        }
    };
    if !owned {
        return None;
    }
    ctx.set_mark(global(&MARK));
    Some(stat::ICMP_TO_SOCKET)
}

#[inline(always)]
fn steer(ctx: &TcContext, mut flow: Flow) -> Outcome {
    // To an intercepted port: new flows to the relay, packets of its flows to
    // their sockets. From one (spoof mode): replies to the relay's upstream
    // sockets, which are bound to the client's non-local address.
    let to_port = gated(flow.proto, flow.dport);
    let from_port = global(&RETURN_PATH) != 0 && gated(flow.proto, flow.sport);
    if !to_port && !from_port {
        return None;
    }
    let skb = unsafe { &*ctx.skb.skb };
    // The relay's own upstream traffic carries the bypass mark. A frame
    // still tagged with a VLAN here belongs to a VLAN device (attach there)
    // or to nobody; the kernel drops it after us either way.
    if skb.mark == global(&BYPASS_MARK) || skb.vlan_present != 0 {
        return None;
    }
    // An IPv4-mapped IPv6 destination is never a real one on the wire; the
    // relay must not turn it into an IPv4 connection (to loopback, say).
    if flow.ipv6 && is_v4_mapped(unsafe { &flow.tuple.__bindgen_anon_1.ipv6.daddr }) {
        return None;
    }
    // The host's own services and clients keep their traffic; they would
    // otherwise lose it to the relay wherever a rule covers their port.
    if global(&INTERCEPT_LOCAL) == 0 {
        if is_local(flow.ipv6, &daddr(&flow)) {
            return Some(stat::TO_HOST);
        }
        if local_dests_incomplete() {
            match fib_locality(ctx, &flow) {
                Locality::Elsewhere => {}
                Locality::Here => return Some(stat::TO_HOST),
                Locality::Unknown => return Some(stat::LOCAL_UNKNOWN),
            }
        }
    }
    if flow.proto == PROTO_TCP {
        steer_tcp(ctx, &mut flow, to_port)
    } else {
        steer_udp(ctx, &mut flow, to_port)
    }
}

enum Locality {
    Here,
    Elsewhere,
    Unknown,
}

/// Where the kernel's FIB sends the flow's packets, for when `LOCAL_DESTS`
/// is incomplete. A lookup per packet, so only then.
#[inline(always)]
fn fib_locality(ctx: &TcContext, flow: &Flow) -> Locality {
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = flow.proto;
    params.sport = flow.sport.to_be();
    params.dport = flow.dport.to_be();
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    unsafe {
        if flow.ipv6 {
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = flow.tuple.__bindgen_anon_1.ipv6.saddr;
            params.__bindgen_anon_4.ipv6_dst = flow.tuple.__bindgen_anon_1.ipv6.daddr;
        } else {
            params.family = AF_INET;
            params.__bindgen_anon_3.ipv4_src = flow.tuple.__bindgen_anon_1.ipv4.saddr;
            params.__bindgen_anon_4.ipv4_dst = flow.tuple.__bindgen_anon_1.ipv4.daddr;
        }
    }
    let size = core::mem::size_of::<FibParams>() as i32;
    let ret = unsafe { bpf_fib_lookup(ctx.skb.skb as *mut _, &mut params, size, 0) };
    match ret {
        // Local, broadcast and multicast routes are not forwarded.
        r if r == BPF_FIB_LKUP_RET_NOT_FWDED as i64 => Locality::Here,
        // An error, or an interface that does not forward (the lookup
        // stops before the route).
        r if r < 0 || r == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 => Locality::Unknown,
        _ => Locality::Elsewhere,
    }
}

/// `::ffff:0:0/96`, in network order.
#[inline(always)]
pub(crate) fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0xffff)
}

/// A packet that belongs to a socket goes to that socket; a new connection
/// that a rule intercepts goes to the relay's listener. The socket is
/// looked up first, so that the packets of established flows never pay for
/// the rule lookup.
#[inline(always)]
fn steer_tcp(ctx: &TcContext, flow: &mut Flow, to_port: bool) -> Outcome {
    let len = flow.tuple_len();
    let sk = unsafe {
        bpf_skc_lookup_tcp(ctx.as_ptr(), &mut flow.tuple, len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if !sk.is_null() {
        let state = unsafe { (*sk).state };
        if state == BPF_TCP_TIME_WAIT && flow.syn {
            // A SYN that meets TIME_WAIT opens a new connection, which is
            // ours only if a rule intercepts it now.
            let Some(rule) = intercepting_rule(flow, to_port) else {
                unsafe { bpf_sk_release(sk.cast()) };
                return None;
            };
            if !reopen_target_ready(ctx, flow) {
                unsafe { bpf_sk_release(sk.cast()) };
                return no_target(&rule);
            }
            // Handing it to the listener directly fails: the kernel
            // refuses a request socket whose tuple a TIME_WAIT socket
            // holds. Handed to the TIME_WAIT socket, the kernel retires
            // it and looks up a listener, which `tproxy_reopen` answers.
            let _ = TW_REOPEN.insert(&reopen_key(flow), &REOPEN_TIME_WAIT, 0);
            return assign(ctx, sk, Some(&rule), stat::TW_SYN);
        }
        if state != BPF_TCP_LISTEN {
            let counter = if to_port { stat::TO_SOCKET } else { stat::RETURN_PATH };
            return assign(ctx, sk, None, counter);
        }
        // A LISTEN socket found by tuple is some local server's wildcard
        // listener, not ours.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    let rule = intercepting_rule(flow, to_port)?;
    let index = if flow.ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
    if flow.syn {
        to_target(ctx, flow, index, &rule)
    } else {
        syncookie_to_listener(ctx, flow, index, &rule)
    }
}

/// The rule that intercepts a flow to a gated port, if one does.
#[inline(always)]
fn intercepting_rule(flow: &Flow, to_port: bool) -> Option<RuleChoice> {
    if !to_port {
        return None;
    }
    let (saddr, daddr) = unsafe {
        if flow.ipv6 {
            let t = &flow.tuple.__bindgen_anon_1.ipv6;
            (t.saddr, t.daddr)
        } else {
            let t = &flow.tuple.__bindgen_anon_1.ipv4;
            ([t.saddr, 0, 0, 0], [t.daddr, 0, 0, 0])
        }
    };
    match_rule(&Query { ipv6: flow.ipv6, proto: flow.proto, dport: flow.dport, daddr, saddr })
}

/// The flow's destination address, IPv4 in `[0]`.
#[inline(always)]
fn daddr(flow: &Flow) -> [u32; 4] {
    unsafe {
        if flow.ipv6 {
            flow.tuple.__bindgen_anon_1.ipv6.daddr
        } else {
            [flow.tuple.__bindgen_anon_1.ipv4.daddr, 0, 0, 0]
        }
    }
}

/// A segment without a socket is the listener's only if it completes a
/// handshake the listener answered with a SYN cookie (its queue was full).
/// Anything else belongs to a connection that was never steered (opened
/// before `attach`, say) and passes untouched, so attaching breaks nothing.
#[inline(always)]
fn syncookie_to_listener(ctx: &TcContext, flow: &Flow, index: u32, rule: &RuleChoice) -> Outcome {
    let sk = target(ctx, flow, index)?;
    let th: Option<*const [u8; 20]> = ptr_at(ctx, flow.l4);
    let valid = match th {
        Some(th) if flow.ipv6 => ptr_at::<[u8; 40]>(ctx, flow.l3).is_some_and(|iph| unsafe {
            bpf_tcp_check_syncookie(sk.cast(), iph.cast_mut().cast(), 40, th.cast_mut().cast(), 20)
                == 0
        }),
        Some(th) => ptr_at::<[u8; 20]>(ctx, flow.l3).is_some_and(|iph| unsafe {
            bpf_tcp_check_syncookie(sk.cast(), iph.cast_mut().cast(), 20, th.cast_mut().cast(), 20)
                == 0
        }),
        None => false,
    };
    if !valid {
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
    }
    assign_listener(ctx, flow, sk, index, rule)
}

/// A datagram that belongs to a connected socket goes to that socket: a
/// session's reply socket (bound to the original destination, connected to
/// the client), a spoofed upstream socket (bound to the client, connected to
/// the server), or a connected socket of the host's own. Anything else that
/// a rule intercepts goes to the relay's socket.
#[inline(always)]
fn steer_udp(ctx: &TcContext, flow: &mut Flow, to_port: bool) -> Outcome {
    let len = flow.tuple_len();
    let sk = unsafe {
        bpf_sk_lookup_udp(ctx.as_ptr(), &mut flow.tuple, len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if !sk.is_null() {
        if owns_tuple(sk, flow) {
            let counter = if to_port { stat::TO_SOCKET } else { stat::RETURN_PATH };
            return assign(ctx, sk, None, counter);
        }
        unsafe { bpf_sk_release(sk.cast()) };
    }
    let rule = intercepting_rule(flow, to_port)?;
    let index = if flow.ipv6 { slot::UDP_V6 } else { slot::UDP_V4 };
    to_target(ctx, flow, index, &rule)
}

/// Whether a UDP socket the lookup found is connected to the flow's source.
/// The lookup also finds wildcard sockets on the port; a connected socket
/// matches only its peer's port, so a peer address equal to the source
/// means the socket owns the tuple. An unconnected socket's peer is the
/// unspecified address, so a packet from `0.0.0.0` or `::` never owns one:
/// else it would reach a host's wildcard server on the port.
#[inline(always)]
fn owns_tuple(sk: *mut bpf_sock, flow: &Flow) -> bool {
    unsafe {
        if flow.ipv6 {
            let peer = sock_words(&(*sk).dst_ip6);
            peer != [0; 4] && peer == flow.tuple.__bindgen_anon_1.ipv6.saddr
        } else {
            let peer = core::ptr::read_volatile(&(*sk).dst_ip4);
            peer != 0 && peer == flow.tuple.__bindgen_anon_1.ipv4.saddr
        }
    }
}

#[inline(always)]
fn reopen_key(flow: &Flow) -> ReopenKey {
    let mut key = ReopenKey {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: flow.sport,
        dport: flow.dport,
        ipv6: 0,
        _pad: [0; 3],
    };
    unsafe {
        if flow.ipv6 {
            let t = &flow.tuple.__bindgen_anon_1.ipv6;
            key.saddr = t.saddr;
            key.daddr = t.daddr;
            key.ipv6 = 1;
        } else {
            let t = &flow.tuple.__bindgen_anon_1.ipv4;
            key.saddr[0] = t.saddr;
            key.daddr[0] = t.daddr;
        }
    }
    key
}

/// Runs when the kernel looks for a listener. Answers only for tuples whose
/// SYN the TC program handed to a TIME_WAIT socket; every other lookup
/// proceeds as if this program were not there.
#[sk_lookup]
pub fn tproxy_reopen(ctx: SkLookupContext) -> u32 {
    const SK_PASS: u32 = 1;
    const AF_INET6: u32 = 10;
    let l = unsafe { &*ctx.lookup };
    if l.protocol != PROTO_TCP as u32 {
        return SK_PASS;
    }
    let ipv6 = l.family == AF_INET6;
    let mut key = ReopenKey {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: u16::from_be(l.remote_port),
        dport: l.local_port as u16,
        ipv6: ipv6 as u8,
        _pad: [0; 3],
    };
    if ipv6 {
        key.saddr = sock_words(&l.remote_ip6);
        key.daddr = sock_words(&l.local_ip6);
    } else {
        key.saddr[0] = l.remote_ip4;
        key.daddr[0] = l.local_ip4;
    }
    if let Some(why) = unsafe { TW_REOPEN.get(&key) }.copied() {
        let _ = TW_REOPEN.remove(&key);
        let index = if ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
        // On failure the lookup goes on as usual: the client retries.
        if LISTENERS.redirect_sk_lookup(&ctx, index, 0).is_ok() && why == REOPEN_TIME_WAIT {
            count(stat::TW_HANDOVER);
        }
    }
    SK_PASS
}

/// Copies an address out of a context or socket one word at a time: the
/// verifier allows only 4-byte loads there, and refuses loads through a
/// moved pointer, which an array copy can be.
#[inline(always)]
pub(crate) fn sock_words(words: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

/// The relay's socket in `index` of the sockmap, with a reference the
/// caller must release (or hand to `assign`).
#[inline(always)]
fn listener(index: u32) -> Option<*mut bpf_sock> {
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if sk.is_null() { None } else { Some(sk.cast()) }
}

/// Where new flows go, with a reference the caller must release (or hand
/// to `assign`): the relay's socket in `index` of the sockmap, or with
/// `--to-port` the transparent listener on that port.
#[inline(always)]
fn target(ctx: &TcContext, flow: &Flow, index: u32) -> Option<*mut bpf_sock> {
    match global(&TARGET_PORT) {
        0 => listener(index),
        port => port_listener(ctx, flow, port as u16),
    }
}

/// The socket the kernel itself would deliver the flow to if it were
/// addressed to `port` (of `--to-addr`, if given): a listener bound to the
/// wildcard or to that address, as nf_tproxy and Cilium's `proxy.h` find
/// it. For TCP only a listener counts.
#[inline(always)]
fn port_listener(ctx: &TcContext, flow: &Flow, port: u16) -> Option<*mut bpf_sock> {
    let mut tuple = flow.tuple;
    unsafe {
        if flow.ipv6 {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.dport = port.to_be();
            let addr = sock_words(&TARGET_ADDR6);
            if addr != [0; 4] {
                t.daddr = addr;
            }
        } else {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.dport = port.to_be();
            let addr = global(&TARGET_ADDR4);
            if addr != 0 {
                t.daddr = addr;
            }
        }
    }
    let len = flow.tuple_len();
    let netns = BPF_F_CURRENT_NETNS as u64;
    let sk = unsafe {
        if flow.proto == PROTO_TCP {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, len, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, len, netns, 0)
        }
    };
    if sk.is_null() {
        return None;
    }
    if flow.proto == PROTO_TCP && unsafe { (*sk).state } != BPF_TCP_LISTEN {
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
    }
    Some(sk)
}

/// `tproxy_reopen` hands a reopened tuple to the socket in `LISTENERS`,
/// the only kind of socket an `sk_lookup` program can hand over. With
/// `--to-port` that is put there first: the listener on the port, now.
#[inline(always)]
fn reopen_target_ready(ctx: &TcContext, flow: &Flow) -> bool {
    let port = global(&TARGET_PORT);
    if port == 0 {
        return true;
    }
    let Some(sk) = port_listener(ctx, flow, port as u16) else { return false };
    let index = if flow.ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
    let put = put_listener(sk, index);
    unsafe { bpf_sk_release(sk.cast()) };
    put == 0
}

/// Puts `sk` into slot `index` of `LISTENERS`, where `tproxy_reopen`
/// answers from (a sockmap update from TC: 5.10).
#[inline(always)]
fn put_listener(sk: *mut bpf_sock, index: u32) -> i64 {
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    let key = core::ptr::from_ref(&index).cast();
    unsafe { bpf_map_update_elem(map, key, sk.cast(), BPF_ANY as u64) }
}

#[inline(always)]
fn to_target(ctx: &TcContext, flow: &Flow, index: u32, rule: &RuleChoice) -> Outcome {
    match target(ctx, flow, index) {
        Some(sk) => assign_listener(ctx, flow, sk, index, rule),
        None => no_target(rule),
    }
}

/// Fail-open: the packet passes untouched, counted.
#[inline(always)]
fn no_target(rule: &RuleChoice) -> Outcome {
    if let Some(s) = rule_stats(rule) {
        s.no_listener += 1;
    }
    Some(stat::NO_LISTENER)
}

/// `bpf_sk_assign`'s answer for an SO_REUSEPORT socket before 6.5.
const ESOCKTNOSUPPORT: i64 = 94;

/// Assigns `sk` to the packet, marks it for local delivery, and releases
/// `sk`. The outcome is `counter`, or `ASSIGN_FAILED`. A packet that needed
/// a rule opens a new flow, which the rule counts.
#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock, rule: Option<&RuleChoice>, counter: u32) -> Outcome {
    let mut ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    // Before 6.5 the kernel refuses SO_REUSEPORT sockets, and the
    // connections of a reuseport listener (HAProxy's, Envoy's) inherit the
    // flag. Marked, such a packet still finds its socket by its tuple once
    // it is delivered locally, as the iptables recipe's packets do.
    if ret == -ESOCKTNOSUPPORT && rule.is_none() {
        ret = 0;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    settle(ctx, ret == 0, rule, counter)
}

/// Assigns a new flow to `sk`, the listener for slot `index`, and releases
/// it. Before 6.5 the kernel refuses to assign an SO_REUSEPORT listener
/// (HAProxy and Envoy make them): then the flow is noted, marked, and
/// handed to the listener by `tproxy_reopen` during the kernel's own
/// listener lookup, where the reuseport group chooses its member.
#[inline(always)]
fn assign_listener(
    ctx: &TcContext,
    flow: &Flow,
    sk: *mut bpf_sock,
    index: u32,
    rule: &RuleChoice,
) -> Outcome {
    let mut ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    if ret == -ESOCKTNOSUPPORT && flow.proto == PROTO_TCP {
        ret = hand_over_in_lookup(flow, sk, index);
    } else if ret == 0 && !target_owned(ctx) {
        // Assigned already: passing it on would deliver it there.
        unsafe { bpf_sk_release(sk.cast()) };
        return Some(stat::TARGET_FOREIGN);
    }
    unsafe { bpf_sk_release(sk.cast()) };
    settle(ctx, ret == 0, Some(rule), stat::TO_LISTENER)
}

/// Whether the socket just assigned is one `--to-port` may hand flows to:
/// its owner's, as only the owner (root by default) can make the
/// transparent listener the iptables recipe requires, and any user could
/// bind the port while that listener is down. The relay's own need no check.
/// The owner is known only once assigned (`bpf_get_socket_uid` reads the
/// packet's socket).
#[inline(always)]
fn target_owned(ctx: &TcContext) -> bool {
    let owner = global(&TARGET_OWNER);
    global(&TARGET_PORT) == 0
        || owner == u32::MAX
        || unsafe { bpf_get_socket_uid(ctx.skb.skb) } == owner
}

/// Notes the flow for `tproxy_reopen`, with `sk` (a `--to-port` listener;
/// the relay's own is there already) in the sockmap slot it answers from.
#[inline(always)]
fn hand_over_in_lookup(flow: &Flow, sk: *mut bpf_sock, index: u32) -> i64 {
    if global(&TARGET_PORT) != 0 {
        let put = put_listener(sk, index);
        if put != 0 {
            return put;
        }
    }
    match TW_REOPEN.insert(&reopen_key(flow), &REOPEN_NEW_FLOW, 0) {
        Ok(()) => 0,
        Err(e) => e.into(),
    }
}

/// What a packet's assignment came to: marked for local delivery and
/// counted as `counter`, or counted as a failure and passed untouched.
#[inline(always)]
fn settle(ctx: &TcContext, assigned: bool, rule: Option<&RuleChoice>, counter: u32) -> Outcome {
    let stats = rule.and_then(rule_stats);
    if !assigned {
        if let Some(s) = stats {
            s.assign_failed += 1;
        }
        return Some(stat::ASSIGN_FAILED);
    }
    ctx.set_mark(global(&MARK));
    if let Some(s) = stats {
        s.packets += 1;
        s.bytes += ctx.len() as u64;
        s.new_flows += 1;
    }
    Some(counter)
}
