//! The sandbox the integration tests, the demo and the benchmarks run in:
//! three network namespaces on documentation address ranges.
//!
//! ```text
//!  client ns            proxy ns                     server ns
//!  c0 192.0.2.2 ---- p0 192.0.2.1 | p1 198.51.100.1 ---- s0 198.51.100.10
//!  2001:db8:1::2       2001:db8:1::1 | 2001:db8:2::1      2001:db8:2::10
//! ```
//!
//! The client and the server route through the proxy, which forwards.
//! Everything is removed when the [`Topology`] drops.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const PROXY_CLIENT_SIDE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PROXY_SERVER_SIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const PROXY_CLIENT_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const PROXY_SERVER_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

/// The proxy's client-facing interface, where `attach` runs.
pub const PROXY_CLIENT_IFACE: &str = "p0";
/// The proxy's server-facing interface.
pub const PROXY_SERVER_IFACE: &str = "p1";

/// One network namespace, by name.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there stay in it, and can be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || -> Result<T> {
            let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a command in this namespace and returns its stdout; fails on a
    /// non-zero exit.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let output = self.command(args[0]).args(&args[1..]).output()?;
        ensure!(
            output.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Binds a TCP listener inside this namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))?.with_context(|| format!("binding {addr}"))
    }

    /// Connects from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        let stream = self
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        Ok(stream)
    }

    /// Policy routing, TC filters and TCX programs that `attach` could have
    /// left on `iface`, as text; empty when nothing is there.
    pub fn interception_state(&self, iface: &str, table: u32) -> Result<String> {
        let mut state = String::new();
        for family in ["-4", "-6"] {
            for line in self.exec(&["ip", family, "rule", "show"])?.lines() {
                if line.contains("fwmark") {
                    state += &format!("rule: {line}\n");
                }
            }
            // `show table N` fails while table N does not exist; list all.
            let ours = format!("table {table} ");
            for line in self.exec(&["ip", family, "route", "show", "table", "all"])?.lines() {
                if format!("{line} ").contains(&ours) {
                    state += &format!("route: {line}\n");
                }
            }
        }
        for line in self.exec(&["tc", "filter", "show", "dev", iface, "ingress"])?.lines() {
            state += &format!("tc filter: {line}\n");
        }
        let iface = iface.to_owned();
        let tcx = self.run(move || {
            aya::programs::SchedClassifier::query_tcx(&iface, aya::programs::TcAttachType::Ingress)
                .map(|(_, programs)| programs.len())
        })?;
        // Kernels before 6.6 have no TCX; the query fails there.
        if let Ok(count) = tcx
            && count > 0
        {
            state += &format!("tcx programs: {count}\n");
        }
        Ok(state)
    }
}

