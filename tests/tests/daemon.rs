//! tproxy as a service runs it: as a user that is not root with only the
//! capabilities the systemd unit grants, with the service manager's
//! notifications, health and readiness probes, a watched rules file, shell
//! completions and a man page.

use std::{
    io::Write,
    net::Shutdown,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use tproxy_tests::*;

/// The capabilities `deploy/systemd/tproxy@.service` grants.
const UNIT_CAPS: &str = "+net_admin,+bpf,+perfmon,+net_bind_service";
const METRICS: &str = "127.0.0.1:9464";

/// A directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tproxy-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn text(&self) -> &str {
        self.0.to_str().expect("a UTF-8 path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `curl` in `ns`: the status code and the body.
fn http(ns: &Netns, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{METRICS}{path}");
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", &url])
        .output()?;
    ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status code")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Waits until `path` answers `status`.
fn wait_for_status(ns: &Netns, path: &str, status: u16) -> Result<String> {
    eventually(Duration::from_secs(20), || {
        let (code, body) = http(ns, path)?;
        ensure!(code == status, "{path} answers {code} ({body:?}), not {status}");
        Ok(body)
    })
}

/// As the unit runs it: uid and gid 65534, only the unit's capabilities
/// (ambient, as systemd's AmbientCapabilities= gives them), and the runtime
/// directory systemd would make for it. It relays; root controls it through
/// its socket; its probes answer.
#[test]
fn an_unprivileged_daemon_relays_is_controlled_and_answers_probes() -> Result<()> {
    let topology = Topology::new("daemon")?;
    let runtime = TempDir::new("daemon-run")?;
    std::os::unix::fs::chown(&runtime.0, Some(65534), Some(65534))?;
    std::fs::set_permissions(&runtime.0, std::fs::Permissions::from_mode(0o700))?;
    let env = format!("RUNTIME_DIRECTORY={}", runtime.text());
    let bin = tproxy_bin();
    let name = topology.proxy.name.clone();
    // The unit's LimitMEMLOCK=infinity: before 5.11 BPF maps count against
    // it, and a process without CAP_SYS_RESOURCE cannot raise it.
    let memlock: &[&str] =
        if kernel_at_least(5, 11) { &[] } else { &["prlimit", "--memlock=unlimited:unlimited"] };
    let (inh, ambient, bounding) = (
        format!("--inh-caps=-all,{UNIT_CAPS}"),
        format!("--ambient-caps={UNIT_CAPS}"),
        format!("--bounding-set=-all,{UNIT_CAPS}"),
    );
    let args = [
        &[env.as_str()],
        memlock,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &inh,
            &ambient,
            &bounding,
            bin.to_str().context("a UTF-8 path")?,
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "80",
            "--name",
            &name,
            "--metrics",
            METRICS,
        ],
    ]
    .concat();
    let proxy = Proxy::spawn_program(
        &topology.proxy,
        std::path::Path::new("env"),
        &args,
        "info,aya::bpf=error",
    )?;
    proxy.wait_ready()?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid()))?;
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
    ensure!(uid.split_whitespace().skip(1).all(|id| id == "65534"), "{uid}");
    // After loading it keeps CAP_NET_ADMIN (12), CAP_NET_BIND_SERVICE (10)
    // and CAP_BPF (39); CAP_PERFMON (38) and the ambient set are gone.
    let caps =
        |set: &str| status.lines().find(|l| l.starts_with(set)).unwrap_or_default().to_owned();
    ensure!(caps("CapEff:").ends_with("0000008000001400"), "{}", caps("CapEff:"));
    ensure!(caps("CapPrm:").ends_with("0000008000001400"), "{}", caps("CapPrm:"));
    ensure!(caps("CapAmb:").ends_with("0000000000000000"), "{}", caps("CapAmb:"));
    ensure!(
        runtime.path(&format!("{name}.sock")).exists(),
        "no control socket in the runtime directory"
    );

    // Relayed: the server sees the proxy.
    let addr = Topology::server_addr(false, 80);
    let server = serve_once(topology.server.tcp_listen(addr)?, b"pong".to_vec());
    let mut client = topology.client.tcp_connect(addr)?;
    client.write_all(b"ping")?;
    client.shutdown(Shutdown::Write)?;
    ensure!(read_to_end(&mut client)? == b"pong");
    ensure!(server.join().unwrap()?.peer.ip() == proxy_ip(false), "not relayed");

    // Root controls it, finding it where the unit's clients would.
    let control = |args: &[&str]| -> Result<String> {
        let out = topology
            .proxy
            .command(&bin)
            .args(args)
            .args(["--name", &name])
            .env("RUNTIME_DIRECTORY", runtime.text())
            .output()?;
        ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    control(&["port", "add", "8080", "--proto", "tcp"])?;
    let rules = control(&["rule", "list"])?;
    ensure!(rules.lines().any(|l| l == "tcp/8080"), "{rules}");

    ensure!(http(&topology.proxy, "/healthz")?.0 == 200);
    ensure!(http(&topology.proxy, "/readyz")? == (200, "ready\n".into()));
    let (code, metrics) = http(&topology.proxy, "/metrics")?;
    ensure!(code == 200 && metrics.contains("tproxy_tcp_connections_total"), "{code}: {metrics}");
    let log = proxy.stop()?;
    ensure!(!log.contains("ERROR"), "{log}");
    ensure!(!runtime.path(&format!("{name}.sock")).exists(), "the control socket was left");
    Ok(())
}

/// With `--to-port`, ready means the other program listens: 503 with the
/// reason until it does, 200 while it does, 503 once it is gone.
#[test]
fn readiness_follows_the_listener() -> Result<()> {
    let topology = Topology::new("readyz")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--to-port", "8080", "--metrics", METRICS],
    )?;
    ensure!(http(&topology.proxy, "/healthz")?.0 == 200);
    let (code, why) = http(&topology.proxy, "/readyz")?;
    ensure!(code == 503 && why.contains("nothing listens on port 8080"), "{code}: {why}");
    let server =
        Proxy::spawn_program(&topology.proxy, &example_bin("original_destination"), &["8080"], "")?;
    server.wait_for_log("ready:", Duration::from_secs(30))?;
    wait_for_status(&topology.proxy, "/readyz", 200)?;
    server.stop()?;
    let why = wait_for_status(&topology.proxy, "/readyz", 503)?;
    ensure!(why.contains("nothing listens"), "{why}");
    proxy.stop()?;
    Ok(())
}

