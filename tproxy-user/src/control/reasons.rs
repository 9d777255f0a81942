//! Why traffic was dropped, or passed on without the proxy: one vocabulary
//! over the datapath's and the relays' counters, as Cilium names its drop
//! reasons. `stats` shows it, `--json` carries it and Prometheus serves it
//! as `tproxy_drops_total{reason}` and `tproxy_passed_total{reason}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    datapath::DatapathStats,
    relay::{TcpRelayCounters, UdpRelayCounters},
};

/// Counts by reason; every reason is present, at 0 if nothing happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reasons {
    /// Dropped by the datapath, or refused or dropped by a relay.
    pub dropped: BTreeMap<String, u64>,
    /// Intercepted traffic that went on without the proxy.
    pub passed: BTreeMap<String, u64>,
}

/// Each reason for a drop, with what it means (the metric's help says
/// the same for the family).
pub const DROP_REASONS: &[(&str, &str)] = &[
    ("unparsed", "a packet that could not be parsed whole (--unparsed drop)"),
    ("foreign_listener", "a new flow met a --to-port listener of another user"),
    ("per_source_limit", "a client was over its share of the TCP relay"),
    ("queue_full", "a datagram found the queue of SOCKS5 associations being opened full"),
    ("truncated", "a datagram larger than the relay's buffer"),
    ("loop", "a flow to the relay itself"),
    ("unknown_destination", "a flow whose original destination could not be read"),
    ("local_destination", "a flow to this host's own address (without --intercept-local)"),
];

/// Each reason for an un-proxied pass.
pub const PASS_REASONS: &[(&str, &str)] = &[
    ("no_listener", "no listener (the relay's, or --to-port's) to take a new flow"),
    ("assign_failed", "the kernel refused to hand the flow to the listener"),
    ("unparsed", "a packet that could not be parsed whole (--unparsed pass)"),
    ("locality_unknown", "the host's own destinations overflowed the datapath's table"),
    ("host_destination", "traffic to this host's own addresses, left to the host"),
];

impl Reasons {
    /// The reasons behind the counters of one report.
    pub fn of(
        datapath: &DatapathStats,
        tcp: Option<&TcpRelayCounters>,
        udp: Option<&UdpRelayCounters>,
    ) -> Self {
        let tcp = tcp.copied().unwrap_or_default();
        let udp = udp.copied().unwrap_or_default();
        let dropped = [
            datapath.unparsed_dropped,
            datapath.target_foreign,
            tcp.refused_per_source,
            udp.queue_full,
            udp.truncated,
            tcp.refused_loops + udp.refused_loops,
            tcp.refused_unknown + udp.refused_unknown,
            tcp.refused_local + udp.refused_local,
        ];
        let passed = [
            datapath.no_listener + datapath.cgroup_no_target,
            datapath.assign_failed,
            datapath.unparsed_passed,
            datapath.local_unknown,
            datapath.to_host,
        ];
        let named = |reasons: &[(&str, &str)], counts: &[u64]| {
            reasons.iter().zip(counts).map(|((r, _), n)| (r.to_string(), *n)).collect()
        };
        Self { dropped: named(DROP_REASONS, &dropped), passed: named(PASS_REASONS, &passed) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_counted_once_and_named() {
        let datapath = DatapathStats { no_listener: 2, cgroup_no_target: 1, ..Default::default() };
        let tcp = TcpRelayCounters { refused_loops: 1, ..Default::default() };
        let udp = UdpRelayCounters { refused_loops: 2, queue_full: 4, ..Default::default() };
        let reasons = Reasons::of(&datapath, Some(&tcp), Some(&udp));
        assert_eq!(reasons.passed["no_listener"], 3);
        assert_eq!(reasons.dropped["loop"], 3);
        assert_eq!(reasons.dropped["queue_full"], 4);
        assert_eq!(reasons.dropped.len(), DROP_REASONS.len());
        assert_eq!(reasons.passed.len(), PASS_REASONS.len());
        assert_eq!(reasons.passed.values().sum::<u64>(), 3);
    }
}
