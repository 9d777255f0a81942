//! Files in a directory that another user may control (the runtime
//! directory belongs to the unit's dynamic user, yet root runs `cleanup`
//! there): every file is opened relative to a handle on the directory,
//! never through a link, and checked before it is trusted.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsFd, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{AtFlags, OFlag, open, openat, renameat},
    sys::stat::{Mode, fchmod, fstat},
    unistd::{Uid, UnlinkatFlags, unlinkat},
};

/// A directory, held open.
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    owner: u32,
}

/// What a directory or file failed.
fn refuse(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("{}: {why}", path.display()))
}

impl Dir {
    /// Opens `path`, creating it 0700 (with its parents) if missing. A
    /// directory this process owns is made 0700, so that no other user can
    /// open what is in it (a lock file another user can open is a lock they
    /// can hold). One that is a link, or that another user than this one
    /// or root owns, or that others may write, is refused.
    pub fn private(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
        let dir = Self::open(path)?;
        if dir.owner == Uid::effective().as_raw() {
            fchmod(&dir.fd, Mode::S_IRWXU)?;
        }
        Ok(dir)
    }

    /// Opens an existing `path` (never through a link at its last
    /// component) and checks it as [`Dir::private`] does, changing nothing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let fd = open(path, flags, Mode::empty()).map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                refuse(path, "not a directory (a link is never followed)")
            }
            e => io::Error::from(e),
        })?;
        let stat = fstat(&fd)?;
        let me = Uid::effective().as_raw();
        if stat.st_uid != me && stat.st_uid != 0 && !Uid::effective().is_root() {
            return Err(refuse(path, "owned by another user"));
        }
        if stat.st_mode & 0o022 != 0 && stat.st_mode & 0o1000 == 0 {
            return Err(refuse(path, "others may write to it"));
        }
        Ok(Self { fd, path: path.to_owned(), owner: stat.st_uid })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` in the directory, as a path (for messages and sockets).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens `name` for writing, creating it 0600 if missing, never
    /// through a link.
    pub fn open_writable(&self, name: &str) -> io::Result<File> {
        let flags = OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NONBLOCK;
        let file = self.open_at(name, flags)?;
        self.check(name, &file)?;
        Ok(file)
    }

    /// Opens `name` for reading if it is there, never through a link.
    pub fn open_readable(&self, name: &str) -> io::Result<Option<File>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        match self.open_at(name, flags) {
            Ok(file) => {
                self.check(name, &file)?;
                Ok(Some(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What `name` holds, if it is there and trusted (see
    /// [`Dir::open_readable`]).
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let Some(mut file) = self.open_readable(name)? else { return Ok(None) };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Replaces `name` with `bytes` at once (a new 0600 file renamed over
    /// it), so that a reader sees the old content or the new.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let temporary = format!(".{name}.{}", std::process::id());
        let _ = unlinkat(&self.fd, temporary.as_str(), UnlinkatFlags::NoRemoveDir);
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
        let mut file = self.open_at(&temporary, flags)?;
        let written = file.write_all(bytes).and_then(|()| {
            renameat(&self.fd, temporary.as_str(), &self.fd, name).map_err(io::Error::from)
        });
        if written.is_err() {
            let _ = unlinkat(&self.fd, temporary.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Removes `name` if it is there (a link is removed, not followed).
    pub fn remove(&self, name: &str) {
        let _ = unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir);
    }

    /// The names in the directory.
    pub fn names(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", self.raw())) else {
            return Vec::new();
        };
        entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect()
    }

    /// The inode `name` has now, without following a link.
    pub fn inode(&self, name: &str) -> Option<u64> {
        nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok().map(|s| s.st_ino)
    }

    fn raw(&self) -> i32 {
        use std::os::fd::AsRawFd as _;
        self.fd.as_raw_fd()
    }

    fn open_at(&self, name: &str, flags: OFlag) -> io::Result<File> {
        if name.contains('/') || name.is_empty() || name == ".." || name == "." {
            return Err(refuse(&self.join(name), "not a plain file name"));
        }
        let fd = openat(
            &self.fd,
            OsStr::from_bytes(name.as_bytes()),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP => refuse(&self.join(name), "a link, never followed"),
            e => io::Error::from(e),
        })?;
        Ok(File::from(fd))
    }

    /// A file is trusted when it is a regular file of this process's user
    /// or of the directory's owner (or root), with one link, that no one
    /// else may write.
    fn check(&self, name: &str, file: &File) -> io::Result<()> {
        let meta = file.metadata()?;
        let path = self.join(name);
        if !meta.file_type().is_file() {
            return Err(refuse(&path, "not a regular file"));
        }
        let uid = meta.uid();
        if uid != Uid::effective().as_raw() && uid != self.owner && uid != 0 {
            return Err(refuse(&path, "owned by another user"));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(&path, "others may write to it"));
        }
        if meta.nlink() != 1 {
            return Err(refuse(&path, "has other names (a hard link)"));
        }
        Ok(())
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Reads a file that holds secrets (`--upstream-file`): refused when its
/// group or others may read it, or when it is a link.
pub fn read_secret(path: &Path) -> io::Result<String> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = open(path, flags, Mode::empty()).map_err(|e| match e {
        nix::errno::Errno::ELOOP => refuse(path, "a link, never followed"),
        e => io::Error::from(e),
    })?;
    let mut file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refuse(path, "not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(
            path,
            &format!("mode {:04o}: group and others may read it (chmod 600)", meta.mode() & 0o7777),
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tproxy-files-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_directory_of_ours_is_closed_and_its_files_are_private() {
        let path = scratch("private");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = Dir::private(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o700);
        dir.write("a.state", b"{}").unwrap();
        assert_eq!(std::fs::metadata(path.join("a.state")).unwrap().mode() & 0o777, 0o600);
        assert_eq!(dir.read("a.state").unwrap().as_deref(), Some(&b"{}"[..]));
        assert_eq!(dir.read("missing").unwrap(), None);
        std::fs::set_permissions(path.join("a.state"), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        assert!(dir.read("a.state").is_err(), "a file others may write is not trusted");
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn links_are_never_followed() {
        let path = scratch("links");
        let dir = Dir::private(&path).unwrap();
        let target = path.join("target");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, path.join("x.state")).unwrap();
        std::os::unix::fs::symlink(&target, path.join("x.lock")).unwrap();
        assert!(dir.read("x.state").is_err());
        assert!(dir.open_writable("x.lock").is_err());
        // Replacing a link replaces the link, never what it points to.
        dir.write("x.state", b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        std::fs::hard_link(&target, path.join("h.state")).unwrap();
        assert!(dir.read("h.state").is_err(), "a hard link is not trusted");
        let linked = scratch("linked-dir");
        std::os::unix::fs::symlink(&path, &linked).unwrap();
        assert!(Dir::open(&linked).is_err(), "a directory behind a link");
        std::fs::remove_file(&linked).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn secrets_must_be_private() {
        let path = scratch("secret");
        std::fs::create_dir(&path).unwrap();
        let file = path.join("upstreams");
        std::fs::write(&file, "corp=socks5://u:p@192.0.2.1:1080\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_secret(&file).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret(&file).unwrap().starts_with("corp="));
        std::fs::remove_dir_all(&path).unwrap();
    }
}
