//! Socket helpers: the listeners, `--to-port`'s target, and assigning a
//! packet to a socket with its counting.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock},
    cty::c_void,
    helpers::{
        bpf_get_socket_uid, bpf_map_lookup_elem, bpf_map_update_elem, bpf_sk_assign,
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    programs::TcContext,
};
use tproxy_ebpf::{PROTO_TCP, RuleChoice, slot, stat};

use crate::addr::read_words;
use crate::parse::Flow;
use crate::stats::rule_stats;

use crate::{program::*, sk_lookup::*};

/// The relay's socket in `index` of the sockmap, with a reference the
/// caller must release (or hand to `assign`).
#[inline(always)]
pub(crate) fn listener(index: u32) -> Option<*mut bpf_sock> {
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    // SAFETY: one of our maps, with a key (and value) of its types.
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if sk.is_null() { None } else { Some(sk.cast()) }
}

/// Where new flows go, with a reference the caller must release (or hand
/// to `assign`): the relay's socket in `index` of the sockmap, or with
/// `--to-port` the transparent listener on that port.
#[inline(always)]
pub(crate) fn target(ctx: &TcContext, flow: &Flow, index: u32) -> Option<*mut bpf_sock> {
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
pub(crate) fn port_listener(ctx: &TcContext, flow: &Flow, port: u16) -> Option<*mut bpf_sock> {
    let mut tuple = flow.tuple;
    // SAFETY: a union of integers; the flow's family picks the member.
    unsafe {
        if flow.ipv6 {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.dport = port.to_be();
            let addr = read_words(&TARGET_ADDR6);
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
    // SAFETY: the flow's tuple and its length; the verifier tracks the result.
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
    // SAFETY: `sk` is a lookup's, checked non-null, not yet released.
    if flow.proto == PROTO_TCP && unsafe { (*sk).state } != BPF_TCP_LISTEN {
        // SAFETY: `sk` holds a lookup's reference, released once.
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
    }
    Some(sk)
}

/// `tproxy_reopen` hands a reopened tuple to the socket in `LISTENERS`,
/// the only kind of socket an `sk_lookup` program can hand over. With
/// `--to-port` that is put there first: the listener on the port, now.
#[inline(always)]
pub(crate) fn reopen_target_ready(ctx: &TcContext, flow: &Flow) -> bool {
    let port = global(&TARGET_PORT);
    if port == 0 {
        return true;
    }
    let Some(sk) = port_listener(ctx, flow, port as u16) else { return false };
    let index = if flow.ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
    let put = put_listener(sk, index);
    // SAFETY: `sk` holds a lookup's reference, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    put == 0
}

/// Puts `sk` into slot `index` of `LISTENERS`, where `tproxy_reopen`
/// answers from (a sockmap update from TC: 5.10).
#[inline(always)]
pub(crate) fn put_listener(sk: *mut bpf_sock, index: u32) -> i64 {
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    let key = core::ptr::from_ref(&index).cast();
    // SAFETY: one of our maps, with a key (and value) of its types.
    unsafe { bpf_map_update_elem(map, key, sk.cast(), BPF_ANY as u64) }
}

#[inline(always)]
pub(crate) fn to_target(ctx: &TcContext, flow: &Flow, index: u32, rule: &RuleChoice) -> Outcome {
    match target(ctx, flow, index) {
        Some(sk) => assign_listener(ctx, flow, sk, index, rule),
        None => no_target(rule),
    }
}

/// Fail-open: the packet passes untouched, counted.
#[inline(always)]
pub(crate) fn no_target(rule: &RuleChoice) -> Outcome {
    if let Some(s) = rule_stats(rule) {
        s.no_listener += 1;
    }
    Some(stat::NO_LISTENER)
}

/// `bpf_sk_assign`'s answer for an SO_REUSEPORT socket before 6.5.
pub(crate) const ESOCKTNOSUPPORT: i64 = 94;

/// Assigns `sk` to the packet, marks it for local delivery, and releases
/// `sk`. The outcome is `counter`, or `ASSIGN_FAILED`. A packet that needed
/// a rule opens a new flow, which the rule counts.
#[inline(always)]
pub(crate) fn assign(
    ctx: &TcContext,
    sk: *mut bpf_sock,
    rule: Option<&RuleChoice>,
    counter: u32,
) -> Outcome {
    // SAFETY: `sk` is a live reference; the helper takes its own.
    let mut ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    // Before 6.5 the kernel refuses SO_REUSEPORT sockets, and the
    // connections of a reuseport listener (HAProxy's, Envoy's) inherit the
    // flag. Marked, such a packet still finds its socket by its tuple once
    // it is delivered locally, as the iptables recipe's packets do.
    if ret == -ESOCKTNOSUPPORT && rule.is_none() {
        ret = 0;
    }
    // SAFETY: `sk` holds a lookup's reference, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    settle(ctx, ret == 0, rule, counter)
}

/// Assigns a new flow to `sk`, the listener for slot `index`, and releases
/// it. Before 6.5 the kernel refuses to assign an SO_REUSEPORT listener
/// (HAProxy and Envoy make them): then the flow is noted, marked, and
/// handed to the listener by `tproxy_reopen` during the kernel's own
/// listener lookup, where the reuseport group chooses its member.
#[inline(always)]
pub(crate) fn assign_listener(
    ctx: &TcContext,
    flow: &Flow,
    sk: *mut bpf_sock,
    index: u32,
    rule: &RuleChoice,
) -> Outcome {
    // SAFETY: `sk` is a live reference; the helper takes its own.
    let mut ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    if ret == -ESOCKTNOSUPPORT && flow.proto == PROTO_TCP {
        ret = hand_over_in_lookup(flow, sk, index);
    } else if ret == 0 && !target_owned(ctx) {
        // Assigned already: passing it on would deliver it there.
        // SAFETY: `sk` holds a lookup's reference, released once.
        unsafe { bpf_sk_release(sk.cast()) };
        return Some(stat::TARGET_FOREIGN);
    }
    // SAFETY: `sk` holds a lookup's reference, released once.
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
pub(crate) fn target_owned(ctx: &TcContext) -> bool {
    let owner = global(&TARGET_OWNER);
    global(&TARGET_PORT) == 0
        || owner == u32::MAX
        // SAFETY: reads the context's own socket.
        || unsafe { bpf_get_socket_uid(ctx.skb.skb) } == owner
}

/// Notes the flow for `tproxy_reopen`, with `sk` (a `--to-port` listener;
/// the relay's own is there already) in the sockmap slot it answers from.
#[inline(always)]
pub(crate) fn hand_over_in_lookup(flow: &Flow, sk: *mut bpf_sock, index: u32) -> i64 {
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
pub(crate) fn settle(
    ctx: &TcContext,
    assigned: bool,
    rule: Option<&RuleChoice>,
    counter: u32,
) -> Outcome {
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
