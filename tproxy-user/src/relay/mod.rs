//! The relay: accepts what the TC program steers and forwards it to the
//! original destination, directly or through an upstream proxy.

pub mod access_log;
mod budget;
mod local;
mod pump;
mod source;
pub mod tcp;
pub mod timewait;
pub mod transparent;
pub mod udp;
pub mod upstream;

pub use budget::{DescriptorBudget, fit_to_descriptors};
pub use source::{SourcePrefixes, default_share};

/// SO_MARK of the relay's upstream connections, so that the datapath never
/// steers them back.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x1e6;

/// What the TCP and UDP relays share: where they listen and how they reach
/// the original destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Port of the transparent sockets; 0 lets the kernel pick one.
    pub listen_port: u16,
    /// Also listen on IPv6.
    pub ipv6: bool,
    /// SO_MARK of upstream traffic, so that the program never steers it
    /// back (the interceptor's `upstream_mark`).
    pub upstream_mark: u32,
    /// Reach upstream from the client's address and port instead of the
    /// host's (the client's port if free, else another).
    pub spoof_source: bool,
    /// Relay flows whose original destination is this host (`attach
    /// --intercept-local`); refused by default, so that the relay is no open
    /// door to the host's own services.
    pub allow_local_destinations: bool,
    /// Reach the original destinations through these proxies instead of
    /// directly, as the rules choose (see [`upstream`]).
    pub upstreams: upstream::Upstreams,
    /// Also listen on loopback (127.0.0.1 and ::1, ports of the kernel's
    /// choice) for the host's own connections, which the cgroup hooks send
    /// there (see [`crate::InterceptConfig::cgroups`]). Their original
    /// destinations come from the hooks' record, given with
    /// `set_original_dsts`.
    pub loopback: bool,
    /// How client addresses are grouped into sources for the per-source
    /// bounds (`max_connections_per_source`, `max_sessions_per_source`).
    pub source_prefixes: SourcePrefixes,
}

impl RelaySettings {
    /// The source to dial from for `client`: the client itself when
    /// spoofing, except for the host's own connections (from loopback,
    /// which the cgroup hooks send), which go from the host as they would.
    pub(crate) fn spoofed_source(
        &self,
        client: std::net::SocketAddr,
    ) -> Option<std::net::SocketAddr> {
        self.spoof_source.then_some(client).filter(|c| !c.ip().is_loopback())
    }
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            listen_port: 0,
            ipv6: true,
            upstream_mark: DEFAULT_UPSTREAM_MARK,
            spoof_source: false,
            allow_local_destinations: false,
            upstreams: upstream::Upstreams::default(),
            loopback: false,
            source_prefixes: SourcePrefixes::default(),
        }
    }
}
pub use tcp::{TcpRelay, TcpRelayConfig, TcpRelayCounters, TcpRelayStats};
pub use udp::{UdpRelay, UdpRelayConfig, UdpRelayCounters, UdpRelayStats};
