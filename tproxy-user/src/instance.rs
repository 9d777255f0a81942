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
    fs::{self, File},
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::routing::RoutingConfig,
    error::{Error, Result},
    host::files::Dir,
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

/// [`run_dir_path`], created if missing and made private (0700) if it is
/// this process's, so that no other user can open the locks and state in
/// it; refused if it is a link or others may write to it.
pub fn run_dir() -> Result<Dir> {
    let path = run_dir_path();
    Dir::private(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// What an instance records of each filter it attached.
pub use crate::datapath::NetlinkFilter;

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
    dir: Dir,
    lock_name: String,
    state_name: String,
    state: InstanceState,
}

impl Claim {
    /// Claims `name`, failing if a live instance holds it. Returns what a
    /// dead instance of that name left recorded.
    pub fn acquire(name: &str) -> Result<(Self, InstanceState)> {
        let dir = run_dir()?;
        let lock_name = format!("{name}.lock");
        let lock = lock(&dir, &lock_name, name)?;
        let state_name = format!("{name}.state");
        let leftover = read(&dir, &state_name);
        let state = InstanceState { netns: netns_id()?, ..InstanceState::default() };
        let claim = Self { _lock: lock, dir, lock_name, state_name, state };
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
        self.dir.write(&self.state_name, &json).map_err(|e| {
            Error::io(format!("writing {}", self.dir.join(&self.state_name).display()), e)
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Everything recorded has been detached by now. The lock file goes
        // while still locked; `lock` checks for that race.
        self.dir.remove(&self.state_name);
        self.dir.remove(&self.lock_name);
    }
}

/// Opens and locks `file` in `dir`. A lock file that its holder unlinked
/// on exit meanwhile is no lock at all, so the locked file must still be
/// the one in the directory.
fn lock(dir: &Dir, file: &str, name: &str) -> Result<Flock<File>> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(file);
    loop {
        let opened = dir
            .open_writable(file)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let locked = match Flock::lock(opened, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Err(Error::InstanceRunning(name.to_owned())),
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        };
        let inode = locked.metadata().map(|m| m.ino()).ok();
        if inode.is_some() && inode == dir.inode(file) {
            return Ok(locked);
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
    let Ok(dir) = Dir::open(&run_dir_path()) else { return Ok(Vec::new()) };
    let mut live = Vec::new();
    for file in dir.names() {
        let Some(name) = file.strip_suffix(".state") else { continue };
        if name == except || !is_locked(&dir, &format!("{name}.lock")) {
            continue;
        }
        let state = read(&dir, &file);
        if state.netns == netns {
            live.push((name.to_owned(), state));
        }
    }
    Ok(live)
}

/// Whether a live process holds the lock `file` in `dir`.
fn is_locked(dir: &Dir, file: &str) -> bool {
    let Ok(Some(file)) = dir.open_readable(file) else { return false };
    // Taken, our lock goes when the file closes.
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// Whether process `pid` holds the lock of [`takeover_name`]`(name)`: it
/// is a `--takeover` start of `name` (`/proc/locks` names each flock's
/// holder and inode).
pub fn holds_takeover_claim(name: &str, pid: u32) -> bool {
    let Ok(dir) = Dir::open(&run_dir_path()) else { return false };
    let Some(inode) = dir.inode(&format!("{}.lock", takeover_name(name))) else { return false };
    let Ok(locks) = fs::read_to_string("/proc/locks") else { return false };
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"
        let Some(at) = fields.iter().position(|f| *f == "FLOCK") else { return false };
        fields.get(at + 3) == Some(&pid.to_string().as_str())
            && fields.get(at + 4).and_then(|f| f.rsplit(':').next()?.parse::<u64>().ok())
                == Some(inode)
    })
}

/// Held while an instance chooses and installs its routing, so that two
/// instances starting at once never choose the same mark or table.
pub struct AllocationLock(#[allow(dead_code)] Flock<File>);

/// How long a start waits for another start's routing choice, which takes
/// milliseconds: longer means something holds the lock that should not.
pub const ALLOCATION_WAIT: Duration = Duration::from_secs(10);

impl AllocationLock {
    /// Takes the lock, waiting at most [`ALLOCATION_WAIT`].
    pub fn acquire() -> Result<Self> {
        let dir = run_dir()?;
        let path = dir.join("routing.lock");
        let deadline = Instant::now() + ALLOCATION_WAIT;
        loop {
            let file = dir
                .open_writable("routing.lock")
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => return Ok(Self(locked)),
                Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(Error::Config(format!(
                        "{} is held by another process for over {}s (see /proc/locks)",
                        path.display(),
                        ALLOCATION_WAIT.as_secs()
                    )));
                }
                Err((_, e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e.into()));
                }
            }
        }
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

/// A state file's record; one that is missing, untrusted (a link, another
/// user's) or unreadable records nothing.
fn read(dir: &Dir, file: &str) -> InstanceState {
    match dir.read(file) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Ok(None) => InstanceState::default(),
        Err(e) => {
            tracing::warn!("{e}: ignored");
            InstanceState::default()
        }
    }
}
