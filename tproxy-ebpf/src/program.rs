//! The steering decision.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_sock},
    cty::c_void,
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map, sk_lookup},
    maps::{HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::warn;
use tproxy_ebpf::{
    MAX_PORT_RULES, MAX_REOPENS, PROTO_TCP, PortKey, PortRule, RULE_INTERCEPT, ReopenKey, slot,
    stat,
};

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
static TW_REOPEN: LruHashMap<ReopenKey, u8> = LruHashMap::with_max_entries(MAX_REOPENS, 0);

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
        if state != BPF_TCP_LISTEN {
            // A SYN that meets TIME_WAIT opens a new connection. Handing it to
            // the listener directly fails: the kernel refuses a request socket
            // whose tuple a TIME_WAIT socket still holds. Handing it to the
            // TIME_WAIT socket lets the kernel retire that socket and look up
            // a listener, which `tproxy_reopen` answers with ours.
            if state == BPF_TCP_TIME_WAIT && flow.syn {
                let _ = TW_REOPEN.insert(&reopen_key(flow), &0, 0);
                count(stat::TW_SYN);
            }
            assign(ctx, sk, stat::TO_SOCKET);
            return;
        }
        // A LISTEN socket found by tuple is some local server's wildcard
        // listener, not ours.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    // Non-SYN packets without a socket go to the listener too: it answers
    // stray segments with a reset and validates SYN cookies.
    let index = if flow.ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
    to_listener(ctx, index);
}

#[inline(always)]
fn reopen_key(flow: &Flow) -> ReopenKey {
    let mut key =
        ReopenKey { saddr: [0; 4], daddr: [0; 4], sport: 0, dport: 0, ipv6: 0, _pad: [0; 3] };
    unsafe {
        if flow.ipv6 {
            let t = &flow.tuple.__bindgen_anon_1.ipv6;
            key.saddr = t.saddr;
            key.daddr = t.daddr;
            key.sport = u16::from_be(t.sport);
            key.ipv6 = 1;
        } else {
            let t = &flow.tuple.__bindgen_anon_1.ipv4;
            key.saddr[0] = t.saddr;
            key.daddr[0] = t.daddr;
            key.sport = u16::from_be(t.sport);
        }
    }
    key.dport = flow.dport;
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
        key.saddr = ctx_words(&l.remote_ip6);
        key.daddr = ctx_words(&l.local_ip6);
    } else {
        key.saddr[0] = l.remote_ip4;
        key.daddr[0] = l.local_ip4;
    }
    if unsafe { TW_REOPEN.get(&key) }.is_some() {
        let _ = TW_REOPEN.remove(&key);
        let index = if ipv6 { slot::TCP_V6 } else { slot::TCP_V4 };
        // On failure the lookup goes on as usual: the client retries.
        if LISTENERS.redirect_sk_lookup(&ctx, index, 0).is_ok() {
            count(stat::TW_HANDOVER);
        }
    }
    SK_PASS
}

/// Copies an address out of the context one word at a time: the verifier
/// refuses loads through a ctx pointer that was moved, which an array copy is.
#[inline(always)]
fn ctx_words(words: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
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
