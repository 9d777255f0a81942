//! `cargo xtask bench`: tproxy against the real alternatives, in the
//! namespace sandbox, with rounds interleaved and medians reported.
//!
//! Modes:
//! - `direct`: no proxy, the proxy namespace only forwards (the limit);
//! - `haproxy`: HAProxy with `bind … transparent` and `server … 0.0.0.0:0`,
//!   steered by the classic iptables TPROXY rules;
//! - `ours-iptables`: `tproxy-user relay`, steered by those same rules;
//! - `ours`: `tproxy-user attach`, eBPF steering.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::{Netns, PROXY_CLIENT_IFACE, Proxy, SERVER_V4, Topology, UdpServer};

const HTTP_PORT: u16 = 80;
const IPERF_PORT: u16 = 5201;
const UDP_PORT: u16 = 5300;
const IDLE_PORT: u16 = 9000;
/// Where iptables TPROXY sends intercepted traffic in the iptables modes.
const TPROXY_PORT: u16 = 8080;
const TPROXY_MARK: u32 = 0x1;
const TPROXY_TABLE: u32 = 100;

/// Idle connections for the memory figure. This machine's hard fd limit is
/// 20 000 and it lacks CAP_SYS_RESOURCE; a relay needs two fds per
/// connection, so 10 000 do not fit. 9 000 do, for every mode.
const IDLE_CONNECTIONS: usize = 9_000;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Direct,
    Haproxy,
    OursIptables,
    Ours,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Direct, Mode::Haproxy, Mode::OursIptables, Mode::Ours];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Haproxy => "haproxy",
            Mode::OursIptables => "ours-iptables",
            Mode::Ours => "ours",
        }
    }
}

/// What is measured, in the order of the table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    Throughput1,
    Throughput4,
    ConnRate,
    LatencyP50,
    LatencyP99,
    UdpRate,
    IdleMemory,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::Throughput1 => "TCP throughput, 1 stream (Gbit/s)",
            Metric::Throughput4 => "TCP throughput, 4 streams (Gbit/s)",
            Metric::ConnRate => "HTTP, a new connection per request (req/s)",
            Metric::LatencyP50 => "HTTP latency p50, connect included (ms)",
            Metric::LatencyP99 => "HTTP latency p99, connect included (ms)",
            Metric::UdpRate => "UDP request/response (per s)",
            Metric::IdleMemory => "relay RSS per idle connection (KiB)",
        }
    }
}

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// Only the upgrade-under-load comparison.
    pub upgrade_only: bool,
}

pub fn run(bin: &Path, options: &Options) -> Result<()> {
    ensure!(options.rounds >= 1, "at least one round");
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("TPROXY_USER_BIN", bin) };
    let work = super::workspace().join("target/bench");
    fs::create_dir_all(&work)?;
    let topology = Topology::new("bench")?;
    let servers = Servers::start(&topology, &work)?;
    let upgrades = upgrade_rounds(&topology, &work, options)?;
    let path = super::workspace().join("BENCHMARKS.md");
    let report = fs::read_to_string(&path).unwrap_or_default();
    let report = splice(&report, UPGRADE_BEGIN, UPGRADE_END, &upgrades);
    fs::write(&path, &report)?;
    println!("{upgrades}");
    if options.upgrade_only {
        drop(servers);
        eprintln!("bench: upgrade results written to {}", path.display());
        return Ok(());
    }
    let mut results: BTreeMap<(Metric, Mode), Vec<f64>> = BTreeMap::new();
    for round in 1..=options.rounds {
        for mode in Mode::ALL {
            eprintln!("bench: round {round}/{}: {}", options.rounds, mode.name());
            let steering = Steering::start(&topology, mode, bin, &work)?;
            let measured = measure(&topology, &steering, options.seconds, &work)
                .with_context(|| format!("round {round}, {}", mode.name()))?;
            drop(steering);
            for (metric, value) in measured {
                results.entry((metric, mode)).or_default().push(value);
            }
        }
    }
    drop(servers);
    let table = render(&results, options);
    println!("{table}");
    let report = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, splice(&report, RESULTS_BEGIN, RESULTS_END, &table))?;
    eprintln!("bench: results written to {}", path.display());
    Ok(())
}

