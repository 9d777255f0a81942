//! Source spoofing: the relay connects upstream from the client's own
//! address, and the TC program on the server-facing interface steers the
//! server's replies (addressed to that non-local address) back to the
//! relay's sockets.

use std::{
    io::{Read, Write},
    net::Shutdown,
    thread,
    time::Duration,
};

use anyhow::{Result, ensure};
use tproxy_tests::*;

fn attach_spoofing(topology: &Topology, port: &str) -> Result<Proxy> {
    Proxy::start(
        &topology.proxy,
        &["attach", PROXY_CLIENT_IFACE, PROXY_SERVER_IFACE, "--port", port, "--spoof-source"],
    )
}

/// The server sees the client's own address, and 1 MiB each way arrives exact.
fn spoofed_tcp(v6: bool) -> Result<()> {
    let topology = Topology::new(if v6 { "spoof6" } else { "spoof4" })?;
    let proxy = attach_spoofing(&topology, "80")?;
    let addr = Topology::server_addr(v6, 80);
    let request = pattern(11, 1 << 20);
    let reply = pattern(12, 1 << 20);
    let server = serve_once(topology.server.tcp_listen(addr)?, reply.clone());
    let mut client = topology.client.tcp_connect(addr)?;
    let client_port = client.local_addr()?.port();
    client.write_all(&request)?;
    client.shutdown(Shutdown::Write)?;
    ensure!(read_to_end(&mut client)? == reply, "reply corrupted");
    let served = server.join().unwrap()?;
    ensure!(served.received == request, "request corrupted");
    ensure!(served.peer.ip() == client_ip(v6), "server saw {}, not the client", served.peer);
    // The client's port was free on the proxy, so it was kept too.
    ensure!(served.peer.port() == client_port, "server saw port {}", served.peer.port());
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    ensure!(stats.tcp().accepted == 1, "{stats:?}");
    ensure!(stats.datapath.return_path > 0, "{stats:?}");
    Ok(())
}

#[test]
fn spoofed_tcp_ipv4_reaches_the_server_as_the_client() -> Result<()> {
    spoofed_tcp(false)
}

#[test]
fn spoofed_tcp_ipv6_reaches_the_server_as_the_client() -> Result<()> {
    spoofed_tcp(true)
}

