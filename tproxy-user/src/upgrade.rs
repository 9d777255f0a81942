//! In-place upgrade for a service manager: a helper process, forked before
//! anything is loaded and before the instance drops its capabilities, waits
//! for the word to start the installed binary again with the instance's
//! arguments and `--takeover` (see [`crate::attach`]). The instance keeps
//! only what it needs at run time; the helper, which reads nothing from the
//! network, keeps what a start needs for its successor and nothing else.
//! It exits with the instance.
//!
//! It starts the program this process was started from (its path, resolved
//! before the fork), never `argv[0]`, which `PATH` could make another; its
//! own descriptors close on exec.

use std::{
    ffi::OsString,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use nix::{
    fcntl::OFlag,
    unistd::{ForkResult, fork, pipe2, read, write},
};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The helper, from the instance's side.
#[derive(Debug)]
pub struct Successor {
    trigger: OwnedFd,
    helper: nix::unistd::Pid,
}

impl Successor {
    /// Forks the helper. Call it before any thread starts and before any
    /// program, map or lock is opened: the helper must hold nothing of the
    /// instance's, or a killed instance would leave its programs attached.
    pub fn fork() -> Result<Self> {
        let io = |what: &str, e: nix::Error| Error::io(what.to_owned(), std::io::Error::from(e));
        // The installed binary's path: an upgrade replaces the file there.
        let program = std::fs::read_link("/proc/self/exe")
            .map(|p| {
                let text = p.to_string_lossy();
                PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text))
            })
            .map_err(|e| Error::io("reading /proc/self/exe", e))?;
        let (wait_end, trigger) =
            pipe2(OFlag::O_CLOEXEC).map_err(|e| io("creating the upgrade pipe", e))?;
        // SAFETY: no other thread runs yet (the caller's contract), so the
        // child may do anything the parent could.
        match unsafe { fork() }.map_err(|e| io("forking the upgrade helper", e))? {
            ForkResult::Child => {
                drop(trigger);
                helper(wait_end, program)
            }
            ForkResult::Parent { child } => Ok(Self { trigger, helper: child }),
        }
    }

    /// Has the helper start the successor.
    pub fn start(&self) {
        match write(self.trigger.as_fd(), b"u") {
            Ok(_) => {
                info!("upgrade: process {} starts the installed binary to take over", self.helper)
            }
            Err(e) => warn!("upgrade: the helper is gone ({e})"),
        }
    }
}

/// The helper: waits for a byte, then becomes the successor; at end of
/// file (the instance exited or died) it exits.
fn helper(wait_end: OwnedFd, program: PathBuf) -> ! {
    let _ = nix::sys::prctl::set_name(c"tproxy-upgrade");
    close_on_exec_all();
    if let Err(e) =
        crate::host::system::limit_capabilities(&crate::host::system::start_capabilities())
    {
        eprintln!("tproxy-user: upgrade helper: {e}");
        std::process::exit(1);
    }
    let mut byte = [0u8; 1];
    let woken = loop {
        match read(&wait_end, &mut byte) {
            Err(nix::Error::EINTR) => continue,
            Ok(1) => break true,
            _ => break false,
        }
    };
    if !woken {
        std::process::exit(0);
    }
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    use std::os::unix::process::CommandExt as _;
    // Its own watchdog: the service manager's WATCHDOG_PID names the
    // instance, whose main-process role the successor takes (MAINPID=).
    let e = std::process::Command::new(&program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .env_remove("WATCHDOG_PID")
        .exec();
    eprintln!("tproxy-user: upgrade: could not start {}: {e}", program.display());
    std::process::exit(1);
}

/// Marks every descriptor but stdin, stdout and stderr close-on-exec: what
/// this process was given (by whoever started it) is no successor's.
fn close_on_exec_all() {
    use nix::fcntl::{F_GETFD, F_SETFD, FdFlag, fcntl};
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> =
        entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        // SAFETY: only the flag of a descriptor this process has changes.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl(fd, F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, F_SETFD(flags));
        }
    }
}
