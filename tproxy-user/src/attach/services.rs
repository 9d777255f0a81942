//! What runs beside the relays: the control socket, metrics and probes,
//! and the rules file's watcher, all ended by one token.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    control::{
        ControlSocket, Controller,
        metrics::{MetricsServer, Served},
    },
    error::Result,
};

/// The services of one run.
pub(super) struct Services {
    pub stop: CancellationToken,
    pub tasks: tokio::task::JoinSet<()>,
    pub served: Arc<Served>,
}

impl Services {
    pub fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
            served: Served::new(),
        }
    }

    /// Serves metrics and probes on `addr`, if given, until stopped.
    pub async fn serve_metrics(&mut self, addr: Option<SocketAddr>) -> Result<()> {
        let Some(addr) = addr else { return Ok(()) };
        let metrics = MetricsServer::bind(addr).await?;
        if let Some(addr) = metrics.local_addr() {
            info!("metrics on http://{addr}/metrics, probes on /healthz and /readyz");
        }
        self.tasks.spawn(metrics.serve(self.served.clone(), self.stop.clone()));
        Ok(())
    }

    /// Serves the control socket, if bound, and watches the rules file at
    /// `watched`, if given, until stopped.
    pub fn control(
        &mut self,
        controller: &Arc<Controller>,
        socket: Option<ControlSocket>,
        watched: Option<(PathBuf, Option<Vec<u8>>)>,
    ) {
        if let Some((path, applied)) = watched {
            self.tasks.spawn(watch_rules(path, applied, controller.clone(), self.stop.clone()));
        }
        if let Some(socket) = socket {
            self.tasks.spawn(socket.serve(controller.clone(), self.stop.clone()));
        }
        self.tasks.spawn(crate::control::systemd::watchdog(controller.clone(), self.stop.clone()));
    }

    /// Stops them all; the control socket and the metrics port are free
    /// once this returns.
    pub async fn stop(mut self) {
        self.served.stopping();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The control socket at `path`, if one is wanted.
pub(super) async fn bind_control(path: Option<&std::path::Path>) -> Result<Option<ControlSocket>> {
    match path {
        Some(path) => Ok(Some(ControlSocket::bind(path).await?)),
        None => Ok(None),
    }
}

/// Reloads when the content of the rules file at `path` changes from
/// `applied` (what the start read).
async fn watch_rules(
    path: PathBuf,
    mut applied: Option<Vec<u8>>,
    controller: Arc<Controller>,
    shutdown: CancellationToken,
) {
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(2);
    // A file that cannot be read is left to the next look (a ConfigMap
    // update swaps it, and an edit may be half done).
    let mut ticks = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Ok(now) = tokio::fs::read(&path).await else { continue };
        if applied.as_ref() == Some(&now) {
            continue;
        }
        info!("{} changed", path.display());
        if let Err(e) = controller.reload().await {
            warn!("reload refused, the rules stay as they were: {e}");
        }
        // Refused or not, this content was seen: the next change retries.
        applied = Some(now);
    }
}
