//! The steering decision.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_sock},
    cty::c_void,
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, SockMap},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use tproxy_ebpf::{MAX_PORT_RULES, PROTO_TCP, PortKey, PortRule, RULE_INTERCEPT, slot, stat};

use crate::parse::{Flow, parse};

/// `TC_ACT_UNSPEC`: "no verdict", so the next program or filter still runs and
/// the packet otherwise continues as if we were not there.
const TC_NEXT: i32 = -1;

// Set by the loader. Plain statics read through `read_volatile`, so the
// compiler keeps the loads; aya's `Global<T>` would emit a `MaybeUninit<u32>`
// BTF name that kernels reject.
#[unsafe(no_mangle)]
static MARK: u32 = 0;
#[unsafe(no_mangle)]
static BYPASS_MARK: u32 = 0;

#[inline(always)]
fn global(value: &'static u32) -> u32 {
    unsafe { core::ptr::read_volatile(value) }
}

#[map]
static PORTS: HashMap<PortKey, PortRule> = HashMap::with_max_entries(MAX_PORT_RULES, 0);

#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(slot::COUNT, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    if let Some(flow) = parse(&ctx) {
        steer(&ctx, flow);
    }
    TC_NEXT
}

#[inline(always)]
fn steer(ctx: &TcContext, mut flow: Flow) {
    let key = PortKey::new(flow.proto, flow.dport);
    match unsafe { PORTS.get(&key) } {
        Some(rule) if rule.flags & RULE_INTERCEPT != 0 => {}
        _ => return,
    }
    // The relay's own upstream traffic carries the bypass mark.
    if unsafe { (*ctx.skb.skb).mark } == global(&BYPASS_MARK) {
        return;
    }
    if flow.proto == PROTO_TCP {
        steer_tcp(ctx, &mut flow);
    }
}

/// A packet that belongs to a socket goes to that socket; a new connection
/// goes to the relay's listener.
#[inline(always)]
fn steer_tcp(ctx: &TcContext, flow: &mut Flow) {
    let len = flow.tuple_len();
    let sk = unsafe {
        bpf_skc_lookup_tcp(ctx.as_ptr(), &mut flow.tuple, len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if !sk.is_null() {
        let state = unsafe { (*sk).state };
        // A LISTEN socket found by tuple is some local server's wildcard
        // listener, not ours. A SYN that meets a TIME_WAIT socket opens a new
        // connection: handing it to TIME_WAIT would make the kernel look for
        // a listener on the original port and reset or drop it.
        let new_flow = state == BPF_TCP_LISTEN || (state == BPF_TCP_TIME_WAIT && flow.syn);
        if !new_flow {
            assign(ctx, sk, stat::TO_SOCKET);
            return;
        }
        unsafe { bpf_sk_release(sk.cast()) };
    }
    // Non-SYN packets without a socket go to the listener too: it answers
    // stray segments with a reset and validates SYN cookies.
    let index = if flow.ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
    to_listener(ctx, index);
}

#[inline(always)]
fn to_listener(ctx: &TcContext, index: u32) {
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if sk.is_null() {
        count(stat::NO_LISTENER);
        return;
    }
    assign(ctx, sk.cast(), stat::TO_LISTENER);
}

/// Assigns `sk` to the packet, marks it for local delivery, and releases `sk`.
#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock, counter: u32) {
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    if ret == 0 {
        ctx.set_mark(global(&MARK));
        count(counter);
    } else {
        count(stat::ASSIGN_FAILED);
        warn!(ctx, "bpf_sk_assign failed: {}", ret);
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}
