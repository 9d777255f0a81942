//! `tproxy-user attach`: interception plus the relays, live control and
//! metrics, until told to stop.

use std::{future::Future, net::SocketAddr, os::fd::AsFd, path::PathBuf, sync::Arc};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    control::{
        ControlSocket, Controller, config,
        metrics::{MetricsServer, Served},
        systemd,
    },
    counters::Snapshot as _,
    error::{Error, Result},
    intercept::{InterceptConfig, Interceptor, Loaded, RelaySocket, Target},
    relay::{
        RelaySettings, SourcePrefixes, TcpRelay, TcpRelayConfig, TcpRelayStats, UdpRelay,
        UdpRelayConfig, UdpRelayStats,
        timewait::{self, Purge, Whose},
    },
};

/// Everything `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// What to intercept, where, and the routing marks. Its rules are kept
    /// across reloads of `rules_file`. Its `upstream_mark`, `spoof_source`
    /// and `intercept_local` are the relays' too (see
    /// [`AttachConfig::relay_settings`]). With a [`Target::Port`] target no
    /// relay runs: flows go to another program's listener, and the relay
    /// settings below are unused.
    pub intercept: InterceptConfig,
    /// Port of the relays' transparent sockets, TCP and UDP; 0 lets the
    /// kernel pick one.
    pub listen_port: u16,
    /// Also relay IPv6.
    pub ipv6: bool,
    /// How clients are grouped for the relays' per-source bounds.
    pub source_prefixes: SourcePrefixes,
    /// The TCP relay's limits and timeouts.
    pub tcp: TcpRelayConfig,
    /// The UDP relay's limits.
    pub udp: UdpRelayConfig,
    /// Reach original destinations through these proxies (TCP; UDP too for
    /// SOCKS5) instead of directly: the default, or the one a rule names.
    pub upstreams: crate::relay::upstream::Upstreams,
    /// A rules file (see [`crate::control::config`]), applied at start and again on SIGHUP
    /// or `tproxy-user reload`.
    pub rules_file: Option<PathBuf>,
    /// Also reload the rules file whenever its content changes (checked
    /// every two seconds, through symlinks: a Kubernetes ConfigMap volume
    /// replaces its files by swapping a symlink).
    pub watch_rules_file: bool,
    /// Serve live control on this Unix socket (see [`crate::control`]).
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Once a takeover has let this instance go, how long it keeps relaying
    /// its connections and sessions before it closes what is left.
    pub drain_timeout: std::time::Duration,
}

