//! cgroup v2 directories for `--cgroup`: where cgroup2 is mounted (from
//! `/proc/mounts`: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
//! hosts), and a given path checked to be a cgroup v2 directory.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// `CGROUP2_SUPER_MAGIC`, the `f_type` of a cgroup v2 filesystem.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// A cgroup v2 directory, open for attaching programs to.
#[derive(Debug)]
pub struct Cgroup {
    /// Its full path.
    pub path: PathBuf,
    /// The open directory.
    pub dir: File,
}

/// Where cgroup2 is mounted, in `/proc/mounts` order.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| Error::io("reading /proc/mounts", e))?;
    Ok(parse_mounts(&mounts))
}

fn parse_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
            // Spaces and the like in mount points are octal escapes.
            (kind == "cgroup2").then(|| PathBuf::from(unescape(dir)))
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens the cgroup at `path`: a directory of a cgroup2 mount, given in
/// full (`/sys/fs/cgroup/system.slice/x.service`) or from the mount's root
/// (`/system.slice/x.service`). Anything else is refused in one line.
pub fn open(path: &Path) -> Result<Cgroup> {
    let mounts = cgroup2_mounts()?;
    let Some(root) = mounts.first() else {
        return Err(Error::Config(
            "--cgroup needs cgroup v2, and no cgroup2 filesystem is mounted here (`ip netns exec` hides it by remounting /sys: use `nsenter --net=/run/netns/NAME`)"
                .into(),
        ));
    };
    let full = if mounts.iter().any(|m| path.starts_with(m)) {
        path.to_path_buf()
    } else {
        root.join(path.strip_prefix("/").unwrap_or(path))
    };
    let not_cgroup = |why: &str| {
        Error::Config(format!(
            "{} is not a cgroup v2 directory ({why}; cgroup2 is mounted at {})",
            path.display(),
            root.display()
        ))
    };
    let dir = File::open(&full).map_err(|e| not_cgroup(&e.to_string()))?;
    let stat = nix::sys::statfs::fstatfs(&dir).map_err(|e| not_cgroup(&e.to_string()))?;
    if stat.filesystem_type().0 as i64 != CGROUP2_MAGIC {
        return Err(not_cgroup("not on a cgroup2 filesystem"));
    }
    if !dir.metadata().map_err(|e| not_cgroup(&e.to_string()))?.is_dir() {
        return Err(not_cgroup("not a directory"));
    }
    Ok(Cgroup { path: full, dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_either_layout() {
        let hybrid = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_mounts(hybrid), [PathBuf::from("/sys/fs/cgroup/unified")]);
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(parse_mounts(unified), [PathBuf::from("/sys/fs/cgroup")]);
        let escaped = "none /mnt/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(parse_mounts(escaped), [PathBuf::from("/mnt/my cgroup")]);
        assert!(parse_mounts("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n").is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_cgroup() {
        if cgroup2_mounts().map_or(true, |m| m.is_empty()) {
            return;
        }
        let err = open(Path::new("/tmp")).unwrap_err().to_string();
        assert!(err.contains("/tmp is not a cgroup v2 directory"), "{err}");
        let err = open(Path::new("/no-such-group-here")).unwrap_err().to_string();
        assert!(err.contains("not a cgroup v2 directory"), "{err}");
    }
}
