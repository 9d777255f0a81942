//! cgroup hooks (`--cgroup`): a connection or unconnected datagram of the
//! host's own processes to something a rule intercepts is sent to the
//! relay's loopback socket instead, and the socket's original destination
//! is remembered by its cookie. The socket keeps seeing that destination:
//! as its peer (`getpeername`) and as the source of what it receives
//! (`recvmsg`).
//!
//! For a REDIRECT-style proxy behind `--to-port`, the TCP ones are also
//! recorded by their local address once connecting gives them one
//! (`sockops`), and the proxy's `getsockopt(SO_ORIGINAL_DST)` on the
//! accepted socket is answered from that record.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, LruHashMap},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use tproxy_ebpf::{
    FAMILY_V4, FAMILY_V6, MAX_ORIGINAL_DSTS, PROTO_TCP, PROTO_UDP, PeerKey, SockDst, slot, stat,
};

use crate::{
    addr::{is_v4_mapped, load, read_words, v4_mapped, write_words},
    program::{BYPASS_MARK, INTERCEPT_LOCAL, global},
    rules::{Query, gated, is_local, local_dests_incomplete, match_rule},
    stats::{count, rule_stats},
};

/// Set by the loader (see `names::NETNS_COOKIE`).
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// Where intercepted sockets go, by `slot`; port 0: nowhere (they keep
/// their destination).
#[map]
static CGROUP_TARGETS: Array<SockDst> = Array::with_max_entries(slot::COUNT, 0);

/// What each rewritten socket asked for, by socket cookie.
#[map]
static ORIGINAL_DST: LruHashMap<u64, SockDst> = LruHashMap::with_max_entries(MAX_ORIGINAL_DSTS, 0);

/// What each rewritten TCP socket asked for, by its local address.
#[map]
static PEER_DST: LruHashMap<PeerKey, SockDst> = LruHashMap::with_max_entries(MAX_ORIGINAL_DSTS, 0);

/// The only verdict these hooks give: the call goes on.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn tproxy_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tproxy_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

/// Unconnected UDP sends (connected sockets went through `connect`).
#[cgroup_sock_addr(sendmsg4)]
pub fn tproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tproxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn tproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn tproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn tproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn tproxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true);
    ALLOW
}

/// The address in the context, IPv4 in `[0]`, and whether it is IPv4 (an
/// IPv6 socket's IPv4-mapped address counts as IPv4).
#[inline(always)]
fn user_addr(sa: &bpf_sock_addr, ipv6_hook: bool) -> ([u32; 4], bool) {
    if !ipv6_hook {
        return ([load(&sa.user_ip4), 0, 0, 0], true);
    }
    let words = read_words(&sa.user_ip6);
    if is_v4_mapped(&words) { ([words[3], 0, 0, 0], true) } else { (words, false) }
}

#[inline(always)]
fn target_slot(proto: u8, ipv4: bool) -> u32 {
    match (proto, ipv4) {
        (PROTO_TCP, true) => slot::TCP_V4,
        (PROTO_TCP, false) => slot::TCP_V6,
        (_, true) => slot::UDP_V4,
        (_, false) => slot::UDP_V6,
    }
}

/// The socket's protocol, if TCP or UDP.
#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<u8> {
    match load(&sa.protocol) as u8 {
        p @ (PROTO_TCP | PROTO_UDP) => Some(p),
        _ => None,
    }
}

