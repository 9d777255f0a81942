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

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

/// Destroys TCP TIME_WAIT sockets whose local address is not one of this
/// host's (so only a transparent socket can have made them) and whose local
/// port (a client-side socket) or remote port (a spoofed upstream socket)
/// is in `ports` (`None`: any port, for a relay that does not know what is
/// steered to it). Returns how many went.
pub fn remove_relay_time_waits(
    ports: Option<&HashSet<u16>>,
    local: &HashSet<IpAddr>,
) -> io::Result<usize> {
    if ports.is_some_and(HashSet::is_empty) {
        return Ok(0);
    }
    remove_relay_time_waits_where(local, |id| {
        ports.is_none_or(|p| p.contains(&id.source_port) || p.contains(&id.destination_port))
    })
}

/// Destroys the relay's TIME_WAIT sockets (local address not this host's)
/// for which `remove` is true. Fails if the kernel cannot destroy them
/// (5.10's `tcp_abort` refuses anything but a full socket; a kernel may also
/// lack CONFIG_INET_DIAG_DESTROY), rather than reporting them gone.
pub fn remove_relay_time_waits_where(
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

fn socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn request(family: u8, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::TIME_WAIT,
        socket_id,
    }
}

fn empty_id(family: u8) -> SocketId {
    if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() }
}

/// Every TIME_WAIT TCP socket of `family` in this network namespace.
fn time_wait_sockets(family: u8) -> io::Result<Vec<SocketId>> {
    let socket = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(request(family, empty_id(family))).into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut found = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(io::Error::other)?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    found.push(response.header.socket_id.clone());
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    let code = e.code.map_or(libc::EIO, |c| -c.get());
                    return Err(io::Error::from_raw_os_error(code));
                }
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
            offset += message.header.length as usize;
        }
    }
}

/// Destroys one socket and reads the kernel's answer.
fn destroy(family: u8, id: SocketId) -> io::Result<()> {
    let socket = socket()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(request(family, id))).into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut receive = vec![0u8; 4096];
    let size = socket.recv(&mut &mut receive[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[..size])
        .map_err(io::Error::other)?;
    match message.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        _ => Ok(()),
    }
}
