//! Builds the TC program (tproxy-ebpf's `tproxy` bin) for the BPF target with
//! nightly and bpf-linker, so that a plain `cargo build -p tproxy-user`
//! embeds it. `cargo xtask setup` installs both prerequisites. With
//! `TPROXY_EBPF_OBJECT` it embeds a prebuilt object instead, and needs
//! neither (see `build/prebuilt.rs`).
use std::path::Path;

use anyhow::anyhow;

#[path = "build/prebuilt.rs"]
mod prebuilt;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tproxy-ebpf");
    println!("cargo:rerun-if-env-changed={}", prebuilt::ENV);
    if let Some(object) = std::env::var_os(prebuilt::ENV) {
        let object = Path::new(&object);
        println!("cargo:rerun-if-changed={}", object.display());
        println!("cargo:rerun-if-changed={}", prebuilt::fingerprint_path(object).display());
        println!("cargo:rerun-if-changed={ebpf_dir}");
        prebuilt::check(object, Path::new(ebpf_dir)).map_err(|e| anyhow!(e))?;
        let out = Path::new(&std::env::var_os("OUT_DIR").ok_or(anyhow!("OUT_DIR not set"))?)
            .join("tproxy");
        std::fs::copy(object, &out)
            .map_err(|e| anyhow!("{}: copying {}: {e}", prebuilt::ENV, object.display()))?;
        return Ok(());
    }
    if std::process::Command::new("bpf-linker").arg("--version").output().is_err() {
        return Err(anyhow!(
            "bpf-linker not found: run `cargo xtask setup` (installs bpf-linker 0.10.0 and nightly rust-src), or build the object elsewhere with `cargo xtask ebpf-object` and give it as {}",
            prebuilt::ENV
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "tproxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
