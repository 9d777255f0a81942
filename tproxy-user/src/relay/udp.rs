//! The transparent UDP relay.
//!
//! One transparent socket per family receives every steered datagram with its
//! client and original destination. A session per (client, original
//! destination) owns two sockets for its lifetime: an upstream socket
//! connected to the destination, and a reply socket bound to the destination
//! (IP_TRANSPARENT) and connected to the client, so that replies come from
//! the address the client talked to. Sessions end after an idle timeout, or
//! when the table is full and they are the least recently used.
//!
//! With a SOCKS5 upstream, a session's upstream socket is connected to the
//! proxy's UDP relay instead, through an association of its own (opened
//! asynchronously: the session's first datagrams wait for it), and its
//! datagrams carry the SOCKS5 UDP header.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use lru::LruCache;
use socket2::SockRef;
use tokio::{
    io::Interest,
    net::{TcpStream, UdpSocket},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    RelaySettings,
    local::LocalAddrs,
    source::SourceQueues,
    transparent::{self, Datagram, DialOptions, RecvError, TransparentUdp},
};
use crate::{
    datapath::original_dst::OriginalDsts,
    error::{Error, Result},
};

/// The UDP relay's own limits (what it shares with the TCP relay is in
/// [`RelaySettings`]).
#[derive(Debug, Clone)]
pub struct UdpRelayConfig {
    /// A session without traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most sessions at once; past it the least recently used is evicted.
    /// `None`: the default, or what the open-file limit allows (see
    /// [`super::fit_to_descriptors`]).
    pub max_sessions: Option<usize>,
    /// Most sessions at once for one source (a client address cut to
    /// [`RelaySettings::source_prefixes`]); past it the source's oldest
    /// session is closed for its new one, so that one client competes only
    /// with itself. `None`: an eighth of `max_sessions`
    /// ([`super::default_share`]); `Some(usize::MAX)`: no limit.
    pub max_sessions_per_source: Option<usize>,
}

impl Default for UdpRelayConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_sessions: None,
            max_sessions_per_source: None,
        }
    }
}

/// Default idle timeout: long enough for DNS retries and QUIC keepalives
/// (15-30 s), short enough that a scan does not pin sockets for minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default session bound: two sockets each, well inside a 65 536 fd limit.
pub const DEFAULT_MAX_SESSIONS: usize = 16_384;

/// The largest datagram (65 535 minus the UDP header, IPv6 without jumbograms).
const BUFFER_SIZE: usize = 65_536;

crate::counters::counters! {
    /// Counters of the UDP relay, updated while it runs.
    UdpRelayStats =>
    /// A snapshot of [`UdpRelayStats`].
    UdpRelayCounters {
        /// Sessions opened.
        sessions_total: Counter("tproxy_udp_sessions", "UDP sessions", "UDP sessions opened"),
        /// Sessions open now.
        sessions_active: Gauge("tproxy_udp_sessions_active", "active", "UDP sessions open"),
        /// Sessions closed after the idle timeout.
        sessions_expired: Counter("tproxy_udp_sessions_expired", "expired",
            "UDP sessions closed after the idle timeout"),
        /// Sessions closed because the table was full.
        sessions_evicted: Counter("tproxy_udp_sessions_evicted", "evicted",
            "UDP sessions evicted because the table was full"),
        /// Sessions closed to make room for a newer one of the same source,
        /// which held `max_sessions_per_source`.
        sessions_evicted_per_source: Counter("tproxy_udp_sessions_evicted_per_source",
            "evicted per source",
            "UDP sessions closed for a newer one of a source at its bound"),
        /// Datagrams from clients relayed upstream.
        datagrams_up: Counter("tproxy_udp_datagrams" direction = "up", "datagrams up",
            "UDP datagrams relayed"),
        /// Payload bytes relayed upstream.
        bytes_up: Counter("tproxy_udp_bytes" direction = "up", "bytes up",
            "UDP payload bytes relayed"),
        /// Datagrams from upstream relayed to clients.
        datagrams_down: Counter("tproxy_udp_datagrams" direction = "down", "datagrams down",
            "UDP datagrams relayed"),
        /// Payload bytes relayed to clients.
        bytes_down: Counter("tproxy_udp_bytes" direction = "down", "bytes down",
            "UDP payload bytes relayed"),
        /// Datagrams dropped because they were larger than the buffer.
        truncated: Counter("tproxy_udp_truncated", "truncated",
            "UDP datagrams dropped for being larger than the buffer"),
        /// Datagrams addressed to the relay itself (not steered), dropped.
        refused_loops: Counter("tproxy_udp_refused_loops", "refused loops",
            "UDP datagrams to the relay itself, dropped"),
        /// Datagrams to the loopback socket whose original destination the
        /// cgroup hooks did not record (sent to it directly), dropped.
        refused_unknown: Counter("tproxy_udp_refused_unknown", "refused unknown",
            "UDP datagrams to the loopback socket without a recorded destination, dropped"),
        /// Datagrams whose original destination is this host, dropped.
        refused_local: Counter("tproxy_udp_refused_local", "refused local",
            "UDP datagrams to this host, dropped"),
        /// Datagrams dropped because the SOCKS5 associations being opened
        /// had queued their bound (bytes in all, or associations at once).
        queue_full: Counter("tproxy_udp_queue_full", "queue full",
            "UDP datagrams dropped while associations open, past the bound"),
        /// Sessions that could not be opened, and sends that failed.
        upstream_failures: Counter("tproxy_udp_upstream_failures", "upstream failures",
            "UDP sessions that could not open, and failed sends"),
    }
}

