//! The transparent TCP relay.

mod connection;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::connection::{Connection, reset};
use super::{
    RelaySettings,
    local::{LocalAddrs, local_refused},
    source::{self, PerSource},
    transparent::{Accepted, TransparentListener},
};
use crate::{
    datapath::original_dst::OriginalDsts,
    error::{Error, Result},
    relay::access_log::AccessLog,
};

/// The TCP relay's own limits and timeouts (what it shares with the UDP
/// relay is in [`RelaySettings`]).
#[derive(Debug, Clone)]
pub struct TcpRelayConfig {
    /// Upper bound on connecting to the original destination.
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed (with a
    /// reset both ways); `None` keeps idle connections forever.
    pub idle_timeout: Option<Duration>,
    /// Most connections relayed at once. Past it the relay stops accepting;
    /// new connections wait in the kernel's backlog. `None`: the default,
    /// or what the open-file limit allows (see [`super::fit_to_descriptors`]).
    pub max_connections: Option<usize>,
    /// Most connections relayed at once for one source (a client address
    /// cut to [`RelaySettings::source_prefixes`]); past it the source's new
    /// connections are reset, so that one client cannot hold every slot.
    /// `None`: an eighth of `max_connections` ([`source::default_share`]);
    /// `Some(usize::MAX)`: no limit.
    pub max_connections_per_source: Option<usize>,
    /// Listeners per family. Above 1 they form an SO_REUSEPORT group that
    /// the kernel balances; `bpf_sk_assign` takes such sockets only since
    /// Linux 6.5 (see [`crate::host::kernel::REUSEPORT_ASSIGN`]).
    pub listeners: usize,
}

impl Default for TcpRelayConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_connections: None,
            max_connections_per_source: None,
            listeners: 1,
        }
    }
}

/// Default idle timeout: an hour, like a long `timeout client` in HAProxy;
/// it frees what slow or vanished clients hold without cutting quiet but
/// live sessions (ssh, databases) that send keepalives.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default connection bound.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;

/// Default upper bound on connecting upstream: a blackholed destination does
/// not hold a client for the kernel's two minutes.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

crate::counters::counters! {
    /// Counters of the TCP relay, updated while it runs.
    TcpRelayStats =>
    /// A snapshot of [`TcpRelayStats`].
    TcpRelayCounters {
        /// Connections accepted.
        accepted: Counter("tproxy_tcp_connections", "connections relayed",
            "TCP connections accepted by the relay"),
        /// Connections being relayed now.
        active: Gauge("tproxy_tcp_connections_active", "active", "TCP connections being relayed"),
        /// Connections made straight to the relay's port, reset.
        refused_loops: Counter("tproxy_tcp_refused_loops", "refused loops",
            "TCP connections to the relay itself, refused"),
        /// Connections to the loopback listener whose original destination
        /// the cgroup hooks did not record (made to it directly), reset.
        refused_unknown: Counter("tproxy_tcp_refused_unknown", "refused unknown",
            "TCP connections to the loopback listener without a recorded destination, refused"),
        /// Connections whose original destination is this host, reset.
        refused_local: Counter("tproxy_tcp_refused_local", "refused local",
            "TCP connections to this host, refused"),
        /// Connections reset because their client already held
        /// `max_connections_per_source`.
        refused_per_source: Counter("tproxy_tcp_refused_per_source", "refused per source",
            "TCP connections reset because their client held its most connections"),
        /// Upstream connects that failed (refused, unreachable, timed out).
        upstream_failures: Counter("tproxy_tcp_upstream_failures", "upstream failures",
            "Upstream TCP connects that failed"),
        /// Of those, the ones that timed out.
        connect_timeouts: Counter("tproxy_tcp_connect_timeouts", "timeouts",
            "Upstream TCP connects that timed out"),
        /// Connections closed for being idle too long.
        idle_timeouts: Counter("tproxy_tcp_idle_timeouts", "idle timeouts",
            "TCP connections reset after the idle timeout"),
        /// Connections that ended with an error (a reset on either side),
        /// passed on to the other side as a reset.
        aborted: Counter("tproxy_tcp_aborted", "aborted",
            "TCP connections ended by a reset or error, passed on"),
        /// Bytes from clients to upstream.
        bytes_to_upstream: Counter("tproxy_tcp_bytes" direction = "up", "bytes up",
            "TCP bytes relayed"),
        /// Bytes from upstream to clients.
        bytes_to_client: Counter("tproxy_tcp_bytes" direction = "down", "bytes down",
            "TCP bytes relayed"),
    }
}

