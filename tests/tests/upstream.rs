//! Chaining to upstream proxies (`--upstream`): dante as SOCKS5 (TCP and
//! UDP ASSOCIATE, with and without auth), tinyproxy as HTTP CONNECT, and
//! HAProxy taking a PROXY v2 header. The proxies run on an address of their
//! own on the server side, so the origin can tell who connected.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Stdio,
    time::Duration,
};

use anyhow::{Result, ensure};
use tproxy_tests::*;

/// Where `curl_through` asks.
const CURL_PORT: u16 = 8080;

const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);

fn upstream_ip(v6: bool) -> IpAddr {
    if v6 { UPSTREAM_V6.into() } else { UPSTREAM_V4.into() }
}

/// The topology, with the upstream proxies' own addresses on the server.
fn topology(tag: &str) -> Result<Topology> {
    let topology = Topology::new(tag)?;
    let s = &topology.server;
    s.exec(&["ip", "addr", "add", &format!("{UPSTREAM_V4}/24"), "dev", "s0"])?;
    s.exec(&["ip", "addr", "add", &format!("{UPSTREAM_V6}/64"), "dev", "s0", "nodad"])?;
    // As the topology does for the server: no neighbour discovery wait.
    let mac = s.exec(&["cat", "/sys/class/net/s0/address"])?;
    topology.proxy.exec(&[
        "ip",
        "neigh",
        "replace",
        &UPSTREAM_V6.to_string(),
        "lladdr",
        mac.trim(),
        "dev",
        "p1",
        "nud",
        "permanent",
    ])?;
    Ok(topology)
}

/// dante on 1080 of the upstream addresses, going out from them too;
/// `method` is `none` or `username` (checked against the system's users).
fn dante(topology: &Topology, method: &str) -> Result<Daemon> {
    let config = format!(
        "logoutput: stderr
internal: {UPSTREAM_V4} port = 1080
internal: {UPSTREAM_V6} port = 1080
external: {UPSTREAM_V4}
external: {UPSTREAM_V6}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0/0 to: 0/0 }}
socks pass {{ from: 0/0 to: 0/0 }}
"
    );
    let pid = format!(
        "-p{}",
        std::env::temp_dir().join(format!("{}-danted.pid", topology.server.name)).display()
    );
    Daemon::start(&topology.server, "danted", &config, &["-f", "CONFIG", "-N", "1", &pid], 1080)
}

/// 1 MiB each way through the chain, byte-exact; the origin sees the
/// upstream proxy. The origin answers once it has the whole request, and
/// the client does not half-close: tinyproxy closes a tunnel at the first
/// FIN either way.
fn bulk_through(topology: &Topology, v6: bool, seed: u64) -> Result<()> {
    use std::io::Read as _;
    const LEN: usize = 1 << 20;
    let addr = Topology::server_addr(v6, 80);
    let request = pattern(seed, LEN);
    let reply = pattern(seed + 1, LEN);
    let listener = topology.server.tcp_listen(addr)?;
    let answer = reply.clone();
    let server = std::thread::spawn(move || -> Result<(Vec<u8>, std::net::SocketAddr)> {
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut received = vec![0u8; LEN];
        stream.read_exact(&mut received)?;
        stream.write_all(&answer)?;
        Ok((received, peer))
    });
    let mut client = topology.client.tcp_connect(addr)?;
    client.write_all(&request)?;
    let mut received = vec![0u8; LEN];
    client.read_exact(&mut received)?;
    ensure!(received == reply, "reply corrupted (v6: {v6})");
    let (served, peer) = server.join().unwrap()?;
    ensure!(served == request, "request corrupted (v6: {v6})");
    ensure!(peer.ip() == upstream_ip(v6), "the origin saw {peer}, not the upstream");
    Ok(())
}

/// curl from the client to `CURL_PORT`: the answer arrives and the origin
/// saw the upstream. (A port of its own: the bulk test's listener on 80 may
/// still be closing, which a slow kernel VM shows.)
fn curl_through(topology: &Topology, v6: bool) -> Result<()> {
    let addr = Topology::server_addr(v6, CURL_PORT);
    let peers = http_responder(&topology.server, addr, "chained")?;
    let url = format!("http://{addr}/");
    ensure!(topology.client.curl(&url)? == "chained");
    let peer = peers.recv_timeout(Duration::from_secs(5))?;
    ensure!(peer.ip() == upstream_ip(v6), "the origin saw {peer}");
    Ok(())
}