/// Bound transparent sockets, ready to be registered with the datapath and run.
pub struct UdpRelay {
    settings: RelaySettings,
    config: UdpRelayConfig,
    v4: TransparentUdp,
    v6: Option<TransparentUdp>,
    /// For the host's own datagrams (`RelaySettings::loopback`): IPv4, then
    /// IPv6.
    loopback: Vec<TransparentUdp>,
    original_dsts: Option<OriginalDsts>,
    stats: Arc<UdpRelayStats>,
    rules: Option<super::tcp::RulesWatch>,
}

impl UdpRelay {
    /// Binds the transparent sockets on the wildcard addresses.
    pub fn bind(settings: RelaySettings, config: UdpRelayConfig) -> Result<Self> {
        if config.max_sessions == Some(0) {
            return Err(Error::Config("the UDP session bound must be at least 1".into()));
        }
        if config.idle_timeout.is_zero() {
            return Err(Error::Config("the UDP idle timeout must be positive".into()));
        }
        let bind_err = |addr: SocketAddr| {
            move |e: io::Error| Error::io(format!("binding the UDP relay socket on {addr}"), e)
        };
        let v4_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.listen_port));
        let v4 = TransparentUdp::bind(v4_addr).map_err(bind_err(v4_addr))?;
        let port = v4.local_addr().map_err(bind_err(v4_addr))?.port();
        let v6 = if settings.ipv6 {
            let v6_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            Some(TransparentUdp::bind(v6_addr).map_err(bind_err(v6_addr))?)
        } else {
            None
        };
        let mut loopback = Vec::new();
        if settings.loopback {
            loopback.push(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
            if settings.ipv6 {
                loopback.push(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)));
            }
        }
        let loopback = loopback
            .into_iter()
            .map(|addr| TransparentUdp::bind(addr).map_err(bind_err(addr)))
            .collect::<Result<_>>()?;
        let settings = RelaySettings { listen_port: port, ..settings };
        let (stats, rules, original_dsts) = (Arc::default(), None, None);
        Ok(Self { settings, config, v4, v6, loopback, original_dsts, stats, rules })
    }

    /// The loopback sockets for the host's own datagrams (IPv4, then
    /// IPv6), if `RelaySettings::loopback` is on.
    pub fn loopback_sockets(&self) -> impl Iterator<Item = &UdpSocket> {
        self.loopback.iter().map(TransparentUdp::socket)
    }

    /// Where the datagrams to the loopback sockets meant to go (see
    /// [`crate::Interceptor::original_dsts`]).
    pub fn set_original_dsts(&mut self, dsts: OriginalDsts) {
        self.original_dsts = Some(dsts);
    }

    /// The port the sockets are bound to.
    pub fn port(&self) -> u16 {
        self.settings.listen_port
    }

    /// The IPv4 socket.
    pub fn ipv4_socket(&self) -> &UdpSocket {
        self.v4.socket()
    }

    /// The IPv6 socket, if IPv6 is on.
    pub fn ipv6_socket(&self) -> Option<&UdpSocket> {
        self.v6.as_ref().map(TransparentUdp::socket)
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<UdpRelayStats> {
        self.stats.clone()
    }

    /// Follows the interceptor's rules: sessions of flows that no rule
    /// intercepts any more are closed at once, so that their reply sockets
    /// (bound to the destination, connected to the client) stop taking the
    /// client's datagrams.
    pub fn follow_rules(&mut self, rules: super::tcp::RulesWatch) {
        self.rules = Some(rules);
    }

    /// Relays until `shutdown` is cancelled, then closes every session.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let local = LocalAddrs::watch(shutdown.clone());
        let mut table =
            SessionTable::new(self.settings, self.config.clone(), self.stats.clone(), local);
        let mut buf4 = vec![0u8; BUFFER_SIZE];
        let mut buf6 = vec![0u8; BUFFER_SIZE];
        let mut loopback_bufs = [vec![0u8; BUFFER_SIZE], vec![0u8; BUFFER_SIZE]];
        // The loopback sockets only serve with the hooks' record.
        let loopback = if self.original_dsts.is_some() { &self.loopback[..] } else { &[] };
        let (lo4, lo6) = (loopback.first(), loopback.get(1));
        let [lo4_buf, lo6_buf] = &mut loopback_bufs;
        let mut sweep = tokio::time::interval(sweep_interval(self.config.idle_timeout));
        let v6 = self.v6.as_ref();
        let mut rules = self.rules.take();
        let (associated_tx, mut associated) = mpsc::unbounded_channel();
        table.associated = Some(associated_tx);
        table.rules = rules.as_mut().map(|r| r.borrow_and_update().clone());
        loop {
            let (received, buf, from_loopback) = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((key, association)) = associated.recv() => {
                    table.finish_open(key, association);
                    continue;
                }
                Some(Ok(())) = async { Some(rules.as_mut()?.changed().await) } => {
                    let rules = rules.as_mut().expect("followed").borrow_and_update().clone();
                    table.close_unsteered(&rules);
                    table.rules = Some(rules);
                    continue;
                }
                _ = sweep.tick() => {
                    table.expire();
                    continue;
                }
                r = self.v4.recv(&mut buf4) => (r, &buf4, false),
                r = async { v6.unwrap().recv(&mut buf6).await }, if v6.is_some() => (r, &buf6, false),
                r = async { lo4.unwrap().recv(lo4_buf).await }, if lo4.is_some() => (r, &*lo4_buf, true),
                r = async { lo6.unwrap().recv(lo6_buf).await }, if lo6.is_some() => (r, &*lo6_buf, true),
            };
            match received {
                Ok(datagram) if from_loopback => {
                    // Sent to our loopback socket by the cgroup hooks:
                    // replies go back from there.
                    let relay = datagram.original_dst;
                    let dsts = self.original_dsts.as_ref().expect("loopback serves with a record");
                    match dsts.of(crate::rules::Protocol::Udp, datagram.client, relay) {
                        Ok(dst) => {
                            let datagram = Datagram { original_dst: dst, ..datagram };
                            let socket = if relay.is_ipv4() { lo4 } else { lo6 };
                            let from =
                                ReplyFrom::Loopback(socket.expect("received on it").shared());
                            table.relay(datagram, &buf[..datagram.len], from);
                        }
                        Err(e) => {
                            self.stats.refused_unknown.fetch_add(1, Relaxed);
                            debug!(client = %datagram.client, "UDP datagram to the loopback socket dropped: {e}");
                        }
                    }
                }
                Ok(datagram) => {
                    let from = ReplyFrom::Address(datagram.original_dst);
                    table.relay(datagram, &buf[..datagram.len], from);
                }
                Err(RecvError::Truncated { client, buffer }) => {
                    self.stats.truncated.fetch_add(1, Relaxed);
                    debug!(%client, "datagram larger than {buffer} bytes dropped");
                }
                Err(RecvError::NoOriginalDst(client)) => {
                    debug!(%client, "datagram without an original destination dropped");
                }
                Err(RecvError::Io(e)) => debug!("UDP receive: {e}"),
            }
        }
        table.close_all().await;
    }
}