/// Sends the socket to the target if a rule intercepts where it is going.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, ipv6_hook: bool) {
    // SAFETY: the context the kernel passes is valid for the run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let port = load(&sa.user_port);
    let dport = u16::from_be(port as u16);
    if !gated(proto, dport) {
        return;
    }
    // The relay's own sockets carry the bypass mark.
    // SAFETY: the context's socket, the member set for this hook.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: the context's socket, checked non-null, valid for the run.
    if sk.is_null() || unsafe { (*sk).mark } == global(&BYPASS_MARK) {
        return;
    }
    let netns = load(&NETNS_COOKIE);
    // SAFETY: reads the context's own socket.
    if netns != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != netns {
        return;
    }
    let (daddr, ipv4) = user_addr(sa, ipv6_hook);
    if global(&INTERCEPT_LOCAL) == 0 {
        if is_local(!ipv4, &daddr) {
            return;
        }
        // No FIB lookup here: what the incomplete trie does not know stays
        // the host's.
        if local_dests_incomplete() {
            count(stat::LOCAL_UNKNOWN);
            return;
        }
    }
    // The host's own connections have no client address: rules with a
    // source filter do not apply to them.
    let query = Query { ipv6: !ipv4, proto, dport, daddr, saddr: [0; 4] };
    let Some(rule) = match_rule(&query) else { return };
    let target = match CGROUP_TARGETS.get(target_slot(proto, ipv4)) {
        Some(t) if t.port != 0 => *t,
        _ => {
            if let Some(s) = rule_stats(&rule) {
                s.no_listener += 1;
            }
            count(stat::CGROUP_NO_TARGET);
            return;
        }
    };
    let original = SockDst {
        addr: if ipv6_hook { read_words(&sa.user_ip6) } else { daddr },
        port,
        family: if ipv6_hook { FAMILY_V6 as u32 } else { FAMILY_V4 as u32 },
    };
    // SAFETY: reads the context's own socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGINAL_DST.insert(&cookie, &original, 0).is_err() {
        return;
    }
    write_addr(sa, ipv6_hook, ipv4, &target.addr);
    sa.user_port = target.port;
    if let Some(s) = rule_stats(&rule) {
        s.new_flows += 1;
    }
    count(stat::CGROUP_TO_TARGET);
}

/// Writes `addr` (IPv4 in `[0]`) into the context, IPv4-mapped for an IPv6
/// socket going to an IPv4 address.
#[inline(always)]
fn write_addr(sa: &mut bpf_sock_addr, ipv6_hook: bool, ipv4: bool, addr: &[u32; 4]) {
    if !ipv6_hook {
        sa.user_ip4 = addr[0];
    } else if ipv4 {
        write_words(&mut sa.user_ip6, &v4_mapped(addr[0]));
    } else {
        write_words(&mut sa.user_ip6, addr);
    }
}

/// Shows a rewritten socket its original destination where the kernel
/// would show the target.
#[inline(always)]
fn restore(ctx: &SockAddrContext, ipv6_hook: bool) {
    // SAFETY: the context the kernel passes is valid for the run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = protocol(sa) else { return };
    let (addr, ipv4) = user_addr(sa, ipv6_hook);
    let Some(target) = CGROUP_TARGETS.get(target_slot(proto, ipv4)) else { return };
    let port = load(&sa.user_port);
    if target.port == 0 || port != target.port || addr != target.addr {
        return;
    }
    // SAFETY: reads the context's own socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map's value is copied out at once.
    let Some(original) = (unsafe { ORIGINAL_DST.get(&cookie) }).copied() else { return };
    if ipv6_hook {
        write_words(&mut sa.user_ip6, &original.addr);
    } else {
        sa.user_ip4 = original.addr[0];
    }
    sa.user_port = original.port;
}

/// Records a rewritten TCP socket by the local address connecting gave it,
/// and forgets it when the socket closes: a later socket on the same local
/// port (any user's) must never be answered with this one's destination.
#[sock_ops]
pub fn tproxy_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: reads the context's own socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the map's value is copied out at once.
            let Some(original) = (unsafe { ORIGINAL_DST.get(&cookie) }).copied() else {
                return 0;
            };
            // Without the state callback the entry could outlive the socket.
            if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_ok() {
                let _ = PEER_DST.insert(&peer_key(&ctx), &original, 0);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = PEER_DST.remove(&peer_key(&ctx));
        }
        _ => {}
    }
    0
}