/// Through an upstream that refuses us: the client is reset, as by a
/// refusing origin, and the failure is counted, for the relay and for the
/// upstream.
fn refused_through(topology: &Topology, upstream: &str) -> Result<()> {
    let proxy = attach_through(topology, &["80"], upstream)?;
    let addr = Topology::server_addr(false, 80);
    ensure!(topology.client.connection_is_reset(addr)?, "not reset");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().upstream_failures == 1, "{stats:?}");
    ensure!(stats.upstreams[0].failed == 1, "{stats:?}");
    Ok(())
}

fn attach_through(topology: &Topology, ports: &[&str], upstream: &str) -> Result<Proxy> {
    let mut args = vec!["attach", PROXY_CLIENT_IFACE];
    for port in ports {
        args.extend(["--port", port]);
    }
    args.extend(["--upstream", upstream]);
    Proxy::start(&topology.proxy, &args)
}

#[test]
fn socks5_carries_tcp_both_families() -> Result<()> {
    let topology = topology("up-socks")?;
    let _dante = dante(&topology, "none")?;
    let proxy =
        attach_through(&topology, &["80", "8080"], &format!("socks5://{UPSTREAM_V4}:1080"))?;
    for v6 in [false, true] {
        bulk_through(&topology, v6, 41)?;
        curl_through(&topology, v6)?;
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 4 && stats.tcp().upstream_failures == 0, "{stats:?}");
    let upstream = &stats.upstreams[0];
    ensure!(upstream.name == "default" && upstream.opened == 4, "{stats:?}");
    Ok(())
}

/// dig through UDP ASSOCIATE: the DNS server sees dante; the answer comes
/// back from the address the client asked.
#[test]
fn socks5_carries_udp_through_udp_associate() -> Result<()> {
    let topology = topology("up-sudp")?;
    let _dante = dante(&topology, "none")?;
    let dns = Dnsmasq::start(&topology, &[("chained.example", "203.0.113.7")])?;
    topology.server.wait_until_bound("-u", 53)?;
    let proxy = attach_through(&topology, &["53"], &format!("socks5://{UPSTREAM_V4}:1080"))?;
    for v6 in [false, true] {
        let server: IpAddr = Topology::server_addr(v6, 53).ip();
        ensure!(topology.client.dig(server, "chained.example")? == "203.0.113.7", "v6: {v6}");
    }
    ensure!(dns.saw_query_from(&UPSTREAM_V4.to_string()), "{}", dns.log());
    ensure!(dns.saw_query_from(&UPSTREAM_V6.to_string()), "{}", dns.log());
    ensure!(!dns.saw_query_from(&CLIENT_V4.to_string()), "{}", dns.log());
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.udp().sessions_total >= 2, "{stats:?}");
    // One association per session.
    ensure!(stats.upstreams[0].opened == stats.udp().sessions_total, "{stats:?}");
    Ok(())
}

/// A system user for dante's username method (RFC 1929), removed when
/// dropped.
struct SystemUser(String);

impl SystemUser {
    fn create(password: &str) -> Result<Self> {
        let name = format!("tpx{}", std::process::id());
        let out = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", &name])
            .output()?;
        ensure!(out.status.success(), "useradd: {}", String::from_utf8_lossy(&out.stderr));
        let user = Self(name);
        let mut chpasswd = std::process::Command::new("chpasswd").stdin(Stdio::piped()).spawn()?;
        writeln!(chpasswd.stdin.take().expect("stdin"), "{}:{password}", user.0)?;
        ensure!(chpasswd.wait()?.success(), "chpasswd failed");
        Ok(user)
    }
}

impl Drop for SystemUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel").arg(&self.0).output();
    }
}

/// The right credentials get through; wrong ones are refused, and the
/// client is reset as by a refusing origin.
#[test]
fn socks5_authenticates_and_refuses_wrong_credentials() -> Result<()> {
    // dante checks the system's users, and inside the kernel VMs the
    // host's /etc cannot be written: there this test does not run.
    if std::fs::read_to_string("/proc/cmdline")?.contains("virtme") {
        eprintln!("skipped: a kernel VM, whose /etc is the host's, read-only");
        return Ok(());
    }
    let user = SystemUser::create("s3cret")?;
    let topology = topology("up-sauth")?;
    let _dante = dante(&topology, "username")?;
    let proxy = attach_through(
        &topology,
        &["80"],
        &format!("socks5://{}:s3cret@{UPSTREAM_V4}:1080", user.0),
    )?;
    bulk_through(&topology, false, 43)?;
    proxy.stop()?;
    refused_through(&topology, &format!("socks5://{}:wrong@{UPSTREAM_V4}:1080", user.0))
}

