//! A transparent TCP proxy that logs every connection, built only on the
//! library's public API: the [`Interceptor`] steers, a [`TransparentListener`]
//! accepts, [`tcp_dial`] connects to the original destination.
//!
//! ```sh
//! sudo cargo run -p tproxy-user --example logging_proxy -- eth0 80
//! ```
//!
//! Prints `client -> original destination: N bytes up, M bytes down` for each
//! connection, and removes everything it added on SIGINT or SIGTERM.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tproxy_user::{
    InterceptConfig, Interceptor, RelaySocket,
    intercept::DEFAULT_UPSTREAM_MARK,
    relay::transparent::{Accepted, DialOptions, TransparentListener, tcp_dial},
    rules::{Protocol, Rule},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(iface), Some(port)) = (args.next(), args.next()) else {
        return Err("usage: logging_proxy IFACE PORT".into());
    };
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;

    // Transparent listeners on a port the kernel picks, one per family.
    let v4 = TransparentListener::bind((Ipv4Addr::UNSPECIFIED, 0).into(), 1024)?;
    let v6_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, v4.local_addr()?.port()));
    let v6 = TransparentListener::bind(v6_addr, 1024)?;

    // Steer TCP to `port` arriving on `iface` to them.
    let config = InterceptConfig::new(vec![iface], vec![Rule::port(&[Protocol::Tcp], port)]);
    let interceptor = Interceptor::start(
        config,
        &[(RelaySocket::TcpV4, v4.as_fd()), (RelaySocket::TcpV6, v6.as_fd())],
    )
    .await?;
    println!("ready: intercepting tcp/{port}");

    let dial = DialOptions {
        mark: DEFAULT_UPSTREAM_MARK,
        timeout: Duration::from_secs(5),
        ..DialOptions::default()
    };
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        let accepted = tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            a = v4.accept() => a,
            a = v6.accept() => a,
        };
        match accepted {
            Ok(accepted) => {
                tokio::spawn(relay(accepted, dial));
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    interceptor.stop().await?;
    println!("stopped");
    Ok(())
}

async fn relay(accepted: Accepted, dial: DialOptions) {
    let Accepted { mut stream, client, original_dst } = accepted;
    let result = match tcp_dial(original_dst, &dial).await {
        Ok(mut upstream) => tokio::io::copy_bidirectional(&mut stream, &mut upstream).await,
        Err(e) => Err(e),
    };
    match result {
        Ok((up, down)) => {
            println!("{client} -> {original_dst}: {up} bytes up, {down} bytes down")
        }
        Err(e) => println!("{client} -> {original_dst}: {e}"),
    }
}
