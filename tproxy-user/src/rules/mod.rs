//! Interception rules: which traffic goes to the relay.
//!
//! A [`Rule`] names protocols, a destination port range, and optionally a
//! destination network, a source network and an exclusion.
//!
//! Which rule decides: of the rules on the packet's protocol and port whose
//! destination contains the packet's destination and whose source filter
//! matches its source, the one with the longest destination prefix, and
//! among those the one with the longest source prefix. So `tcp/80` plus
//! `tcp/80 to 198.51.100.5/32 exclude` intercepts port 80 everywhere but that
//! one host, and `80` plus `80 to 203.0.113.0/24 from 192.0.2.0/25 exclude`
//! intercepts traffic to 203.0.113.0/24 from every source but that one. A
//! rule whose source filter does not match has no say: the next broader
//! rule decides. [`RuleSet::intercepts`] states this in code.
//!
//! Rules compile to entries of the TC program's longest-prefix-match trie,
//! keyed by (family, protocol, port, destination prefix); each entry lists
//! the rules that can decide there, in order, and the first whose source
//! filter matches wins.
//!
//! The text form, used on the command line, by the control socket and in
//! config files, is
//!
//! ```text
//! [tcp|udp|tcp,udp/]PORT[-PORT] [to CIDR] [from CIDR] [via NAME|direct] [exclude]
//! ```
//!
//! for example `80`, `udp/53`, `tcp/8000-8099 to 203.0.113.0/24`,
//! `tcp/443 from 10.0.0.0/8`, `80 to 198.51.100.5 exclude`,
//! `tcp/443 to 10.0.0.0/8 via corp`. Without a protocol a rule covers TCP
//! and UDP; without `to` it covers every IPv4 and IPv6 destination. `via`
//! names the upstream proxy (`--upstream NAME=URL`) that the flows a rule
//! decides go through, and `via direct` none; without it they take the
//! default upstream, if there is one.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    ops::RangeInclusive,
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tproxy_ebpf::{
    ACTION_EXCLUDE, ACTION_INTERCEPT, FAMILY_V4, FAMILY_V6, MAX_RULE_ENTRIES, MAX_RULES, PROTO_TCP,
    PROTO_UDP, RULE_CHOICES, RULE_MATCH_FIXED_BITS, RuleAction, RuleChoice, RuleMatch,
};

use crate::error::{Error, Result};

/// A transport protocol that can be intercepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Both protocols, the default of a rule.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol {s:?} (expected tcp or udp)")),
        }
    }
}

/// What a rule does with the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Steer to the relay.
    #[default]
    Intercept,
    /// Leave alone, even where a shorter prefix intercepts.
    Exclude,
}

/// One interception rule. See the [module docs](self) for the text form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Protocols, sorted and without duplicates; never empty.
    pub protocols: Vec<Protocol>,
    /// Destination ports; never includes 0.
    pub ports: RangeInclusive<u16>,
    /// Destination network; `None` is every IPv4 and IPv6 destination.
    pub to: Option<IpNet>,
    /// Source network the rule is limited to; `None` is every source.
    pub from: Option<IpNet>,
    /// Intercept or exclude.
    pub action: Action,
    /// The named upstream proxy its flows go through ([`DIRECT`]: none);
    /// `None`: the default.
    pub via: Option<String>,
}

/// `via direct`: no upstream proxy, whatever the default.
pub const DIRECT: &str = "direct";

