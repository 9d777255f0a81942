//! Live control of a running instance: its rules, a reload of its rules file,
//! and its counters.
//!
//! Each `attach` serves a Unix socket at `/run/tproxy/<name>.sock` (in
//! the runtime directory, see [`crate::instance`]). The directory has mode
//! 0700 and the socket 0600, and the server also checks that the peer is
//! root or the daemon's own user. The protocol is one JSON
//! [`Request`] per line, answered by one JSON [`Response`] line.
//!
//! Also here: the rules file ([`config`]), the counters' report
//! ([`stats`]), the HTTP endpoint for metrics and health probes
//! ([`metrics`]), and the service manager's notifications ([`systemd`]).

pub mod config;
pub mod metrics;
pub mod reasons;
pub mod stats;
pub mod systemd;

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::stats::{RuleReport, StatsReport};
use crate::{
    error::{Error, Result},
    instance::socket_path,
    intercept::Interceptor,
    relay::{TcpRelayStats, UdpRelayStats, access_log::AccessLog, upstream::Upstreams},
    rules::Rule,
};

/// A request to a running instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The rules in force.
    ListRules,
    /// Add a rule (text form).
    AddRule {
        /// The rule.
        rule: String,
    },
    /// Delete a rule (text form, as listed).
    DeleteRule {
        /// The rule.
        rule: String,
    },
    /// Re-read the rules file and apply it with the command line's rules.
    Reload,
    /// Every counter.
    Stats,
    /// Let a new instance of the same name take over (`attach --takeover`,
    /// which has attached beside this one): detach, give up the name, the
    /// routing and this socket, answer, then drain and exit.
    Handover {
        /// The new instance's process: one that died meanwhile is not
        /// handed over to.
        pid: u32,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// The rules in force, in text form.
    Rules {
        /// The rules.
        rules: Vec<String>,
    },
    /// The counters.
    Stats {
        /// The counters.
        stats: Box<StatsReport>,
    },
    /// The request was refused; nothing changed.
    Error {
        /// Why, in one line.
        message: String,
    },
}

/// A running instance's state, shared by the control socket, SIGHUP and the
/// metrics endpoint.
pub struct Controller {
    name: String,
    /// `None` once the instance is stopping.
    interceptor: Mutex<Option<Interceptor>>,
    /// The relays' counters; `None` when steering to another program.
    relays: Option<(Arc<TcpRelayStats>, Arc<UdpRelayStats>)>,
    /// The relay's upstream proxies, which rules may name.
    upstreams: Upstreams,
    /// Rules from the command line; a reload keeps them.
    fixed_rules: Vec<Rule>,
    rules_file: Option<PathBuf>,
    /// Where handover requests go, once someone listens (see
    /// [`Controller::handovers`]).
    handovers: std::sync::Mutex<Option<tokio::sync::mpsc::Sender<HandoverReply>>>,
    /// The relays' access log, if any.
    access_log: Option<AccessLog>,
}

/// How the instance answers a [`Request::Handover`], once it has let go:
/// `Err` with why, if it could not.
pub type HandoverReply = tokio::sync::oneshot::Sender<std::result::Result<(), String>>;

impl Controller {
    /// Wraps a started interceptor and the relays' counters.
    pub fn new(
        name: String,
        interceptor: Interceptor,
        relays: Option<(Arc<TcpRelayStats>, Arc<UdpRelayStats>)>,
        upstreams: Upstreams,
        fixed_rules: Vec<Rule>,
        rules_file: Option<PathBuf>,
    ) -> Self {
        let interceptor = Mutex::new(Some(interceptor));
        let handovers = std::sync::Mutex::new(None);
        let access_log = None;
        Self {
            name,
            interceptor,
            relays,
            upstreams,
            fixed_rules,
            rules_file,
            handovers,
            access_log,
        }
    }