/// Bound listeners, ready to be registered with the datapath and run.
pub struct TcpRelay {
    settings: RelaySettings,
    config: TcpRelayConfig,
    /// The first of each family goes into the datapath's sockmap; with
    /// SO_REUSEPORT the kernel picks among all of them.
    v4: Vec<TransparentListener>,
    v6: Vec<TransparentListener>,
    /// For the host's own connections (`RelaySettings::loopback`).
    loopback: Vec<TcpListener>,
    original_dsts: Option<OriginalDsts>,
    stats: Arc<TcpRelayStats>,
    rules: Option<RulesWatch>,
    access_log: Option<AccessLog>,
}

/// The interceptor's rules in force (see [`crate::Interceptor::watch_rules`]).
pub type RulesWatch = tokio::sync::watch::Receiver<Arc<crate::rules::RuleSet>>;

const BACKLOG: i32 = 4096;
/// Pause after accept fails for lack of file descriptors or memory, so the
/// loop neither spins nor dies; connections wait in the backlog meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl TcpRelay {
    /// Binds the transparent listeners on the wildcard addresses.
    pub fn bind(settings: RelaySettings, config: TcpRelayConfig) -> Result<Self> {
        let bind_err = |addr: SocketAddr| {
            move |e: io::Error| Error::io(format!("binding the relay listener on {addr}"), e)
        };
        let count = config.listeners.max(1);
        let reuse_port = count > 1;
        let group = |addr: SocketAddr| -> Result<Vec<TransparentListener>> {
            let first = TransparentListener::bind_with(addr, BACKLOG, reuse_port)
                .map_err(bind_err(addr))?;
            // With port 0 the others join the port the kernel chose.
            let addr = first.local_addr().map_err(bind_err(addr))?;
            let mut all = vec![first];
            for _ in 1..count {
                all.push(
                    TransparentListener::bind_with(addr, BACKLOG, true).map_err(bind_err(addr))?,
                );
            }
            Ok(all)
        };
        let v4 = group(SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.listen_port)))?;
        // Both families share the port the kernel chose for IPv4.
        let port = v4[0].local_addr().map_err(|e| Error::io("reading the relay's port", e))?.port();
        let v6 = if settings.ipv6 {
            group(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?
        } else {
            Vec::new()
        };
        let loopback = if settings.loopback {
            let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
            if settings.ipv6 {
                addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)));
            }
            addrs
                .into_iter()
                .map(|addr| loopback_listener(addr).map_err(bind_err(addr)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let settings = RelaySettings { listen_port: port, ..settings };
        let (stats, rules, original_dsts, access_log) = (Arc::default(), None, None, None);
        Ok(Self { settings, config, v4, v6, loopback, original_dsts, stats, rules, access_log })
    }

    /// The loopback listeners for the host's own connections (IPv4, then
    /// IPv6), if `RelaySettings::loopback` is on.
    pub fn loopback_listeners(&self) -> &[TcpListener] {
        &self.loopback
    }

    /// Where the connections to the loopback listeners meant to go (see
    /// [`crate::Interceptor::original_dsts`]).
    pub fn set_original_dsts(&mut self, dsts: OriginalDsts) {
        self.original_dsts = Some(dsts);
    }

    /// Writes an entry for every connection as it ends.
    pub fn set_access_log(&mut self, log: AccessLog) {
        self.access_log = Some(log);
    }

    /// Follows the interceptor's rules: a connection that ends after no
    /// rule intercepts its flow any more closes with a reset, so that no
    /// TIME_WAIT socket is left holding the client's tuple (the kernel would
    /// drop the client's next, now forwarded, SYN with it).
    pub fn follow_rules(&mut self, rules: RulesWatch) {
        self.rules = Some(rules);
    }

    /// The port the listeners are bound to.
    pub fn port(&self) -> u16 {
        self.settings.listen_port
    }

    /// The IPv4 listener (the first of its group).
    pub fn ipv4_listener(&self) -> &TransparentListener {
        &self.v4[0]
    }

    /// The IPv6 listener (the first of its group), if IPv6 is on.
    pub fn ipv6_listener(&self) -> Option<&TransparentListener> {
        self.v6.first()
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<TcpRelayStats> {
        self.stats.clone()
    }

    /// Accepts and relays until `shutdown` is cancelled, then closes every
    /// relayed connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let max = self.config.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let slots = Arc::new(Semaphore::new(max.max(1)));
        let local = LocalAddrs::watch(shutdown.clone());
        let share = self.config.max_connections_per_source.unwrap_or(source::default_share(max));
        let per_source =
            (share < max).then(|| PerSource::new(share, self.settings.source_prefixes));
        let shared = Arc::new(Shared {
            settings: self.settings,
            config: self.config,
            stats: self.stats,
            local,
            slots,
            per_source,
            rules: self.rules,
            access_log: self.access_log,
        });
        let mut tasks = JoinSet::new();
        // Indexed within their family's SO_REUSEPORT group.
        for (index, listener) in
            self.v4.into_iter().enumerate().chain(self.v6.into_iter().enumerate())
        {
            let listener = Listener::Transparent(listener);
            tasks.spawn(accept_loop(listener, index, shared.clone(), shutdown.clone()));
        }
        if let Some(dsts) = self.original_dsts {
            for (index, listener) in self.loopback.into_iter().enumerate() {
                let listener = Listener::Loopback(listener, dsts.clone());
                tasks.spawn(accept_loop(listener, index, shared.clone(), shutdown.clone()));
            }
        }
        shutdown.cancelled().await;
        tasks.shutdown().await;
    }
}

