//! A prebuilt eBPF object, for building tproxy-user with stable Rust alone:
//! `cargo xtask ebpf-object` writes the object and, beside it, the
//! fingerprint of the eBPF sources it was built from; `build.rs` takes an
//! object named by `TPROXY_EBPF_OBJECT` only if that fingerprint is the
//! one of the sources it sees, since an object from other sources loads
//! but disagrees with the userland on maps and counters.
//!
//! Shared by `build.rs` and xtask (through `#[path]`): one definition of
//! the fingerprint.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The variable that names a prebuilt object.
pub const ENV: &str = "TPROXY_EBPF_OBJECT";

/// The file beside `object` that holds its sources' fingerprint.
pub fn fingerprint_path(object: &Path) -> PathBuf {
    let mut name = object.as_os_str().to_owned();
    name.push(".source");
    PathBuf::from(name)
}

/// A CRC-32 of the eBPF crate's manifest and sources, by relative path:
/// enough to tell an object of other sources (not a signature).
pub fn fingerprint(ebpf_dir: &Path) -> io::Result<String> {
    let mut files = vec![PathBuf::from("Cargo.toml")];
    let mut dirs = vec![PathBuf::from("src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(ebpf_dir.join(&dir))? {
            let entry = entry?;
            let path = dir.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hasher = crc32fast::Hasher::new();
    for file in &files {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        hasher.update(&fs::read(ebpf_dir.join(file))?);
        hasher.update(&[0]);
    }
    Ok(format!("crc32:{:08x} files:{}", hasher.finalize(), files.len()))
}

/// Fails with a one-line reason unless `object` has a fingerprint that is
/// `ebpf_dir`'s.
pub fn check(object: &Path, ebpf_dir: &Path) -> Result<(), String> {
    let beside = fingerprint_path(object);
    let given = fs::read_to_string(&beside).map_err(|e| {
        format!(
            "{ENV}: reading {}: {e} (write both with `cargo xtask ebpf-object`)",
            beside.display()
        )
    })?;
    let ours = fingerprint(ebpf_dir)
        .map_err(|e| format!("{ENV}: reading the eBPF sources in {}: {e}", ebpf_dir.display()))?;
    if given.trim() != ours {
        return Err(format!(
            "{ENV}: {} was built from other eBPF sources ({}) than these ({ours}): rebuild it with `cargo xtask ebpf-object` from this checkout",
            object.display(),
            given.trim()
        ));
    }
    Ok(())
}