/// The `PEER_DST` key of a socket: its local address and port.
#[inline(always)]
fn peer_key(ctx: &SockOpsContext) -> PeerKey {
    const AF_INET6: u32 = 10;
    let mut key = PeerKey { addr: [0; 4], port: ctx.local_port(), family: FAMILY_V4 as u32 };
    // SAFETY: the context the kernel passes is valid for the run.
    let ops = unsafe { &*ctx.ops };
    let remote = if ctx.family() == AF_INET6 { read_words(&ops.remote_ip6) } else { [0; 4] };
    if ctx.family() == AF_INET6 && !is_v4_mapped(&remote) {
        key.addr = read_words(&ops.local_ip6);
        key.family = FAMILY_V6 as u32;
    } else {
        key.addr[0] = ctx.local_ip4();
    }
    key
}

/// Answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (and `SOL_IPV6`'s) on a
/// socket whose peer is a recorded one, with a `sockaddr_in` (`_in6`);
/// every other call keeps the kernel's answer.
#[cgroup_sockopt(getsockopt)]
pub fn tproxy_original_dst(ctx: SockoptContext) -> i32 {
    const SOL_IP: i32 = 0;
    const SOL_IPV6: i32 = 41;
    const SO_ORIGINAL_DST: i32 = 80;
    // SAFETY: the context the kernel passes is valid for the run.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.optname != SO_ORIGINAL_DST || (opt.level != SOL_IP && opt.level != SOL_IPV6) {
        return ALLOW;
    }
    let ipv6 = opt.level == SOL_IPV6;
    // SAFETY: the context's socket, the member set for this hook.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    if sk.is_null() {
        return ALLOW;
    }
    let mut key = PeerKey {
        addr: [0; 4],
        // SAFETY: the context's socket, checked non-null, valid for the run.
        port: u16::from_be(unsafe { load(&(*sk).dst_port) } as u16) as u32,
        family: if ipv6 { FAMILY_V6 as u32 } else { FAMILY_V4 as u32 },
    };
    if ipv6 {
        // SAFETY: the context's socket, checked non-null, valid for the run.
        key.addr = read_words(unsafe { &(*sk).dst_ip6 });
    } else {
        // SAFETY: the context's socket, checked non-null, valid for the run.
        key.addr[0] = unsafe { load(&(*sk).dst_ip4) };
    }
    // SAFETY: the map's value is copied out at once.
    let Some(original) = (unsafe { PEER_DST.get(&key) }).copied() else { return ALLOW };
    // SAFETY: the option buffer's bounds, from the context's unions.
    let (start, end) = unsafe { (opt.__bindgen_anon_2.optval, opt.__bindgen_anon_3.optval_end) };
    let start = start as *mut u8;
    if ipv6 {
        // sockaddr_in6: family, port, flowinfo, address, scope id.
        // SAFETY: arithmetic only, compared with `end` before any write.
        if unsafe { start.add(28) } > end as *mut u8 {
            return ALLOW;
        }
        let mut sin6 = [0u32; 7];
        sin6[0] = (10u32).to_le() | (original.port & 0xffff) << 16;
        let addr = if original.family == FAMILY_V4 as u32 {
            v4_mapped(original.addr[0])
        } else {
            original.addr
        };
        sin6[2..6].copy_from_slice(&addr);
        // SAFETY: `start + len <= end` was checked above.
        unsafe { core::ptr::write_unaligned(start as *mut [u32; 7], sin6) };
        opt.optlen = 28;
    } else {
        if original.family != FAMILY_V4 as u32 && !is_v4_mapped(&original.addr) {
            return ALLOW;
        }
        let v4 =
            if original.family == FAMILY_V4 as u32 { original.addr[0] } else { original.addr[3] };
        // sockaddr_in: family, port, address, zeros.
        // SAFETY: arithmetic only, compared with `end` before any write.
        if unsafe { start.add(16) } > end as *mut u8 {
            return ALLOW;
        }
        let sin = [2u32.to_le() | (original.port & 0xffff) << 16, v4, 0, 0];
        // SAFETY: `start + len <= end` was checked above.
        unsafe { core::ptr::write_unaligned(start as *mut [u32; 4], sin) };
        opt.optlen = 16;
    }
    opt.retval = 0;
    ALLOW
}
