//! `tproxy-user attach`: interception plus the relays, live control and
//! metrics, until told to stop.

mod handover;
mod relays;
mod services;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    control::{Controller, config, systemd},
    counters::Snapshot as _,
    error::{Error, Result},
    intercept::{InterceptConfig, Interceptor, Loaded, Target},
    relay::{
        RelaySettings, TcpRelayConfig, UdpRelayConfig,
        access_log::AccessLog,
        timewait::{self, Purge},
    },
};
use handover::{drain, take_over};
use relays::Running;
pub use relays::relay_only;
use services::{Services, bind_control};

/// Everything `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// What to intercept, where, and the routing marks. Its rules are kept
    /// across reloads of `rules_file`. With a [`Target::Port`] target no
    /// relay runs: flows go to another program's listener, and the relay
    /// settings below are unused.
    pub intercept: InterceptConfig,
    /// The relays' port, IPv6, source grouping and upstreams. What they
    /// share with the interception (the upstream mark, spoofing, local
    /// destinations, loopback for the cgroups' connections) is taken from
    /// `intercept`, whatever is set here (see
    /// [`AttachConfig::relay_settings`]).
    pub relay: RelaySettings,
    /// The TCP relay's limits and timeouts.
    pub tcp: TcpRelayConfig,
    /// The UDP relay's limits.
    pub udp: UdpRelayConfig,
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
    /// Write a line for every relayed connection and session here (`-`:
    /// standard output; see [`crate::relay::access_log`]); SIGHUP reopens it.
    pub access_log: Option<PathBuf>,
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
            relay: RelaySettings {
                ipv6: crate::host::system::ipv6_enabled(),
                ..RelaySettings::default()
            },
            tcp: TcpRelayConfig::default(),
            udp: UdpRelayConfig::default(),
            rules_file: None,
            watch_rules_file: false,
            metrics: None,
            access_log: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Rejects configurations that cannot work, before anything is
    /// touched: the interception's checks, and the relays' against it.
    pub fn validate(&self) -> Result<()> {
        self.intercept.validate()?;
        let port = self.relay.listen_port;
        let relays = self.intercept.target == Target::Relay;
        if relays && port != 0 && self.intercept.rules.iter().any(|r| r.covers_port(port)) {
            return Err(Error::Config(format!("--listen-port {port} is also an intercepted port")));
        }
        if self.access_log.is_some() && !relays {
            return Err(Error::Config(
                "--access-log logs the relay's connections, and with --to-port no relay runs"
                    .into(),
            ));
        }
        self.relay.upstreams.check(&self.intercept.rules)
    }

    /// The relays' settings: `relay`, with what they share with the
    /// interception taken from `intercept`.
    pub fn relay_settings(&self) -> RelaySettings {
        RelaySettings {
            upstream_mark: self.intercept.upstream_mark,
            spoof_source: self.intercept.spoof_source,
            allow_local_destinations: self.intercept.intercept_local,
            loopback: !self.intercept.cgroups.is_empty(),
            ..self.relay.clone()
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
    config.validate()?;
    if config.tcp.listeners > 1 {
        crate::host::kernel::REUSEPORT_ASSIGN.require()?;
    }
    crate::relay::fit_to_descriptors(&mut config.tcp, &mut config.udp);
    if config.intercept.rules.iter().any(|r| r.protocols.contains(&crate::rules::Protocol::Udp)) {
        for upstream in config.relay.upstreams.all().filter(|u| !u.carries_udp()) {
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
        let upstreams = settings.upstreams.clone();
        let AttachConfig {
            tcp,
            udp,
            rules_file,
            watch_rules_file,
            control_socket,
            metrics,
            access_log,
            drain_timeout,
            ..
        } = config;
        let name = intercept.config().name.clone();
        let takeover = intercept.config().takeover;
        let target = intercept.config().target;

        // 1. Bind everything that can fail for a reason the user can fix,
        // before anything is attached; the control socket only now that the
        // name is ours. A takeover binds them once the running instance has
        // let go of them.
        let access_log = match (&access_log, target) {
            (Some(path), Target::Relay) => Some(AccessLog::open(path)?),
            _ => None,
        };
        let mut services = Services::new();
        let mut control = None;
        if !takeover {
            control = bind_control(control_socket.as_deref()).await?;
            services.serve_metrics(metrics).await?;
        }
        // Always: a SIGHUP without a rules file is refused, not fatal (a
        // unit's ExecReload sends one).
        let mut hangup = signal(SignalKind::hangup())
            .map_err(|e| Error::io("installing a SIGHUP handler", e))?;
        let mut upgrade = signal(SignalKind::user_defined2())
            .map_err(|e| Error::io("installing a SIGUSR2 handler", e))?;
        let relays = match target {
            Target::Relay => Some(relays::bind_relays(settings, tcp, udp).map_err(|e| {
                if takeover { Error::Config(format!("{e} (the running instance holds its port until it hands over: leave --listen-port out)")) } else { e }
            })?),
            Target::Port(_) => None,
        };

        // 2. Attach: beside the running instance, for a takeover.
        let mut interceptor = intercept.start(&relays::sockets(relays.as_ref())).await?;

        // 3. Take over: new flows come here now; the running instance lets
        // go of the name, the control socket and the metrics port.
        if takeover {
            if let Err(e) = take_over(&name, &mut interceptor).await {
                let _ = interceptor.stop().await;
                return Err(e);
            }
            control = bind_control(control_socket.as_deref()).await.unwrap_or_else(|e| {
                warn!("{e}: running without a control socket");
                None
            });
            if let Err(e) = services.serve_metrics(metrics).await {
                warn!("{e}: running without metrics");
            }
        }

        // 4. Serve.
        let relays = relays.map(|r| relays::follow(r, &interceptor, access_log.as_ref()));
        let relay_stats = relays.as_ref().map(|(tcp, udp)| (tcp.stats(), udp.stats()));
        let watched =
            rules_file.clone().filter(|_| watch_rules_file).map(|p| (p, rules_file_contents));
        let controller = Arc::new(
            Controller::new(
                name,
                interceptor,
                relay_stats.clone(),
                upstreams,
                fixed_rules,
                rules_file,
            )
            .with_access_log(access_log.clone()),
        );
        let mut handovers = controller.handovers();
        services.control(&controller, control, watched);
        let (running, status) = match relays {
            Some(relays) => {
                let (running, status) = Running::start(relays);
                (Some(running), status)
            }
            None => {
                let status = format!("steering to {target} (no relay of ours)");
                info!("ready: {status}");
                (None, status)
            }
        };
        services.served.running(controller.clone());
        if takeover {
            systemd::took_over(&status)
        } else {
            systemd::ready(&status)
        }

        // 5. Until told to stop, or a successor asks for the name; SIGHUP
        // reloads, SIGUSR2 starts the successor.
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
                    if let Some(log) = &access_log {
                        log.reopen();
                    }
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

        // 6. Stop: hand over and drain, or detach and clean up.
        services.stop().await;
        let Some(interceptor) = controller.take_interceptor().await else {
            return Ok(());
        };
        if let Ok(s) = interceptor.stats() {
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
                if let Some(running) = running {
                    running.stop().await;
                }
                // The new instance relays the same ports: its TIME_WAIT
                // sockets are not ours to remove.
                stopped
            }
            None => {
                // Detach first, so new traffic flows untouched while the
                // relays close; the name is given up after everything else.
                let ports = interceptor.intercepted_tcp_ports().clone();
                interceptor
                    .stop_then(async {
                        if let Some(running) = running {
                            running.stop().await;
                        }
                        timewait::purge(Purge::Ports(&ports), relays::RELAYED);
                    })
                    .await
            }
        };
        if let Some((tcp, udp)) = &relay_stats {
            relays::summarize(tcp, udp);
        }
        if let Some(log) = access_log {
            // The relays' last entries are queued: written before the exit.
            let _ = tokio::task::spawn_blocking(move || log.flush()).await;
        }
        stopped
    }
}
