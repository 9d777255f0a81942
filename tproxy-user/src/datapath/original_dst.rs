//! The destinations that sockets of the host's own processes asked for
//! before the cgroup hooks sent them to the relay's loopback sockets
//! (`--cgroup`), as the relay finds them: the client socket's cookie from
//! the socket table, then the hooks' map.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use aya::maps::{HashMap, MapData};
use tproxy_ebpf::{FAMILY_V4, SockDst};

use crate::{host::sock_diag, rules::Protocol};

/// The hooks' record of original destinations, shared by the relays.
#[derive(Clone)]
pub struct OriginalDsts(Arc<HashMap<MapData, u64, SockDst>>);

impl std::fmt::Debug for OriginalDsts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginalDsts")
    }
}

impl OriginalDsts {
    pub(crate) fn new(map: HashMap<MapData, u64, SockDst>) -> Self {
        Self(Arc::new(map))
    }

    /// Where the client at `client`, connected (or sending) to the relay's
    /// loopback socket `relay`, meant to go.
    pub fn of(
        &self,
        proto: Protocol,
        client: SocketAddr,
        relay: SocketAddr,
    ) -> io::Result<SocketAddr> {
        let cookie = sock_diag::cookie(proto.number(), client, relay)?;
        let dst = self.0.get(&cookie, 0).map_err(|e| match e {
            aya::maps::MapError::KeyNotFound => io::Error::new(
                io::ErrorKind::NotFound,
                format!("no original destination recorded for {client}"),
            ),
            e => io::Error::other(e),
        })?;
        Ok(socket_addr(&dst))
    }
}

/// The address a [`SockDst`] holds; an IPv4-mapped one as plain IPv4, the
/// family the relay dials it with.
fn socket_addr(dst: &SockDst) -> SocketAddr {
    let port = u16::from_be(dst.port as u16);
    let ip = if dst.family == u32::from(FAMILY_V4) {
        IpAddr::V4(Ipv4Addr::from(dst.addr[0].to_ne_bytes()))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in dst.addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
    };
    SocketAddr::new(ip, port)
}

/// `addr` as the hooks hold it.
pub(crate) fn sock_dst(addr: SocketAddr) -> SockDst {
    let port = u32::from(addr.port().to_be());
    match addr.ip() {
        IpAddr::V4(ip) => SockDst {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port,
            family: u32::from(FAMILY_V4),
        },
        IpAddr::V6(ip) => {
            SockDst { addr: words(ip), port, family: u32::from(tproxy_ebpf::FAMILY_V6) }
        }
    }
}

/// An IPv6 address as the programs hold it: four words in network order.
pub(crate) fn words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_mapped_ones_become_ipv4() {
        for addr in ["203.0.113.10:80", "[2001:db8::10]:53"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(&sock_dst(addr)), addr);
        }
        let mapped: SocketAddr = "[::ffff:203.0.113.10]:443".parse().unwrap();
        assert_eq!(socket_addr(&sock_dst(mapped)), "203.0.113.10:443".parse().unwrap());
    }
}