/// Expiry runs a few times per timeout, so a session lives at most a quarter
/// longer than its idle timeout.
fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

type SessionKey = (SocketAddr, SocketAddr);

/// Where a session's replies to its client come from.
#[derive(Clone)]
enum ReplyFrom {
    /// A socket of the session's own, bound to this address (the original
    /// destination) and connected to the client.
    Address(SocketAddr),
    /// The relay's loopback socket that the cgroup hooks sent the client's
    /// datagrams to. Replies go out of it, as no other socket may share its
    /// port: a port shared with SO_REUSEADDR can be taken by any local user.
    Loopback(Arc<UdpSocket>),
}

impl ReplyFrom {
    /// The socket replies to `client` go out of, and the address to send
    /// them to when it is not connected to the client.
    fn open(
        self,
        client: SocketAddr,
        mark: u32,
    ) -> io::Result<(Arc<UdpSocket>, Option<SocketAddr>)> {
        match self {
            Self::Address(from) => {
                Ok((Arc::new(transparent::udp_reply_socket(from, client, mark)?), None))
            }
            Self::Loopback(socket) => Ok((socket, Some(client))),
        }
    }
}

struct Session {
    upstream: Arc<UdpSocket>,
    /// Through a SOCKS5 proxy: the association's control connection (it
    /// ends when this closes).
    _control: Option<TcpStream>,
    /// Through a SOCKS5 proxy: the UDP header for the destination, put
    /// before each datagram up.
    header: Option<Arc<[u8]>>,
    activity: Arc<Activity>,
    /// `activity.last_active` when the session was last moved to the front
    /// of the LRU.
    promoted_at: u64,
    /// Ends the session's task, with why: it relays what is queued, closes
    /// the sockets, then logs the outcome.
    stop: oneshot::Sender<&'static str>,
    task: JoinHandle<()>,
}

