//! The library API, exercised through the example built only on it.

use std::{io::Write, net::Shutdown, time::Duration};

use anyhow::{Result, ensure};
use tproxy_tests::*;

/// `examples/logging_proxy.rs` intercepts, relays and logs a real connection
/// on both families, and removes everything when it stops.
#[test]
fn the_logging_proxy_example_relays_and_logs() -> Result<()> {
    let topology = Topology::new("example")?;
    let proxy = Proxy::spawn_program(
        &topology.proxy,
        &example_bin("logging_proxy"),
        &[PROXY_CLIENT_IFACE, "80"],
        "warn",
    )?;
    proxy.wait_for_log("ready: intercepting tcp/80", Duration::from_secs(30))?;
    for v6 in [false, true] {
        let addr = Topology::server_addr(v6, 80);
        let server = serve_once(topology.server.tcp_listen(addr)?, b"pong".to_vec());
        let mut client = topology.client.tcp_connect(addr)?;
        let client_addr = client.local_addr()?;
        client.write_all(b"ping")?;
        client.shutdown(Shutdown::Write)?;
        ensure!(read_to_end(&mut client)? == b"pong");
        let served = server.join().unwrap()?;
        ensure!(served.received == b"ping");
        ensure!(served.peer.ip() == proxy_ip(v6), "server saw {}", served.peer);
        proxy.wait_for_log(
            &format!("{client_addr} -> {addr}: 4 bytes up, 4 bytes down"),
            Duration::from_secs(5),
        )?;
    }
    let log = proxy.stop()?;
    ensure!(log.contains("stopped"), "{log}");
    let state = topology.proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
    ensure!(state.is_empty(), "left behind: {state}");
    Ok(())
}

/// An `Interceptor` embedded in a program: it steers while it lives, ports
/// can be added and removed on the fly, and dropping it (no `stop`) removes
/// the program and the routing.
#[test]
fn an_embedded_interceptor_cleans_up_on_drop() -> Result<()> {
    use std::os::fd::AsFd;
    use tproxy_user::{
        InterceptConfig, Interceptor, RelaySocket,
        relay::transparent::TransparentListener,
        rules::{Protocol, Rule},
    };

    let topology = Topology::new("embed")?;
    let addr = Topology::server_addr(false, 80);
    let listener_server = topology.server.tcp_listen(addr)?;
    let server = std::thread::spawn(move || -> Result<Vec<std::net::SocketAddr>> {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut stream, peer) = listener_server.accept()?;
            stream.write_all(b"hi")?;
            peers.push(peer);
        }
        Ok(peers)
    });
    let (client, proxy) = (&topology.client, &topology.proxy);
    let state_while_running = topology.proxy.run({
        let client_ns = client.name.clone();
        let proxy_ns = proxy.name.clone();
        move || -> Result<(String, String)> {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let listener = TransparentListener::bind(([0, 0, 0, 0], 0).into(), 64)?;
                let mut config = InterceptConfig::new(
                    vec![PROXY_CLIENT_IFACE.into()],
                    vec![Rule::port(&[Protocol::Tcp], 9999)],
                );
                config.name = proxy_ns.clone();
                let mut interceptor =
                    Interceptor::start(config, &[(RelaySocket::TcpV4, listener.as_fd())]).await?;
                interceptor.add_port(Protocol::Tcp, 80)?;
                interceptor.remove_port(Protocol::Tcp, 9999)?;
                let client = Netns { name: client_ns };
                let proxy = Netns { name: proxy_ns };
                // A connection to port 80 now reaches our listener.
                let mut stream = client.tcp_connect(addr)?;
                let accepted = listener.accept().await?;
                ensure!(
                    accepted.original_dst == addr,
                    "original destination {}",
                    accepted.original_dst
                );
                drop(accepted);
                let _ = read_to_end(&mut stream);
                let running = proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
                drop(interceptor);
                let after = proxy.interception_state(PROXY_CLIENT_IFACE, DEFAULT_TABLE)?;
                Ok((running, after))
            })
        }
    })??;
    let (running, after) = state_while_running;
    ensure!(running.contains(&format!("fwmark {DEFAULT_MARK:#x}")), "nothing installed: {running}");
    ensure!(after.is_empty(), "left behind after drop: {after}");
    // With the interceptor gone, port 80 is forwarded to the server directly.
    for _ in 0..2 {
        let mut stream = topology.client.tcp_connect(addr)?;
        ensure!(read_to_end(&mut stream)? == b"hi");
    }
    let peers = server.join().unwrap()?;
    ensure!(peers.iter().all(|p| p.ip() == client_ip(false)), "server saw {peers:?}");
    Ok(())
}

/// The sandbox's idea of the defaults is the library's.
#[test]
fn the_sandbox_defaults_are_the_librarys() {
    use tproxy_user::intercept;
    assert_eq!(DEFAULT_MARK, intercept::DEFAULT_MARK);
    assert_eq!(DEFAULT_UPSTREAM_MARK, intercept::DEFAULT_UPSTREAM_MARK);
    assert_eq!(DEFAULT_TABLE, intercept::DEFAULT_TABLE);
    assert_eq!(DEFAULT_TABLE, intercept::DEFAULT_RULE_PRIORITY);
}

/// An `Interceptor` that steers to a listener it did not create: a plain
/// IP_TRANSPARENT socket bound to one address (not the wildcard), named as
/// the target's address. Its accepted connection shows the original
/// destination.
#[test]
fn an_interceptor_steers_to_a_listener_it_did_not_create() -> Result<()> {
    use socket2::{Domain, Socket, Type};
    use tproxy_user::{
        InterceptConfig, Interceptor,
        intercept::{PortTarget, Target},
        rules::{Protocol, Rule},
    };

    let topology = Topology::new("embed-port")?;
    let addr = Topology::server_addr(false, 80);
    let (client, proxy) = (&topology.client, &topology.proxy);
    let (client_ns, proxy_ns) = (client.name.clone(), proxy.name.clone());
    topology.proxy.run(move || -> Result<()> {
        let bound = std::net::SocketAddr::from((PROXY_CLIENT_SIDE_V4, 7000));
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&bound.into())?;
        socket.listen(16)?;
        let listener: std::net::TcpListener = socket.into();
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let mut config = InterceptConfig::new(
                vec![PROXY_CLIENT_IFACE.into()],
                vec![Rule::port(&[Protocol::Tcp], 80)],
            );
            config.name = proxy_ns;
            config.target = Target::Port(PortTarget {
                ipv4: Some(PROXY_CLIENT_SIDE_V4),
                ..PortTarget::new(7000)
            });
            let interceptor = Interceptor::start(config, &[]).await?;
            let client = Netns { name: client_ns };
            let _stream = client.tcp_connect(addr)?;
            let (accepted, peer) = listener.accept()?;
            ensure!(
                accepted.local_addr()? == addr,
                "original destination {}",
                accepted.local_addr()?
            );
            ensure!(peer.ip() == client_ip(false), "peer {peer}");
            let stats = interceptor.stats()?;
            ensure!(stats.to_listener == 1, "{stats:?}");
            interceptor.stop().await?;
            Ok(())
        })
    })??;
    Ok(())
}
