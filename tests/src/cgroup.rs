//! cgroup v2 directories that tests create and remove, and commands run
//! in one of them and in a namespace.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
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

    /// How many programs are attached to this cgroup's IPv4 `connect`
    /// hook (`BPF_PROG_QUERY`, as `bpftool cgroup show` asks).
    pub fn connect4_programs(&self) -> Result<u32> {
        use std::os::fd::AsRawFd as _;
        // The `query` member of `union bpf_attr`.
        #[repr(C)]
        #[derive(Default)]
        struct Query {
            target_fd: u32,
            attach_type: u32,
            query_flags: u32,
            attach_flags: u32,
            prog_ids: u64,
            prog_cnt: u32,
            _pad: u32,
        }
        const BPF_PROG_QUERY: libc::c_long = 16;
        const BPF_CGROUP_INET4_CONNECT: u32 = 10;
        let dir = std::fs::File::open(&self.path)?;
        let mut query = Query {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            ..Query::default()
        };
        // SAFETY: the attribute outlives the call; no id buffer is given,
        // so the kernel only writes the count.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut query as *mut Query,
                std::mem::size_of::<Query>(),
            )
        };
        anyhow::ensure!(ret == 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
        Ok(query.prog_cnt)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Best effort: a cgroup still busy after 10 s is left.
        let _ = crate::eventually(Duration::from_secs(10), || {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            Ok(std::fs::remove_dir(&self.path)?)
        });
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
