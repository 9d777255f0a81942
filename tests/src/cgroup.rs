//! cgroup v2 directories that tests create and remove, and commands run
//! in one of them and in a namespace.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Netns;

/// A cgroup v2 directory of its own; removed (its processes killed first)
/// when dropped.
pub struct TestCgroup {
    /// The full path.
    pub path: PathBuf,
    /// The path from the cgroup2 mount's root, as `--cgroup` may take it.
    pub relative: String,
}

impl TestCgroup {
    /// Creates `tproxy-test-<pid>-<tag>` at the root of the cgroup2 mount
    /// (mounting cgroup2 first inside a test VM whose init did not).
    pub fn new(tag: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let relative = format!("/tproxy-test-{}-{tag}", std::process::id());
        let path = root.join(relative.trim_start_matches('/'));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, relative })
    }

    /// A cgroup below this one (dropped before it: declare it after).
    pub fn child(&self, name: &str) -> Result<Self> {
        let path = self.path.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, relative: format!("{}/{name}", self.relative) })
    }

    /// `program` run in this cgroup and in `ns` (see [`in_netns`]).
    pub fn command(&self, ns: &Netns, program: &str) -> Command {
        in_netns(ns, program, Some(&self.path))
    }

    /// The names of the BPF programs attached to this cgroup, as
    /// `bpftool cgroup show` lists them.
    pub fn attached_programs(&self) -> Result<Vec<String>> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&self.path)
            .output()
            .context("running bpftool")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let list: serde_json::Value = serde_json::from_str(&text)?;
        Ok(list
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `program` in `ns`, joined to `cgroup` first if given. `nsenter --net`
/// switches only the network namespace, so the cgroup2 mount stays in
/// sight (`ip netns exec` remounts /sys); a process joins a cgroup by
/// writing its pid, before it enters the namespace.
pub fn in_netns(ns: &Netns, program: &str, cgroup: Option<&Path>) -> Command {
    let mut command = Command::new("sh");
    let join = match cgroup {
        Some(path) => format!("echo $$ > '{}/cgroup.procs' && ", path.display()),
        None => String::new(),
    };
    command
        .arg("-c")
        .arg(format!("{join}exec nsenter --net=/run/netns/{} \"$@\"", ns.name))
        .arg("sh")
        .arg(program);
    command
}

/// Where cgroup2 is mounted; a test VM whose init mounted none gets one at
/// /run/tproxy-tests-cgroup2.
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if let Some(dir) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    }) {
        return Ok(dir);
    }
    let in_vm = std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.contains("virtme"));
    if !in_vm {
        bail!("no cgroup2 filesystem is mounted here");
    }
    let dir = PathBuf::from("/run/tproxy-tests-cgroup2");
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&dir).status()?;
    anyhow::ensure!(status.success(), "mounting cgroup2 at {}", dir.display());
    Ok(dir)
}
