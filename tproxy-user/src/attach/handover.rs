//! Handing over: a takeover asks the running instance to let go; the
//! instance that lets go drains its connections.

use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    intercept::Interceptor,
    relay::{TcpRelayStats, UdpRelayStats},
};

/// Asks the running instance of `name` to let go, and claims the name.
/// An instance that refuses stops the takeover; none answering (none
/// runs, or it died) leaves the name to take.
pub(super) async fn take_over(name: &str, interceptor: &mut Interceptor) -> Result<()> {
    let handover = crate::control::Request::Handover { pid: std::process::id() };
    let sent = || info!("asked instance {name:?} to hand over; waiting for it to let go");
    match crate::control::request_then(name, &handover, sent).await {
        Ok(crate::control::Response::Ok) => {
            info!("instance {name:?} let go: it drains its connections and exits")
        }
        Ok(crate::control::Response::Error { message }) => {
            return Err(Error::Config(format!("no takeover: {message}")));
        }
        Ok(other) => {
            return Err(Error::Config(format!(
                "no takeover: instance {name:?} answered {other:?}"
            )));
        }
        Err(e) => {
            // None runs, or it died: its lock goes with it, shortly.
            warn!("{e}: taking the name as it is");
            return interceptor.take_name(std::time::Duration::from_secs(5)).await;
        }
    }
    interceptor.take_name(std::time::Duration::ZERO).await
}

/// Waits until the relays hold no connection and no session, or for
/// `timeout`; what is left then is closed by the caller.
pub(super) async fn drain(tcp: &TcpRelayStats, udp: &UdpRelayStats, timeout: std::time::Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let deadline = tokio::time::Instant::now() + timeout;
    let held = || (tcp.active.load(Relaxed), udp.sessions_active.load(Relaxed));
    info!(
        "draining: {} connections and {} UDP sessions, for at most {timeout:?}",
        held().0,
        held().1
    );
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        ticks.tick().await;
        let (connections, sessions) = held();
        if connections == 0 && sessions == 0 {
            info!("drained");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!("drain timeout: closing {connections} connections and {sessions} UDP sessions");
            return;
        }
    }
}
