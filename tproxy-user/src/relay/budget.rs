//! How many connections and UDP sessions the open-file limit allows.

use tracing::warn;

use super::{TcpRelayConfig, UdpRelayConfig, tcp, udp};

/// Sets the relays' bounds left open (`None`) to what the open-file limit
/// allows, after raising the soft limit to the hard one; warns when bounds
/// given can exceed it.
pub fn fit_to_descriptors(tcp: &mut TcpRelayConfig, udp: &mut UdpRelayConfig) {
    let fd_limit = crate::host::system::raise_fd_limit();
    let budget = DescriptorBudget::new(fd_limit, tcp.max_connections, udp.max_sessions);
    if let Some(warning) = &budget.warning {
        warn!("{warning}");
    }
    tcp.max_connections = Some(budget.max_connections);
    udp.max_sessions = Some(budget.max_udp_sessions);
}

/// Descriptors a relayed TCP connection can hold at once: its two sockets
/// and, while bytes are in flight, a pipe each way (two descriptors each).
pub const PER_CONNECTION: u64 = 6;
/// Descriptors a UDP session holds: its upstream and reply sockets.
pub const PER_SESSION: u64 = 2;
/// Descriptors kept for everything else (listeners, maps, netlink, logs).
pub const SPARE: u64 = 512;

/// The relays' bounds under an open-file limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// Most TCP connections at once.
    pub max_connections: usize,
    /// Most UDP sessions at once.
    pub max_udp_sessions: usize,
    /// Set when bounds given explicitly can exceed the limit.
    pub warning: Option<String>,
}

impl DescriptorBudget {
    /// Bounds for `fd_limit` descriptors. Bounds left out are the defaults,
    /// or what fits: UDP sessions take at most a quarter of the budget, and
    /// connections what remains, in the worst case of pipes in flight on
    /// all of them at once.
    pub fn new(
        fd_limit: u64,
        max_connections: Option<usize>,
        max_udp_sessions: Option<usize>,
    ) -> Self {
        let budget = fd_limit.saturating_sub(SPARE);
        let max_udp_sessions = max_udp_sessions.unwrap_or_else(|| {
            udp::DEFAULT_MAX_SESSIONS.min((budget / 4 / PER_SESSION).max(1) as usize)
        });
        let sessions = max_udp_sessions as u64 * PER_SESSION;
        let fits = (budget.saturating_sub(sessions) / PER_CONNECTION).max(1) as usize;
        let mut warning = None;
        let max_connections = match max_connections {
            Some(max) => {
                if max > fits || sessions > budget {
                    warning = Some(format!(
                        "--max-connections {max} and --max-udp-sessions {max_udp_sessions}: the open-file limit ({fd_limit}) allows about {fits} connections beside the sessions ({PER_CONNECTION} descriptors a connection at most, {PER_SESSION} a session)"
                    ));
                }
                max
            }
            None => tcp::DEFAULT_MAX_CONNECTIONS.min(fits),
        };
        Self { max_connections, max_udp_sessions, warning }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_limit_gives_the_defaults() {
        let b = DescriptorBudget::new(1 << 20, None, None);
        assert_eq!(b.max_connections, tcp::DEFAULT_MAX_CONNECTIONS);
        assert_eq!(b.max_udp_sessions, udp::DEFAULT_MAX_SESSIONS);
        assert_eq!(b.warning, None);
    }

    #[test]
    fn a_small_limit_is_shared_and_counts_pipes() {
        // 20 000: a quarter for sessions, the rest at six a connection.
        let b = DescriptorBudget::new(20_000, None, None);
        assert_eq!(b.max_udp_sessions, (20_000 - 512) / 4 / 2);
        let left = 20_000 - 512 - b.max_udp_sessions as u64 * 2;
        assert_eq!(b.max_connections as u64, left / 6);
        assert!(b.max_connections as u64 * 6 + b.max_udp_sessions as u64 * 2 <= 20_000 - 512);
    }

    #[test]
    fn explicit_bounds_are_kept_with_a_warning_when_they_cannot_fit() {
        let b = DescriptorBudget::new(20_000, Some(10_000), None);
        assert_eq!(b.max_connections, 10_000);
        assert!(b.warning.as_deref().is_some_and(|w| w.contains("allows about")), "{b:?}");
        let b = DescriptorBudget::new(20_000, Some(100), Some(100));
        assert_eq!(b.warning, None);
        // Even a tiny limit yields usable bounds.
        let b = DescriptorBudget::new(128, None, None);
        assert!(b.max_connections >= 1 && b.max_udp_sessions >= 1);
    }
}
