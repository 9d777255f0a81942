//! Live control and observability: rules changed while running, CIDR rules,
//! counters, metrics, reloads, several instances, and root-only control.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use tproxy_tests::*;

/// Runs `tproxy-user <args>` in the proxy namespace; fails unless it succeeds.
fn tproxy_ok(topology: &Topology, args: &[&str]) -> Result<String> {
    let out = run_tproxy(&topology.proxy, args)?;
    ensure!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tproxy-user <args>`; fails unless it fails with `expected` on stderr.
fn tproxy_refused(topology: &Topology, args: &[&str], expected: &str) -> Result<()> {
    expect_refused(&topology.proxy, &[], args, expected).map(drop)
}

fn rules(topology: &Topology) -> Result<Vec<String>> {
    Ok(tproxy_ok(topology, &["rule", "list"])?.lines().map(str::to_owned).collect())
}

/// The lib's echo server, reporting only the peers.
fn echo_server(ns: &Netns, addr: SocketAddr) -> Result<std::sync::mpsc::Receiver<SocketAddr>> {
    let timed = tcp_echo_server(ns, addr)?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for (_, peer) in timed {
            if tx.send(peer).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Connects from the client (from `source` if given), exchanges a message,
/// and returns the address the server saw.
fn peer_seen(
    topology: &Topology,
    seen: &std::sync::mpsc::Receiver<SocketAddr>,
    dst: SocketAddr,
    source: Option<SocketAddr>,
) -> Result<SocketAddr> {
    let mut stream = match source {
        None => topology.client.tcp_connect(dst)?,
        Some(source) => {
            let socket = topology.client.run(move || -> std::io::Result<socket2::Socket> {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(dst),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.bind(&source.into())?;
                socket.connect_timeout(&dst.into(), Duration::from_secs(5))?;
                Ok(socket)
            })??;
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream
        }
    };
    stream.write_all(b"ping")?;
    stream.shutdown(Shutdown::Write)?;
    ensure!(read_to_end(&mut stream)? == b"ping", "echo through {dst} failed");
    seen.recv_timeout(Duration::from_secs(5)).context("the server saw no connection")
}

/// Retries `check` for up to 5 s: a change must show within a bounded wait.
fn within_bounded_wait(mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    eventually(Duration::from_secs(5), || {
        ensure!(check()?, "the change did not show");
        Ok(())
    })
}

/// Ports added and deleted while running change interception at once, and a
/// relayed connection opened before the changes keeps flowing throughout.
#[test]
fn live_port_changes_keep_established_connections() -> Result<()> {
    let topology = Topology::new("live")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--proto", "tcp"],
    )?;
    let seen80 = echo_server(&topology.server, Topology::server_addr(false, 80))?;
    let seen8080 = echo_server(&topology.server, Topology::server_addr(false, 8080))?;

    // The long-running connection, relayed.
    let mut long = topology.client.tcp_connect(Topology::server_addr(false, 80))?;
    let long_peer = seen80.recv_timeout(Duration::from_secs(5))?;
    ensure!(long_peer.ip() == proxy_ip(false), "not relayed: {long_peer}");
    let mut exchange = |round: u8| -> Result<()> {
        let data = pattern(round as u64, 32 * 1024);
        long.write_all(&data)?;
        let mut back = vec![0u8; data.len()];
        long.read_exact(&mut back)?;
        ensure!(back == data, "round {round} corrupted");
        Ok(())
    };
    exchange(1)?;

    tproxy_ok(&topology, &["port", "add", "8080", "--proto", "tcp"])?;
    within_bounded_wait(|| {
        Ok(peer_seen(&topology, &seen8080, Topology::server_addr(false, 8080), None)?.ip()
            == proxy_ip(false))
    })?;
    exchange(2)?;

    tproxy_ok(&topology, &["port", "del", "80", "--proto", "tcp"])?;
    within_bounded_wait(|| {
        Ok(peer_seen(&topology, &seen80, Topology::server_addr(false, 80), None)?.ip()
            == client_ip(false))
    })?;
    ensure!(rules(&topology)? == ["tcp/8080"], "rules: {:?}", rules(&topology)?);
    // The connection steered under the deleted rule still flows.
    exchange(3)?;
    drop(long);
    proxy.stop()?;
    Ok(())
}

/// Destination CIDRs with longest-prefix precedence, exclusions, port ranges
/// and a source filter, each shown by real traffic.
#[test]
fn cidr_rules_exclusions_ranges_and_sources() -> Result<()> {
    let topology = Topology::new("cidr")?;
    // More destinations behind the server, and a second client address.
    topology.server.exec(&["ip", "addr", "add", "198.51.100.5/24", "dev", "s0"])?;
    topology.server.exec(&["ip", "addr", "add", "203.0.113.10/32", "dev", "s0"])?;
    topology.server.exec(&["ip", "addr", "add", "2001:db8:2::5/64", "dev", "s0", "nodad"])?;
    topology.proxy.exec(&["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.10"])?;
    topology.client.exec(&["ip", "addr", "add", "192.0.2.100/24", "dev", "c0"])?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--rule",
            "tcp/80",
            "--rule",
            "tcp/80 to 198.51.100.5 exclude",
            "--rule",
            "tcp/80 to 2001:db8:2::5 exclude",
            "--rule",
            "tcp/8000-8002 to 203.0.113.0/24",
            "--rule",
            "tcp/9000 from 192.0.2.100",
            // Narrower rules whose source filter only some clients match.
            "--rule",
            "tcp/80 to 203.0.113.0/24 from 192.0.2.100",
            "--rule",
            "tcp/8000-8002 to 203.0.113.10 from 192.0.2.100 exclude",
        ],
    )?;
    let (proxied4, direct4) = (proxy_ip(false), client_ip(false));
    let cases: &[(&str, Option<&str>, std::net::IpAddr)] = &[
        ("198.51.100.10:80", None, proxied4),
        // The /32 exclusion beats the /0 rule.
        ("198.51.100.5:80", None, direct4),
        ("[2001:db8:2::10]:80", None, proxy_ip(true)),
        ("[2001:db8:2::5]:80", None, client_ip(true)),
        // Inside the range and the /24.
        ("203.0.113.10:8000", None, proxied4),
        ("203.0.113.10:8002", None, proxied4),
        // Outside the range, or outside the /24.
        ("203.0.113.10:8003", None, direct4),
        ("198.51.100.10:8001", None, direct4),
        // The source filter.
        ("198.51.100.10:9000", None, direct4),
        ("198.51.100.10:9000", Some("192.0.2.100:0"), proxied4),
        // A narrower rule whose source filter fails has no say: the
        // broader rule decides.
        ("203.0.113.10:80", None, proxied4),
        ("203.0.113.10:80", Some("192.0.2.100:0"), proxied4),
        ("203.0.113.10:8001", None, proxied4),
        ("203.0.113.10:8001", Some("192.0.2.100:0"), direct4),
    ];
    let mut servers = std::collections::HashMap::new();
    for (dst, source, expected) in cases {
        let dst: SocketAddr = dst.parse()?;
        if let std::collections::hash_map::Entry::Vacant(slot) = servers.entry(dst) {
            slot.insert(echo_server(&topology.server, dst)?);
        }
        let source = source.map(|s| s.parse()).transpose()?;
        let peer = peer_seen(&topology, &servers[&dst], dst, source)?;
        let expected = match source {
            Some(source) if *expected == direct4 => source.ip(),
            _ => *expected,
        };
        ensure!(
            peer.ip() == expected,
            "{dst} from {source:?}: server saw {peer}, expected {expected}"
        );
    }
    proxy.stop()?;
    Ok(())
}

/// N connections give N new steered flows on their rule, the same numbers
/// in `stats --json` and on the Prometheus endpoint, which a real parser reads.
#[test]
fn counters_match_the_traffic() -> Result<()> {
    const N: u64 = 20;
    let topology = Topology::new("counters")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "80",
            "--proto",
            "tcp",
            "--port",
            "53",
            "--metrics",
            "127.0.0.1:9464",
        ],
    )?;
    let seen = echo_server(&topology.server, Topology::server_addr(false, 80))?;
    for _ in 0..N {
        peer_seen(&topology, &seen, Topology::server_addr(false, 80), None)?;
    }
    // Every relayed connection has ended, its last packets counted.
    proxy.wait_for(&topology.proxy, "every connection's end", |s| {
        s.tcp().accepted == N && s.tcp().active == 0
    })?;

    let json: StatsReport = serde_json::from_str(&tproxy_ok(&topology, &["stats", "--json"])?)?;
    let rule = |name: &str| json.rules.iter().find(|r| r.rule == name).map(|r| &r.counters);
    let web = rule("tcp/80").context("no tcp/80 rule")?;
    ensure!(web.new_flows == N, "new flows: {web:?}");
    // A rule decides the first packet of each flow; the rest go to their
    // sockets without a rule lookup (about 4 more per connection here).
    ensure!((N..2 * N).contains(&web.packets), "packets: {web:?}");
    ensure!(web.bytes > 0, "bytes: {web:?}");
    ensure!(json.tcp().accepted == N, "tcp: {:?}", json.tcp());
    ensure!(json.tcp().bytes_to_upstream == 4 * N, "tcp: {:?}", json.tcp());
    let dns = rule("tcp/53").context("no tcp/53 rule")?;
    ensure!(dns.packets == 0, "port 53 saw traffic: {dns:?}");

    let table = tproxy_ok(&topology, &["stats"])?;
    ensure!(table.contains("tcp/80") && table.contains("NEW FLOWS"), "{table}");
    // Each layer's counters, one per line; those at 0 only with --all.
    let row = |table: &str, name: &str| -> Option<Vec<String>> {
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(name))?;
        Some(line.split_whitespace().map(str::to_owned).collect())
    };
    let accepted = row(&table, "accepted").with_context(|| format!("no accepted row:\n{table}"))?;
    ensure!(accepted[1] == N.to_string(), "{table}");
    ensure!(json.datapath.assign_failed == 0, "{json:?}");
    ensure!(row(&table, "assign_failed").is_none(), "a zero shown:\n{table}");
    let all = tproxy_ok(&topology, &["stats", "--all"])?;
    ensure!(row(&all, "assign_failed").is_some_and(|r| r[1] == "0"), "{all}");

    let text = topology.proxy.run(|| -> Result<String> {
        let mut stream = TcpStream::connect("127.0.0.1:9464")?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: tproxy\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("no HTTP head")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        ensure!(head.contains("text/plain; version=0.0.4"), "{head}");
        Ok(body.to_owned())
    })??;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let value = |name: &str, label: Option<(&str, &str)>| -> Result<f64> {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .with_context(|| format!("no {name} {label:?} in:\n{text}"))?;
        match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Ok(v),
            ref other => bail!("{name}: {other:?}"),
        }
    };
    ensure!(value("tproxy_rule_new_flows_total", Some(("rule", "tcp/80")))? == N as f64);
    ensure!(value("tproxy_tcp_connections_total", None)? == N as f64);
    ensure!(value("tproxy_tcp_bytes_total", Some(("direction", "up")))? == (4 * N) as f64);
    ensure!(value("tproxy_tcp_connections_active", None)? == 0.0);
    ensure!(value("tproxy_rule_packets_total", Some(("rule", "tcp/80")))? == web.packets as f64);
    // Every reason is a series, from the same counters as the report's
    // (which only grow).
    for (family, counts) in [
        ("tproxy_drops_total", &json.reasons.dropped),
        ("tproxy_passed_total", &json.reasons.passed),
    ] {
        ensure!(!counts.is_empty(), "no reasons in {json:?}");
        for (reason, n) in counts {
            ensure!(value(family, Some(("reason", reason)))? >= *n as f64, "{family} {reason}");
        }
    }
    proxy.stop()?;
    Ok(())
}

/// Bad rules and bad files are refused with their reason, and the running
/// set is unchanged; a good file applies on `reload` and on SIGHUP.
#[test]
fn bad_rules_are_refused_and_reloads_apply() -> Result<()> {
    let topology = Topology::new("reload")?;
    let dir = std::env::temp_dir().join(format!("tproxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("rules.toml");
    std::fs::write(&file, "rules = [\"tcp/443\"]\n")?;
    let file_arg = file.to_str().unwrap();
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--config", file_arg],
    )?;
    let initial = vec!["80".to_owned(), "tcp/443".to_owned()];
    ensure!(rules(&topology)? == initial);

    tproxy_refused(&topology, &["rule", "add", "80 to 10.0.0.1/8"], "host bits set")?;
    tproxy_refused(&topology, &["rule", "add", "tcp/80-85"], "overlaps")?;
    tproxy_refused(&topology, &["rule", "del", "9999"], "no such rule")?;
    tproxy_refused(&topology, &["port", "add", "0"], "port 0")?;
    ensure!(rules(&topology)? == initial, "a refused change changed the rules");

    std::fs::write(&file, "rules = [\"tcp/8443 to 203.0.113.7/24\"]\n")?;
    tproxy_refused(&topology, &["reload"], "host bits set")?;
    std::fs::write(&file, "[[rule]]\nport = 8443\n")?;
    tproxy_refused(&topology, &["reload"], "unknown field `port`")?;
    ensure!(rules(&topology)? == initial, "a refused reload changed the rules");

    std::fs::write(&file, "[[rule]]\nports = \"8443-8444\"\nprotocols = [\"tcp\"]\n")?;
    tproxy_ok(&topology, &["reload"])?;
    ensure!(rules(&topology)? == ["80", "tcp/8443-8444"], "{:?}", rules(&topology)?);

    std::fs::write(&file, "rules = [\"udp/53\"]\n")?;
    proxy.signal(libc::SIGHUP);
    within_bounded_wait(|| Ok(rules(&topology)? == ["80", "udp/53"]))?;
    // A bad file on SIGHUP is logged and changes nothing.
    std::fs::write(&file, "rules = [")?;
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("reload refused", Duration::from_secs(5))?;
    ensure!(rules(&topology)? == ["80", "udp/53"]);
    proxy.stop()?;

    // A bad file at start: one line, non-zero, nothing attached.
    expect_refused(
        &topology.proxy,
        &[],
        &["attach", PROXY_CLIENT_IFACE, "--config", file_arg],
        "rules.toml",
    )?;
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    ensure!(state.is_empty(), "left behind: {state}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Two named instances on one interface with the default routing values:
/// the second chooses its own mark and table; both relay; a third with a
/// name in use is refused; `cleanup` of a name that never ran touches
/// nothing; when the second goes, the first still relays.
#[test]
fn named_instances_run_side_by_side() -> Result<()> {
    let topology = Topology::new("names")?;
    let a_name = format!("{}-a", topology.proxy.name);
    let b_name = format!("{}-b", topology.proxy.name);
    let a = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--proto", "tcp", "--name", &a_name],
    )?;
    let b = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "8080", "--proto", "tcp", "--name", &b_name],
    )?;
    ensure!(b.log().contains("this instance uses fwmark 0x1e7, table 486"), "{}", b.log());
    let routing = topology.proxy.exec(&["ip", "rule", "show"])?;
    ensure!(
        routing.contains(&format!("fwmark {DEFAULT_MARK:#x} lookup {DEFAULT_TABLE}"))
            && routing.contains("fwmark 0x1e7 lookup 486"),
        "{routing}"
    );
    for port in [80, 8080] {
        let seen = echo_server(&topology.server, Topology::server_addr(false, port))?;
        let peer = peer_seen(&topology, &seen, Topology::server_addr(false, port), None)?;
        ensure!(peer.ip() == proxy_ip(false), "port {port} not relayed: {peer}");
    }
    ensure!(tproxy_ok(&topology, &["rule", "list", "--name", &a_name])?.trim() == "tcp/80");
    ensure!(tproxy_ok(&topology, &["rule", "list", "--name", &b_name])?.trim() == "tcp/8080");
    tproxy_refused(
        &topology,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "81",
            "--name",
            &a_name,
            "--mark",
            "0x1e9",
            "--table",
            "487",
        ],
        "already running",
    )?;
    tproxy_refused(&topology, &["stats", "--name", "nobody-here"], "no instance named")?;
    tproxy_ok(&topology, &["cleanup", PROXY_CLIENT_IFACE, "--name", "never-ran-here"])?;
    ensure!(topology.proxy.exec(&["ip", "rule", "show"])? == routing, "cleanup of another name");
    let stats_b = b.stop_with_stats(&topology.proxy)?;
    ensure!(stats_b.tcp().accepted == 1, "{stats_b:?}");
    // The first instance's routing and filter survived the second's exit.
    let seen = echo_server(&topology.server, Topology::server_addr(true, 80))?;
    let peer = peer_seen(&topology, &seen, Topology::server_addr(true, 80), None)?;
    ensure!(peer.ip() == proxy_ip(true), "not relayed after the second instance left: {peer}");
    let stats_a = a.stop_with_stats(&topology.proxy)?;
    ensure!(stats_a.tcp().accepted == 2, "{stats_a:?}");
    Ok(())
}

/// Only root may use the control socket.
#[test]
fn control_is_root_only() -> Result<()> {
    let topology = Topology::new("rootonly")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "80"])?;
    let out = topology
        .proxy
        .command(UNPRIVILEGED[0])
        .args(&UNPRIVILEGED[1..])
        .arg(tproxy_bin())
        .args(topology.proxy.instance_args(&["rule", "add", "8080"]))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "an unprivileged user changed the rules");
    ensure!(stderr.contains("only root"), "{stderr}");
    ensure!(rules(&topology)? == ["80"]);
    proxy.stop()?;
    Ok(())
}

/// `--access-log`: one JSON line for every relayed TCP connection and UDP
/// session as it ends, which jq reads; SIGHUP opens the path again, as
/// logrotate needs.
#[test]
fn the_access_log_has_a_line_per_connection_and_session() -> Result<()> {
    let topology = Topology::new("accesslog")?;
    let dir = std::env::temp_dir().join(format!("tproxy-accesslog-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (log, rotated) = (dir.join("access.log"), dir.join("access.log.1"));
    let web = Topology::server_addr(false, 80);
    let _peers = http_responder(&topology.server, web, "ok")?;
    let dns = Topology::server_addr(false, 5300);
    let _udp = UdpServer::start(&topology.server, dns, 1)?;
    let proxy = Proxy::start(
        &topology.proxy,
        &[
            "attach",
            PROXY_CLIENT_IFACE,
            "--port",
            "80",
            "--rule",
            "udp/5300",
            "--access-log",
            log.to_str().context("a UTF-8 path")?,
        ],
    )?;
    let url = format!("http://{web}/");
    let written = |n: u64| {
        proxy.wait_for(&topology.proxy, "access log entries", move |s| {
            s.access_log.is_some_and(|a| a.written == n)
        })
    };
    for _ in 0..2 {
        ensure!(topology.client.curl(&url)?.ends_with("ok"));
    }
    written(2)?;
    // Rotated: the next entries go to a new file at the same path.
    std::fs::rename(&log, &rotated)?;
    proxy.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), || {
        ensure!(log.exists(), "SIGHUP did not reopen the access log");
        Ok(())
    })?;
    ensure!(topology.client.curl(&url)?.ends_with("ok"));
    let client = topology.client.udp_client(dns)?;
    udp_round_trips(&client, dns, 3)?;
    written(3)?;
    // The UDP session ends with the instance, and its line is written
    // before the exit.
    proxy.stop()?;

    let entries = |path: &std::path::Path| -> Result<Vec<serde_json::Value>> {
        let parsed = std::process::Command::new("jq").arg("-c").arg(".").arg(path).output()?;
        ensure!(parsed.status.success(), "jq: {}", String::from_utf8_lossy(&parsed.stderr));
        let text = String::from_utf8(parsed.stdout)?;
        text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
    };
    let first = entries(&rotated)?;
    let second = entries(&log)?;
    ensure!(first.len() == 2 && second.len() == 2, "{first:?}\n{second:?}");
    let client_ip = client_ip(false).to_string();
    for tcp in first.iter().chain(&second[..1]) {
        ensure!(tcp["protocol"] == "tcp" && tcp["outcome"] == "closed", "{tcp}");
        ensure!(tcp["destination"] == web.to_string() && tcp["rule"] == "80", "{tcp}");
        ensure!(tcp["client"].as_str().is_some_and(|c| c.starts_with(&client_ip)), "{tcp}");
        ensure!(tcp["upstream"] == "direct" && tcp["bytes_down"].as_u64() > Some(0), "{tcp}");
        ensure!(tcp["start"].as_f64() > Some(1e9) && tcp["duration"].as_f64() >= Some(0.0));
    }
    let udp = &second[1];
    ensure!(udp["protocol"] == "udp" && udp["rule"] == "udp/5300", "{udp}");
    ensure!(udp["bytes_up"] == 48 && udp["bytes_down"] == 48, "{udp}");
    ensure!(udp["destination"] == dns.to_string() && udp["outcome"] == "closed", "{udp}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
