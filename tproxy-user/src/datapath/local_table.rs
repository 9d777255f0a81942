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

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use futures::StreamExt as _;
use ipnet::IpNet;
use netlink_packet_core::NetlinkPayload;
use netlink_sys::{AsyncSocket as _, SocketAddr};
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
use tracing::{debug, warn};

use crate::{
    datapath::routing,
    error::{Error, Result},
    host::system,
};

/// The kernel's `local` routing table.
const LOCAL_TABLE: u32 = 255;

/// Keeps the `LOCAL_DESTS` trie equal to the `local` table until dropped.
pub struct LocalTable {
    task: JoinHandle<()>,
}

impl LocalTable {
    /// Fills the trie now (an error fails the start: without it the host's
    /// own traffic would be steered), then follows changes in the background.
    pub async fn start(map: LpmTrie<MapData, AddrKey, u8>) -> Result<Self> {
        let (mut connection, handle, mut events) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening rtnetlink", e))?;
        let groups =
            RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
        let socket = connection.socket_mut().socket_mut();
        socket
            .bind(&SocketAddr::new(0, groups))
            .map_err(|e| Error::io("subscribing to address and route events", e))?;
        // Lets the kernel dump the one table asked for; without it (old
        // kernels) the dump is filtered here.
        let _ = socket.set_netlink_get_strict_chk(true);
        let connection = tokio::spawn(connection);
        let mut synced = Synced { map, present: HashSet::new() };
        if let Err(e) = synced.sync(&handle).await {
            connection.abort();
            return Err(e);
        }
        let task = tokio::spawn(async move {
            while let Some((event, _)) = events.next().await {
                let mut relevant = concerns_local(&event.payload);
                // One resync covers a burst of events.
                while let Ok((event, _)) = events.try_recv() {
                    relevant |= concerns_local(&event.payload);
                }
                if relevant && let Err(e) = synced.sync(&handle).await {
                    warn!("updating the host's own destinations: {e}");
                }
            }
            warn!("rtnetlink events ended: the host's own destinations are no longer followed");
            connection.abort();
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
    map: LpmTrie<MapData, AddrKey, u8>,
    present: HashSet<IpNet>,
}

impl Synced {
    async fn sync(&mut self, handle: &Handle) -> Result<()> {
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
        let map_err = |source| Error::Map { name: names::LOCAL_DESTS, source };
        for gone in self.present.difference(&now) {
            self.map.remove(&key(gone)).map_err(map_err)?;
            debug!("local destination removed: {gone}");
        }
        for new in now.difference(&self.present) {
            self.map.insert(&key(new), 1, 0).map_err(map_err)?;
            debug!("local destination added: {new}");
        }
        self.present = now;
        Ok(())
    }
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