    /// Reports the counters of the relays' access log too.
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }

    /// Carries out one request.
    pub async fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::ListRules => {
                return match self.rule_texts().await {
                    Ok(rules) => Response::Rules { rules },
                    Err(e) => Response::Error { message: e.to_string() },
                };
            }
            Request::Stats => {
                return match self.stats().await {
                    Ok(stats) => Response::Stats { stats: Box::new(stats) },
                    Err(e) => Response::Error { message: e.to_string() },
                };
            }
            Request::Handover { pid } => self.hand_over(pid).await,
            Request::AddRule { rule } => self.add_rule(&rule).await,
            Request::DeleteRule { rule } => self.delete_rule(&rule).await,
            Request::Reload => self.reload().await,
        };
        match result {
            Ok(()) => Response::Ok,
            Err(e) => Response::Error { message: e.to_string() },
        }
    }

    /// Handover requests, from now on; without this call they are refused.
    pub fn handovers(&self) -> tokio::sync::mpsc::Receiver<HandoverReply> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        *self.handovers.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Whether `pid`, which sent a handover request from `peer` (the
    /// socket's SO_PEERCRED), is a successor of this instance: the sender
    /// itself, running our program, and holding the takeover claim of this
    /// instance's name, which only a `--takeover` start of it takes. Any
    /// other request (another instance's, a user's script's) is refused and
    /// the instance goes on.
    fn successor(&self, pid: u32, peer: Option<i32>) -> Result<()> {
        let refused = |why: String| {
            Error::Config(format!("instance {} refuses to hand over: {why}", self.name))
        };
        if peer != Some(pid as i32) {
            return Err(refused(format!("the request named process {pid}, but {peer:?} sent it")));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Gone already: `hand_over` says so, and nothing is handed over.
            return Ok(());
        }
        let program = |pid: &str| {
            std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| {
                let text = p.to_string_lossy().into_owned();
                text.strip_suffix(" (deleted)").map(str::to_owned).unwrap_or(text)
            })
        };
        if program(&pid.to_string()).is_none() || program(&pid.to_string()) != program("self") {
            return Err(refused(format!("process {pid} does not run this program")));
        }
        if !crate::instance::holds_takeover_claim(&self.name, pid) {
            return Err(refused(format!(
                "process {pid} did not claim this instance's name with --takeover"
            )));
        }
        Ok(())
    }

    async fn hand_over(&self, pid: u32) -> Result<()> {
        let refused = |why: &str| Error::Config(format!("instance {} {why}", self.name));
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let e = refused(&format!("stays: process {pid}, which asked to take over, is gone"));
            warn!("{e}");
            return Err(e);
        }
        info!("process {pid} takes over instance {}", self.name);
        let tx = self.handovers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let tx = tx.ok_or_else(|| refused("does not hand over"))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(reply).await.map_err(|_| refused("is stopping"))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(refused(&format!("could not let go: {why}"))),
            Err(_) => Err(refused("is stopping")),
        }
    }

    /// Runs `f` on the interceptor, unless the instance is stopping.
    async fn with<T>(&self, f: impl FnOnce(&mut Interceptor) -> Result<T>) -> Result<T> {
        match self.interceptor.lock().await.as_mut() {
            Some(interceptor) => f(interceptor),
            None => Err(Error::Config(format!("instance {} is stopping", self.name))),
        }
    }

    async fn rule_texts(&self) -> Result<Vec<String>> {
        self.with(|i| Ok(i.rules().iter().map(|(_, r)| r.to_string()).collect())).await
    }

    async fn add_rule(&self, text: &str) -> Result<()> {
        let rule: Rule = text.parse()?;
        self.upstreams.check(std::slice::from_ref(&rule))?;
        self.with(|i| i.add_rule(rule.clone())).await?;
        info!("rule added: {rule}");
        Ok(())
    }

    async fn delete_rule(&self, text: &str) -> Result<()> {
        let rule: Rule = text.parse()?;
        self.with(|i| i.remove_rule(&rule)).await?;
        info!("rule deleted: {rule}");
        Ok(())
    }

    /// Re-reads the rules file and replaces the rules with it plus the
    /// command line's, atomically. On any error the running set stays.
    pub async fn reload(&self) -> Result<()> {
        let Some(path) = &self.rules_file else {
            return Err(Error::Config(
                "nothing to reload: attach was started without --config".into(),
            ));
        };
        systemd::reloading();
        let reloaded = async {
            let mut rules = self.fixed_rules.clone();
            rules.extend(config::load_rules(path)?);
            self.upstreams.check(&rules)?;
            self.with(|i| i.set_rules(rules)).await?;
            info!("reloaded {}: rules: {}", path.display(), self.rule_texts().await?.join(", "));
            Ok(())
        }
        .await;
        // Refused or not, the instance runs on.
        systemd::ready("reloaded");
        reloaded
    }

    /// Where flows go, and the protocols the rules intercept.
    pub async fn target_and_protocols(
        &self,
    ) -> Result<(crate::intercept::Target, std::collections::HashSet<crate::rules::Protocol>)> {
        self.with(|i| {
            Ok((i.config().target, i.rules().gated_ports().map(|(proto, _)| proto).collect()))
        })
        .await
    }

    /// Every counter, now.
    pub async fn stats(&self) -> Result<StatsReport> {
        let (interfaces, cgroups, target, datapath, rules) = self
            .with(|i| {
                let config = i.config();
                let cgroups = config.cgroups.iter().map(|c| c.display().to_string()).collect();
                Ok((config.interfaces.clone(), cgroups, config.target, i.stats()?, i.rule_stats()?))
            })
            .await?;
        let rules = rules
            .into_iter()
            .map(|(rule, s)| RuleReport { rule: rule.to_string(), counters: s.into() })
            .collect();
        let tcp = self.relays.as_ref().map(|(tcp, _)| tcp.snapshot());
        let udp = self.relays.as_ref().map(|(_, udp)| udp.snapshot());
        Ok(StatsReport {
            reasons: reasons::Reasons::of(&datapath, tcp.as_ref(), udp.as_ref()),
            name: self.name.clone(),
            interfaces,
            cgroups,
            datapath,
            target: target.to_string(),
            rules,
            tcp,
            udp,
            access_log: self.access_log.as_ref().map(AccessLog::counters),
            upstreams: self.upstreams.report(),
        })
    }

    /// Takes the interceptor out, for an orderly stop; later requests are
    /// refused.
    pub async fn take_interceptor(&self) -> Option<Interceptor> {
        self.interceptor.lock().await.take()
    }
}