/// 64 concurrent spoofed connections over both families, each with its own
/// data, all exact.
#[test]
fn many_concurrent_spoofed_connections() -> Result<()> {
    const CONNECTIONS: usize = 64;
    let topology = Topology::new("spoofmany")?;
    let proxy = attach_spoofing(&topology, "80")?;
    let mut servers = Vec::new();
    for v6 in [false, true] {
        let listener = topology.server.tcp_listen(Topology::server_addr(v6, 80))?;
        servers.push(thread::spawn(move || -> Result<()> {
            let mut handlers = Vec::new();
            for _ in 0..CONNECTIONS / 2 {
                let (mut stream, peer) = listener.accept()?;
                ensure!(peer.ip() == client_ip(v6), "server saw {peer}");
                handlers.push(thread::spawn(move || -> Result<()> {
                    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                    // Echo until the client half-closes.
                    let mut buf = [0u8; 8192];
                    loop {
                        let n = stream.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        stream.write_all(&buf[..n])?;
                    }
                }));
            }
            handlers.into_iter().try_for_each(|h| h.join().unwrap())
        }));
    }
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| -> Result<_> {
            let v6 = i % 2 == 1;
            let mut stream = topology.client.tcp_connect(Topology::server_addr(v6, 80))?;
            Ok(thread::spawn(move || -> Result<()> {
                let data = pattern(i as u64 + 100, 64 * 1024);
                let writer = {
                    let mut stream = stream.try_clone()?;
                    let data = data.clone();
                    thread::spawn(move || -> std::io::Result<()> {
                        stream.write_all(&data)?;
                        stream.shutdown(Shutdown::Write)
                    })
                };
                let echoed = read_to_end(&mut stream)?;
                writer.join().unwrap()?;
                ensure!(
                    echoed == data,
                    "connection {i}: {} of {} bytes, or corrupted",
                    echoed.len(),
                    data.len()
                );
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    for client in clients {
        client.join().unwrap()?;
    }
    for server in servers {
        server.join().unwrap()?;
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let tcp = stats.tcp();
    ensure!(tcp.accepted == CONNECTIONS as u64, "{tcp:?}");
    Ok(())
}

/// A UDP session is spoofed the same way: the server sees the client, the
/// client sees the server.
#[test]
fn spoofed_udp_session() -> Result<()> {
    let topology = Topology::new("spoofudp")?;
    let proxy = attach_spoofing(&topology, "5300")?;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 5300);
        let server = UdpServer::start(&topology.server, addr, 1)?;
        let client = topology.client.udp_client(addr)?;
        let client_port = client.local_addr()?.port();
        for i in 0..10u8 {
            client.send_to(&[i; 32], addr)?;
            let mut buf = [0u8; 64];
            let (n, from) = client.recv_from(&mut buf)?;
            ensure!(from == addr && buf[..n] == [i; 32], "reply {i} from {from}");
        }
        let peers = server.peers();
        ensure!(
            peers.iter().all(|p| p.ip() == client_ip(v6) && p.port() == client_port),
            "server saw {peers:?}"
        );
    }
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let udp = stats.udp();
    ensure!(udp.sessions_total == 2, "{udp:?}");
    Ok(())
}

/// On the server-facing interface only the relay's own flows are touched:
/// a connection the server side opens towards the client passes as before.
#[test]
fn unrelated_traffic_on_the_upstream_interface_is_untouched() -> Result<()> {
    let topology = Topology::new("spoofother")?;
    let proxy = attach_spoofing(&topology, "80")?;
    // From the server to the client, source port 80 (gated), no relay socket.
    let client_addr = std::net::SocketAddr::new(client_ip(false), 9000);
    let listener = topology.client.tcp_listen(client_addr)?;
    let served = serve_once(listener, b"from the client".to_vec());
    let stream = topology.server.run(move || -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&std::net::SocketAddr::new(SERVER_V4.into(), 80).into())?;
        socket.connect_timeout(&client_addr.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    })??;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.shutdown(Shutdown::Write)?;
    ensure!(read_to_end(&mut stream)? == b"from the client");
    ensure!(served.join().unwrap()?.peer.ip() == std::net::IpAddr::from(SERVER_V4));
    let stats = proxy.stop_with_stats(&topology.proxy)?;
    let tcp = stats.tcp();
    ensure!(tcp.accepted == 0, "{tcp:?}");
    Ok(())
}

/// Symmetric ports, as NTP uses (123 to 123): the server's reply from the
/// intercepted port to the client's same port belongs to the spoofed
/// upstream socket, which owns that tuple. It must reach that socket, not
/// open a mirrored session as if the server were a client.
#[test]
fn symmetric_ports_make_one_spoofed_session() -> Result<()> {
    let topology = Topology::new("spoofsym")?;
    let proxy = attach_spoofing(&topology, "5300")?;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 5300);
        let server = UdpServer::start(&topology.server, addr, 1)?;
        let any: std::net::SocketAddr =
            if v6 { "[::]:5300".parse()? } else { "0.0.0.0:5300".parse()? };
        let client = topology.client.udp_bind(any)?;
        udp_round_trips(&client, addr, 5)?;
        let peers = server.peers();
        ensure!(peers.iter().all(|p| p.port() == 5300 && p.ip() == client_ip(v6)), "{peers:?}");
    }
    let udp = *proxy.stats(&topology.proxy)?.udp();
    ensure!(udp.sessions_total == 2, "mirrored sessions were opened: {udp:?}");
    proxy.stop()?;
    Ok(())
}

/// When the client's own tuple to the server is still taken on the proxy (a
/// socket there, closing or not, holds the client's address and port
/// connected to that server), the relay connects from another port of the
/// client's address instead of resetting the client.
#[test]
fn a_client_tuple_still_taken_on_the_proxy_gets_another_port() -> Result<()> {
    const PORT: u16 = 45_678;
    let topology = Topology::new("spooftaken")?;
    let server: std::net::SocketAddr = (SERVER_V4, 80).into();
    let client: std::net::SocketAddr = (CLIENT_V4, PORT).into();
    let listener = topology.server.tcp_listen(server)?;
    // The tuple's holder: transparent and SO_REUSEADDR, as the relay's own
    // upstream sockets are, so binding beside it works and only the
    // connect finds the tuple taken. Made before tproxy steers replies, it
    // sits in SYN-SENT.
    let holder = topology.proxy.run(move || -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_ip_transparent_v4(true)?;
        socket.set_reuse_address(true)?;
        socket.bind(&client.into())?;
        socket.set_nonblocking(true)?;
        let _ = socket.connect(&server.into());
        Ok(socket)
    })??;
    let proxy = attach_spoofing(&topology, "80")?;
    // The holder's handshake may complete once replies are steered: the
    // server answers only the connection that asks.
    let served = thread::spawn(move || -> Result<std::net::SocketAddr> {
        let mut held = Vec::new();
        loop {
            let (mut stream, peer) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut ask = [0u8; 4];
            if stream.read_exact(&mut ask).is_ok() && &ask == b"ping" {
                stream.write_all(b"pong")?;
                return Ok(peer);
            }
            held.push(stream);
        }
    });
    let mut stream = topology.client.run(move || -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&client.into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(5))?;
        Ok(socket.into())
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(b"ping")?;
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer)?;
    ensure!(&answer == b"pong", "answer {answer:?}");
    let peer = served.join().unwrap()?;
    ensure!(peer.ip() == CLIENT_V4, "server saw {peer}, not the client's address");
    ensure!(peer.port() != PORT, "server saw the taken port {PORT}");
    drop(holder);
    proxy.stop()?;
    Ok(())
}
