//! The relay: accepts what the TC program steers and forwards it to the
//! original destination.

pub mod tcp;

pub use tcp::{TcpRelay, TcpRelayConfig, TcpRelayStats};