fn tinyproxy(topology: &Topology, auth: &str) -> Result<Daemon> {
    let config = format!(
        "Port 3128
Bind {UPSTREAM_V4}
Timeout 30
MaxClients 64
Allow 0.0.0.0/0
Allow ::/0
ConnectPort 80
ConnectPort 8080
LogLevel Info
{auth}
"
    );
    Daemon::start(&topology.server, "tinyproxy", &config, &["-d", "-c", "CONFIG"], 3128)
}

/// HTTP CONNECT with Basic auth through tinyproxy: bulk and curl, the
/// origin sees tinyproxy; wrong credentials are refused.
#[test]
fn http_connect_through_tinyproxy() -> Result<()> {
    let topology = topology("up-http")?;
    let _tinyproxy = tinyproxy(&topology, "BasicAuth alice s3cret")?;
    let proxy = attach_through(
        &topology,
        &["80", "8080"],
        &format!("http://alice:s3cret@{UPSTREAM_V4}:3128"),
    )?;
    bulk_through(&topology, false, 45)?;
    curl_through(&topology, false)?;
    proxy.stop()?;
    refused_through(&topology, &format!("http://alice:nope@{UPSTREAM_V4}:3128"))
}

/// HAProxy `accept-proxy` dials the destination our PROXY v2 header
/// carries, on both families; the origin sees HAProxy, and HAProxy logs the
/// real client.
#[test]
fn proxy_v2_through_haproxy() -> Result<()> {
    let topology = topology("up-ppv2")?;
    let config = format!(
        "global
    log stdout format raw local0
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend chained
    bind {UPSTREAM_V4}:8443 accept-proxy
    bind [{UPSTREAM_V6}]:8443 accept-proxy
    use_backend origin6 if {{ dst -m ip ::/0 }} !{{ dst -m ip 0.0.0.0/0 }}
    default_backend origin4
backend origin4
    source {UPSTREAM_V4}
    server origin 0.0.0.0:0
backend origin6
    source [{UPSTREAM_V6}]:0
    server origin [::]:0
"
    );
    let haproxy =
        Daemon::start(&topology.server, "haproxy", &config, &["-db", "-f", "CONFIG"], 8443)?;
    let proxy = attach_through(&topology, &["80"], &format!("proxy-v2://{UPSTREAM_V4}:8443"))?;
    for v6 in [false, true] {
        bulk_through(&topology, v6, 47)?;
    }
    // HAProxy logs each connection as it ends, a moment after the client's.
    eventually(Duration::from_secs(10), || {
        for client in [CLIENT_V4.to_string(), CLIENT_V6.to_string()] {
            let log = haproxy.log();
            ensure!(log.contains(&client), "HAProxy did not log the client {client}:\n{log}");
        }
        Ok(())
    })?;
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 2, "{stats:?}");
    Ok(())
}

/// The upstream options refuse what cannot work, with one line each.
#[test]
fn bad_upstreams_are_refused() -> Result<()> {
    let topology = Topology::new("up-bad")?;
    for (upstream, extra, expected) in [
        ("ftp://192.0.2.9:21", None, "the scheme must be socks5, http or proxy-v2"),
        ("socks5://192.0.2.9", None, "no port"),
        ("socks5://192.0.2.9:1080", Some("--spoof-source"), "cannot be used with"),
    ] {
        let mut args = vec!["attach", PROXY_CLIENT_IFACE, "--port", "80", "--upstream", upstream];
        args.extend(extra);
        expect_refused(&topology.proxy, &[], &args, expected)?;
    }
    Ok(())
}

/// The server side of one connection to `port`: who connected.
fn origin_sees(topology: &Topology, port: u16) -> Result<IpAddr> {
    let addr = Topology::server_addr(false, port);
    let server = closing_server(topology, addr, 1)?;
    let mut client = topology.client.tcp_connect(addr)?;
    ensure!(read_to_end(&mut client)? == b"bye", "port {port}");
    Ok(server.join().unwrap()?[0].ip())
}

