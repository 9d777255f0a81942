//! One relayed TCP connection, from the accepted client to the end of both
//! directions, as a hand-written future.
//!
//! An idle connection costs its task, and a task is as large as its future:
//! written with `async`, the dial's state, copies of the arguments and the
//! join and select machinery made it 1.3 KiB. Here the dial is boxed and
//! freed once connected, and what stays is the two sockets, two [`Pump`]s
//! and the idle timer.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::OwnedSemaphorePermit, time::Sleep};
use tracing::debug;

use super::Shared;
use crate::relay::{
    access_log::Entry,
    pump::{Progress, Pump, now_ms},
    timewait,
    transparent::{self, DialOptions},
};

type Dial = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

pin_project_lite::pin_project! {
    /// Dials the original destination for an accepted client, then relays
    /// both ways until both end, an error (passed on as resets) or the
    /// idle timeout. Dropped early (the relay stopping), it resets both.
    pub(super) struct Connection {
        shared: Arc<Shared>,
        // Held for the connection's life.
        _permit: OwnedSemaphorePermit,
        peer: SocketAddr,
        dst: SocketAddr,
        started: Instant,
        phase: Phase,
        // Armed when relaying starts, if there is an idle timeout.
        #[pin]
        idle: Option<Sleep>,
    }

    impl PinnedDrop for Connection {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Phase::Relaying(relaying) = this.phase {
                // Not finished: the relay is stopping.
                relaying.reset();
                this.shared.stats.active.fetch_sub(1, Relaxed);
            }
            if let Some(p) = &this.shared.per_source {
                p.give_back(this.peer.ip());
            }
        }
    }
}

enum Phase {
    Dialing { client: TcpStream, dial: Dial },
    Relaying(Relaying),
    Done,
}

struct Relaying {
    client: TcpStream,
    upstream: TcpStream,
    up: Pump,
    down: Pump,
    /// [`now_ms`] at the last chunk either way.
    activity: u64,
    /// Whether one direction has ended (see [`Progress::one_ended`]).
    one_ended: bool,
}

impl Relaying {
    /// Polls both directions; ready when both have ended, or one failed.
    fn poll(&mut self, cx: &mut Context<'_>, shared: &Shared) -> Poll<io::Result<()>> {
        let Self { client, upstream, up, down, activity, one_ended } = self;
        let stats = &shared.stats;
        let counter = &stats.bytes_to_upstream;
        let up = up.poll(cx, client, upstream, &mut Progress { counter, activity, one_ended })?;
        let (activity, one_ended) = (&mut self.activity, &mut self.one_ended);
        let counter = &stats.bytes_to_client;
        let down =
            down.poll(cx, upstream, client, &mut Progress { counter, activity, one_ended })?;
        if up.is_ready() && down.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    }

    /// Closes both with RST instead of FIN, so that both peers learn that
    /// the conversation broke, as they would have without a proxy between.
    fn reset(&self) {
        reset(&self.client);
        reset(&self.upstream);
    }
}

impl Connection {
    /// Starts relaying `client`, whose connection was made to `dst`.
    pub(super) fn new(
        shared: Arc<Shared>,
        permit: OwnedSemaphorePermit,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let dial = Box::pin(dial(shared.clone(), peer, dst));
        let idle = shared.config.idle_timeout.map(tokio::time::sleep);
        Self {
            shared,
            _permit: permit,
            peer,
            dst,
            started: Instant::now(),
            phase: Phase::Dialing { client, dial },
            idle,
        }
    }
}

