//! The relay: accepts what the TC program steers and forwards it to the
//! original destination.

mod budget;
mod local;
mod splice;
pub mod tcp;
pub mod udp;

pub use budget::DescriptorBudget;
pub use tcp::{TcpRelay, TcpRelayConfig, TcpRelayCounters, TcpRelayStats};
pub use udp::{UdpRelay, UdpRelayConfig, UdpRelayCounters, UdpRelayStats};

/// Defines a struct of atomic counters that the relay updates while it runs
/// and a plain, serializable snapshot of it, from one list of fields.
macro_rules! counters {
    (
        $(#[$meta:meta])* $live:ident => $(#[$smeta:meta])* $snapshot:ident {
            $($(#[$fmeta:meta])* $field:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $live {
            $($(#[$fmeta])* pub $field: std::sync::atomic::AtomicU64,)*
        }

        $(#[$smeta])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $snapshot {
            $($(#[$fmeta])* pub $field: u64,)*
        }

        impl $live {
            /// The counters' current values.
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($field: self.$field.load(std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }
    };
}
pub(crate) use counters;
