//! The relay: accepts what the TC program steers and forwards it to the
//! original destination.

pub mod tcp;
pub mod udp;

pub use tcp::{TcpRelay, TcpRelayConfig, TcpRelayStats};
pub use udp::{UdpRelay, UdpRelayConfig, UdpRelayStats};
