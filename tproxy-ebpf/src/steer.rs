//! The steering decision for a parsed flow: local or not, which rule, and
//! for TCP and UDP which socket.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_fib_lookup as FibParams, bpf_sock,
    },
    helpers::{
        bpf_fib_lookup, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
        bpf_tcp_check_syncookie,
    },
    programs::TcContext,
};
use tproxy_ebpf::{PROTO_TCP, RuleChoice, slot, stat};

use crate::addr::{is_v4_mapped, load, read_words};
use crate::parse::{Flow, ptr_at};
use crate::rules::{Query, gated, is_local, local_dests_incomplete, match_rule};

use crate::{program::*, sk_lookup::*, socket::*};

/// An ICMP error about a packet one of our sockets sent (a relay's
/// client-side or spoofed upstream socket, bound to an address not the
/// host's) is addressed to that non-local address and would be forwarded.
/// Marked, it is delivered locally, where the kernel hands it to the socket:
/// path MTU is learnt, and an unreachable destination fails the connect at
/// once, as iptables' `-m socket` arranges.
#[inline(always)]
pub(crate) fn steer_error(ctx: &TcContext, mut flow: Flow) -> Outcome {
    if !gated(flow.proto, flow.dport) && !gated(flow.proto, flow.sport) {
        return None;
    }
    let len = flow.tuple_len();
    // SAFETY: the flow's tuple on the stack with its length; each socket
    // found is checked non-null, read, and released once.
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
pub(crate) fn steer(ctx: &TcContext, mut flow: Flow) -> Outcome {
    // To an intercepted port: new flows to the relay, packets of its flows to
    // their sockets. From one (spoof mode): replies to the relay's upstream
    // sockets, which are bound to the client's non-local address.
    let to_port = gated(flow.proto, flow.dport);
    let from_port = global(&RETURN_PATH) != 0 && gated(flow.proto, flow.sport);
    if !to_port && !from_port {
        return None;
    }
    // SAFETY: the context the kernel passes is valid for the run.
    let skb = unsafe { &*ctx.skb.skb };
    // The relay's own upstream traffic carries the bypass mark. A frame
    // still tagged with a VLAN here belongs to a VLAN device (attach there)
    // or to nobody; the kernel drops it after us either way.
    if skb.mark == global(&BYPASS_MARK) || skb.vlan_present != 0 {
        return None;
    }
    // An IPv4-mapped IPv6 destination is never a real one on the wire; the
    // relay must not turn it into an IPv4 connection (to loopback, say).
    // SAFETY: a union of integers; the flow's family picks the member.
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

pub(crate) enum Locality {
    Here,
    Elsewhere,
    Unknown,
}

/// Where the kernel's FIB sends the flow's packets, for when `LOCAL_DESTS`
/// is incomplete. A lookup per packet, so only then.
#[inline(always)]
pub(crate) fn fib_locality(ctx: &TcContext, flow: &Flow) -> Locality {
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    // SAFETY: a C struct of integers: all zeros is valid.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = flow.proto;
    params.sport = flow.sport.to_be();
    params.dport = flow.dport.to_be();
    // SAFETY: the context the kernel passes is valid for the run.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: a union of integers; the flow's family picks the member.
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
    // SAFETY: parameters on the stack, of the size given.
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

/// A packet that belongs to a socket goes to that socket; a new connection
/// that a rule intercepts goes to the relay's listener. The socket is
/// looked up first, so that the packets of established flows never pay for
/// the rule lookup.
#[inline(always)]
pub(crate) fn steer_tcp(ctx: &TcContext, flow: &mut Flow, to_port: bool) -> Outcome {
    let len = flow.tuple_len();
    // SAFETY: the flow's tuple and its length; the verifier tracks the result.
    let sk = unsafe {
        bpf_skc_lookup_tcp(ctx.as_ptr(), &mut flow.tuple, len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if !sk.is_null() {
        // SAFETY: `sk` is a lookup's, checked non-null, not yet released.
        let state = unsafe { (*sk).state };
        if state == BPF_TCP_TIME_WAIT && flow.syn {
            // A SYN that meets TIME_WAIT opens a new connection, which is
            // ours only if a rule intercepts it now.
            let Some(rule) = intercepting_rule(flow, to_port) else {
                // SAFETY: `sk` holds a lookup's reference, released once.
                unsafe { bpf_sk_release(sk.cast()) };
                return None;
            };
            if !reopen_target_ready(ctx, flow) {
                // SAFETY: `sk` holds a lookup's reference, released once.
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
        // SAFETY: `sk` holds a lookup's reference, released once.
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
pub(crate) fn intercepting_rule(flow: &Flow, to_port: bool) -> Option<RuleChoice> {
    if !to_port {
        return None;
    }
    // SAFETY: a union of integers; the flow's family picks the member.
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
pub(crate) fn daddr(flow: &Flow) -> [u32; 4] {
    // SAFETY: a union of integers; the flow's family picks the member.
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
pub(crate) fn syncookie_to_listener(
    ctx: &TcContext,
    flow: &Flow,
    index: u32,
    rule: &RuleChoice,
) -> Outcome {
    let sk = target(ctx, flow, index)?;
    let th: Option<*const [u8; 20]> = ptr_at(ctx, flow.l4);
    let valid = match th {
        // SAFETY: a listener from a lookup, and checked packet pointers.
        Some(th) if flow.ipv6 => ptr_at::<[u8; 40]>(ctx, flow.l3).is_some_and(|iph| unsafe {
            bpf_tcp_check_syncookie(sk.cast(), iph.cast_mut().cast(), 40, th.cast_mut().cast(), 20)
                == 0
        }),
        // SAFETY: a listener from a lookup, and checked packet pointers.
        Some(th) => ptr_at::<[u8; 20]>(ctx, flow.l3).is_some_and(|iph| unsafe {
            bpf_tcp_check_syncookie(sk.cast(), iph.cast_mut().cast(), 20, th.cast_mut().cast(), 20)
                == 0
        }),
        None => false,
    };
    if !valid {
        // SAFETY: `sk` holds a lookup's reference, released once.
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
pub(crate) fn steer_udp(ctx: &TcContext, flow: &mut Flow, to_port: bool) -> Outcome {
    let len = flow.tuple_len();
    // SAFETY: the flow's tuple and its length; the verifier tracks the result.
    let sk = unsafe {
        bpf_sk_lookup_udp(ctx.as_ptr(), &mut flow.tuple, len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if !sk.is_null() {
        if owns_tuple(sk, flow) {
            let counter = if to_port { stat::TO_SOCKET } else { stat::RETURN_PATH };
            return assign(ctx, sk, None, counter);
        }
        // SAFETY: `sk` holds a lookup's reference, released once.
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
pub(crate) fn owns_tuple(sk: *mut bpf_sock, flow: &Flow) -> bool {
    // SAFETY: `sk` is the caller's lookup result, non-null and not yet
    // released; the tuple's union member read is the flow's family.
    unsafe {
        if flow.ipv6 {
            let peer = read_words(&(*sk).dst_ip6);
            peer != [0; 4] && peer == flow.tuple.__bindgen_anon_1.ipv6.saddr
        } else {
            let peer = load(&(*sk).dst_ip4);
            peer != 0 && peer == flow.tuple.__bindgen_anon_1.ipv4.saddr
        }
    }
}
