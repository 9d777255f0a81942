//! The measurements, each through whatever steering is in place.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::{Netns, SERVER_V4, Topology};

use super::{
    Metric,
    steering::{HTTP_PORT, IDLE_CONNECTIONS, IDLE_PORT, IPERF_PORT, Steering, UDP_PORT, server},
};

/// Every metric the steering's mode takes part in. A measurement that fails
/// is reported and left out of the round, so that one bad run does not
/// cost the others.
pub fn all(
    topology: &Topology,
    steering: &Steering,
    seconds: u64,
    work: &Path,
) -> Vec<(Metric, f64)> {
    let mode = steering.mode;
    let mut out = Vec::new();
    let mut take = |what: &str, measured: Result<Vec<(Metric, f64)>>| match measured {
        Ok(values) => out.extend(values),
        Err(e) => eprintln!("bench: {}: {what} failed, left out of this round: {e:#}", mode.name()),
    };
    if mode.measures(Metric::Throughput1) {
        take(
            "iperf3, 1 stream",
            iperf(&topology.client, 1, seconds).map(|v| vec![(Metric::Throughput1, v)]),
        );
        take(
            "iperf3, 4 streams",
            iperf(&topology.client, 4, seconds).map(|v| vec![(Metric::Throughput4, v)]),
        );
    }
    if mode.measures(Metric::ConnRate) {
        let cpu_before = steering.relay_cpu_ticks();
        let http = http_close(&topology.client, seconds, work).map(|http| {
            let mut values = vec![
                (Metric::ConnRate, http.rate),
                (Metric::LatencyP50, http.p50),
                (Metric::LatencyP99, http.p99),
            ];
            if let (Some(before), Some(after)) = (cpu_before, steering.relay_cpu_ticks())
                && http.requests > 0
            {
                let micros = (after - before) as f64 * 1e6 / super::steering::clock_ticks();
                values.push((Metric::ConnCpu, micros / http.requests as f64));
            }
            values
        });
        take("ab", http);
    }
    if mode.measures(Metric::UdpRate) {
        take("UDP", udp_rate(&topology.client, seconds).map(|(v, _)| vec![(Metric::UdpRate, v)]));
    }
    if mode.measures(Metric::IdleMemory) {
        take("idle memory", idle_memory(topology, steering).map(|v| vec![(Metric::IdleMemory, v)]));
    }
    out
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

/// What one ApacheBench run gives.
pub struct Http {
    /// Requests per second.
    pub rate: f64,
    /// Of the whole exchange, connect included, in ms.
    pub p50: f64,
    pub p99: f64,
    /// Requests completed.
    pub requests: u64,
}

/// ApacheBench, 32 concurrent clients, each request on a new connection
/// (ab sends no keep-alive). Latency includes the connect: wrk's starts
/// after it, so it would hide a SYN that had to be retransmitted.
pub fn http_close(client: &Netns, seconds: u64, work: &Path) -> Result<Http> {
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
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .with_context(|| format!("no {name} in ab's output"))
    };
    let rate = field("Requests per second:")?.parse()?;
    let requests = field("Complete requests:")?.parse()?;
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
    Ok(Http { rate, p50: percentile(50)?, p99: percentile(99)?, requests })
}

/// Request/response exchanges per second over 8 UDP sockets in lockstep,
/// and how many there were.
pub fn udp_rate(client: &Netns, seconds: u64) -> Result<(f64, u64)> {
    const SOCKETS: usize = 8;
    let server: SocketAddr = server(UDP_PORT);
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
    let count = count.load(Ordering::Relaxed);
    Ok((count as f64 / started.elapsed().as_secs_f64(), count))
}

/// Opens IDLE_CONNECTIONS relayed connections that stay idle, and returns
/// the relay's RSS growth per connection in KiB.
fn idle_memory(topology: &Topology, steering: &Steering) -> Result<f64> {
    let addr = server(IDLE_PORT);
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
    let before = steering.relay_rss_kib()?;
    let mut clients = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let mut stream = topology
            .client
            .tcp_connect(addr)
            .with_context(|| format!("idle connection {i} of {IDLE_CONNECTIONS}"))?;
        // One byte each way would be more than idle; the handshake is all.
        let _ = stream.flush();
        clients.push(stream);
    }
    let servers = acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))?;
    ensure!(servers.len() == IDLE_CONNECTIONS, "only {} connections arrived", servers.len());
    // Every connection has reached the server, so the relay holds them all.
    let after = steering.relay_rss_kib()?;
    drop(clients);
    drop(servers);
    wait_relay_idle(topology)?;
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

/// Waits until the proxy namespace holds no established TCP connection, so
/// the next measurement starts clean.
fn wait_relay_idle(topology: &Topology) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = topology.proxy.exec(&["ss", "-Htn", "state", "established"])?;
        if out.trim().is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the relay still holds connections after 30 s");
        thread::sleep(Duration::from_millis(100));
    }
}