/// Connects to `dst` for `peer`: straight, or through the upstream proxy a
/// rule names.
async fn dial(shared: Arc<Shared>, peer: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let settings = &shared.settings;
    let dial = DialOptions {
        source: settings.spoofed_source(peer),
        mark: settings.upstream_mark,
        timeout: shared.config.connect_timeout,
    };
    let rules = shared.rules.as_ref().map(|rules| rules.borrow().clone());
    let proxy =
        settings.upstreams.for_flow(rules.as_deref(), crate::rules::Protocol::Tcp, peer, dst);
    match proxy {
        None => transparent::tcp_dial(dst, &dial).await,
        Some(proxy) => proxy.connect(dst, peer, &dial).await,
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let stats = &this.shared.stats;
        if let Phase::Dialing { client, dial } = this.phase {
            let upstream = match std::task::ready!(dial.as_mut().poll(cx)) {
                Ok(upstream) => upstream,
                Err(e) => {
                    stats.upstream_failures.fetch_add(1, Relaxed);
                    if e.kind() == io::ErrorKind::TimedOut {
                        stats.connect_timeouts.fetch_add(1, Relaxed);
                    }
                    let (peer, dst) = (*this.peer, *this.dst);
                    debug!(%peer, %dst, error = %e, "upstream connect failed");
                    let outcome = match e.kind() {
                        io::ErrorKind::TimedOut => "upstream_timeout",
                        _ => "upstream_failed",
                    };
                    log_access(this.shared, peer, dst, *this.started, (0, 0), outcome);
                    // Tell the client the way the server would have: a reset.
                    reset(client);
                    *this.phase = Phase::Done;
                    return Poll::Ready(());
                }
            };
            let Phase::Dialing { client, .. } = std::mem::replace(this.phase, Phase::Done) else {
                unreachable!()
            };
            stats.active.fetch_add(1, Relaxed);
            *this.phase = Phase::Relaying(Relaying {
                client,
                upstream,
                up: Pump::default(),
                down: Pump::default(),
                activity: now_ms(),
                one_ended: false,
            });
            if let (Some(sleep), Some(limit)) =
                (this.idle.as_mut().as_pin_mut(), this.shared.config.idle_timeout)
            {
                sleep.reset(tokio::time::Instant::now() + limit);
            }
        }
        let Phase::Relaying(relaying) = this.phase else { return Poll::Ready(()) };
        let result = match relaying.poll(cx, this.shared) {
            Poll::Ready(result) => result,
            Poll::Pending => match poll_idle(this.idle.as_mut(), cx, this.shared, relaying) {
                Poll::Ready(()) => {
                    stats.idle_timeouts.fetch_add(1, Relaxed);
                    Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        let Phase::Relaying(relaying) = std::mem::replace(this.phase, Phase::Done) else {
            unreachable!()
        };
        stats.active.fetch_sub(1, Relaxed);
        finish(this.shared, relaying, result, *this.peer, *this.dst, *this.started);
        Poll::Ready(())
    }
}

/// Ready once the connection has been quiet for the idle timeout; until
/// then the timer is re-armed for when it would be.
fn poll_idle(
    mut idle: Pin<&mut Option<Sleep>>,
    cx: &mut Context<'_>,
    shared: &Shared,
    relaying: &Relaying,
) -> Poll<()> {
    let (Some(mut sleep), Some(limit)) = (idle.as_mut().as_pin_mut(), shared.config.idle_timeout)
    else {
        return Poll::Pending;
    };
    let limit_ms = limit.as_millis() as u64;
    while sleep.as_mut().poll(cx).is_ready() {
        let quiet = now_ms().saturating_sub(relaying.activity);
        if quiet >= limit_ms {
            return Poll::Ready(());
        }
        sleep.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(limit_ms - quiet));
    }
    Poll::Pending
}

/// Closes a connection whose directions ended with `result`, and logs it.
fn finish(
    shared: &Shared,
    relaying: Relaying,
    result: io::Result<()>,
    peer: SocketAddr,
    dst: SocketAddr,
    started: Instant,
) {
    let moved = (relaying.up.total, relaying.down.total);
    // No allocation for the common end: this runs for every connection.
    let outcome: std::borrow::Cow<str> = match &result {
        Ok(()) => "closed".into(),
        Err(e) => {
            shared.stats.aborted.fetch_add(1, Relaxed);
            relaying.reset();
            format!("reset: {e}").into()
        }
    };
    let (up, down) = match result {
        Ok(()) => (relaying.up.total, relaying.down.total),
        Err(_) => (0, 0),
    };
    let steered = shared.rules.as_ref().is_none_or(|rules| {
        rules.borrow().intercepts(crate::rules::Protocol::Tcp, peer.ip(), dst.ip(), dst.port())
    });
    if steered {
        drop(relaying);
    } else {
        let upstream_local = relaying.upstream.local_addr().ok();
        drop(relaying);
        // No rule intercepts this flow now: a TIME_WAIT socket left on the
        // client's tuple would have the kernel drop its next, forwarded, SYN.
        for (local, remote) in [(Some(dst), peer), (upstream_local, dst)] {
            if let Some(local) = local {
                let removed = timewait::remove_time_wait(local, remote);
                debug!(%local, %remote, ?removed, "TIME_WAIT of a flow no rule intercepts now");
            }
        }
    }
    debug!(%peer, %dst, up, down, duration = ?started.elapsed(), outcome = &*outcome, "connection");
    let outcome = match &*outcome {
        "closed" => "closed",
        o if o.contains("idle timeout") => "timeout",
        _ => "reset",
    };
    log_access(shared, peer, dst, started, moved, outcome);
}

/// The connection's access log entry, if there is a log.
fn log_access(
    shared: &Shared,
    peer: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    (up, down): (u64, u64),
    outcome: &str,
) {
    let Some(log) = &shared.access_log else { return };
    let rules = shared.rules.as_ref().map(|rules| rules.borrow().clone());
    let entry = Entry::new(crate::rules::Protocol::Tcp, peer, dst)
        .routed(&shared.settings, rules.as_deref())
        .ended(started.elapsed(), up, down, outcome);
    log.record(entry);
}

/// Closes with RST instead of FIN.
pub(super) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
