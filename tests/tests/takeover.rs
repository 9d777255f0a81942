//! Zero-downtime upgrade (`attach --takeover`): a second instance of the
//! same name attaches beside the running one, which lets go and drains.
//! Under continuous load nothing fails; and whichever side dies at which
//! point, one instance works or traffic passes untouched.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use tproxy_tests::*;

const SLOW_PORT: u16 = 81;

/// Clients that open a new connection for every request (`Connection:
/// close`), as fast as they can, from the client namespace, until stopped;
/// every failure (refused, reset, timed out, short answer) is kept.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Netns, to: SocketAddr, body: &'static str, clients: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                let ns = Netns { name: client.name.clone() };
                thread::spawn(move || {
                    let _ = ns.run(move || {
                        while !stop.load(Relaxed) {
                            match request(to, body) {
                                Ok(()) => ok.fetch_add(1, Relaxed),
                                Err(e) => {
                                    failures.lock().unwrap().push(e.to_string());
                                    0
                                }
                            };
                        }
                    });
                })
            })
            .collect();
        Self { ok, failures, stop, threads }
    }

    fn done(&self) -> u64 {
        self.ok.load(Relaxed)
    }

    /// Waits until `count` requests have succeeded.
    fn wait_for(&self, count: u64) -> Result<()> {
        eventually(Duration::from_secs(120), || {
            let failures = self.failures.lock().unwrap().clone();
            if !failures.is_empty() {
                bail!(Hopeless(format!("{failures:?}")));
            }
            ensure!(self.done() >= count, "only {} requests in two minutes", self.done());
            Ok(())
        })
    }

    /// Stops; the successes, or the failures.
    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let failures = self.failures.lock().unwrap();
        ensure!(
            failures.is_empty(),
            "{} failed requests: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        Ok(self.ok.load(Relaxed))
    }
}

fn request(to: SocketAddr, body: &str) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    ensure!(answer.ends_with(body), "answer {answer:?}");
    Ok(())
}

/// A server on `SLOW_PORT` that sends 1 MiB slowly (32 KiB every 100 ms),
/// so that a download spans the takeover.
fn slow_server(ns: &Netns) -> Result<()> {
    let listener = ns.tcp_listen(Topology::server_addr(false, SLOW_PORT))?;
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                for chunk in pattern(7, 1 << 20).chunks(32 << 10) {
                    if stream.write_all(chunk).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    Ok(())
}

/// Starts the slow download from the client; reports when its first bytes
/// came, then the whole of it.
fn download(client: &Netns) -> (mpsc::Receiver<()>, thread::JoinHandle<Result<Vec<u8>>>) {
    let (started, first_bytes) = mpsc::channel();
    let ns = Netns { name: client.name.clone() };
    let handle = thread::spawn(move || -> Result<Vec<u8>> {
        let mut stream = ns.tcp_connect(Topology::server_addr(false, SLOW_PORT))?;
        let mut data = vec![0u8; 1];
        stream.read_exact(&mut data)?;
        let _ = started.send(());
        stream.read_to_end(&mut data)?;
        Ok(data)
    });
    (first_bytes, handle)
}

fn attach(topology: &Topology, extra: &[&str]) -> Result<Proxy> {
    let mut args = vec!["attach", PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, "--port", "80-81"];
    args.extend(extra);
    Proxy::start(&topology.proxy, &args)
}

/// The old instance exits by itself once drained, cleanly.
fn drained(old: Proxy) -> Result<String> {
    let (status, log) = old.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success() && log.contains("drained"), "{log}");
    Ok(log)
}

