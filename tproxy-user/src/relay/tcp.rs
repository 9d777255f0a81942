//! The transparent TCP relay.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use tokio::{io::copy_bidirectional, net::TcpStream, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    transparent::{self, Accepted, DialOptions, TransparentListener},
};

/// How the relay listens and dials.
#[derive(Debug, Clone)]
pub struct TcpRelayConfig {
    /// Port of the transparent listeners; 0 lets the kernel pick one.
    pub listen_port: u16,
    /// Also listen on IPv6.
    pub ipv6: bool,
    /// SO_MARK for upstream connections.
    pub upstream_mark: u32,
    /// Connect upstream from the client's address and port instead of the
    /// host's (the client's port if free, else another).
    pub spoof_source: bool,
    /// Upper bound on connecting to the original destination.
    pub connect_timeout: Duration,
}

impl Default for TcpRelayConfig {
    fn default() -> Self {
        Self {
            listen_port: 0,
            ipv6: true,
            upstream_mark: crate::intercept::DEFAULT_UPSTREAM_MARK,
            spoof_source: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Default upper bound on connecting upstream: a blackholed destination does
/// not hold a client for the kernel's two minutes.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

super::counters! {
    /// Counters of the TCP relay, updated while it runs.
    TcpRelayStats =>
    /// A snapshot of [`TcpRelayStats`].
    TcpRelayCounters {
        /// Connections accepted.
        accepted,
        /// Connections being relayed now.
        active,
        /// Connections made straight to the relay's port, reset.
        refused_loops,
        /// Upstream connects that failed (refused, unreachable, timed out).
        upstream_failures,
        /// Of those, the ones that timed out.
        connect_timeouts,
        /// Bytes from clients to upstream.
        bytes_to_upstream,
        /// Bytes from upstream to clients.
        bytes_to_client,
    }
}

/// Bound listeners, ready to be registered with the datapath and run.
pub struct TcpRelay {
    config: TcpRelayConfig,
    v4: TransparentListener,
    v6: Option<TransparentListener>,
    stats: Arc<TcpRelayStats>,
}

const BACKLOG: i32 = 4096;
/// Pause after accept fails for lack of file descriptors or memory, so the
/// loop neither spins nor dies; connections wait in the backlog meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl TcpRelay {
    /// Binds the transparent listeners on the wildcard addresses.
    pub fn bind(config: TcpRelayConfig) -> Result<Self> {
        let bind_err = |addr: SocketAddr| {
            move |e: io::Error| Error::io(format!("binding the relay listener on {addr}"), e)
        };
        let v4_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.listen_port));
        let v4 = TransparentListener::bind(v4_addr, BACKLOG).map_err(bind_err(v4_addr))?;
        // With port 0 both families share the port the kernel chose for IPv4.
        let port = v4.local_addr().map_err(bind_err(v4_addr))?.port();
        let v6 = if config.ipv6 {
            let v6_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            Some(TransparentListener::bind(v6_addr, BACKLOG).map_err(bind_err(v6_addr))?)
        } else {
            None
        };
        let config = TcpRelayConfig { listen_port: port, ..config };
        Ok(Self { config, v4, v6, stats: Arc::default() })
    }

    /// The port the listeners are bound to.
    pub fn port(&self) -> u16 {
        self.config.listen_port
    }

    /// The IPv4 listener.
    pub fn ipv4_listener(&self) -> &TransparentListener {
        &self.v4
    }

    /// The IPv6 listener, if IPv6 is on.
    pub fn ipv6_listener(&self) -> Option<&TransparentListener> {
        self.v6.as_ref()
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<TcpRelayStats> {
        self.stats.clone()
    }

    /// Accepts and relays until `shutdown` is cancelled, then closes every
    /// relayed connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let config = Arc::new(self.config);
        let mut tasks = JoinSet::new();
        let listeners = std::iter::once(self.v4).chain(self.v6);
        for listener in listeners {
            tasks.spawn(accept_loop(
                listener,
                config.clone(),
                self.stats.clone(),
                shutdown.clone(),
            ));
        }
        shutdown.cancelled().await;
        tasks.shutdown().await;
    }
}

async fn accept_loop(
    listener: TransparentListener,
    config: Arc<TcpRelayConfig>,
    stats: Arc<TcpRelayStats>,
    shutdown: CancellationToken,
) {
    // Connections live in this set, so they end when the loop is cancelled.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    stats.accepted.fetch_add(1, Relaxed);
                    connections.spawn(relay(accepted, config.clone(), stats.clone()));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    warn!("accept: {e}; retrying in {ACCEPT_BACKOFF:?}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(e) => debug!("accept: {e}"),
            },
        }
    }
    connections.shutdown().await;
}

/// Relays one connection, logging one line at debug level when it ends.
async fn relay(accepted: Accepted, config: Arc<TcpRelayConfig>, stats: Arc<TcpRelayStats>) {
    let started = Instant::now();
    let Accepted { stream: mut client, client: peer, original_dst: dst } = accepted;
    // A connection made straight to our listening port would have us dial
    // ourselves; only steered connections are relayed.
    if dst.port() == config.listen_port {
        stats.refused_loops.fetch_add(1, Relaxed);
        debug!(%peer, %dst, "refused: destination is the relay itself");
        reset(&client);
        return;
    }
    let dial = DialOptions {
        source: config.spoof_source.then_some(peer),
        mark: config.upstream_mark,
        timeout: config.connect_timeout,
    };
    let mut upstream = match transparent::tcp_dial(dst, &dial).await {
        Ok(upstream) => upstream,
        Err(e) => {
            stats.upstream_failures.fetch_add(1, Relaxed);
            if e.kind() == io::ErrorKind::TimedOut {
                stats.connect_timeouts.fetch_add(1, Relaxed);
            }
            debug!(%peer, %dst, error = %e, "upstream connect failed");
            // Tell the client the way the server would have: a reset.
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    stats.active.fetch_add(1, Relaxed);
    let result = copy_bidirectional(&mut client, &mut upstream).await;
    stats.active.fetch_sub(1, Relaxed);
    let (up, down, outcome) = match result {
        Ok((up, down)) => (up, down, "closed".to_owned()),
        Err(e) => (0, 0, format!("error: {e}")),
    };
    stats.bytes_to_upstream.fetch_add(up, Relaxed);
    stats.bytes_to_client.fetch_add(down, Relaxed);
    debug!(%peer, %dst, up, down, duration = ?started.elapsed(), outcome, "connection");
}

/// Closes with RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl TcpRelayCounters {
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} connections relayed ({} refused loops, {} upstream failures, {} timeouts), {} bytes up, {} bytes down",
            self.accepted,
            self.refused_loops,
            self.upstream_failures,
            self.connect_timeouts,
            self.bytes_to_upstream,
            self.bytes_to_client,
        )
    }
}
