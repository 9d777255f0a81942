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
    relay::access_log::{AccessLog, Entry},
};

mod session;
mod table;

use session::*;
use table::*;

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
    access_log: Option<AccessLog>,
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
        let (stats, rules, original_dsts, access_log) = (Arc::default(), None, None, None);
        Ok(Self { settings, config, v4, v6, loopback, original_dsts, stats, rules, access_log })
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

    /// Writes an entry for every session as it ends.
    pub fn set_access_log(&mut self, log: AccessLog) {
        self.access_log = Some(log);
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
        table.access_log = self.access_log.take();
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