#[test]
fn takeover_under_load_loses_nothing() -> Result<()> {
    let topology = Topology::new("tkload")?;
    let _peers = http_responder(&topology.server, Topology::server_addr(false, 80), "ok")?;
    slow_server(&topology.server)?;
    let old = attach(&topology, &[])?;
    let load = Load::start(&topology.client, Topology::server_addr(false, 80), "ok", 4);
    load.wait_for(200)?;
    let (first_bytes, download) = download(&topology.client);
    first_bytes.recv_timeout(Duration::from_secs(20))?;

    // The new one may change settings: here it adds a port.
    let new = attach(&topology, &["--takeover", "--port", "5300"])?;
    let at_takeover = load.done();
    let old_log = drained(old)?;
    ensure!(old_log.contains("a new instance takes over"), "{old_log}");
    // The download went on through the old instance, byte-exact.
    let data = download.join().expect("download thread")?;
    ensure!(data == pattern(7, 1 << 20), "the download came back different");
    load.wait_for((at_takeover + 300).max(2000))?;
    let total = load.finish()?;

    let stats = new.stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted >= 300, "{:?}", stats.tcp());
    ensure!(stats.tcp().aborted == 0 && stats.tcp().upstream_failures == 0, "{stats:?}");
    // The name, its control socket and its routing are the new one's.
    let rules = run_tproxy(&topology.proxy, &["port", "list"])?;
    ensure!(String::from_utf8_lossy(&rules.stdout).contains("5300"), "{rules:?}");
    new.stop()?;
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    ensure!(state.is_empty(), "left behind: {state}");
    eprintln!("takeover under load: {total} requests, none failed");
    Ok(())
}

#[test]
fn a_udp_session_talks_across_the_takeover() -> Result<()> {
    let topology = Topology::new("tkudp")?;
    let server = Topology::server_addr(false, 5300);
    let _echo = UdpServer::start(&topology.server, server, 1)?;
    let idle = ["--port", "5300", "--udp-idle-timeout", "1"];
    let old = attach(&topology, &idle)?;
    let client = topology.client.udp_client(server)?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let talker = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        thread::spawn(move || -> Result<()> { talk(&client, server, &stop, &rounds) })
    };
    wait_until(|| rounds.load(Relaxed) >= 50)?;
    let mut args = idle.to_vec();
    args.push("--takeover");
    let new = attach(&topology, &args)?;
    let at_takeover = rounds.load(Relaxed);
    wait_until(|| rounds.load(Relaxed) >= at_takeover + 100)?;
    stop.store(true, Relaxed);
    talker.join().expect("talker")?;
    // The session idles out on the old instance, which then exits.
    drained(old)?;
    // New sessions are the new instance's.
    let fresh = topology.client.udp_client(server)?;
    udp_round_trips(&fresh, server, 3)?;
    let stats = new.stop_with_stats(&topology.proxy)?;
    ensure!(stats.udp().sessions_total == 1, "{:?}", stats.udp());
    Ok(())
}

/// Request and reply in lockstep until `stop`; a reply that does not come
/// within the timeout, or comes wrong, is a loss.
fn talk(
    client: &UdpSocket,
    server: SocketAddr,
    stop: &AtomicBool,
    rounds: &AtomicU64,
) -> Result<()> {
    let mut buf = [0u8; 64];
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        client.send_to(&seq.to_be_bytes(), server)?;
        let (n, from) =
            client.recv_from(&mut buf).map_err(|e| anyhow::anyhow!("datagram {seq} lost: {e}"))?;
        ensure!(from == server && buf[..n] == seq.to_be_bytes(), "reply {seq} wrong");
        seq += 1;
        rounds.store(seq, Relaxed);
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn wait_until(done: impl Fn() -> bool) -> Result<()> {
    eventually(Duration::from_secs(60), || {
        ensure!(done(), "timed out");
        Ok(())
    })
}

/// Whether the server sees the client itself (traffic passed untouched)
/// or the proxy (relayed).
fn seen_by_server(topology: &Topology, peers: &mpsc::Receiver<SocketAddr>) -> Result<SocketAddr> {
    let url = format!("http://{}/", Topology::server_addr(false, 80));
    ensure!(topology.client.curl(&url)?.ends_with("ok"));
    Ok(peers.recv_timeout(Duration::from_secs(10))?)
}

/// A takeover stuck where the old instance has its request but has not
/// answered (it is stopped): the old one, stopped, and the new one.
fn stalled_takeover(topology: &Topology) -> Result<(Proxy, Proxy)> {
    let old = attach(topology, &[])?;
    old.signal(libc::SIGSTOP);
    let args = ["attach", PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, "--port", "80-81", "--takeover"];
    let new = Proxy::spawn(&topology.proxy, &args, "info,aya::bpf=error,tproxy_user=debug")?;
    new.wait_for_log("waiting for it to let go", Duration::from_secs(60))?;
    Ok((old, new))
}

/// Relayed (the server sees the proxy), and nothing left after `last` stops.
fn relays_then_stops_clean(
    topology: &Topology,
    peers: &mpsc::Receiver<SocketAddr>,
    last: Proxy,
) -> Result<()> {
    ensure!(seen_by_server(topology, peers)?.ip() == PROXY_SERVER_SIDE_V4, "not relayed");
    last.stop()?;
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    ensure!(state.is_empty(), "left behind: {state}");
    Ok(())
}

/// The new instance dies before the handover (the old one cannot answer
/// yet): the old one stays, whole; a later takeover cleans up after it.
#[test]
fn a_takeover_killed_before_the_handover_leaves_the_old_instance() -> Result<()> {
    let topology = Topology::new("tkkill1")?;
    let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "ok")?;
    let (old, new) = stalled_takeover(&topology)?;
    new.stop_with(libc::SIGKILL)?;
    old.signal(libc::SIGCONT);
    // The old instance read the dead one's request, and stays.
    old.wait_for_log("is gone", Duration::from_secs(20))?;
    ensure!(seen_by_server(&topology, &peers)?.ip() == PROXY_SERVER_SIDE_V4, "not relayed");
    ensure!(old.stats(&topology.proxy)?.tcp().accepted == 1);
    // A later takeover works, and removes what the killed one left.
    let next = attach(&topology, &["--takeover"])?;
    drained(old)?;
    relays_then_stops_clean(&topology, &peers, next)
}

