//! Checks of the host that run before anything is changed, so that a bad
//! start fails with a clear message and leaves nothing behind.

use std::{ffi::CString, fs};

use aya::util::KernelVersion;

use crate::error::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Oldest kernel whose TC programs may call `bpf_sk_assign`.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 7, 0);

/// The interface index of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| Error::InterfaceNotFound(name.to_owned()))?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::InterfaceNotFound(name.to_owned())),
        index => Ok(index),
    }
}

/// Fails unless the process may load BPF programs and change networking.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading /proc/self/status", e))?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Before CAP_BPF existed (5.8), CAP_SYS_ADMIN covered it.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if missing.is_empty() { Ok(()) } else { Err(Error::Privileges(missing.join(", "))) }
}

/// Fails on kernels that cannot `bpf_sk_assign` from TC ingress.
pub fn check_kernel() -> Result<KernelVersion> {
    let current = KernelVersion::current().map_err(|e| {
        Error::io("reading the kernel version", std::io::Error::other(e.to_string()))
    })?;
    if current < MIN_KERNEL {
        return Err(Error::KernelTooOld {
            found: format_version(current),
            feature: "bpf_sk_assign at TC ingress",
            needed: "5.7",
        });
    }
    Ok(current)
}

/// TCX links (6.6+) detach by themselves when their owner dies; older kernels
/// attach through netlink clsact filters, which outlive the process.
pub fn has_tcx(kernel: KernelVersion) -> bool {
    kernel >= KernelVersion::new(6, 6, 0)
}

/// Whether this host has IPv6 at all (it can be disabled on the kernel command line).
pub fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

fn format_version(v: KernelVersion) -> String {
    let code = v.code();
    format!("{}.{}.{}", code >> 16, (code >> 8) & 0xff, code & 0xff)
}

/// Raises the soft open-file limit to the hard one (a relay holds two
/// descriptors per connection) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}
