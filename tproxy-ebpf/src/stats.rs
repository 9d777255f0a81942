//! The counters: each outcome once in `STATS`, and each rule's in
//! `RULE_STATS`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tproxy_ebpf::{MAX_RULES, RuleChoice, RuleStats, stat};

#[map]
static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
pub fn rule_stats(rule: &RuleChoice) -> Option<&mut RuleStats> {
    // SAFETY: a map value from a lookup, valid until the program returns.
    RULE_STATS.get_ptr_mut(rule.rule_id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: a map value from a lookup, valid until the program returns.
        unsafe { *c += 1 };
    }
}
