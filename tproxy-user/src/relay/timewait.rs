//! Removing the relay's TIME_WAIT sockets when it stops.
//!
//! The relay's sockets carry the clients' tuples: the client-side socket is
//! bound to the original destination, a spoofed upstream socket to the
//! client. When the relay closes first, such a socket lingers in TIME_WAIT
//! for a minute. Once steering is gone, the kernel's early demux still
//! attaches it to forwarded packets of the same tuple, and `ip_forward` drops
//! any packet with a socket attached: a client that reuses its port would be
//! black-holed until the TIME_WAIT socket expires. So at exit the relay
//! destroys them (SOCK_DESTROY, which Debian's kernels enable with
//! CONFIG_INET_DIAG_DESTROY), exactly as `ss -K` would.

use std::{collections::HashSet, io, net::IpAddr};

use crate::host::{
    sock_diag::{self, AF_INET, AF_INET6, IPPROTO_TCP, SocketId, StateFlags},
    system,
};
use tracing::{debug, info, warn};

/// Which of the relay's TIME_WAIT sockets [`purge`] removes.
pub enum Purge<'a> {
    /// Every one: for a relay that does not know what was steered to it.
    All,
    /// Those whose local port (a client-side socket) or remote port (a
    /// spoofed upstream socket) is one of these.
    Ports(&'a HashSet<u16>),
    /// Those for which this holds.
    Where(&'a dyn Fn(&SocketId) -> bool),
}

/// How a [`purge`] that removed some is logged: an earlier run's leftovers
/// are worth a warning, the relay's own a line of information.
#[derive(Clone, Copy)]
pub enum Whose {
    /// This run's, as it stops or as rules change; the text says which.
    Ours(&'static str),
    /// What an earlier run left.
    Leftover,
}

/// Removes the relay's TIME_WAIT sockets that `which` names (see the
/// module) and logs the outcome; a failure is a warning, never an error,
/// since they expire by themselves. Returns how many went.
pub fn purge(which: Purge<'_>, whose: Whose) -> usize {
    if matches!(which, Purge::Ports(p) if p.is_empty()) {
        return 0;
    }
    let removed = system::local_addresses().and_then(|local| {
        remove_relay_time_waits_where(&local, |id| match which {
            Purge::All => true,
            Purge::Ports(p) => p.contains(&id.source_port) || p.contains(&id.destination_port),
            Purge::Where(f) => f(id),
        })
    });
    match (removed, whose) {
        (Ok(0), _) => 0,
        (Ok(n), Whose::Ours(what)) => {
            info!("removed {n} TIME_WAIT sockets {what}");
            n
        }
        (Ok(n), Whose::Leftover) => {
            warn!("removed {n} TIME_WAIT sockets an earlier run left");
            n
        }
        (Err(e), Whose::Ours(what)) => {
            warn!("could not remove the TIME_WAIT sockets {what}: {e}");
            0
        }
        (Err(e), Whose::Leftover) => {
            warn!("could not remove an earlier run's TIME_WAIT sockets: {e}");
            0
        }
    }
}

/// Destroys the relay's TIME_WAIT sockets (local address not this host's)
/// for which `remove` is true. Fails if the kernel cannot destroy them
/// (5.10's `tcp_abort` refuses anything but a full socket; a kernel may also
/// lack CONFIG_INET_DIAG_DESTROY), rather than reporting them gone.
fn remove_relay_time_waits_where(
    local: &HashSet<IpAddr>,
    remove: impl Fn(&SocketId) -> bool,
) -> io::Result<usize> {
    let mut removed = 0;
    for family in [AF_INET, AF_INET6] {
        for id in time_wait_sockets(family)? {
            // A dual-stack service's IPv4 sockets show v4-mapped addresses.
            let ours = !is_local(local, id.source_address) && remove(&id);
            if ours {
                match destroy(family, id) {
                    Ok(()) => removed += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        return Err(io::Error::new(
                            e.kind(),
                            "this kernel cannot destroy TIME_WAIT sockets (EOPNOTSUPP, as Debian 11's 5.10 answers, or no CONFIG_INET_DIAG_DESTROY); they expire within 60 s, and until then a client reusing such a port is dropped",
                        ));
                    }
                    Err(e) => debug!("destroying a TIME_WAIT socket: {e}"),
                }
            }
        }
    }
    Ok(removed)
}

/// Destroys the TIME_WAIT socket of exactly this tuple, if there is one.
pub fn remove_time_wait(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> io::Result<bool> {
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let id = SocketId {
        source_port: local.port(),
        destination_port: remote.port(),
        source_address: local.ip(),
        destination_address: remote.ip(),
        interface_id: 0,
        // Any socket of the tuple.
        cookie: [0xff; 8],
    };
    match destroy(family, id) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_local(local: &HashSet<IpAddr>, addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    addr.is_loopback() || addr.is_unspecified() || local.contains(&addr)
}

/// Every TIME_WAIT TCP socket of `family` in this network namespace.
fn time_wait_sockets(family: u8) -> io::Result<Vec<SocketId>> {
    sock_diag::sockets(family, IPPROTO_TCP, StateFlags::TIME_WAIT)
}

fn destroy(family: u8, id: SocketId) -> io::Result<()> {
    sock_diag::destroy_tcp(family, StateFlags::TIME_WAIT, id)
}
