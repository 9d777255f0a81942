//! Clients counted by source, so that one source cannot take every slot:
//! a source is a client address cut to a prefix, as an IPv6 client holds a
//! whole /64 and can send from any address in it.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

/// How client addresses are grouped into sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePrefixes {
    /// IPv4 prefix length, 1 to 32.
    pub v4: u8,
    /// IPv6 prefix length, 1 to 128.
    pub v6: u8,
}

impl Default for SourcePrefixes {
    /// Each IPv4 address, and each IPv6 /64 (what one subscriber or host
    /// usually holds).
    fn default() -> Self {
        Self { v4: 32, v6: 64 }
    }
}

impl SourcePrefixes {
    /// The source `ip` belongs to: its prefix's first address. An
    /// IPv4-mapped address counts as IPv4.
    pub fn source_of(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4.min(32))).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6.min(128))).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

/// The per-source share of a bound: an eighth, so that at least eight
/// sources are needed to fill it.
pub fn default_share(bound: usize) -> usize {
    (bound / 8).max(1)
}

/// Slots held per source, for relays whose tasks take and give back slots
/// concurrently (TCP).
pub(super) struct PerSource {
    max: usize,
    prefixes: SourcePrefixes,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    pub fn new(max: usize, prefixes: SourcePrefixes) -> Self {
        Self { max, prefixes, held: Mutex::default() }
    }

    /// Takes a slot for `ip`'s source, unless it holds `max` already.
    pub fn take(&self, ip: IpAddr) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(self.prefixes.source_of(ip)).or_default();
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn give_back(&self, ip: IpAddr) {
        let source = self.prefixes.source_of(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&source);
            }
        }
    }
}

/// Entries held per source, oldest first, for a table with one owner (UDP
/// sessions): a source at its bound makes room by giving up its oldest
/// entry, so that it competes only with itself.
pub(super) struct SourceQueues<K> {
    max: usize,
    prefixes: SourcePrefixes,
    sources: HashMap<IpAddr, Queue<K>>,
}

struct Queue<K> {
    held: usize,
    /// Keys in the order they were added. Keys removed since stay until
    /// they reach the front or the queue is compacted.
    order: VecDeque<K>,
}

impl<K: Copy + PartialEq> SourceQueues<K> {
    pub fn new(max: usize, prefixes: SourcePrefixes) -> Self {
        Self { max, prefixes, sources: HashMap::new() }
    }

    /// The oldest entry `ip`'s source must give up before it adds one, if
    /// it is at its bound; `holds` says whether a key is still held.
    pub fn over(&mut self, ip: IpAddr, holds: impl Fn(&K) -> bool) -> Option<K> {
        let queue = self.sources.get_mut(&self.prefixes.source_of(ip))?;
        if queue.held < self.max {
            return None;
        }
        while let Some(key) = queue.order.pop_front() {
            if holds(&key) {
                return Some(key);
            }
        }
        None
    }

    /// `key`, of client `ip`, is added.
    pub fn added(&mut self, ip: IpAddr, key: K) {
        let queue = self
            .sources
            .entry(self.prefixes.source_of(ip))
            .or_insert_with(|| Queue { held: 0, order: VecDeque::new() });
        queue.held += 1;
        queue.order.push_back(key);
    }

    /// `key`, of client `ip`, is gone; `holds` says whether a key is still
    /// held, to drop the queue's stale keys now and then.
    pub fn removed(&mut self, ip: IpAddr, key: K, holds: impl Fn(&K) -> bool) {
        let source = self.prefixes.source_of(ip);
        let Some(queue) = self.sources.get_mut(&source) else { return };
        queue.held = queue.held.saturating_sub(1);
        if queue.held == 0 {
            self.sources.remove(&source);
        } else if queue.order.len() > 2 * queue.held + 16 {
            queue.order.retain(|k| *k != key && holds(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ones_as_ipv4() {
        let p = SourcePrefixes::default();
        assert_eq!(p.source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(p.source_of(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        assert_eq!(p.source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let wide = SourcePrefixes { v4: 24, v6: 128 };
        assert_eq!(wide.source_of(ip("192.0.2.7")), ip("192.0.2.0"));
        assert_eq!(wide.source_of(ip("2001:db8::5")), ip("2001:db8::5"));
        let whole = SourcePrefixes { v4: 0, v6: 0 };
        assert_eq!(whole.source_of(ip("192.0.2.7")), ip("0.0.0.0"));
    }

    #[test]
    fn a_source_takes_at_most_its_share() {
        let per = PerSource::new(2, SourcePrefixes::default());
        assert!(per.take(ip("2001:db8::1")));
        assert!(per.take(ip("2001:db8::2")));
        assert!(!per.take(ip("2001:db8::3")), "the same /64");
        assert!(per.take(ip("2001:db8:0:1::1")), "another /64");
        per.give_back(ip("2001:db8::1"));
        assert!(per.take(ip("2001:db8::3")));
    }

    #[test]
    fn a_source_at_its_bound_gives_up_its_oldest() {
        let mut queues = SourceQueues::new(2, SourcePrefixes::default());
        let mut held: Vec<u16> = Vec::new();
        for key in 1..=5u16 {
            if let Some(old) = queues.over(ip("192.0.2.2"), |k| held.contains(k)) {
                held.retain(|k| *k != old);
                queues.removed(ip("192.0.2.2"), old, |k| held.contains(k));
            }
            queues.added(ip("192.0.2.2"), key);
            held.push(key);
        }
        assert_eq!(held, [4, 5]);
        assert_eq!(queues.over(ip("192.0.2.3"), |_| true), None, "another source");
        // A key removed out of order is skipped, not given up twice.
        held.retain(|k| *k != 4);
        queues.removed(ip("192.0.2.2"), 4, |k| held.contains(k));
        assert_eq!(queues.over(ip("192.0.2.2"), |k| held.contains(k)), None);
        queues.added(ip("192.0.2.2"), 6);
        held.push(6);
        assert_eq!(queues.over(ip("192.0.2.2"), |k| held.contains(k)), Some(5));
    }

    #[test]
    fn stale_keys_do_not_pile_up() {
        let mut queues = SourceQueues::new(1000, SourcePrefixes::default());
        queues.added(ip("192.0.2.2"), 0u32);
        for key in 1..10_000u32 {
            queues.added(ip("192.0.2.2"), key);
            queues.removed(ip("192.0.2.2"), key, |k| *k == 0);
        }
        let queue = &queues.sources[&ip("192.0.2.2")];
        assert_eq!(queue.held, 1);
        assert!(queue.order.len() <= 18, "{}", queue.order.len());
    }
}
