//! What each kernel brings that tproxy uses: one table, read by `attach`
//! (to refuse, or to choose a way around) and by `doctor` (to report).

use aya::util::KernelVersion;

use crate::error::{Error, Result};

/// A kernel feature and the first release that has it.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// What it is, as messages name it.
    pub name: &'static str,
    /// What tproxy does with it, or without it.
    pub role: &'static str,
    /// First release, major and minor.
    pub since: (u8, u8),
}

/// `bpf_sk_assign` at TC ingress, and UDP sockets in a sockmap: the
/// minimum. (The programs keep no log ring buffer, which needs 5.8.)
pub const SK_ASSIGN: Feature =
    Feature { name: "bpf_sk_assign at TC ingress", role: "steering; required", since: (5, 7) };
/// `sk_lookup` programs: a SYN that meets the relay's TIME_WAIT socket is
/// handed to the listener at once.
pub const SK_LOOKUP: Feature = Feature {
    name: "sk_lookup (TIME_WAIT handover)",
    role: "without it a client reusing a port retries after a second",
    since: (5, 9),
};
/// BPF memory charged to the memory cgroup instead of RLIMIT_MEMLOCK: a
/// daemon that is not root needs no raised limit.
pub const MEMCG_ACCOUNTING: Feature = Feature {
    name: "BPF memory accounted to the memory cgroup",
    role: "without it a daemon that is not root needs RLIMIT_MEMLOCK raised",
    since: (5, 11),
};
/// Sockmap updates from a TC program: with `--to-port` the program puts
/// the other program's listener where the `sk_lookup` handover finds it.
pub const SOCKMAP_UPDATE: Feature =
    Feature { name: "sockmap updates from TC programs", role: "--to-port", since: (5, 10) };
/// `bpf_sk_assign` of SO_REUSEPORT sockets: `--tcp-listeners` above 1.
pub const REUSEPORT_ASSIGN: Feature = Feature {
    name: "bpf_sk_assign of SO_REUSEPORT sockets",
    role: "--tcp-listeners above 1",
    since: (6, 5),
};
/// TCX links, which detach by themselves when their owner dies; before
/// them, programs attach as netlink clsact filters that outlive a killed
/// process.
pub const TCX: Feature = Feature {
    name: "TCX links",
    role: "without them a killed attach leaves its filters until the next start or cleanup",
    since: (6, 6),
};

/// cgroup socket-address hooks with `getpeername` (5.8), linked so that
/// they detach when their owner dies (5.7): `--cgroup`.
pub const CGROUP_HOOKS: Feature = Feature {
    name: "cgroup connect/sendmsg/recvmsg/getpeername hooks",
    role: "--cgroup",
    since: (5, 8),
};
/// `SO_NETNS_COOKIE`: the cgroup hooks leave alone the sockets of the
/// cgroup's processes in other network namespaces.
pub const NETNS_COOKIE: Feature = Feature {
    name: "SO_NETNS_COOKIE",
    role: "without it --cgroup also rewrites connections made in other network namespaces",
    since: (5, 14),
};

/// Every feature, oldest first.
pub const FEATURES: [Feature; 8] = [
    SK_ASSIGN,
    CGROUP_HOOKS,
    SK_LOOKUP,
    SOCKMAP_UPDATE,
    MEMCG_ACCOUNTING,
    NETNS_COOKIE,
    REUSEPORT_ASSIGN,
    TCX,
];

impl Feature {
    /// Whether `kernel` has it.
    pub fn in_kernel(&self, kernel: KernelVersion) -> bool {
        kernel >= KernelVersion::new(self.since.0, self.since.1, 0)
    }

    /// "5.9".
    pub fn since_text(&self) -> String {
        format!("{}.{}", self.since.0, self.since.1)
    }

    /// Fails unless the running kernel has it, naming it.
    pub fn require(&self) -> Result<KernelVersion> {
        let kernel = current()?;
        if !self.in_kernel(kernel) {
            return Err(self.missing());
        }
        Ok(kernel)
    }

    /// The error for a kernel that lacks it.
    pub fn missing(&self) -> Error {
        Error::KernelTooOld {
            found: current().map(text).unwrap_or_else(|_| "this kernel".into()),
            feature: self.name,
            needed: self.since_text(),
        }
    }
}

/// The running kernel's version.
pub fn current() -> Result<KernelVersion> {
    KernelVersion::current()
        .map_err(|e| Error::io("reading the kernel version", std::io::Error::other(e)))
}

/// "6.1.0".
pub fn text(v: KernelVersion) -> String {
    let code = v.code();
    format!("{}.{}.{}", code >> 16, (code >> 8) & 0xff, code & 0xff)
}
