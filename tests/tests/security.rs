//! What a local user without privileges, a hostile client or a hostile
//! upstream tries against a running instance (SECURITY.md names each
//! item). The attacker runs as uid 65534 through `setpriv`, as one would.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::*;

/// The system's Python, which any user can run (root's PATH may lead
/// into its home).
const PYTHON: &str = "/usr/bin/python3";

/// `program` in `ns` as uid and gid 65534 with no supplementary groups.
fn as_nobody(ns: &Netns, program: &str) -> Command {
    let mut command = in_netns(ns, "setpriv", None);
    command.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", program]);
    command
}

/// Binds a UDP socket to HOST PORT with SO_REUSEADDR (and IP_FREEBIND, so
/// that any address will do) and prints `bound` or the error's name.
const BIND_UDP: &str = r#"
import errno, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
try:
    s.bind((host, port))
    print('bound', flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"#;

/// The local addresses of `proto` sockets in `ns` that `process` has open.
fn sockets_of(ns: &Netns, proto: &str, process: &str) -> Result<Vec<SocketAddr>> {
    let out = ns.exec(&["ss", "-Hanp", &format!("--{proto}")])?;
    Ok(out
        .lines()
        .filter(|l| l.contains(&format!("\"{process}\"")))
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.replace('*', "0.0.0.0").parse().ok())
        .collect())
}

/// Item 1: the relay's loopback UDP sockets, where the cgroup hooks send
/// the host's own datagrams, cannot be bound a second time by another user.
/// With SO_REUSEADDR on them, the newest socket on the port took the
/// intercepted DNS queries, and its forged answers looked like the
/// resolver's.
#[test]
fn no_local_user_can_bind_the_relays_udp_sockets() -> Result<()> {
    let topology = Topology::new("hijack")?;
    let cgroup = TestCgroup::new("hijack")?;
    let _dns = Dnsmasq::start(&topology, &[("www.example.test", "203.0.113.80")])?;
    let proxy = Proxy::start_keeping_mounts(
        &topology.proxy,
        None,
        &["attach", PROXY_CLIENT_IFACE, "--cgroup", &cgroup.relative, "--port", "53"],
    )?;
    let relay = sockets_of(&topology.proxy, "udp", "tproxy-user")?;
    let loopback: Vec<_> = relay.iter().filter(|a| a.ip().is_loopback()).collect();
    ensure!(loopback.len() == 2, "the relay's loopback UDP sockets: {relay:?}");
    for addr in relay {
        let out = as_nobody(&topology.proxy, PYTHON)
            .args(["-c", BIND_UDP, &addr.ip().to_string(), &addr.port().to_string()])
            .output()?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(said == "EADDRINUSE", "nobody binding {addr}: {said:?} {out:?}");
    }
    // And the queries still reach the resolver through the relay.
    let server = Topology::server_addr(false, 53).ip().to_string();
    let out = cgroup
        .command(&topology.proxy, "dig")
        .args(["+short", "+time=2", "+tries=3", &format!("@{server}"), "www.example.test"])
        .output()?;
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "203.0.113.80", "dig: {out:?}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.udp().sessions_total == 1, "{stats:?}");
    Ok(())
}

/// A REDIRECT-style proxy: accepts on 127.0.0.1:PORT and prints, for each
/// connection, its peer and what `getsockopt(SO_ORIGINAL_DST)` says
/// (`none` when the kernel has no answer), then closes it first.
const REDIRECT_PROXY: &str = r#"
import socket, struct, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('127.0.0.1', int(sys.argv[1])))
l.listen(16)
print('listening', flush=True)
while True:
    c, peer = l.accept()
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)
        dst = '%s:%d' % (socket.inet_ntoa(raw[4:8]), struct.unpack('!H', raw[2:4])[0])
    except OSError:
        dst = 'none'
    print('%d %s' % (peer[1], dst), flush=True)
    c.close()
"#;

/// Connects to HOST PORT (from local port FROM if given) and waits for the
/// other end to close; prints the local port.
const CONNECT: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if len(sys.argv) > 3:
    s.bind(('127.0.0.1', int(sys.argv[3])))
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
s.recv(1)
s.close()
"#;