/// What a session's reply task and the table both update.
#[derive(Default)]
struct Activity {
    /// Milliseconds since the table's epoch of the last datagram either way.
    last_active: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

struct SessionTable {
    settings: RelaySettings,
    config: UdpRelayConfig,
    stats: Arc<UdpRelayStats>,
    local: LocalAddrs,
    sessions: LruCache<SessionKey, Session>,
    /// The sessions of each source, when a source may hold fewer than all.
    per_source: Option<SourceQueues<SessionKey>>,
    /// Sessions whose SOCKS5 association is being opened, with the
    /// datagrams that wait for it.
    opening: HashMap<SessionKey, Vec<Vec<u8>>>,
    /// Payload bytes queued in `opening`, at most [`MAX_QUEUED_BYTES`].
    queued_bytes: usize,
    /// The rules in force, for the sessions' upstream (`via`).
    rules: Option<Arc<crate::rules::RuleSet>>,
    /// Where opened associations are reported, to [`Self::finish_open`].
    associated: Option<mpsc::UnboundedSender<(SessionKey, io::Result<Association>)>>,
    epoch: Instant,
}

/// An opened SOCKS5 association with the session's reply socket.
type Association = (super::upstream::UdpAssociation, (Arc<UdpSocket>, Option<SocketAddr>));

/// Datagrams a session keeps while its association opens; more are dropped.
const MAX_WAITING: usize = 64;

/// Bytes all opening associations keep in all: without it, 16 384 opening
/// sessions of 64 datagrams each could queue gigabytes.
const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Associations opened at once: each is a TCP connection and a handshake.
const MAX_OPENING: usize = 256;

impl SessionTable {
    fn new(
        settings: RelaySettings,
        config: UdpRelayConfig,
        stats: Arc<UdpRelayStats>,
        local: LocalAddrs,
    ) -> Self {
        let (sessions, epoch) = (LruCache::unbounded(), Instant::now());
        let (opening, associated) = (HashMap::new(), None);
        let queued_bytes = 0;
        let max = config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        let share = config.max_sessions_per_source.unwrap_or(super::default_share(max));
        let per_source = (share < max).then(|| SourceQueues::new(share, settings.source_prefixes));
        Self {
            settings,
            config,
            stats,
            local,
            sessions,
            per_source,
            opening,
            queued_bytes,
            rules: None,
            associated,
            epoch,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sends one client datagram upstream, opening its session if needed;
    /// the session's replies come from `reply_from` (the original
    /// destination, or the loopback socket the datagram came to).
    fn relay(&mut self, datagram: Datagram, payload: &[u8], reply_from: ReplyFrom) {
        let Datagram { client, original_dst: dst, .. } = datagram;
        // Sent straight to our port rather than steered: relaying it would
        // have us send to ourselves.
        if dst.port() == self.settings.listen_port {
            self.stats.refused_loops.fetch_add(1, Relaxed);
            debug!(%client, %dst, "UDP datagram to the relay itself dropped");
            return;
        }
        if super::local::local_refused(&self.settings, &self.local, client, dst) {
            self.stats.refused_local.fetch_add(1, Relaxed);
            debug!(%client, %dst, "UDP datagram to this host dropped");
            return;
        }
        let now = self.now();
        let key = (client, dst);
        if !self.sessions.contains(&key)
            && let Some(upstream) = self.socks5_for(client, dst)
        {
            self.open_through_socks5(key, upstream, payload, reply_from);
            return;
        }
        if !self.sessions.contains(&key) {
            match self.open(client, dst, reply_from, now) {
                Ok(session) => self.insert(key, session),
                Err(e) => {
                    self.stats.upstream_failures.fetch_add(1, Relaxed);
                    debug!(%client, %dst, error = %e, "UDP session could not be opened");
                    return;
                }
            }
        }
        let session = self.sessions.get_mut(&key).expect("session just ensured");
        session.activity.last_active.store(now, Relaxed);
        session.promoted_at = now;
        // ECONNREFUSED reports an earlier ICMP unreachable; the session
        // stays, as the server may come up.
        let (upstream, header) = (&session.upstream, session.header.as_deref());
        forward(&**upstream, header, payload, Direction::Up, &session.activity, &self.stats);
    }

    /// The SOCKS5 proxy a new session goes through, if the deciding rule's
    /// upstream is one (UDP through any other goes directly).
    fn socks5_for(&self, client: SocketAddr, dst: SocketAddr) -> Option<super::upstream::Upstream> {
        let rules = self.rules.as_deref();
        let proxy =
            self.settings.upstreams.for_flow(rules, crate::rules::Protocol::Udp, client, dst);
        proxy.filter(|u| u.carries_udp()).cloned()
    }

    /// Starts opening a SOCKS5 association for `key`, or queues `payload`
    /// behind the one being opened.
    fn open_through_socks5(
        &mut self,
        key: SessionKey,
        upstream: super::upstream::Upstream,
        payload: &[u8],
        reply_from: ReplyFrom,
    ) {
        if self.queued_bytes + payload.len() > MAX_QUEUED_BYTES {
            self.stats.queue_full.fetch_add(1, Relaxed);
            return;
        }
        if let Some(waiting) = self.opening.get_mut(&key) {
            if waiting.len() < MAX_WAITING {
                waiting.push(payload.to_vec());
                self.queued_bytes += payload.len();
            } else {
                self.stats.queue_full.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some(report) = self.associated.clone() else { return };
        // Associations being opened count against the session bound too.
        let bound = self.config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS).min(MAX_OPENING);
        if self.opening.len() >= bound {
            self.stats.queue_full.fetch_add(1, Relaxed);
            debug!(client = %key.0, dst = %key.1, "too many UDP associations opening; datagram dropped");
            return;
        }
        self.queued_bytes += payload.len();
        self.opening.insert(key, vec![payload.to_vec()]);
        let dial = DialOptions { mark: self.settings.upstream_mark, ..DialOptions::default() };
        let client = key.0;
        tokio::spawn(async move {
            let association = async {
                let association = upstream.associate_udp(&dial).await?;
                let reply = reply_from.open(client, dial.mark)?;
                Ok((association, reply))
            }
            .await;
            let _ = report.send((key, association));
        });
    }

    /// A SOCKS5 association for `key` opened, or failed: the session
    /// starts with what waited for it, or what waited is dropped.
    fn finish_open(&mut self, key: SessionKey, association: io::Result<Association>) {
        let Some(waiting) = self.opening.remove(&key) else { return };
        self.queued_bytes -= waiting.iter().map(Vec::len).sum::<usize>();
        let (client, dst) = key;
        let (association, reply) = match association {
            Ok(opened) => opened,
            Err(e) => {
                self.stats.upstream_failures.fetch_add(1, Relaxed);
                debug!(%client, %dst, error = %e, "UDP ASSOCIATE failed");
                return;
            }
        };
        let now = self.now();
        let header = super::upstream::socks5_udp_header(dst);
        let session = self.start(
            key,
            Arc::new(association.socket),
            reply,
            Some(association.control),
            Some(header.into()),
            now,
        );
        for payload in &waiting {
            let (upstream, header) = (&session.upstream, session.header.as_deref());
            forward(&**upstream, header, payload, Direction::Up, &session.activity, &self.stats);
        }
        self.insert(key, session);
    }

    fn open(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
        reply_from: ReplyFrom,
        now: u64,
    ) -> io::Result<Session> {
        let dial = DialOptions {
            source: self.settings.spoofed_source(client),
            mark: self.settings.upstream_mark,
            ..DialOptions::default()
        };
        let upstream = Arc::new(transparent::udp_upstream(dst, &dial)?);
        let reply = reply_from.open(client, dial.mark)?;
        Ok(self.start((client, dst), upstream, reply, None, None, now))
    }

    /// A session on its sockets, its task relaying replies.
    fn start(
        &self,
        (client, dst): SessionKey,
        upstream: Arc<UdpSocket>,
        (reply, reply_to): (Arc<UdpSocket>, Option<SocketAddr>),
        control: Option<TcpStream>,
        header: Option<Arc<[u8]>>,
        now: u64,
    ) -> Session {
        let activity = Arc::new(Activity::default());
        activity.last_active.store(now, Relaxed);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(relay_replies(
            (client, dst),
            Sockets { upstream: upstream.clone(), reply, reply_to, header: header.clone(), dst },
            activity.clone(),
            self.epoch,
            self.stats.clone(),
            stopped,
        ));
        self.stats.sessions_total.fetch_add(1, Relaxed);
        self.stats.sessions_active.fetch_add(1, Relaxed);
        debug!(%client, %dst, upstream = ?upstream.local_addr().ok(), "UDP session opened");
        Session { upstream, _control: control, header, activity, promoted_at: now, stop, task }
    }

    /// Adds a session, after closing its source's oldest if the source is
    /// at its bound, and the least recently used if the table is full.
    fn insert(&mut self, key: SessionKey, session: Session) {
        let sessions = &self.sessions;
        let oldest =
            self.per_source.as_mut().and_then(|p| p.over(key.0.ip(), |k| sessions.contains(k)));
        if let Some(session) = oldest.and_then(|old| self.remove(old)) {
            self.stats.sessions_evicted_per_source.fetch_add(1, Relaxed);
            self.close(session, "evicted: its source is at its bound");
        }
        self.make_room();
        self.sessions.put(key, session);
        if let Some(p) = &mut self.per_source {
            p.added(key.0.ip(), key);
        }
    }

    /// Takes a session out of the table.
    fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let session = self.sessions.pop(&key)?;
        self.released(key);
        Some(session)
    }

    /// `key` left the table.
    fn released(&mut self, key: SessionKey) {
        let sessions = &self.sessions;
        if let Some(p) = &mut self.per_source {
            p.removed(key.0.ip(), key, |k| sessions.contains(k));
        }
    }

    /// Evicts least recently used sessions until one more fits. A session
    /// whose server spoke since it was last promoted gets a second chance.
    fn make_room(&mut self) {
        let mut second_chances = self.sessions.len();
        while self.sessions.len() >= self.config.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS) {
            let Some((key, mut session)) = self.sessions.pop_lru() else { return };
            let last = session.activity.last_active.load(Relaxed);
            if last > session.promoted_at && second_chances > 0 {
                second_chances -= 1;
                session.promoted_at = last;
                self.sessions.put(key, session);
                continue;
            }
            self.released(key);
            self.stats.sessions_evicted.fetch_add(1, Relaxed);
            self.close(session, "evicted: the table is full");
        }
    }

    /// Closes sessions idle for longer than the timeout.
    fn expire(&mut self) {
        let idle = self.config.idle_timeout.as_millis() as u64;
        let now = self.now();
        let expired: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.activity.last_active.load(Relaxed)) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(session) = self.remove(key) {
                self.stats.sessions_expired.fetch_add(1, Relaxed);
                self.close(session, "expired");
            }
        }
    }