/// The servers in the server namespace: nginx, iperf3, a UDP echo, and an
/// acceptor that holds idle connections.
struct Servers {
    nginx: Child,
    iperf: Child,
    _udp: UdpServer,
}

impl Servers {
    fn start(topology: &Topology, work: &Path) -> Result<Self> {
        let conf = work.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  keepalive_timeout 0;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n\
                   uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   server {{ listen {SERVER_V4}:{HTTP_PORT}; location / {{ return 200 \"hello\\n\"; }} }}\n}}\n",
                pid = work.join("nginx.pid").display(),
                err = work.join("nginx.err").display(),
                tmp = work.display(),
            ),
        )?;
        let nginx = topology
            .server
            .command("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let iperf = topology
            .server
            .command("iperf3")
            .args(["-s", "-B", &SERVER_V4.to_string(), "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3")?;
        let udp = UdpServer::start(&topology.server, (SERVER_V4, UDP_PORT).into(), 1)?;
        // Let nginx and iperf3 bind.
        wait_for_port(&topology.server, (SERVER_V4, HTTP_PORT).into())?;
        wait_for_port(&topology.server, (SERVER_V4, IPERF_PORT).into())?;
        Ok(Self { nginx, iperf, _udp: udp })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in [&mut self.nginx, &mut self.iperf] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until something listens on `addr`'s port (without connecting,
/// which iperf3 would take for a test).
fn wait_for_port(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{}", addr.port());
    while ns.exec(&["ss", "-Hltn", &filter])?.trim().is_empty() {
        ensure!(Instant::now() < deadline, "nothing listens on {addr}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One mode's steering and relay, removed when dropped.
struct Steering<'a> {
    topology: &'a Topology,
    mode: Mode,
    /// The relay process(es), for the memory figure.
    relay: Option<Child>,
    proxy: Option<Proxy>,
    /// The iptables recipe's `-m socket` rule leaves SYNs alone (`! --syn`),
    /// so that a SYN meeting a TIME_WAIT socket reaches the listener.
    syn_fixed: bool,
}

impl<'a> Steering<'a> {
    fn start(topology: &'a Topology, mode: Mode, bin: &Path, work: &Path) -> Result<Self> {
        let mut steering = Self { topology, mode, relay: None, proxy: None, syn_fixed: false };
        match mode {
            Mode::Direct => {}
            Mode::Haproxy => {
                steering.iptables_tproxy(true)?;
                let conf = work.join("haproxy.cfg");
                fs::write(
                    &conf,
                    format!(
                        "global\n  maxconn {max}\n  nbthread 2\n\
                         defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n\
                         frontend fe\n  bind 0.0.0.0:{TPROXY_PORT} transparent\n  default_backend be\n\
                         backend be\n  server original 0.0.0.0:0\n",
                        max = IDLE_CONNECTIONS + 500
                    ),
                )?;
                let child = topology
                    .proxy
                    .command("haproxy")
                    .arg("-f")
                    .arg(&conf)
                    .arg("-db")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting haproxy")?;
                steering.relay = Some(child);
                wait_for_port(&topology.proxy, (Ipv4Addr::LOCALHOST, TPROXY_PORT).into())?;
            }
            Mode::OursIptables => {
                steering.iptables_tproxy(true)?;
                let child = topology
                    .proxy
                    .command(bin)
                    .args(["relay", "--listen-port", &TPROXY_PORT.to_string()])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting tproxy-user relay")?;
                steering.relay = Some(child);
                wait_for_port(&topology.proxy, (Ipv4Addr::LOCALHOST, TPROXY_PORT).into())?;
            }
            Mode::Ours => {
                let ports: Vec<String> = [HTTP_PORT, IPERF_PORT, UDP_PORT, IDLE_PORT]
                    .iter()
                    .map(|p| p.to_string())
                    .collect();
                let mut args = vec!["attach", PROXY_CLIENT_IFACE, "--name", "bench"];
                for port in &ports {
                    args.extend(["--port", port]);
                }
                steering.proxy = Some(Proxy::start_logging(
                    &topology.proxy,
                    &args,
                    "warn,tproxy_user::attach=info",
                )?);
            }
        }
        Ok(steering)
    }

    /// The classic recipe: `-m socket` DIVERT for packets of existing
    /// sockets, TPROXY for new ones, and the fwmark routing.
    fn iptables_tproxy(&self, add: bool) -> Result<()> {
        let ns = &self.topology.proxy;
        let op = if add { "-A" } else { "-D" };
        let mark = format!("{TPROXY_MARK:#x}/{TPROXY_MARK:#x}");
        let mut rules: Vec<Vec<String>> = Vec::new();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        if add {
            rules.push(s(&["-t", "mangle", "-N", "DIVERT"]));
            rules.push(s(&[
                "-t",
                "mangle",
                "-A",
                "DIVERT",
                "-j",
                "MARK",
                "--set-mark",
                &TPROXY_MARK.to_string(),
            ]));
            rules.push(s(&["-t", "mangle", "-A", "DIVERT", "-j", "ACCEPT"]));
        }
        rules.push(s(&["-t", "mangle", op, "PREROUTING", "-p", "tcp"]));
        if self.syn_fixed {
            rules.last_mut().expect("just pushed").extend(s(&["!", "--syn"]));
        }
        rules.last_mut().expect("just pushed").extend(s(&["-m", "socket", "-j", "DIVERT"]));
        for (proto, port) in
            [("tcp", HTTP_PORT), ("tcp", IPERF_PORT), ("tcp", IDLE_PORT), ("udp", UDP_PORT)]
        {
            rules.push(s(&[
                "-t",
                "mangle",
                op,
                "PREROUTING",
                "-i",
                PROXY_CLIENT_IFACE,
                "-p",
                proto,
                "--dport",
                &port.to_string(),
                "-j",
                "TPROXY",
                "--tproxy-mark",
                &mark,
                "--on-port",
                &TPROXY_PORT.to_string(),
            ]));
        }
        if !add {
            rules.push(s(&["-t", "mangle", "-F", "DIVERT"]));
            rules.push(s(&["-t", "mangle", "-X", "DIVERT"]));
        }
        for rule in rules {
            let args: Vec<&str> =
                std::iter::once("iptables").chain(rule.iter().map(String::as_str)).collect();
            let result = ns.exec(&args);
            if add {
                result?;
            }
        }
        let table = TPROXY_TABLE.to_string();
        let fwmark = TPROXY_MARK.to_string();
        if add {
            ns.exec(&["ip", "rule", "add", "fwmark", &fwmark, "lookup", &table])?;
            ns.exec(&["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
        } else {
            let _ = ns.exec(&["ip", "rule", "del", "fwmark", &fwmark, "lookup", &table]);
            let _ = ns.exec(&["ip", "route", "flush", "table", &table]);
        }
        Ok(())
    }

    /// Resident memory of the relay, in KiB (all its processes).
    fn relay_rss_kib(&self) -> Result<u64> {
        let pid = match (&self.relay, &self.proxy) {
            (Some(child), _) => child.id(),
            (None, Some(proxy)) => proxy.pid(),
            (None, None) => return Ok(0),
        };
        // HAProxy's master forks no worker with -db; sum children anyway.
        let mut total = rss_kib(pid)?;
        for child in children(pid) {
            total += rss_kib(child).unwrap_or(0);
        }
        Ok(total)
    }
}

impl Drop for Steering<'_> {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            let _ = proxy.stop();
        }
        if let Some(mut child) = self.relay.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        if matches!(self.mode, Mode::Haproxy | Mode::OursIptables) {
            let _ = self.iptables_tproxy(false);
        }
        // A transparent relay's TIME_WAIT sockets carry the clients' tuples
        // and make the kernel drop forwarded packets of those tuples for a
        // minute. tproxy removes its own at exit; HAProxy does not, so the
        // harness does, or the next mode would start crippled.
        let _ = self.topology.proxy.exec(&["ss", "-K", "-tan", "state", "time-wait"]);
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn measure(
    topology: &Topology,
    steering: &Steering,
    seconds: u64,
    work: &Path,
) -> Result<Vec<(Metric, f64)>> {
    let mut out = Vec::new();
    out.push((Metric::Throughput1, iperf(&topology.client, 1, seconds)?));
    out.push((Metric::Throughput4, iperf(&topology.client, 4, seconds)?));
    let (rate, p50, p99) = http_close(&topology.client, seconds, work)?;
    out.extend([(Metric::ConnRate, rate), (Metric::LatencyP50, p50), (Metric::LatencyP99, p99)]);
    out.push((Metric::UdpRate, udp_rate(&topology.client, seconds)?));
    if steering.mode != Mode::Direct {
        out.push((Metric::IdleMemory, idle_memory(topology, steering)?));
    }
    Ok(out)
}

/// iperf3 throughput in Gbit/s, as received by the server.
fn iperf(client: &Netns, streams: usize, seconds: u64) -> Result<f64> {
    let out = client.exec(&[
        "iperf3",
        "-c",
        &SERVER_V4.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 output")?;
    Ok(bps / 1e9)
}

/// ApacheBench, 32 concurrent clients, each request on a new connection
/// (ab sends no keep-alive): requests per second, and the p50 and p99 of the
/// whole exchange in ms, connect included. (wrk's latency starts after the
/// connect, so it would hide a SYN that had to be retransmitted.)
fn http_close(client: &Netns, seconds: u64, work: &Path) -> Result<(f64, f64, f64)> {
    let url = format!("http://{SERVER_V4}:{HTTP_PORT}/");
    let csv = work.join("ab-percentiles.csv");
    let out = client.exec(&[
        "ab",
        "-q",
        "-c",
        "32",
        "-t",
        &seconds.to_string(),
        "-n",
        "10000000",
        "-e",
        csv.to_str().context("path")?,
        &url,
    ])?;
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests per second:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no Requests per second in ab's output")?
        .parse()?;
    if let Some(failed) = out.lines().find(|l| l.starts_with("Failed requests:"))
        && !failed.ends_with(" 0")
    {
        eprintln!("bench: ab: {failed}");
    }
    // "Percentage served,Time in ms" then one line per percent.
    let table = fs::read_to_string(&csv)?;
    let percentile = |p: u32| -> Result<f64> {
        let line = table
            .lines()
            .find(|l| {
                l.split(',').next().and_then(|v| v.trim().parse::<f64>().ok()) == Some(p as f64)
            })
            .with_context(|| format!("no {p}% in ab's percentiles"))?;
        Ok(line.split(',').nth(1).context("ab percentile")?.trim().parse()?)
    };
    Ok((rate, percentile(50)?, percentile(99)?))
}

/// Request/response exchanges per second over 8 UDP sockets in lockstep.
fn udp_rate(client: &Netns, seconds: u64) -> Result<f64> {
    const SOCKETS: usize = 8;
    let server: SocketAddr = (SERVER_V4, UDP_PORT).into();
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..SOCKETS {
        let socket = client.udp_client(server)?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (done, count) = (done.clone(), count.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 64];
            let message = [i as u8; 32];
            while !done.load(Ordering::Relaxed) {
                if socket.send_to(&message, server).is_ok()
                    && matches!(socket.recv_from(&mut buf), Ok((32, _)))
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    thread::sleep(Duration::from_secs(seconds));
    done.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Opens IDLE_CONNECTIONS relayed connections that stay idle, and returns
/// the relay's RSS growth per connection in KiB.
fn idle_memory(topology: &Topology, steering: &Steering) -> Result<f64> {
    let addr: SocketAddr = (SERVER_V4, IDLE_PORT).into();
    let listener: TcpListener = topology.server.tcp_listen(addr)?;
    let acceptor = thread::spawn(move || -> Vec<TcpStream> {
        let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
        while held.len() < IDLE_CONNECTIONS {
            match listener.accept() {
                Ok((stream, _)) => held.push(stream),
                Err(_) => break,
            }
        }
        held
    });
    thread::sleep(Duration::from_millis(200));
    let before = steering.relay_rss_kib()?;
    let mut clients = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = topology.client.tcp_connect(addr)?;
        // One byte each way would be more than idle; the handshake is all.
        let _ = stream.flush();
        clients.push(stream);
    }
    let servers = acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))?;
    ensure!(servers.len() == IDLE_CONNECTIONS, "only {} connections arrived", servers.len());
    thread::sleep(Duration::from_millis(500));
    let after = steering.relay_rss_kib()?;
    drop(clients);
    drop(servers);
    // Let the relay close them before the next measurement.
    thread::sleep(Duration::from_secs(1));
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn render(results: &BTreeMap<(Metric, Mode), Vec<f64>>, options: &Options) -> String {
    let mut out = format!(
        "Medians of {} interleaved rounds of {} s per measurement; the ratio is to `direct` \
         (to `haproxy` for memory, which `direct` does not have).\n\n",
        options.rounds, options.seconds
    );
    out += "| metric | direct | haproxy | ours-iptables | ours |\n| --- | ---: | ---: | ---: | ---: |\n";
    let metrics = [
        Metric::Throughput1,
        Metric::Throughput4,
        Metric::ConnRate,
        Metric::LatencyP50,
        Metric::LatencyP99,
        Metric::UdpRate,
        Metric::IdleMemory,
    ];
    for metric in metrics {
        let reference = if metric == Metric::IdleMemory { Mode::Haproxy } else { Mode::Direct };
        let base = results.get(&(metric, reference)).map(|v| median(v));
        out += &format!("| {} |", metric.label());
        for mode in Mode::ALL {
            let cell = match results.get(&(metric, mode)) {
                // HAProxy relays no UDP.
                _ if metric == Metric::UdpRate && mode == Mode::Haproxy => " n/a |".to_owned(),
                Some(values) => {
                    let m = median(values);
                    match base {
                        Some(b) if b > 0.0 && mode != reference => {
                            format!(" {} ({:.2}×) |", format_value(m), m / b)
                        }
                        _ => format!(" {} |", format_value(m)),
                    }
                }
                None => " – |".to_owned(),
            };
            out += &cell;
        }
        out += "\n";
    }
    out += &format!("\n{}\n", environment());
    out
}

fn format_value(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn environment() -> String {
    let version = |cmd: &str, args: &[&str]| -> String {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    let kernel = version("uname", &["-r"]);
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let commit = version("git", &["rev-parse", "--short", "HEAD"]);
    format!(
        "Measured on Linux {kernel}, {cpus} CPUs (client, proxy and server share them), tproxy {commit}; \
         {}; {}; {}; {}; {}.",
        version("haproxy", &["-v"]),
        version("nginx", &["-v"]),
        version("iperf3", &["--version"]),
        version("ab", &["-V"]),
        version("iptables", &["--version"]),
    )
}

const RESULTS_BEGIN: &str = "<!-- results: written by cargo xtask bench -->";
const RESULTS_END: &str = "<!-- end of results -->";
const UPGRADE_BEGIN: &str = "<!-- upgrade results: written by cargo xtask bench -->";
const UPGRADE_END: &str = "<!-- end of upgrade results -->";

/// Replaces one results section of BENCHMARKS.md, keeping the prose.
fn splice(report: &str, begin: &str, end: &str, table: &str) -> String {
    let block = format!("{begin}\n{table}\n{end}");
    match (report.find(begin), report.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &report[..b], &report[e + end.len()..])
        }
        _ => format!("{report}\n{block}\n"),
    }
}

/// Failed requests while the proxy is replaced under load, in each round:
/// ours with `attach --takeover`; HAProxy at its best for this, a seamless
/// reload (`stats socket … expose-fd listeners`, the new process started
/// with `-x` and `-sf`, forced splice), steered by the iptables recipe
/// with `-m socket ! --syn`. Both under `ab -r
/// -c 32` for `seconds` (at least 6), the upgrade a third of the way in.
fn upgrade_rounds(topology: &Topology, work: &Path, options: &Options) -> Result<String> {
    let seconds = options.seconds.max(6);
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        for mode in [Mode::Haproxy, Mode::Ours] {
            eprintln!("bench: upgrade round {round}/{}: {}", options.rounds, mode.name());
            let (done, failed) = upgrade_under_load(topology, mode, work, seconds)
                .with_context(|| format!("upgrade round {round}, {}", mode.name()))?;
            rows.push((mode, done, failed));
        }
    }
    let mut out = format!(
        "Failed requests while the proxy is replaced under load (`ab -r -c 32 -t {seconds}`, \
         `Connection: close`, the upgrade started after {} s), per round:\n\n\
         | upgrade | requests | failed |\n| --- | ---: | ---: |\n",
        seconds / 3
    );
    for (mode, done, failed) in rows {
        let how = match mode {
            Mode::Ours => "tproxy `attach --takeover`",
            _ => "HAProxy reload: `-x` + `-sf`, `expose-fd listeners`, `! --syn`",
        };
        out += &format!("| {how} | {done} | {failed} |\n");
    }
    Ok(out)
}

fn upgrade_under_load(
    topology: &Topology,
    mode: Mode,
    work: &Path,
    seconds: u64,
) -> Result<(u64, u64)> {
    let url = format!("http://{SERVER_V4}:{HTTP_PORT}/");
    let load = {
        let mut ab = topology.client.command("ab");
        ab.args(["-q", "-r", "-c", "32", "-t", &seconds.to_string(), "-n", "10000000", &url]);
        thread::spawn(move || ab.output())
    };
    let upgrade_at = Instant::now() + Duration::from_secs(seconds / 3);
    let pause = || thread::sleep(upgrade_at.saturating_duration_since(Instant::now()));
    match mode {
        Mode::Ours => {
            let args = ["attach", PROXY_CLIENT_IFACE, "--name", "bench-upgrade", "--port", "80"];
            let old =
                Proxy::start_logging(&topology.proxy, &args, "warn,tproxy_user::attach=info")?;
            pause();
            let mut takeover = args.to_vec();
            takeover.push("--takeover");
            let new =
                Proxy::start_logging(&topology.proxy, &takeover, "warn,tproxy_user::attach=info")?;
            let (status, log) = old.wait_exit(Duration::from_secs(120))?;
            ensure!(status.success(), "the old instance: {log}");
            let out = load.join().map_err(|_| anyhow::anyhow!("ab"))??;
            new.stop()?;
            ab_counts(&out.stdout)
        }
        _ => {
            let steering = Steering {
                topology,
                mode: Mode::Haproxy,
                relay: None,
                proxy: None,
                syn_fixed: true,
            };
            steering.iptables_tproxy(true)?;
            let socket = work.join("haproxy-upgrade.sock");
            let conf = work.join("haproxy-upgrade.cfg");
            fs::write(
                &conf,
                format!(
                    "global\n  maxconn 4096\n  nbthread 2\n  stats socket {} mode 600 level admin expose-fd listeners\n\
                     defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n\
                     frontend fe\n  bind 0.0.0.0:{TPROXY_PORT} transparent\n  default_backend be\n\
                     backend be\n  option splice-request\n  option splice-response\n  server original 0.0.0.0:0\n",
                    socket.display()
                ),
            )?;
            let haproxy = |extra: &[String]| {
                topology
                    .proxy
                    .command("haproxy")
                    .arg("-db")
                    .arg("-f")
                    .arg(&conf)
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting haproxy")
            };
            let mut old = haproxy(&[])?;
            wait_for_port(&topology.proxy, (Ipv4Addr::LOCALHOST, TPROXY_PORT).into())?;
            pause();
            let mut new = haproxy(&[
                "-x".into(),
                socket.display().to_string(),
                "-sf".into(),
                old.id().to_string(),
            ])?;
            old.wait()?;
            let out = load.join().map_err(|_| anyhow::anyhow!("ab"))??;
            unsafe { libc::kill(new.id() as i32, libc::SIGTERM) };
            new.wait()?;
            drop(steering);
            ab_counts(&out.stdout)
        }
    }
}

/// ab's completed and failed requests (non-2xx answers count as failed).
fn ab_counts(stdout: &[u8]) -> Result<(u64, u64)> {
    let text = String::from_utf8_lossy(stdout);
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let done = field("Complete requests:").context("no Complete requests in ab's output")?;
    let failed = field("Failed requests:").unwrap_or(0) + field("Non-2xx responses:").unwrap_or(0);
    Ok((done, failed))
}