/// Item 7: a record of where a rewritten connection meant to go ends with
/// the connection. Before, it stayed keyed by the local port, and anyone
/// who connected to the proxy later from that port was taken to the old
/// connection's destination.
#[test]
fn a_closed_connections_original_destination_is_never_handed_to_another() -> Result<()> {
    let topology = Topology::new("staledst")?;
    let clients = TestCgroup::new("stale-clients")?;
    let proxies = TestCgroup::new("stale-proxy")?;
    let mut proxy_app = proxies
        .command(&topology.proxy, "python3")
        .args(["-c", REDIRECT_PROXY, "12345"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(proxy_app.stdout.take().context("stdout")?).lines();
    let mut next_line =
        move || -> Result<String> { lines.next().context("the proxy ended")?.map_err(Into::into) };
    ensure!(next_line()? == "listening");
    let proxy = Proxy::start_keeping_mounts(
        &topology.proxy,
        None,
        &[
            "attach",
            "--cgroup",
            &clients.relative,
            "--original-dst-cgroup",
            &proxies.relative,
            "--port",
            "80",
            "--proto",
            "tcp",
            "--to-port",
            "12345",
        ],
    )?;
    let server = Topology::server_addr(false, 80);
    let out = clients
        .command(&topology.proxy, "python3")
        .args(["-c", CONNECT, &server.ip().to_string(), "80"])
        .output()?;
    ensure!(out.status.success(), "the intercepted client: {out:?}");
    let port = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(next_line()? == format!("{port} {server}"), "the intercepted connection");
    // Another user, from the same local port, straight to the proxy.
    let out = as_nobody(&topology.proxy, PYTHON)
        .args(["-c", CONNECT, "127.0.0.1", "12345", &port])
        .output()?;
    ensure!(out.status.success(), "nobody's connection: {out:?}");
    let seen = next_line()?;
    ensure!(seen == format!("{port} none"), "nobody was given a destination: {seen}");
    let _ = proxy_app.kill();
    let _ = proxy_app.wait();
    proxy.stop()?;
    Ok(())
}

/// A runtime directory of the test's own, as systemd's `RuntimeDirectory=`
/// or a DaemonSet's hostPath gives one; removed when dropped.
struct RunDir(std::path::PathBuf);

impl RunDir {
    fn new(tag: &str, mode: u32, owner: Option<u32>) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path =
            std::path::PathBuf::from(format!("/run/tproxy-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
        }
        Ok(Self(path))
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    /// `tproxy-user <args>` in `ns` with this runtime directory.
    fn tproxy(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut command = ns.command(tproxy_bin());
        command.args(ns.instance_args(args)).env("RUNTIME_DIRECTORY", &self.0).env("NO_COLOR", "1");
        command
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Item 3: the locks a start takes live where only the daemon can open
/// them, and a lock held too long is a one-line error, never a hang.
/// Before, the directory kept the 0755 a hostPath gives it, so any user
/// could hold a shared lock on `routing.lock` and every later start hung.
#[test]
fn no_local_user_can_hold_the_locks_a_start_needs() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let topology = Topology::new("locks")?;
    let dir = RunDir::new("locks", 0o755, None)?;
    let args = ["attach", PROXY_CLIENT_IFACE, "--port", "80"];
    let command = dir.tproxy(&topology.proxy, &args);
    let proxy = Proxy::spawn_command(command, &args, "info")?;
    proxy.wait_ready()?;
    let mode = std::fs::metadata(&dir.0)?.permissions().mode() & 0o777;
    ensure!(mode == 0o700, "the runtime directory is {mode:o}");
    for lock in ["routing.lock", &format!("{}.lock", topology.proxy.name)] {
        let out = as_nobody(&topology.proxy, "flock")
            .args(["--shared", "--nonblock", &dir.file(lock), "true"])
            .output()?;
        ensure!(!out.status.success(), "nobody took a shared lock on {lock}");
    }
    proxy.stop()?;
    // Someone who may (root) holds the routing lock: the start says so.
    let mut holder = Command::new("flock")
        .args(["--nonblock", &dir.file("routing.lock"), "sh", "-c", "echo held; exec sleep 60"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut held = String::new();
    BufReader::new(holder.stdout.take().context("stdout")?).read_line(&mut held)?;
    ensure!(held.trim() == "held", "the holder said {held:?}");
    let out = dir.tproxy(&topology.proxy, &args).output();
    let _ = holder.kill();
    let _ = holder.wait();
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started although the lock was held: {stderr}");
    ensure!(
        stderr.lines().any(|l| l.contains("routing.lock is held by another process")),
        "{stderr}"
    );
    Ok(())
}

/// Item 4: root's `cleanup` in a runtime directory that the daemon's
/// (dynamic) user owns follows no link planted there, and removes no TC
/// filter and no policy routing that is not tproxy's, whatever a state file
/// says.
#[test]
fn roots_cleanup_follows_no_planted_link_and_removes_only_our_filters() -> Result<()> {
    let topology = Topology::new("planted")?;
    let dir = RunDir::new("planted", 0o700, Some(65534))?;
    let name = "victim";
    let victim = std::env::temp_dir().join(format!("tproxy-victim-{}", std::process::id()));
    let created = std::env::temp_dir().join(format!("tproxy-created-{}", std::process::id()));
    std::fs::write(&victim, "precious")?;
    let _ = std::fs::remove_file(&created);
    for (link, to) in [("victim.state", &victim), ("victim.lock", &created)] {
        let out = as_nobody(&topology.proxy, "ln")
            .args(["-s", &to.display().to_string(), &dir.file(link)])
            .output()?;
        ensure!(out.status.success(), "planting {link}: {out:?}");
    }
    let out = dir.tproxy(&topology.proxy, &["cleanup", "--name", name]).output()?;
    ensure!(std::fs::read_to_string(&victim)? == "precious", "cleanup wrote through a link");
    ensure!(!created.exists(), "cleanup created a file through a link: {out:?}");
    let _ = std::fs::remove_file(&victim);

    // Another tool's filter, and a state file that names it.
    topology.proxy.exec(&["tc", "qdisc", "add", "dev", PROXY_CLIENT_IFACE, "clsact"])?;
    topology.proxy.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        PROXY_CLIENT_IFACE,
        "ingress",
        "prio",
        "7",
        "handle",
        "1",
        "bpf",
        "bytecode",
        "1,6 0 0 4294967295",
        "classid",
        "1:1",
    ])?;
    // And another tool's policy routing (Istio's TPROXY mark and table).
    let rule = ["rule", "add", "fwmark", "0x539", "lookup", "133", "priority", "32764"];
    topology.proxy.exec(&[&["ip"], &rule[..]].concat())?;
    topology
        .proxy
        .exec(&["ip", "route", "add", "local", "default", "dev", "lo", "table", "133"])?;
    for link in ["victim.state", "victim.lock"] {
        std::fs::remove_file(dir.0.join(link))?;
    }
    let forged = format!(
        r#"{{"filters":[{{"iface":"{PROXY_CLIENT_IFACE}","priority":7,"handle":1}}],"netns":0,"routing":{{"mark":1337,"table":133,"priority":32764,"ipv6":false}}}}"#
    );
    let out = as_nobody(&topology.proxy, "sh")
        .args(["-c", &format!("umask 077; printf '%s' '{forged}' > {}", dir.file("victim.state"))])
        .output()?;
    ensure!(out.status.success(), "forging the state: {out:?}");
    let out = dir.tproxy(&topology.proxy, &["cleanup", "--name", name]).output()?;
    ensure!(out.status.success(), "cleanup: {out:?}");
    let filters =
        topology.proxy.exec(&["tc", "filter", "show", "dev", PROXY_CLIENT_IFACE, "ingress"])?;
    ensure!(filters.contains("bytecode"), "cleanup removed another tool's filter: {filters}");
    let rules = topology.proxy.exec(&["ip", "rule", "show"])?;
    ensure!(
        rules.contains("fwmark 0x539 lookup 133"),
        "cleanup removed another tool's rule: {rules}"
    );
    let routes = topology.proxy.exec(&["ip", "route", "show", "table", "133"])?;
    ensure!(routes.contains("local default"), "cleanup removed another tool's route: {routes}");
    Ok(())
}

/// Sends one line to a unix socket and prints the answer (or the error).
const ASK: &str = r#"
import os, socket, sys
line = sys.argv[2].replace('SELF', str(os.getpid()))
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(line.encode() + b'\n')
    print(s.makefile().readline().strip(), flush=True)
except OSError as e:
    print('error', e, flush=True)
"#;

/// Item 5: a handover, which detaches the instance and ends it, is only for
/// a `--takeover` start of the same instance. Before, any process that
/// could reach the socket named a pid that exists (1) and switched
/// interception off, with exit status 0 that `Restart=on-failure` accepts.
#[test]
fn only_a_successor_may_make_an_instance_hand_over() -> Result<()> {
    let topology = Topology::new("handover")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    let socket = format!("/run/tproxy/{}.sock", topology.proxy.name);
    for request in [r#"{"command":"handover","pid":1}"#, r#"{"command":"handover","pid":SELF}"#] {
        let out = in_netns(&topology.proxy, "python3", None)
            .args(["-c", ASK, &socket, request])
            .output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(said.contains("refuses to hand over"), "root's {request}: {said}");
        // Another user cannot even connect.
        let out =
            as_nobody(&topology.proxy, PYTHON).args(["-c", ASK, &socket, request]).output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(said.starts_with("error"), "nobody's {request}: {said}");
    }
    // Still attached and relaying.
    let addr = Topology::server_addr(false, 80);
    let server = serve_once(topology.server.tcp_listen(addr)?, b"still here".to_vec());
    let mut client = topology.client.tcp_connect(addr)?;
    client.shutdown(std::net::Shutdown::Write)?;
    ensure!(read_to_end(&mut client)? == b"still here");
    ensure!(server.join().unwrap()?.peer.ip() == proxy_ip(false), "not relayed");
    proxy.stop()?;
    Ok(())
}

/// Item 13: scrapers cannot exhaust the instance nor keep its control path
/// waiting: the metrics endpoint serves a bounded number of connections,
/// and rule changes go through while they are all taken.
#[test]
fn metrics_connections_are_bounded_and_never_hold_up_rule_changes() -> Result<()> {
    let topology = Topology::new("scrapers")?;
    let metrics: SocketAddr = "127.0.0.1:9486".parse()?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--metrics", "127.0.0.1:9486"],
    )?;
    let descriptors =
        || -> Result<usize> { Ok(std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))?.count()) };
    let before = descriptors()?;
    // Idle connections that never send a request.
    let held: Vec<_> =
        (0..200).map(|_| topology.proxy.tcp_connect(metrics)).collect::<Result<_>>()?;
    let out = run_tproxy(&topology.proxy, &["port", "add", "8080", "--proto", "tcp"])?;
    ensure!(out.status.success(), "a rule change while scrapers wait: {out:?}");
    let opened = eventually(Duration::from_secs(10), || {
        let opened = descriptors()?.saturating_sub(before);
        ensure!(opened <= 40, "{opened} descriptors more than before");
        Ok(opened)
    })?;
    eprintln!("200 idle scrapers cost {opened} descriptors");
    drop(held);
    proxy.stop()?;
    Ok(())
}

/// The capabilities a start needs: CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN
/// (12), CAP_SYS_RESOURCE (24), CAP_PERFMON (38) and CAP_BPF (39).
const START_CAPABILITIES: u64 = 1 << 10 | 1 << 12 | 1 << 24 | 1 << 38 | 1 << 39;

/// Item 12: the upgrade helper, which starts a successor with the
/// instance's arguments, holds only what a start needs: no capability
/// beyond those, and no descriptor a successor would inherit. Before, it
/// kept every capability root has and passed its pipe on.
#[test]
fn the_upgrade_helper_holds_only_what_a_start_needs() -> Result<()> {
    let topology = Topology::new("helper")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    let helper = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<&str> =
                stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            stat.contains("(tproxy-upgrade)")
                && fields.get(1) == Some(&proxy.pid().to_string().as_str())
        })
        .context("no upgrade helper among the instance's children")?;
    let status = std::fs::read_to_string(format!("/proc/{helper}/status"))?;
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let hex =
            status.lines().find_map(|l| l.strip_prefix(&format!("{set}:"))).context(set)?.trim();
        let caps = u64::from_str_radix(hex, 16)?;
        ensure!(caps & !START_CAPABILITIES == 0, "the helper's {set} is {hex}");
    }
    for fd in std::fs::read_dir(format!("/proc/{helper}/fd"))?.flatten() {
        let fd = fd.file_name().to_string_lossy().into_owned();
        if ["0", "1", "2"].contains(&fd.as_str()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{helper}/fdinfo/{fd}"))?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).context("flags")?.trim();
        let flags = u32::from_str_radix(flags, 8)?;
        ensure!(
            flags & libc::O_CLOEXEC as u32 != 0,
            "the helper's descriptor {fd} is inherited on exec"
        );
    }
    let exe = std::fs::read_link(format!("/proc/{helper}/exe"))?;
    ensure!(exe == tproxy_bin().canonicalize()?, "the helper runs {}", exe.display());
    proxy.stop()?;
    Ok(())
}

