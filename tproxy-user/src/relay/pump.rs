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
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
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

/// Waits until `stream` is readable. Unlike `TcpStream::readable`, whose
/// future carries a waiter of 150 bytes, this keeps the waker in the
/// socket's own slot: an idle connection waits in two of these, so its task
/// stays small. Each socket has one reader and one writer, as that slot needs.
async fn readable(stream: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await
}

/// Like [`readable`], for writing.
async fn writable(stream: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await
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

/// One direction's counters, shared with the relay.
pub(crate) struct Progress<'a> {
    /// Bytes of this direction, for the relay's statistics.
    pub counter: &'a AtomicU64,
    /// Stamped with [`now_ms`] at every chunk, either direction.
    pub activity: &'a AtomicU64,
    /// Set by the direction that ends first: the other needs no shutdown,
    /// since closing both sockets right after sends the FIN anyway.
    pub one_ended: &'a AtomicBool,
}

impl Progress<'_> {
    /// Counts `n` bytes moved and stamps the activity.
    fn moved(&self, n: usize) {
        self.counter.fetch_add(n as u64, Relaxed);
        self.activity.store(now_ms(), Relaxed);
    }
}

/// Copies `from` to `to` until `from` reaches EOF, then shuts down `to`'s
/// sending side (half-close), and returns the byte count.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress<'_>,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = copy_chunk(from, to).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        progress.moved(n);
        if n == COPY_SIZE || total >= SPLICE_AFTER {
            // Boxed, like every rare path: an idle connection's task is
            // as large as its largest state.
            total += Box::pin(splice_all(from, to, progress)).await?;
            break;
        }
    }
    if !progress.one_ended.swap(true, Relaxed) {
        socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
    }
    Ok(total)
}

/// Reads what `from` has into the thread's buffer and sends it on; what
/// `to` cannot take at once waits in a buffer of its own. Returns the bytes
/// moved, 0 at EOF.
async fn copy_chunk(from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
    loop {
        readable(from).await?;
        // No await while the thread's buffer is borrowed.
        let copied = BUFFER.with_borrow_mut(|buf| -> io::Result<Option<(usize, Vec<u8>)>> {
            let mut got = 0;
            let read = from.try_io(Interest::READABLE, || {
                got = recv(from.as_raw_fd(), buf)?;
                // A read short of the buffer emptied the socket: tell tokio
                // so (as its own reads do), which saves the read that would
                // only say EAGAIN.
                if got > 0 && got < buf.len() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match read {
                Err(e) if got == 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if got == 0 => return Err(e),
                _ if got == 0 => return Ok(Some((0, Vec::new()))),
                _ => {}
            }
            let sent = match send(to.as_raw_fd(), &buf[..got]) {
                Ok(sent) => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Ok(Some((got, buf[sent..got].to_vec())))
        })?;
        let Some((got, rest)) = copied else { continue };
        if !rest.is_empty() {
            Box::pin(send_all(to, &rest)).await?;
        }
        return Ok(got);
    }
}

async fn send_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        writable(to).await?;
        match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), bytes)) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Splices `from` to `to` until EOF; returns the bytes moved.
async fn splice_all(from: &TcpStream, to: &TcpStream, progress: &Progress<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        readable(from).await?;
        let pipe = take_pipe()?;
        let filled = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
        });
        let mut pending = match filled {
            Ok(0) => {
                give_back(pipe);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back(pipe);
                continue;
            }
            // The pipe may hold nothing useful now; let it close.
            Err(e) => return Err(e),
        };
        total += pending as u64;
        progress.moved(pending);
        while pending > 0 {
            writable(to).await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
            }) {
                Ok(n) => pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        give_back(pipe);
    }
}
