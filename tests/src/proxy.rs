//! `tproxy-user` under test: [`Proxy`], one-shot runs, and what they are
//! expected to say.

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use crate::*;
use anyhow::{Context as _, Result, ensure};

/// tproxy's default routing values, which a lone instance in a sandbox gets
/// (`library::the_sandbox_defaults_are_the_librarys` holds them to the
/// library's own; this crate cannot depend on it).
pub const DEFAULT_MARK: u32 = 0x1e5;
/// The relay's default upstream mark.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x1e6;
/// The default routing table (and rule priority).
pub const DEFAULT_TABLE: u32 = 485;

/// Path of the `tproxy-user` binary under test: `$TPROXY_USER_BIN`, or the
/// workspace's debug build.
pub fn tproxy_bin() -> PathBuf {
    match std::env::var_os("TPROXY_USER_BIN") {
        Some(path) => path.into(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tproxy-user"),
    }
}

/// A running `tproxy-user attach`, with its log and its service-manager
/// notifications collected.
pub struct Proxy {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The notifications it sent to `$NOTIFY_SOCKET` (one string each), as
    /// systemd would receive them.
    notices: Notices,
    /// The threads copying stdout and stderr into `log`; they end at EOF.
    readers: Vec<thread::JoinHandle<()>>,
    /// The instance name it was given (`--name`), for `stats`.
    name: String,
}

impl Proxy {
    /// Starts `tproxy-user <args>` in `ns` and waits until it is ready.
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Self> {
        Self::start_logging(ns, args, "info,aya::bpf=error,tproxy_user=debug")
    }

    /// Like [`Proxy::start`], with `log_filter` as `RUST_LOG`.
    pub fn start_logging(ns: &Netns, args: &[&str], log_filter: &str) -> Result<Self> {
        let proxy = Self::spawn(ns, args, log_filter)?;
        proxy.wait_ready()?;
        Ok(proxy)
    }

    /// Starts `tproxy-user <args>` in `ns` without waiting.
    pub fn spawn(ns: &Netns, args: &[&str], log_filter: &str) -> Result<Self> {
        let args = ns.instance_args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn_program(ns, &tproxy_bin(), &args, log_filter)
    }

    /// Starts `program <args>` in `ns` without waiting; its stdout and
    /// stderr both go to the log.
    pub fn spawn_program(
        ns: &Netns,
        program: &std::path::Path,
        args: &[&str],
        log_filter: &str,
    ) -> Result<Self> {
        let mut command = ns.command(program);
        command.args(args);
        Self::spawn_command(command, args, log_filter)
    }

    /// Starts `tproxy-user <args>` in `ns` and in `cgroup` (if given), with
    /// the cgroup2 mount in sight (see [`crate::in_netns`]), and waits
    /// until it is ready.
    pub fn start_keeping_mounts(
        ns: &Netns,
        cgroup: Option<&std::path::Path>,
        args: &[&str],
    ) -> Result<Self> {
        let args = ns.instance_args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = crate::in_netns(ns, &tproxy_bin().to_string_lossy(), cgroup);
        command.args(&args);
        let proxy = Self::spawn_command(command, &args, "info,aya::bpf=error,tproxy_user=debug")?;
        proxy.wait_ready()?;
        Ok(proxy)
    }

    /// Starts `command` (with `args`, which name the instance) without
    /// waiting; its stdout and stderr both go to the log.
    pub fn spawn_command(
        mut command: std::process::Command,
        args: &[&str],
        log_filter: &str,
    ) -> Result<Self> {
        let program = command.get_program().to_owned();
        let notices = Notices::bind()?;
        let mut child = command
            .env("NOTIFY_SOCKET", &notices.path)
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let readers = vec![collect_lines(stdout, log.clone()), collect_lines(stderr, log.clone())];
        let name = args.iter().skip_while(|a| **a != "--name").nth(1).unwrap_or(&"default");
        Ok(Self { child, log, notices, readers, name: name.to_string() })
    }

    /// Waits for READY=1 (loading through the verifier takes seconds under
    /// emulation) and returns the STATUS= sent with it.
    pub fn wait_ready(&self) -> Result<String> {
        crate::eventually(Duration::from_secs(60), || {
            let notices = self.notices.received.lock().unwrap();
            let ready = notices.iter().rev().find(|n| n.lines().any(|l| l == "READY=1"));
            let ready = ready.with_context(|| format!("no READY=1; the log:\n{}", self.log()))?;
            Ok(ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or("").to_owned())
        })
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        crate::eventually(timeout, || {
            ensure!(self.log().contains(needle), "no {needle:?} in the proxy log:\n{}", self.log());
            Ok(())
        })
    }

    /// The port the TCP relay listens on, from the status sent with
    /// READY=1.
    pub fn listen_port(&self) -> Result<u16> {
        let status = self.wait_ready()?;
        let (_, rest) = status.split_once("relay listening on port ").context("no port")?;
        Ok(rest.split_whitespace().next().unwrap_or_default().parse()?)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sends `signal` and waits for the exit (10 s at most).
    pub fn stop_with(self, signal: i32) -> Result<(ExitStatus, String)> {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait_exit(Duration::from_secs(10))
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for it to exit by itself, for `timeout` at most.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let exited = crate::eventually(timeout, || {
            self.child.try_wait()?.context("tproxy-user did not exit")
        });
        let status = match exited {
            Ok(status) => status,
            Err(e) => {
                let _ = self.child.kill();
                return Err(e.context(self.log()));
            }
        };
        // The readers end at EOF, after the last lines.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Ok((status, self.log()))
    }

    /// SIGTERM, and the exit must be clean.
    pub fn stop(self) -> Result<String> {
        let (status, log) = self.stop_with(libc::SIGTERM)?;
        ensure!(status.success(), "tproxy-user exited with {status}:\n{log}");
        Ok(log)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `$NOTIFY_SOCKET` of our own, read as systemd reads it: each datagram
/// one notification.
struct Notices {
    path: PathBuf,
    socket: Arc<std::os::unix::net::UnixDatagram>,
    received: Arc<Mutex<Vec<String>>>,
}

impl Notices {
    fn bind() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tproxy-notify-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = Arc::new(std::os::unix::net::UnixDatagram::bind(&path)?);
        // A proxy that drops root (`setpriv`) notifies too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let (reader, into) = (socket.clone(), received.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when `Drop` shuts the socket down.
            while let Ok(n @ 1..) = reader.recv(&mut buf) {
                into.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Ok(Self { path, socket, received })
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn collect_lines(
    stream: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    })
}

/// Path of one of tproxy-user's examples: under `$TPROXY_EXAMPLES_DIR`, or
/// the workspace's debug build.
pub fn example_bin(name: &str) -> PathBuf {
    match std::env::var_os("TPROXY_EXAMPLES_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/examples").join(name)
        }
    }
}

/// Runs `tproxy-user <args>` in `ns` to completion.
pub fn run_tproxy(ns: &Netns, args: &[&str]) -> Result<Output> {
    Ok(ns.command(tproxy_bin()).args(ns.instance_args(args)).env("NO_COLOR", "1").output()?)
}

/// Runs `tproxy-user <args>` in `ns` (under `wrapper`, such as
/// [`UNPRIVILEGED`], if given) and checks that it was refused as bad input
/// must be: a non-zero exit and an error line that says `expected`.
/// Returns stderr.
pub fn expect_refused(
    ns: &Netns,
    wrapper: &[&str],
    args: &[&str],
    expected: &str,
) -> Result<String> {
    let bin = tproxy_bin();
    let args = ns.instance_args(args);
    let mut command = ns.command(wrapper.first().map_or(bin.as_os_str(), |w| w.as_ref()));
    if !wrapper.is_empty() {
        command.args(&wrapper[1..]).arg(&bin);
    }
    let out = command.args(&args).env("NO_COLOR", "1").output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "{args:?} succeeded");
    let first = stderr.lines().find(|l| l.contains("error")).unwrap_or_default();
    ensure!(
        first.contains(expected),
        "{args:?}: expected {expected:?} in the error line:\n{stderr}"
    );
    Ok(stderr)
}

impl Netns {
    /// `args` for tproxy-user with `--name <this namespace>` added where the
    /// command takes one, so that instances of parallel tests (whose control
    /// sockets share /run/tproxy) never meet.
    pub fn instance_args(&self, args: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let named = matches!(
            args.first().map(String::as_str),
            Some("attach" | "reload" | "stats" | "cleanup")
        ) || matches!(args.get(1).map(String::as_str), Some("add" | "del" | "list"));
        if named && !args.iter().any(|a| a == "--name") {
            args.extend(["--name".to_owned(), self.name.clone()]);
        }
        args
    }
}

impl Proxy {
    /// `tproxy-user stats --json` as printed.
    pub fn stats_json(&self, ns: &Netns) -> Result<String> {
        let out = run_tproxy(ns, &["stats", "--json", "--name", &self.name])?;
        ensure!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    }
}

#[cfg(feature = "report")]
impl Proxy {
    /// The instance's counters, from `tproxy-user stats --json`, as the
    /// library's own type.
    pub fn stats(&self, ns: &Netns) -> Result<StatsReport> {
        serde_json::from_str(&self.stats_json(ns)?).context("stats --json")
    }

    /// Waits until the counters pass `reached` (`what` names it in the
    /// error): counters of a connection's end move just after the client
    /// sees it. Returns the counters that passed.
    pub fn wait_for(
        &self,
        ns: &Netns,
        what: &str,
        reached: impl Fn(&StatsReport) -> bool,
    ) -> Result<StatsReport> {
        eventually(Duration::from_secs(10), || {
            let stats = self.stats(ns)?;
            ensure!(reached(&stats), "{what} was never reached: {stats:?}");
            Ok(stats)
        })
    }

    /// The counters as the instance stops: read, then a clean stop.
    pub fn stop_with_stats(self, ns: &Netns) -> Result<StatsReport> {
        let stats = self.stats(ns)?;
        self.stop()?;
        Ok(stats)
    }
}

#[cfg(feature = "report")]
pub use tproxy_user::control::stats::StatsReport;

/// The relays' counters of a report, which has them unless it steers to
/// another program (`--to-port`).
#[cfg(feature = "report")]
pub trait RelayCounters {
    fn tcp(&self) -> &tproxy_user::relay::TcpRelayCounters;
    fn udp(&self) -> &tproxy_user::relay::UdpRelayCounters;
}

#[cfg(feature = "report")]
impl RelayCounters for StatsReport {
    fn tcp(&self) -> &tproxy_user::relay::TcpRelayCounters {
        self.tcp.as_ref().expect("the report has no TCP relay (--to-port?)")
    }
    fn udp(&self) -> &tproxy_user::relay::UdpRelayCounters {
        self.udp.as_ref().expect("the report has no UDP relay (--to-port?)")
    }
}

/// The wrapper that runs a command as nobody with no capabilities at all.
pub const UNPRIVILEGED: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// CPU time `pid` has used (user + system, all its threads), in clock
/// ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command, which is in parentheses and may hold spaces; utime
    // and stime are fields 14 and 15 of proc(5), the state (3) is first here.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or("", |(_, f)| f).split_whitespace().collect();
    let field = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    Ok(field(11)? + field(12)?)
}

/// Whether this kernel destroys TIME_WAIT sockets through sock_diag
/// (`ss -K`). 6.1 and later do; Debian 11's 5.10 answers EOPNOTSUPP (its
/// `tcp_abort` takes only full sockets), and tproxy then says so.
pub fn kernel_destroys_time_waits() -> bool {
    kernel_at_least(6, 1)
}

/// Whether the running kernel is `major.minor` or newer.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers =
        release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}

/// What tproxy says where the kernel cannot destroy TIME_WAIT sockets.
pub const CANNOT_DESTROY_TIME_WAITS: &str = "this kernel cannot destroy TIME_WAIT sockets";