/// Binds UDP and listens on TCP on 0.0.0.0:PORT, prints `ready`, then
/// prints `udp` or `tcp` for each datagram or connection that reaches it.
const SQUAT: &str = r#"
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(('0.0.0.0', int(sys.argv[1])))
print('ready', flush=True)
while True:
    print(u.recv(2048).decode(), flush=True)
"#;

/// Item 6: while the `--to-port` listener is down, another user who binds
/// its UDP port gets no datagram: the datapath hands new flows only to the
/// owner's sockets (root's by default), and drops and counts those that
/// meet anyone else's. With that user named as the owner, the same socket
/// gets them, which is what any user's socket got before. (A TCP listener
/// of theirs could not answer: its SYN-ACK from the client's destination
/// needs IP_TRANSPARENT, which needs CAP_NET_ADMIN.)
#[test]
fn no_local_user_can_stand_in_for_a_to_port_listener() -> Result<()> {
    const PORT: &str = "8443";
    let topology = Topology::new("squat")?;
    let server = Topology::server_addr(false, 5300);
    for (owner, stolen) in [("root", false), ("65534", true)] {
        let mut squatter = as_nobody(&topology.proxy, PYTHON)
            .args(["-c", SQUAT, PORT])
            .stdout(Stdio::piped())
            .spawn()?;
        let said = lines_of(squatter.stdout.take().context("stdout")?);
        let ready = said.recv_timeout(Duration::from_secs(10));
        ensure!(ready.as_deref() == Ok("ready"), "the squatter did not bind: {ready:?}");
        let proxy = Proxy::start(
            &topology.proxy,
            &[
                "attach",
                PROXY_CLIENT_IFACE,
                "--rule",
                "udp/5300",
                "--to-port",
                PORT,
                "--to-port-owner",
                owner,
            ],
        )?;
        let client = topology.client.udp_client(server)?;
        client.send_to(b"secret", server)?;
        let outcome = if stolen {
            said.recv_timeout(Duration::from_secs(10)).ok()
        } else {
            proxy.wait_for(&topology.proxy, "datapath.target_foreign", |s| {
                s.datapath.target_foreign == 1
            })?;
            None
        };
        let stats = proxy.stop_with_stats(&topology.proxy)?;
        let _ = squatter.kill();
        let _ = squatter.wait();
        if stolen {
            ensure!(
                outcome.as_deref() == Some("secret"),
                "owner {owner}: got {outcome:?}; {stats:?}"
            );
        } else {
            let rest: Vec<String> = said.try_iter().collect();
            ensure!(rest.is_empty(), "owner root: nobody's socket got {rest:?}");
            ensure!(stats.datapath.to_listener == 0, "{stats:?}");
        }
    }
    Ok(())
}

/// The lines a child prints, as they come, so a test can wait with a bound.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (send, recv) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    recv
}