    /// Ends a session. Its task logs the outcome once the sockets are
    /// closed, so that the line means the reply socket takes no more.
    fn close(&self, session: Session, outcome: &'static str) -> JoinHandle<()> {
        // Datagrams the program already handed to the session's sockets
        // are relayed before they close; later ones open a new session.
        let _ = session.stop.send(outcome);
        self.stats.sessions_active.fetch_sub(1, Relaxed);
        session.task
    }

    /// Closes the sessions of flows that `rules` no longer intercept.
    fn close_unsteered(&mut self, rules: &crate::rules::RuleSet) {
        let gone: Vec<SessionKey> = self
            .sessions
            .iter()
            .map(|(k, _)| *k)
            .filter(|(client, dst)| {
                !rules.intercepts(crate::rules::Protocol::Udp, client.ip(), dst.ip(), dst.port())
            })
            .collect();
        for key in gone {
            if let Some(session) = self.remove(key) {
                self.close(session, "closed: no rule intercepts it now");
            }
        }
    }

    /// Closes every session, and waits until their sockets are closed.
    async fn close_all(&mut self) {
        let mut tasks = Vec::with_capacity(self.sessions.len());
        while let Some((_, session)) = self.sessions.pop_lru() {
            tasks.push(self.close(session, "closed: shutting down"));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

thread_local! {
    /// Datagram buffers shared by the sessions on a worker thread: a
    /// session holds no buffer while it waits, so idle sessions cost two
    /// sockets.
    static BATCH: RefCell<Batch> = RefCell::new(Batch::new());
}

/// Which way a session's datagrams go.
#[derive(Clone, Copy)]
enum Direction {
    /// Server to client: arrived on the upstream socket.
    Down,
    /// Client to server, arriving on the reply socket: steering that looks
    /// for an existing socket first (iptables TPROXY does) finds the reply
    /// socket, which is bound to the original destination.
    Up,
}

/// A session's sockets, and how datagrams up are framed.
struct Sockets {
    upstream: Arc<UdpSocket>,
    reply: Arc<UdpSocket>,
    /// The client, when `reply` is the relay's shared loopback socket,
    /// which is not connected and whose datagrams up the relay reads.
    reply_to: Option<SocketAddr>,
    /// The SOCKS5 UDP header up, if through a proxy.
    header: Option<Arc<[u8]>>,
    /// The original destination: through a proxy, only datagrams it says
    /// came from there are replies.
    dst: SocketAddr,
}

/// Moves datagrams between a session's two sockets until it is stopped,
/// then closes them and logs the session's end.
async fn relay_replies(
    (client, dst): SessionKey,
    sockets: Sockets,
    activity: Arc<Activity>,
    epoch: Instant,
    stats: Arc<UdpRelayStats>,
    stop: oneshot::Receiver<&'static str>,
) {
    let opened = Instant::now();
    let outcome = relay_until_stopped(&sockets, &activity, epoch, &stats, stop).await;
    drop(sockets);
    let up = activity.bytes_up.load(Relaxed);
    let down = activity.bytes_down.load(Relaxed);
    let duration = opened.elapsed();
    debug!(%client, %dst, up, down, ?duration, "UDP session {outcome}");
}

/// Relays until `stop` says why the session ends, and returns that.
async fn relay_until_stopped(
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
fn relay_queued(
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
                        match super::upstream::socks5_udp_payload(datagram) {
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
const BATCH_SIZE: usize = 8;

/// A worker thread's receive buffers, one per datagram of a batch, each a
/// byte larger than any datagram.
struct Batch {
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
struct Target<'a> {
    socket: &'a UdpSocket,
    peer: Option<SocketAddr>,
}

impl<'a> From<&'a UdpSocket> for Target<'a> {
    fn from(socket: &'a UdpSocket) -> Self {
        Self { socket, peer: None }
    }
}

fn forward<'a>(
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
