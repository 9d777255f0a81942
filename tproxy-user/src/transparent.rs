//! Transparent sockets: listeners that accept connections for addresses that
//! are not local, and upstream dials that carry a mark.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A TCP listener with IP_TRANSPARENT (IPV6_TRANSPARENT for IPv6), so that the
/// connections the TC program assigns to it can be accepted although their
/// destination is not a local address. `accept()` then yields sockets whose
/// `local_addr()` is the client's original destination.
pub fn tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_transparent(&socket, addr.is_ipv6())?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` from the host's own address. `mark` (SO_MARK) tags the
/// connection as the relay's own, so it is never intercepted again.
pub async fn tcp_dial(dst: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    if mark != 0 {
        SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

fn set_transparent(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 { socket.set_ip_transparent_v6(true) } else { socket.set_ip_transparent_v4(true) }
}