/// Whether `name` can name an upstream proxy: letters, digits, '-' and '_'.
pub fn is_upstream_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Rule {
    /// A rule that intercepts `protocols` to one destination port everywhere.
    pub fn port(protocols: &[Protocol], port: u16) -> Self {
        Self::ports(protocols, port..=port)
    }

    /// A rule that intercepts `protocols` to a port range everywhere.
    pub fn ports(protocols: &[Protocol], ports: RangeInclusive<u16>) -> Self {
        let mut protocols = protocols.to_vec();
        protocols.sort();
        protocols.dedup();
        Self { protocols, ports, to: None, from: None, action: Action::Intercept, via: None }
    }

    /// Checks the rule on its own: ports, protocols, address families.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Rule(format!("rule {self}: {msg}")));
        if self.protocols.is_empty() {
            return bad("no protocol".into());
        }
        if *self.ports.start() == 0 {
            return bad("port 0 cannot be intercepted".into());
        }
        if self.ports.start() > self.ports.end() {
            return bad("the port range is reversed".into());
        }
        if let (Some(to), Some(from)) = (self.to, self.from)
            && to.addr().is_ipv4() != from.addr().is_ipv4()
        {
            return bad("`to` and `from` are of different address families".into());
        }
        if let Some(via) = &self.via {
            if self.action == Action::Exclude {
                return bad("an excluded flow goes through no proxy: drop `via`".into());
            }
            if !is_upstream_name(via) {
                return bad(format!("upstream name {via:?}: use letters, digits, '-' or '_'"));
            }
        }
        Ok(())
    }

    /// Whether the rule's destination ports include `port`.
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// The destinations the rule covers, per family.
    fn destinations(&self) -> Vec<IpNet> {
        match (self.to, self.from) {
            (Some(to), _) => vec![to.trunc()],
            (None, Some(from)) if from.addr().is_ipv4() => vec!["0.0.0.0/0".parse().unwrap()],
            (None, Some(_)) => vec!["::/0".parse().unwrap()],
            (None, None) => vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        }
    }

    fn entry_count(&self) -> usize {
        self.protocols.len() * self.ports.len() * self.destinations().len()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.protocols.len() == 1 {
            write!(f, "{}/", self.protocols[0])?;
        }
        if self.ports.start() == self.ports.end() {
            write!(f, "{}", self.ports.start())?;
        } else {
            write!(f, "{}-{}", self.ports.start(), self.ports.end())?;
        }
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        if let Some(from) = self.from {
            write!(f, " from {from}")?;
        }
        if let Some(via) = &self.via {
            write!(f, " via {via}")?;
        }
        if self.action == Action::Exclude {
            f.write_str(" exclude")?;
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let bad = |msg: String| Error::Rule(format!("rule {text:?}: {msg}"));
        let mut words = text.split_whitespace();
        let head = words.next().ok_or_else(|| bad("empty rule".into()))?;
        let (protocols, ports) = match head.split_once('/') {
            Some((protos, ports)) => {
                let protocols = protos
                    .split(',')
                    .map(Protocol::from_str)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(bad)?;
                (protocols, ports)
            }
            None => (Protocol::ALL.to_vec(), head),
        };
        let ports = parse_ports(ports).map_err(bad)?;
        let mut rule = Rule::ports(&protocols, ports);
        while let Some(word) = words.next() {
            match word {
                "to" | "from" => {
                    let value =
                        words.next().ok_or_else(|| bad(format!("`{word}` needs a CIDR")))?;
                    let net = parse_net(value).map_err(bad)?;
                    let slot = if word == "to" { &mut rule.to } else { &mut rule.from };
                    if slot.replace(net).is_some() {
                        return Err(bad(format!("`{word}` given twice")));
                    }
                }
                "via" => {
                    let name = words.next().ok_or_else(|| bad("`via` needs a name".into()))?;
                    if rule.via.replace(name.to_owned()).is_some() {
                        return Err(bad("`via` given twice".into()));
                    }
                }
                "exclude" => rule.action = Action::Exclude,
                "intercept" => rule.action = Action::Intercept,
                other => {
                    return Err(bad(format!(
                        "unexpected {other:?} (expected `to CIDR`, `from CIDR`, `via NAME` or `exclude`)"
                    )));
                }
            }
        }
        rule.validate()?;
        Ok(rule)
    }
}

/// `80` or `8000-8099`.
pub fn parse_ports(text: &str) -> std::result::Result<RangeInclusive<u16>, String> {
    let port = |s: &str| -> std::result::Result<u16, String> {
        match s.trim().parse::<u32>() {
            Ok(0) => Err("port 0 cannot be intercepted".into()),
            Ok(p) if p <= 65535 => Ok(p as u16),
            Ok(p) => Err(format!("port {p} is out of range (1-65535)")),
            Err(_) => Err(format!("{s:?} is not a port")),
        }
    };
    let (start, end) = match text.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(text)?, port(text)?),
    };
    if start > end {
        return Err(format!("the port range {start}-{end} is reversed"));
    }
    Ok(start..=end)
}