/// The old instance dies before it answers: the new one takes the name.
#[test]
fn the_old_instance_killed_before_it_answers() -> Result<()> {
    let topology = Topology::new("tkkill2")?;
    let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "ok")?;
    let (old, new) = stalled_takeover(&topology)?;
    old.stop_with(libc::SIGKILL)?;
    new.wait_ready()?;
    ensure!(new.stats(&topology.proxy)?.tcp().accepted == 0);
    relays_then_stops_clean(&topology, &peers, new)
}

/// Either side killed while the old one drains: the old one's connections
/// are lost with it, but never a black hole: the new one relays, or, if it
/// is the one killed, traffic passes untouched.
#[test]
fn either_side_killed_while_the_old_one_drains() -> Result<()> {
    for kill_new in [false, true] {
        let topology = Topology::new(if kill_new { "tkkill4" } else { "tkkill3" })?;
        let peers = http_responder(&topology.server, Topology::server_addr(false, 80), "ok")?;
        slow_server(&topology.server)?;
        let old = attach(&topology, &[])?;
        let (first_bytes, download) = download(&topology.client);
        first_bytes.recv_timeout(Duration::from_secs(20))?;
        let new = attach(&topology, &["--takeover"])?;
        old.wait_for_log("draining", Duration::from_secs(20))?;
        if kill_new {
            new.stop_with(libc::SIGKILL)?;
            ensure!(seen_by_server(&topology, &peers)?.ip() == CLIENT_V4, "not passed untouched");
            old.stop()?;
            // What the killed one recorded goes as after any SIGKILL.
            let cleanup = run_tproxy(&topology.proxy, &["cleanup", PROXY_CLIENT_IFACE])?;
            ensure!(cleanup.status.success(), "{cleanup:?}");
        } else {
            old.stop_with(libc::SIGKILL)?;
            ensure!(seen_by_server(&topology, &peers)?.ip() == PROXY_SERVER_SIDE_V4, "not relayed");
            new.stop()?;
        }
        let _ = download.join();
        let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
        ensure!(state.is_empty(), "left behind: {state}");
    }
    Ok(())
}

/// What a takeover cannot change is refused before anything is touched.
#[test]
fn a_takeover_onto_the_running_mark_and_table_is_refused() -> Result<()> {
    let topology = Topology::new("tkrefuse")?;
    let old = attach(&topology, &[])?;
    let args = [
        "attach",
        PROXY_CLIENT_IFACE,
        "--port",
        "80",
        "--takeover",
        "--mark",
        "0x1e5",
        "--table",
        "485",
    ];
    expect_refused(&topology.proxy, &[], &args, "held by the running instance")?;
    // The old one is untouched.
    ensure!(old.stats(&topology.proxy)?.tcp().accepted == 0);
    old.stop()?;
    Ok(())
}
