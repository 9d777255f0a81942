//! `cargo xtask demo`: real clients through the real proxy, in a sandbox of
//! network namespaces that is removed afterwards. No NIC, no setup.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    thread,
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::{Dnsmasq, PROXY_CLIENT_IFACE, Proxy, Topology};

pub fn run(bin: &Path) -> Result<()> {
    // SAFETY: set before any thread starts.
    unsafe { std::env::set_var("TPROXY_USER_BIN", bin) };
    let topology = Topology::new("demo")?;
    println!(
        "\n== Sandbox: client 192.0.2.2 / 2001:db8:1::2 -> proxy (forwards) -> server 198.51.100.10 / 2001:db8:2::10"
    );
    for addr in ["198.51.100.10:80", "[2001:db8:2::10]:80", "198.51.100.10:8080"] {
        let addr: SocketAddr = addr.parse()?;
        serve_http(topology.server.tcp_listen(addr)?);
    }

    section("Without tproxy: the proxy namespace only routes, the server sees the client");
    curl(&topology, "http://198.51.100.10/")?;

    let dns = Dnsmasq::start(&topology, &[("demo.test", "203.0.113.7")])?;
    section("tproxy-user attach p0 --port 80 --port 53   (in the proxy namespace)");
    let proxy = Proxy::start_logging(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "80", "--port", "53", "--name", "demo"],
        "info,tproxy_user::relay=debug,aya::bpf=error",
    )?;
    print_log(&proxy.log());
    let seen = proxy.log().len();

    section("With tproxy: port 80 is relayed, so the server sees the proxy (198.51.100.1)");
    let v4 = curl(&topology, "http://198.51.100.10/")?;
    let v6 = curl(&topology, "http://[2001:db8:2::10]/")?;
    section("Port 8080 is not intercepted: forwarded untouched, the server sees the client");
    let other = curl(&topology, "http://198.51.100.10:8080/")?;
    section("UDP: dig asks dnsmasq on the server; the answer comes back from 198.51.100.10:53");
    let answer = dig(&topology)?;

    section("tproxy-user stats --name demo   (live counters from the running instance)");
    let stats = topology.proxy.command(bin).args(["stats", "--name", "demo"]).output()?;
    ensure!(stats.status.success(), "stats: {}", String::from_utf8_lossy(&stats.stderr));
    print_log(&String::from_utf8_lossy(&stats.stdout));

    section("Stopping tproxy-user (SIGTERM): it detaches and removes its routing");
    let log = proxy.stop()?;
    print_log(&log[seen..]);
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, 485)?;
    println!(
        "left behind in the proxy namespace: {}",
        if state.is_empty() { "nothing" } else { &state }
    );

    ensure!(v4.contains("you came from 198.51.100.1:"), "IPv4 was not relayed: {v4}");
    ensure!(v6.contains("you came from [2001:db8:2::1]:"), "IPv6 was not relayed: {v6}");
    ensure!(other.contains("you came from 192.0.2.2:"), "port 8080 was relayed: {other}");
    ensure!(answer == "203.0.113.7", "dig answered {answer:?}");
    ensure!(dns.saw_query_from("198.51.100.1"), "dnsmasq did not see the proxy");
    ensure!(state.is_empty(), "state left behind");
    println!("\n== Demo passed; the sandbox is removed.");
    Ok(())
}

/// Runs dig in the client namespace against the server's dnsmasq.
fn dig(topology: &Topology) -> Result<String> {
    // dnsmasq may take a moment to start.
    for _ in 0..50 {
        let out = topology
            .client
            .command("dig")
            .args(["+short", "+time=1", "+tries=1", "@198.51.100.10", "demo.test", "A"])
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !answer.is_empty() {
            println!("$ dig +short @198.51.100.10 demo.test A\n  {answer}");
            return Ok(answer);
        }
        thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("dig got no answer")
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn print_log(log: &str) {
    for line in log.lines() {
        println!("   | {line}");
    }
}

/// Runs curl in the client namespace and prints what the server answered.
fn curl(topology: &Topology, url: &str) -> Result<String> {
    let out = topology.client.command("curl").args(["-sS", "--max-time", "5", url]).output()?;
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    println!("$ curl {url}\n  {}", body.trim());
    Ok(body)
}

/// A minimal HTTP server that tells each client what it saw.
fn serve_http(listener: TcpListener) {
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = (|| -> Result<()> {
                let peer = stream.peer_addr()?;
                let local = stream.local_addr()?;
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).context("reading the request")? > 2 {
                    line.clear();
                }
                let body = format!("server {local}: you came from {peer}\n");
                let mut stream = &stream;
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                Ok(())
            })();
        }
    });
}
