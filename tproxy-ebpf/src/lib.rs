//! Types and constants shared by the TC program and userland.
//!
//! Everything here is `#[repr(C)]` and laid out exactly as the kernel maps
//! store it. With the `user` feature the types implement [`aya::Pod`] so that
//! userland can read and write the maps.
#![no_std]

/// IP protocol numbers, as in the IPv4 `protocol` / IPv6 `next header` field.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of the `PORTS` map: which (protocol, destination port) pairs are intercepted.
///
/// The protocol is part of the key so that TCP and UDP can be intercepted
/// independently; destination-CIDR rules are layered on top later through the
/// value's flags, without changing this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Destination port, host byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

impl PortKey {
    pub const fn new(proto: u8, port: u16) -> Self {
        Self { port, proto, _pad: 0 }
    }
}

/// Value of the `PORTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRule {
    /// `RULE_*` bits.
    pub flags: u32,
}

/// Steer matching packets to the relay.
pub const RULE_INTERCEPT: u32 = 1;

/// Key of the `TW_REOPEN` map: a TCP tuple whose SYN met a TIME_WAIT socket
/// on its way in. Addresses in network order (IPv4 in `[0]`), ports in host
/// order.
///
/// The TC program hands such a SYN to the TIME_WAIT socket; the kernel then
/// looks for a listener on the original port, the `sk_lookup` program finds
/// the tuple here and answers with the relay's listener, and the kernel
/// retires the TIME_WAIT socket, as iptables TPROXY does in
/// `nf_tproxy_handle_time_wait4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReopenKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub ipv6: u8,
    pub _pad: [u8; 3],
}

/// Size of the `TW_REOPEN` LRU map; entries live for microseconds.
pub const MAX_REOPENS: u32 = 16384;

/// Slots of the `LISTENERS` sockmap, which holds the relay's own sockets.
/// The program assigns new flows to these; when the relay dies the kernel
/// removes its sockets from the map and traffic passes untouched.
pub mod slot {
    pub const TCP_V4: u32 = 0;
    pub const TCP_V6: u32 = 1;
    pub const UDP_V4: u32 = 2;
    pub const UDP_V6: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Indexes of the per-CPU `STATS` counters.
pub mod stat {
    /// Packets assigned to the relay's listener (new TCP flows).
    pub const TO_LISTENER: u32 = 0;
    /// Packets assigned to a socket that already owns their tuple.
    pub const TO_SOCKET: u32 = 1;
    /// Matched packets passed untouched because no relay socket was there (fail-open).
    pub const NO_LISTENER: u32 = 2;
    /// `bpf_sk_assign` refused the socket; the packet passed untouched.
    pub const ASSIGN_FAILED: u32 = 3;
    /// SYNs that met a TIME_WAIT socket holding their tuple.
    pub const TW_SYN: u32 = 4;
    /// Of those, the ones the `sk_lookup` program handed to the listener.
    pub const TW_HANDOVER: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Names of the maps, programs and globals in the object file.
pub mod names {
    pub const PROGRAM: &str = "tproxy_ingress";
    pub const REOPEN_PROGRAM: &str = "tproxy_reopen";
    pub const TW_REOPEN: &str = "TW_REOPEN";
    pub const PORTS: &str = "PORTS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const STATS: &str = "STATS";
    /// Mark put on steered packets; policy routing delivers them locally.
    pub const MARK: &str = "MARK";
    /// Packets already carrying this mark are the relay's own and never steered.
    pub const BYPASS_MARK: &str = "BYPASS_MARK";
}

/// Size of the `PORTS` map.
pub const MAX_PORT_RULES: u32 = 4096;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding.
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::ReopenKey {}
}
