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
