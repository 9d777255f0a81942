//! UDP interception end to end: `tproxy-user attach` in the proxy namespace,
//! real datagrams between the client and server namespaces.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tproxy_tests::*;

const PORT: u16 = 5300;

fn attach(topology: &Topology, extra: &[&str]) -> Result<Proxy> {
    let port = PORT.to_string();
    let mut args = vec!["attach", PROXY_CLIENT_IFACE, "--port", &port, "--proto", "udp"];
    args.extend_from_slice(extra);
    Proxy::start(&topology.proxy, &args)
}

/// Receives one datagram; fails unless it comes from `from`.
fn recv_from(socket: &UdpSocket, from: SocketAddr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let (n, peer) = socket.recv_from(&mut buf).context("waiting for a reply")?;
    ensure!(peer == from, "reply came from {peer}, not from the original destination {from}");
    buf.truncate(n);
    Ok(buf)
}

/// The client sees the reply come from the address it sent to; the server
/// sees the proxy, so the relay was in the path.
fn request_response(v6: bool) -> Result<()> {
    let topology = Topology::new(if v6 { "udp6" } else { "udp4" })?;
    let proxy = attach(&topology, &[])?;
    let server_addr = Topology::server_addr(v6, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    for message in [&b"first"[..], b"second"] {
        client.send_to(message, server_addr)?;
        ensure!(recv_from(&client, server_addr)? == message);
    }
    let peers = server.peers();
    ensure!(peers.len() == 2, "server got {peers:?}");
    ensure!(peers.iter().all(|p| p.ip() == proxy_ip(v6)), "server saw {peers:?}");
    // One session: both datagrams left from the same upstream socket.
    ensure!(peers[0] == peers[1], "a second upstream socket was opened: {peers:?}");
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 1, "{udp:?}");
    Ok(())
}

#[test]
fn udp_ipv4_request_response() -> Result<()> {
    request_response(false)
}

#[test]
fn udp_ipv6_request_response() -> Result<()> {
    request_response(true)
}

/// 1000 datagrams in one session, each answered and checked, none lost.
/// A window of 32 in flight keeps socket buffers from overflowing.
#[test]
fn a_thousand_datagrams_in_one_session() -> Result<()> {
    let topology = Topology::new("udp1000")?;
    let proxy = attach(&topology, &[])?;
    let server_addr = Topology::server_addr(false, PORT);
    let _server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    const COUNT: u32 = 1000;
    const WINDOW: u32 = 32;
    let mut outstanding = BTreeSet::new();
    let mut next = 0u32;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = 0;
    while answered < COUNT {
        ensure!(Instant::now() < deadline, "{answered} of {COUNT} answered in 30 s");
        while next < COUNT && outstanding.len() < WINDOW as usize {
            client.send_to(&datagram(next), server_addr)?;
            outstanding.insert(next);
            next += 1;
        }
        let reply = recv_from(&client, server_addr)?;
        let seq = check_datagram(&reply)?;
        ensure!(outstanding.remove(&seq), "reply {seq} was not asked for, or came twice");
        answered += 1;
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 1, "{udp:?}");
    ensure!(udp.datagrams_up == COUNT as u64 && udp.datagrams_down == COUNT as u64, "{udp:?}");
    Ok(())
}

/// A datagram that carries its sequence number and a payload derived from it.
fn datagram(seq: u32) -> Vec<u8> {
    let mut data = seq.to_be_bytes().to_vec();
    data.extend(pattern(seq as u64, 100 + (seq as usize % 400)));
    data
}

fn check_datagram(data: &[u8]) -> Result<u32> {
    ensure!(data.len() >= 4, "short datagram");
    let seq = u32::from_be_bytes(data[..4].try_into()?);
    ensure!(data == datagram(seq), "datagram {seq} corrupted");
    Ok(seq)
}

