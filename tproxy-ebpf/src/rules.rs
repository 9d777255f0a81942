//! Which flows are ours: the port gate, the rule tries and the host's own
//! destinations, shared by the TC program and the cgroup hooks.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, lpm_trie::Key},
};
use tproxy_ebpf::{
    ACTION_INTERCEPT, ADDR_KEY_FIXED_BITS, AddrKey, FAMILY_V4, FAMILY_V6, GATE_ENTRIES,
    MAX_LOCAL_DESTS, MAX_RULE_ENTRIES, RULE_CHOICES, RULE_MATCH_FIXED_BITS, RuleAction, RuleChoice,
    RuleMatch, gate_index,
};

/// One byte per (protocol, port): non-zero when some rule uses the port now
/// or did earlier in this run (so connections it steered keep being steered
/// after the rule is deleted).
#[map]
static PORT_GATE: Array<u8> = Array::with_max_entries(GATE_ENTRIES, 0);

/// The rules, twice: userland fills the inactive copy and then flips
/// `ACTIVE_RULES`, so that every packet sees either the old or the new set.
#[map]
static RULES_0: LpmTrie<RuleMatch, RuleAction> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);
#[map]
static RULES_1: LpmTrie<RuleMatch, RuleAction> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);
#[map]
static ACTIVE_RULES: Array<u32> = Array::with_max_entries(1, 0);

/// The host's own destinations (its `local` routing table), kept current by
/// userland: traffic to them is the host's, not the relay's.
#[map]
static LOCAL_DESTS: LpmTrie<AddrKey, u8> = LpmTrie::with_max_entries(MAX_LOCAL_DESTS, 0);

/// Non-zero while `LOCAL_DESTS` may lack some of the host's destinations
/// (userland could not fit or sync them): what is not in it is then not
/// known to be elsewhere.
#[map]
static LOCAL_DESTS_INCOMPLETE: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn local_dests_incomplete() -> bool {
    LOCAL_DESTS_INCOMPLETE.get(0).is_some_and(|v| *v != 0)
}

/// A flow as the rules see it. Addresses in network order, IPv4 in `[0]`.
pub struct Query {
    pub ipv6: bool,
    pub proto: u8,
    /// Host order.
    pub dport: u16,
    pub daddr: [u32; 4],
    pub saddr: [u32; 4],
}

#[inline(always)]
pub fn gated(proto: u8, port: u16) -> bool {
    match gate_index(proto, port) {
        Some(index) => PORT_GATE.get(index).is_some_and(|g| *g != 0),
        None => false,
    }
}

/// Whether `daddr` is one this host receives itself.
#[inline(always)]
pub fn is_local(ipv6: bool, daddr: &[u32; 4]) -> bool {
    let mut data = AddrKey { family: FAMILY_V4, _pad: [0; 3], addr: [0; 16] };
    let bits = if ipv6 {
        data.family = FAMILY_V6;
        // SAFETY: 16 bytes of integers either way; any bits are valid.
        data.addr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*daddr) };
        128
    } else {
        data.addr[..4].copy_from_slice(&daddr[0].to_ne_bytes());
        32
    };
    LOCAL_DESTS.get(&Key::new(ADDR_KEY_FIXED_BITS + bits, data)).is_some()
}

/// The intercepting rule for the flow's destination, if any: the longest
/// matching prefix, provided it intercepts and its source filter matches.
#[inline(always)]
pub fn match_rule(q: &Query) -> Option<RuleChoice> {
    let mut data =
        RuleMatch { family: FAMILY_V4, proto: q.proto, port: q.dport.to_be_bytes(), addr: [0; 16] };
    let addr_bits = if q.ipv6 {
        data.family = FAMILY_V6;
        // SAFETY: 16 bytes of integers either way; any bits are valid.
        data.addr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(q.daddr) };
        128
    } else {
        data.addr[..4].copy_from_slice(&q.daddr[0].to_ne_bytes());
        32
    };
    let key = Key::new(RULE_MATCH_FIXED_BITS + addr_bits, data);
    let rules = if ACTIVE_RULES.get(0).is_some_and(|a| *a == 1) { &RULES_1 } else { &RULES_0 };
    let entry: &RuleAction = rules.get(&key)?;
    // The first rule whose source filter matches decides.
    for i in 0..RULE_CHOICES {
        if i as u32 >= entry.len {
            break;
        }
        let choice = &entry.choices[i];
        if source_matches(&q.saddr, choice) {
            return if choice.action == ACTION_INTERCEPT { Some(*choice) } else { None };
        }
    }
    None
}

/// Whether the source bits the rule filters on equal its own.
#[inline(always)]
fn source_matches(src: &[u32; 4], rule: &RuleChoice) -> bool {
    let mut differ = 0;
    for i in 0..4 {
        differ |= (src[i] ^ rule.src[i]) & rule.src_mask[i];
    }
    differ == 0
}
