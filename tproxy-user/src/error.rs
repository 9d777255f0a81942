//! The library's error type.

use std::io;

/// Everything that can go wrong while setting up or running interception.
///
/// Messages are one line and say what to do where that is clear.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No interface has this name.
    #[error("interface {0:?} not found")]
    InterfaceNotFound(String),

    /// The process lacks the named capabilities.
    #[error(
        "insufficient privileges: run as root, or with CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON (missing {0})"
    )]
    Privileges(String),

    /// The running kernel lacks a feature.
    #[error("kernel {found} is too old: {feature} needs Linux {needed} or newer")]
    KernelTooOld {
        /// The running kernel's version.
        found: String,
        /// What is missing.
        feature: &'static str,
        /// The first version that has it.
        needed: String,
    },

    /// The running kernel is recent enough, but probing found a feature
    /// missing: configured out, or a vendor kernel without it.
    #[error(
        "kernel {found} lacks {feature} (in Linux since {needed}): it was built without it, or it is disabled"
    )]
    KernelLacks {
        /// The running kernel's version.
        found: String,
        /// What is missing.
        feature: &'static str,
        /// The first version that has it.
        needed: String,
    },

    /// A live instance holds the name.
    #[error(
        "an instance named {0:?} is already running; give this one another --name, or stop that one"
    )]
    InstanceRunning(String),

    /// Something else's routing, or another instance's, is in the way.
    #[error("{0}")]
    RoutingConflict(String),

    /// A configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A rule that is malformed, conflicts with another, or does not fit.
    #[error("{0}")]
    Rule(String),

    /// The verifier refused a program.
    #[error(
        "the kernel rejected the BPF program {name} ({source}); run with RUST_LOG=debug for the verifier log"
    )]
    ProgramRejected {
        /// The program.
        name: &'static str,
        /// The kernel's error.
        source: io::Error,
    },

    /// The BPF object could not be loaded.
    #[error("loading the TC program failed")]
    Load(#[source] aya::EbpfError),

    /// The program could not be attached.
    #[error("attaching to {iface} failed")]
    Attach {
        /// Where.
        iface: String,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },

    /// A BPF map operation failed.
    #[error("BPF map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },

    /// Installing or removing the policy routing failed.
    #[error("policy routing: {0}")]
    Routing(String),

    /// A system call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
