//! Moving one direction of a relayed TCP connection: small transfers are
//! copied through a per-thread buffer, large ones spliced (socket → pipe →
//! socket, the bytes never entering user space).
//!
//! Splice costs more than a copy for a few bytes (HAProxy found the same),
//! and most connections of a request/response protocol never move more, so
//! a direction starts by copying and switches to splice for good once it
//! has moved [`SPLICE_AFTER`] bytes or filled the buffer in one read.
//!
//! Neither path holds memory while a connection is idle: the copy buffer is
//! the thread's, and pipes come from a small per-thread pool and go back
//! empty, so an idle relayed connection costs its two sockets and its task.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes a pipe holds: larger chunks mean fewer system calls and wakeups per
/// byte. Measured with iperf3 through the sandbox: 64 KiB (the default) gave
/// about 10.4 Gbit/s, 256 KiB and 1 MiB about 11.5 within the noise; 256 KiB
/// bounds what one busy connection pins.
const PIPE_SIZE: usize = 1 << 18;
/// Empty pipes kept per worker thread for reuse.
const POOL_SIZE: usize = 64;
/// The per-thread copy buffer. A read that fills it marks a bulk transfer.
const COPY_SIZE: usize = 16 << 10;
/// A direction that has moved this much splices from then on.
const SPLICE_AFTER: u64 = 64 << 10;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills both fds on success; we own them from here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = unsafe {
            Self { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) }
        };
        // A smaller pipe still works, just with more round trips.
        unsafe {
            libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int)
        };
        Ok(pipe)
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_SIZE].into_boxed_slice());
}

fn take_pipe() -> io::Result<Pipe> {
    match POOL.with_borrow_mut(Vec::pop) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns an empty pipe to this thread's pool (or closes it).
fn give_back(pipe: Pipe) {
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOL_SIZE {
            pool.push(pipe);
        }
    });
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn recv(from: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: into a buffer we own, of its length.
    let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn send(to: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: from a buffer we own, of its length.
    let n = unsafe {
        libc::send(to, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Milliseconds since the first call: a cheap clock for idle tracking.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What a direction's progress updates on its connection.
pub(crate) struct Progress<'a> {
    /// Bytes of this direction, for the relay's statistics.
    pub counter: &'a AtomicU64,
    /// Stamped with [`now_ms`] at every chunk, either direction.
    pub activity: &'a mut u64,
    /// Set by the direction that ends first: the other needs no shutdown,
    /// since closing both sockets right after sends the FIN anyway.
    pub one_ended: &'a mut bool,
}

impl Progress<'_> {
    /// Counts `n` bytes moved and stamps the activity.
    fn moved(&mut self, n: usize) {
        self.counter.fetch_add(n as u64, Relaxed);
        *self.activity = now_ms();
    }
}

/// One direction of a relayed connection: copies `from` to `to` until
/// `from` reaches EOF, then shuts down `to`'s sending side (half-close).
///
/// A state machine the connection polls, rather than an `async fn`: an idle
/// connection's task is as large as its futures, and this is 40 bytes.
#[derive(Default)]
pub(crate) struct Pump {
    state: State,
    /// Bytes moved so far.
    pub total: u64,
}

#[derive(Default)]
enum State {
    /// Copying through the thread's buffer.
    #[default]
    Copy,
    /// What `to` could not take at once of the last chunk, from `sent` on;
    /// then copying again, or splicing if `bulk`.
    Sending { rest: Box<[u8]>, sent: usize, bulk: bool },
    /// Splicing: `pipe` holds `pending` bytes for `to` (none: no pipe).
    Splice { pipe: Option<Pipe>, pending: usize },
    /// EOF met and passed on.
    Done,
}

impl Pump {
    /// Moves what can be moved now; ready when the direction has ended.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        progress: &mut Progress<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Copy => {
                    ready!(from.poll_read_ready(cx))?;
                    let Some(Chunk { got, rest }) = copy_chunk(from, to)? else { continue };
                    if got == 0 {
                        self.end(to, progress)?;
                        continue;
                    }
                    self.total += got as u64;
                    progress.moved(got);
                    let bulk = got == COPY_SIZE || self.total >= SPLICE_AFTER;
                    self.state = match rest {
                        Some(rest) => State::Sending { rest, sent: 0, bulk },
                        None if bulk => State::Splice { pipe: None, pending: 0 },
                        None => State::Copy,
                    };
                }
                State::Sending { rest, sent, bulk } => {
                    ready!(to.poll_write_ready(cx))?;
                    match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), &rest[*sent..])) {
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if *sent == rest.len() {
                        self.state = match bulk {
                            true => State::Splice { pipe: None, pending: 0 },
                            false => State::Copy,
                        };
                    }
                }
                State::Splice { pipe, pending: 0 } => {
                    ready!(from.poll_read_ready(cx))?;
                    let filling = match pipe.take() {
                        Some(pipe) => pipe,
                        None => take_pipe()?,
                    };
                    let filled = from.try_io(Interest::READABLE, || {
                        splice(from.as_raw_fd(), filling.write.as_raw_fd(), PIPE_SIZE)
                    });
                    match filled {
                        Ok(0) => {
                            give_back(filling);
                            self.end(to, progress)?;
                        }
                        Ok(n) => {
                            self.total += n as u64;
                            progress.moved(n);
                            self.state = State::Splice { pipe: Some(filling), pending: n };
                        }
                        // Empty: the pipe waits in the pool, not here.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(filling),
                        // The pipe may hold nothing useful now; let it close.
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                State::Splice { pipe, pending } => {
                    ready!(to.poll_write_ready(cx))?;
                    let Some(full) = pipe else { unreachable!("pending bytes without a pipe") };
                    match to.try_io(Interest::WRITABLE, || {
                        splice(full.read.as_raw_fd(), to.as_raw_fd(), *pending)
                    }) {
                        Ok(n) => *pending -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if *pending == 0 {
                        if let Some(empty) = pipe.take() {
                            give_back(empty);
                        }
                    }
                }
            }
        }
    }

    /// EOF from `from`: half-closes `to`, unless the other direction
    /// ended first.
    fn end(&mut self, to: &TcpStream, progress: &mut Progress<'_>) -> io::Result<()> {
        self.state = State::Done;
        if !std::mem::replace(progress.one_ended, true) {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
        }
        Ok(())
    }
}

/// A chunk read and sent on.
struct Chunk {
    /// Bytes read; 0 at EOF.
    got: usize,
    /// What `to` could not take at once.
    rest: Option<Box<[u8]>>,
}

/// Reads what `from` has into the thread's buffer and sends it on; `None`
/// if `from` had nothing after all.
fn copy_chunk(from: &TcpStream, to: &TcpStream) -> io::Result<Option<Chunk>> {
    BUFFER.with_borrow_mut(|buf| {
        let mut got = 0;
        let read = from.try_io(Interest::READABLE, || {
            got = recv(from.as_raw_fd(), buf)?;
            // A read short of the buffer emptied the socket: tell tokio so
            // (as its own reads do), which saves the read that would only
            // say EAGAIN.
            if got > 0 && got < buf.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match read {
            Err(e) if got == 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if got == 0 => return Err(e),
            _ if got == 0 => return Ok(Some(Chunk { got, rest: None })),
            _ => {}
        }
        let sent = match send(to.as_raw_fd(), &buf[..got]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let rest = (sent < got).then(|| buf[sent..got].into());
        Ok(Some(Chunk { got, rest }))
    })
}