/// Rules pick their upstream: `via NAME`, the default, or `via direct`; a
/// name no --upstream gives is refused at start and at `rule add`.
#[test]
fn rules_pick_their_upstream() -> Result<()> {
    let topology = topology("up-via")?;
    let _dante = dante(&topology, "none")?;
    let tinyproxy = tinyproxy(&topology, "")?;
    expect_refused(
        &topology.proxy,
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--rule", "tcp/80 via nosuch"],
        "no upstream named \"nosuch\"",
    )?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--upstream",
            &format!("socks5://{UPSTREAM_V4}:1080"),
            "--upstream",
            &format!("web=http://{UPSTREAM_V4}:3128"),
            "--rule",
            "tcp/80 via web",
            "--rule",
            "tcp/8080",
            "--rule",
            "tcp/8081 via direct",
        ],
    )?;
    ensure!(origin_sees(&topology, 80)? == upstream_ip(false));
    // Logged before it connected; our reader of its log may lag.
    eventually(Duration::from_secs(5), || {
        let log = tinyproxy.log();
        ensure!(log.contains("CONNECT 198.51.100.10:80 "), "{log}");
        Ok(())
    })?;
    // The default (dante): tinyproxy never saw it.
    ensure!(origin_sees(&topology, 8080)? == upstream_ip(false));
    ensure!(!tinyproxy.log().contains("198.51.100.10:8080"), "{}", tinyproxy.log());
    // Direct: the relay's own address.
    ensure!(origin_sees(&topology, 8081)? == proxy_ip(false));
    let refused = run_tproxy(&topology.proxy, &["rule", "add", "tcp/443 via nosuch"])?;
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success() && said.contains("no upstream named"), "{said}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 3, "{stats:?}");
    // Each upstream counted what went through it.
    let opened = |name: &str| stats.upstreams.iter().find(|u| u.name == name).map(|u| u.opened);
    ensure!(opened("default") == Some(1) && opened("web") == Some(1), "{stats:?}");
    Ok(())
}

/// SECURITY.md item 2: a password given in an `--upstream-file` of mode
/// 0600 authenticates with the upstream (tinyproxy's Basic auth) and is
/// found nowhere else: in no process's command line, the log, `stats` or
/// `/metrics`. A file others may read is refused, and an upstream URL that
/// does not parse is never printed with its password.
#[test]
fn an_upstream_password_stays_out_of_argv_logs_stats_and_metrics() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    const PASSWORD: &str = "Zq9-only-in-the-file";
    let topology = topology("up-secret")?;
    let _tinyproxy = tinyproxy(&topology, &format!("BasicAuth alice {PASSWORD}"))?;
    let file = std::env::temp_dir().join(format!("tproxy-upstreams-{}", std::process::id()));
    std::fs::write(&file, format!("# the default\nhttp://alice:{PASSWORD}@{UPSTREAM_V4}:3128\n"))?;
    let path = file.display().to_string();
    let attach = ["attach", PROXY_CLIENT_IFACE, "--port", "80", "--upstream-file", &path];
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let stderr = expect_refused(&topology.proxy, &[], &attach, "chmod 600")?;
    ensure!(!stderr.contains(PASSWORD), "{stderr}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
    let metrics = "127.0.0.1:9485";
    let mut args = attach.to_vec();
    args.extend(["--metrics", metrics]);
    let proxy = Proxy::start(&topology.proxy, &args)?;
    bulk_through(&topology, false, 47)?;
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(PASSWORD) {
                seen.push(format!("{}", entry.path().display()));
            }
        }
    }
    ensure!(seen.is_empty(), "the password is in the command line of {seen:?}");
    // As a user sees them.
    let stats = proxy.stats_json(&topology.proxy)?;
    ensure!(stats.contains("alice") && !stats.contains(PASSWORD), "{stats}");
    let scraped = topology.proxy.exec(&["curl", "-sS", &format!("http://{metrics}/metrics")])?;
    ensure!(scraped.contains("tproxy_") && !scraped.contains(PASSWORD), "{scraped}");
    let log = proxy.stop()?;
    ensure!(!log.contains(PASSWORD), "{log}");
    std::fs::remove_file(&file)?;
    // A URL that does not parse (a port past 65535) is refused without it.
    let bad = format!("http://alice:{PASSWORD}@{UPSTREAM_V4}:99999");
    let stderr = expect_refused(
        &topology.proxy,
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--upstream", &bad],
        "alice:***@",
    )?;
    ensure!(!stderr.contains(PASSWORD), "{stderr}");
    Ok(())
}

/// A SOCKS5 "proxy" that accepts and never answers: every association the
/// relay opens through it stays opening.
const STALLING_SOCKS5: &str = r#"
import socket, sys, threading
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], 1080))
l.listen(1024)
print('listening', flush=True)
held = []
while True:
    held.append(l.accept()[0])
