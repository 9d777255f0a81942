//! The rule grammar and matching, by example.

use super::*;

#[test]
fn via_names_an_upstream() {
    let rule: Rule = "tcp/443 to 10.0.0.0/8 via corp".parse().unwrap();
    assert_eq!(rule.via.as_deref(), Some("corp"));
    assert_eq!(rule.to_string(), "tcp/443 to 10.0.0.0/8 via corp");
    assert!("80 via corp exclude".parse::<Rule>().is_err());
    assert!("80 via".parse::<Rule>().is_err());
    assert!("80 via a via b".parse::<Rule>().is_err());
    assert!("80 via c/d".parse::<Rule>().is_err());
    // The same match with another upstream overlaps.
    let set = RuleSet::new(vec!["80 via a".parse().unwrap(), "80".parse().unwrap()]);
    assert!(set.is_err());
}

fn rule(text: &str) -> Rule {
    text.parse().unwrap()
}

#[test]
fn text_form_round_trips() {
    for text in [
        "80",
        "tcp/80",
        "udp/53",
        "tcp/8000-8099 to 203.0.113.0/24",
        "tcp/443 from 10.0.0.0/8",
        "80 to 198.51.100.5/32 exclude",
        "udp/53 to 2001:db8::/32 from 2001:db8:1::/48",
    ] {
        assert_eq!(rule(text).to_string(), text);
    }
    assert_eq!(rule("tcp,udp/80").to_string(), "80");
    assert_eq!(rule("UDP,tcp/80 to 198.51.100.5").to_string(), "80 to 198.51.100.5/32");
}

#[test]
fn bad_rules_say_why() {
    for (text, why) in [
        ("", "empty rule"),
        ("0", "port 0"),
        ("65536", "out of range"),
        ("90-80", "reversed"),
        ("sctp/80", "unknown protocol"),
        ("80 to 10.0.0.1/8", "host bits set"),
        ("80 to nowhere", "not an address"),
        ("80 to", "needs a CIDR"),
        ("80 to 10.0.0.0/8 to 11.0.0.0/8", "given twice"),
        ("80 to 10.0.0.0/8 from 2001:db8::/32", "different address families"),
        ("80 sideways", "unexpected"),
    ] {
        let err = text.parse::<Rule>().unwrap_err().to_string();
        assert!(err.contains(why), "{text:?}: {err}");
    }
}

#[test]
fn overlapping_rules_are_refused() {
    let err = RuleSet::new(vec![rule("tcp/80-90"), rule("85")]).unwrap_err().to_string();
    assert!(err.contains("overlaps"), "{err}");
    // A more specific destination is not an overlap: it is how exclusions work.
    RuleSet::new(vec![rule("80"), rule("80 to 198.51.100.5/32 exclude")]).unwrap();
    // Different protocols on the same port do not overlap.
    RuleSet::new(vec![rule("tcp/80"), rule("udp/80 to 203.0.113.0/24")]).unwrap();
    let err = RuleSet::new(vec![rule("80"), rule("80")]).unwrap_err().to_string();
    assert!(err.contains("given twice"), "{err}");
}

#[test]
fn ids_are_kept_for_kept_rules() {
    let set = RuleSet::new(vec![rule("80"), rule("443"), rule("udp/53")]).unwrap();
    let id_of = |set: &RuleSet, text: &str| {
        set.iter().find(|(_, r)| **r == rule(text)).map(|(id, _)| id).unwrap()
    };
    let id_53 = id_of(&set, "udp/53");
    let smaller = set.without(&rule("443")).unwrap();
    assert_eq!(id_of(&smaller, "udp/53"), id_53);
    let bigger = smaller.with(rule("8080")).unwrap();
    assert_eq!(id_of(&bigger, "udp/53"), id_53);
    assert_eq!(id_of(&bigger, "8080"), id_of(&set, "443"), "a freed id is reused");
    assert!(set.without(&rule("9999")).is_err());
}

#[test]
fn entries_cover_each_protocol_port_and_family() {
    let set = RuleSet::new(vec![rule("80-81"), rule("tcp/443 to 203.0.113.0/24")]).unwrap();
    let entries = set.entries();
    // 2 protocols x 2 ports x 2 families, plus one.
    assert_eq!(entries.len(), 9);
    let (len, data, value) =
        entries.iter().find(|(_, d, _)| d.port == 443u16.to_be_bytes()).unwrap();
    assert_eq!(*len, 32 + 24);
    assert_eq!(data.family, FAMILY_V4);
    assert_eq!(&data.addr[..4], &[203, 0, 113, 0]);
    assert_eq!((value.len, value.choices[0].action), (1, ACTION_INTERCEPT));
    let gated: Vec<_> = set.gated_ports().collect();
    assert_eq!(gated.len(), 5);
}

#[test]
fn source_filter_limits_the_family() {
    let set = RuleSet::new(vec![rule("udp/53 from 10.0.0.0/8")]).unwrap();
    let entries = set.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.family, FAMILY_V4);
    assert_eq!(entries[0].2.choices[0].src_mask[0].to_ne_bytes(), [255, 0, 0, 0]);
    assert_eq!(entries[0].2.choices[0].src[0].to_ne_bytes(), [10, 0, 0, 0]);
}

