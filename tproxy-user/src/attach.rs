//! `tproxy-user attach`: interception plus the relay, until told to stop.

use std::{future::Future, os::fd::AsFd};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    error::{Error, Result},
    intercept::{InterceptConfig, Interceptor, RelaySocket},
    relay::{TcpRelay, TcpRelayConfig},
};

/// Everything `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    pub intercept: InterceptConfig,
    pub relay: TcpRelayConfig,
}

/// Runs interception and the relay until `shutdown` completes, then removes
/// everything it added.
pub async fn run(config: AttachConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let AttachConfig { intercept, relay } = config;
    if relay.listen_port != 0 && intercept.tcp_ports.contains(&relay.listen_port) {
        return Err(Error::Config(format!(
            "--listen-port {} is also an intercepted port",
            relay.listen_port
        )));
    }
    crate::intercept::preflight(&intercept)?;
    let relay = TcpRelay::bind(relay)?;
    let mut sockets = vec![(RelaySocket::TcpV4, relay.ipv4_listener().as_fd())];
    if let Some(v6) = relay.ipv6_listener() {
        sockets.push((RelaySocket::TcpV6, v6.as_fd()));
    }
    let interceptor = Interceptor::start(intercept, &sockets).await?;
    drop(sockets);
    let stats = relay.stats();
    info!("ready: relay listening on port {}", relay.port());

    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    shutdown.await;
    info!("shutting down");
    let datapath_stats = interceptor.stats();
    // Detach first, so new traffic flows untouched while the relay closes.
    let stopped = interceptor.stop().await;
    stop.cancel();
    let _ = relay_task.await;
    if let Ok(s) = datapath_stats {
        info!(
            "datapath: {} packets to the listener, {} to existing sockets, {} SYNs met TIME_WAIT ({} handed over), {} passed without a listener, {} assign failures",
            s.to_listener, s.to_socket, s.tw_syn, s.tw_handover, s.no_listener, s.assign_failed
        );
    }
    info!("relay: {}", stats.summary());
    stopped
}
