//! The service manager's notification protocol (`Type=notify` units):
//! READY=1 once steering and listeners are in place, RELOADING=1 while the
//! rules are re-read, STOPPING=1 at shutdown, WATCHDOG=1 pings, and
//! MAINPID= from the process that took over. Without `$NOTIFY_SOCKET` (not
//! started by systemd) each is a no-op.

use std::{sync::Arc, time::Duration};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Controller;

/// Sends one notification without blocking: a service manager that is
/// slow to read its queue must not stall the runtime's threads (sd_notify's
/// own send blocks); a notification that does not fit is dropped.
fn send(states: &[NotifyState]) {
    use std::{fmt::Write as _, os::unix::net::UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let mut message = String::new();
    for state in states {
        let _ = writeln!(message, "{state}");
    }
    let sent = (|| -> std::io::Result<usize> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
            None => socket.send_to(message.as_bytes(), &path),
        }
    })();
    match sent {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            debug!("the service manager's queue is full: {message:?} dropped")
        }
        Err(e) => warn!("notifying the service manager: {e}"),
    }
}

/// Ready, with a status line for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Ready after a takeover: this process is the service's main process
/// now (the unit needs `NotifyAccess=all`, as the instance it replaced
/// started this one).
pub fn took_over(status: &str) {
    send(&[
        NotifyState::MainPid(std::process::id()),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
}

/// Reloading the rules; [`ready`] follows when done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => warn!("reading the monotonic clock for RELOADING=1: {e}"),
    }
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its period (`WatchdogSec=`) while the
/// instance answers: a ping needs the counters read through the same lock
/// every control request takes, so a wedged instance is restarted.
pub async fn watchdog(controller: Arc<Controller>, shutdown: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let mut ticks = tokio::time::interval((period / 2).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => match controller.stats().await {
                Ok(_) => send(&[NotifyState::Watchdog]),
                Err(e) => debug!("no watchdog ping: {e}"),
            },
        }
    }
}
