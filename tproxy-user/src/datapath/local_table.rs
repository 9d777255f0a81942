//! The host's own destinations, kept current in the datapath.
//!
//! Traffic to the host itself (its admin page on port 80, the dnsmasq that
//! serves its LAN on 53) is the host's, not the relay's, so the TC program
//! leaves every destination in the `LOCAL_DESTS` trie alone. The trie holds
//! every route of the kernel's `local` table: the host's addresses, and its
//! broadcast, anycast and multicast destinations, which is exactly what the
//! kernel itself delivers locally. Addresses come and go on a gateway (DHCP,
//! PPPoE), so a task follows rtnetlink's address events and the route events
//! of the `local` table, and brings the trie up to date after each. Only
//! the `local` table is dumped (strict checking asks the kernel to filter),
//! and other tables' route churn (a full BGP table, say) is ignored.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use std::time::Duration;

use aya::maps::{Array, LpmTrie, MapData, lpm_trie::Key};
use futures::StreamExt as _;
use ipnet::IpNet;
use netlink_packet_core::NetlinkPayload;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE},
    packet_route::{
        RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    },
};
use tokio::task::JoinHandle;
use tproxy_ebpf::{ADDR_KEY_FIXED_BITS, AddrKey, FAMILY_V4, FAMILY_V6, names};
use tracing::{debug, error, info};

use crate::{
    datapath::routing,
    error::{Error, Result},
    host::{netlink::Netlink, system},
};

/// The kernel's `local` routing table.
const LOCAL_TABLE: u32 = 255;

/// The datapath's maps of the host's own destinations.
pub struct LocalDests {
    /// The destinations, as prefixes.
    pub trie: LpmTrie<MapData, AddrKey, u8>,
    /// Non-zero tells the programs the trie may lack some (see
    /// `tproxy_ebpf::names::LOCAL_DESTS_INCOMPLETE`).
    pub incomplete: Array<MapData, u32>,
    /// Most entries the trie takes.
    pub capacity: u32,
}

/// Entries the trie is made with unless told: four times the host's
/// addresses and interfaces now (each puts a route or two in the `local`
/// table), so that an IPVS node with thousands of service addresses starts
/// and has room to grow, and never fewer than the program's default. The
/// trie allocates per entry, so room costs nothing until used.
pub fn default_capacity() -> u32 {
    let entries = nix::ifaddrs::getifaddrs().map(|a| a.count()).unwrap_or(0);
    capacity_for(entries)
}

fn capacity_for(entries: usize) -> u32 {
    let wanted = u32::try_from(entries.saturating_mul(4)).unwrap_or(u32::MAX).min(1 << 24);
    wanted.max(tproxy_ebpf::MAX_LOCAL_DESTS)
}

/// How often a trie left incomplete by an error is tried again, when no
/// event comes first.
const RETRY: Duration = Duration::from_secs(5);

/// Keeps the `LOCAL_DESTS` trie equal to the `local` table until dropped.
pub struct LocalTable {
    task: JoinHandle<()>,
}

impl LocalTable {
    /// Fills the trie now, then follows changes in the background. Failing
    /// to read the table fails the start (the host's own traffic would be
    /// steered); a table larger than the trie does not: the programs are
    /// told the trie is incomplete, and leave what it may lack to the host.
    pub async fn start(dests: LocalDests) -> Result<Self> {
        let groups =
            RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
        // Strict checking lets the kernel dump the one table asked for;
        // without it (old kernels) the dump is filtered here.
        let (netlink, mut events) = Netlink::subscribe(groups)?;
        let handle = netlink.handle.clone();
        let mut synced = Synced { dests, present: HashSet::new(), complete: true };
        match synced.sync(&handle).await {
            Ok(outcome) => synced.report(true, outcome),
            Err(e) => return Err(e),
        }
        let task = tokio::spawn(async move {
            loop {
                let relevant = if synced.complete {
                    let Some((event, _)) = events.next().await else { break };
                    concerns_local(&event.payload)
                } else {
                    tokio::select! {
                        event = events.next() => {
                            let Some((event, _)) = event else { break };
                            concerns_local(&event.payload)
                        }
                        _ = tokio::time::sleep(RETRY) => true,
                    }
                };
                // One resync covers a burst of events.
                let mut relevant = relevant;
                while let Ok((event, _)) = events.try_recv() {
                    relevant |= concerns_local(&event.payload);
                }
                if relevant {
                    let was_complete = synced.complete;
                    match synced.sync(&handle).await {
                        Ok(outcome) => synced.report(was_complete, outcome),
                        Err(e) if was_complete => error!(
                            "updating the host's own destinations: {e}; until it succeeds, what they may lack is left to the host"
                        ),
                        Err(e) => debug!("updating the host's own destinations: {e}"),
                    }
                }
            }
            let _ = synced.set_complete(false);
            error!(
                "rtnetlink events ended: the host's own destinations are no longer followed, and what they may lack is left to the host"
            );
            drop(netlink);
        });
        Ok(Self { task })
    }
}

impl Drop for LocalTable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The trie and what it holds.
struct Synced {
    dests: LocalDests,
    present: HashSet<IpNet>,
    /// What the programs were last told.
    complete: bool,
}

