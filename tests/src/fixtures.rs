//! Servers and clients on the far ends: echo, HTTP, DNS and UDP servers,
//! byte patterns, and limits.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::*;
use anyhow::{Context as _, Result, ensure};

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
        let _ = crate::proxy::collect_lines(child.stderr.take().expect("stderr"), log.clone());
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

/// A kernel TCP counter (`nstat` name) of a namespace.
pub fn tcp_counter(ns: &Netns, name: &str) -> Result<u64> {
    let out = ns.exec(&["nstat", "-asz", name])?;
    let value = out
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().next().unwrap_or(""));
    Ok(value.ok_or_else(|| anyhow::anyhow!("no {name} in nstat: {out}"))?.parse()?)
}

/// Connects from `from` to `to` and reads to the end.
pub fn connect_from(
    topology: &Topology,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    timeout: Duration,
) -> Result<Vec<u8>> {
    use socket2::{Domain, Socket, Type};
    let socket = topology.client.run(move || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(from), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&from.into())?;
        Ok(socket)
    })??;
    socket.connect_timeout(&to.into(), timeout)?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    read_to_end(&mut stream)
}

/// Waits until the client holds no socket on `port` (its side closed).
pub fn wait_until_port_free(topology: &Topology, port: u16) -> Result<()> {
    crate::eventually(Duration::from_secs(5), || {
        let held = topology.client.exec(&["ss", "-Htan", "sport", "=", &format!(":{port}")])?;
        ensure!(held.trim().is_empty(), "the client's socket on {port} lingers");
        Ok(())
    })
}

/// A server that answers `bye` and closes first, `count` times.
pub fn closing_server(
    topology: &Topology,
    addr: std::net::SocketAddr,
    count: usize,
) -> Result<std::thread::JoinHandle<Result<Vec<std::net::SocketAddr>>>> {
    let listener = topology.server.tcp_listen(addr)?;
    Ok(std::thread::spawn(move || -> Result<Vec<std::net::SocketAddr>> {
        let mut peers = Vec::new();
        for _ in 0..count {
            let (mut stream, peer) = listener.accept()?;
            stream.write_all(b"bye")?;
            peers.push(peer);
        }
        Ok(peers)
    }))
}

/// A program started in a namespace with a config file of its own (the
/// word `CONFIG` in `args` becomes its path), its output collected; it is
/// up once something of it listens on TCP `port`. Killed when dropped.
pub struct Daemon {
    child: Child,
    config: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `program` and waits until it listens, or fails with what it
    /// said if it exits first.
    pub fn start(
        ns: &Netns,
        program: &str,
        config: &str,
        args: &[&str],
        port: u16,
    ) -> Result<Self> {
        Self::start_command(ns, ns.command(program), program, config, args, port)
    }

    /// Like [`Daemon::start`], from `command` (the program, in `ns`, and
    /// whatever else it needs: a cgroup, say).
    pub fn start_command(
        ns: &Netns,
        mut command: std::process::Command,
        program: &str,
        config: &str,
        args: &[&str],
        port: u16,
    ) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("tproxy-test-{}-{program}.conf", ns.name));
        std::fs::write(&path, config)?;
        let path_text = path.to_str().context("a UTF-8 path")?.to_owned();
        let args: Vec<String> = args.iter().map(|a| a.replace("CONFIG", &path_text)).collect();
        let mut child = command
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let _ = crate::proxy::collect_lines(child.stdout.take().expect("stdout"), log.clone());
        let _ = crate::proxy::collect_lines(child.stderr.take().expect("stderr"), log.clone());
        let mut daemon = Self { child, config: path, log };
        crate::eventually(Duration::from_secs(60), || {
            if daemon.child.try_wait()?.is_some() {
                anyhow::bail!(crate::Hopeless(format!("{program} exited: {}", daemon.log())));
            }
            let bound = ns.exec(&["ss", "-Hltn", "sport", "=", &format!(":{port}")])?;
            ensure!(!bound.trim().is_empty(), "{program} never listened: {}", daemon.log());
            Ok(())
        })?;
        Ok(daemon)
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}
