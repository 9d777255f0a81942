//! In-place upgrade for a service manager: a helper process, forked before
//! anything is loaded and before the instance drops its capabilities, waits
//! for the word to start the installed binary again with the instance's
//! arguments and `--takeover` (see [`crate::attach`]). The instance keeps
//! only what it needs at run time; the helper, which reads nothing from the
//! network, keeps what loading needs for its successor. It exits with the
//! instance.

use std::{
    ffi::OsString,
    os::fd::{AsFd as _, OwnedFd},
};

use nix::unistd::{ForkResult, fork, pipe, read, write};
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
        let (wait_end, trigger) = pipe().map_err(|e| io("creating the upgrade pipe", e))?;
        // SAFETY: no other thread runs yet (the caller's contract), so the
        // child may do anything the parent could.
        match unsafe { fork() }.map_err(|e| io("forking the upgrade helper", e))? {
            ForkResult::Child => {
                drop(trigger);
                helper(wait_end)
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
fn helper(wait_end: OwnedFd) -> ! {
    let _ = nix::sys::prctl::set_name(c"tproxy-upgrade");
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
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| OsString::from("tproxy-user"));
    let mut args: Vec<OsString> = args.collect();
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
    eprintln!("tproxy-user: upgrade: could not start {}: {e}", program.to_string_lossy());
    std::process::exit(1);
}