/// Two clients talk to the same server at once; each gets only its own replies.
#[test]
fn concurrent_clients_get_only_their_own_replies() -> Result<()> {
    let topology = Topology::new("udp2c")?;
    let proxy = attach(&topology, &[])?;
    let server_addr = Topology::server_addr(false, PORT);
    let _server = UdpServer::start(&topology.server, server_addr, 1)?;
    let clients: Vec<_> = (0..2u8)
        .map(|id| -> Result<_> {
            let socket = topology.client.udp_client(server_addr)?;
            Ok(thread::spawn(move || -> Result<()> {
                for i in 0..200u32 {
                    let mut message = vec![id];
                    message.extend(i.to_be_bytes());
                    socket.send_to(&message, server_addr)?;
                    let reply = recv_from(&socket, server_addr)?;
                    ensure!(reply == message, "client {id} got {reply:?} for {message:?}");
                }
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    for client in clients {
        client.join().unwrap()?;
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 2, "{udp:?}");
    Ok(())
}

/// A server that answers each request three times, and one that never
/// answers: all replies arrive, and the silent one holds nothing up.
#[test]
fn several_replies_and_a_silent_server() -> Result<()> {
    let topology = Topology::new("udpmulti")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "5300-5301", "--proto", "udp"],
    )?;
    let chatty_addr = Topology::server_addr(false, 5300);
    let silent_addr = Topology::server_addr(false, 5301);
    let _chatty = UdpServer::start(&topology.server, chatty_addr, 3)?;
    let silent = UdpServer::start(&topology.server, silent_addr, 0)?;
    let client = topology.client.udp_client(chatty_addr)?;
    for round in 0..5u8 {
        client.send_to(&[round], silent_addr)?;
        client.send_to(&[round], chatty_addr)?;
        for _ in 0..3 {
            ensure!(recv_from(&client, chatty_addr)? == [round]);
        }
    }
    client.set_read_timeout(Some(Duration::from_millis(300)))?;
    ensure!(client.recv_from(&mut [0u8; 16]).is_err(), "an unexpected extra reply");
    ensure!(silent.peers().len() == 5, "the silent server got {:?}", silent.peers());
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 2 && udp.datagrams_down == 15, "{udp:?}");
    Ok(())
}

/// Datagrams up to the largest IPv4 UDP payload pass whole both ways.
#[test]
fn largest_datagrams_pass_whole() -> Result<()> {
    let topology = Topology::new("udpbig")?;
    let proxy = attach(&topology, &[])?;
    let server_addr = Topology::server_addr(false, PORT);
    let _server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    for len in [1, 1472, 1473, 9000, 65507] {
        let data = pattern(len as u64, len);
        client.send_to(&data, server_addr)?;
        let reply = recv_from(&client, server_addr)?;
        ensure!(reply.len() == len && reply == data, "{len} bytes sent, {} came back", reply.len());
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.truncated == 0, "{udp:?}");
    Ok(())
}

/// After the idle timeout the session is gone: the next datagram opens a new
/// upstream socket, which the server sees as a new source port.
#[test]
fn idle_sessions_expire() -> Result<()> {
    let topology = Topology::new("udpidle")?;
    // Seconds, not less: an emulated guest can stall past a short timeout
    // between two sends.
    let proxy = attach(&topology, &["--udp-idle-timeout", "3"])?;
    let server_addr = Topology::server_addr(false, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    client.send_to(b"a", server_addr)?;
    recv_from(&client, server_addr)?;
    // Traffic within the timeout keeps the session.
    thread::sleep(Duration::from_millis(200));
    client.send_to(b"b", server_addr)?;
    recv_from(&client, server_addr)?;
    proxy.wait_for(&topology.proxy, "udp.sessions_expired", |s| s.udp().sessions_expired == 1)?;
    client.send_to(b"c", server_addr)?;
    recv_from(&client, server_addr)?;
    let peers = server.peers();
    ensure!(peers[0] == peers[1], "the session did not survive activity: {peers:?}");
    ensure!(peers[1].port() != peers[2].port(), "no new upstream socket after expiry: {peers:?}");
    let stats = proxy.stats(&topology.proxy)?;
    let udp = stats.udp();
    // The second session may expire too before the counters are read.
    ensure!(udp.sessions_total == 2 && udp.sessions_expired >= 1, "{udp:?}");
    proxy.stop()?;
    Ok(())
}

/// With a bound of 4 sessions, 10 clients never make the table (counted as
/// the relay's upstream sockets) grow past 4, and the least recently used
/// session is the one evicted.
#[test]
fn the_session_table_is_bounded() -> Result<()> {
    const BOUND: usize = 4;
    let topology = Topology::new("udpbound")?;
    // One client address: the table's bound alone, without a per-source share.
    let proxy = attach(
        &topology,
        &["--max-udp-sessions", &BOUND.to_string(), "--max-udp-sessions-per-source", "0"],
    )?;
    let server_addr = Topology::server_addr(false, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let clients: Vec<UdpSocket> =
        (0..10).map(|_| topology.client.udp_client(server_addr)).collect::<Result<_>>()?;
    for client in &clients {
        client.send_to(b"x", server_addr)?;
        recv_from(client, server_addr)?;
        let open = upstream_sockets(&topology, server_addr)?;
        ensure!(open <= BOUND, "{open} upstream sockets for a bound of {BOUND}");
    }
    // The first client's session was evicted long ago: it gets a new one.
    let first_port = server.peers()[0].port();
    clients[0].send_to(b"y", server_addr)?;
    recv_from(&clients[0], server_addr)?;
    let again = *server.peers().last().unwrap();
    ensure!(again.port() != first_port, "the evicted session was still there");
    let stats = proxy.stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(
        udp.sessions_total == 11 && udp.sessions_expired == 0 && udp.sessions_evicted == 7,
        "{udp:?}"
    );
    proxy.stop()?;
    Ok(())
}

/// One source holds at most an eighth of the sessions by default, and past
/// it its oldest session makes room for its newest: a client flooding new
/// sessions from one address never evicts another client's session. With
/// room for 16, a client opens 40 from one address (a global LRU alone
/// would evict the other client's); it keeps its 2 newest, and the session
/// of a client on another address is the one it had.
#[test]
fn a_flood_from_one_source_evicts_only_its_own_sessions() -> Result<()> {
    let topology = Topology::new("udpsource")?;
    topology.client.exec(&["ip", "addr", "add", "192.0.2.3/24", "dev", "c0"])?;
    let proxy = attach(&topology, &["--max-udp-sessions", "16"])?;
    let server_addr = Topology::server_addr(false, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let other = topology.client.udp_bind("192.0.2.3:0".parse()?)?;
    other.send_to(b"other", server_addr)?;
    recv_from(&other, server_addr)?;
    let others_session = *server.peers().last().context("no peer")?;
    let flood: Vec<UdpSocket> =
        (0..40).map(|_| topology.client.udp_client(server_addr)).collect::<Result<_>>()?;
    for client in &flood {
        client.send_to(b"flood", server_addr)?;
        recv_from(client, server_addr)?;
    }
    other.send_to(b"again", server_addr)?;
    recv_from(&other, server_addr)?;
    let again = *server.peers().last().context("no peer")?;
    ensure!(again == others_session, "the other client's session was replaced: {again}");
    // The flood's first session was closed for its newer ones.
    flood[0].send_to(b"first", server_addr)?;
    recv_from(&flood[0], server_addr)?;
    let stats = proxy.stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(
        udp.sessions_total == 42
            && udp.sessions_evicted_per_source == 39
            && udp.sessions_evicted == 0
            && udp.sessions_active == 3,
        "{udp:?}"
    );
    proxy.stop()?;
    Ok(())
}

/// Connected UDP sockets in the proxy namespace whose peer is `server`.
fn upstream_sockets(topology: &Topology, server: SocketAddr) -> Result<usize> {
    let out = topology.proxy.exec(&["ss", "-Hun", "dst", &server.to_string()])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// A real DNS server (dnsmasq) and a real client (dig), through the proxy,
/// on both families.
#[test]
fn dig_queries_dnsmasq_through_the_proxy() -> Result<()> {
    let topology = Topology::new("dns")?;
    let proxy = Proxy::start(&topology.proxy, &["attach", PROXY_CLIENT_IFACE, "--port", "53"])?;
    let dnsmasq = Dnsmasq::start(
        &topology,
        &[("tproxy.test", "203.0.113.7"), ("tproxy.test", "2001:db8::7")],
    )?;
    let result = (|| -> Result<()> {
        for (server, kind, answer) in
            [("198.51.100.10", "A", "203.0.113.7"), ("2001:db8:2::10", "AAAA", "2001:db8::7")]
        {
            // dnsmasq may still be starting.
            eventually(Duration::from_secs(10), || {
                let out = topology.client.exec(&[
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    &format!("@{server}"),
                    "tproxy.test",
                    kind,
                ]);
                ensure!(
                    out.as_ref().is_ok_and(|out| out.trim() == answer),
                    "dig @{server} {kind}: {out:?}"
                );
                Ok(())
            })?;
        }
        Ok(())
    })();
    result?;
    // dnsmasq saw the queries come from the proxy.
    for proxy_addr in ["198.51.100.1", "2001:db8:2::1"] {
        ensure!(dnsmasq.saw_query_from(proxy_addr), "{}", dnsmasq.log());
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.datagrams_up > 0, "{udp:?}");
    Ok(())
}

/// `--proto tcp` narrows `--port`: UDP to that port is forwarded untouched,
/// and the server sees the client.
#[test]
fn proto_tcp_leaves_udp_alone() -> Result<()> {
    let topology = Topology::new("udpnarrow")?;
    let proxy = Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, "--port", "5300", "--proto", "tcp"],
    )?;
    let server_addr = Topology::server_addr(false, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    client.send_to(b"direct", server_addr)?;
    ensure!(recv_from(&client, server_addr)? == b"direct");
    ensure!(server.peers()[0].ip() == client_ip(false), "server saw {:?}", server.peers());
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 0, "{udp:?}");
    Ok(())
}

/// Deleting the rule closes its sessions at once: the same client socket's
/// next datagram goes to the server directly (the server sees the client),
/// not to the session's reply socket, which would still own the tuple.
#[test]
fn deleting_a_rule_ends_its_sessions() -> Result<()> {
    let topology = Topology::new("udpdel")?;
    let proxy = attach(&topology, &[])?;
    let server_addr = Topology::server_addr(false, PORT);
    let server = UdpServer::start(&topology.server, server_addr, 1)?;
    let client = topology.client.udp_client(server_addr)?;
    client.send_to(b"relayed", server_addr)?;
    ensure!(recv_from(&client, server_addr)? == b"relayed");
    let from = SocketAddr::from((CLIENT_V4, client.local_addr()?.port()));
    let tuple = format!("src {server_addr} and dst {from}");
    let held = topology.proxy.exec(&["ss", "-Huan", &tuple])?;
    ensure!(!held.trim().is_empty(), "no reply socket holds {tuple}");
    let out = run_tproxy(&topology.proxy, &["port", "del", &PORT.to_string(), "--proto", "udp"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The session's reply socket, which owned the client's tuple, is closed.
    eventually(Duration::from_secs(5), || {
        let held = topology.proxy.exec(&["ss", "-Huan", &tuple])?;
        ensure!(held.trim().is_empty(), "the session still holds {tuple}: {held}");
        Ok(())
    })?;
    client.send_to(b"direct", server_addr)?;
    ensure!(recv_from(&client, server_addr)? == b"direct");
    let peers = server.peers();
    let own = client.local_addr()?.port();
    ensure!(
        peers.len() == 2 && peers[0].ip() == proxy_ip(false) && peers[1] == (CLIENT_V4, own).into(),
        "server saw {peers:?}"
    );
    proxy.stop()?;
    Ok(())
}
