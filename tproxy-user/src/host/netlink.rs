//! rtnetlink plumbing shared by the policy routing, the TC filters and the
//! local table: a connection whose background task ends with it, and a way
//! to run such async work from synchronous code.

use netlink_sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::Handle;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// A connection to rtnetlink; its task is stopped when it is dropped.
pub(crate) struct Netlink {
    pub handle: Handle,
    task: JoinHandle<()>,
}

/// Messages the kernel multicasts to a [`Netlink::subscribe`]d connection.
pub(crate) type Events = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    SocketAddr,
)>;

impl Netlink {
    /// Opens a connection; must be called inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening rtnetlink", e))?;
        Ok(Self { handle, task: tokio::spawn(connection) })
    }

    /// Opens a connection that also receives the multicast `groups`
    /// (`RTMGRP_*`). Strict checking is asked for, so that dumps filter in
    /// the kernel where it can.
    pub fn subscribe(groups: u32) -> Result<(Self, Events)> {
        let (mut connection, handle, events) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening rtnetlink", e))?;
        let socket = connection.socket_mut().socket_mut();
        socket
            .bind(&SocketAddr::new(0, groups))
            .map_err(|e| Error::io("subscribing to rtnetlink events", e))?;
        // Old kernels lack it; their dumps are filtered by the caller.
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok((Self { handle, task: tokio::spawn(connection) }, events))
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `f` with a handle whose connection lives as long as it.
pub(crate) async fn with_handle<F, Fut, T>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let netlink = Netlink::connect()?;
    Ok(f(netlink.handle.clone()).await)
}

/// Runs `future` to completion on a private single-threaded runtime, on a
/// scoped thread: it works inside or outside a runtime (a `Drop` cannot
/// await), and before the process has dropped capabilities (the thread ends
/// before that).
pub(crate) fn block_on<T: Send>(future: impl std::future::Future<Output = T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("starting a runtime", e))?;
                Ok(runtime.block_on(future))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::io("a netlink helper", std::io::Error::other("panicked")))
            })
    })
}
