//! What each kernel brings that tproxy uses: one table, read by `attach`
//! (to refuse, or to choose a way around) and by `doctor` (to report).
//!
//! Where the kernel can be asked (a helper, a program type, a socket
//! option), it is: a vendor kernel that carries a feature back is judged by
//! what it has. The release a feature came with serves the rest, and the
//! messages.

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_program_supported},
    util::KernelVersion,
};

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
    /// How to ask the running kernel, where it can be asked.
    pub probe: Probe,
}

/// How a [`Feature`] is found in the running kernel.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// By its release alone: nothing short of using it would tell.
    Release,
    /// A helper that TC programs may call.
    TcHelper(BpfHelper),
    /// A program type the kernel loads.
    Program(ProgramType),
    /// A socket option the kernel knows.
    SocketOption(libc::c_int),
}

/// `bpf_sk_assign` at TC ingress, and UDP sockets in a sockmap: the
/// minimum. (The programs keep no log ring buffer, which needs 5.8.)
pub const SK_ASSIGN: Feature = Feature {
    name: "bpf_sk_assign at TC ingress",
    role: "steering; required",
    since: (5, 7),
    probe: Probe::TcHelper(BpfHelper::BPF_FUNC_sk_assign),
};
/// `sk_lookup` programs: a SYN that meets the relay's TIME_WAIT socket is
/// handed to the listener at once.
pub const SK_LOOKUP: Feature = Feature {
    name: "sk_lookup (TIME_WAIT handover)",
    role: "without it a client reusing a port retries after a second",
    since: (5, 9),
    probe: Probe::Program(ProgramType::SkLookup),
};
/// BPF memory charged to the memory cgroup instead of RLIMIT_MEMLOCK: a
/// daemon that is not root needs no raised limit.
pub const MEMCG_ACCOUNTING: Feature = Feature {
    name: "BPF memory accounted to the memory cgroup",
    role: "without it a daemon that is not root needs RLIMIT_MEMLOCK raised",
    since: (5, 11),
    probe: Probe::Release,
};
/// Sockmap updates from a TC program: with `--to-port` the program puts
/// the other program's listener where the `sk_lookup` handover finds it.
pub const SOCKMAP_UPDATE: Feature = Feature {
    name: "sockmap updates from TC programs",
    role: "--to-port",
    since: (5, 10),
    probe: Probe::Release,
};
/// `bpf_sk_assign` of SO_REUSEPORT sockets: `--tcp-listeners` above 1.
pub const REUSEPORT_ASSIGN: Feature = Feature {
    name: "bpf_sk_assign of SO_REUSEPORT sockets",
    role: "--tcp-listeners above 1",
    since: (6, 5),
    probe: Probe::Release,
};
/// TCX links, which detach by themselves when their owner dies; before
/// them, programs attach as netlink clsact filters that outlive a killed
/// process.
pub const TCX: Feature = Feature {
    name: "TCX links",
    role: "without them a killed attach leaves its filters until the next start or cleanup",
    since: (6, 6),
    // aya chooses TCX by release too: the two must agree.
    probe: Probe::Release,
};

/// cgroup socket-address hooks with `getpeername` (5.8), linked so that
/// they detach when their owner dies (5.7): `--cgroup`.
pub const CGROUP_HOOKS: Feature = Feature {
    name: "cgroup connect/sendmsg/recvmsg/getpeername hooks",
    role: "--cgroup",
    since: (5, 8),
    probe: Probe::Release,
};
/// `SO_NETNS_COOKIE`: the cgroup hooks leave alone the sockets of the
/// cgroup's processes in other network namespaces.
pub const NETNS_COOKIE: Feature = Feature {
    name: "SO_NETNS_COOKIE",
    role: "without it --cgroup also rewrites connections made in other network namespaces",
    since: (5, 14),
    probe: Probe::SocketOption(libc::SO_NETNS_COOKIE),
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
    /// Whether the running kernel, of release `kernel`, has it: asked where
    /// it can be (see [`Probe`]), else judged by the release.
    pub fn in_kernel(&self, kernel: KernelVersion) -> bool {
        self.probed().unwrap_or_else(|| self.in_release(kernel))
    }

    /// Whether `kernel`'s release is one that has it.
    pub fn in_release(&self, kernel: KernelVersion) -> bool {
        kernel >= KernelVersion::new(self.since.0, self.since.1, 0)
    }

    /// The running kernel's answer, if it can be asked and answers (a
    /// probe that loads a program needs the privileges loading needs).
    pub fn probed(&self) -> Option<bool> {
        match self.probe {
            Probe::Release => None,
            Probe::TcHelper(helper) => {
                is_helper_supported(ProgramType::SchedClassifier, helper).ok()
            }
            Probe::Program(program) => is_program_supported(program).ok(),
            Probe::SocketOption(option) => socket_option_known(option),
        }
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

    /// The error for a kernel that lacks it: too old, or (when its release
    /// should have it) built or configured without it.
    pub fn missing(&self) -> Error {
        let (found, feature, needed) = match current() {
            Ok(kernel) if self.in_release(kernel) => {
                return Error::KernelLacks {
                    found: text(kernel),
                    feature: self.name,
                    needed: self.since_text(),
                };
            }
            Ok(kernel) => (text(kernel), self.name, self.since_text()),
            Err(_) => ("this kernel".into(), self.name, self.since_text()),
        };
        Error::KernelTooOld { found, feature, needed }
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

/// Whether the kernel knows a `SOL_SOCKET` option: getsockopt on a fresh
/// UDP socket fails with ENOPROTOOPT if not.
fn socket_option_known(option: libc::c_int) -> Option<bool> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).ok()?;
    let mut value = [0u8; 8];
    let mut len = value.len() as libc::socklen_t;
    // SAFETY: the buffer and its length describe valid memory.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            option,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    match ret {
        0 => Some(true),
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOPROTOOPT) => {
            Some(false)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each probe agrees with the release on this kernel, as long as it
    /// is not one that carries features back; a probe the process lacks
    /// the privileges for answers nothing.
    #[test]
    fn probes_agree_with_the_release_here() {
        let kernel = current().unwrap();
        for feature in FEATURES {
            if let Some(probed) = feature.probed() {
                assert_eq!(probed, feature.in_release(kernel), "{}", feature.name);
            }
        }
        // A socket option no kernel knows.
        assert_eq!(socket_option_known(0x7fff), Some(false));
        assert_eq!(socket_option_known(libc::SO_REUSEADDR), Some(true));
    }

    /// A feature this release should have but the probe finds absent is
    /// not blamed on the kernel's age.
    #[test]
    fn a_feature_probed_absent_on_a_new_release_is_not_called_too_old() {
        let absent = Feature {
            name: "an option no kernel knows",
            role: "a test",
            since: (3, 0),
            probe: Probe::SocketOption(0x7fff),
        };
        let error = absent.require().unwrap_err();
        assert!(matches!(error, Error::KernelLacks { .. }), "{error}");
        let future = Feature { since: (99, 0), probe: Probe::Release, ..absent };
        let error = future.require().unwrap_err();
        assert!(matches!(error, Error::KernelTooOld { .. }), "{error}");
        assert!(error.to_string().contains("too old"), "{error}");
    }
}
