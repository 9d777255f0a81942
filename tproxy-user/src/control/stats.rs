//! One snapshot of every counter: the datapath's (all rules, and each rule)
//! and the relays'. `tproxy-user stats` prints it as a table or as JSON, and
//! the metrics endpoint serves it in Prometheus text format.

use std::{borrow::Cow, fmt::Write as _};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

use tproxy_ebpf::RuleStats;

use crate::{
    control::reasons::{DROP_REASONS, PASS_REASONS, Reasons},
    counters::{Counter, Kind, Snapshot as _},
    datapath::DatapathStats,
    relay::{
        TcpRelayCounters, UdpRelayCounters, access_log::AccessLogCounters, upstream::UpstreamReport,
    },
};

crate::counters::counters! {
    /// The counters of one rule, summed over all CPUs.
    RuleCounters {
        /// Packets this rule steered: the first of each flow (and SYN-cookie
        /// ACKs). Later packets go to their flow's socket without a rule lookup.
        packets: Counter("tproxy_rule_packets", "packets",
            "Packets a rule steered (the first of each flow), per rule"),
        /// Bytes of those packets, as seen at TC ingress.
        bytes: Counter("tproxy_rule_bytes", "bytes", "Bytes of steered packets, per rule"),
        /// New flows handed to the listener (TCP connections, UDP datagrams).
        new_flows: Counter("tproxy_rule_new_flows", "new flows",
            "New flows steered to the listener, per rule"),
        /// Matched packets passed untouched because no listener was there.
        no_listener: Counter("tproxy_rule_no_listener", "no listener",
            "Matched packets passed because no listener was there (fail-open), per rule"),
        /// Matched packets whose `bpf_sk_assign` failed; they passed untouched.
        assign_failed: Counter("tproxy_rule_assign_failed", "assign failed",
            "Matched packets whose bpf_sk_assign failed, per rule"),
    }
}

impl From<RuleStats> for RuleCounters {
    fn from(s: RuleStats) -> Self {
        let RuleStats { packets, bytes, new_flows, no_listener, assign_failed } = s;
        Self { packets, bytes, new_flows, no_listener, assign_failed }
    }
}

/// One rule and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleReport {
    /// The rule in its text form.
    pub rule: String,
    /// Its counters (beside `rule` in JSON).
    #[serde(flatten)]
    pub counters: RuleCounters,
}

/// Every counter of a running instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The instance's name.
    pub name: String,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// cgroups whose own connections are intercepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
    /// The datapath, all rules together.
    pub datapath: DatapathStats,
    /// Where steered flows go: "the relay", or "port 8080" for another
    /// program's listener.
    pub target: String,
    /// Each rule.
    pub rules: Vec<RuleReport>,
    /// The TCP relay; absent when steering to another program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpRelayCounters>,
    /// The UDP relay; absent when steering to another program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpRelayCounters>,
    /// Each upstream proxy (`--upstream`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<UpstreamReport>,
    /// The access log's entries written and dropped, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogCounters>,
    /// Drops and un-proxied passes by reason, from the counters above.
    #[serde(default)]
    pub reasons: Reasons,
}

impl StatsReport {
    /// Tables for people: the rules, then each layer's counters (name as in
    /// JSON, value, meaning), zeros left out unless `all`.
    pub fn to_table(&self, all: bool) -> String {
        let mut out = String::new();
        let mut places = self.interfaces.clone();
        places.extend(self.cgroups.iter().map(|c| format!("cgroup {c}")));
        let _ = writeln!(
            out,
            "instance {} on {}, steering to {}",
            self.name,
            places.join(", "),
            self.target
        );
        let width = self.rules.iter().map(|r| r.rule.len()).max().unwrap_or(4).max(4);
        let columns: Vec<usize> =
            RuleCounters::COUNTERS.iter().map(|c| c.words.len().max(12)).collect();
        let _ = write!(out, "\n{:width$}", "RULE");
        for (counter, w) in RuleCounters::COUNTERS.iter().zip(&columns) {
            let _ = write!(out, "  {:>w$}", counter.words.to_uppercase());
        }
        for r in &self.rules {
            let _ = write!(out, "\n{:width$}", r.rule);
            for (value, w) in r.counters.values().iter().zip(&columns) {
                let _ = write!(out, "  {value:>w$}");
            }
        }
        out.push('\n');
        let mut layers = vec![("DATAPATH", self.datapath.described())];
        if let Some(tcp) = &self.tcp {
            layers.push(("TCP RELAY", tcp.described()));
        }
        if let Some(udp) = &self.udp {
            layers.push(("UDP RELAY", udp.described()));
        }
        if let Some(log) = &self.access_log {
            layers.push(("ACCESS LOG", log.described()));
        }
        let shown = |v: u64| all || v != 0;
        let rows = layers.iter().flat_map(|(_, c)| c).filter(|(_, v)| shown(*v));
        let name_width = rows.clone().map(|(c, _)| c.name.len()).max().unwrap_or(0);
        let reasons = self.reasons.dropped.values().chain(self.reasons.passed.values());
        let value_width = rows
            .map(|(_, v)| *v)
            .chain(reasons.copied().filter(|v| shown(*v)))
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(1);
        let mut hidden = 0;
        for (title, counters) in &layers {
            let _ = writeln!(out, "\n{title}");
            for (counter, value) in counters {
                if !shown(*value) {
                    hidden += 1;
                    continue;
                }
                let name = counter.name;
                let _ =
                    writeln!(out, "  {name:name_width$}  {value:>value_width$}  {}", counter.words);
            }
        }
        for (title, counts, meanings) in [
            ("DROPPED", &self.reasons.dropped, DROP_REASONS),
            ("PASSED WITHOUT THE PROXY", &self.reasons.passed, PASS_REASONS),
        ] {
            let rows: Vec<_> = meanings
                .iter()
                .map(|(reason, meaning)| {
                    (reason, counts.get(*reason).copied().unwrap_or(0), meaning)
                })
                .filter(|(_, n, _)| shown(*n))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n{title}");
            let width = rows.iter().map(|(r, _, _)| r.len()).max().unwrap_or(0);
            for (reason, n, meaning) in rows {
                let _ = writeln!(out, "  {reason:width$}  {n:>value_width$}  {meaning}");
            }
        }
        if !self.upstreams.is_empty() {
            let _ = writeln!(out, "\nUPSTREAM");
            let width = self.upstreams.iter().map(|u| u.name.len()).max().unwrap_or(0);
            for u in &self.upstreams {
                let _ = writeln!(
                    out,
                    "  {:width$}  {} opened, {} failed  {}",
                    u.name, u.opened, u.failed, u.url
                );
            }
        }
        if hidden > 0 {
            let _ = writeln!(out, "\n({hidden} counters at 0 not shown; --all shows them)");
        }
        out
    }

