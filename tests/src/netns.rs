//! The namespaces: [`Netns`] and the three-namespace [`Topology`], their
//! addresses, and ways to reach through them.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
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

impl Netns {
    /// `curl -sS URL` here; its body, or the error.
    pub fn curl(&self, url: &str) -> Result<String> {
        let out = self.command("curl").args(["-sS", "--max-time", "5", url]).output()?;
        ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -batch` here: one command a line.
    pub fn ip_batch(&self, script: &str) -> Result<()> {
        run_ip_batch(&["-n", &self.name], script)
    }

    /// Waits until a socket here is bound to `port`: `-t` TCP listening,
    /// `-u` UDP. Programs we start (python, socat) take a while under
    /// emulation, and a peer that talks first meets a refusal.
    pub fn wait_until_bound(&self, proto: &str, port: u16) -> Result<()> {
        let flags = format!("-Hln{}", proto.trim_start_matches('-'));
        crate::eventually(Duration::from_secs(60), || {
            let bound = self.exec(&["ss", &flags, "sport", "=", &format!(":{port}")])?;
            ensure!(!bound.trim().is_empty(), "nothing bound {proto} port {port} in {}", self.name);
            Ok(())
        })
    }

    /// `dig +short @server name A` here; the answer.
    pub fn dig(&self, server: IpAddr, name: &str) -> Result<String> {
        let out =
            self.exec(&["dig", "+short", "+time=2", "+tries=3", &format!("@{server}"), name, "A"])?;
        Ok(out.trim().to_owned())
    }
}