/// The three namespaces and their links.
pub struct Topology {
    pub client: Netns,
    pub proxy: Netns,
    pub server: Netns,
}

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Creates the namespaces, links, addresses and routes. `tag` names the
    /// namespaces (with the process id, so parallel tests never collide).
    pub fn new(tag: &str) -> Result<Self> {
        let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tp{}-{}-{tag}", std::process::id(), n);
        let topology = Self {
            client: Netns { name: format!("{prefix}-c") },
            proxy: Netns { name: format!("{prefix}-p") },
            server: Netns { name: format!("{prefix}-s") },
        };
        // Drop removes whatever part gets created if a step fails.
        topology.create().with_context(|| format!("creating the {prefix} namespaces"))?;
        Ok(topology)
    }

    fn create(&self) -> Result<()> {
        let (c, p, s) = (&self.client.name, &self.proxy.name, &self.server.name);
        run_ip_batch(
            &[],
            &format!(
                "netns add {c}\nnetns add {p}\nnetns add {s}\n\
                 link add c0 netns {c} type veth peer name p0 netns {p}\n\
                 link add s0 netns {s} type veth peer name p1 netns {p}\n"
            ),
        )?;
        let addresses = |dev: &str, v4: Ipv4Addr, v6: Ipv6Addr| {
            format!(
                "addr add {v4}/24 dev {dev}\naddr add {v6}/64 dev {dev} nodad\nlink set {dev} up\n"
            )
        };
        let client = addresses("c0", CLIENT_V4, CLIENT_V6)
            + &format!("route add default via {PROXY_CLIENT_SIDE_V4}\n")
            + &format!("route add default via {PROXY_CLIENT_SIDE_V6}\n");
        let proxy = addresses("p0", PROXY_CLIENT_SIDE_V4, PROXY_CLIENT_SIDE_V6)
            + &addresses("p1", PROXY_SERVER_SIDE_V4, PROXY_SERVER_SIDE_V6);
        let server = addresses("s0", SERVER_V4, SERVER_V6)
            + &format!("route add default via {PROXY_SERVER_SIDE_V4}\n")
            + &format!("route add default via {PROXY_SERVER_SIDE_V6}\n");
        for (ns, script) in [(c, client), (p, proxy), (s, server)] {
            run_ip_batch(&["-n", ns], &(script + "link set lo up\n"))?;
        }
        self.proxy.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        // For about a second after its links come up the proxy ignores
        // neighbor solicitations, which delays a test's first IPv6
        // connection by a retransmit. Static neighbors avoid the wait.
        let mac = |ns: &Netns, dev: &str| -> Result<String> {
            Ok(ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")])?.trim().to_owned())
        };
        let (c0, p0) = (mac(&self.client, "c0")?, mac(&self.proxy, "p0")?);
        let (s0, p1) = (mac(&self.server, "s0")?, mac(&self.proxy, "p1")?);
        let neigh = |ip: Ipv6Addr, mac: &str, dev: &str| {
            format!("neigh replace {ip} lladdr {mac} dev {dev} nud permanent\n")
        };
        run_ip_batch(&["-n", c], &neigh(PROXY_CLIENT_SIDE_V6, &p0, "c0"))?;
        run_ip_batch(&["-n", s], &neigh(PROXY_SERVER_SIDE_V6, &p1, "s0"))?;
        run_ip_batch(&["-n", p], &(neigh(CLIENT_V6, &c0, "p0") + &neigh(SERVER_V6, &s0, "p1")))?;
        Ok(())
    }

    /// The server's address in the family of `v6`.
    pub fn server_addr(v6: bool, port: u16) -> SocketAddr {
        if v6 { (SERVER_V6, port).into() } else { (SERVER_V4, port).into() }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server, &self.proxy] {
            let _ =
                Command::new("ip").args(["netns", "del", &ns.name]).stderr(Stdio::null()).status();
        }
    }
}

