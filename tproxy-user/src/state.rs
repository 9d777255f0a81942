//! What a named instance keeps under `/run/tproxy` so that a killed run can
//! be cleaned up without touching anyone else's:
//!
//! - `<name>.lock`, locked (flock) for the instance's lifetime. The kernel
//!   releases the lock when the process dies, so a held lock means a live
//!   instance and a free one means whatever is recorded is a leftover.
//! - `<name>.state`, the netlink TC filters the instance attached (kernels
//!   before 6.6). Those outlive their process, unlike TCX links; the next
//!   start under the same name, or `tproxy-user cleanup`, removes exactly them.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where instances keep their lock, state and control socket.
pub const RUN_DIR: &str = "/run/tproxy";

/// A netlink TC filter, enough to find and delete it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetlinkFilter {
    /// The interface.
    pub iface: String,
    /// The filter's priority.
    pub priority: u16,
    /// The filter's handle.
    pub handle: u32,
}

/// The recorded state of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    /// Filters attached through netlink.
    pub filters: Vec<NetlinkFilter>,
    /// TCP ports intercepted during the run: a killed relay's TIME_WAIT
    /// sockets on them are removed after it (see [`crate::timewait`]).
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
}

/// A claimed instance name: the lock is held until this is dropped, which
/// also removes the state file.
pub struct Claim {
    /// Locked while the claim lives; closing it releases the name.
    _lock: File,
    lock_path: PathBuf,
    state_path: PathBuf,
    state: InstanceState,
}

impl Claim {
    /// Claims `name`, failing if a live instance holds it. Returns what a
    /// dead instance of that name left recorded.
    pub fn acquire(name: &str) -> Result<(Self, InstanceState)> {
        let dir = Path::new(RUN_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = lock(&lock_path, name)?;
        let state_path = dir.join(format!("{name}.state"));
        let leftover = read(&state_path);
        let claim = Self { _lock: lock, lock_path, state_path, state: InstanceState::default() };
        claim.write()?;
        Ok((claim, leftover))
    }

    /// Records a filter as attached.
    pub fn record(&mut self, filter: NetlinkFilter) -> Result<()> {
        self.state.filters.push(filter);
        self.write()
    }

    /// Records TCP ports as intercepted.
    pub fn record_tcp_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<()> {
        let before = self.state.tcp_ports.len();
        for port in ports {
            if !self.state.tcp_ports.contains(&port) {
                self.state.tcp_ports.push(port);
            }
        }
        if self.state.tcp_ports.len() == before { Ok(()) } else { self.write() }
    }

    fn write(&self) -> Result<()> {
        let json = serde_json::to_vec(&self.state)
            .map_err(|e| Error::io("encoding state", io::Error::other(e)))?;
        fs::write(&self.state_path, json)
            .map_err(|e| Error::io(format!("writing {}", self.state_path.display()), e))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Everything recorded has been detached by now. The lock file goes
        // while still locked; `lock` checks for that race.
        let _ = fs::remove_file(&self.state_path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// Opens and locks `path`. A lock file that its holder unlinked on exit
/// while we waited for it is no lock at all, so the locked file must still
/// be the one at `path`.
fn lock(path: &Path, name: &str) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(Error::Config(format!(
                    "an instance named {name:?} is already running; give this one another --name (and --mark and --table)"
                )));
            }
            return Err(Error::io(format!("locking {}", path.display()), e));
        }
        let locked = file.metadata().map(|m| m.ino()).ok();
        let current = fs::metadata(path).map(|m| m.ino()).ok();
        if locked.is_some() && locked == current {
            return Ok(file);
        }
    }
}

/// What a dead instance named `name` left recorded, without claiming the
/// name; `None` while a live instance holds it.
pub fn leftovers(name: &str) -> Result<Option<InstanceState>> {
    match Claim::acquire(name) {
        Ok((claim, leftover)) => {
            drop(claim);
            Ok(Some(leftover))
        }
        Err(Error::Config(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn read(path: &Path) -> InstanceState {
    fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}
