//! Builds the TC program (tproxy-ebpf's `tproxy` bin) for the BPF target with
//! nightly and bpf-linker, so that a plain `cargo build -p tproxy-user`
//! embeds it. `cargo xtask setup` installs both prerequisites.
use anyhow::anyhow;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tproxy-ebpf");
    if std::process::Command::new("bpf-linker").arg("--version").output().is_err() {
        return Err(anyhow!(
            "bpf-linker not found: run `cargo xtask setup` (installs bpf-linker 0.10.0 and nightly rust-src)"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "tproxy-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
