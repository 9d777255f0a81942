//! The library's error type.

use std::io;

/// Everything that can go wrong while setting up or running interception.
///
/// Messages are one line and say what to do where that is clear.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface {0:?} not found")]
    InterfaceNotFound(String),

    #[error(
        "insufficient privileges: run as root, or with CAP_NET_ADMIN and CAP_BPF (missing {0})"
    )]
    Privileges(String),

    #[error("kernel {found} is too old: {feature} needs Linux {needed} or newer")]
    KernelTooOld { found: String, feature: &'static str, needed: &'static str },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{0}")]
    Rule(String),

    #[error(
        "the kernel rejected the BPF program {name} ({source}); run with RUST_LOG=debug for the verifier log"
    )]
    ProgramRejected { name: &'static str, source: io::Error },

    #[error("loading the TC program failed")]
    Load(#[source] aya::EbpfError),

    #[error("attaching to {iface} failed")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("policy routing: {0}")]
    Routing(String),

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
