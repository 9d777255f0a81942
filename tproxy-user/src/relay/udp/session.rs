//! One session's datagrams, moved between its two sockets in batches.

use super::*;

thread_local! {
    /// Datagram buffers shared by the sessions on a worker thread: a
    /// session holds no buffer while it waits, so idle sessions cost two
    /// sockets.
    static BATCH: RefCell<Batch> = RefCell::new(Batch::new());
}

/// Which way a session's datagrams go.
#[derive(Clone, Copy)]
pub(super) enum Direction {
    /// Server to client: arrived on the upstream socket.
    Down,
    /// Client to server, arriving on the reply socket: steering that looks
    /// for an existing socket first (iptables TPROXY does) finds the reply
    /// socket, which is bound to the original destination.
    Up,
}

/// A session's sockets, and how datagrams up are framed.
pub(super) struct Sockets {
    pub(super) upstream: Arc<UdpSocket>,
    pub(super) reply: Arc<UdpSocket>,
    /// The client, when `reply` is the relay's shared loopback socket,
    /// which is not connected and whose datagrams up the relay reads.
    pub(super) reply_to: Option<SocketAddr>,
    /// The SOCKS5 UDP header up, if through a proxy.
    pub(super) header: Option<Arc<[u8]>>,
    /// The original destination: through a proxy, only datagrams it says
    /// came from there are replies.
    pub(super) dst: SocketAddr,
}

/// Moves datagrams between a session's two sockets until it is stopped,
/// then closes them and logs the session's end.
pub(super) async fn relay_replies(
    (client, dst): SessionKey,
    sockets: Sockets,
    activity: Arc<Activity>,
    epoch: Instant,
    stats: Arc<UdpRelayStats>,
    stop: oneshot::Receiver<&'static str>,
    access: Option<(AccessLog, Entry)>,
) {
    let opened = Instant::now();
    let outcome = relay_until_stopped(&sockets, &activity, epoch, &stats, stop).await;
    drop(sockets);
    let up = activity.bytes_up.load(Relaxed);
    let down = activity.bytes_down.load(Relaxed);
    let duration = opened.elapsed();
    debug!(%client, %dst, up, down, ?duration, "UDP session {outcome}");
    if let Some((log, entry)) = access {
        log.record(entry.ended(duration, up, down, outcome));
    }
}

/// Relays until `stop` says why the session ends, and returns that.
pub(super) async fn relay_until_stopped(
    sockets: &Sockets,
    activity: &Activity,
    epoch: Instant,
    stats: &UdpRelayStats,
    mut stop: oneshot::Receiver<&'static str>,
) -> &'static str {
    let (upstream, reply) = (&sockets.upstream, &sockets.reply);
    let own_reply = sockets.reply_to.is_none();
    loop {
        let direction = tokio::select! {
            r = upstream.readable() => r.map(|()| Direction::Down),
            r = reply.readable(), if own_reply => r.map(|()| Direction::Up),
            why = &mut stop => {
                // One last pass over whatever is queued either way.
                let directions: &[Direction] =
                    if own_reply { &[Direction::Down, Direction::Up] } else { &[Direction::Down] };
                for &direction in directions {
                    relay_queued(sockets, direction, activity, epoch, stats, true);
                }
                return why.unwrap_or("closed");
            }
        };
        match direction {
            Ok(direction) => relay_queued(sockets, direction, activity, epoch, stats, false),
            Err(e) => {
                warn!("UDP session socket: {e}");
                return "ended by a socket error";
            }
        }
    }
}

