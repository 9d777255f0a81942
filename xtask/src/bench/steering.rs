//! Each mode's steering and relay, and the servers they all reach.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::{
    Netns, PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, Proxy, SERVER_V4, Topology, UdpServer, cpu_ticks,
};

use super::Mode;

pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
pub const UDP_PORT: u16 = 5300;
pub const IDLE_PORT: u16 = 9000;
/// Where iptables TPROXY sends intercepted traffic in the HAProxy modes.
pub const TPROXY_PORT: u16 = 8080;
/// Where the UDP rival, nginx, listens for the redirected datagrams.
const NGINX_UDP_PORT: u16 = 5301;
const TPROXY_MARK: u32 = 0x1;
const TPROXY_TABLE: u32 = 100;

/// Idle connections for the memory figure. This machine's hard fd limit is
/// 20 000 and it lacks CAP_SYS_RESOURCE; a relay needs two fds per
/// connection, so 10 000 do not fit. 9 000 do, for every mode.
pub const IDLE_CONNECTIONS: usize = 9_000;

/// The servers in the server namespace: nginx, iperf3 and a UDP echo.
pub struct Servers {
    nginx: Child,
    iperf: Child,
    _udp: UdpServer,
}

impl Servers {
    pub fn start(topology: &Topology, work: &Path) -> Result<Self> {
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
        let nginx = start_nginx(&topology.server, &conf, work)?;
        let iperf = topology
            .server
            .command("iperf3")
            .args(["-s", "-B", &SERVER_V4.to_string(), "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting iperf3")?;
        let udp = UdpServer::start(&topology.server, (SERVER_V4, UDP_PORT).into(), 1)?;
        wait_for_port(&topology.server, "t", HTTP_PORT)?;
        wait_for_port(&topology.server, "t", IPERF_PORT)?;
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

/// Starts `program` with `args` in `ns`, its output discarded.
pub fn start_quiet(ns: &Netns, program: &str, args: &[&std::ffi::OsStr]) -> Result<Child> {
    ns.command(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))
}

/// nginx with `conf`, its paths under `work`.
fn start_nginx(ns: &Netns, conf: &Path, work: &Path) -> Result<Child> {
    start_quiet(ns, "nginx", &["-c".as_ref(), conf.as_os_str(), "-p".as_ref(), work.as_os_str()])
}

/// Waits until something is bound to `port` (`proto`: `t` for TCP
/// listeners, `u` for UDP), without connecting, which iperf3 would take
/// for a test.
pub fn wait_for_port(ns: &Netns, proto: &str, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    let flags = format!("-Hl{proto}n");
    while ns.exec(&["ss", &flags, &filter])?.trim().is_empty() {
        ensure!(Instant::now() < deadline, "nothing is bound to port {port}");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How the iptables recipe is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// `-m socket -j DIVERT` for every TCP packet: a SYN that meets a
    /// TIME_WAIT socket of the relay is diverted to it and stalls.
    Plain,
    /// `-m socket ! --syn -j DIVERT`: SYNs go to TPROXY and the listener.
    SynFixed,
    /// Only UDP to the echo server, redirected (NAT) to nginx's port.
    UdpRedirect,
}

/// One mode's steering and relay, removed when dropped.
pub struct Steering<'a> {
    pub topology: &'a Topology,
    pub mode: Mode,
    /// The relay process, for the memory figure.
    relay: Option<Child>,
    proxy: Option<Proxy>,
    recipe: Option<Recipe>,
}

impl<'a> Steering<'a> {
    pub fn start(topology: &'a Topology, mode: Mode, work: &Path) -> Result<Self> {
        let mut steering = Self { topology, mode, relay: None, proxy: None, recipe: None };
        match mode {
            Mode::Direct => {}
            Mode::HaproxyRecipe | Mode::Haproxy | Mode::HaproxySpoof => {
                let best = mode != Mode::HaproxyRecipe;
                steering.iptables(if best { Recipe::SynFixed } else { Recipe::Plain })?;
                let conf = work.join("haproxy.cfg");
                fs::write(&conf, haproxy_config(mode, IDLE_CONNECTIONS + 100, None))?;
                let args = ["-db".as_ref(), "-f".as_ref(), conf.as_os_str()];
                steering.relay = Some(start_quiet(&topology.proxy, "haproxy", &args)?);
                wait_for_port(&topology.proxy, "t", TPROXY_PORT)?;
            }
            Mode::NginxUdp => {
                steering.iptables(Recipe::UdpRedirect)?;
                let conf = work.join("nginx-udp.conf");
                fs::write(&conf, nginx_udp_config(work))?;
                steering.relay = Some(start_nginx(&topology.proxy, &conf, work)?);
                wait_for_port(&topology.proxy, "u", NGINX_UDP_PORT)?;
            }
            Mode::Ours | Mode::OursSpoof => {
                let ports: Vec<String> = [HTTP_PORT, IPERF_PORT, UDP_PORT, IDLE_PORT]
                    .iter()
                    .map(|p| p.to_string())
                    .collect();
                // Like HAProxy's maxconn: the default bound reserves two
                // pipes per connection within this machine's 20 000 files.
                let max = (IDLE_CONNECTIONS + 100).to_string();
                let mut args = vec![
                    "attach",
                    PROXY_CLIENT_IFACE,
                    "--name",
                    "bench",
                    "--max-connections",
                    &max,
                    // One client machine, like HAProxy's default of none.
                    "--max-connections-per-source",
                    "0",
                ];
                if mode == Mode::OursSpoof {
                    // Replies to the client's address arrive on the server side.
                    args.extend([PROXY_SERVER_IFACE, "--spoof-source"]);
                }
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

    /// A steering of `recipe` with no relay, for the upgrade comparison,
    /// which starts and replaces its HAProxy itself.
    pub fn recipe_only(topology: &'a Topology, recipe: Recipe) -> Result<Self> {
        let mut steering =
            Self { topology, mode: Mode::Haproxy, relay: None, proxy: None, recipe: None };
        steering.iptables(recipe)?;
        Ok(steering)
    }

    /// The relay's pid, if it has one.
    pub fn relay_pid(&self) -> Option<u32> {
        match (&self.relay, &self.proxy) {
            (Some(child), _) => Some(child.id()),
            (None, Some(proxy)) => Some(proxy.pid()),
            (None, None) => None,
        }
    }

    /// The classic recipe: `-m socket` DIVERT for packets of existing
    /// sockets, TPROXY for new ones, and the fwmark routing. Removed on drop.
    fn iptables(&mut self, recipe: Recipe) -> Result<()> {
        self.recipe = Some(recipe);
        for rule in recipe_rules(recipe, "-A") {
            self.iptables_run(&rule)?;
        }
        if recipe == Recipe::UdpRedirect {
            return Ok(());
        }
        let ns = &self.topology.proxy;
        let (table, fwmark) = (TPROXY_TABLE.to_string(), TPROXY_MARK.to_string());
        ns.exec(&["ip", "rule", "add", "fwmark", &fwmark, "lookup", &table])?;
        ns.exec(&["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
        Ok(())
    }

    fn iptables_run(&self, rule: &[String]) -> Result<String> {
        let args: Vec<&str> =
            std::iter::once("iptables").chain(rule.iter().map(String::as_str)).collect();
        self.topology.proxy.exec(&args)
    }

    /// The relay's process and its children (HAProxy's and nginx's workers).
    fn relay_pids(&self) -> Vec<u32> {
        self.relay_pid().map(|pid| [vec![pid], children(pid)].concat()).unwrap_or_default()
    }

    /// Resident memory of the relay, in KiB (its children included).
    pub fn relay_rss_kib(&self) -> Result<u64> {
        let pids = self.relay_pids();
        let Some((pid, children)) = pids.split_first() else { return Ok(0) };
        Ok(rss_kib(*pid)? + children.iter().map(|&c| rss_kib(c).unwrap_or(0)).sum::<u64>())
    }

    /// CPU time the relay (its threads and children) has used, in clock
    /// ticks; `None` without a relay.
    pub fn relay_cpu_ticks(&self) -> Option<u64> {
        let pids = self.relay_pids();
        (!pids.is_empty()).then(|| pids.into_iter().filter_map(|p| cpu_ticks(p).ok()).sum())
    }
}

impl Drop for Steering<'_> {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            let _ = proxy.stop();
        }
        if let Some(mut child) = self.relay.take() {
            // Workers too, should the master not outlive the signal.
            for pid in children(child.id()) {
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        if let Some(recipe) = self.recipe {
            for rule in recipe_rules(recipe, "-D") {
                let _ = self.iptables_run(&rule);
            }
            // Replies of redirected flows follow their conntrack entries.
            let _ = self.topology.proxy.exec(&["conntrack", "-F"]);
            let ns = &self.topology.proxy;
            let (table, fwmark) = (TPROXY_TABLE.to_string(), TPROXY_MARK.to_string());
            let _ = ns.exec(&["ip", "rule", "del", "fwmark", &fwmark, "lookup", &table]);
            let _ = ns.exec(&["ip", "route", "flush", "table", &table]);
        }
        // A transparent relay's TIME_WAIT sockets carry the clients' tuples
        // and make the kernel drop forwarded packets of those tuples for a
        // minute. tproxy removes its own at exit; HAProxy does not, so the
        // harness does, or the next mode would start crippled.
        let _ = self.topology.proxy.exec(&["ss", "-K", "-tan", "state", "time-wait"]);
        // The servers' own, when they closed first: with a spoofed source
        // the next mode's connections come in on those tuples.
        let _ = self.topology.server.exec(&["ss", "-K", "-tan", "state", "time-wait"]);
    }
}

/// HAProxy's configuration for `mode`: transparent bind, connecting to the
/// original destination, 2 threads (one per core); at its best with forced
/// splice, and `usesrc clientip` to spoof. `stats` adds the socket that a
/// seamless reload passes the listeners through.
pub fn haproxy_config(mode: Mode, maxconn: usize, stats: Option<&Path>) -> String {
    let mut global = format!("global\n  maxconn {maxconn}\n  nbthread 2\n");
    if mode != Mode::HaproxyRecipe {
        // Its default, maxconn / 4 pipes of two descriptors each, would not
        // fit this machine's 20 000; 32 clients never need more than 64.
        global += "  maxpipes 512\n";
    }
    if let Some(socket) = stats {
        global += &format!(
            "  stats socket {} mode 600 level admin expose-fd listeners\n",
            socket.display()
        );
    }
    let mut backend = String::from("backend be\n");
    if mode != Mode::HaproxyRecipe {
        backend += "  option splice-request\n  option splice-response\n";
    }
    if mode == Mode::HaproxySpoof {
        backend += "  source 0.0.0.0 usesrc clientip\n";
    }
    backend += "  server original 0.0.0.0:0\n";
    format!(
        "{global}defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n\
         frontend fe\n  bind 0.0.0.0:{TPROXY_PORT} transparent\n  default_backend be\n{backend}"
    )
}

/// The UDP rival: nginx's stream module, a worker per core with a
/// SO_REUSEPORT socket each, one upstream socket per client (a session
/// lasts while datagrams flow), to the echo server behind the REDIRECT.
fn nginx_udp_config(work: &Path) -> String {
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 2;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 4096; }}\n\
         stream {{\n  server {{\n    listen {NGINX_UDP_PORT} udp reuseport;\n\
             proxy_pass {SERVER_V4}:{UDP_PORT};\n    proxy_timeout 10s;\n  }}\n}}\n",
        pid = work.join("nginx-udp.pid").display(),
        err = work.join("nginx-udp.err").display(),
    )
}

/// The iptables commands of `recipe`, adding (`-A`) or deleting (`-D`).
fn recipe_rules(recipe: Recipe, op: &str) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mark = format!("{TPROXY_MARK:#x}/{TPROXY_MARK:#x}");
    let mut rules: Vec<Vec<String>> = Vec::new();
    let tproxy = |port: u16| {
        let mut rule =
            s(&["-t", "mangle", op, "PREROUTING", "-i", PROXY_CLIENT_IFACE, "-p", "tcp"]);
        rule.extend(s(&["--dport", &port.to_string(), "-j", "TPROXY", "--tproxy-mark", &mark]));
        rule.extend(s(&["--on-port", &TPROXY_PORT.to_string()]));
        rule
    };
    if recipe == Recipe::UdpRedirect {
        let mut rule = s(&["-t", "nat", op, "PREROUTING", "-i", PROXY_CLIENT_IFACE, "-p", "udp"]);
        rule.extend(s(&["--dport", &UDP_PORT.to_string(), "-j", "REDIRECT", "--to-ports"]));
        rule.push(NGINX_UDP_PORT.to_string());
        rules.push(rule);
        return rules;
    }
    if op == "-A" {
        rules.push(s(&["-t", "mangle", "-N", "DIVERT"]));
        rules.push(s(&["-t", "mangle", "-A", "DIVERT", "-j", "MARK", "--set-mark", "1"]));
        rules.push(s(&["-t", "mangle", "-A", "DIVERT", "-j", "ACCEPT"]));
    }
    let mut divert = s(&["-t", "mangle", op, "PREROUTING", "-p", "tcp"]);
    if recipe == Recipe::SynFixed {
        divert.extend(s(&["!", "--syn"]));
    }
    divert.extend(s(&["-m", "socket", "-j", "DIVERT"]));
    rules.push(divert);
    for port in [HTTP_PORT, IPERF_PORT, IDLE_PORT] {
        rules.push(tproxy(port));
    }
    if op == "-D" {
        rules.push(s(&["-t", "mangle", "-F", "DIVERT"]));
        rules.push(s(&["-t", "mangle", "-X", "DIVERT"]));
    }
    rules
}

/// Clock ticks per second, what /proc/PID/stat counts in.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

pub fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `addr` as the harness's servers see it.
pub fn server(port: u16) -> SocketAddr {
    (SERVER_V4, port).into()
}