"#;

/// From 300 ports, 64 datagrams of 1 400 bytes each to HOST PORT.
const FLOOD: &str = r#"
import socket, sys
for _ in range(300):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(64):
        try:
            s.sendto(b'x' * 1400, (sys.argv[1], int(sys.argv[2])))
        except OSError:
            pass
    s.close()
"#;

/// SECURITY.md item 9: clients cannot make the relay queue without bound
/// behind SOCKS5 associations that a hostile or slow upstream never opens:
/// 27 MB of datagrams for 300 sessions leave the relay's memory near where
/// it was, and what did not fit is counted.
#[test]
fn datagrams_waiting_for_a_stalled_upstream_are_bounded() -> Result<()> {
    use std::io::BufRead as _;
    let topology = topology("up-stall")?;
    let mut stalling = topology
        .server
        .command("python3")
        .args(["-c", STALLING_SOCKS5, &UPSTREAM_V4.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(stalling.stdout.take().expect("stdout")).read_line(&mut line)?;
    ensure!(line.trim() == "listening");
    let proxy = attach_through(&topology, &["5300"], &format!("socks5://{UPSTREAM_V4}:1080"))?;
    let rss = || -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid()))?;
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap_or_default();
        Ok(kib.trim().trim_end_matches("kB").trim().parse()?)
    };
    let before = rss()?;
    let out = topology
        .client
        .command("python3")
        .args(["-c", FLOOD, &SERVER_V4.to_string(), "5300"])
        .output()?;
    ensure!(out.status.success(), "the flood: {out:?}");
    eventually(Duration::from_secs(10), || {
        let stats = proxy.stats(&topology.proxy)?;
        let udp = stats.udp();
        ensure!(udp.queue_full > 0, "nothing counted: {udp:?}");
        Ok(())
    })?;
    let grown = rss()?.saturating_sub(before);
    ensure!(grown < 16 * 1024, "the relay grew by {grown} KiB");
    let _ = stalling.kill();
    let _ = stalling.wait();
    proxy.stop()?;
    Ok(())
}

/// A hostile SOCKS5 upstream: no authentication, and every UDP ASSOCIATE
/// answered with the relay address given (an address of the proxy host).
const HOSTILE_SOCKS5: &str = r#"
import socket, struct, sys, threading
relay_ip, relay_port = sys.argv[2], int(sys.argv[3])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], 1080))
l.listen(64)
print('listening', flush=True)
def serve(c):
    c.recv(257)
    c.sendall(b'\x05\x00')
    c.recv(262)
    c.sendall(b'\x05\x00\x00\x01' + socket.inet_aton(relay_ip) + struct.pack('!H', relay_port))
    c.recv(1)
while True:
    threading.Thread(target=serve, args=(l.accept()[0],), daemon=True).start()
"#;

/// SECURITY.md item 10: an upstream that names an address of the proxy
/// host as its UDP relay (127.0.0.1, where a service trusts only this
/// host) is refused, and no client datagram reaches that service.
#[test]
fn an_upstream_cannot_point_the_relay_at_the_host() -> Result<()> {
    use std::io::BufRead as _;
    let topology = topology("up-hostile")?;
    let victim = topology.proxy.udp_bind("127.0.0.1:5399".parse()?)?;
    victim.set_nonblocking(true)?;
    let mut hostile = topology
        .server
        .command("python3")
        .args(["-c", HOSTILE_SOCKS5, &UPSTREAM_V4.to_string(), "127.0.0.1", "5399"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(hostile.stdout.take().expect("stdout")).read_line(&mut line)?;
    ensure!(line.trim() == "listening");
    let proxy = attach_through(&topology, &["5300"], &format!("socks5://{UPSTREAM_V4}:1080"))?;
    let client = topology.client.udp_client(Topology::server_addr(false, 5300))?;
    client.send_to(b"for the server", Topology::server_addr(false, 5300))?;
    eventually(Duration::from_secs(10), || {
        let stats = proxy.stats(&topology.proxy)?;
        ensure!(stats.udp().upstream_failures > 0, "not refused: {stats:?}");
        Ok(())
    })?;
    match victim.recv_from(&mut [0u8; 256]) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => anyhow::bail!("the host's loopback service got {other:?}"),
    }
    let _ = hostile.kill();
    let _ = hostile.wait();
    let log = proxy.stop()?;
    ensure!(log.contains("an address of this host"), "{log}");
    Ok(())
}