    /// The Prometheus text format (0.0.4), every series labelled with the
    /// instance name.
    pub fn to_prometheus(&self) -> String {
        let mut registry = Registry::with_labels(
            [(Cow::Borrowed("instance"), Cow::Owned(self.name.clone()))].into_iter(),
        );
        registry.register_collector(Box::new(Snapshot(self.clone())));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// A [`StatsReport`] as a Prometheus collector.
#[derive(Debug)]
struct Snapshot(StatsReport);

type Labels = Vec<(&'static str, String)>;

impl Snapshot {
    fn counter(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        series: &[(Labels, u64)],
    ) -> Result<(), std::fmt::Error> {
        let metric = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
        for (labels, value) in series {
            ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: u64,
    ) -> Result<(), std::fmt::Error> {
        let metric = ConstGauge::new(value as i64);
        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let c = Self::counter;
        // Per rule: one family per counter, a series per rule.
        let values: Vec<Vec<u64>> = s.rules.iter().map(|r| r.counters.values()).collect();
        for (i, counter) in RuleCounters::COUNTERS.iter().enumerate() {
            let series: Vec<(Labels, u64)> = s
                .rules
                .iter()
                .zip(&values)
                .map(|(r, v)| (vec![("rule", r.rule.clone())], v[i]))
                .collect();
            c(&mut e, counter.metric, counter.help, &series)?;
        }
        // Families in the order first met; a family's series may be
        // declared apart (the datapath's `path` series are).
        let mut families: Vec<(&'static Counter, Vec<(Labels, u64)>)> = Vec::new();
        let relays = s
            .tcp
            .iter()
            .flat_map(|t| t.described())
            .chain(s.udp.iter().flat_map(|u| u.described()))
            .chain(s.access_log.iter().flat_map(|a| a.described()));
        let described = s.datapath.described().into_iter().chain(relays);
        for (counter, value) in described {
            let labels: Labels = counter.label.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
            match families.iter_mut().find(|(c, _)| c.metric == counter.metric) {
                Some((_, series)) => series.push((labels, value)),
                None => families.push((counter, vec![(labels, value)])),
            }
        }
        for (counter, series) in &families {
            match counter.kind {
                Kind::Counter => c(&mut e, counter.metric, counter.help, series)?,
                Kind::Gauge => Self::gauge(&mut e, counter.metric, counter.help, series[0].1)?,
            }
        }
        let by_reason = |counts: &std::collections::BTreeMap<String, u64>| -> Vec<(Labels, u64)> {
            counts.iter().map(|(r, n)| (vec![("reason", r.clone())], *n)).collect()
        };
        c(
            &mut e,
            "tproxy_drops",
            "Packets, flows and datagrams dropped or refused, by reason",
            &by_reason(&s.reasons.dropped),
        )?;
        c(
            &mut e,
            "tproxy_passed",
            "Intercepted traffic that went on without the proxy, by reason",
            &by_reason(&s.reasons.passed),
        )?;
        if !s.upstreams.is_empty() {
            let series = |value: fn(&UpstreamReport) -> u64| -> Vec<(Labels, u64)> {
                s.upstreams.iter().map(|u| (vec![("upstream", u.name.clone())], value(u))).collect()
            };
            c(
                &mut e,
                "tproxy_upstream_opened",
                "TCP connections and UDP associations opened through an upstream proxy",
                &series(|u| u.opened),
            )?;
            c(
                &mut e,
                "tproxy_upstream_failed",
                "Handshakes with an upstream proxy that failed (the client was reset)",
                &series(|u| u.failed),
            )?;
        }
        Ok(())
    }
}
