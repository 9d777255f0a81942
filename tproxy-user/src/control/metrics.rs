//! `attach --metrics ADDR`: the counters over HTTP in Prometheus text format.
//!
//! The format comes from prometheus-client
//! ([`StatsReport::to_prometheus`](crate::control::stats::StatsReport::to_prometheus));
//! the HTTP side is the minimum a scraper needs: `GET /metrics`, one response,
//! close.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    control::Controller,
    error::{Error, Result},
};

/// A bound metrics listener.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `addr`; fails at start, not at the first scrape.
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding the metrics endpoint on {addr}"), e))?;
        Ok(Self { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves scrapes until `shutdown` is cancelled.
    pub async fn serve(self, controller: Arc<Controller>, shutdown: CancellationToken) {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        debug!("metrics accept: {e}");
                        continue;
                    }
                },
            };
            let controller = controller.clone();
            tokio::spawn(async move {
                let served =
                    tokio::time::timeout(Duration::from_secs(10), scrape(stream, &controller));
                if let Ok(Err(e)) = served.await {
                    debug!("metrics request: {e}");
                }
            });
        }
    }
}

async fn scrape(mut stream: TcpStream, controller: &Controller) -> std::io::Result<()> {
    // The request head, up to a limit; the body (there is none) is ignored.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => match controller.stats().await {
            Ok(report) => {
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", report.to_prometheus())
            }
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
