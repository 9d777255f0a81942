//! The `sk_lookup` program: a SYN that met the relay's TIME_WAIT socket, or
//! a new flow the TC program could not assign, is handed to the listener.

use aya_ebpf::{
    macros::{map, sk_lookup},
    maps::LruHashMap,
    programs::SkLookupContext,
};
use tproxy_ebpf::{MAX_REOPENS, PROTO_TCP, ReopenKey, slot, stat};

use crate::addr::read_words;
use crate::parse::Flow;
use crate::stats::count;

use crate::program::*;

/// Tuples whose next listener lookup `tproxy_reopen` answers, with why.
#[map]
pub(crate) static TW_REOPEN: LruHashMap<ReopenKey, u8> =
    LruHashMap::with_max_entries(MAX_REOPENS, 0);
/// A SYN handed to a TIME_WAIT socket holding its tuple.
pub(crate) const REOPEN_TIME_WAIT: u8 = 0;
/// A new flow whose listener could not be assigned (SO_REUSEPORT, before 6.5).
pub(crate) const REOPEN_NEW_FLOW: u8 = 1;

#[inline(always)]
pub(crate) fn reopen_key(flow: &Flow) -> ReopenKey {
    let mut key = ReopenKey {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: flow.sport,
        dport: flow.dport,
        ipv6: 0,
        _pad: [0; 3],
    };
    // SAFETY: a union of integers; the flow's family picks the member.
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
    // SAFETY: the context the kernel passes is valid for the run.
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
        key.saddr = read_words(&l.remote_ip6);
        key.daddr = read_words(&l.local_ip6);
    } else {
        key.saddr[0] = l.remote_ip4;
        key.daddr[0] = l.local_ip4;
    }
    // SAFETY: the map's value is copied out at once.
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