#[test]
fn too_many_entries_are_refused() {
    // Every port of both protocols in both families fits...
    RuleSet::new(vec![rule("1-65535")]).unwrap();
    // ...but not once more.
    let err = RuleSet::new(vec![rule("1-65535"), rule("tcp/1-65535 to 203.0.113.0/24")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("trie entries"), "{err}");
}

/// What the TC program does with the entries: longest destination
/// prefix, then the first choice whose source matches.
fn datapath_verdict(set: &RuleSet, proto: Protocol, src: IpAddr, dst: IpAddr, port: u16) -> bool {
    let family = if dst.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
    let best = set
        .entries()
        .iter()
        .filter(|(_, d, _)| {
            d.family == family && d.proto == proto.number() && d.port == port.to_be_bytes()
        })
        .filter(|(len, d, _)| {
            let bits = (len - RULE_MATCH_FIXED_BITS) as u8;
            let addr = match dst {
                IpAddr::V4(_) => IpAddr::from(<[u8; 4]>::try_from(&d.addr[..4]).unwrap()),
                IpAddr::V6(_) => IpAddr::from(d.addr),
            };
            IpNet::new(addr, bits).unwrap().contains(&dst)
        })
        .max_by_key(|(len, _, _)| *len);
    let Some((_, _, value)) = best else { return false };
    for choice in &value.choices[..value.len as usize] {
        let prefix_len = choice.src_mask.iter().map(|w| w.count_ones()).sum::<u32>() as u8;
        let from = match src {
            IpAddr::V4(_) => IpNet::new(IpAddr::from(choice.src[0].to_ne_bytes()), prefix_len),
            IpAddr::V6(_) => {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(choice.src) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpNet::new(IpAddr::from(octets), prefix_len)
            }
        }
        .unwrap();
        if from.contains(&src) {
            return choice.action == ACTION_INTERCEPT;
        }
    }
    false
}

#[test]
fn a_source_filter_that_does_not_match_leaves_the_broader_rule_in_force() {
    let set =
        RuleSet::new(vec![rule("80"), rule("80 to 203.0.113.0/24 from 192.0.2.0/25")]).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    for (src, dst, want) in [
        ("192.0.2.2", "203.0.113.5", true),   // the narrow rule
        ("192.0.2.200", "203.0.113.5", true), // its source fails: the broad rule
        ("192.0.2.200", "198.51.100.10", true),
    ] {
        assert_eq!(set.intercepts(Protocol::Tcp, ip(src), ip(dst), 80), want, "{src} {dst}");
        assert_eq!(datapath_verdict(&set, Protocol::Tcp, ip(src), ip(dst), 80), want);
    }
    // An exclusion for some sources only.
    let set =
        RuleSet::new(vec![rule("80"), rule("80 to 203.0.113.0/24 from 192.0.2.0/25 exclude")])
            .unwrap();
    assert!(!set.intercepts(Protocol::Tcp, ip("192.0.2.2"), ip("203.0.113.5"), 80));
    assert!(set.intercepts(Protocol::Tcp, ip("192.0.2.200"), ip("203.0.113.5"), 80));
    assert!(!datapath_verdict(&set, Protocol::Tcp, ip("192.0.2.2"), ip("203.0.113.5"), 80));
    assert!(datapath_verdict(&set, Protocol::Tcp, ip("192.0.2.200"), ip("203.0.113.5"), 80));
}

#[test]
fn same_destination_with_different_sources_is_no_overlap() {
    RuleSet::new(vec![rule("80"), rule("80 from 10.0.0.0/8 exclude")]).unwrap();
    let err = RuleSet::new(vec![rule("80 from 10.0.0.0/8"), rule("tcp/80 from 10.0.0.0/8")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlaps"), "{err}");
    let many: Vec<Rule> = (0..5).map(|i| rule(&format!("80 from 10.{i}.0.0/16"))).collect();
    let err = RuleSet::new(many).unwrap_err().to_string();
    assert!(err.contains("more than 4 rules"), "{err}");
}

/// The compiled entries decide exactly as the stated semantics, on
/// random rule sets and packets (seeded, so a failure reproduces).
#[test]
fn compiled_entries_agree_with_the_semantics() {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let nets = ["203.0.113.0/24", "203.0.113.0/25", "203.0.113.128/26", "203.0.113.7/32"];
    let sources = ["192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/25", "192.0.2.2/32"];
    for _ in 0..300 {
        let mut rules = Vec::new();
        for _ in 0..1 + next(4) {
            let mut text = format!("tcp/{}", 80 + next(2));
            if next(3) > 0 {
                text += &format!(" to {}", nets[next(4) as usize]);
            }
            if next(2) == 0 {
                text += &format!(" from {}", sources[next(4) as usize]);
            }
            if next(3) == 0 {
                text += " exclude";
            }
            rules.push(rule(&text));
        }
        let Ok(set) = RuleSet::new(rules.clone()) else { continue };
        for _ in 0..20 {
            let src: IpAddr = format!("192.0.2.{}", next(256)).parse().unwrap();
            let dst: IpAddr = format!("203.0.113.{}", next(256)).parse().unwrap();
            let port = 80 + next(2) as u16;
            assert_eq!(
                set.intercepts(Protocol::Tcp, src, dst, port),
                datapath_verdict(&set, Protocol::Tcp, src, dst, port),
                "{rules:?}: {src} -> {dst}:{port}"
            );
        }
    }
}
