//! Transparent sockets: listeners that accept connections and datagrams for
//! addresses that are not local, sockets that send from such addresses, and
//! upstream dials that carry a mark.
//!
//! These are the building blocks of the relay, usable on their own: a
//! program with its own steering (or with [`Interceptor`](crate::Interceptor))
//! can accept with [`TransparentListener`] and [`TransparentUdp`], then dial
//! with [`tcp_dial`] and [`udp_upstream`].

use std::{
    io::{self, IoSliceMut},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
};

/// A TCP listener with IP_TRANSPARENT (IPV6_TRANSPARENT for IPv6), so that
/// connections the TC program assigns to it are accepted although their
/// destination is not a local address. Each accepted connection's local
/// address is the client's original destination, and it has TCP_NODELAY,
/// inherited from the listener.
pub struct TransparentListener {
    listener: TcpListener,
}

/// A connection accepted by a [`TransparentListener`].
#[derive(Debug)]
pub struct Accepted {
    /// The client-side stream.
    pub stream: TcpStream,
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client connected to.
    pub original_dst: SocketAddr,
}

impl TransparentListener {
    /// Binds and listens on `addr` (IPv6-only for an IPv6 address, so each
    /// family has its own listener).
    pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<Self> {
        Self::bind_with(addr, backlog, false)
    }

    /// Like [`Self::bind`]; with `reuse_port`, several listeners share the
    /// address (SO_REUSEPORT) and the kernel spreads connections over them.
    pub fn bind_with(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<Self> {
        let socket = transparent_socket(addr, Type::STREAM, Protocol::TCP)?;
        socket.set_reuse_address(true)?;
        // Accepted sockets inherit it (Linux): no setsockopt per connection.
        socket.set_tcp_nodelay(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(Self { listener: TcpListener::from_std(socket.into())? })
    }

    /// Accepts the next connection.
    pub async fn accept(&self) -> io::Result<Accepted> {
        let (stream, client) = self.listener.accept().await?;
        let original_dst = stream.local_addr()?;
        Ok(Accepted { stream, client, original_dst })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl AsFd for TransparentListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// How to connect upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialOptions {
    /// Connect from this address, which need not be local (IP_TRANSPARENT):
    /// to spoof the client. If its port is taken, another port on the same
    /// address is used. `None`: the host's own address.
    pub source: Option<SocketAddr>,
    /// SO_MARK of the connection (0: none). The relay uses it so that its
    /// own traffic is never steered again.
    pub mark: u32,
    /// Upper bound on the TCP handshake.
    pub timeout: Duration,
}

impl Default for DialOptions {
    fn default() -> Self {
        Self { source: None, mark: 0, timeout: Duration::from_secs(10) }
    }
}

/// Connects to `dst` as `options` say.
pub async fn tcp_dial(dst: SocketAddr, options: &DialOptions) -> io::Result<TcpStream> {
    let dial = async {
        let Some(source) = options.source else { return dial_from(dst, options, None).await };
        match dial_from(dst, options, Some(source)).await {
            // The client's port is bound here already, or its tuple to `dst`
            // is still taken by a socket that is closing: any port of its
            // address will do.
            Err(e)
                if source.port() != 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                    ) =>
            {
                dial_from(dst, options, Some(SocketAddr::new(source.ip(), 0))).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(options.timeout, dial).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// One connect attempt, from `source` if given (IP_TRANSPARENT, so any
/// address).
async fn dial_from(
    dst: SocketAddr,
    options: &DialOptions,
    source: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    let sock = SockRef::from(&socket);
    // A v4-mapped destination must never become an IPv4 connection.
    if dst.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if options.mark != 0 {
        sock.set_mark(options.mark)?;
    }
    socket.set_nodelay(true)?;
    if let Some(source) = source {
        set_transparent(&sock, source.is_ipv6())?;
        socket.set_reuseaddr(true)?;
        socket.bind(source)?;
    }
    socket.connect(dst).await
}

/// One datagram received by a [`TransparentUdp`] socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    /// Bytes of payload in the buffer.
    pub len: usize,
    /// Who sent it.
    pub client: SocketAddr,
    /// Where the client sent it: the original destination.
    pub original_dst: SocketAddr,
}

/// Why a datagram could not be received whole.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The datagram was larger than the buffer; it was dropped, not cut.
    #[error("datagram from {client} larger than the {buffer}-byte buffer; dropped")]
    Truncated {
        /// The sender.
        client: SocketAddr,
        /// The buffer size.
        buffer: usize,
    },
    /// The kernel gave no original destination (the socket lacks
    /// IP_RECVORIGDSTADDR, or the datagram was not steered).
    #[error("datagram from {0} without an original destination")]
    NoOriginalDst(SocketAddr),
    /// A socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A transparent UDP socket: it receives datagrams for any address the TC
/// program steers to it, each with its original destination, and can answer
/// from that destination.
pub struct TransparentUdp {
    socket: std::sync::Arc<UdpSocket>,
}

impl TransparentUdp {
    /// Binds with IP_TRANSPARENT and IP_RECVORIGDSTADDR (the IPv6 variants
    /// for an IPv6 address).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = transparent_socket(addr, Type::DGRAM, Protocol::UDP)?;
        if addr.is_ipv6() {
            setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true)?;
        } else {
            setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true)?;
        }
        // No SO_REUSEADDR: with it, any local user who sets it too could
        // bind the port and take the datagrams steered here.
        socket.bind(&addr.into())?;
        Ok(Self { socket: std::sync::Arc::new(UdpSocket::from_std(socket.into())?) })
    }

    /// The underlying socket (for registering it with the datapath).
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The underlying socket, shared (to answer from it).
    pub fn shared(&self) -> std::sync::Arc<UdpSocket> {
        self.socket.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Receives one datagram into `buf`. A datagram that does not fit is
    /// dropped and reported as [`RecvError::Truncated`], never cut short.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Datagram, RecvError> {
        // I/O errors (WouldBlock among them) go to `async_io`, which waits
        // and retries; the others come back whole.
        self.socket
            .async_io(Interest::READABLE, || match recv_original(&self.socket, buf) {
                Err(RecvError::Io(e)) => Err(e),
                other => Ok(other),
            })
            .await?
    }
}

/// `recvmsg` with the original destination from the control messages.
fn recv_original(socket: &UdpSocket, buf: &mut [u8]) -> Result<Datagram, RecvError> {
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let capacity = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let client = msg
        .address
        .as_ref()
        .and_then(storage_to_socket_addr)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(RecvError::Truncated { client, buffer: capacity });
    }
    let mut original_dst = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        original_dst = match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            ))),
            ControlMessageOwned::Ipv6OrigDstAddr(a) => Some(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))),
            _ => continue,
        };
    }
    let original_dst = original_dst.ok_or(RecvError::NoOriginalDst(client))?;
    Ok(Datagram { len: msg.bytes, client, original_dst })
}

