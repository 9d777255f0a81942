//! The host's own addresses, so that the relays refuse flows whose original
//! destination is the proxy itself: relaying those would make the proxy an
//! open door to its own services (and a loop for its own port).

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the set is refreshed; an address added since is not yet refused.
const REFRESH: Duration = Duration::from_secs(2);

/// A shared, periodically refreshed set of local addresses.
#[derive(Clone, Default)]
pub(crate) struct LocalAddrs(Arc<RwLock<HashSet<IpAddr>>>);

impl LocalAddrs {
    /// Reads the addresses now and keeps them fresh until `stop`.
    pub(crate) fn watch(stop: CancellationToken) -> Self {
        let addrs = Self::default();
        addrs.refresh();
        let watched = addrs.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => watched.refresh(),
                }
            }
        });
        addrs
    }

    fn refresh(&self) {
        match crate::host::system::local_addresses() {
            Ok(set) => *self.0.write().unwrap_or_else(|e| e.into_inner()) = set,
            Err(e) => debug!("reading local addresses: {e}"),
        }
    }

    /// Whether `ip` is one of this host's addresses (loopback and
    /// unspecified included).
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        // `::ffff:127.0.0.1` is loopback too.
        let ip = ip.to_canonical();
        ip.is_loopback()
            || ip.is_unspecified()
            || self.0.read().unwrap_or_else(|e| e.into_inner()).contains(&ip)
    }
}

/// Whether a flow from `client` to `dst` is refused as one to this host: by
/// default every local destination; with `--intercept-local` still a
/// loopback one from another host, which a host with `route_localnet=1`
/// (kube-proxy sets it) would deliver to services that listen on loopback
/// because they trust only this host.
pub(crate) fn local_refused(
    settings: &super::RelaySettings,
    local: &LocalAddrs,
    client: std::net::SocketAddr,
    dst: std::net::SocketAddr,
) -> bool {
    if !local.contains(dst.ip()) {
        return false;
    }
    let loopback = |ip: IpAddr| ip.to_canonical().is_loopback();
    !settings.allow_local_destinations || (loopback(dst.ip()) && !loopback(client.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_refused_from_another_host_even_with_intercept_local() {
        let local = LocalAddrs::default();
        local.0.write().unwrap().insert("192.0.2.1".parse().unwrap());
        let open =
            super::super::RelaySettings { allow_local_destinations: true, ..Default::default() };
        let closed = super::super::RelaySettings::default();
        for (settings, client, dst, refused) in [
            (&closed, "192.0.2.2:4000", "192.0.2.1:80", true),
            (&closed, "192.0.2.2:4000", "198.51.100.10:80", false),
            (&open, "192.0.2.2:4000", "192.0.2.1:80", false),
            (&open, "192.0.2.2:4000", "127.0.0.1:80", true),
            (&open, "[2001:db8:1::2]:4000", "[::1]:80", true),
            (&open, "[2001:db8:1::2]:4000", "[::ffff:127.0.0.1]:80", true),
            (&open, "127.0.0.1:4000", "127.0.0.1:80", false),
        ] {
            let (client, dst) = (client.parse().unwrap(), dst.parse().unwrap());
            assert_eq!(local_refused(settings, &local, client, dst), refused, "{client} -> {dst}");
        }
    }
}
