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

use crate::{
    counters::{Counter, Kind, Snapshot as _},
    datapath::DatapathStats,
    relay::{TcpRelayCounters, UdpRelayCounters},
};

/// The counters of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleReport {
    /// The rule in its text form.
    pub rule: String,
    /// Packets this rule steered: the first of each flow (and SYN-cookie
    /// ACKs). Later packets go to their flow's socket without a rule lookup.
    pub packets: u64,
    /// Bytes of those packets, as seen at TC ingress.
    pub bytes: u64,
    /// New flows handed to the relay (TCP connections, UDP datagrams to the relay's socket).
    pub new_flows: u64,
    /// Matched packets passed untouched because the relay's socket was gone.
    pub no_listener: u64,
    /// Matched packets whose `bpf_sk_assign` failed; they passed untouched.
    pub assign_failed: u64,
}

/// Every counter of a running instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// The instance's name.
    pub name: String,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// The datapath, all rules together.
    pub datapath: DatapathStats,
    /// Each rule.
    pub rules: Vec<RuleReport>,
    /// The TCP relay.
    pub tcp: TcpRelayCounters,
    /// The UDP relay.
    pub udp: UdpRelayCounters,
}

impl StatsReport {
    /// A table for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "instance {} on {}", self.name, self.interfaces.join(", "));
        let width = self.rules.iter().map(|r| r.rule.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(
            out,
            "\n{:width$}  {:>12}  {:>14}  {:>10}  {:>11}  {:>13}",
            "RULE", "PACKETS", "BYTES", "NEW FLOWS", "NO LISTENER", "ASSIGN FAILED"
        );
        for r in &self.rules {
            let _ = writeln!(
                out,
                "{:width$}  {:>12}  {:>14}  {:>10}  {:>11}  {:>13}",
                r.rule, r.packets, r.bytes, r.new_flows, r.no_listener, r.assign_failed
            );
        }
        let _ = writeln!(out, "\ndatapath   {}", self.datapath.summary());
        let _ = writeln!(out, "tcp relay  {}", self.tcp.summary());
        let _ = writeln!(out, "udp relay  {}", self.udp.summary());
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
        let per_rule = |f: fn(&RuleReport) -> u64| -> Vec<(Labels, u64)> {
            s.rules.iter().map(|r| (vec![("rule", r.rule.clone())], f(r))).collect()
        };
        let c = Self::counter;
        c(
            &mut e,
            "tproxy_rule_packets",
            "Packets a rule steered (the first of each flow), per rule",
            &per_rule(|r| r.packets),
        )?;
        c(
            &mut e,
            "tproxy_rule_bytes",
            "Bytes of steered packets, per rule",
            &per_rule(|r| r.bytes),
        )?;
        c(
            &mut e,
            "tproxy_rule_new_flows",
            "New flows steered to the relay, per rule",
            &per_rule(|r| r.new_flows),
        )?;
        c(
            &mut e,
            "tproxy_rule_no_listener",
            "Matched packets passed because the relay's socket was gone (fail-open), per rule",
            &per_rule(|r| r.no_listener),
        )?;
        c(
            &mut e,
            "tproxy_rule_assign_failed",
            "Matched packets whose bpf_sk_assign failed, per rule",
            &per_rule(|r| r.assign_failed),
        )?;
        // Families in the order first met; a family's series may be
        // declared apart (the datapath's `path` series are).
        let mut families: Vec<(&'static Counter, Vec<(Labels, u64)>)> = Vec::new();
        let described =
            [s.datapath.described(), s.tcp.described(), s.udp.described()].into_iter().flatten();
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
        Ok(())
    }
}