/// Default drain: five minutes, as long as a slow download or a chatty
/// session usually needs, short enough that an upgrade ends.
pub const DEFAULT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl AttachConfig {
    /// Interception with default relays, with the control socket of its
    /// instance name and without a rules file or metrics.
    pub fn new(intercept: InterceptConfig) -> Self {
        Self {
            control_socket: Some(crate::instance::socket_path(&intercept.name)),
            intercept,
            listen_port: 0,
            ipv6: crate::host::system::ipv6_enabled(),
            source_prefixes: SourcePrefixes::default(),
            tcp: TcpRelayConfig::default(),
            udp: UdpRelayConfig::default(),
            upstreams: Default::default(),
            rules_file: None,
            watch_rules_file: false,
            metrics: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// What the relays share, as this configuration sets it.
    pub fn relay_settings(&self) -> RelaySettings {
        RelaySettings {
            listen_port: self.listen_port,
            ipv6: self.ipv6,
            upstream_mark: self.intercept.upstream_mark,
            spoof_source: self.intercept.spoof_source,
            allow_local_destinations: self.intercept.intercept_local,
            upstreams: self.upstreams.clone(),
            loopback: !self.intercept.cgroups.is_empty(),
            source_prefixes: self.source_prefixes,
        }
    }
}

/// Runs interception and the relays until `shutdown` completes, then removes
/// everything it added. With a rules file, SIGHUP reloads it.
pub async fn run(config: AttachConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    prepare(config)?.run(shutdown).await
}

/// An `attach` ready to run: its input checked, its name claimed (what a
/// dead run under it left is removed), its routing values chosen and its
/// programs loaded. Made without a runtime or threads, so that a process
/// can then drop the capabilities only loading needs.
pub struct Prepared {
    config: AttachConfig,
    /// Started by SIGUSR2 (see [`crate::upgrade`]).
    successor: Option<crate::upgrade::Successor>,
    fixed_rules: Vec<crate::rules::Rule>,
    /// The rules file as it was applied at start.
    rules_file_contents: Option<Vec<u8>>,
    intercept: Loaded,
}

/// Checks `config` and the host, claims the instance and loads the programs.
pub fn prepare(mut config: AttachConfig) -> Result<Prepared> {
    let fixed_rules = config.intercept.rules.clone();
    let mut rules_file_contents = None;
    if let Some(path) = &config.rules_file {
        let (rules, contents) = config::load_rules_and_contents(path)?;
        config.intercept.rules.extend(rules);
        rules_file_contents = Some(contents);
    }
    if config.tcp.listeners > 1 {
        crate::host::kernel::REUSEPORT_ASSIGN.require()?;
    }
    let port = config.listen_port;
    let relays = config.intercept.target == Target::Relay;
    if relays && port != 0 && config.intercept.rules.iter().any(|r| r.covers_port(port)) {
        return Err(Error::Config(format!("--listen-port {port} is also an intercepted port")));
    }
    crate::relay::fit_to_descriptors(&mut config.tcp, &mut config.udp);
    config.upstreams.check(&config.intercept.rules)?;
    if config.intercept.rules.iter().any(|r| r.protocols.contains(&crate::rules::Protocol::Udp)) {
        for upstream in config.upstreams.all().filter(|u| !u.carries_udp()) {
            warn!("{upstream} carries TCP only: UDP flows it would take are relayed directly");
        }
    }
    let intercept = Interceptor::load(config.intercept.clone())?;
    // Choosing the routing values may have changed the upstream mark, which
    // the relays take from it.
    config.intercept = intercept.config().clone();
    Ok(Prepared { config, successor: None, fixed_rules, rules_file_contents, intercept })
}

impl Prepared {
    /// SIGUSR2 starts `successor`, which takes over from this instance
    /// (an upgrade in place; see [`crate::upgrade`]).
    pub fn upgrade_with(mut self, successor: crate::upgrade::Successor) -> Self {
        self.successor = Some(successor);
        self
    }

    /// The configuration, with the routing values chosen.
    pub fn config(&self) -> &AttachConfig {
        &self.config
    }

    /// Runs until `shutdown` completes, then removes everything it added;
    /// or until a takeover asks for the name, then lets go and drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Prepared { config, successor, fixed_rules, rules_file_contents, intercept } = self;
        let settings = config.relay_settings();
        let AttachConfig {
            tcp,
            udp,
            upstreams,
            rules_file,
            watch_rules_file,
            control_socket,
            metrics,
            drain_timeout,
            ..
        } = config;
        let name = intercept.config().name.clone();
        let takeover = intercept.config().takeover;
        let stop = CancellationToken::new();
        let mut services = tokio::task::JoinSet::new();
        let served = Served::new();
        // Everything that can fail for a reason the user can fix is bound
        // before anything is attached; the control socket only now that the
        // name is ours. A takeover binds them once the running instance has
        // let go of them.
        let mut control = None;
        if !takeover {
            control = bind_control(control_socket.as_deref()).await?;
            serve_metrics(metrics, &served, &stop, &mut services).await?;
        }
        // Always: a SIGHUP without a rules file is refused, not fatal (a
        // unit's ExecReload sends one).
        let mut hangup = signal(SignalKind::hangup())
            .map_err(|e| Error::io("installing a SIGHUP handler", e))?;
        let target = intercept.config().target;
        let relays = match target {
            Target::Relay => Some(bind_relays(settings, tcp, udp).map_err(|e| {
                if takeover { Error::Config(format!("{e} (the running instance holds its port until it hands over: leave --listen-port out)")) } else { e }
            })?),
            Target::Port(_) => None,
        };
        let mut sockets = Vec::new();
        if let Some((tcp, udp)) = &relays {
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
        }
        let mut interceptor = intercept.start(&sockets).await?;
        drop(sockets);
        if takeover {
            // Attached beside the running instance: new flows come here now.
            if let Err(e) = take_over(&name, &mut interceptor).await {
                let _ = interceptor.stop().await;
                return Err(e);
            }
            control = match bind_control(control_socket.as_deref()).await {
                Ok(control) => control,
                Err(e) => {
                    warn!("{e}: running without a control socket");
                    None
                }
            };
            if let Err(e) = serve_metrics(metrics, &served, &stop, &mut services).await {
                warn!("{e}: running without metrics");
            }
        }
        let relays = relays.map(|(mut tcp, mut udp)| {
            tcp.follow_rules(interceptor.watch_rules());
            udp.follow_rules(interceptor.watch_rules());
            if let Some(dsts) = interceptor.original_dsts() {
                tcp.set_original_dsts(dsts.clone());
                udp.set_original_dsts(dsts.clone());
            }
            (tcp, udp)
        });
        let relay_stats = relays.as_ref().map(|(tcp, udp)| (tcp.stats(), udp.stats()));
        let watched = rules_file.clone().filter(|_| watch_rules_file);
        let controller = Arc::new(Controller::new(
            name,
            interceptor,
            relay_stats.clone(),
            upstreams,
            fixed_rules,
            rules_file,
        ));
        let mut handovers = controller.handovers();
        if let Some(path) = watched {
            services.spawn(watch_rules(
                path,
                rules_file_contents,
                controller.clone(),
                stop.clone(),
            ));
        }
        if let Some(socket) = control {
            services.spawn(socket.serve(controller.clone(), stop.clone()));
        }
        services.spawn(systemd::watchdog(controller.clone(), stop.clone()));
        let relays_stop = CancellationToken::new();
        let mut relay_tasks = tokio::task::JoinSet::new();
        let status = match relays {
            Some((tcp, udp)) => {
                let status = ready(&tcp, &udp);
                relay_tasks.spawn(tcp.run(relays_stop.clone()));
                relay_tasks.spawn(udp.run(relays_stop.clone()));
                status
            }
            None => {
                let status = format!("steering to {target} (no relay of ours)");
                info!("ready: {status}");
                status
            }
        };
        served.running(controller.clone());
        if takeover {
            systemd::took_over(&status)
        } else {
            systemd::ready(&status)
        }
        let mut upgrade = signal(SignalKind::user_defined2())
            .map_err(|e| Error::io("installing a SIGUSR2 handler", e))?;

        tokio::pin!(shutdown);
        let handover = loop {
            tokio::select! {
                _ = &mut shutdown => break None,
                Some(reply) = handovers.recv() => break Some(reply),
                _ = upgrade.recv() => match &successor {
                    Some(successor) => successor.start(),
                    None => warn!("SIGUSR2: this instance was started without an upgrade helper"),
                },
                _ = hangup.recv() => {
                    if let Err(e) = controller.reload().await {
                        warn!("reload refused, the rules stay as they were: {e}");
                    }
                }
            }
        };
        if handover.is_some() {
            info!("a new instance takes over: letting go, then draining");
        } else {
            info!("shutting down");
            systemd::stopping();
        }
        served.stopping();
        stop.cancel();
        // The control socket and the metrics port are free once these end.
        while services.join_next().await.is_some() {}
        let Some(interceptor) = controller.take_interceptor().await else {
            return Ok(());
        };
        let datapath_stats = interceptor.stats();
        let ports = interceptor.intercepted_tcp_ports().clone();
        if let Ok(s) = &datapath_stats {
            info!("datapath: {}", s.summary());
        }
        let stopped = match handover {
            Some(reply) => {
                // The new instance's programs steer every flow now, ours
                // included (to our sockets, by their tuples).
                let stopped = interceptor.stop().await;
                let _ = reply.send(stopped.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                if let Some((tcp, udp)) = &relay_stats {
                    tokio::select! {
                        _ = drain(tcp, udp, drain_timeout) => {}
                        _ = &mut shutdown => info!("told to stop while draining"),
                    }
                }
                relays_stop.cancel();
                while relay_tasks.join_next().await.is_some() {}
                // The new instance relays the same ports: its TIME_WAIT
                // sockets are not ours to remove.
                stopped
            }
            None => {
                // Detach first, so new traffic flows untouched while the
                // relays close; the name is given up after everything else.
                interceptor
                    .stop_then(async {
                        relays_stop.cancel();
                        while relay_tasks.join_next().await.is_some() {}
                        timewait::purge(Purge::Ports(&ports), RELAYED);
                    })
                    .await
            }
        };
        if let Some((tcp, udp)) = &relay_stats {
            summarize(tcp, udp);
        }
        stopped
    }
}

/// Asks the running instance of `name` to let go, and claims the name.
/// An instance that refuses stops the takeover; none answering (none
/// runs, or it died) leaves the name to take.
async fn take_over(name: &str, interceptor: &mut Interceptor) -> Result<()> {
    let handover = crate::control::Request::Handover { pid: std::process::id() };
    let sent = || info!("asked instance {name:?} to hand over; waiting for it to let go");
    match crate::control::request_then(name, &handover, sent).await {
        Ok(crate::control::Response::Ok) => {
            info!("instance {name:?} let go: it drains its connections and exits")
        }
        Ok(crate::control::Response::Error { message }) => {
            return Err(Error::Config(format!("no takeover: {message}")));
        }
        Ok(other) => {
            return Err(Error::Config(format!(
                "no takeover: instance {name:?} answered {other:?}"
            )));
        }
        Err(e) => {
            // None runs, or it died: its lock goes with it, shortly.
            warn!("{e}: taking the name as it is");
            return interceptor.take_name(std::time::Duration::from_secs(5)).await;
        }
    }
    interceptor.take_name(std::time::Duration::ZERO).await
}

/// Waits until the relays hold no connection and no session, or for
/// `timeout`; what is left then is closed by the caller.
async fn drain(tcp: &TcpRelayStats, udp: &UdpRelayStats, timeout: std::time::Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let deadline = tokio::time::Instant::now() + timeout;
    let held = || (tcp.active.load(Relaxed), udp.sessions_active.load(Relaxed));
    info!(
        "draining: {} connections and {} UDP sessions, for at most {timeout:?}",
        held().0,
        held().1
    );
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        ticks.tick().await;
        let (connections, sessions) = held();
        if connections == 0 && sessions == 0 {
            info!("drained");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!("drain timeout: closing {connections} connections and {sessions} UDP sessions");
            return;
        }
    }
}

/// The control socket at `path`, if one is wanted.
async fn bind_control(path: Option<&std::path::Path>) -> Result<Option<ControlSocket>> {
    match path {
        Some(path) => Ok(Some(ControlSocket::bind(path).await?)),
        None => Ok(None),
    }
}

/// Serves metrics and probes on `addr`, if given, until `stop`.
async fn serve_metrics(
    addr: Option<SocketAddr>,
    served: &Arc<Served>,
    stop: &CancellationToken,
    services: &mut tokio::task::JoinSet<()>,
) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let metrics = MetricsServer::bind(addr).await?;
    if let Some(addr) = metrics.local_addr() {
        info!("metrics on http://{addr}/metrics, probes on /healthz and /readyz");
    }
    services.spawn(metrics.serve(served.clone(), stop.clone()));
    Ok(())
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
fn bind_relays(
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
fn summarize(tcp: &TcpRelayStats, udp: &UdpRelayStats) {
    info!("relay: {}", tcp.snapshot().summary());
    info!("relay: {}", udp.snapshot().summary());
}

/// The relay's own TIME_WAIT sockets, removed as it stops.
const RELAYED: Whose = Whose::Ours("of relayed connections");
