//! `cargo xtask setup | build | run | demo | test`: everything a fresh
//! machine needs to build, try and test tproxy, with no manual steps.

// Charts and flame graphs: only `cargo xtask bench` builds them.
#[cfg(feature = "bench")]
mod bench;
mod demo;
mod dist;
mod ebpf_object;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: apt packages, nightly rust-src, bpf-linker 0.10.0.
    Setup,
    /// Build tproxy-user (release) with the TC program embedded.
    Build,
    /// Build, then run tproxy-user with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A self-contained demo in a sandbox of network namespaces.
    Demo,
    /// Run every test (needs root: the tests create network namespaces):
    /// on the host kernel, the Debian package and the Kubernetes manifests,
    /// then inside a Debian 6.1 kernel.
    Test {
        /// Only the host kernel.
        #[arg(long)]
        host_only: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure tproxy against HAProxy + iptables TPROXY and plain forwarding;
    /// writes BENCHMARKS.md. Not a test.
    Bench {
        /// Interleaved rounds (the table shows medians).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// Only the failed requests while the proxy is upgraded under load.
        #[arg(long)]
        upgrade_only: bool,
        /// Only these modes, comma-separated (direct, haproxy-recipe,
        /// haproxy, haproxy-spoof, ours, ours-spoof, nginx-udp); BENCHMARKS.md
        /// is rewritten only by a run of all.
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Measure this tproxy-user instead of the workspace's release build,
        /// for an A/B of two builds; BENCHMARKS.md is then left as it is.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Build the Debian package into target/dist (and with --check, install,
    /// verify and remove it on this machine).
    Dist {
        /// Also check the package on this machine (skipped where tproxy is installed).
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF object alone, with the fingerprint of its sources
    /// beside it, for building tproxy-user elsewhere with stable Rust alone
    /// (`TPROXY_EBPF_OBJECT=PATH cargo build`).
    EbpfObject {
        /// Where to write it (and PATH.source).
        #[arg(long, default_value = "target/ebpf-object/tproxy.bpf.o")]
        out: PathBuf,
    },
    /// Run the integration tests inside Debian kernels under qemu (virtme-ng).
    VmTest {
        /// Which kernel: 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all", value_parser = ["5.10", "6.1", "6.12", "all"])]
        kernel: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::demo()?;
            build(true).map(|_| ())
        }
        Task::Run { args } => {
            setup::demo()?;
            let bin = build(true)?;
            let status = Command::new(&bin).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Demo => {
            require_root("the demo creates network namespaces")?;
            setup::demo()?;
            let bin = build(true)?;
            demo::run(&bin)
        }
        Task::Test { host_only, args } => {
            require_root("the tests create network namespaces and load BPF programs")?;
            setup::run()?;
            test(&args)?;
            // The package and the manifests, on this machine. What is checked
            // is the packaging, so the tested debug binary will do: a release
            // build would add four minutes (`cargo xtask dist` makes the
            // real package from one).
            dist::check(&dist::build(&dist::stripped(&build(false)?)?)?)?;
            dist::validate_manifests()?;
            if host_only {
                return Ok(());
            }
            let binaries = build_test_binaries()?;
            let six_one =
                vm::SERIES.iter().find(|s| s.name == "6.1").expect("6.1 is in the matrix");
            vm::run(&[six_one], &binaries)?;
            // Last: it leaves tproxy-user built from the prebuilt object, so the
            // next plain build rebuilds it.
            let object = workspace().join("target/ebpf-object/tested.bpf.o");
            ebpf_object::from_debug_build(&object)?;
            ebpf_object::check_consumer_build(&object)
        }
        #[cfg(not(feature = "bench"))]
        Task::Bench { .. } => with_bench_feature(),
        #[cfg(feature = "bench")]
        Task::Bench { rounds, seconds, upgrade_only, modes, binary } => {
            require_root("the benchmark creates network namespaces and loads BPF programs")?;
            setup::demo()?;
            setup::bench_tools()?;
            let other_build = binary.is_some();
            let bin = match binary {
                Some(bin) => bin,
                None => build(true)?,
            };
            bench::run(&bin, &bench::Options { rounds, seconds, upgrade_only, modes, other_build })
        }
        Task::Dist { check } => {
            setup::demo()?;
            let deb = dist::build(&build(true)?)?;
            if check {
                require_root("the check installs the package")?;
                dist::check(&deb)?;
            }
            Ok(())
        }
        Task::EbpfObject { out } => {
            setup::demo()?;
            ebpf_object::build(&out)
        }
        Task::VmTest { kernel } => {
            require_root("the tests create network namespaces and load BPF programs")?;
            setup::run()?;
            let series: Vec<&vm::Series> =
                vm::SERIES.iter().filter(|s| kernel == "all" || s.name == kernel).collect();
            let binaries = build_test_binaries()?;
            vm::run(&series, &binaries)
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Builds tproxy-user and returns the binary's path.
fn build(release: bool) -> Result<PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(workspace()).args(["build", "--package", "tproxy-user"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)?;
    Ok(workspace()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("tproxy-user"))
}

fn test(args: &[String]) -> Result<()> {
    let bin = build(false)?;
    build_examples()?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace())
        .args(["test", "--workspace", "--exclude", "tproxy-ebpf"])
        .args(args)
        .env("TPROXY_USER_BIN", &bin)
        .env("TPROXY_EXAMPLES_DIR", workspace().join("target/debug/examples"));
    run(&mut cargo)
}

/// The library's examples, which the library and external tests run.
fn build_examples() -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(workspace()).args([
        "build",
        "--package",
        "tproxy-user",
        "--examples",
    ]))
}

/// Builds tproxy-user, its examples and the integration tests; returns the
/// test executables, for running elsewhere (inside a VM).
fn build_test_binaries() -> Result<vm::TestBinaries> {
    let tproxy_user = build(false)?;
    build_examples()?;
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args(["test", "--package", "tproxy-tests", "--tests", "--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !output.status.success() {
        bail!("building the tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let target = &message["target"];
        if let (Some(path), Some(name)) = (message["executable"].as_str(), target["name"].as_str())
            && target["kind"] == serde_json::json!(["test"])
        {
            tests.push((name.to_owned(), PathBuf::from(path)));
        }
    }
    if tests.is_empty() {
        bail!("no test executables were built");
    }
    Ok(vm::TestBinaries { tests, tproxy_user, examples: workspace().join("target/debug/examples") })
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs this same command again from an xtask built with the `bench`
/// feature, so that `test`, `demo` and `setup` never build its chart and
/// flame-graph crates.
#[cfg(not(feature = "bench"))]
fn with_bench_feature() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--features", "bench", "--"])
        .args(std::env::args_os().skip(1))
        .current_dir(workspace())
        .status()
        .context("running cargo")?;
    // It said why itself.
    std::process::exit(status.code().unwrap_or(1))
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}
