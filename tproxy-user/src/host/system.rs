//! Checks of the host that run before anything is changed, so that a bad
//! start fails with a clear message and leaves nothing behind.

use std::ffi::CString;

use crate::error::{Error, Result};

/// The interface index of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| Error::InterfaceNotFound(name.to_owned()))?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::InterfaceNotFound(name.to_owned())),
        index => Ok(index),
    }
}

/// Fails unless the process may load our BPF programs and change
/// networking: CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON (without which the
/// verifier's Spectre sanitation refuses the program), or CAP_SYS_ADMIN for
/// the last two.
pub fn check_privileges() -> Result<()> {
    check_capabilities(true)
}

/// Like [`check_privileges`], for a process that loads no program.
pub fn check_relay_privileges() -> Result<()> {
    check_capabilities(false)
}

fn check_capabilities(loads_programs: bool) -> Result<()> {
    use caps::{CapSet, Capability::*};
    let has = |cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Before CAP_BPF and CAP_PERFMON existed (5.8), CAP_SYS_ADMIN covered them.
    if loads_programs && !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if loads_programs && !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() { Ok(()) } else { Err(Error::Privileges(missing.join(", "))) }
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`), as
/// BPF programs see it; 0 where the kernel cannot say (before 5.14).
pub fn netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(socket) = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None) else {
        return 0;
    };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 and its length, for the kernel to write.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret == 0 { cookie } else { 0 }
}

/// Whether this host has IPv6 at all (it can be disabled on the kernel command line).
pub fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Raises the soft open-file limit to the hard one (a relay holds two
/// descriptors per connection) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// The capabilities an instance needs, from start to exit: CAP_NET_ADMIN
/// for attaching and routing, IP_TRANSPARENT and SO_MARK on the sockets it
/// opens per connection, and removing everything at exit;
/// CAP_NET_BIND_SERVICE because a UDP reply socket binds to the original
/// destination's port (53, say) and a spoofed dial to the client's port;
/// CAP_BPF for loading, rule changes and counters (CAP_SYS_ADMIN before
/// 5.8, which had no CAP_BPF). Everything else is dropped before the
/// instance starts its threads.
pub fn runtime_capabilities() -> Vec<caps::Capability> {
    use caps::Capability::*;
    let bpf = if caps::runtime::thread_all_supported().contains(&CAP_BPF) {
        CAP_BPF
    } else {
        CAP_SYS_ADMIN
    };
    vec![CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, bpf]
}

/// What a start needs: [`runtime_capabilities`], with CAP_PERFMON for
/// loading (CAP_SYS_ADMIN before 5.8) and CAP_SYS_RESOURCE for the
/// locked-memory limit that maps count against before 5.11.
pub fn start_capabilities() -> Vec<caps::Capability> {
    use caps::Capability::*;
    let mut start = runtime_capabilities();
    start.extend([CAP_PERFMON, CAP_SYS_RESOURCE]);
    start
}

/// Limits every set to `keep` (the bounding set too, if it may), keeping
/// `keep`'s ambient and inheritable capabilities, so that a program this
/// process starts gets no more than `keep`, as root and as a service
/// user with ambient capabilities alike.
pub fn limit_capabilities(keep: &[caps::Capability]) -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let err = |what: &str, e: caps::errors::CapsError| {
        Error::io(format!("limiting capabilities ({what})"), std::io::Error::other(e))
    };
    let keep: CapsHashSet = keep.iter().copied().collect();
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::runtime::thread_all_supported() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("bounding", e))?;
            }
        }
    }
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let now = caps::read(None, set).map_err(|e| err("reading", e))?;
        let kept: CapsHashSet = now.intersection(&keep).copied().collect();
        caps::set(None, set, &kept).map_err(|e| err("setting", e))?;
    }
    Ok(())
}

/// Drops every capability but `keep` from the effective, permitted,
/// inheritable and bounding sets, for good, and sets no_new_privs.
/// Capabilities are per thread: call this before any thread is started
/// (threads inherit the caller's sets). Capabilities the process does not
/// have stay absent; the privilege check reports them later.
pub fn drop_capabilities(keep: &[caps::Capability]) -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let err = |what: &str, e: caps::errors::CapsError| {
        Error::io(format!("dropping capabilities ({what})"), std::io::Error::other(e))
    };
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| err("reading", e))?;
    let keep: CapsHashSet = keep.iter().copied().filter(|c| permitted.contains(c)).collect();
    // Shrinking the bounding set needs CAP_SETPCAP, so it goes first.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::runtime::thread_all_supported() {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|e| err("bounding", e))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("inheritable", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("effective", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("permitted", e))?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| Error::io("setting no_new_privs", std::io::Error::from(e)))
}

/// Lifts the locked-memory limit, which BPF maps count against on kernels
/// before 5.11 (later ones charge the memory cgroup instead).
pub fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    // Failure leaves the limit as it was; loading then says what is wrong.
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY);
}

/// This host's addresses (in the current network namespace).
pub fn local_addresses() -> std::io::Result<std::collections::HashSet<std::net::IpAddr>> {
    use std::net::IpAddr;
    let ifaddrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(ifaddrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// How packets on a device begin at TC ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// With an Ethernet header (veth, bridges, bonds, VLAN, VXLAN, Wi-Fi).
    Ethernet,
    /// With the IP header (tun, WireGuard, ipip, sit, GRE, PPP).
    L3,
}

/// The device's link type (ARPHRD_*), from `SIOCGIFHWADDR` in the current
/// network namespace.
pub fn link_type(iface: &str) -> Result<u16> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .map_err(|e| Error::io("opening a socket for SIOCGIFHWADDR", e))?;
    // SAFETY: ifreq is plain data; the name is NUL-terminated within it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return Err(Error::InterfaceNotFound(iface.to_owned()));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd as _;
    // SAFETY: SIOCGIFHWADDR fills `request`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) } != 0 {
        return Err(Error::InterfaceNotFound(iface.to_owned()));
    }
    // SAFETY: SIOCGIFHWADDR set the hwaddr member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Which program fits `iface`; refuses device types it cannot parse.
pub fn link_kind(iface: &str) -> Result<LinkKind> {
    const ETHER: u16 = 1;
    const PPP: u16 = 512;
    const RAWIP: u16 = 519;
    const TUNNEL: u16 = 768;
    const TUNNEL6: u16 = 769;
    const SIT: u16 = 776;
    const IPGRE: u16 = 778;
    const IP6GRE: u16 = 823;
    const NONE: u16 = 65534;
    match link_type(iface)? {
        ETHER => Ok(LinkKind::Ethernet),
        NONE | TUNNEL | TUNNEL6 | SIT | IPGRE | IP6GRE | PPP | RAWIP => Ok(LinkKind::L3),
        other => Err(Error::Config(format!(
            "interface {iface} has link type {other}{}, whose packets tproxy cannot parse; attach to Ethernet-like or L3 (tun, WireGuard, ipip, GRE, PPP) devices",
            if other == 772 { " (loopback)" } else { "" }
        ))),
    }
}
