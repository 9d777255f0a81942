//! The relays of one run: bound, handed to the datapath, run and stopped.

use std::{future::Future, os::fd::AsFd, os::fd::BorrowedFd};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    control::systemd,
    counters::Snapshot as _,
    error::Result,
    intercept::{Interceptor, RelaySocket},
    relay::{
        RelaySettings, TcpRelay, TcpRelayConfig, TcpRelayStats, UdpRelay, UdpRelayConfig,
        UdpRelayStats,
        access_log::AccessLog,
        timewait::{self, Purge, Whose},
    },
};

/// The sockets the datapath steers to.
pub(super) fn sockets(relays: Option<&(TcpRelay, UdpRelay)>) -> Vec<(RelaySocket, BorrowedFd<'_>)> {
    let mut sockets = Vec::new();
    let Some((tcp, udp)) = relays else { return sockets };
    sockets.push((RelaySocket::TcpV4, tcp.ipv4_listener().as_fd()));
    sockets.push((RelaySocket::UdpV4, udp.ipv4_socket().as_fd()));
    if let Some(v6) = tcp.ipv6_listener() {
        sockets.push((RelaySocket::TcpV6, v6.as_fd()));
    }
    if let Some(v6) = udp.ipv6_socket() {
        sockets.push((RelaySocket::UdpV6, v6.as_fd()));
    }
    let tcp_kinds = [RelaySocket::LoopbackTcpV4, RelaySocket::LoopbackTcpV6];
    let tcp_loopback = tcp.loopback_listeners().iter().map(|l| l.as_fd());
    sockets.extend(tcp_kinds.into_iter().zip(tcp_loopback));
    let udp_kinds = [RelaySocket::LoopbackUdpV4, RelaySocket::LoopbackUdpV6];
    sockets.extend(udp_kinds.into_iter().zip(udp.loopback_sockets().map(|s| s.as_fd())));
    sockets
}

/// Has the relays follow the interceptor's rules and, for the host's own
/// connections, its record of where they meant to go.
pub(super) fn follow(
    (mut tcp, mut udp): (TcpRelay, UdpRelay),
    interceptor: &Interceptor,
    access_log: Option<&AccessLog>,
) -> (TcpRelay, UdpRelay) {
    if let Some(log) = access_log {
        tcp.set_access_log(log.clone());
        udp.set_access_log(log.clone());
    }
    tcp.follow_rules(interceptor.watch_rules());
    udp.follow_rules(interceptor.watch_rules());
    if let Some(dsts) = interceptor.original_dsts() {
        tcp.set_original_dsts(dsts.clone());
        udp.set_original_dsts(dsts.clone());
    }
    (tcp, udp)
}

/// Relays running until [`Running::stop`].
pub(super) struct Running {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Runs them; returns what `ready:` says of them.
    pub fn start((tcp, udp): (TcpRelay, UdpRelay)) -> (Self, String) {
        let status = ready(&tcp, &udp);
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(tcp.run(stop.clone()));
        tasks.spawn(udp.run(stop.clone()));
        (Self { stop, tasks }, status)
    }

    /// Closes what they hold and waits until they have.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs only the relays, on `settings.listen_port`, until `shutdown`
/// completes: for traffic steered by other means (iptables `-j TPROXY
/// --on-port`).
pub async fn relay_only(
    settings: RelaySettings,
    tcp: TcpRelayConfig,
    udp: UdpRelayConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    crate::host::system::check_relay_privileges()?;
    let (mut tcp, mut udp) = (tcp, udp);
    crate::relay::fit_to_descriptors(&mut tcp, &mut udp);
    let (tcp, udp) = bind_relays(settings, tcp, udp)?;
    let (tcp_stats, udp_stats) = (tcp.stats(), udp.stats());
    systemd::ready(&ready(&tcp, &udp));
    let stop = CancellationToken::new();
    let tasks = (tokio::spawn(tcp.run(stop.clone())), tokio::spawn(udp.run(stop.clone())));
    shutdown.await;
    info!("shutting down");
    systemd::stopping();
    stop.cancel();
    let _ = tokio::join!(tasks.0, tasks.1);
    // Which ports were steered here is the rules' business; every
    // transparent TIME_WAIT socket in this namespace is a relay's.
    timewait::purge(Purge::All, RELAYED);
    summarize(&tcp_stats, &udp_stats);
    Ok(())
}

/// Binds both relays on one port. With the port left to the kernel, UDP
/// takes another if TCP's is not free for it.
pub(super) fn bind_relays(
    settings: RelaySettings,
    tcp: TcpRelayConfig,
    udp: UdpRelayConfig,
) -> Result<(TcpRelay, UdpRelay)> {
    let chosen = settings.listen_port == 0;
    let tcp = TcpRelay::bind(settings.clone(), tcp)?;
    let on = |listen_port| RelaySettings { listen_port, ..settings.clone() };
    let udp = match UdpRelay::bind(on(tcp.port()), udp.clone()) {
        Err(_) if chosen => UdpRelay::bind(on(0), udp)?,
        other => other?,
    };
    Ok((tcp, udp))
}

/// The line tests and operators wait for; returns what it says.
fn ready(tcp: &TcpRelay, udp: &UdpRelay) -> String {
    let status = format!("relay listening on port {} (tcp) and {} (udp)", tcp.port(), udp.port());
    info!("ready: {status}");
    status
}

/// The relays' counters, as the run ends.
pub(super) fn summarize(tcp: &TcpRelayStats, udp: &UdpRelayStats) {
    info!("tcp relay: {}", tcp.snapshot().summary());
    info!("udp relay: {}", udp.snapshot().summary());
}

/// The relay's own TIME_WAIT sockets, removed as it stops.
pub(super) const RELAYED: Whose = Whose::Ours("of relayed connections");