/// A CIDR, or a bare address meaning a single host. Host bits must be zero,
/// so that a typo like `203.0.113.7/24` is not silently widened.
fn parse_net(text: &str) -> std::result::Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => return Err(format!("{text:?} is not an address or CIDR")),
        },
    };
    if net.trunc() != net {
        return Err(format!("{text} has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

/// One entry of the TC program's rule trie.
pub type TrieEntry = (u32, RuleMatch, RuleAction);

/// A validated set of rules, each with the id of its counters. Ids stay the
/// same for a rule that is kept across changes, so its counters continue.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: BTreeMap<u32, Rule>,
    /// The rules compiled for the datapath.
    entries: Vec<TrieEntry>,
}

impl RuleSet {
    /// Validates `rules` together: each on its own, no two covering the same
    /// (protocol, port, destination), and within the map sizes.
    pub fn new(rules: Vec<Rule>) -> Result<Self> {
        Self::default().replaced(rules)
    }

    /// The set that results from replacing this one's rules with `rules`:
    /// rules present in both keep their ids.
    pub fn replaced(&self, rules: Vec<Rule>) -> Result<Self> {
        let mut kept: HashMap<&Rule, u32> = self.rules.iter().map(|(id, r)| (r, *id)).collect();
        let mut ids: BTreeMap<u32, Rule> = BTreeMap::new();
        let mut fresh = Vec::new();
        for rule in rules {
            rule.validate()?;
            match kept.remove(&rule) {
                Some(id) => {
                    ids.insert(id, rule);
                }
                None if ids.values().chain(&fresh).any(|r| *r == rule) => {
                    return Err(Error::Rule(format!("rule {rule}: given twice")));
                }
                None => fresh.push(rule),
            }
        }
        for rule in fresh {
            let id = (0..MAX_RULES)
                .find(|id| !ids.contains_key(id))
                .ok_or_else(|| Error::Rule(format!("too many rules (at most {MAX_RULES})")))?;
            ids.insert(id, rule);
        }
        let mut set = Self { rules: ids, entries: Vec::new() };
        set.check_overlaps()?;
        set.entries = set.compile()?;
        Ok(set)
    }

    /// This set plus `rule`.
    pub fn with(&self, rule: Rule) -> Result<Self> {
        let mut rules: Vec<Rule> = self.rules.values().cloned().collect();
        rules.push(rule);
        self.replaced(rules)
    }

    /// This set without `rule`; an error if it is not there.
    pub fn without(&self, rule: &Rule) -> Result<Self> {
        if !self.rules.values().any(|r| r == rule) {
            return Err(Error::Rule(format!("rule {rule}: no such rule")));
        }
        let rules = self.rules.values().filter(|r| *r != rule).cloned().collect();
        self.replaced(rules)
    }

    /// The rules with their counter ids, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Rule)> {
        self.rules.iter().map(|(id, rule)| (*id, rule))
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The (protocol, port) pairs that some intercepting rule uses.
    pub fn gated_ports(&self) -> impl Iterator<Item = (Protocol, u16)> + '_ {
        self.rules.values().filter(|r| r.action == Action::Intercept).flat_map(|r| {
            r.protocols.iter().flat_map(move |p| r.ports.clone().map(move |port| (*p, port)))
        })
    }

    /// Every trie entry, as (prefix length, key data, value).
    pub fn entries(&self) -> &[TrieEntry] {
        &self.entries
    }

    fn check_overlaps(&self) -> Result<()> {
        let total: usize = self.rules.values().map(Rule::entry_count).sum();
        if total > MAX_RULE_ENTRIES as usize {
            return Err(Error::Rule(format!(
                "the rules need {total} trie entries, more than the {MAX_RULE_ENTRIES} the map holds; use fewer or narrower port ranges"
            )));
        }
        // Two rules on the same (protocol, port, destination, source) would
        // have the same say; which one decides would be arbitrary.
        let rules: Vec<(&u32, &Rule)> = self.rules.iter().collect();
        for (i, (_, a)) in rules.iter().enumerate() {
            for (_, b) in &rules[i + 1..] {
                let same_dest = a.destinations().iter().any(|d| b.destinations().contains(d));
                let same_proto = a.protocols.iter().any(|p| b.protocols.contains(p));
                let ports_meet =
                    a.ports.start() <= b.ports.end() && b.ports.start() <= a.ports.end();
                if same_dest && a.from == b.from && same_proto && ports_meet {
                    return Err(Error::Rule(format!(
                        "rule {b} overlaps rule {a} (same protocol, port, destination and source); merge them or narrow one"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether a packet of `proto` from `src` to `dst`:`port` is
    /// intercepted (see the [module docs](self) for which rule decides).
    pub fn intercepts(&self, proto: Protocol, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        self.deciding(proto, src, dst, port).is_some_and(|r| r.action == Action::Intercept)
    }

    /// The rule that decides for a packet of `proto` from `src` to
    /// `dst`:`port`, if any does.
    pub fn deciding(&self, proto: Protocol, src: IpAddr, dst: IpAddr, port: u16) -> Option<&Rule> {
        let mut best: Option<((u8, u8), &Rule)> = None;
        for rule in self.rules.values() {
            if !rule.protocols.contains(&proto) || !rule.covers_port(port) {
                continue;
            }
            let Some(dest) = rule.destinations().into_iter().find(|d| d.contains(&dst)) else {
                continue;
            };
            if rule.from.is_some_and(|from| !from.contains(&src)) {
                continue;
            }
            let rank = (dest.prefix_len(), rule.from.map_or(0, |f| f.prefix_len()));
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, rule));
            }
        }
        best.map(|(_, rule)| rule)
    }

    /// The trie entries: for each (family, protocol, port) and each
    /// destination some rule names there, the rules that can decide for
    /// that destination, in precedence order.
    fn compile(&self) -> Result<Vec<TrieEntry>> {
        // (family, protocol, port) -> (destination, source, choice).
        type Member = (IpNet, Option<IpNet>, RuleChoice);
        let mut groups: BTreeMap<(u8, u8, u16), Vec<Member>> = BTreeMap::new();
        for (id, rule) in &self.rules {
            let choice = choice_of(*id, rule);
            for proto in &rule.protocols {
                for port in rule.ports.clone() {
                    for dest in rule.destinations() {
                        let family = if dest.addr().is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
                        groups
                            .entry((family, proto.number(), port))
                            .or_default()
                            .push((dest, rule.from, choice));
                    }
                }
            }
        }
        let mut entries = Vec::new();
        for ((family, proto, port), members) in groups {
            let mut dests: Vec<IpNet> = members.iter().map(|(d, _, _)| *d).collect();
            dests.sort();
            dests.dedup();
            for dest in dests {
                let mut covering: Vec<&Member> =
                    members.iter().filter(|(d, _, _)| d.contains(&dest)).collect();
                covering.sort_by_key(|(d, from, _)| {
                    std::cmp::Reverse((d.prefix_len(), from.map_or(0, |f| f.prefix_len())))
                });
                // A choice that matches every source ends the list.
                let end = covering
                    .iter()
                    .position(|(_, from, _)| from.is_none_or(|f| f.prefix_len() == 0))
                    .map_or(covering.len(), |i| i + 1);
                if end > RULE_CHOICES {
                    let port_text =
                        format!("{}/{port}", if proto == PROTO_TCP { "tcp" } else { "udp" });
                    return Err(Error::Rule(format!(
                        "more than {RULE_CHOICES} rules with source filters apply to {port_text} to {dest}; merge some of them"
                    )));
                }
                let mut value = RuleAction { len: end as u32, ..RuleAction::default() };
                for (slot, (_, _, choice)) in value.choices.iter_mut().zip(&covering[..end]) {
                    *slot = *choice;
                }
                let mut addr = [0u8; 16];
                match dest.addr() {
                    IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
                    IpAddr::V6(a) => addr = a.octets(),
                }
                let data = RuleMatch { family, proto, port: port.to_be_bytes(), addr };
                entries.push((RULE_MATCH_FIXED_BITS + dest.prefix_len() as u32, data, value));
            }
        }
        Ok(entries)
    }
}

fn choice_of(id: u32, rule: &Rule) -> RuleChoice {
    let (src_mask, src) = match rule.from {
        Some(net) => (addr_words(net.netmask()), addr_words(net.network())),
        None => ([0; 4], [0; 4]),
    };
    RuleChoice {
        rule_id: id,
        action: match rule.action {
            Action::Intercept => ACTION_INTERCEPT,
            Action::Exclude => ACTION_EXCLUDE,
        },
        src_mask,
        src,
    }
}

/// An address as the program sees it: network-order words, IPv4 in `[0]`.
fn addr_words(addr: IpAddr) -> [u32; 4] {
    let mut words = [0u32; 4];
    match addr {
        IpAddr::V4(a) => words[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (word, chunk) in words.iter_mut().zip(a.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes(chunk.try_into().unwrap());
            }
        }
    }
    words
}

#[cfg(test)]
mod tests;