fn storage_to_socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    storage.as_sockaddr_in6().map(|v6| {
        SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()))
    })
}

/// A UDP socket bound to `from` (IP_TRANSPARENT, so any address) and
/// connected to `to`: replies sent on it reach the client from its original
/// destination. SO_REUSEPORT lets several clients' sessions share `from`,
/// and, unlike SO_REUSEADDR, only sockets of the same user may join them.
/// `mark` (0: none) is its SO_MARK: the relay marks its own sockets so
/// that the cgroup hooks never rewrite them.
pub fn udp_reply_socket(from: SocketAddr, to: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = transparent_socket(from, Type::DGRAM, Protocol::UDP)?;
    socket.set_reuse_port(true)?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    socket.bind(&from.into())?;
    socket.connect(&to.into())?;
    UdpSocket::from_std(socket.into())
}

/// A UDP socket connected to `dst`, with `options.source` and `mark` as for
/// [`tcp_dial`] (the timeout does not apply).
pub fn udp_upstream(dst: SocketAddr, options: &DialOptions) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    // A v4-mapped destination must never become an IPv4 datagram.
    if dst.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if options.mark != 0 {
        socket.set_mark(options.mark)?;
    }
    if let Some(source) = options.source {
        set_transparent(&SockRef::from(&socket), source.is_ipv6())?;
        // The client's sessions with other destinations use the same
        // source; SO_REUSEPORT admits only sockets of the same user.
        socket.set_reuse_port(true)?;
        if let Err(e) = socket.bind(&source.into()) {
            if e.kind() != io::ErrorKind::AddrInUse {
                return Err(e);
            }
            socket.bind(&SocketAddr::new(source.ip(), 0).into())?;
        }
    }
    socket.connect(&dst.into())?;
    UdpSocket::from_std(socket.into())
}

/// A non-blocking socket of `addr`'s family with IP_TRANSPARENT, IPv6-only
/// for IPv6 (each family gets its own socket and sockmap slot).
fn transparent_socket(addr: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    set_transparent(&SockRef::from(&socket), addr.is_ipv6())?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn set_transparent(socket: &SockRef<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 { socket.set_ip_transparent_v6(true) } else { socket.set_ip_transparent_v4(true) }
}
