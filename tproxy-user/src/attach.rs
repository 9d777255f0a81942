//! `tproxy-user attach`: interception plus the relays, until told to stop.

use std::{future::Future, os::fd::AsFd};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    error::{Error, Result},
    intercept::{InterceptConfig, Interceptor, RelaySocket},
    relay::{TcpRelay, TcpRelayConfig, UdpRelay, UdpRelayConfig},
};

/// Everything `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// What to intercept, where, and the routing marks.
    pub intercept: InterceptConfig,
    /// The TCP relay. Its `listen_port` is the UDP relay's too.
    pub tcp: TcpRelayConfig,
    /// The UDP relay; its `listen_port` is ignored.
    pub udp: UdpRelayConfig,
}

/// Runs interception and the relays until `shutdown` completes, then removes
/// everything it added.
pub async fn run(config: AttachConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let AttachConfig { intercept, tcp, udp } = config;
    let port = tcp.listen_port;
    if port != 0 && intercept.rules.iter().any(|r| r.covers_port(port)) {
        return Err(Error::Config(format!("--listen-port {port} is also an intercepted port")));
    }
    crate::intercept::preflight(&intercept)?;
    let tcp = TcpRelay::bind(tcp)?;
    // Both relays on one port when it is free for UDP too.
    let udp = match UdpRelay::bind(UdpRelayConfig { listen_port: tcp.port(), ..udp.clone() }) {
        Err(_) if port == 0 => UdpRelay::bind(UdpRelayConfig { listen_port: 0, ..udp })?,
        other => other?,
    };
    let mut sockets = vec![
        (RelaySocket::TcpV4, tcp.ipv4_listener().as_fd()),
        (RelaySocket::UdpV4, udp.ipv4_socket().as_fd()),
    ];
    if let Some(v6) = tcp.ipv6_listener() {
        sockets.push((RelaySocket::TcpV6, v6.as_fd()));
    }
    if let Some(v6) = udp.ipv6_socket() {
        sockets.push((RelaySocket::UdpV6, v6.as_fd()));
    }
    let interceptor = Interceptor::start(intercept, &sockets).await?;
    drop(sockets);
    let (tcp_stats, udp_stats) = (tcp.stats(), udp.stats());
    info!("ready: relay listening on port {} (tcp) and {} (udp)", tcp.port(), udp.port());

    let stop = CancellationToken::new();
    let tcp_task = tokio::spawn(tcp.run(stop.clone()));
    let udp_task = tokio::spawn(udp.run(stop.clone()));
    shutdown.await;
    info!("shutting down");
    let datapath_stats = interceptor.stats();
    // Detach first, so new traffic flows untouched while the relays close.
    let stopped = interceptor.stop().await;
    stop.cancel();
    let _ = tokio::join!(tcp_task, udp_task);
    if let Ok(s) = datapath_stats {
        info!(
            "datapath: {} packets to the listener, {} to existing sockets, {} SYNs met TIME_WAIT ({} handed over), {} replies to spoofed sockets, {} passed without a listener, {} assign failures",
            s.to_listener,
            s.to_socket,
            s.tw_syn,
            s.tw_handover,
            s.return_path,
            s.no_listener,
            s.assign_failed
        );
    }
    info!("relay: {}", tcp_stats.summary());
    info!("relay: {}", udp_stats.summary());
    stopped
}