/// The notification protocol, on a real NOTIFY_SOCKET: READY=1 once
/// attached, RELOADING=1 (with the time) and READY=1 again around a reload,
/// watchdog pings, STOPPING=1 at exit.
#[test]
fn the_service_manager_is_notified() -> Result<()> {
    let topology = Topology::new("notify")?;
    let dir = TempDir::new("notify")?;
    let socket_path = dir.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    socket.set_read_timeout(Some(Duration::from_secs(60)))?;
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, "rules = [\"tcp/80\"]\n")?;
    let notify = format!("NOTIFY_SOCKET={}", socket_path.display());
    let bin = tproxy_bin();
    let name = topology.proxy.name.clone();
    let proxy = Proxy::spawn_program(
        &topology.proxy,
        std::path::Path::new("env"),
        &[
            &notify,
            "WATCHDOG_USEC=400000",
            bin.to_str().context("a UTF-8 path")?,
            "attach",
            PROXY_CLIENT_IFACE,
            "--name",
            &name,
            "--config",
            rules.to_str().context("a UTF-8 path")?,
        ],
        "info,aya::bpf=error",
    )?;
    // Each datagram is one notification; watchdog pings come in between.
    let next = |wanted: &str| -> Result<String> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).with_context(|| format!("waiting for {wanted}"))?;
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|l| l == wanted) {
                return Ok(message);
            }
            if !message.lines().any(|l| l == "WATCHDOG=1") {
                bail!("{message:?} before {wanted}");
            }
        }
    };
    let ready = next("READY=1")?;
    ensure!(ready.contains("STATUS=relay listening on port"), "{ready:?}");
    next("WATCHDOG=1")?;
    proxy.signal(libc::SIGHUP);
    let reloading = next("RELOADING=1")?;
    ensure!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    next("READY=1")?;
    proxy.signal(libc::SIGTERM);
    next("STOPPING=1")?;
    let (status, log) = proxy.stop_with(libc::SIGTERM)?;
    ensure!(status.success(), "{log}");
    Ok(())
}

