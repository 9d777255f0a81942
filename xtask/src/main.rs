//! `cargo xtask setup | build | run | demo | test`: everything a fresh
//! machine needs to build, try and test tproxy, with no manual steps.

mod demo;
mod setup;

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
    /// Run every test (needs root: the tests create network namespaces).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build(true).map(|_| ())
        }
        Task::Run { args } => {
            setup::run()?;
            let bin = build(true)?;
            let status = Command::new(&bin).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Demo => {
            require_root("the demo creates network namespaces")?;
            setup::run()?;
            let bin = build(true)?;
            demo::run(&bin)
        }
        Task::Test { args } => {
            require_root("the tests create network namespaces and load BPF programs")?;
            setup::run()?;
            test(&args)
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
    // The library tests run the examples.
    run(Command::new(env!("CARGO")).current_dir(workspace()).args([
        "build",
        "--package",
        "tproxy-user",
        "--examples",
    ]))?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace())
        .args(["test", "--workspace", "--exclude", "tproxy-ebpf"])
        .args(args)
        .env("TPROXY_USER_BIN", &bin)
        .env("TPROXY_EXAMPLES_DIR", workspace().join("target/debug/examples"));
    run(&mut cargo)
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