/// Relays every datagram queued on one side of a session, without waiting.
/// `last`: the session is closing, so ask the socket itself rather than
/// tokio, which tries only sockets it has seen readable.
pub(super) fn relay_queued(
    sockets: &Sockets,
    direction: Direction,
    activity: &Activity,
    epoch: Instant,
    stats: &UdpRelayStats,
    last: bool,
) {
    let (from, to, peer) = match direction {
        Direction::Down => (&*sockets.upstream, &*sockets.reply, sockets.reply_to),
        Direction::Up => (&*sockets.reply, &*sockets.upstream, None),
    };
    let header = sockets.header.as_deref();
    // No await while the thread's buffers are borrowed.
    BATCH.with_borrow_mut(|batch| {
        loop {
            // A batch short of full emptied the socket: tokio is told so
            // (as its own reads do), which saves the read that would only
            // say EAGAIN. Closing, ask the socket itself rather than tokio,
            // which tries only sockets it has seen readable.
            let mut got = 0;
            let received = if last {
                batch.receive(from.as_raw_fd()).map(|n| got = n)
            } else {
                from.try_io(Interest::READABLE, || {
                    got = batch.receive(from.as_raw_fd())?;
                    if got < BATCH_SIZE { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
                })
            };
            for datagram in batch.datagrams(got) {
                // The buffer is a byte larger than any datagram: a full
                // read means the datagram was cut.
                let Some(datagram) = datagram else {
                    stats.truncated.fetch_add(1, Relaxed);
                    continue;
                };
                let payload = match (direction, header) {
                    // From the proxy: its header says who sent it.
                    (Direction::Down, Some(_)) => {
                        match crate::relay::upstream::socks5_udp_payload(datagram) {
                            Some((source, payload)) if source == sockets.dst => payload,
                            _ => continue,
                        }
                    }
                    _ => datagram,
                };
                activity.last_active.store(epoch.elapsed().as_millis() as u64, Relaxed);
                let header = if matches!(direction, Direction::Up) { header } else { None };
                forward(Target { socket: to, peer }, header, payload, direction, activity, stats);
            }
            match received {
                Ok(()) if got == BATCH_SIZE => continue,
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // An ICMP error from the peer surfaces here; keep listening.
                Err(e) => {
                    debug!("UDP receive: {e}");
                    if got == 0 && last {
                        break;
                    }
                }
            }
        }
    });
}

/// Datagrams read in one system call (recvmmsg).
pub(super) const BATCH_SIZE: usize = 8;

/// A worker thread's receive buffers, one per datagram of a batch, each a
/// byte larger than any datagram.
pub(super) struct Batch {
    buffers: Vec<Vec<u8>>,
    lens: [usize; BATCH_SIZE],
}

impl Batch {
    fn new() -> Self {
        Self { buffers: vec![vec![0; BUFFER_SIZE + 1]; BATCH_SIZE], lens: [0; BATCH_SIZE] }
    }

    /// Up to [`BATCH_SIZE`] datagrams from `fd`, without waiting.
    fn receive(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let mut iovecs: [libc::iovec; BATCH_SIZE] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.buffers[i].as_mut_ptr().cast(),
            iov_len: self.buffers[i].len(),
        });
        // SAFETY: zeroed mmsghdr is valid (no name, no control).
        let mut messages: [libc::mmsghdr; BATCH_SIZE] = unsafe { std::mem::zeroed() };
        for (message, iovec) in messages.iter_mut().zip(iovecs.iter_mut()) {
            message.msg_hdr.msg_iov = iovec;
            message.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every message points at one of our buffers, of its length.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                messages.as_mut_ptr(),
                BATCH_SIZE as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (len, message) in self.lens.iter_mut().zip(&messages[..n as usize]) {
            *len = message.msg_len as usize;
        }
        Ok(n as usize)
    }

    /// The first `n` datagrams received; `None` for one that was cut.
    fn datagrams(&self, n: usize) -> impl Iterator<Item = Option<&[u8]>> {
        self.buffers
            .iter()
            .zip(self.lens)
            .take(n)
            .map(|(buf, len)| (len < buf.len()).then(|| &buf[..len]))
    }
}

/// Sends `payload` on `to`, after `header` if given (the SOCKS5 UDP
/// header: one datagram, two pieces).
/// Where [`forward`] sends: a connected socket, or a socket and a peer.
pub(super) struct Target<'a> {
    socket: &'a UdpSocket,
    peer: Option<SocketAddr>,
}

impl<'a> From<&'a UdpSocket> for Target<'a> {
    fn from(socket: &'a UdpSocket) -> Self {
        Self { socket, peer: None }
    }
}

pub(super) fn forward<'a>(
    to: impl Into<Target<'a>>,
    header: Option<&[u8]>,
    payload: &[u8],
    direction: Direction,
    activity: &Activity,
    stats: &UdpRelayStats,
) {
    // A plain non-blocking send: tokio's `try_send` reports WouldBlock
    // until it has seen the socket writable once.
    let Target { socket: to, peer } = to.into();
    let sent = match (header, peer) {
        (None, Some(peer)) => SockRef::from(to).send_to(payload, &peer.into()),
        (None, None) => SockRef::from(to).send(payload),
        // Only datagrams up carry a header, and they go to a connected socket.
        (Some(header), _) => SockRef::from(to)
            .send_vectored(&[io::IoSlice::new(header), io::IoSlice::new(payload)])
            .map(|n| n.saturating_sub(header.len())),
    };
    match (sent, direction) {
        (Ok(sent), Direction::Down) => {
            activity.bytes_down.fetch_add(sent as u64, Relaxed);
            stats.datagrams_down.fetch_add(1, Relaxed);
            stats.bytes_down.fetch_add(sent as u64, Relaxed);
        }
        (Ok(sent), Direction::Up) => {
            activity.bytes_up.fetch_add(sent as u64, Relaxed);
            stats.datagrams_up.fetch_add(1, Relaxed);
            stats.bytes_up.fetch_add(sent as u64, Relaxed);
        }
        (Err(e), _) => {
            stats.upstream_failures.fetch_add(1, Relaxed);
            debug!("UDP send: {e}");
        }
    }
}
