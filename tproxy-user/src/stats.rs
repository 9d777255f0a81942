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
    datapath::DatapathStats,
    relay::{TcpRelayCounters, UdpRelayCounters},
};

/// The counters of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleReport {
    /// The rule in its text form.
    pub rule: String,
    /// Packets steered to the relay.
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
        let d = &self.datapath;
        let _ = writeln!(
            out,
            "\ndatapath   {} to the listener, {} to existing sockets, {} to spoofed sockets, {} left to this host, {} ICMP errors to sockets, {} unparsed passed, {} unparsed dropped, {} without a listener, {} assign failures, {} SYNs met TIME_WAIT ({} handed over)",
            d.to_listener,
            d.to_socket,
            d.return_path,
            d.to_host,
            d.icmp_to_socket,
            d.unparsed_passed,
            d.unparsed_dropped,
            d.no_listener,
            d.assign_failed,
            d.tw_syn,
            d.tw_handover
        );
        let t = &self.tcp;
        let _ = writeln!(
            out,
            "tcp relay  {} connections ({} active), {} bytes up, {} bytes down, {} upstream failures ({} timeouts), {} idle timeouts, {} aborted, {} refused loops, {} refused local, {} refused per source",
            t.accepted,
            t.active,
            t.bytes_to_upstream,
            t.bytes_to_client,
            t.upstream_failures,
            t.connect_timeouts,
            t.idle_timeouts,
            t.aborted,
            t.refused_loops,
            t.refused_local,
            t.refused_per_source
        );
        let u = &self.udp;
        let _ = writeln!(
            out,
            "udp relay  {} sessions ({} active, {} expired, {} evicted), {} datagrams up ({} bytes), {} down ({} bytes), {} truncated, {} upstream failures, {} refused loops, {} refused local",
            u.sessions_total,
            u.sessions_active,
            u.sessions_expired,
            u.sessions_evicted,
            u.datagrams_up,
            u.bytes_up,
            u.datagrams_down,
            u.bytes_down,
            u.truncated,
            u.upstream_failures,
            u.refused_loops,
            u.refused_local
        );
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
        let none = Labels::new;
        let per_rule = |f: fn(&RuleReport) -> u64| -> Vec<(Labels, u64)> {
            s.rules.iter().map(|r| (vec![("rule", r.rule.clone())], f(r))).collect()
        };
        let c = Self::counter;
        c(
            &mut e,
            "tproxy_rule_packets",
            "Packets steered to the relay, per rule",
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
        let d = &s.datapath;
        let path = |p: &str, v: u64| (vec![("path", p.to_owned())], v);
        c(
            &mut e,
            "tproxy_datapath_packets",
            "Packets steered by the TC program, by where they went",
            &[
                path("listener", d.to_listener),
                path("socket", d.to_socket),
                path("spoofed_socket", d.return_path),
            ],
        )?;
        c(
            &mut e,
            "tproxy_datapath_to_host",
            "Packets on intercepted ports to this host's own destinations, left to the host",
            &[(none(), d.to_host)],
        )?;
        c(
            &mut e,
            "tproxy_datapath_icmp_to_socket",
            "ICMP errors about packets of the relay's sockets, delivered to them",
            &[(none(), d.icmp_to_socket)],
        )?;
        c(
            &mut e,
            "tproxy_datapath_unparsed",
            "Packets possibly for an intercepted port that could not be parsed whole, by what was done",
            &[
                (vec![("action", "pass".to_owned())], d.unparsed_passed),
                (vec![("action", "drop".to_owned())], d.unparsed_dropped),
            ],
        )?;
        c(
            &mut e,
            "tproxy_datapath_no_listener",
            "Matched packets passed without a relay socket",
            &[(none(), d.no_listener)],
        )?;
        c(
            &mut e,
            "tproxy_datapath_assign_failed",
            "bpf_sk_assign failures",
            &[(none(), d.assign_failed)],
        )?;
        c(
            &mut e,
            "tproxy_datapath_time_wait_syns",
            "SYNs that met a TIME_WAIT socket",
            &[(none(), d.tw_syn)],
        )?;
        c(
            &mut e,
            "tproxy_datapath_time_wait_handovers",
            "Of those, handed to the relay's listener",
            &[(none(), d.tw_handover)],
        )?;

        let t = &s.tcp;
        let dir = |d: &str, v: u64| (vec![("direction", d.to_owned())], v);
        c(
            &mut e,
            "tproxy_tcp_connections",
            "TCP connections accepted by the relay",
            &[(none(), t.accepted)],
        )?;
        Self::gauge(
            &mut e,
            "tproxy_tcp_connections_active",
            "TCP connections being relayed",
            t.active,
        )?;
        c(
            &mut e,
            "tproxy_tcp_bytes",
            "TCP bytes relayed",
            &[dir("up", t.bytes_to_upstream), dir("down", t.bytes_to_client)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_upstream_failures",
            "Upstream TCP connects that failed",
            &[(none(), t.upstream_failures)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_connect_timeouts",
            "Upstream TCP connects that timed out",
            &[(none(), t.connect_timeouts)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_refused_loops",
            "TCP connections to the relay itself, refused",
            &[(none(), t.refused_loops)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_refused_local",
            "TCP connections to this host, refused",
            &[(none(), t.refused_local)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_refused_per_source",
            "TCP connections reset because their client held its most connections",
            &[(none(), t.refused_per_source)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_idle_timeouts",
            "TCP connections reset after the idle timeout",
            &[(none(), t.idle_timeouts)],
        )?;
        c(
            &mut e,
            "tproxy_tcp_aborted",
            "TCP connections ended by a reset or error, passed on",
            &[(none(), t.aborted)],
        )?;

        let u = &s.udp;
        c(&mut e, "tproxy_udp_sessions", "UDP sessions opened", &[(none(), u.sessions_total)])?;
        Self::gauge(&mut e, "tproxy_udp_sessions_active", "UDP sessions open", u.sessions_active)?;
        c(
            &mut e,
            "tproxy_udp_sessions_expired",
            "UDP sessions closed after the idle timeout",
            &[(none(), u.sessions_expired)],
        )?;
        c(
            &mut e,
            "tproxy_udp_sessions_evicted",
            "UDP sessions evicted because the table was full",
            &[(none(), u.sessions_evicted)],
        )?;
        c(
            &mut e,
            "tproxy_udp_datagrams",
            "UDP datagrams relayed",
            &[dir("up", u.datagrams_up), dir("down", u.datagrams_down)],
        )?;
        c(
            &mut e,
            "tproxy_udp_bytes",
            "UDP payload bytes relayed",
            &[dir("up", u.bytes_up), dir("down", u.bytes_down)],
        )?;
        c(
            &mut e,
            "tproxy_udp_truncated",
            "UDP datagrams dropped for being larger than the buffer",
            &[(none(), u.truncated)],
        )?;
        c(
            &mut e,
            "tproxy_udp_upstream_failures",
            "UDP sessions that could not open, and failed sends",
            &[(none(), u.upstream_failures)],
        )?;
        c(
            &mut e,
            "tproxy_udp_refused_loops",
            "UDP datagrams to the relay itself, dropped",
            &[(none(), u.refused_loops)],
        )?;
        c(
            &mut e,
            "tproxy_udp_refused_local",
            "UDP datagrams to this host, dropped",
            &[(none(), u.refused_local)],
        )?;
        Ok(())
    }
}