/// A bound control socket, removed from the filesystem when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path`, refusing if a live instance answers there; a socket
    /// file left by a killed instance is replaced.
    pub async fn bind(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        crate::host::files::Dir::private(dir)
            .map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::Config(format!(
                "an instance already runs with control socket {}; give this one another --name (and --mark and --table)",
                path.display()
            )));
        }
        match std::fs::remove_file(path) {
            Ok(()) => debug!("removed a stale control socket {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
        Ok(Self { listener, path: path.to_owned() })
    }

    /// Serves requests until `shutdown` is cancelled.
    pub async fn serve(self, controller: Arc<Controller>, shutdown: CancellationToken) {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!("control socket: {e}");
                        continue;
                    }
                },
            };
            let controller = controller.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, &controller).await {
                    debug!("control connection: {e}");
                }
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_one(stream: UnixStream, controller: &Controller) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    let peer_uid = peer.uid();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(64 * 1024)).lines();
    while let Some(line) = lines.next_line().await? {
        // Root, or the user the daemon runs as (a systemd unit's).
        let response = if peer_uid != 0 && peer_uid != nix::unistd::geteuid().as_raw() {
            Response::Error { message: "only root may control tproxy".into() }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::Handover { pid }) => match controller.successor(pid, peer.pid()) {
                    Ok(()) => controller.handle(Request::Handover { pid }).await,
                    Err(e) => {
                        warn!("{e}");
                        Response::Error { message: e.to_string() }
                    }
                },
                Ok(request) => controller.handle(request).await,
                Err(e) => Response::Error { message: format!("bad request: {e}") },
            }
        };
        let mut out = serde_json::to_string(&response).map_err(io::Error::other)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

/// Sends one request to instance `name` and returns its response.
pub async fn request(name: &str, request: &Request) -> Result<Response> {
    request_then(name, request, || {}).await
}

/// [`request`], running `sent` once the request is on its way.
pub async fn request_then(name: &str, request: &Request, sent: impl FnOnce()) -> Result<Response> {
    let path = socket_path(name);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                format!("no instance named {name:?} is running")
            }
            io::ErrorKind::PermissionDenied => "only root may control tproxy".into(),
            _ => format!("connecting to {}", path.display()),
        };
        Error::io(why, e)
    })?;
    let (read, mut write) = stream.into_split();
    let mut line =
        serde_json::to_string(request).map_err(|e| Error::io("encoding", io::Error::other(e)))?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(|e| Error::io("sending the request", e))?;
    sent();
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(|e| Error::io("reading the response", e))?;
    serde_json::from_str(&answer)
        .map_err(|e| Error::io("the instance's response", io::Error::other(e)))
}