/// How a sync ended.
enum Outcome {
    Complete,
    /// The table has more destinations than the trie takes.
    Full {
        wanted: usize,
    },
}

impl Synced {
    /// Brings the trie up to the `local` table, as far as it fits. The
    /// programs are told it is complete only once it is.
    async fn sync(&mut self, handle: &Handle) -> Result<Outcome> {
        let now = match local_destinations(handle).await {
            Ok(now) => now,
            Err(e) => {
                self.set_complete(false)?;
                return Err(e);
            }
        };
        let map_err = |source| Error::Map { name: names::LOCAL_DESTS, source };
        let gone: Vec<IpNet> = self.present.difference(&now).copied().collect();
        for net in gone {
            if let Err(e) = self.dests.trie.remove(&key(&net)) {
                self.set_complete(false)?;
                return Err(map_err(e));
            }
            self.present.remove(&net);
            debug!("local destination removed: {net}");
        }
        let new: Vec<IpNet> = now.difference(&self.present).copied().collect();
        for net in new {
            if self.present.len() >= self.dests.capacity as usize {
                break;
            }
            if let Err(e) = self.dests.trie.insert(&key(&net), 1, 0) {
                self.set_complete(false)?;
                return Err(map_err(e));
            }
            self.present.insert(net);
            debug!("local destination added: {net}");
        }
        let complete = self.present.len() == now.len();
        self.set_complete(complete)?;
        Ok(if complete { Outcome::Complete } else { Outcome::Full { wanted: now.len() } })
    }

    /// Tells the programs whether the trie holds every local destination.
    fn set_complete(&mut self, complete: bool) -> Result<()> {
        let name = names::LOCAL_DESTS_INCOMPLETE;
        self.dests
            .incomplete
            .set(0, u32::from(!complete), 0)
            .map_err(|source| Error::Map { name, source })?;
        self.complete = complete;
        Ok(())
    }

    /// Logs a change of completeness.
    fn report(&self, was_complete: bool, outcome: Outcome) {
        match outcome {
            Outcome::Full { wanted } if was_complete => error!(
                "the host has {wanted} local destinations and the datapath holds {} (capacity {}; raise it with --local-destinations): intercepted packets to the others are checked against the kernel's routes one by one, and connections of --cgroup processes to them are left alone",
                self.present.len(),
                self.dests.capacity
            ),
            Outcome::Complete if !was_complete => {
                info!("the host's own destinations all fit in the datapath again")
            }
            _ => {}
        }
    }
}

/// Every destination of the `local` table.
async fn local_destinations(handle: &Handle) -> Result<HashSet<IpNet>> {
    let mut now = HashSet::new();
    for family in [IpVersion::V4, IpVersion::V6] {
        if family == IpVersion::V6 && !system::ipv6_enabled() {
            continue;
        }
        for route in local_routes(handle, family).await? {
            if routing::route_table(&route) == LOCAL_TABLE
                && let Some(net) = destination(&route)
            {
                now.insert(net);
            }
        }
    }
    Ok(now)
}

/// Whether an rtnetlink event can change the `local` table: an address
/// change, or a route change in that table.
fn concerns_local(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    match payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
        ) => true,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route),
        ) => routing::route_table(route) == LOCAL_TABLE,
        _ => false,
    }
}

/// The routes of the `local` table of `family` (with strict checking the
/// kernel sends no others).
async fn local_routes(handle: &Handle, family: IpVersion) -> Result<Vec<RouteMessage>> {
    use futures::TryStreamExt as _;
    let mut message = match family {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().table_id(LOCAL_TABLE).build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().table_id(LOCAL_TABLE).build(),
    };
    // Under strict checking every set header field filters the dump: only
    // the table may be set (the builder's defaults are `static` and
    // `unicast`, which local routes are not).
    message.header.protocol = RouteProtocol::Unspec;
    message.header.kind = RouteType::Unspec;
    handle
        .route()
        .get(message)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::Routing(format!("listing the local routing table: {e}")))
}

/// The route's destination prefix.
fn destination(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let addr = match (addr, route.header.address_family) {
        (Some(addr), _) => addr,
        (None, rtnetlink::packet_route::AddressFamily::Inet) => Ipv4Addr::UNSPECIFIED.into(),
        (None, rtnetlink::packet_route::AddressFamily::Inet6) => Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

fn key(net: &IpNet) -> Key<AddrKey> {
    let mut data = AddrKey { family: FAMILY_V4, _pad: [0; 3], addr: [0; 16] };
    match net.addr() {
        IpAddr::V4(a) => data.addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => {
            data.family = FAMILY_V6;
            data.addr = a.octets();
        }
    }
    Key::new(ADDR_KEY_FIXED_BITS + u32::from(net.prefix_len()), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacity_grows_with_the_host_from_the_default() {
        assert_eq!(capacity_for(0), tproxy_ebpf::MAX_LOCAL_DESTS);
        assert_eq!(capacity_for(100), tproxy_ebpf::MAX_LOCAL_DESTS);
        // An IPVS node with 50 000 service addresses.
        assert_eq!(capacity_for(50_000), 200_000);
        assert_eq!(capacity_for(usize::MAX), 1 << 24);
    }
}
