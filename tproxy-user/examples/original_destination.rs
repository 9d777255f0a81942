//! A transparent TCP and UDP server of the kind go-tproxy programs are: it
//! steers nothing itself, and answers each connection and each datagram
//! with the original destination it was sent to. Another process steers
//! traffic to it:
//!
//! ```sh
//! sudo cargo run -p tproxy-user --example original_destination -- 8080 &
//! sudo tproxy-user attach eth0 --port 80 --to-port 8080
//! ```
//!
//! Each answer is one line, `CLIENT -> ORIGINAL_DESTINATION`; a UDP answer
//! comes from the original destination's address, as the client expects.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::{
    io::AsyncWriteExt,
    signal::unix::{SignalKind, signal},
};
use tproxy_user::relay::transparent::{TransparentListener, TransparentUdp, udp_reply_socket};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(port) = std::env::args().nth(1) else {
        return Err("usage: original_destination PORT".into());
    };
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;
    let v4: SocketAddr = (Ipv4Addr::UNSPECIFIED, port).into();
    let v6: SocketAddr = (Ipv6Addr::UNSPECIFIED, port).into();
    let tcp = [TransparentListener::bind(v4, 1024)?, TransparentListener::bind(v6, 1024)?];
    let udp = [TransparentUdp::bind(v4)?, TransparentUdp::bind(v6)?];
    println!("ready: tcp and udp port {port}");

    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (mut buf4, mut buf6) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            accepted = async { tokio::select! { a = tcp[0].accept() => a, a = tcp[1].accept() => a } } => {
                match accepted {
                    Ok(mut a) => {
                        let line = format!("{} -> {}\n", a.client, a.original_dst);
                        tokio::spawn(async move { a.stream.write_all(line.as_bytes()).await });
                    }
                    Err(e) => eprintln!("accept: {e}"),
                }
            }
            received = async { tokio::select! { d = udp[0].recv(&mut buf4) => d, d = udp[1].recv(&mut buf6) => d } } => {
                match received {
                    // From the original destination: the client's socket
                    // takes answers only from where it sent to.
                    Ok(d) => {
                        let line = format!("{} -> {}\n", d.client, d.original_dst);
                        match udp_reply_socket(d.original_dst, d.client, 0) {
                            Ok(reply) => {
                                if let Err(e) = reply.send(line.as_bytes()).await {
                                    eprintln!("answering {}: {e}", d.client);
                                }
                            }
                            Err(e) => eprintln!("answering {} from {}: {e}", d.client, d.original_dst),
                        }
                    }
                    Err(e) => eprintln!("receive: {e}"),
                }
            }
        }
    }
    println!("stopped");
    Ok(())
}