fn run_ip_batch(options: &[&str], script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(options)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    child.stdin.take().expect("stdin").write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "ip -batch: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

impl Netns {
    /// Connects to `addr` and reports whether the connection was reset, be it
    /// before `connect` returned or on the first read.
    pub fn connection_is_reset(&self, addr: SocketAddr) -> Result<bool> {
        let is_reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
        Ok(match self.tcp_connect(addr) {
            Ok(mut stream) => matches!(stream.read(&mut [0u8; 16]), Err(e) if is_reset(&e)),
            Err(e) => e.downcast_ref::<std::io::Error>().is_some_and(is_reset),
        })
    }
}

/// Path of the `tproxy-user` binary under test: `$TPROXY_USER_BIN`, or the
/// workspace's debug build.
pub fn tproxy_bin() -> PathBuf {
    match std::env::var_os("TPROXY_USER_BIN") {
        Some(path) => path.into(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tproxy-user"),
    }
}

/// A running `tproxy-user attach`, with its log collected.
pub struct Proxy {
    child: Child,
    log: Arc<Mutex<String>>,
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
        // Loading through the verifier takes seconds under emulation.
        proxy.wait_for_log("ready:", Duration::from_secs(60))?;
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
        let mut child = ns
            .command(program)
            .args(args)
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let readers = vec![collect_lines(stdout, log.clone()), collect_lines(stderr, log.clone())];
        let name = args.iter().skip_while(|a| **a != "--name").nth(1).unwrap_or(&"default");
        Ok(Self { child, log, readers, name: name.to_string() })
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("no {needle:?} in the proxy log within {timeout:?}:\n{}", self.log())
    }

    /// The port the TCP relay listens on, from the ready line.
    pub fn listen_port(&self) -> Result<u16> {
        let log = self.log();
        let line =
            log.lines().find(|l| l.contains("relay listening on port")).context("no ready line")?;
        let (_, rest) = line.split_once("relay listening on port ").context("no port")?;
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
    pub fn stop_with(mut self, signal: i32) -> Result<(ExitStatus, String)> {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The readers end at EOF, after the last lines.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Ok((status, self.log()));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("tproxy-user did not exit within 10 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
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

fn collect_lines(
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

/// Deterministic bytes that reveal reordering, loss and corruption.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads until EOF.
pub fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    Ok(data)
}

/// The server's view of one connection: the peer it saw and what arrived.
pub struct Served {
    pub peer: SocketAddr,
    pub received: Vec<u8>,
}

/// Accepts one connection on `listener` in the background: reads until the
/// client half-closes, then answers with `reply` and closes.
pub fn serve_once(listener: TcpListener, reply: Vec<u8>) -> thread::JoinHandle<Result<Served>> {
    thread::spawn(move || {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let received = read_to_end(&mut stream)?;
        stream.write_all(&reply)?;
        Ok(Served { peer, received })
    })
}

/// The client address the server should see when the proxy is bypassed.
pub fn client_ip(v6: bool) -> IpAddr {
    if v6 { CLIENT_V6.into() } else { CLIENT_V4.into() }
}

/// The proxy's server-side address, which the server sees for relayed connections.
pub fn proxy_ip(v6: bool) -> IpAddr {
    if v6 { PROXY_SERVER_SIDE_V6.into() } else { PROXY_SERVER_SIDE_V4.into() }
}

impl Netns {
    /// A UDP socket bound inside this namespace, with a 5 s read timeout.
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        let socket =
            self.run(move || UdpSocket::bind(addr))?.with_context(|| format!("binding {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(socket)
    }

    /// A UDP client socket on an ephemeral port of the family of `peer`.
    pub fn udp_client(&self, peer: SocketAddr) -> Result<UdpSocket> {
        let any: SocketAddr = if peer.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        self.udp_bind(any)
    }
}

/// A UDP server running on a thread: answers each datagram with `copies`
/// copies of its payload (0: never answers) and records who sent it.
pub struct UdpServer {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(ns: &Netns, addr: SocketAddr, copies: usize) -> Result<Self> {
        let socket = ns.udp_bind(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, done) = (peers.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
                seen.lock().unwrap().push(peer);
                for _ in 0..copies {
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        });
        Ok(Self { peers, stop, thread: Some(thread) })
    }

    /// Every sender so far, one entry per datagram.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server that echoes every connection until EOF on its own thread,
/// and reports each peer it accepted (with when) on the returned channel.
pub fn tcp_echo_server(
    ns: &Netns,
    addr: SocketAddr,
) -> Result<std::sync::mpsc::Receiver<(Instant, SocketAddr)>> {
    let listener = ns.tcp_listen(addr)?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let Ok(peer) = stream.peer_addr() else { continue };
            let _ = tx.send((Instant::now(), peer));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(rx)
}

/// Raises this process's open-file limit as far as it may go (the hard
/// limit too, with CAP_SYS_RESOURCE) and returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let raised =
            libc::rlimit { rlim_cur: want.max(limit.rlim_max), rlim_max: want.max(limit.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

impl Proxy {
    /// The instance's counters, from `tproxy-user stats --json`.
    pub fn stats(&self, ns: &Netns) -> Result<serde_json::Value> {
        let out = run_tproxy(ns, &["stats", "--json", "--name", &self.name])?;
        ensure!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until the counter `group.name` (as in `stats --json`) reaches
    /// `value`: counters of a connection's end move just after the client
    /// sees it.
    pub fn wait_for_counter(&self, ns: &Netns, group: &str, name: &str, value: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.stats(ns)?;
            if stats[group][name] == value {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{group}.{name} never reached {value}: {stats}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The counters as the instance stops: read, then a clean stop.
    pub fn stop_with_stats(self, ns: &Netns) -> Result<serde_json::Value> {
        let stats = self.stats(ns)?;
        self.stop()?;
        Ok(stats)
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

/// dnsmasq in the server namespace, answering the given names with the
/// given addresses and logging who asked. Killed when dropped.
pub struct Dnsmasq {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Dnsmasq {
    /// Starts it on the server's s0 with `records` (name, address).
    pub fn start(topology: &Topology, records: &[(&str, &str)]) -> Result<Self> {
        Self::start_in(&topology.server, &["--interface=s0"], records)
    }

    /// Starts it in `ns`, listening where `listen` says (dnsmasq options
    /// such as `--listen-address=ADDR`), with `records` (name, address).
    pub fn start_in(ns: &Netns, listen: &[&str], records: &[(&str, &str)]) -> Result<Self> {
        let addresses: Vec<String> =
            records.iter().map(|(name, addr)| format!("--address=/{name}/{addr}")).collect();
        let mut child = ns
            .command("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--user=root",
                "--bind-interfaces",
                "--log-queries",
                "--log-facility=-",
            ])
            .args(listen)
            .args(addresses)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dnsmasq")?;
        let log = Arc::new(Mutex::new(String::new()));
        let _ = collect_lines(child.stderr.take().expect("stderr"), log.clone());
        Ok(Self { child, log })
    }

    /// Whether dnsmasq logged a query from `addr`.
    pub fn saw_query_from(&self, addr: &str) -> bool {
        self.log.lock().unwrap().contains(&format!("from {addr}"))
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 -m http.server` in a namespace, dual-stack on `[::]:port`,
/// serving a directory whose index says `body`. Killed when dropped.
pub struct HttpServer {
    child: Child,
    dir: PathBuf,
}

impl HttpServer {
    /// Starts it and waits until it listens.
    pub fn start(ns: &Netns, port: u16, body: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-http-{port}", ns.name));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("index.html"), body)?;
        let child = ns
            .command("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "::", "--directory"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?;
        let server = Self { child, dir };
        ns.wait_until_bound("-t", port).context("http.server")?;
        Ok(server)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A one-line HTTP server on a thread: answers every request with `body`
/// and reports each peer on the returned channel.
pub fn http_responder(
    ns: &Netns,
    addr: SocketAddr,
    body: &'static str,
) -> Result<std::sync::mpsc::Receiver<SocketAddr>> {
    let listener = ns.tcp_listen(addr)?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let Ok(peer) = stream.peer_addr() else { continue };
            let _ = tx.send(peer);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(rx)
}

impl Netns {
    /// `curl -sS URL` here; its body, or the error.
    pub fn curl(&self, url: &str) -> Result<String> {
        let out = self.command("curl").args(["-sS", "--max-time", "5", url]).output()?;
        ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until a socket here is bound to `port`: `-t` TCP listening,
    /// `-u` UDP. Programs we start (python, socat) take a while under
    /// emulation, and a peer that talks first meets a refusal.
    pub fn wait_until_bound(&self, proto: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let flags = format!("-Hln{}", proto.trim_start_matches('-'));
        while self.exec(&["ss", &flags, "sport", "=", &format!(":{port}")])?.trim().is_empty() {
            ensure!(
                Instant::now() < deadline,
                "nothing bound {proto} port {port} in {}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `dig +short @server name A` here; the answer.
    pub fn dig(&self, server: IpAddr, name: &str) -> Result<String> {
        let out =
            self.exec(&["dig", "+short", "+time=2", "+tries=3", &format!("@{server}"), name, "A"])?;
        Ok(out.trim().to_owned())
    }
}

/// Whether this kernel destroys TIME_WAIT sockets through sock_diag
/// (`ss -K`). 6.1 and later do; Debian 11's 5.10 answers EOPNOTSUPP (its
/// `tcp_abort` takes only full sockets), and tproxy then says so.
pub fn kernel_destroys_time_waits() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers =
        release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (6, 1)
}

/// What tproxy says where the kernel cannot destroy TIME_WAIT sockets.
pub const CANNOT_DESTROY_TIME_WAITS: &str = "this kernel cannot destroy TIME_WAIT sockets";

/// Sends `rounds` datagrams from `client` to `addr`; each must come back,
/// whole, from `addr` itself (an echoing [`UdpServer`] on the other end).
pub fn udp_round_trips(client: &UdpSocket, addr: SocketAddr, rounds: u8) -> Result<()> {
    for i in 0..rounds {
        client.send_to(&[i; 16], addr)?;
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf)?;
        ensure!(from == addr && buf[..n] == [i; 16], "reply {i} from {from}");
    }
    Ok(())
}