/// What every connection of a relay needs.
pub(super) struct Shared {
    pub settings: RelaySettings,
    pub config: TcpRelayConfig,
    pub stats: Arc<TcpRelayStats>,
    local: LocalAddrs,
    /// One permit per connection that may be relayed at once.
    slots: Arc<Semaphore>,
    pub per_source: Option<PerSource>,
    pub rules: Option<RulesWatch>,
    pub access_log: Option<AccessLog>,
}

/// A plain listener on loopback, for connections the cgroup hooks send.
fn loopback_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    // Accepted sockets inherit it (Linux): no setsockopt per connection.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG as u32)
}

/// Where connections come from.
enum Listener {
    /// Steered by the TC program: the local address is the destination.
    Transparent(TransparentListener),
    /// Sent by the cgroup hooks: the destination is in their record.
    Loopback(TcpListener, OriginalDsts),
}

/// A connection to the loopback listener without a recorded destination.
struct Unknown(io::Error);

impl Listener {
    async fn accept(&self) -> io::Result<std::result::Result<Accepted, Unknown>> {
        match self {
            Self::Transparent(listener) => listener.accept().await.map(Ok),
            Self::Loopback(listener, dsts) => {
                let (stream, client) = listener.accept().await?;
                let relay = stream.local_addr()?;
                Ok(match dsts.of(crate::rules::Protocol::Tcp, client, relay) {
                    Ok(original_dst) => Ok(Accepted { stream, client, original_dst }),
                    Err(e) => {
                        reset(&stream);
                        Err(Unknown(e))
                    }
                })
            }
        }
    }
}

async fn accept_loop(
    listener: Listener,
    index: usize,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    // Connections live in this set, so they end when the loop is cancelled.
    let mut connections = JoinSet::new();
    loop {
        // At the bound, stop accepting until a connection ends.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            permit = shared.slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(Err(Unknown(e))) => {
                shared.stats.refused_unknown.fetch_add(1, Relaxed);
                debug!("refused a connection to the loopback listener: {e}");
            }
            Ok(Ok(accepted)) => {
                shared.stats.accepted.fetch_add(1, Relaxed);
                debug!(listener = index, peer = %accepted.client, "accepted");
                let Accepted { stream, client: peer, original_dst: dst } = accepted;
                if let Some(refused) = refusal(&shared, peer, dst) {
                    refused.fetch_add(1, Relaxed);
                    reset(&stream);
                    continue;
                }
                let connection = Connection::new(shared.clone(), permit, stream, peer, dst);
                connections.spawn(connection);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                warn!("accept: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Err(e) => debug!("accept: {e}"),
        }
        // Reap what ended meanwhile, so the set does not grow with history.
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

/// The counter of the reason to refuse a connection from `peer` to `dst`,
/// if there is one. A connection made straight to our listening port, or to
/// any address of this host, would have us dial ourselves or our own
/// services; one client holding its most connections cannot have more.
/// The connection that is not refused holds a per-source slot.
fn refusal(shared: &Shared, peer: SocketAddr, dst: SocketAddr) -> Option<&AtomicU64> {
    let (settings, stats) = (&shared.settings, &shared.stats);
    if dst.port() == settings.listen_port {
        debug!(%peer, %dst, "refused: destination is the relay itself");
        return Some(&stats.refused_loops);
    }
    if local_refused(settings, &shared.local, peer, dst) {
        debug!(%peer, %dst, "refused: destination is this host");
        return Some(&stats.refused_local);
    }
    if shared.per_source.as_ref().is_some_and(|p| !p.take(peer.ip())) {
        debug!(%peer, "refused: the client holds its most connections");
        return Some(&stats.refused_per_source);
    }
    None
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