/// An upgrade as the unit does it: SIGUSR2 has the instance start the
/// installed binary with its own arguments and `--takeover`; the new
/// process announces itself as the main one (MAINPID=, READY=1) and keeps
/// the watchdog fed, while the old one drains and exits.
#[test]
fn sigusr2_hands_over_to_the_installed_binary() -> Result<()> {
    let topology = Topology::new("usr2")?;
    let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "ok")?;
    let dir = TempDir::new("usr2")?;
    let socket_path = dir.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    socket.set_read_timeout(Some(Duration::from_secs(60)))?;
    let notify = format!("NOTIFY_SOCKET={}", socket_path.display());
    let bin = tproxy_bin();
    let name = topology.proxy.name.clone();
    let args = [
        notify.as_str(),
        "WATCHDOG_USEC=400000",
        bin.to_str().context("a UTF-8 path")?,
        "attach",
        PROXY_CLIENT_IFACE,
        PROXY_SERVER_IFACE,
        "--port",
        "80",
        "--name",
        &name,
    ];
    let mut old = Proxy::spawn_program(
        &topology.proxy,
        std::path::Path::new("env"),
        &args,
        "info,aya::bpf=error",
    )?;
    // Read as the service manager reads it: at once, whatever comes.
    let (tx, notifications) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                return;
            }
        }
    });
    let next = |wanted: &str| -> Result<String> {
        loop {
            let message = notifications
                .recv_timeout(Duration::from_secs(60))
                .with_context(|| format!("waiting for {wanted}"))?;
            if message.lines().any(|l| l.starts_with(wanted)) {
                return Ok(message);
            }
        }
    };
    next("READY=1")?;
    let url = format!("http://{}/", Topology::server_addr(false, 80));
    let relayed = |what: &str| -> Result<()> {
        let body = topology.client.curl(&url).with_context(|| what.to_owned())?;
        ensure!(body.ends_with("ok"), "{what}");
        let seen = peers.recv_timeout(Duration::from_secs(10))?;
        ensure!(seen.ip() == PROXY_SERVER_SIDE_V4, "{what}: the server saw {seen}");
        Ok(())
    };
    relayed("before").map_err(|e| {
        let filters =
            topology.proxy.exec(&["tc", "filter", "show", "dev", PROXY_CLIENT_IFACE, "ingress"]);
        let sockets = topology.proxy.exec(&["ss", "-tanp"]);
        anyhow::anyhow!("{e}\n{}\n{filters:?}\n{sockets:?}", old.log())
    })?;
    old.signal(libc::SIGUSR2);
    let announced = next("MAINPID=")?;
    ensure!(announced.lines().any(|l| l == "READY=1"), "{announced:?}");
    let pid: u32 =
        announced.lines().find_map(|l| l.strip_prefix("MAINPID=")).context("MAINPID")?.parse()?;
    ensure!(pid != old.pid(), "{announced:?}");
    eventually(Duration::from_secs(60), || {
        ensure!(old.exited()?.is_some(), "the old process never exited:\n{}", old.log());
        Ok(())
    })?;
    ensure!(old.log().contains("drained"), "{}", old.log());
    relayed("after").map_err(|e| anyhow::anyhow!("{e}\n{}", old.log()))?;
    // Pings from the new process: the old one is gone.
    next("WATCHDOG=1")?;
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    next("STOPPING=1")?;
    // Its output still reaches the log through the pipes it inherited.
    let (status, log) = old.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "{log}");
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    ensure!(state.is_empty(), "left behind: {state}");
    Ok(())
}

/// `--watch-config`: a ConfigMap-style update (a new file swapped in
/// through a symlink) reaches the running rules without a signal.
#[test]
fn a_watched_rules_file_is_reloaded_when_it_changes() -> Result<()> {
    let topology = Topology::new("watch")?;
    let dir = TempDir::new("watch")?;
    let write_version = |version: &str, rules: &str| -> Result<()> {
        let data = dir.path(version);
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("rules.toml"), rules)?;
        // As the kubelet does: ..data points at the version, atomically.
        let link = dir.path("..data.tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(version, &link)?;
        std::fs::rename(&link, dir.path("..data"))?;
        Ok(())
    };
    write_version("v1", "rules = [\"tcp/80\"]\n")?;
    std::os::unix::fs::symlink("..data/rules.toml", dir.path("rules.toml"))?;
    let config = dir.path("rules.toml");
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--config",
            config.to_str().context("a UTF-8 path")?,
            "--watch-config",
        ],
    )?;
    write_version("v2", "rules = [\"tcp/80\", \"udp/53\"]\n")?;
    eventually(Duration::from_secs(20), || {
        let rules = run_tproxy(&topology.proxy, &["rule", "list"])?;
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        ensure!(rules.lines().any(|l| l == "udp/53"), "the change never arrived: {rules}");
        Ok(())
    })?;
    // A broken file is refused and the rules stay.
    write_version("v3", "rules = [\"tcp/0\"]\n")?;
    proxy.wait_for_log("reload refused", Duration::from_secs(20))?;
    let rules = run_tproxy(&topology.proxy, &["rule", "list"])?;
    ensure!(String::from_utf8_lossy(&rules.stdout).contains("udp/53"));
    proxy.stop()?;
    Ok(())
}

/// The completions load in bash, and the man pages render.
#[test]
fn completions_load_and_the_man_page_renders() -> Result<()> {
    let bin = tproxy_bin();
    let bin = bin.to_str().context("a UTF-8 path")?;
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("source <({bin} completions bash) && complete -p tproxy-user")])
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && said.contains("tproxy-user"), "{said}");
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(bin).args(["completions", shell]).output()?;
        ensure!(out.status.success() && out.stdout.len() > 100, "{shell}");
    }
    let dir = TempDir::new("man")?;
    let out = std::process::Command::new(bin).args(["man", "--dir", dir.text()]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in ["tproxy-user.1", "tproxy-user-attach.1"] {
        let out = std::process::Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(dir.path(page))
            .env("MANWIDTH", "100")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && text.contains("tproxy-user"), "{page}: {text}");
    }
    Ok(())
}
