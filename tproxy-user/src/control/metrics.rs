//! `attach --metrics ADDR`: an HTTP endpoint (hyper) for scrapers and
//! probes, bound before anything is attached:
//!
//! - `GET /metrics`: every counter in Prometheus text format
//!   ([`StatsReport::to_prometheus`](crate::control::stats::StatsReport::to_prometheus));
//!   503 until the instance runs.
//! - `GET /healthz`: 200 while the process serves (a liveness probe).
//! - `GET /readyz`: 200 once the filters are attached and a listener is in
//!   place for the flows: the relay's, or with `--to-port` the other
//!   program's; 503 with the reason before, while it is missing, and once
//!   the instance stops (a readiness probe).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    control::Controller,
    error::{Error, Result},
    intercept::{self, PortFinding, Target},
};

/// A bound endpoint.
pub struct MetricsServer {
    listener: TcpListener,
}

/// What the endpoint reports on: the instance once it runs, and whether it
/// is stopping.
#[derive(Default)]
pub struct Served {
    controller: OnceLock<Arc<Controller>>,
    stopping: AtomicBool,
    /// The last scrape's text and when it was made: scrapes within
    /// [`SCRAPE_REUSE`] of it get it again, and only one at a time reads the
    /// counters, so that scrapers never keep rule changes waiting.
    last_scrape: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

/// How long one scrape's reading of the counters serves later scrapes.
const SCRAPE_REUSE: Duration = Duration::from_secs(1);

/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 32;

impl Served {
    /// Nothing attached yet: probes get 503.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The instance runs: its filters are attached.
    pub fn running(&self, controller: Arc<Controller>) {
        let _ = self.controller.set(controller);
    }

    /// The instance stops: not ready any more.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    async fn readiness(&self) -> std::result::Result<(), String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("stopping".into());
        }
        let Some(controller) = self.controller.get() else {
            return Err("starting: the filters are not attached yet".into());
        };
        let (target, protocols) =
            controller.target_and_protocols().await.map_err(|e| e.to_string())?;
        let Target::Port(target) = target else { return Ok(()) };
        // Ready while the other program listens for one of the protocols at
        // least (HAProxy takes TCP only, say).
        let findings = intercept::check_port_target(&target, &protocols);
        let missing =
            findings.iter().filter(|f| matches!(f, PortFinding::NoListener { .. })).count();
        if protocols.is_empty() || missing < protocols.len() {
            Ok(())
        } else {
            Err(format!("nothing listens on port {} yet", target.port))
        }
    }
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

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, served: Arc<Served>, shutdown: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!("metrics: {MAX_CONNECTIONS} connections open; one more closed");
                continue;
            };
            let served = served.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |request| {
                    let served = served.clone();
                    async move { Ok::<_, Infallible>(respond(&served, request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                // A client that keeps the connection idle is let go.
                match tokio::time::timeout(Duration::from_secs(60), connection).await {
                    Ok(Err(e)) => debug!("metrics connection: {e}"),
                    Err(_) => debug!("metrics connection: idle for 60 s, closed"),
                    Ok(Ok(())) => {}
                }
            });
        }
    }
}

async fn respond<B>(served: &Served, request: Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| reply(status, "text/plain; charset=utf-8", body);
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => match served.controller.get() {
            Some(controller) => {
                let mut last = served.last_scrape.lock().await;
                match &*last {
                    Some((at, body)) if at.elapsed() < SCRAPE_REUSE => prometheus(body.clone()),
                    _ => match controller.stats().await {
                        Ok(report) => {
                            let body = report.to_prometheus();
                            *last = Some((std::time::Instant::now(), body.clone()));
                            prometheus(body)
                        }
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                    },
                }
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match served.readiness().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".into()),
    }
}

fn prometheus(body: String) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (code, body)
    }

    /// Before anything is attached the endpoint already answers: alive, not
    /// ready, no metrics yet; once stopping, not ready.
    #[tokio::test]
    async fn probes_answer_before_the_instance_runs_and_as_it_stops() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr().unwrap();
        let served = Served::new();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(served.clone(), stop.clone()));
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        let (code, why) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(why.contains("not attached yet"), "{why}");
        assert_eq!(get(addr, "/metrics").await.0, 503);
        assert_eq!(get(addr, "/nothing").await.0, 404);
        served.stopping();
        assert_eq!(get(addr, "/readyz").await, (503, "stopping\n".into()));
        stop.cancel();
    }
}
