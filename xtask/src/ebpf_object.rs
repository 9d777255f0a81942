//! `cargo xtask ebpf-object`: the eBPF object on its own, with the
//! fingerprint of its sources beside it, so that tproxy-user can be built
//! elsewhere with stable Rust alone (`TPROXY_EBPF_OBJECT`; see
//! `tproxy-user/build/prebuilt.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, ensure};

#[path = "../../tproxy-user/build/prebuilt.rs"]
pub mod prebuilt;

/// The eBPF crate's directory.
pub fn ebpf_dir() -> PathBuf {
    super::workspace().join("tproxy-ebpf")
}

/// Builds the object as tproxy-user's build script does (aya-build, nightly,
/// bpf-linker) and writes it to `out`, with `out.source`.
pub fn build(out: &Path) -> Result<()> {
    let staging = super::workspace().join("target/ebpf-object");
    std::fs::create_dir_all(&staging)?;
    // What cargo gives a build script, for aya-build. SAFETY: xtask is
    // single-threaded here.
    unsafe {
        std::env::set_var("OUT_DIR", &staging);
        std::env::set_var("CARGO_CFG_TARGET_ENDIAN", "little");
        std::env::set_var("CARGO_CFG_TARGET_ARCH", std::env::consts::ARCH);
    }
    let dir = ebpf_dir();
    let dir = dir.to_str().context("a UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "tproxy-ebpf", root_dir: dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| anyhow!("building the eBPF object: {e:#}"))?;
    write(&staging.join("tproxy"), out)
}

/// Copies `object` to `out` and writes the fingerprint of this checkout's
/// sources beside it.
fn write(object: &Path, out: &Path) -> Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(object, out).with_context(|| format!("writing {}", out.display()))?;
    let fingerprint = prebuilt::fingerprint(&ebpf_dir())?;
    std::fs::write(prebuilt::fingerprint_path(out), format!("{fingerprint}\n"))?;
    prebuilt::check(out, &ebpf_dir()).map_err(|e| anyhow!(e))?;
    println!("wrote {} and its fingerprint ({fingerprint})", out.display());
    Ok(())
}

/// The object the last debug build of tproxy-user embedded (the one the
/// tests ran), written as [`build`] writes one: no second eBPF build.
pub fn from_debug_build(out: &Path) -> Result<()> {
    let builds = super::workspace().join("target/debug/build");
    let newest = std::fs::read_dir(&builds)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tproxy-user-"))
        .map(|e| e.path().join("out/tproxy"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .context("no debug build of tproxy-user with an eBPF object")?;
    write(&newest.1, out)
}

/// The object given as `TPROXY_EBPF_OBJECT` builds the library with its
/// fingerprint, and is refused with another (`cargo check`, so only the
/// build script and tproxy-user itself run).
pub fn check_consumer_build(object: &Path) -> Result<()> {
    let check = |object: &Path| {
        std::process::Command::new(env!("CARGO"))
            .current_dir(super::workspace())
            .args(["check", "--quiet", "--package", "tproxy-user", "--lib"])
            .env(prebuilt::ENV, object)
            .output()
    };
    let out = check(object)?;
    ensure!(
        out.status.success(),
        "tproxy-user did not build with {}={}:\n{}",
        prebuilt::ENV,
        object.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stale = object.with_file_name("stale.bpf.o");
    std::fs::copy(object, &stale)?;
    std::fs::write(prebuilt::fingerprint_path(&stale), "crc32:00000000 files:0\n")?;
    let out = check(&stale)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("was built from other eBPF sources"),
        "an object of other sources was not refused:\n{stderr}"
    );
    Ok(())
}
