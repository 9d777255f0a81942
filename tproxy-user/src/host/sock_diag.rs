//! The kernel's socket table (NETLINK_SOCK_DIAG, what `ss` reads): listing
//! this network namespace's TCP and UDP sockets, and destroying one
//! (SOCK_DESTROY, as `ss -K` does).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest},
};
pub use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

fn socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn request(family: u8, protocol: u8, states: StateFlags, socket_id: SocketId) -> InetRequest {
    InetRequest { family, protocol, extensions: ExtensionFlags::empty(), states, socket_id }
}

fn empty_id(family: u8) -> SocketId {
    if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() }
}

fn send<M>(socket: &Socket, flags: u16, message: M) -> io::Result<()>
where
    M: NetlinkSerializable,
    NetlinkPayload<M>: From<M>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, message.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

fn error(code: Option<std::num::NonZeroI32>) -> io::Error {
    io::Error::from_raw_os_error(code.map_or(libc::EIO, |c| -c.get()))
}

/// The ids of every `protocol` socket of `family` in one of `states`, in
/// this network namespace. (UDP sockets that are bound but not connected
/// are in state CLOSE.)
pub fn sockets(family: u8, protocol: u8, states: StateFlags) -> io::Result<Vec<SocketId>> {
    let socket = socket()?;
    let query = request(family, protocol, states, empty_id(family));
    send(&socket, NLM_F_REQUEST | NLM_F_DUMP, SockDiagMessage::InetRequest(query))?;
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
                NetlinkPayload::Error(e) => return Err(error(e.code)),
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
            offset += message.header.length as usize;
        }
    }
}

/// Destroys the TCP socket `id` in one of `states` and reads the kernel's
/// answer (ENOENT: no such socket).
pub fn destroy_tcp(family: u8, states: StateFlags, id: SocketId) -> io::Result<()> {
    let socket = socket()?;
    let message = SockDiagDestroy::new(SockDiagMessage::InetRequest(request(
        family,
        IPPROTO_TCP,
        states,
        id,
    )));
    send(&socket, NLM_F_REQUEST | NLM_F_ACK, message)?;
    let mut receive = vec![0u8; 4096];
    let size = socket.recv(&mut &mut receive[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[..size])
        .map_err(io::Error::other)?;
    match message.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(error(e.code)),
        _ => Ok(()),
    }
}

/// The cookie of the `protocol` socket whose local address is `local` and
/// whose peer is `remote` (for UDP: which would receive from `remote`), as
/// `bpf_get_socket_cookie` gives it.
pub fn cookie(
    protocol: u8,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> io::Result<u64> {
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    // The kernel reads a UDP query's addresses the other way round in some
    // releases; the answer names the socket, so both are tried.
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for (src, dst) in [(local, remote), (remote, local)] {
        let id = SocketId {
            source_port: src.port(),
            destination_port: dst.port(),
            source_address: src.ip(),
            destination_address: dst.ip(),
            interface_id: 0,
            // Any socket with the tuple.
            cookie: [0xff; 8],
        };
        match find_one(family, protocol, id) {
            Ok(found) if found.source_port == local.port() => {
                let c = found.cookie;
                let low = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                let high = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
                return Ok(u64::from(high) << 32 | u64::from(low));
            }
            Ok(_) => {}
            Err(e) => last = e,
        }
        if protocol != IPPROTO_UDP {
            break;
        }
    }
    Err(last)
}

/// The one socket `id` names (no dump).
fn find_one(family: u8, protocol: u8, id: SocketId) -> io::Result<SocketId> {
    let socket = socket()?;
    let query = request(family, protocol, StateFlags::all(), id);
    send(&socket, NLM_F_REQUEST, SockDiagMessage::InetRequest(query))?;
    let mut receive = vec![0u8; 4096];
    let size = socket.recv(&mut &mut receive[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[..size])
        .map_err(io::Error::other)?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            Ok(response.header.socket_id.clone())
        }
        NetlinkPayload::Error(e) => Err(error(e.code)),
        _ => Err(io::Error::other("unexpected sock_diag answer")),
    }
}
