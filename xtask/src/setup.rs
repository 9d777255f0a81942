//! Installs the prerequisites that are missing, and only those.

use std::process::{Command, Stdio};

use anyhow::{Result, bail};

/// Commands the demo uses (and so do the tests), with the Debian package
/// that provides each.
const DEMO_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("sysctl", "procps"),
    ("curl", "curl"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
];

/// What the tests use besides the demo's tools.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("nstat", "iproute2"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("prlimit", "util-linux"),
    ("python3", "python3"),
    // Reads the access log, line by line.
    ("jq", "jq"),
    ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"),
    ("conntrack", "conntrack"),
    // A transparent proxy of someone else's, steered by `--to-port`; and
    // the tools that show no iptables or nft rule does it.
    ("haproxy", "haproxy"),
    ("iptables-save", "iptables"),
    ("nft", "nftables"),
    // Upstream proxies for `--upstream`.
    ("danted", "dante-server"),
    ("tinyproxy", "tinyproxy"),
    // The package check: the binary stripped, the unit verified, the man
    // pages read.
    ("strip", "binutils"),
    ("systemd-analyze", "systemd"),
    ("man", "man-db"),
    // `--cgroup`: namespaces entered with the cgroup2 mount in sight, and a
    // proxy written for iptables REDIRECT.
    ("nsenter", "util-linux"),
    ("redsocks", "redsocks"),
    // A real L3 tunnel (TUN over UDP) for the interface without Ethernet.
    ("socat", "socat"),
];

/// Services that packages above start when installed on a host run by
/// systemd; the tests start their own in namespaces, so the ones setup
/// installed are stopped and disabled again (one already there is left
/// alone).
const SERVICES: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("dante-server", "danted"),
    ("tinyproxy", "tinyproxy"),
    ("nginx-light", "nginx"),
    ("redsocks", "redsocks"),
];

/// What the kernel-VM tests (virtme-ng) need.
const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("udevadm", "udev"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
];

/// virtme-ng, which boots a kernel with the host's filesystem; the version
/// these machines were checked with.
const VIRTME_NG: &str = "virtme-ng==1.42";

const BPF_LINKER_VERSION: &str = "0.10.0";

/// What the build and the demo need.
pub fn demo() -> Result<()> {
    install_missing(DEMO_TOOLS)?;
    rust_src()?;
    bpf_linker()
}

/// What the build, the tests and the kernel-VM tests need.
pub fn run() -> Result<()> {
    demo()?;
    install_missing(TEST_TOOLS)?;
    install_missing(VM_TOOLS)?;
    virtme_ng()?;
    kubernetes_validate()
}

/// kubernetes-validate, which checks the manifests against the Kubernetes
/// schemas offline, in the same venv; the version these machines were
/// checked with.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The venv's `kubernetes-validate`.
pub fn kubernetes_validate_bin() -> std::path::PathBuf {
    super::workspace().join("target/vm/venv/bin/kubernetes-validate")
}

fn kubernetes_validate() -> Result<()> {
    if kubernetes_validate_bin().exists() {
        return Ok(());
    }
    eprintln!("setup: installing {KUBERNETES_VALIDATE}");
    let pip = super::workspace().join("target/vm/venv/bin/pip");
    super::run(Command::new(pip).args(["install", "-q", KUBERNETES_VALIDATE]))
}

/// A virtualenv under target/vm with virtme-ng, so nothing is installed into
/// the system Python.
fn virtme_ng() -> Result<()> {
    let venv = super::workspace().join("target/vm/venv");
    if venv.join("bin/vng").exists() {
        return Ok(());
    }
    eprintln!("setup: installing {VIRTME_NG} into {}", venv.display());
    if super::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_err() {
        // Debian's python3 keeps venv in a package of its own.
        super::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "python3-venv"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        super::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    super::run(Command::new(venv.join("bin/pip")).args(["install", "-q", VIRTME_NG]))
}

/// What `cargo xtask bench` runs besides tproxy.
#[cfg(feature = "bench")]
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("nginx", "nginx-light"),
    ("ab", "apache2-utils"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
    ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"),
    ("conntrack", "conntrack"),
    ("perf", "linux-perf"),
    ("strace", "strace"),
    // The chart's font.
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
];

/// Installs the benchmark's tools that are missing.
#[cfg(feature = "bench")]
pub fn bench_tools() -> Result<()> {
    install_missing(BENCH_TOOLS)
}

fn install_missing(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> =
        tools.iter().filter(|(tool, _)| !found(tool)).map(|&(_, package)| package).collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    super::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if std::path::Path::new("/run/systemd/system").exists() {
        for (_, unit) in SERVICES.iter().filter(|(package, _)| missing.contains(package)) {
            let _ = Command::new("systemctl").args(["disable", "--now", unit]).status();
        }
    }
    Ok(())
}

/// `-Z build-std=core` for the BPF target needs the nightly standard library source.
fn rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    super::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker 0.10.0 links with rustc's own LLVM; newer releases want a
/// system LLVM this distribution does not have.
fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").stderr(Stdio::null()).output();
    if let Ok(out) = version
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    super::run(Command::new("cargo").args([
        "+nightly",
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    if !found("bpf-linker") {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Whether `tool` is on PATH, or in an sbin directory a non-login PATH may lack.
/// Whether `tool` is a command on the path (or, given as a path, a file).
fn found(tool: &str) -> bool {
    if tool.starts_with('/') {
        return std::path::Path::new(tool).exists();
    }
    ["/usr/sbin", "/sbin"].iter().any(|dir| std::path::Path::new(dir).join(tool).exists())
        || Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}
