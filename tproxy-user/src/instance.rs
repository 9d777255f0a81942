//! A named instance: its name, and what it keeps in the runtime directory
//! (`/run/tproxy`, or `$RUNTIME_DIRECTORY` as systemd's `RuntimeDirectory=`
//! sets it) so that a killed run can be cleaned up without touching anyone
//! else's:
//!
//! - `<name>.sock`, its control socket (see [`crate::control`]).
//! - `<name>.lock`, locked (flock) for the instance's lifetime. The kernel
//!   releases the lock when the process dies, so a held lock means a live
//!   instance and a free one means whatever is recorded is a leftover.
//! - `<name>.state`, what the instance added that can outlive it: its
//!   policy routing (mark, table, priority, recorded before it is
//!   installed), the netlink TC filters it attached and the clsact qdiscs it
//!   created (kernels before 6.6; TCX links die with their process), the
//!   TCP ports it intercepted, and its network namespace. The next start
//!   under the same name, or `tproxy-user cleanup`, removes exactly that.
//!   Live instances' records also tell a new instance which marks and
//!   tables are taken.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::routing::RoutingConfig,
    error::{Error, Result},
};

/// The instance name when none is given.
pub const DEFAULT_NAME: &str = "default";

/// Checks an instance name: it becomes a file name.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "instance name {name:?}: use 1 to 64 letters, digits, '-' or '_'"
        )))
    }
}

/// The name a takeover of `name` claims until the running instance lets go
/// of `name` (not a valid instance name itself, so no one else's).
pub fn takeover_name(name: &str) -> String {
    format!("{name}.next")
}

/// The control socket of instance `name`.
pub fn socket_path(name: &str) -> PathBuf {
    run_dir_path().join(format!("{name}.sock"))
}

/// Where instances keep their lock, state and control socket unless
/// `$RUNTIME_DIRECTORY` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/tproxy";

/// The runtime directory: the first of `$RUNTIME_DIRECTORY` (systemd sets
/// it for a unit with `RuntimeDirectory=`, owned by the unit's user, so a
/// daemon that is not root can keep its files there), or
/// [`DEFAULT_RUN_DIR`]. Clients (`tproxy-user port …`) look there too.
pub fn run_dir_path() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| {
            let first = dirs.to_string_lossy().split(':').next().map(PathBuf::from);
            first.filter(|d| d.is_absolute())
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// [`run_dir_path`], created private (0700) if missing.
pub fn run_dir() -> Result<PathBuf> {
    let dir = run_dir_path();
    create_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
pub(crate) fn create_private_dir(dir: &Path) -> Result<&Path> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

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
    /// sockets on them are removed after it (see [`crate::relay::timewait`]).
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
    /// The network namespace it ran in (see [`netns_id`]).
    #[serde(default)]
    pub netns: u64,
    /// Its policy routing, recorded before it was installed.
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// The mark of its relay's upstream traffic.
    #[serde(default)]
    pub upstream_mark: u32,
    /// Interfaces whose clsact qdisc it created.
    #[serde(default)]
    pub qdiscs: Vec<String>,
}

/// A claimed instance name: the lock is held until this is dropped, which
/// also removes the state file.
pub struct Claim {
    /// Locked while the claim lives; closing it releases the name.
    _lock: Flock<File>,
    lock_path: PathBuf,
    state_path: PathBuf,
    state: InstanceState,
}

impl Claim {
    /// Claims `name`, failing if a live instance holds it. Returns what a
    /// dead instance of that name left recorded.
    pub fn acquire(name: &str) -> Result<(Self, InstanceState)> {
        let dir = run_dir()?;
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = lock(&lock_path, name)?;
        let state_path = dir.join(format!("{name}.state"));
        let leftover = read(&state_path);
        let state = InstanceState { netns: netns_id()?, ..InstanceState::default() };
        let claim = Self { _lock: lock, lock_path, state_path, state };
        claim.write()?;
        Ok((claim, leftover))
    }

    /// Claims `name` for what this claim recorded (a takeover, which ran
    /// under [`takeover_name`] until the running instance let go), and
    /// returns what a dead instance of `name` left; the interim name is
    /// released. On error nothing changes.
    pub fn rename(&mut self, name: &str) -> Result<InstanceState> {
        let (mut claim, leftover) = Self::acquire(name)?;
        claim.state = self.state.clone();
        claim.write()?;
        // The interim claim's files go with it.
        drop(std::mem::replace(self, claim));
        Ok(leftover)
    }

    /// What is recorded so far.
    pub fn state(&self) -> &InstanceState {
        &self.state
    }

    /// Records the routing and upstream mark, before they are installed.
    pub fn record_routing(&mut self, routing: RoutingConfig, upstream_mark: u32) -> Result<()> {
        self.state.routing = Some(routing);
        self.state.upstream_mark = upstream_mark;
        self.write()
    }

    /// Records a clsact qdisc as created by this instance.
    pub fn record_qdisc(&mut self, iface: &str) -> Result<()> {
        self.state.qdiscs.push(iface.to_owned());
        self.write()
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
fn lock(path: &Path, name: &str) -> Result<Flock<File>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => file,
            Err((_, Errno::EWOULDBLOCK)) => return Err(Error::InstanceRunning(name.to_owned())),
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        };
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
        Err(Error::InstanceRunning(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The records of every other live instance in this network namespace.
pub fn live_instances(except: &str) -> Result<Vec<(String, InstanceState)>> {
    let netns = netns_id()?;
    let Ok(entries) = fs::read_dir(run_dir_path()) else { return Ok(Vec::new()) };
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()?.strip_suffix(".state")) else {
            continue;
        };
        if name == except || !is_locked(&path.with_extension("lock")) {
            continue;
        }
        let state = read(&path);
        if state.netns == netns {
            live.push((name.to_owned(), state));
        }
    }
    Ok(live)
}

/// Whether a live process holds the lock at `path`.
fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    // Taken, our lock goes when the file closes.
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// Held while an instance chooses and installs its routing, so that two
/// instances starting at once never choose the same mark or table.
pub struct AllocationLock(#[allow(dead_code)] Flock<File>);

impl AllocationLock {
    /// Waits for the lock.
    pub fn acquire() -> Result<Self> {
        let dir = run_dir()?;
        let path = dir.join("routing.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(Self)
            .map_err(|(_, e)| Error::io(format!("locking {}", path.display()), e.into()))
    }
}

/// Identifies the calling thread's network namespace (a library caller may
/// have entered another than the process's): the inode of
/// /proc/thread-self/ns/net.
pub fn netns_id() -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading /proc/thread-self/ns/net", e))
}

fn read(path: &Path) -> InstanceState {
    fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}
